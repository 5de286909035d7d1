//! Errors an operator meets when setting the daemon up on a real tap: one
//! line naming the cause and the fix. Need root and /dev/net/tun (taps in
//! a network namespace the test creates): `#[ignore]`d for a plain
//! `cargo test`. The errors that need no root are in `tests/cli.rs`.

use vhost_user_net_harness as common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{unique, Netns, TIMEOUT};

/// Runs the daemon in `ns` under `wrap` (e.g. setpriv) with `args`; it must
/// fail within the harness timeout. Returns the last line of its stderr.
fn fails(ns: &Netns, wrap: &[&str], args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vhost.sock");
    let log = dir.path().join("stderr");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(wrap)
        .arg(env!("CARGO_BIN_EXE_vhost-user-net"))
        .args(["--socket-path", socket.to_str().expect("utf-8")])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run the daemon");
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the daemon started: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{err}");
    // Logging may come first; the error is the last line, and one line.
    err.lines().last().unwrap_or_default().to_owned()
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn existing_tap_without_multi_queue_is_named_with_the_command_that_fixes_it() {
    let ns = Netns::new();
    // vnet_hdr is set by the daemon when it attaches; multi_queue cannot be.
    for flags in [&["vnet_hdr"][..], &[][..]] {
        let tap = unique("vt");
        let mut add = vec!["tuntap", "add", "dev", &tap, "mode", "tap"];
        add.extend_from_slice(flags);
        ns.ip(&add);

        let err = fails(&ns, &[], &["--tap", &tap]);

        assert!(
            err.starts_with("error: cannot open the tap")
                && err.contains(
                    "the existing tap is not multi_queue: recreate it with \
                     `ip link del NAME; ip tuntap add dev NAME mode tap multi_queue vnet_hdr`"
                ),
            "tap made with {flags:?}: {err}"
        );
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn no_cap_net_admin_is_named_as_the_cause() {
    let ns = Netns::new();
    let tap = unique("vt");

    let err = fails(
        &ns,
        &["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"],
        &["--tap", &tap],
    );

    assert!(
        err.contains("needs CAP_NET_ADMIN, or a tap owned by this user"),
        "{err}"
    );
}
