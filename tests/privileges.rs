//! Least privilege: private sockets by default, privileges dropped after
//! setup (only the capabilities still needed, `no_new_privs`), a syscall
//! filter on every thread while traffic flows.
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

/// Each thread of `pid` by name (the main thread, whose name is the
/// program's, as "main"), with the `Seccomp:` (0 none, 2 filter) and
/// `Seccomp_filters:` (how many are stacked) fields of its status.
fn thread_sandboxes(pid: nix::unistd::Pid) -> Vec<(String, String, String)> {
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let mut threads: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let name = if dir.ends_with(pid.to_string()) {
                "main".to_owned()
            } else {
                comm.trim().to_owned()
            };
            Some((
                name,
                field(&status, "Seccomp:"),
                field(&status, "Seccomp_filters:"),
            ))
        })
        .collect();
    threads.sort();
    threads
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn every_thread_runs_under_its_own_seccomp_filter_by_default_while_traffic_flows() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("unix:{}", dir.path().join("metrics").display());
    let d = Daemon::start(&ns, &["--queue-pairs", "2", "--prometheus", &metrics]);
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
    // One filter each; the threads `frontends` starts (the relay, the
    // crate's request thread and workers) have its filter and their own.
    let own = |name: &str| (name.to_owned(), "2".to_owned(), "1".to_owned());
    let below_frontends = |name: &str| (name.to_owned(), "2".to_owned(), "2".to_owned());
    assert_eq!(
        thread_sandboxes(d.pid()),
        vec![
            own("frontends"),
            own("main"),
            own("prometheus"),
            below_frontends("relay-replies"),
            below_frontends("relay-requests"),
            own("signals"),
            own("stats"),
            own("tap-watch"),
            below_frontends("vhost-user-net"),
            below_frontends("vring_worker"),
            below_frontends("vring_worker"),
        ]
    );
    assert!(
        thread_sandboxes(off.pid())
            .iter()
            .all(|(_, mode, _)| mode == "0"),
        "--seccomp off: no filter anywhere"
    );
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn the_request_thread_is_filtered_before_the_frontend_sends_anything() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    // A frontend that connects and stays silent.
    let _silent = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let request_thread = || {
        thread_sandboxes(d.pid())
            .into_iter()
            .find(|(name, _, _)| name == "vhost-user-net")
    };
    let (_, mode, filters) = common::wait_for("the request thread", request_thread);
    assert_eq!((mode.as_str(), filters.as_str()), ("2", "2"));
}

/// The capability sets and `NoNewPrivs` of every thread of `pid`.
fn thread_privileges(pid: nix::unistd::Pid) -> Vec<Vec<String>> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.ok()?.path().join("status")).ok()?;
            Some(
                status
                    .lines()
                    .filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs"))
                    .map(str::to_owned)
                    .collect(),
            )
        })
        .collect()
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn started_as_root_every_thread_keeps_only_cap_net_admin_and_no_new_privs() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    // Without filters too (installing one sets no_new_privs by itself).
    let off = Daemon::start(&ns, &["--seccomp", "off"]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let mut fe_off = TestFrontend::connect(&off.socket, 1, 256, 0);
    let cap = ns.packet_socket();
    fe.send(0, &eth_frame(default_mac(&d.tap), &marker(7)));
    fe_off.send(0, &eth_frame(default_mac(&off.tap), &marker(8)));
    assert_eq!(
        capture_all(&cap, &[7, 8]),
        Vec::<u32>::new(),
        "traffic flows"
    );

    let net_admin = format!("{:016x}", 1u64 << 12);
    let expected = vec![
        "CapInh:\t0000000000000000".to_owned(),
        format!("CapPrm:\t{net_admin}"),
        format!("CapEff:\t{net_admin}"),
        format!("CapBnd:\t{net_admin}"),
        "CapAmb:\t0000000000000000".to_owned(),
        "NoNewPrivs:\t1".to_owned(),
    ];
    for pid in [d.pid(), off.pid()] {
        let threads = thread_privileges(pid);
        assert!(threads.len() >= 8, "{threads:?}");
        for t in threads {
            assert_eq!(t, expected);
        }
    }
}

/// Why a daemon with `--client` also keeps CAP_DAC_OVERRIDE: it connects
/// again at every reconnect, after its capabilities were reduced, and a
/// frontend running as another user (QEMU under libvirt) makes a socket
/// only that user may write to.
#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn client_mode_reaches_a_frontend_socket_owned_by_another_user() {
    use std::os::unix::fs::PermissionsExt;
    let ns = Netns::new();
    let mut d = Daemon::paths();
    let listener = std::os::unix::net::UnixListener::bind(&d.socket).expect("bind");
    std::os::unix::fs::chown(&d.socket, Some(65534), Some(65534)).expect("chown");
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d.mode = common::Mode::Client;
    d.spawn(&ns, &[]);
    let cap = ns.packet_socket();

    let mut fe = TestFrontend::over(common::accept(&listener), 1, 256, 0);
    fe.send(0, &eth_frame(default_mac(&d.tap), &marker(1)));

    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 1)).is_some());
}
