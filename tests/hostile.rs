//! A hostile or broken guest or frontend: bad chains of every kind, an
//! impossible avail index, descriptor loops, a frontend that hangs up
//! mid-message or sends unknown requests, guest memory taken away under
//! traffic, a flood of requests. Each is returned, counted or refused, and
//! traffic goes on. Thousands of local clients sending random vhost-user
//! messages neither flood the log nor leak.
//!
//! End to end with the real parts: the daemon process on a real tap in a
//! network namespace, driven by the real vhost-user frontend protocol
//! (`vhost::vhost_user::Frontend`) in QEMU's message order, over memfd-backed
//! guest memory. They need root and /dev/net/tun, so they are `#[ignore]`d
//! for a plain `cargo test`; `bash .ci/test` (as root, what CI runs) runs them.

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vmm_sys_util::eventfd::EventFd;

use vhost_user_net::control::config::default_mac;
use vhost_user_net::testing::driver::{Buf, Desc, Used};
use vhost_user_net_harness as common;
use vhost_user_net_harness::frames::{address_tap, has_marker, marker, send_udp_to_guest};
use vhost_user_net_harness::{capture, eth_frame, fds_and_rss, Daemon, Netns, TestFrontend};
use vm_memory::{Bytes, GuestAddress};

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
    // Pair 1's frame completed: counters are updated before the used index
    // is published, so they are settled once its entry is seen.
    fe.wait_used(3, 1);
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
