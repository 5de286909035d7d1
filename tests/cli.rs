//! The command line as a user meets it: bad values name the flag, a path
//! that is not a socket is refused and left alone. No root needed.

use std::process::Command;

fn daemon(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-net"))
        .args(args)
        .output()
        .expect("run the daemon");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn zero_queue_pairs_is_refused_naming_the_flag_and_the_range() {
    let (ok, err) = daemon(&[
        "--socket-path",
        "/nonexistent/x",
        "--tap",
        "t0",
        "--queue-pairs",
        "0",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--queue-pairs 0: must be between 1 and 64"),
        "{err}"
    );
}

#[test]
fn queue_size_that_is_not_a_power_of_two_is_refused() {
    let (ok, err) = daemon(&[
        "--socket-path",
        "/nonexistent/x",
        "--tap",
        "t0",
        "--queue-size",
        "300",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--queue-size 300: must be a power of two"),
        "{err}"
    );
}

#[test]
fn malformed_mac_is_refused_with_an_example() {
    let (ok, err) = daemon(&[
        "--socket-path",
        "/nonexistent/x",
        "--tap",
        "t0",
        "--mac",
        "52:54",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--mac 52:54: expected six hex bytes like 52:54:00:12:34:56"),
        "{err}"
    );
}

#[test]
fn unknown_flag_is_reported_by_name() {
    let (ok, err) = daemon(&["--socket-path", "/x", "--tap", "t0", "--queues", "2"]);
    assert!(!ok);
    assert!(err.contains("--queues"), "{err}");
}

#[test]
fn socket_path_that_is_a_regular_file_is_refused_and_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, b"precious").unwrap();

    let (ok, err) = daemon(&["--socket-path", path.to_str().unwrap(), "--tap", "t0"]);

    assert!(!ok);
    assert!(
        err.contains("exists and is not a socket; refusing to replace it"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn print_capabilities_prints_json_and_exits_without_other_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-net"))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"type": "net"}"#
    );
}

#[test]
fn missing_tap_is_reported_by_name() {
    let (ok, err) = daemon(&["--socket-path", "/nonexistent/x"]);
    assert!(!ok);
    assert!(err.contains("--tap"), "{err}");
}

#[test]
fn no_socket_at_all_names_the_flags_and_socket_activation() {
    let (ok, err) = daemon(&["--tap", "t0"]);
    assert!(!ok);
    assert!(
        err.contains(
            "--socket-path or --fd (or a socket from systemd socket activation) is required"
        ),
        "{err}"
    );
}

#[test]
fn socket_directory_that_does_not_exist_is_named_with_the_fix() {
    let (ok, err) = daemon(&["--socket-path", "/nonexistent/vun/x.sock", "--tap", "t0"]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("the directory /nonexistent/vun does not exist (create it, e.g. mkdir -p /nonexistent/vun"),
        "{err}"
    );
}

#[test]
fn user_that_does_not_exist_is_named_with_the_fix() {
    let (ok, err) = daemon(&[
        "--socket-path",
        "/nonexistent/x",
        "--tap",
        "t0",
        "--user",
        "no-such-user-anywhere",
    ]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("--user no-such-user-anywhere: no such user in the system's user database (give an existing name or a number)"),
        "{err}"
    );
}
