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
