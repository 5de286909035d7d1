//! Thousands of hostile local clients: connections that send random
//! vhost-user messages (random request codes, sizes that lie about the
//! payload, stray file descriptors) and hang up. The daemon must serve a
//! real frontend afterwards, keep its fd count and memory flat, and not
//! flood its log. The daemon runs on a real tap in a network namespace:
//! needs root, `#[ignore]`d for a plain `cargo test`.

mod common;

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use common::{capture, eth_frame, Daemon, Netns, TestFrontend};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vhost_user_net::control::config::default_mac;
use vmm_sys_util::eventfd::EventFd;

/// Connections thrown at the daemon.
const CONNECTIONS: usize = 5000;

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One random vhost-user message: a header whose request code, flags and
/// size are random (the size often lies about the payload that follows).
fn random_message(rng: &mut Rng) -> Vec<u8> {
    let request = u32::try_from(rng.below(64)).expect("small");
    let flags = if rng.below(2) == 0 {
        1 | 0x8
    } else {
        u32::try_from(rng.below(1 << 16)).expect("small")
    };
    let claimed = match rng.below(4) {
        0 => 0,
        1 => u32::try_from(rng.below(64)).expect("small"),
        2 => u32::try_from(rng.below(8192)).expect("small"),
        _ => u32::MAX - u32::try_from(rng.below(16)).expect("small"),
    };
    let actual = usize::try_from(rng.below(80)).expect("small");
    let mut m = Vec::with_capacity(12 + actual);
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&claimed.to_le_bytes());
    m.extend((0..actual).map(|_| u8::try_from(rng.below(256)).expect("byte")));
    m
}

/// Connects, sends one to three random messages (some with eventfds
/// attached), and hangs up.
fn hostile_connection(socket: &std::path::Path, rng: &mut Rng, stray: &EventFd) {
    let Ok(sock) = UnixStream::connect(socket) else {
        return;
    };
    for _ in 0..=rng.below(3) {
        let msg = random_message(rng);
        let iov = [IoSlice::new(&msg)];
        let fds = [stray.as_raw_fd(); 2];
        let n = usize::try_from(rng.below(3)).expect("small");
        let cmsgs = [ControlMessage::ScmRights(&fds[..n])];
        let cmsgs: &[ControlMessage] = if n == 0 { &[] } else { &cmsgs };
        if sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).is_err() {
            break;
        }
    }
}

fn fds_and_rss(pid: nix::unistd::Pid) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    (fds, rss)
}

/// Frames still move through a fresh real frontend.
fn frames_move(ns: &Netns, d: &Daemon, tag: u8) {
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let mut payload = b"vhost-user-net-hostile".to_vec();
    payload.push(tag);
    fe.send(0, &eth_frame(default_mac(&d.tap), &payload));
    assert!(
        capture(&cap, common::TIMEOUT, |f| f
            .windows(payload.len())
            .any(|w| w == payload))
        .is_some(),
        "a real frontend is still served"
    );
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn thousands_of_random_message_connections_neither_flood_the_log_nor_leak() {
    let ns = Netns::new();
    let mut d = Daemon::paths();
    d.log_filter = "info";
    d.spawn(&ns, &[]);
    frames_move(&ns, &d, 0);
    let (fds_before, rss_before) = fds_and_rss(d.pid());
    let lines_before = d.log().lines().count();
    let stray = EventFd::new(0).expect("eventfd");
    let mut rng = Rng(0x5eed_cafe_f00d_beef);

    for _ in 0..CONNECTIONS {
        hostile_connection(&d.socket, &mut rng, &stray);
    }

    frames_move(&ns, &d, 1);
    let (fds_after, rss_after) = fds_and_rss(d.pid());
    let lines = d.log().lines().count() - lines_before;
    if let Ok(path) = std::env::var("VUN_KEEP_LOG") {
        let _ = std::fs::write(path, d.log());
    }
    eprintln!(
        "{CONNECTIONS} hostile connections: {lines} log lines, fds {fds_before} -> {fds_after}, \
         RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        lines < 200,
        "{lines} log lines for {CONNECTIONS} hostile connections:\n{}",
        d.log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        fds_after <= fds_before + 2,
        "fds {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    let s = d.stats();
    assert!(s.get_device("connections_total") > CONNECTIONS as u64);
    assert!(
        s.get_device("connection_errors_total") > 0,
        "connections that ended in a protocol error are counted"
    );
    assert!(
        s.get_device("log_lines_suppressed_total") > 0,
        "what was not logged is counted"
    );
}
