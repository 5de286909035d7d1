//! End to end: what happens around a ring's life, with the daemon process on
//! a real tap in a network namespace and the real vhost-user frontend
//! protocol. A held interrupt survives the ring's stop and restart (QEMU's
//! `stop`/`cont`), and a tap queue receives frames only while a frontend has
//! its RX ring enabled, so two daemons can share one multiqueue tap.
//!
//! Need root and /dev/net/tun: `#[ignore]`d for a plain `cargo test`;
//! `cargo test -- --include-ignored` (as root, what CI runs) runs them.

use vhost_user_net_harness as common;
use vhost_user_net_harness::frames::send_flows;

use std::time::{Duration, Instant};

use common::{Daemon, Netns, TestFrontend};
use vhost_user_net::control::config::default_mac;

/// Waits up to `within` for an interrupt on queue `q`; returns how many.
fn interrupts_within(fe: &TestFrontend, q: usize, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let n = fe.vqs[q].take_interrupts();
        if n > 0 || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn interrupt_held_by_the_policy_arrives_when_the_ring_is_stopped_and_restarted() {
    let ns = Netns::new();
    // The policy holds an interrupt for up to a second.
    let d = Daemon::start(&ns, &["--rx-coalesce", "frames=64,usecs=1000000"]);
    ns.route_to_guest(&d.tap, default_mac(&d.tap));
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    fe.post_rx(0, 64, 2048);
    // used_event stays 0: the guest asks to hear about the first entry.
    send_flows(&ns, 9000..9003, 64);
    fe.wait_used(0, 3);
    assert_eq!(fe.vqs[0].take_interrupts(), 0, "the policy holds it");

    // QEMU's `stop` then `cont`: GET_VRING_BASE, then the ring set up again.
    fe.restart_vring(0);

    let n = interrupts_within(&fe, 0, Duration::from_millis(500));
    assert!(
        n >= 1,
        "the guest never heard of the 3 frames it asked about: the interrupt \
         was lost with the ring stop"
    );
    let s = d.stats();
    assert!(s.get("interrupts_sent_total", 0) >= 1);
    // And RX goes on after the restart.
    send_flows(&ns, 9003..9004, 64);
    fe.wait_used(0, 1);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn a_daemon_without_a_frontend_takes_no_flows_from_one_sharing_its_tap() {
    let ns = Netns::new();
    let mut a = Daemon::paths();
    ns.add_tap(&a.tap);
    a.spawn(&ns, &[]);
    // A second daemon on the same multiqueue tap, nobody connected to it.
    let mut b = Daemon::paths();
    b.tap = a.tap.clone();
    b.spawn(&ns, &[]);
    ns.route_to_guest(&a.tap, default_mac(&a.tap));
    let mut fe_a = TestFrontend::connect(&a.socket, 1, 256, 0);
    fe_a.post_rx(0, 128, 2048);

    send_flows(&ns, 9000..9064, 64);

    let used = fe_a.wait_used(0, 64);
    assert_eq!(used.len(), 64, "every flow reached the daemon in use");
    assert_eq!(b.stats().get("frames_total", 0), 0);

    // The frontend moves to the other daemon: the first one's queue is
    // detached when its frontend goes, the second's attached when its
    // frontend enables the ring.
    drop(fe_a);
    let mut fe_b = TestFrontend::connect(&b.socket, 1, 256, 0);
    fe_b.post_rx(0, 128, 2048);
    common::wait_for("the first daemon to detach its queue", || {
        (a.log().matches("pair 0: tap queue detached").count() >= 2).then_some(())
    });

    send_flows(&ns, 10000..10064, 64);

    let used = fe_b.wait_used(0, 64);
    assert_eq!(used.len(), 64, "every flow reached the daemon now in use");
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn with_posted_reads_a_stopped_ring_reports_the_base_of_the_buffers_it_used() {
    // QEMU's `stop`: GET_VRING_BASE must not count the chains the daemon
    // had posted to the kernel and not filled; they are given back, and
    // the restarted ring fills them.
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--tap-io", "posted"]);
    ns.route_to_guest(&d.tap, default_mac(&d.tap));
    // Without receive offloads each 2 KiB buffer holds a whole frame.
    let gso = (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 54) | (1 << 55);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, gso);
    fe.post_rx(0, 64, 2048);
    send_flows(&ns, 9000..9003, 64);
    fe.wait_used(0, 3);

    let base = fe.stop_vring(0);

    assert_eq!(base, 3, "the next chain to fill is the 4th");
    fe.setup_vring_at(0, 3);
    send_flows(&ns, 9003..9005, 64);
    let used = fe.wait_used(0, 2);
    assert!(used.iter().all(|u| u.len > 0));
    if common::posted_reads_supported() {
        assert_eq!(d.stats().get("rx_posted_frames_total", 0), 5);
    }
}
