//! Test harness: a network namespace, the daemon running in it, and a
//! vhost-user frontend that drives the daemon exactly as QEMU does, with
//! rings written by `vhost_user_net::testing::driver` in memfd-backed guest memory.
//!
//! For the benchmark also: DPDK's vhost backend and `net_virtio_user`
//! frontend as a peer (`dpdk`), and the pinned hot and cold TX floors
//! (`floor`).
//!
//! Everything created here is removed on drop (namespace, processes by PID),
//! also when a test fails. A dev-only crate of the workspace: the
//! integration tests and the benchmark use it; the daemon does not.

pub mod daemon;
pub mod dpdk;
pub mod floor;
pub mod frames;
pub mod frontend;
pub mod netns;
pub mod qemu;
pub mod synthetic;

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use daemon::{fds_and_rss, Daemon, Mode, Stats};
pub use frontend::{
    eth_frame, guest_features, TestFrontend, Vq, BUF_AREA, GUEST_BASE, GUEST_SIZE, LOG_ALL,
    LOG_PAGE,
};
pub use netns::{capture, Netns};

pub const TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique short name for this process and call.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
/// Accepts one connection on `listener` within `TIMEOUT`.
pub fn accept(listener: &std::os::unix::net::UnixListener) -> UnixStream {
    listener.set_nonblocking(true).expect("nonblocking");
    let s = wait_for("the daemon to connect", || {
        listener.accept().ok().map(|(s, _)| s)
    });
    s.set_nonblocking(false).expect("blocking");
    s
}

/// Polls `f` until it returns `Some`, or panics after `TIMEOUT`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The daemon's binary: `VUN_DAEMON_BIN`, else the `vhost-user-net` that
/// cargo built next to the running test or benchmark (`target/<profile>/`,
/// one level above `deps/`).
pub fn daemon_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("VUN_DAEMON_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("vhost-user-net");
    assert!(
        bin.exists(),
        "{} is missing: build it (cargo test and cargo bench do) or set VUN_DAEMON_BIN",
        bin.display()
    );
    bin
}

/// Where a failing test leaves artifacts (`target/tmp`).
pub fn artifacts_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.ancestors()
        .nth(3)
        .expect("target/<profile>/deps/<test>")
        .join("tmp")
}

/// Whether the kernel has what `--tap-io posted` needs to keep RX reads
/// posted into guest buffers: multishot reads (Linux >= 6.7).
pub fn posted_reads_supported() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 7)
}

/// Whether a daemon started by [`daemon::Daemon`] without its own
/// `--tap-io` keeps RX reads posted: `VUN_TAP_IO=posted` on a kernel that
/// has them.
pub fn posted_reads_expected() -> bool {
    std::env::var("VUN_TAP_IO").is_ok_and(|m| m == "posted") && posted_reads_supported()
}
