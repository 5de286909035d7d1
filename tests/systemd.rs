//! Under systemd: socket activation (`LISTEN_FDS`, driven here by systemd's
//! own `systemd-socket-activate`) and readiness (`READY=1`, `STOPPING=1`
//! over a `NOTIFY_SOCKET` the test listens on), with the daemon on a real
//! tap in a network namespace and the real vhost-user frontend protocol.
//!
//! Need root, /dev/net/tun and Debian's `systemd` package (installed by
//! `.ci/install-deps.sh`): `#[ignore]`d for a plain `cargo test`.

use vhost_user_net_harness as common;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{capture, eth_frame, unique, Netns, TestFrontend, TIMEOUT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vhost_user_net::control::config::default_mac;

/// A process (and its process group) killed on drop; its stderr kept.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    /// Runs `args` in `ns`, in its own process group, stderr to `log`.
    fn spawn(ns: &Netns, args: &[&str], env: &[(&str, &str)], log: &Path) -> Proc {
        let err = std::fs::File::create(log).expect("log file");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .args(args)
            .process_group(0)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().expect("spawn"),
            log: log.to_owned(),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-self.pid().as_raw()), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log ---\n{}", self.log());
        }
    }
}

fn marker(tag: u8) -> Vec<u8> {
    let mut p = b"vhost-user-net-systemd".to_vec();
    p.push(tag);
    p.resize(64, 0x42);
    p
}

#[test]
#[ignore = "needs root, /dev/net/tun and systemd-socket-activate (CI runs it)"]
fn socket_activated_daemon_serves_a_frontend_that_moves_frames() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vhost.sock");
    let tap = unique("vt");
    // systemd-socket-activate binds the socket, and on the first connection
    // starts the daemon with it as fd 3 (LISTEN_FDS=1, LISTEN_PID). setpriv
    // applies the unit's CapabilityBoundingSet=CAP_NET_ADMIN and
    // NoNewPrivileges=yes (exec keeps the PID systemd announced).
    let activator = Proc::spawn(
        &ns,
        &[
            "systemd-socket-activate",
            "--listen",
            socket.to_str().expect("utf-8"),
            "-E",
            "RUST_LOG",
            "setpriv",
            "--no-new-privs",
            "--bounding-set",
            "-all,+net_admin",
            env!("CARGO_BIN_EXE_vhost-user-net"),
            "--tap",
            &tap,
        ],
        &[],
        &dir.path().join("daemon.log"),
    );
    let cap = ns.packet_socket();

    let mut fe = TestFrontend::connect(&socket, 1, 256, 0);
    let src = default_mac(&tap);
    fe.send(0, &eth_frame(src, &marker(1)));

    let m = marker(1);
    let seen = capture(&cap, TIMEOUT, |f| f.windows(m.len()).any(|w| w == m));
    assert!(seen.is_some(), "the frame never reached the tap");
    fe.wait_used(1, 1);
    // Started without --socket-path or --fd: it took systemd's socket.
    assert!(
        activator
            .log()
            .contains(&format!("listening on {}", socket.display())),
        "{}",
        activator.log()
    );
}

/// Receives one notification datagram, within `TIMEOUT`.
fn notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification before the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn readiness_is_reported_once_the_daemon_can_serve_and_stopping_on_sigterm() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vhost.sock");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
    notify.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let tap = unique("vt");
    let daemon = Proc::spawn(
        &ns,
        &[
            env!("CARGO_BIN_EXE_vhost-user-net"),
            "--socket-path",
            socket.to_str().expect("utf-8"),
            "--tap",
            &tap,
        ],
        &[("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8"))],
        &dir.path().join("daemon.log"),
    );

    let ready = notification(&notify);

    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.contains(&format!("STATUS=serving tap {tap}")),
        "{ready:?}"
    );
    // Ready means ready: the socket accepts, the stats socket answers, the
    // tap exists.
    let mut fe = TestFrontend::connect(&socket, 1, 256, 0);
    fe.post_rx(0, 4, 2048);
    let stats = socket.with_extension("sock.stats");
    assert!(UnixStream::connect(&stats).is_ok(), "stats socket not up");
    drop(fe);

    kill(daemon.pid(), Signal::SIGTERM).expect("SIGTERM");
    let stopping = notification(&notify);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    // Nothing is reported by a daemon that cannot serve: one whose socket
    // directory does not exist fails its setup and never says READY.
    drop(daemon);
    let missing = dir.path().join("no-such-dir").join("vhost.sock");
    let failing = Proc::spawn(
        &ns,
        &[
            env!("CARGO_BIN_EXE_vhost-user-net"),
            "--socket-path",
            missing.to_str().expect("utf-8"),
            "--tap",
            &tap,
        ],
        &[("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8"))],
        &dir.path().join("failing.log"),
    );
    notify
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    assert!(
        notify.recv(&mut buf).is_err(),
        "a daemon that cannot serve said READY"
    );
    drop(failing);
}

#[test]
#[ignore = "needs systemd-analyze (Debian's systemd package; CI runs it)"]
fn shipped_unit_files_verify_without_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    // Instances of the templates, with ExecStart pointing at this build.
    for (template, instance) in [
        ("vhost-user-net@.service", "vhost-user-net@tap0.service"),
        ("vhost-user-net@.socket", "vhost-user-net@tap0.socket"),
    ] {
        let text = std::fs::read_to_string(contrib.join(template)).expect("unit file");
        let text = text.replace(
            "/usr/local/bin/vhost-user-net",
            env!("CARGO_BIN_EXE_vhost-user-net"),
        );
        std::fs::write(dir.path().join(instance), text).expect("write unit");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(["vhost-user-net@tap0.service", "vhost-user-net@tap0.socket"])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
