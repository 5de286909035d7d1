//! End to end, at the vhost-user level: what live migration needs from the
//! daemon. With a dirty log shared (SET_LOG_BASE) and `VHOST_F_LOG_ALL`
//! acked, every page the daemon writes is logged, and only those; with
//! LOG_ALL acked off nothing is; once a ring is stopped (GET_VRING_BASE) the
//! daemon writes nothing into guest memory and sends no interrupt.
//!
//! The daemon runs on a real tap in a network namespace, driven by the
//! real vhost-user frontend in QEMU's order. Need root and /dev/net/tun:
//! `#[ignore]`d for a plain `cargo test`; `cargo test -- --include-ignored`
//! (as root, what CI runs) runs them.

use vhost_user_net_harness as common;
use vhost_user_net_harness::frames::send_flows;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Daemon, Netns, TestFrontend, LOG_PAGE};
use vhost::VhostBackend;
use vhost_user_net::control::config::default_mac;

/// RX buffer size: more than a page and not a multiple of one, so some
/// frames cross into a page that no header starts in: a page written only
/// by the tap's `readv` (a header's page also gets `num_buffers`, written
/// through vm-memory, which logs it by itself).
const RX_BUF: u32 = 6000;

/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << 29;

/// A daemon on a tap in `ns` with a frontend connected (one pair, 256
/// entries, the features offered but `drop`), 64 RX buffers posted.
fn setup(ns: &Netns, drop: u64) -> (Daemon, TestFrontend) {
    let d = Daemon::start(ns, &[]);
    ns.route_to_guest(&d.tap, default_mac(&d.tap));
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, drop);
    fe.post_rx(0, 64, RX_BUF);
    (d, fe)
}

fn page(addr: u64) -> u64 {
    addr / LOG_PAGE
}

/// The pages the daemon may write in queue `q`'s used ring (entries,
/// `used.idx`, `avail_event`).
fn used_ring_pages(fe: &TestFrontend, q: usize) -> BTreeSet<u64> {
    let ring = &fe.vqs[q].ring;
    let start = ring.used_addr().0;
    let end = start + 4 + 8 * u64::from(ring.size()) + 2;
    (page(start)..=page(end - 1)).collect()
}

/// Moves `n` frames each way through pair 0 (RX from the namespace, TX
/// from the guest); returns the pages of the RX buffers the frames filled.
fn traffic(ns: &Netns, fe: &mut TestFrontend, ports: std::ops::Range<u16>) -> BTreeSet<u64> {
    let n = ports.len();
    send_flows(ns, ports, 1400);
    let used = fe.wait_used(0, n);
    for i in 0..n {
        fe.send(
            0,
            &common::eth_frame([2, 0, 0, 0, 0, 1], &[u8::try_from(i).unwrap(); 60]),
        );
    }
    fe.wait_used(1, n);
    let mut pages = BTreeSet::new();
    let mut header_pages = BTreeSet::new();
    for u in used {
        let start = fe.buffer_addr(0, u.head);
        header_pages.insert(page(start));
        pages.extend(page(start)..=page(start + u64::from(u.len) - 1));
    }
    assert!(
        !pages.is_subset(&header_pages),
        "no page holds frame data only"
    );
    pages
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn with_log_all_the_dirty_log_holds_exactly_the_pages_the_daemon_wrote() {
    let ns = Netns::new();
    let (_d, mut fe) = setup(&ns, 0);
    fe.share_dirty_log();
    fe.set_log_all(true);

    let rx_pages = traffic(&ns, &mut fe, 9000..9008);

    let mut expected = rx_pages.clone();
    expected.extend(used_ring_pages(&fe, 0));
    expected.extend(used_ring_pages(&fe, 1));
    let dirty = fe.dirty_pages();
    let missing: Vec<_> = expected.difference(&dirty).collect();
    let extra: Vec<_> = dirty.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "pages written but not logged: {missing:x?}; logged but not written: {extra:x?} \
         (RX buffers {rx_pages:x?})"
    );
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn logging_stops_when_log_all_is_acked_off_and_starts_again_when_on() {
    let ns = Netns::new();
    let (_d, mut fe) = setup(&ns, 0);
    fe.share_dirty_log();
    fe.set_log_all(true);
    traffic(&ns, &mut fe, 9000..9004);
    assert!(!fe.dirty_pages().is_empty(), "logged while on");

    // A cancelled migration: LOG_ALL acked off, the log left mapped.
    fe.set_log_all(false);
    fe.clear_dirty_log();
    traffic(&ns, &mut fe, 9004..9008);
    assert_eq!(fe.dirty_pages(), BTreeSet::new(), "logged with LOG_ALL off");

    // The next migration.
    fe.set_log_all(true);
    let rx_pages = traffic(&ns, &mut fe, 9008..9012);
    let dirty = fe.dirty_pages();
    assert!(
        rx_pages.is_subset(&dirty),
        "RX buffers {rx_pages:x?} not logged after LOG_ALL came back on: {dirty:x?}"
    );
}

/// Stops both rings of a frontend acking all offered features but `drop`
/// (GET_VRING_BASE, as the source QEMU does at the end of a migration),
/// then has the guest and the namespace go on sending: the daemon must
/// write nothing, log nothing and signal nothing.
fn after_stop_nothing_is_written(drop: u64) {
    let ns = Netns::new();
    let (_d, mut fe) = setup(&ns, drop);
    fe.share_dirty_log();
    fe.set_log_all(true);
    traffic(&ns, &mut fe, 9000..9004);

    for q in 0..2 {
        fe.fe.get_vring_base(q).expect("GET_VRING_BASE");
    }
    for q in 0..2 {
        fe.vqs[q].take_interrupts();
    }
    fe.clear_dirty_log();
    let before = fe.snapshot();

    // The guest still posts and sends, the namespace still sends.
    fe.post_rx(0, 16, RX_BUF);
    let avail_written = fe.snapshot();
    send_flows(&ns, 9004..9012, 1400);
    for i in 0..4 {
        fe.send(0, &common::eth_frame([2, 0, 0, 0, 0, 1], &[i; 60]));
    }
    let guest_wrote = fe.snapshot();
    std::thread::sleep(Duration::from_millis(500));

    assert!(
        fe.snapshot() == guest_wrote,
        "the daemon wrote guest memory after GET_VRING_BASE"
    );
    assert!(before != avail_written, "the guest's own writes are seen");
    assert_eq!(fe.dirty_pages(), BTreeSet::new(), "pages logged after stop");
    for q in 0..2 {
        assert_eq!(fe.vqs[q].take_interrupts(), 0, "interrupt on queue {q}");
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn after_get_vring_base_the_daemon_writes_no_guest_memory_and_sends_no_interrupt() {
    after_stop_nothing_is_written(0);
}

/// Without EVENT_IDX even the start of a batch writes (`used.flags`).
#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn after_get_vring_base_without_event_idx_the_daemon_writes_nothing_either() {
    after_stop_nothing_is_written(EVENT_IDX);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn send_rarp_announces_the_migrated_guest_on_the_tap() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let cap = ns.packet_socket();
    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];

    // What QEMU sends on the destination once a migration is done.
    fe.send_rarp(mac);

    let frame = common::capture(&cap, common::TIMEOUT, |f| {
        f.len() >= 14 && f[12..14] == [0x80, 0x35]
    })
    .unwrap_or_else(|| panic!("no RARP frame on the tap: {}", d.log()));
    assert_eq!(&frame[..6], &[0xff; 6], "broadcast");
    assert_eq!(&frame[6..12], &mac, "from the guest's MAC");
    assert_eq!(&frame[20..22], &[0, 3], "a reverse request");
    assert_eq!(&frame[22..28], &mac, "about the guest's MAC");
    // The connection goes on: the crate never saw the message it cannot
    // handle.
    fe.fe.get_features().expect("still served");
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn set_log_fd_is_accepted_and_the_connection_goes_on() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let log_fd = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");

    fe.set_log_fd(std::os::fd::AsRawFd::as_raw_fd(&log_fd));

    // The crate never saw the message it has no handler for.
    fe.fe.get_features().expect("still served");
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn a_used_ring_with_its_own_log_address_is_logged_there_too() {
    let ns = Netns::new();
    let (_d, mut fe) = setup(&ns, 0);
    fe.share_dirty_log();
    // The frontend wants TX's used ring logged at another guest page.
    let log_at = common::GUEST_BASE + (150 << 20);
    fe.set_used_log(1, Some(log_at));
    fe.set_log_all(true);

    traffic(&ns, &mut fe, 9000..9004);

    let dirty = fe.dirty_pages();
    assert!(
        dirty.contains(&page(log_at)),
        "the used ring's log address {log_at:#x} (page {:#x}) was not logged: {dirty:x?}",
        page(log_at)
    );
    assert!(
        used_ring_pages(&fe, 1).is_subset(&dirty),
        "and the ring itself still is"
    );
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn a_memory_region_the_frontend_adds_during_a_migration_is_logged_too() {
    use vhost::vhost_user::VhostUserFrontend;
    use vm_memory::GuestMemoryBackend;
    let ns = Netns::new();
    let (_d, mut fe) = setup(&ns, 0);
    fe.share_dirty_log();
    fe.set_log_all(true);
    // QEMU changes the memory map while it migrates: the region goes and
    // comes back (a new region for the daemon, made without a log), then
    // the rings are set up again.
    let region = fe
        .mem
        .find_region(vm_memory::GuestAddress(common::GUEST_BASE))
        .expect("region");
    let info = vhost::VhostUserMemoryRegionInfo::from_guest_region(region).expect("info");
    fe.fe.remove_mem_region(&info).expect("REM_MEM_REG");
    fe.fe.add_mem_region(&info).expect("ADD_MEM_REG");
    for q in 0..2 {
        fe.restart_vring(q);
    }
    fe.clear_dirty_log();

    let rx_pages = traffic(&ns, &mut fe, 9000..9004);

    let dirty = fe.dirty_pages();
    let missing: Vec<_> = rx_pages.difference(&dirty).collect();
    assert!(
        missing.is_empty(),
        "RX pages in the re-added region not logged: {missing:x?}"
    );
}
