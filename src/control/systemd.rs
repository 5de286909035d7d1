//! systemd's side of the daemon's life: socket activation (`LISTEN_FDS`)
//! and readiness (`READY=1` / `STOPPING=1` over `NOTIFY_SOCKET`), through
//! the `sd-notify` crate. Both are no-ops outside systemd.
//!
//! Knows the environment protocol, nothing about vhost-user.

use std::io;
use std::os::fd::RawFd;

use sd_notify::NotifyState;

/// The listening socket systemd passed us (`LISTEN_FDS` for our PID), if
/// any. A unit must pass exactly one (one `ListenStream=`).
pub fn listen_fd() -> io::Result<Option<RawFd>> {
    let mut fds = sd_notify::listen_fds()?;
    match fds.len() {
        0 => Ok(None),
        1 => Ok(fds.next()),
        n => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("systemd passed {n} sockets; give the socket unit exactly one ListenStream="),
        )),
    }
}

/// Tells the service manager the daemon can serve (`Type=notify`).
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager the daemon is shutting down.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
    }
}
