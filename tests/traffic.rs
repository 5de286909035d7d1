//! Frames move end to end: TX onto the tap, RX into guest buffers (with and
//! without mergeable buffers, jumbo taps, few small buffers, a legacy 10-byte
//! header), two queue pairs, RX waiting for buffers, UDP segmentation offload
//! both ways.
//!
//! End to end with the real parts: the daemon process on a real tap in a
//! network namespace, driven by the real vhost-user frontend protocol
//! (`vhost::vhost_user::Frontend`) in QEMU's message order, over memfd-backed
//! guest memory. They need root and /dev/net/tun, so they are `#[ignore]`d
//! for a plain `cargo test`; `bash .ci/test` (as root, what CI runs) runs them.

use std::time::Duration;

use vhost_user_net::control::config::default_mac;
use vhost_user_net::testing::driver::Used;
use vhost_user_net_harness as common;
use vhost_user_net_harness::frames::{
    address_tap, capture_all, has_marker, long_payload, marker, mem_check, send_udp_gso_to_guest,
    send_udp_payload, send_udp_to_guest, uso_frame, GSO_UDP_L4,
};
use vhost_user_net_harness::{capture, eth_frame, Daemon, Netns, TestFrontend};

const MRG_RXBUF: u64 = 1 << 15;

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
    // TX counts before it publishes its used entry (not before the write).
    assert_eq!(fe.wait_used(1, 1).len(), 1);
    let s = d.stats();
    assert_eq!(s.get("bytes_total", 1), sent.len() as u64);
    assert_eq!(s.get("bytes_total", 0), 14 + 20 + 8 + 64);
}

const HOST_USO: u64 = 1 << 56;
const GUEST_USO: u64 = (1 << 54) | (1 << 55);

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn uso_frame_from_the_guest_arrives_in_the_namespace_as_segmented_datagrams() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let sock = ns.within(|| std::net::UdpSocket::bind("198.18.0.1:9100").expect("bind"));
    sock.set_read_timeout(Some(common::TIMEOUT))
        .expect("timeout");
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    assert_ne!(fe.features & HOST_USO, 0, "HOST_USO negotiated");
    // Three 1000-byte segments and a 500-byte tail, each told apart.
    let payload = long_payload(11, 3500);
    let (hdr, frame) = uso_frame(ns.mac(&d.tap), default_mac(&d.tap), 9100, &payload, 1000);

    fe.queue_tx_with_header(0, &hdr, &frame);
    fe.publish_and_kick(1);

    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        let n = sock.recv(&mut buf).expect("a segment");
        got.push(buf[..n].to_vec());
    }
    let want: Vec<Vec<u8>> = payload.chunks(1000).map(<[u8]>::to_vec).collect();
    assert_eq!(got, want, "segments in order, byte-exact");
    // The batch counts before it publishes its used entries, not before
    // the write: the segments can arrive first.
    assert_eq!(fe.wait_used(1, 1).len(), 1);
    let s = d.stats();
    assert_eq!(s.get("frames_total", 1), 1, "one GSO frame from the guest");
    assert_eq!(s.get("bytes_total", 1), frame.len() as u64);
    assert_eq!(s.get("bad_chains_total", 1), 0);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn udp_gso_send_in_the_namespace_reaches_a_guest_with_only_guest_uso_as_one_frame() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    // USO is the guest's only receive segmentation offload.
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, GUEST_GSO);
    assert_eq!(
        fe.features & GUEST_USO,
        GUEST_USO,
        "GUEST_USO4/6 negotiated"
    );
    fe.post_rx(0, 64, 4096);
    // 20 segments: one frame of 20054 bytes spans 5 mergeable buffers.
    let payload = long_payload(12, 20_000);
    let total: usize = 12 + 14 + 20 + 8 + 20_000;

    send_udp_gso_to_guest(&ns, 9000, &payload, 1000);

    let used = fe.wait_used(0, total.div_ceil(4096));
    let mut frame = Vec::new();
    for u in &used {
        frame.extend(fe.rx_buffer(0, *u));
    }
    assert_eq!(frame[1], GSO_UDP_L4, "gso_type UDP_L4: {:?}", &frame[..12]);
    assert_eq!(u16::from_le_bytes([frame[4], frame[5]]), 1000, "gso_size");
    assert_eq!(u16::from_le_bytes([frame[10], frame[11]]), 5, "num_buffers");
    assert_eq!(frame.len(), total, "the whole datagram in one frame");
    assert_eq!(
        &frame[udp_payload_at(12)..],
        payload.as_slice(),
        "byte-exact"
    );
    let s = d.stats();
    assert_eq!(s.get("frames_total", 0), 1);
    assert_eq!(s.get("rx_dropped_oversize_frames_total", 0), 0);
}

/// `VIRTIO_F_IN_ORDER` (bit 35), which the test frontend acks only when
/// asked ([`TestFrontend::connect_in_order`]), as DPDK's virtio-user does.
const IN_ORDER: u64 = 1 << 35;

/// Sends `rounds` rounds of `per_round` TX frames on a 16-entry ring (so
/// the descriptor table and the used ring wrap), each round published with
/// one kick; checks every frame reached the tap and every chain came back
/// in the order it was made available. Returns the used entries the
/// driver read and the TX batches the daemon counted.
fn tx_rounds(
    fe: &mut TestFrontend,
    ns: &Netns,
    d: &Daemon,
    rounds: u32,
    per_round: u32,
) -> (u64, u64) {
    let cap = ns.packet_socket();
    let src = default_mac(&d.tap);
    let mut heads = Vec::new();
    for round in 0..rounds {
        let tags: Vec<u32> = (round * per_round..(round + 1) * per_round).collect();
        for &tag in &tags {
            fe.queue_tx(0, &eth_frame(src, &marker(tag)));
        }
        fe.publish_and_kick(1);
        assert_eq!(capture_all(&cap, &tags), Vec::<u32>::new(), "frames lost");
        let used = fe.wait_used(1, tags.len());
        assert_eq!(used.len(), tags.len());
        assert!(used.iter().all(|u| u.len == 0), "TX completions carry 0");
        heads.extend(used.iter().map(|u| u.head));
    }
    let stats = d.stats();
    let frames = u64::from(rounds * per_round);
    assert_eq!(stats.get("frames_total", 1), frames);
    assert_eq!(stats.get("completions_total", 1), frames);
    (fe.vqs[1].ring.entries_read(), stats.get("batches_total", 1))
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn with_in_order_a_tx_batch_comes_back_as_one_used_entry() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let mut fe = TestFrontend::connect_in_order(&d.socket, 1, 16, 0);
    assert_ne!(fe.features & IN_ORDER, 0, "IN_ORDER offered and acked");

    // The driver checks the shape: an entry names the last chain of its
    // batch, every chain made available before it counts as used, and the
    // used index moved past exactly those (it panics otherwise).
    let (entries, batches) = tx_rounds(&mut fe, &ns, &d, 5, 8);
    assert_eq!(entries, batches, "one used entry per TX batch");
    assert!(entries < 40, "{entries} used entries for 40 frames");
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn without_in_order_every_tx_chain_has_its_own_used_entry() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 16, 0);
    assert_eq!(
        fe.features & IN_ORDER,
        0,
        "a Linux-like guest does not ack IN_ORDER"
    );

    let (entries, _) = tx_rounds(&mut fe, &ns, &d, 5, 8);
    assert_eq!(entries, 40);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn with_tap_io_posted_rx_frames_land_in_reads_posted_ahead_in_ring_order() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--tap-io", "posted"]);
    address_tap(&ns, &d);
    // Without receive offloads each 4 KiB buffer holds a whole frame.
    let mut fe = TestFrontend::connect(&d.socket, 1, 16, GUEST_GSO | GUEST_USO);
    fe.post_rx(0, 16, 4096);

    // Three rounds of 6 frames into 16 buffers: the posted chains wrap.
    for round in 0..3u32 {
        let tags: Vec<u32> = (round * 6..(round + 1) * 6).collect();
        let sends: Vec<(u16, u32)> = tags.iter().map(|&t| (9000, t)).collect();
        send_udp_to_guest(&ns, &sends);
        let used = used_until_marker(&mut fe, *tags.last().expect("tags"));
        let delivered: Vec<u32> = used
            .iter()
            .filter_map(|u| {
                let buf = fe.rx_buffer(0, *u);
                tags.iter().copied().find(|&t| has_marker(&buf, t))
            })
            .collect();
        assert_eq!(delivered, tags, "every frame of round {round}, in order");
        fe.post_rx(0, used.len(), 4096);
    }
    let stats = d.stats();
    let posted = stats.get("rx_posted_frames_total", 0);
    if common::posted_reads_supported() {
        assert_eq!(posted, stats.get("frames_total", 0), "every frame");
    } else {
        assert_eq!(posted, 0);
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn with_in_order_rx_frames_arrive_whole_in_buffers_used_in_ring_order() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d);
    let mut fe = TestFrontend::connect_in_order(&d.socket, 1, 16, 0);
    assert_ne!(fe.features & IN_ORDER, 0);
    fe.post_rx(0, 16, 4096);

    let mut chains = 0u64;
    let mut last_head: Option<u16> = None;
    for round in 0..5u32 {
        let tags: Vec<u32> = (round * 6..(round + 1) * 6).collect();
        let sends: Vec<(u16, u32)> = tags.iter().map(|&t| (9000, t)).collect();
        send_udp_to_guest(&ns, &sends);
        let used = used_until_marker(&mut fe, *tags.last().expect("tags"));
        let mut next_tag = 0;
        for u in &used {
            // Buffers come back in the order they were posted: table
            // order, wrapping at 16.
            if let Some(prev) = last_head {
                assert_eq!(u.head, (prev + 1) % 16, "buffers used out of order");
            }
            last_head = Some(u.head);
            let buf = fe.rx_buffer(0, *u);
            if next_tag < tags.len() && has_marker(&buf, tags[next_tag]) {
                assert_eq!(u.len as usize, udp_payload_at(12) + 64, "whole frame");
                assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
                next_tag += 1;
            }
        }
        assert_eq!(
            next_tag,
            tags.len(),
            "every frame of round {round}, in order"
        );
        chains += used.len() as u64;
        fe.post_rx(0, used.len(), 4096);
    }
    // RX entries carry each buffer's length: one entry per chain.
    assert_eq!(fe.vqs[0].ring.entries_read(), chains);
}
