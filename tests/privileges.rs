//! Least privilege: private sockets by default, privileges dropped after
//! setup, the syscall filters in force while traffic flows.
//!
//! End to end with the real parts: the daemon process on a real tap in a
//! network namespace, driven by the real vhost-user frontend protocol
//! (`vhost::vhost_user::Frontend`) in QEMU's message order, over memfd-backed
//! guest memory. They need root and /dev/net/tun, so they are `#[ignore]`d
//! for a plain `cargo test`; `bash .ci/test` (as root, what CI runs) runs them.

use vhost_user_net::control::config::default_mac;
use vhost_user_net_harness as common;
use vhost_user_net_harness::frames::{capture_all, has_marker, marker};
use vhost_user_net_harness::{capture, eth_frame, Daemon, Netns, TestFrontend};

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn sockets_are_created_0600_by_default_and_socket_mode_widens_them() {
    use std::os::unix::fs::PermissionsExt;
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let d2 = Daemon::start(&ns, &["--socket-mode", "0660", "--socket-group", "0"]);

    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.socket), 0o600);
    assert_eq!(mode(&d.stats_socket), 0o600);
    assert_eq!(mode(&d2.socket), 0o660);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn daemon_dropped_to_nobody_still_moves_frames_and_serves_a_reconnect() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--user", "nobody"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_owned();
    assert!(
        uid.split_whitespace().skip(1).all(|id| id == "65534"),
        "{uid}"
    );
    let cap = ns.packet_socket();
    let src = default_mac(&d.tap);

    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    fe.send(0, &eth_frame(src, &marker(1)));
    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 1)).is_some());
    drop(fe);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    fe.send(0, &eth_frame(src, &marker(2)));
    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 2)).is_some());
}

/// The `Seccomp:` field (0 none, 2 filter) of each worker thread of `pid`.
fn worker_seccomp_modes(pid: nix::unistd::Pid) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            (comm.trim() == "vring_worker").then(|| {
                let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
                status
                    .lines()
                    .find(|l| l.starts_with("Seccomp:"))
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
                    .unwrap_or_default()
            })
        })
        .collect()
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn workers_run_under_the_seccomp_filter_by_default_and_traffic_flows() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--queue-pairs", "2"]);
    let off = Daemon::start(&ns, &["--seccomp", "off"]);
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 2, 256, 0);
    let mut fe_off = TestFrontend::connect(&off.socket, 1, 256, 0);

    fe.send(0, &eth_frame(default_mac(&d.tap), &marker(1)));
    fe.send(1, &eth_frame(default_mac(&d.tap), &marker(2)));
    fe_off.send(0, &eth_frame(default_mac(&off.tap), &marker(3)));

    assert_eq!(
        capture_all(&cap, &[1, 2, 3]),
        Vec::<u32>::new(),
        "frames never seen"
    );
    assert_eq!(
        worker_seccomp_modes(d.pid()),
        ["2", "2"],
        "both workers filtered"
    );
    assert_eq!(worker_seccomp_modes(off.pid()), ["0"]);
}
