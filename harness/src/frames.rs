//! Frames the end-to-end tests send and look for: a payload marker, UDP
//! from the namespace to the "guest", captures of several marked frames.

use std::os::fd::OwnedFd;

use vhost_user_net::control::config::default_mac;
use vm_memory::{Bytes, GuestAddress};

use crate::{capture, Daemon, Netns, TestFrontend, TIMEOUT};

/// Payload marker so frames are told apart from anything else on the wire.
pub fn marker(tag: u32) -> Vec<u8> {
    let mut p = b"vhost-user-net-test".to_vec();
    p.extend_from_slice(&tag.to_be_bytes());
    p.resize(64, 0x42);
    p
}

pub fn has_marker(frame: &[u8], tag: u32) -> bool {
    let m = marker(tag);
    frame.windows(m.len()).any(|w| w == m.as_slice())
}

/// Waits until frames with all `tags` were seen, in any order (frames sent
/// on different queue pairs can overtake each other). Returns the missing.
pub fn capture_all(cap: &OwnedFd, tags: &[u32]) -> Vec<u32> {
    let mut missing: Vec<u32> = tags.to_vec();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if let Some(f) = capture(cap, left, |f| missing.iter().any(|t| has_marker(f, *t))) {
            missing.retain(|t| !has_marker(&f, *t));
        }
    }
    missing
}

/// Lets UDP from the namespace reach the "guest" (see `route_to_guest`).
pub fn address_tap(ns: &Netns, d: &Daemon) {
    ns.route_to_guest(&d.tap, default_mac(&d.tap));
}

/// Sends UDP datagrams carrying `marker(tag)` from the namespace to the guest.
pub fn send_udp_to_guest(ns: &Netns, tags: &[(u16, u32)]) {
    let sock = ns.udp_socket();
    for &(port, tag) in tags {
        sock.send_to(&marker(tag), ("198.18.0.2", port))
            .expect("udp send");
    }
}

/// A UDP payload of `len` bytes: `marker(tag)`, then a counting pattern,
/// so a cut or shifted copy is told apart from the original.
pub fn long_payload(tag: u32, len: usize) -> Vec<u8> {
    let mut p = marker(tag);
    p.extend((0..len - p.len()).map(|i| u8::try_from(i % 251).expect("< 251")));
    p
}

/// Sends one UDP datagram with `payload` from the namespace to the guest.
pub fn send_udp_payload(ns: &Netns, port: u16, payload: &[u8]) {
    let sock = ns.udp_socket();
    sock.send_to(payload, ("198.18.0.2", port))
        .expect("udp send");
}

/// Sends one UDP datagram of `len` bytes (0x42) from the namespace to the
/// "guest" per port of `ports` (one flow each).
pub fn send_flows(ns: &Netns, ports: std::ops::Range<u16>, len: usize) {
    let sock = ns.udp_socket();
    let payload = vec![0x42; len];
    for port in ports {
        sock.send_to(&payload, ("198.18.0.2", port))
            .expect("udp send");
    }
}

/// The RX ring's memory is still readable (keeps `fe` alive to the end).
pub fn mem_check(fe: &TestFrontend) -> u8 {
    fe.mem
        .read_obj(GuestAddress(crate::GUEST_BASE))
        .unwrap_or(0)
}

/// `VIRTIO_NET_HDR_GSO_UDP_L4`: the header's `gso_type` for USO.
pub const GSO_UDP_L4: u8 = 5;

/// A UDP datagram from the "guest" (198.18.0.2, port 40000, `src` MAC) to
/// the namespace (198.18.0.1, `port`, `dst` MAC) carrying `payload`, with
/// the 12-byte virtio-net header a guest writes for UDP segmentation
/// offload: checksum to complete (`NEEDS_CSUM`, the UDP checksum field holds
/// the pseudo-header sum), `gso_type` UDP_L4, segments of `gso_size` bytes.
/// Returns (header, frame).
pub fn uso_frame(
    dst: [u8; 6],
    src: [u8; 6],
    port: u16,
    payload: &[u8],
    gso_size: u16,
) -> (Vec<u8>, Vec<u8>) {
    const ETH: usize = 14;
    const IP: usize = 20;
    const UDP: usize = 8;
    let saddr = [198, 18, 0, 2];
    let daddr = [198, 18, 0, 1];
    let udp_len = u16::try_from(UDP + payload.len()).expect("a 64 KiB datagram at most");
    let ip_len = udp_len + IP as u16;

    let mut f = Vec::with_capacity(ETH + IP + UDP + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&saddr);
    ip.extend_from_slice(&daddr);
    let ip_sum = !fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    f.extend_from_slice(&ip);
    // The pseudo-header sum, not complemented: what the device (here the
    // kernel, per segment) completes.
    let mut pseudo = saddr.to_vec();
    pseudo.extend_from_slice(&daddr);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let partial = fold(sum16(&pseudo, 0));
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&partial.to_be_bytes());
    f.extend_from_slice(payload);

    let mut hdr = vec![0u8; 12];
    hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    hdr[1] = GSO_UDP_L4;
    hdr[2..4].copy_from_slice(&((ETH + IP + UDP) as u16).to_le_bytes()); // hdr_len
    hdr[4..6].copy_from_slice(&gso_size.to_le_bytes());
    hdr[6..8].copy_from_slice(&((ETH + IP) as u16).to_le_bytes()); // csum_start
    hdr[8..10].copy_from_slice(&6u16.to_le_bytes()); // csum_offset: udphdr.check
    (hdr, f)
}

/// The ones' complement sum of `bytes` as big-endian 16-bit words, added to
/// `acc` (not folded).
fn sum16(bytes: &[u8], acc: u32) -> u32 {
    bytes.chunks(2).fold(acc, |a, w| {
        a + u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))
    })
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded")
}

/// Sends `payload` from the namespace to the "guest" (198.18.0.2, `port`)
/// with one `sendmsg` on a socket with `UDP_SEGMENT` = `gso_size`: the
/// kernel builds one UDP GSO packet of `payload.len() / gso_size` segments.
pub fn send_udp_gso_to_guest(ns: &Netns, port: u16, payload: &[u8], gso_size: u16) {
    let sock = ns.udp_socket();
    nix::sys::socket::setsockopt(
        &sock,
        nix::sys::socket::sockopt::UdpGsoSegment,
        &i32::from(gso_size),
    )
    .expect("UDP_SEGMENT");
    sock.send_to(payload, ("198.18.0.2", port))
        .expect("udp gso send");
}
