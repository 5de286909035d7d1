//! End to end with the real parts: the daemon process on a real tap in a
//! network namespace, driven by the real vhost-user frontend protocol
//! (`vhost::vhost_user::Frontend`) in QEMU's message order, over memfd-backed
//! guest memory.
//!
//! These tests need root and /dev/net/tun, so they are `#[ignore]`d for a
//! plain `cargo test`; `cargo test -- --include-ignored` (as root, what CI
//! runs) runs them.

mod common;

use std::time::Duration;

use common::{capture, eth_frame, Daemon, Netns, TestFrontend};
use vhost_user_net::control::config::default_mac;
use vhost_user_net::testing::driver::{Buf, Desc, Used};
use vm_memory::{Bytes, GuestAddress};

const MRG_RXBUF: u64 = 1 << 15;

/// Payload marker so frames are told apart from anything else on the wire.
fn marker(tag: u32) -> Vec<u8> {
    let mut p = b"vhost-user-net-test".to_vec();
    p.extend_from_slice(&tag.to_be_bytes());
    p.resize(64, 0x42);
    p
}

fn has_marker(frame: &[u8], tag: u32) -> bool {
    let m = marker(tag);
    frame.windows(m.len()).any(|w| w == m.as_slice())
}

/// Waits until frames with all `tags` were seen, in any order (frames sent
/// on different queue pairs can overtake each other). Returns the missing.
fn capture_all(cap: &std::os::fd::OwnedFd, tags: &[u32]) -> Vec<u32> {
    let mut missing: Vec<u32> = tags.to_vec();
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if let Some(f) = capture(cap, left, |f| missing.iter().any(|t| has_marker(f, *t))) {
            missing.retain(|t| !has_marker(&f, *t));
        }
    }
    missing
}

/// Lets UDP from the namespace reach the "guest" (see `route_to_guest`).
fn address_tap(ns: &Netns, d: &Daemon) {
    ns.route_to_guest(&d.tap, default_mac(&d.tap));
}

/// Sends UDP datagrams carrying `marker(tag)` from the namespace to the guest.
fn send_udp_to_guest(ns: &Netns, tags: &[(u16, u32)]) {
    let sock = ns.udp_socket();
    for &(port, tag) in tags {
        sock.send_to(&marker(tag), ("198.18.0.2", port))
            .expect("udp send");
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn handshake_in_qemu_order_then_tx_frames_appear_on_the_tap() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);

    let src = default_mac(&d.tap);
    for tag in 0..3 {
        fe.send(0, &eth_frame(src, &marker(tag)));
    }

    assert_eq!(
        capture_all(&cap, &[0, 1, 2]),
        Vec::<u32>::new(),
        "frames never reached the tap"
    );
    let used = fe.wait_used(1, 3);
    assert!(
        used.iter().all(|u| u.len == 0),
        "TX completions carry length 0"
    );
    let stats = d.stats();
    assert_eq!(stats.get("frames_total", 1), 3);
    assert_eq!(stats.get("bytes_total", 1), 3 * 78);
    assert!(stats.get("kicks_total", 1) >= 1);
    assert_eq!(stats.get("bad_chains_total", 1), 0);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn frames_sent_in_the_namespace_arrive_in_rx_buffers_with_length_and_header() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    fe.post_rx(0, 64, 4096);

    send_udp_to_guest(&ns, &[(9000, 7)]);

    let used = common::wait_for("the frame in an RX buffer", || {
        fe.used(0)
            .into_iter()
            .find(|u| has_marker(&fe.rx_buffer(0, *u), 7))
    });
    let buf = fe.rx_buffer(0, used);
    // 12-byte header, 14 Ethernet, 20 IPv4, 8 UDP, 64 payload.
    assert_eq!(used.len, 12 + 14 + 20 + 8 + 64);
    assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
    assert_eq!(&buf[12..18], &default_mac(&d.tap), "to the guest's MAC");
    assert_eq!(&buf[24..26], &[0x08, 0x00], "IPv4");
    let stats = d.stats();
    assert!(stats.get("frames_total", 0) >= 1);
    assert!(
        fe.vqs[0].take_interrupts() >= 1,
        "the guest was interrupted"
    );
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn without_mergeable_buffers_each_frame_takes_one_buffer() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, MRG_RXBUF);
    // Linux posts MTU-sized buffers when it has no receive offloads; with
    // them acked (as here) it posts 64 KiB ones. Use big buffers.
    fe.post_rx(0, 8, 65562);

    send_udp_to_guest(&ns, &[(9000, 1), (9000, 2)]);

    let used = fe.wait_used(0, 2);
    for (u, tag) in used.iter().zip([1, 2]) {
        let buf = fe.rx_buffer(0, *u);
        assert!(has_marker(&buf, tag));
        assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1);
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn two_queue_pairs_carry_traffic_independently() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--queue-pairs", "2"]);
    address_tap(&ns, &d);
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 2, 256, 0);
    fe.post_rx(0, 128, 4096);
    fe.post_rx(1, 128, 4096);

    let src = default_mac(&d.tap);
    fe.send(0, &eth_frame(src, &marker(100)));
    fe.send(1, &eth_frame(src, &marker(101)));
    assert_eq!(
        capture_all(&cap, &[100, 101]),
        Vec::<u32>::new(),
        "frames never seen"
    );
    // 64 flows: the tap spreads them over its queues by flow hash.
    let flows: Vec<(u16, u32)> = (0..64).map(|i| (9000 + i, 200 + u32::from(i))).collect();
    send_udp_to_guest(&ns, &flows);

    let stats = common::wait_for("RX frames on both pairs", || {
        let s = d.stats();
        let (rx0, rx1) = (s.get("frames_total", 0), s.get("frames_total", 2));
        (rx0 + rx1 >= 64).then_some(s)
    });
    assert_eq!(stats.get("frames_total", 1), 1, "TX pair 0");
    assert_eq!(stats.get("frames_total", 3), 1, "TX pair 1");
    assert!(stats.get("frames_total", 0) > 0, "RX pair 0 got some flows");
    assert!(stats.get("frames_total", 2) > 0, "RX pair 1 got some flows");
    let rx_used = fe.used(0).len() + fe.used(2).len();
    assert_eq!(
        rx_used as u64,
        stats.get("frames_total", 0) + stats.get("frames_total", 2)
    );
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn a_second_frontend_is_served_after_the_first_disconnects() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let cap = ns.packet_socket();
    let src = default_mac(&d.tap);
    let mut first = TestFrontend::connect(&d.socket, 1, 256, 0);
    first.send(0, &eth_frame(src, &marker(1)));
    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 1)).is_some());
    drop(first);

    let mut second = TestFrontend::connect(&d.socket, 1, 256, 0);
    second.send(0, &eth_frame(src, &marker(2)));

    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 2)).is_some());
    assert_eq!(
        d.stats().get("frames_total", 1),
        2,
        "counters survive reconnects"
    );
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn hostile_chain_is_completed_with_length_zero_while_good_traffic_continues() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let src = default_mac(&d.tap);

    // A TX chain pointing outside guest memory, then a writable one, then
    // a good frame.
    let mem = fe.mem.clone();
    let vq = &mut fe.vqs[1];
    let outside = Buf {
        addr: GuestAddress(0x4000_0000_0000),
        len: 100,
        device_writes: false,
    };
    let h1 = vq.ring.add_chain(&mem, &[outside]).expect("descriptor");
    vq.ring.push_avail(&mem, h1);
    let wrong_way = Buf {
        addr: GuestAddress(common::GUEST_BASE + (8 << 20)),
        len: 100,
        device_writes: true,
    };
    let h2 = vq.ring.add_chain(&mem, &[wrong_way]).expect("descriptor");
    vq.ring.push_avail(&mem, h2);
    fe.queue_tx(0, &eth_frame(src, &marker(9)));
    fe.publish_and_kick(1);

    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 9)).is_some());
    let used = fe.wait_used(1, 3);
    assert_eq!(used[0], Used { head: h1, len: 0 });
    assert_eq!(used[1], Used { head: h2, len: 0 });
    let stats = d.stats();
    assert_eq!(stats.get("bad_chains_total", 1), 2);
    assert_eq!(stats.get("frames_total", 1), 1);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn bogus_avail_index_stops_the_queue_not_the_daemon() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--queue-pairs", "2"]);
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 2, 256, 0);
    let src = default_mac(&d.tap);

    let mem = fe.mem.clone();
    fe.vqs[1].ring.force_avail_idx(&mem, 1000);
    fe.vqs[1].kick.write(1).expect("kick");
    common::wait_for("the bad index to be counted", || {
        (d.stats().get("bad_avail_index_total", 1) == 1).then_some(())
    });
    fe.send(1, &eth_frame(src, &marker(5)));

    assert!(
        capture(&cap, common::TIMEOUT, |f| has_marker(f, 5)).is_some(),
        "pair 1 still moves"
    );
    assert!(d.log().contains("queue 1 stopped"));
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn descriptor_loop_in_rx_chain_is_returned_and_counted() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let mem = fe.mem.clone();
    let vq = &mut fe.vqs[0];
    let addr = common::GUEST_BASE + (16 << 20);
    for (i, next) in [(250u16, 251u16), (251, 250)] {
        let desc = Desc {
            addr,
            len: 4096,
            flags: vhost_user_net::testing::driver::DESC_F_NEXT
                | vhost_user_net::testing::driver::DESC_F_WRITE,
            next,
        };
        vq.ring.write_desc(&mem, i, desc);
    }
    vq.ring.push_avail(&mem, 250);
    fe.publish_and_kick(0);
    fe.post_rx(0, 64, 4096);

    send_udp_to_guest(&ns, &[(9000, 3)]);

    let used = fe.wait_used(0, 2);
    assert_eq!(used[0], Used { head: 250, len: 0 });
    assert!(has_marker(&fe.rx_buffer(0, used[1]), 3));
    assert_eq!(d.stats().get("bad_chains_total", 0), 1);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn sigterm_exits_cleanly_prints_counters_and_removes_the_socket() {
    let ns = Netns::new();
    let mut d = Daemon::start(&ns, &[]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    for tag in 0..3 {
        fe.send(0, &eth_frame(default_mac(&d.tap), &marker(tag)));
    }
    fe.wait_used(1, 3);

    let (status, log) = d.stop();

    assert!(status.success(), "exit status {status}: {log}");
    // The exit report is the `stats` table: its columns, and queue 1's row
    // with the 3 frames sent.
    let rows: Vec<String> = log
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let has_row = |start: &str| rows.iter().any(|r| r.starts_with(start));
    assert!(
        has_row("queue dir frames bytes kicks irqs suppressed deferred "),
        "{log}"
    );
    assert!(has_row("1 tx 3 "), "{log}");
    assert!(!d.socket.exists());
    assert!(!d.stats_socket.exists());
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn rx_stops_listening_when_guest_has_no_buffers_and_resumes_on_refill() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, MRG_RXBUF);
    fe.post_rx(0, 1, 65562);
    send_udp_to_guest(&ns, &[(9000, 1), (9000, 2)]);
    let first = fe.wait_used(0, 1);
    assert!(has_marker(&fe.rx_buffer(0, first[0]), 1));
    std::thread::sleep(Duration::from_millis(200));
    assert!(fe.used(0).is_empty(), "no buffer, no delivery");

    fe.post_rx(0, 1, 65562);

    let second = fe.wait_used(0, 1);
    assert!(
        has_marker(&fe.rx_buffer(0, second[0]), 2),
        "frame waited in the tap"
    );
    let _ = mem_check(&fe);
}

/// The RX ring's memory is still readable (keeps `fe` alive to the end).
fn mem_check(fe: &TestFrontend) -> u8 {
    fe.mem
        .read_obj(GuestAddress(common::GUEST_BASE))
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn kicks_and_interrupts_follow_the_event_index() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let src = default_mac(&d.tap);

    // 64 frames published at once with one kick; used_event (0) asks for an
    // interrupt as soon as the first is used.
    for tag in 0..64 {
        fe.queue_tx(0, &eth_frame(src, &marker(tag)));
    }
    assert!(fe.publish_and_kick(1), "the first publish needs a kick");
    fe.wait_used(1, 64);
    common::wait_for("the interrupt", || {
        (fe.vqs[1].take_interrupts() == 1).then_some(())
    });
    let s = d.stats();
    assert_eq!(s.get("frames_total", 1), 64);
    assert_eq!(s.get("kicks_total", 1), 1);
    assert_eq!(s.get("interrupts_sent_total", 1), 1);

    // The guest now asks for no interrupt before entry 1000: ten more
    // frames complete silently, and need one kick (the ring was empty).
    let mem = fe.mem.clone();
    fe.vqs[1].ring.set_used_event(&mem, 1000);
    for tag in 64..74 {
        fe.queue_tx(0, &eth_frame(src, &marker(tag)));
    }
    assert!(fe.publish_and_kick(1));
    fe.wait_used(1, 10);
    let s = common::wait_for("the second batch to be counted", || {
        let s = d.stats();
        (s.get("frames_total", 1) == 74).then_some(s)
    });
    assert_eq!(s.get("kicks_total", 1), 2);
    assert_eq!(
        s.get("interrupts_sent_total", 1),
        1,
        "no interrupt the guest did not ask for"
    );
    assert!(s.get("interrupts_suppressed_total", 1) >= 1);
    assert_eq!(fe.vqs[1].take_interrupts(), 0);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn tap_link_down_drops_tx_frames_counted_and_traffic_resumes_when_up() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let src = default_mac(&d.tap);
    ns.ip(&["link", "set", &d.tap, "down"]);

    fe.send(0, &eth_frame(src, &marker(1)));
    fe.send(0, &eth_frame(src, &marker(2)));

    let used = fe.wait_used(1, 2);
    assert!(
        used.iter().all(|u| u.len == 0),
        "chains are returned, not held"
    );
    let s = d.stats();
    assert_eq!(s.get("tap_errors_total", 1), 2);
    assert_eq!(s.get("frames_total", 1), 0);

    ns.ip(&["link", "set", &d.tap, "up"]);
    fe.send(0, &eth_frame(src, &marker(3)));
    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 3)).is_some());
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn client_mode_connects_to_the_frontend_and_reconnects_when_it_returns() {
    let ns = Netns::new();
    let mut d = Daemon::paths();
    let listener = std::os::unix::net::UnixListener::bind(&d.socket).expect("bind");
    d.mode = common::Mode::Client;
    d.spawn(&ns, &[]);
    let cap = ns.packet_socket();
    let src = default_mac(&d.tap);

    let mut first = TestFrontend::over(common::accept(&listener), 1, 256, 0);
    first.send(0, &eth_frame(src, &marker(1)));
    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 1)).is_some());
    drop(first);
    let mut second = TestFrontend::over(common::accept(&listener), 1, 256, 0);
    second.send(0, &eth_frame(src, &marker(2)));

    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 2)).is_some());
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn inherited_listening_fd_is_served() {
    use std::os::fd::AsRawFd;
    let ns = Netns::new();
    let mut d = Daemon::paths();
    let listener = std::os::unix::net::UnixListener::bind(&d.socket).expect("bind");
    // Let the child inherit the socket at the same number.
    nix::fcntl::fcntl(
        listener.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .expect("clear close-on-exec");
    d.mode = common::Mode::Fd(listener.as_raw_fd());
    d.spawn(&ns, &[]);
    let cap = ns.packet_socket();

    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    fe.send(0, &eth_frame(default_mac(&d.tap), &marker(4)));

    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 4)).is_some());
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn flows_avoid_a_queue_pair_the_guest_disabled() {
    use vhost::vhost_user::VhostUserFrontend;
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--queue-pairs", "2"]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect(&d.socket, 2, 256, 0);
    // The guest uses one pair: QEMU disables the other pair's rings.
    fe.fe.set_vring_enable(2, false).expect("disable RX 1");
    fe.fe.set_vring_enable(3, false).expect("disable TX 1");
    // A round trip: the relay handles messages in order, so once this is
    // answered the disables have been seen.
    vhost::VhostBackend::get_features(&fe.fe).expect("GET_FEATURES");
    fe.post_rx(0, 128, 4096);

    let flows: Vec<(u16, u32)> = (0..64).map(|i| (9000 + i, 300 + u32::from(i))).collect();
    send_udp_to_guest(&ns, &flows);

    let used = fe.wait_used(0, 64);
    assert_eq!(used.len(), 64, "every flow reached the pair in use");
    assert_eq!(d.stats().get("frames_total", 2), 0);
    assert!(d.log().contains("pair 1: tap queue detached"));
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn held_interrupt_arrives_when_the_coalescing_timer_fires() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--tx-coalesce", "frames=32,usecs=2000"]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let src = default_mac(&d.tap);

    for tag in 0..5 {
        fe.queue_tx(0, &eth_frame(src, &marker(tag)));
    }
    fe.publish_and_kick(1);
    fe.wait_used(1, 5);

    common::wait_for("the held interrupt", || {
        (fe.vqs[1].take_interrupts() == 1).then_some(())
    });
    let s = d.stats();
    assert_eq!(s.get("interrupts_deferred_total", 1), 1);
    assert_eq!(s.get("interrupts_sent_total", 1), 1);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn stats_command_prints_per_queue_counters_policies_and_rates() {
    let ns = Netns::new();
    let d = Daemon::start(
        &ns,
        &[
            "--rx-coalesce",
            "adaptive",
            "--tx-coalesce",
            "frames=32,usecs=1000",
        ],
    );
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    for tag in 0..10 {
        fe.send(0, &eth_frame(default_mac(&d.tap), &marker(tag)));
    }
    fe.wait_used(1, 10);
    let bin = env!("CARGO_BIN_EXE_vhost-user-net");
    let stats = d.stats_socket.to_str().unwrap();

    let out = std::process::Command::new(bin)
        .args(["stats", "--stats-socket", stats])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tx = text
        .lines()
        .find(|l| l.starts_with("1 "))
        .expect("queue 1 row");
    assert!(
        tx.contains(" tx ") && tx.contains(" 10 ") && tx.ends_with("frames=32,usecs=1000"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("0 ") && l.ends_with("adaptive,usecs=250")),
        "{text}"
    );

    let mut watch = std::process::Command::new(bin)
        .args(["stats", "--stats-socket", stats, "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("frames/s"));
}

/// GET over `conn` and returns the response.
fn http_get(mut conn: impl std::io::Read + std::io::Write) -> String {
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).unwrap();
    resp
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn prometheus_endpoint_serves_http_on_loopback_and_on_a_unix_socket() {
    let ns = Netns::new();
    ns.ip(&["link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("prom.sock");
    let d = Daemon::start(&ns, &["--prometheus", "127.0.0.1:9717"]);
    let d2 = Daemon::start(&ns, &["--prometheus", &format!("unix:{}", unix.display())]);

    let tcp = ns.within(|| http_get(std::net::TcpStream::connect("127.0.0.1:9717").unwrap()));
    let via_unix = http_get(std::os::unix::net::UnixStream::connect(&unix).unwrap());

    for resp in [&tcp, &via_unix] {
        assert!(resp.starts_with("HTTP/1.0 200 OK\r\n"), "{resp}");
        assert!(resp.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(resp.contains("# TYPE vhost_user_net_frames_total counter"));
        assert!(resp.contains(
            "vhost_user_net_coalesce_policy_info{queue=\"0\",dir=\"rx\",policy=\"immediate\"} 1"
        ));
    }
    drop((d, d2));
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn synthetic_guest_through_a_reflector_keeps_the_counters_consistent() {
    use common::synthetic::{frame, Guest, Result_, RING, SINK_MAC};
    let ns = Netns::new();
    let d = Daemon::start(
        &ns,
        &[
            "--rx-coalesce",
            "adaptive",
            "--tx-coalesce",
            "frames=32,usecs=500",
        ],
    );
    let exec = |args: &[&str]| {
        let mut all = vec!["netns", "exec", &ns.name];
        all.extend_from_slice(args);
        common::run("ip", &all);
    };
    exec(&["tc", "qdisc", "add", "dev", &d.tap, "ingress"]);
    exec(&[
        "tc", "filter", "add", "dev", &d.tap, "parent", "ffff:", "protocol", "all", "prio", "1",
        "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", &d.tap,
    ]);
    let mut g = Guest::new(TestFrontend::connect(&d.socket, 1, RING, 0));
    g.refill(usize::from(RING));
    let f = frame(64, SINK_MAC);
    let (mut sent, mut tx, mut rx) = (0u64, Result_::default(), Result_::default());

    // Half a second of saturating traffic, then let everything drain.
    let end = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < end {
        g.reclaim(Some(&mut tx), f.len());
        sent += g.send(32, &f, 128).0 as u64;
        g.napi_poll(64, &mut rx, common::synthetic::TS_AT);
    }
    common::wait_for("every frame to come back", || {
        g.reclaim(Some(&mut tx), f.len());
        g.napi_poll(64, &mut rx, common::synthetic::TS_AT);
        (g.inflight() == 0 && rx.frames == sent).then_some(())
    });

    let s = d.stats();
    assert!(sent > 1000, "only {sent} frames in half a second");
    assert_eq!(
        s.get("frames_total", 1),
        sent,
        "TX frames written = frames sent"
    );
    assert_eq!(tx.frames, sent, "every TX frame completed");
    assert_eq!(
        s.get("frames_total", 0),
        rx.frames,
        "RX frames delivered = received"
    );
    for q in 0..2 {
        assert_eq!(s.get("kicks_total", q), g.kicks[q], "kicks on queue {q}");
        assert!(
            s.get("interrupts_sent_total", q) <= s.get("batches_total", q),
            "at most one interrupt per batch on queue {q}"
        );
    }
}

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

/// `(open fds, RSS in KiB)` of process `pid`.
fn fds_and_rss(pid: nix::unistd::Pid) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    (fds, rss)
}

#[test]
#[ignore = "long: 100 connection cycles; needs root and /dev/net/tun (CI runs it)"]
fn soak_100_connect_traffic_disconnect_cycles_leak_no_fds_or_memory() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--queue-pairs", "2"]);
    let src = default_mac(&d.tap);
    let cycle = |n: u32| {
        let mut fe = TestFrontend::connect(&d.socket, 2, 256, 0);
        for tag in 0..10 {
            fe.send((tag % 2) as usize, &eth_frame(src, &marker(n * 100 + tag)));
        }
        fe.wait_used(1, 5);
        fe.wait_used(3, 5);
    };
    // Warm up (thread stacks, allocator arenas), then take the baseline
    // once the daemon has torn the last connection down.
    for n in 0..5 {
        cycle(n);
    }
    let settled = |expect_fds: Option<usize>| {
        common::wait_for("the daemon to release the connection", || {
            let (fds, rss) = fds_and_rss(d.pid());
            let idle = d.log().matches("waiting for the next one").count();
            (expect_fds.is_none_or(|e| fds <= e) && idle >= 1).then_some((fds, rss))
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let (fds0, rss0) = settled(None);

    for n in 5..105 {
        cycle(n);
    }

    let (fds1, rss1) = settled(Some(fds0));
    let s = d.stats();
    eprintln!("after 100 cycles: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB");
    assert_eq!(fds1, fds0, "open fds grew");
    assert!(rss1 <= rss0 + 2048, "RSS grew from {rss0} to {rss1} KiB");
    assert_eq!(
        s.get("frames_total", 1) + s.get("frames_total", 3),
        105 * 10
    );
    assert_eq!(
        s.get("bad_chains_total", 1) + s.get("bad_chains_total", 3),
        0
    );
    assert_eq!(d.log().matches("frontend connected").count(), 105);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn frontend_that_disconnects_mid_message_or_sends_unknown_requests_does_not_stop_the_daemon() {
    use std::io::Write;
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let cap = ns.packet_socket();

    // Half a header, then gone.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
    drop(s);
    // A request code the protocol does not have.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let mut msg = 999u32.to_le_bytes().to_vec();
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    s.write_all(&msg).unwrap();
    s.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut s, &mut buf).unwrap_or(0),
        0,
        "the daemon closes it"
    );
    drop(s);
    // A 5 MiB payload claim.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    let mut msg = 1u32.to_le_bytes().to_vec();
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&(5u32 << 20).to_le_bytes());
    s.write_all(&msg).unwrap();
    drop(s);

    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    fe.send(0, &eth_frame(default_mac(&d.tap), &marker(7)));
    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 7)).is_some());
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn guest_memory_removed_and_added_back_under_traffic_then_rings_set_up_again() {
    use vhost::vhost_user::VhostUserFrontend;
    use vm_memory::GuestMemoryBackend;
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let cap = ns.packet_socket();
    let src = default_mac(&d.tap);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let region = fe
        .mem
        .find_region(vm_memory::GuestAddress(common::GUEST_BASE))
        .unwrap();
    let info = vhost::VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();

    // A burst in flight while the memory goes away and comes back.
    for tag in 0..64 {
        fe.queue_tx(0, &eth_frame(src, &marker(tag)));
    }
    fe.publish_and_kick(1);
    fe.fe.remove_mem_region(&info).expect("REM_MEM_REG");
    fe.fe.add_mem_region(&info).expect("ADD_MEM_REG");
    // Whatever the daemon made of the burst, it answers the next request,
    // and a frontend that sets its rings up again gets traffic through.
    vhost::VhostBackend::get_features(&fe.fe).expect("daemon still answers");
    std::thread::sleep(Duration::from_millis(100));
    let done = fe.used(1).len();
    for q in 0..2 {
        fe.restart_vring(q);
    }
    fe.send(0, &eth_frame(src, &marker(999)));

    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 999)).is_some());
    eprintln!("{done} of 64 burst frames completed across the swap");
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

/// CPU time (user + system, clock ticks) the process has used.
fn cpu_ticks(pid: nix::unistd::Pid) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn tap_deleted_under_traffic_drops_frames_without_spinning_and_recovers_when_recreated() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    fe.post_rx(0, 64, 4096);
    let src = default_mac(&d.tap);
    send_udp_to_guest(&ns, &[(9000, 1)]);
    fe.wait_used(0, 1);

    ns.ip(&["link", "del", &d.tap]);
    for tag in 10..20 {
        fe.send(0, &eth_frame(src, &marker(tag)));
    }
    let used = fe.wait_used(1, 10);
    assert!(
        used.iter().all(|u| u.len == 0),
        "frames dropped, chains returned"
    );
    common::wait_for("the tap to be declared gone", || {
        d.log().contains("tap interface is gone").then_some(())
    });
    let before = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(d.pid()) - before;
    assert!(
        spent < 20,
        "the daemon used {spent} ticks in 1 s with the tap gone: spinning?"
    );
    assert_eq!(
        d.log().matches("tap interface is gone").count(),
        1,
        "logged once"
    );
    assert!(d.stats().get("tap_errors_total", 1) >= 10);

    ns.add_tap(&d.tap);
    address_tap(&ns, &d);
    let back = format!("tap {} is back", d.tap);
    common::wait_for("the tap to be re-attached", || {
        d.log().contains(&back).then_some(())
    });
    let cap = ns.packet_socket();
    fe.send(0, &eth_frame(src, &marker(30)));
    assert!(
        capture(&cap, common::TIMEOUT, |f| has_marker(f, 30)).is_some(),
        "TX resumed"
    );
    send_udp_to_guest(&ns, &[(9000, 31)]);
    let rx = common::wait_for("RX to resume", || {
        fe.used(0)
            .into_iter()
            .find(|u| has_marker(&fe.rx_buffer(0, *u), 31))
    });
    assert!(rx.len > 0);
}

/// Why the daemon keeps CAP_NET_ADMIN: a tap re-created by its
/// administrator for another user (`ip tuntap add ... user U`) can only be
/// re-attached (`TUNSETIFF`) by that user or with the capability. (A tap
/// without an owner needs none; the test above re-creates such a tap.)
#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn tap_re_created_for_another_user_is_re_attached_with_the_one_capability_kept() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let src = default_mac(&d.tap);
    fe.send(0, &eth_frame(src, &marker(1)));
    fe.wait_used(1, 1);

    ns.ip(&["link", "del", &d.tap]);
    fe.send(0, &eth_frame(src, &marker(2)));
    common::wait_for("the tap to be declared gone", || {
        d.log().contains("tap interface is gone").then_some(())
    });
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        &d.tap,
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
        "user",
        "65534",
        "group",
        "65534",
    ]);
    ns.ip(&["link", "set", &d.tap, "up"]);
    let back = format!("tap {} is back", d.tap);
    common::wait_for("the tap to be re-attached", || {
        d.log().contains(&back).then_some(())
    });
    let cap = ns.packet_socket();
    fe.send(0, &eth_frame(src, &marker(3)));
    assert!(
        capture(&cap, common::TIMEOUT, |f| has_marker(f, 3)).is_some(),
        "TX resumed"
    );
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

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn every_kind_of_broken_chain_is_returned_and_counted_while_the_other_pair_moves() {
    use vhost_user_net::testing::driver::{DESC_F_INDIRECT, DESC_F_NEXT};
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--queue-pairs", "2"]);
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 2, 256, 0);
    let src = default_mac(&d.tap);
    let mem = fe.mem.clone();
    let end = common::GUEST_BASE + common::GUEST_SIZE as u64;
    let buf = common::GUEST_BASE + (120 << 20);
    let table = buf + 0x1_0000;
    // The inner table of the nested case: one indirect descriptor.
    mem.write_slice(
        &[table.to_le_bytes(), [16, 0, 0, 0, 4, 0, 0, 0]].concat(),
        GuestAddress(table),
    )
    .unwrap();
    let hostile = [
        Desc {
            addr: end - 20,
            len: 100,
            flags: 0,
            next: 0,
        }, // straddles the end
        Desc {
            addr: buf,
            len: 0,
            flags: 0,
            next: 0,
        }, // zero length
        Desc {
            addr: buf,
            len: 200_000,
            flags: 0,
            next: 0,
        }, // longer than any frame
        Desc {
            addr: table,
            len: 16,
            flags: DESC_F_INDIRECT,
            next: 0,
        }, // nested indirect
        Desc {
            addr: table,
            len: 20,
            flags: DESC_F_INDIRECT,
            next: 0,
        }, // table length % 16
        Desc {
            addr: buf,
            len: 64,
            flags: DESC_F_NEXT,
            next: 300,
        }, // next beyond the ring
    ];
    let vq = &mut fe.vqs[1];
    for (i, desc) in hostile.iter().enumerate() {
        let index = 200 + u16::try_from(i).unwrap();
        vq.ring.write_desc(&mem, index, *desc);
        vq.ring.push_avail(&mem, index);
    }
    fe.publish_and_kick(1);
    fe.send(1, &eth_frame(src, &marker(77)));

    let used = fe.wait_used(1, hostile.len());
    assert!(used.iter().all(|u| u.len == 0), "{used:?}");
    assert!(
        capture(&cap, common::TIMEOUT, |f| has_marker(f, 77)).is_some(),
        "pair 1 moves: {}",
        d.log()
    );
    let s = d.stats();
    assert_eq!(s.get("bad_chains_total", 1), hostile.len() as u64);
    assert_eq!(s.get("frames_total", 3), 1);
    fe.send(0, &eth_frame(src, &marker(78)));
    assert!(
        capture(&cap, common::TIMEOUT, |f| has_marker(f, 78)).is_some(),
        "pair 0 still moves"
    );
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn a_flood_of_requests_is_answered_and_traffic_still_flows() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);

    for _ in 0..20_000 {
        vhost::VhostBackend::get_features(&fe.fe).expect("answered");
    }

    fe.send(0, &eth_frame(default_mac(&d.tap), &marker(5)));
    assert!(capture(&cap, common::TIMEOUT, |f| has_marker(f, 5)).is_some());
}

/// A UDP payload of `len` bytes: `marker(tag)`, then a counting pattern,
/// so a cut or shifted copy is told apart from the original.
fn long_payload(tag: u32, len: usize) -> Vec<u8> {
    let mut p = marker(tag);
    p.extend((0..len - p.len()).map(|i| u8::try_from(i % 251).expect("< 251")));
    p
}

/// Sends one UDP datagram with `payload` from the namespace to the guest.
fn send_udp_payload(ns: &Netns, port: u16, payload: &[u8]) {
    let sock = ns.udp_socket();
    sock.send_to(payload, ("198.18.0.2", port))
        .expect("udp send");
}

/// Offset of the UDP payload in an RX buffer: header, Ethernet, IPv4, UDP.
fn udp_payload_at(hdr_len: usize) -> usize {
    hdr_len + 14 + 20 + 8
}

/// Waits until a used entry of RX queue 0 holds `marker(tag)`; returns every
/// used entry seen up to then, in order.
fn used_until_marker(fe: &mut TestFrontend, tag: u32) -> Vec<Used> {
    let mut seen = Vec::new();
    common::wait_for(&format!("marker {tag} in an RX buffer"), || {
        let fresh = fe.used(0);
        let found = fresh.iter().any(|u| has_marker(&fe.rx_buffer(0, *u), tag));
        seen.extend(fresh);
        found.then_some(())
    });
    seen
}

/// Guest receive offloads (GUEST_TSO4, GUEST_TSO6, GUEST_ECN, GUEST_UFO):
/// without them the largest frame the guest takes is its MTU.
const GUEST_GSO: u64 = (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10);

/// The tap joins a jumbo bridge under the running daemon (MTU 9000) while
/// the guest was told 1500; twenty 9000-byte IPv4 frames, then a small one,
/// go to a guest that acked all features but `drop` and posted 128 buffers
/// of `buf_size` bytes. Only the small frame may arrive.
fn jumbo_frames_reach_a_guest_told_1500(drop: u64, buf_size: u32) {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    ns.ip(&["link", "set", &d.tap, "mtu", "9000"]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, drop);
    fe.post_rx(0, 128, buf_size);

    for _ in 0..20 {
        send_udp_payload(&ns, 9000, &long_payload(1, 8972));
    }
    send_udp_to_guest(&ns, &[(9000, 2)]);

    let used = used_until_marker(&mut fe, 2);
    assert_eq!(
        used.len(),
        1,
        "only the frame within the guest's MTU arrived: {used:?}"
    );
    assert_eq!(used[0].len, 12 + 14 + 20 + 8 + 64);
    let s = d.stats();
    assert_eq!(s.get("rx_dropped_oversize_frames_total", 0), 20);
    assert_eq!(s.get("rx_dropped_frames_total", 0), 0);
    assert_eq!(s.get("frames_total", 0), 1);
    assert_eq!(s.get("bytes_total", 0), 14 + 20 + 8 + 64);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn jumbo_frames_are_dropped_and_counted_not_delivered_cut_into_2k_buffers() {
    // No MRG_RXBUF, no receive offloads: 2048-byte buffers are more than the
    // 1518-byte frames the guest was promised, and less than 9014.
    jumbo_frames_reach_a_guest_told_1500(MRG_RXBUF | GUEST_GSO, 2048);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn jumbo_frames_without_gso_are_dropped_for_a_guest_with_mergeable_buffers_and_offloads() {
    // With GUEST_TSO the guest takes 64 KiB GSO frames, but a frame marked
    // "no GSO" must not exceed the MTU it was given (VIRTIO_NET_F_MTU).
    jumbo_frames_reach_a_guest_told_1500(0, 4096);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn jumbo_frame_is_delivered_intact_when_the_guest_is_offered_the_tap_mtu() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--mtu", "9000"]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, MRG_RXBUF);
    fe.post_rx(0, 8, 65562);
    let payload = long_payload(3, 8972);

    send_udp_payload(&ns, 9000, &payload);

    let used = used_until_marker(&mut fe, 3);
    let last = *used.last().expect("one entry");
    let buf = fe.rx_buffer(0, last);
    assert_eq!(buf.len(), 12 + 14 + 20 + 8 + 8972);
    assert_eq!(&buf[udp_payload_at(12)..], payload.as_slice(), "byte-exact");
    assert_eq!(d.stats().get("rx_dropped_oversize_frames_total", 0), 0);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn daemon_warns_at_start_when_the_tap_mtu_differs_from_the_mtu_offered_to_the_guest() {
    let ns = Netns::new();
    let mut d = Daemon::paths();
    ns.add_tap(&d.tap);
    ns.ip(&["link", "set", &d.tap, "mtu", "9000"]);

    d.spawn(&ns, &[]);

    let log = d.log();
    assert!(
        log.contains("MTU 9000") && log.contains("--mtu 9000"),
        "the log names both MTUs and the fix: {log}"
    );
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn small_frame_is_delivered_into_a_few_small_mergeable_buffers() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    // Four 256-byte buffers: far less than a 64 KiB GSO frame.
    fe.post_rx(0, 4, 256);

    send_udp_to_guest(&ns, &[(9000, 4)]);

    let used = used_until_marker(&mut fe, 4);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].len, 12 + 14 + 20 + 8 + 64);
    let buf = fe.rx_buffer(0, used[0]);
    assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
    assert_eq!(&buf[udp_payload_at(12)..], marker(4).as_slice());
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn frame_larger_than_the_posted_mergeable_buffers_waits_for_more_and_arrives_whole() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    fe.post_rx(0, 4, 256);
    let payload = long_payload(5, 1400);
    let total: usize = 12 + 14 + 20 + 8 + 1400;

    send_udp_payload(&ns, 9000, &payload);
    std::thread::sleep(Duration::from_millis(300));
    assert!(fe.used(0).is_empty(), "1024 bytes posted: nothing yet");
    fe.post_rx(0, 4, 256);

    let used = fe.wait_used(0, total.div_ceil(256));
    assert_eq!(used.len(), 6, "{used:?}");
    let mut frame = Vec::new();
    for u in &used {
        frame.extend(fe.rx_buffer(0, *u));
    }
    assert_eq!(frame.len(), total);
    assert_eq!(u16::from_le_bytes([frame[10], frame[11]]), 6, "num_buffers");
    assert_eq!(
        &frame[udp_payload_at(12)..],
        payload.as_slice(),
        "byte-exact"
    );
    let s = d.stats();
    assert_eq!(s.get("frames_total", 0), 1);
    assert_eq!(s.get("rx_dropped_frames_total", 0), 0);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn frame_held_for_mergeable_buffers_is_dropped_and_counted_when_the_frontend_goes_away() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let mut first = TestFrontend::connect(&d.socket, 1, 256, 0);
    first.post_rx(0, 2, 256);
    send_udp_payload(&ns, 9000, &long_payload(8, 1000));
    common::wait_for("the frame to be read and held", || {
        (d.stats().get("kicks_total", 0) >= 1 && first.used(0).is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(first);

    let mut second = TestFrontend::connect(&d.socket, 1, 256, 0);
    second.post_rx(0, 64, 4096);
    send_udp_to_guest(&ns, &[(9000, 9)]);

    let used = used_until_marker(&mut second, 9);
    assert_eq!(
        used.len(),
        1,
        "the old guest's frame is not delivered: {used:?}"
    );
    assert_eq!(d.stats().get("rx_dropped_frames_total", 0), 1);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn legacy_feature_set_moves_frames_with_the_10_byte_header_both_ways() {
    const VERSION_1: u64 = 1 << 32;
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let cap = ns.packet_socket();
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, VERSION_1 | MRG_RXBUF);
    assert_eq!(fe.hdr_len(), 10);
    let sent = eth_frame(default_mac(&d.tap), &marker(6));

    fe.send(0, &sent);
    fe.post_rx(0, 8, 65560);
    send_udp_to_guest(&ns, &[(9000, 7)]);

    let seen = capture(&cap, common::TIMEOUT, |f| has_marker(f, 6)).expect("TX frame");
    assert_eq!(seen, sent, "TX frame intact on the tap");
    let used = used_until_marker(&mut fe, 7);
    let buf = fe.rx_buffer(0, *used.last().expect("one entry"));
    assert_eq!(buf.len(), 10 + 14 + 20 + 8 + 64, "10-byte header on RX");
    assert_eq!(&buf[10..16], &default_mac(&d.tap), "frame right after it");
    assert_eq!(&buf[22..24], &[0x08, 0x00], "IPv4");
    assert_eq!(&buf[udp_payload_at(10)..], marker(7).as_slice());
    let s = d.stats();
    assert_eq!(s.get("bytes_total", 1), sent.len() as u64);
    assert_eq!(s.get("bytes_total", 0), 14 + 20 + 8 + 64);
}
