use std::io::Write;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::datapath::batch::{Batch, End};
use crate::datapath::guest::IoVecBuf;
use crate::stats::QueueStats;
use crate::testing::driver::{Buf, Used};
use crate::testing::unit::{add_rx_buffers, add_rx_buffers_at, buf_addr, memory, ring, tap_pair};

const SMALL: RxParams = RxParams {
    hdr_len: 12,
    mergeable: false,
    max_frame: 12 + 1518,
    max_plain_frame: 12 + 1518,
};
const MRG_64K: RxParams = RxParams {
    hdr_len: 12,
    mergeable: true,
    max_frame: 12 + 65553,
    max_plain_frame: 12 + 65553,
};
const MRG_1500: RxParams = RxParams {
    hdr_len: 12,
    mergeable: true,
    max_frame: 12 + 1518,
    max_plain_frame: 12 + 1518,
};

/// Runs one RX batch with an unlimited budget, as the worker does.
fn run_batch(
    mem: &crate::datapath::guest::GuestMem,
    queue: &mut virtio_queue::Queue,
    stats: &QueueStats,
    tap: &File,
    params: RxParams,
) -> End {
    run_batch_with(&mut Bounce::default(), mem, queue, stats, tap, params)
}

/// [`run_batch`] with the worker's `bounce` buffer, which outlives batches.
fn run_batch_with(
    bounce: &mut Bounce,
    mem: &crate::datapath::guest::GuestMem,
    queue: &mut virtio_queue::Queue,
    stats: &QueueStats,
    tap: &File,
    params: RxParams,
) -> End {
    let mut buf = IoVecBuf::default();
    let mut iovecs = buf.bind(mem);
    let mut chains = Vec::new();
    let mut buffers = RxBuffers {
        chains: &mut chains,
        iovecs: &mut iovecs,
        bounce,
    };
    let mut batch = Batch::begin(queue, mem, stats, 0).unwrap();
    let end = batch
        .drain(u64::MAX, |b| step(b, &mut buffers, tap, params))
        .unwrap();
    buffers.give_back(&mut batch);
    batch
        .finish(&mut crate::datapath::notify::Coalescer::new(
            crate::datapath::notify::Policy::Immediate,
        ))
        .unwrap();
    end
}

/// A frame as the tap hands it over: 12-byte header (num_buffers 0) + payload.
fn tap_frame(payload_len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend(std::iter::repeat_n(fill, payload_len));
    f
}

fn num_buffers(mem: &crate::datapath::guest::GuestMem, at: GuestAddress) -> u16 {
    let v: u16 = mem.read_obj(GuestAddress(at.0 + 10)).unwrap();
    u16::from_le(v)
}

#[test]
fn frame_lands_in_one_buffer_with_num_buffers_one() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let (tap, mut peer) = tap_pair();
    let heads = add_rx_buffers(&mem, &mut r, 4, 1530);
    peer.write_all(&tap_frame(100, 0x5a)).unwrap();
    let stats = QueueStats::default();

    let end = run_batch(&mem, &mut q, &stats, &tap, SMALL);

    assert_eq!(end, End::TapBlocked, "stopped because the tap is empty");
    assert_eq!(
        r.pop_used(&mem),
        Some(Used {
            head: heads[0],
            len: 112
        })
    );
    assert_eq!(num_buffers(&mem, buf_addr(0, 1530)), 1);
    let byte: u8 = mem
        .read_obj(GuestAddress(buf_addr(0, 1530).0 + 12))
        .unwrap();
    assert_eq!(byte, 0x5a);
    assert_eq!(q.next_avail(), 1, "unused buffers were given back");
    assert_eq!(stats.frames.get(), 1);
    assert_eq!(stats.bytes.get(), 100);
    assert_eq!(stats.tap_eagain.get(), 1);
}

#[test]
fn gso_frame_of_64k_spans_mergeable_buffers_each_with_its_own_length() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 64, true);
    let (tap, mut peer) = tap_pair();
    let heads = add_rx_buffers(&mem, &mut r, 40, 4096);
    let total: usize = 12 + 65000;
    peer.write_all(&tap_frame(65000, 0x77)).unwrap();
    let stats = QueueStats::default();

    run_batch(&mem, &mut q, &stats, &tap, MRG_64K);

    let used: Vec<Used> = std::iter::from_fn(|| r.pop_used(&mem)).collect();
    let expect = total.div_ceil(4096);
    assert_eq!(used.len(), expect);
    for (u, h) in used.iter().zip(&heads) {
        assert_eq!(u.head, *h);
    }
    assert!(used[..expect - 1].iter().all(|u| u.len == 4096));
    assert_eq!(used[expect - 1].len as usize, total - 4096 * (expect - 1));
    assert_eq!(usize::from(num_buffers(&mem, buf_addr(0, 4096))), expect);
    assert_eq!(
        usize::from(q.next_avail()),
        expect,
        "only the chains used were consumed"
    );
}

#[test]
fn small_frame_uses_one_mergeable_buffer_and_gives_the_rest_back() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 64, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 40, 4096);
    peer.write_all(&tap_frame(60, 1)).unwrap();
    peer.write_all(&tap_frame(60, 2)).unwrap();
    let stats = QueueStats::default();

    run_batch(&mem, &mut q, &stats, &tap, MRG_64K);

    let used: Vec<Used> = std::iter::from_fn(|| r.pop_used(&mem)).collect();
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|u| u.len == 72));
    assert_eq!(num_buffers(&mem, buf_addr(1, 4096)), 1);
    assert_eq!(q.next_avail(), 2);
}

#[test]
fn empty_rx_ring_does_not_read_the_tap() {
    let mem = memory();
    let (_r, mut q) = ring(&mem, 16, true);
    let (tap, mut peer) = tap_pair();
    peer.write_all(&tap_frame(60, 1)).unwrap();
    let stats = QueueStats::default();

    let end = run_batch(&mem, &mut q, &stats, &tap, SMALL);

    assert_eq!(end, End::RingEmpty);
    let mut buf = [0u8; 100];
    assert_eq!(
        std::io::Read::read(&mut &tap, &mut buf).unwrap(),
        72,
        "frame still queued"
    );
    assert_eq!(stats.rx_dropped_frames.get(), 0);
}

#[test]
fn rx_chain_with_readable_descriptor_is_returned_with_len_zero_and_the_next_buffer_is_used() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let (tap, mut peer) = tap_pair();
    let bad = r
        .add_chain(
            &mem,
            &[Buf {
                addr: buf_addr(8, 2048),
                len: 1530,
                device_writes: false,
            }],
        )
        .unwrap();
    r.push_avail(&mem, bad);
    r.publish(&mem);
    let good = add_rx_buffers(&mem, &mut r, 1, 1530)[0];
    peer.write_all(&tap_frame(60, 9)).unwrap();
    let stats = QueueStats::default();

    run_batch(&mem, &mut q, &stats, &tap, SMALL);

    assert_eq!(r.pop_used(&mem), Some(Used { head: bad, len: 0 }));
    assert_eq!(
        r.pop_used(&mem),
        Some(Used {
            head: good,
            len: 72
        })
    );
    assert_eq!(stats.bad_chains.get(), 1);
}

#[test]
fn frame_larger_than_a_small_buffer_is_dropped_and_counted() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 1, 200);
    peer.write_all(&tap_frame(1000, 1)).unwrap();
    peer.write_all(&tap_frame(50, 2)).unwrap();
    let stats = QueueStats::default();

    run_batch(&mem, &mut q, &stats, &tap, SMALL);

    assert_eq!(stats.rx_dropped_frames.get(), 1);
    assert_eq!(
        r.pop_used(&mem).map(|u| u.len),
        Some(62),
        "next frame got the buffer"
    );
}

// Bug 1: a frame larger than the guest may receive is never delivered cut.

#[test]
fn frame_above_the_largest_frame_is_dropped_not_delivered_cut_into_a_bigger_buffer() {
    // The tap's MTU went above the guest's: a 4000-byte frame meets
    // 2048-byte buffers (bigger than the guest's largest frame).
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 2, 2048);
    peer.write_all(&tap_frame(4000, 1)).unwrap();
    peer.write_all(&tap_frame(60, 2)).unwrap();
    let stats = QueueStats::default();

    run_batch(&mem, &mut q, &stats, &tap, SMALL);

    let used: Vec<Used> = std::iter::from_fn(|| r.pop_used(&mem)).collect();
    assert_eq!(used.len(), 1, "only the frame that fits arrived: {used:?}");
    assert_eq!(used[0].len, 72);
    assert_eq!(stats.frames.get(), 1);
    assert_eq!(stats.bytes.get(), 60, "bytes of delivered frames only");
    assert_eq!(stats.rx_dropped_oversize_frames.get(), 1);
    assert_eq!(stats.rx_dropped_frames.get(), 0);
}

#[test]
fn mergeable_frame_above_the_largest_frame_is_dropped_even_when_the_buffers_could_hold_it() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 4, 4096);
    peer.write_all(&tap_frame(4000, 1)).unwrap();
    peer.write_all(&tap_frame(60, 2)).unwrap();
    let stats = QueueStats::default();

    run_batch(&mem, &mut q, &stats, &tap, MRG_1500);

    let used: Vec<Used> = std::iter::from_fn(|| r.pop_used(&mem)).collect();
    assert_eq!(
        used.len(),
        1,
        "only the frame within the MTU arrived: {used:?}"
    );
    assert_eq!(used[0].len, 72);
    assert_eq!(stats.bytes.get(), 60);
    assert_eq!(stats.rx_dropped_oversize_frames.get(), 1);
}

/// A tap frame whose header carries `gso_type`.
fn tap_frame_gso(payload_len: usize, gso_type: u8) -> Vec<u8> {
    let mut f = tap_frame(payload_len, 4);
    f[1] = gso_type;
    f
}

#[test]
fn frame_without_gso_above_the_mtu_is_dropped_while_a_gso_frame_of_that_size_arrives() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 64, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 40, 4096);
    peer.write_all(&tap_frame_gso(4000, 0)).unwrap(); // GSO_NONE
    peer.write_all(&tap_frame_gso(4000, 0x80)).unwrap(); // ECN alone: no GSO
    peer.write_all(&tap_frame_gso(4000, 1)).unwrap(); // GSO_TCPV4
    let stats = QueueStats::default();
    let told_1500 = RxParams {
        max_plain_frame: 12 + 1518,
        ..MRG_64K
    };

    run_batch(&mem, &mut q, &stats, &tap, told_1500);

    let used: Vec<Used> = std::iter::from_fn(|| r.pop_used(&mem)).collect();
    assert_eq!(
        used,
        vec![Used { head: 0, len: 4012 }],
        "only the GSO frame"
    );
    assert_eq!(stats.rx_dropped_oversize_frames.get(), 2);
}

#[test]
fn frame_that_exactly_fills_a_buffer_is_delivered() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 1, 1000);
    peer.write_all(&tap_frame(988, 5)).unwrap();
    let stats = QueueStats::default();

    run_batch(&mem, &mut q, &stats, &tap, SMALL);

    assert_eq!(r.pop_used(&mem).map(|u| u.len), Some(1000));
    assert_eq!(stats.rx_dropped_frames.get(), 0);
}

// Bug 2: mergeable RX delivers by the frame's real size.

#[test]
fn small_frame_is_delivered_into_a_few_small_mergeable_buffers() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 256, true);
    let (tap, mut peer) = tap_pair();
    let heads = add_rx_buffers(&mem, &mut r, 4, 256);
    peer.write_all(&tap_frame(52, 7)).unwrap();
    let stats = QueueStats::default();

    run_batch(&mem, &mut q, &stats, &tap, MRG_64K);

    assert_eq!(
        r.pop_used(&mem),
        Some(Used {
            head: heads[0],
            len: 64
        })
    );
    assert_eq!(num_buffers(&mem, buf_addr(0, 256)), 1);
    assert_eq!(q.next_avail(), 1, "the other buffers stay available");
}

#[test]
fn small_frame_is_delivered_into_multi_descriptor_chains_short_of_the_largest_frame() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 256, true);
    let (tap, mut peer) = tap_pair();
    let head = r
        .add_chain(
            &mem,
            &[
                Buf {
                    addr: buf_addr(0, 128),
                    len: 16,
                    device_writes: true,
                },
                Buf {
                    addr: buf_addr(1, 128),
                    len: 128,
                    device_writes: true,
                },
            ],
        )
        .unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    peer.write_all(&tap_frame(100, 3)).unwrap();
    let stats = QueueStats::default();

    run_batch(&mem, &mut q, &stats, &tap, MRG_64K);

    assert_eq!(r.pop_used(&mem), Some(Used { head, len: 112 }));
    let tail: u8 = mem.read_obj(GuestAddress(buf_addr(1, 128).0 + 95)).unwrap();
    assert_eq!(tail, 3, "the frame continues in the second descriptor");
}

/// Frame bytes of `used` entries (buffers of one descriptor at `buf_addr(i, size)`
/// for head `i`), concatenated.
fn gather(mem: &crate::datapath::guest::GuestMem, used: &[Used], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for u in used {
        let mut part = vec![0u8; u.len as usize];
        mem.read_slice(&mut part, buf_addr(usize::from(u.head), size))
            .unwrap();
        out.extend(part);
    }
    out
}

/// A tap frame whose payload counts, so a cut or shifted copy shows.
fn counting_frame(payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend((0..payload_len).map(|i| u8::try_from(i % 251).unwrap()));
    f
}

#[test]
fn frame_larger_than_the_posted_buffers_waits_for_more_and_is_delivered_first_and_whole() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 256, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 4, 256);
    let big = counting_frame(1100);
    peer.write_all(&big).unwrap();
    peer.write_all(&tap_frame(60, 9)).unwrap();
    let stats = QueueStats::default();
    let mut bounce = Bounce::default();

    let end = run_batch_with(&mut bounce, &mem, &mut q, &stats, &tap, MRG_64K);

    assert_eq!(end, End::RingEmpty, "waits for the guest's buffers");
    assert_eq!(r.pop_used(&mem), None, "nothing delivered cut");
    assert_eq!(q.next_avail(), 0, "the buffers were given back");
    assert!(
        r.needs_kick(&mem, true, 4, 5),
        "the guest's refill kick is wanted"
    );

    // The guest refills: four more 256-byte buffers (slots 4..8).
    add_rx_buffers_at(&mem, &mut r, 4..8, 256);
    run_batch_with(&mut bounce, &mem, &mut q, &stats, &tap, MRG_64K);

    let used: Vec<Used> = std::iter::from_fn(|| r.pop_used(&mem)).collect();
    assert_eq!(
        used.len(),
        6,
        "5 buffers for 1112 bytes, then 1 for the small frame"
    );
    assert_eq!(num_buffers(&mem, buf_addr(0, 256)), 5);
    let mut got = gather(&mem, &used[..5], 256);
    got[10..12].copy_from_slice(&[0, 0]);
    assert_eq!(got, big, "delivered whole and byte-exact");
    assert_eq!(used[5].len, 72, "the next frame follows");
    assert_eq!(stats.frames.get(), 2);
    assert_eq!(stats.rx_dropped_frames.get(), 0);
}

#[test]
fn tap_is_not_read_while_a_frame_is_held_for_buffers() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 256, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 2, 256);
    peer.write_all(&counting_frame(600)).unwrap();
    peer.write_all(&tap_frame(60, 1)).unwrap();
    let stats = QueueStats::default();
    let mut bounce = Bounce::default();
    run_batch_with(&mut bounce, &mem, &mut q, &stats, &tap, MRG_64K);

    // A kick without new buffers (or any later batch) does not read on.
    let end = run_batch_with(&mut bounce, &mem, &mut q, &stats, &tap, MRG_64K);

    assert_eq!(end, End::RingEmpty);
    assert!(bounce.holds_frame());
    assert_eq!(r.pop_used(&mem), None);
    let mut buf = [0u8; 100];
    assert_eq!(
        std::io::Read::read(&mut &tap, &mut buf).unwrap(),
        72,
        "the next frame is still queued in the tap"
    );
}

#[test]
fn held_gso_frame_of_60k_is_delivered_once_the_guest_has_posted_enough() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 64, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 10, 4096);
    let big = counting_frame(60_000);
    peer.write_all(&big).unwrap();
    let stats = QueueStats::default();
    let mut bounce = Bounce::default();
    run_batch_with(&mut bounce, &mem, &mut q, &stats, &tap, MRG_64K);
    assert_eq!(r.pop_used(&mem), None, "40 KiB posted: the frame waits");

    add_rx_buffers_at(&mem, &mut r, 10..20, 4096);
    run_batch_with(&mut bounce, &mem, &mut q, &stats, &tap, MRG_64K);

    let used: Vec<Used> = std::iter::from_fn(|| r.pop_used(&mem)).collect();
    assert_eq!(used.len(), big.len().div_ceil(4096));
    assert_eq!(
        usize::from(num_buffers(&mem, buf_addr(0, 4096))),
        used.len()
    );
    let mut got = gather(&mem, &used, 4096);
    got[10..12].copy_from_slice(&[0, 0]);
    assert!(got == big, "delivered whole and byte-exact");
    assert_eq!(q.next_avail(), 15, "the other 5 buffers stay available");
}

#[test]
fn frame_longer_than_the_whole_ring_can_hold_is_dropped_not_held_forever() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 4, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 4, 256);
    peer.write_all(&counting_frame(1100)).unwrap();
    peer.write_all(&tap_frame(60, 1)).unwrap();
    let stats = QueueStats::default();
    let mut bounce = Bounce::default();

    run_batch_with(&mut bounce, &mem, &mut q, &stats, &tap, MRG_64K);

    assert!(!bounce.holds_frame());
    assert_eq!(stats.rx_dropped_frames.get(), 1);
    assert_eq!(
        r.pop_used(&mem).map(|u| u.len),
        Some(72),
        "the next frame got a buffer"
    );
}

#[test]
fn held_frame_is_dropped_and_counted_when_the_connection_goes_away() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 256, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 2, 256);
    peer.write_all(&counting_frame(600)).unwrap();
    let stats = QueueStats::default();
    let mut bounce = Bounce::default();
    run_batch_with(&mut bounce, &mem, &mut q, &stats, &tap, MRG_64K);
    assert!(bounce.holds_frame());

    bounce.drop_held(&stats);

    assert!(!bounce.holds_frame());
    assert_eq!(stats.rx_dropped_frames.get(), 1);
    assert_eq!(stats.frames.get(), 0);
}

// Bug 3: a legacy feature set has a 10-byte header.

#[test]
fn legacy_10_byte_header_leaves_the_frame_after_it_untouched() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let (tap, mut peer) = tap_pair();
    add_rx_buffers(&mem, &mut r, 2, 1528);
    let mut frame = vec![0u8; 10];
    frame.extend((0..60).map(|i| u8::try_from(i + 1).unwrap()));
    peer.write_all(&frame).unwrap();
    let stats = QueueStats::default();
    let legacy = RxParams {
        hdr_len: 10,
        max_frame: 10 + 1518,
        max_plain_frame: 10 + 1518,
        ..SMALL
    };

    run_batch(&mem, &mut q, &stats, &tap, legacy);

    assert_eq!(r.pop_used(&mem).map(|u| u.len), Some(70));
    let mut got = vec![0u8; 70];
    mem.read_slice(&mut got, buf_addr(0, 1528)).unwrap();
    assert_eq!(got, frame, "no num_buffers written into the frame");
    assert_eq!(stats.bytes.get(), 60);
}

#[test]
fn bad_chains_count_toward_the_budget_so_a_guest_cannot_hold_the_worker() {
    // 200 chains the device may not write into (wrong direction): each is
    // returned with length 0, but one batch may not take more than its
    // budget of them, or a guest re-posting bad chains would keep the
    // worker (and the locks it holds) in one batch for ever.
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 256, true);
    for i in 0..200 {
        let b = Buf {
            addr: buf_addr(i, 2048),
            len: 2048,
            device_writes: false,
        };
        let head = r.add_chain(&mem, &[b]).unwrap();
        r.push_avail(&mem, head);
    }
    r.publish(&mem);
    let (tap, _peer) = tap_pair();
    let stats = QueueStats::default();
    let mut buf = IoVecBuf::default();
    let mut iovecs = buf.bind(&mem);
    let mut chains = Vec::new();
    let mut bounce = Bounce::default();
    let mut buffers = RxBuffers {
        chains: &mut chains,
        iovecs: &mut iovecs,
        bounce: &mut bounce,
    };
    let mut batch = Batch::begin(&mut q, &mem, &stats, 0).unwrap();

    let end = batch
        .drain(64, |b| step(b, &mut buffers, &tap, SMALL))
        .unwrap();

    assert_eq!(end, End::BudgetSpent);
    // A batch adds its counts to the counters when it ends.
    drop(batch);
    assert_eq!(stats.bad_chains.get(), 64);
}
