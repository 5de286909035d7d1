//! Property tests over guest-controlled input: random descriptor tables and
//! avail rings (addresses inside, between, across and beyond two memory
//! regions; any flags; any next index) run through the real TX and RX steps.
//!
//! Properties: the daemon never panics; every avail entry is completed
//! exactly once (a TX chain is never leaked or completed twice); a bogus
//! avail index is an error, not a crash; and on RX the device writes only
//! into writable buffers of chains the guest made available (the device
//! owns those until it returns them), and into the used ring.

use std::io::Write as _;
use std::os::fd::AsFd;

use proptest::prelude::*;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::datapath::batch::Batch;
use crate::datapath::guest::{GuestMem, IoVecBuf};
use crate::datapath::notify::{Coalescer, Policy};
use crate::datapath::rx::{self, Bounce, RxBuffers, RxChain, RxParams};
use crate::stats::QueueStats;
use crate::testing::driver::{Desc, SplitRing, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::testing::unit::tap_pair;

const SIZE: u16 = 16;
const R1: (u64, usize) = (0x1_0000, 0x4_0000);
const R2: (u64, usize) = (0x10_0000, 0x1_0000);
const RING_AT: u64 = 0x1_0000;
const SENTINEL: u8 = 0xa5;

fn memory() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(R1.0), R1.1), (GuestAddress(R2.0), R2.1)]).unwrap()
}

/// Addresses a hostile guest would pick.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        (R1.0 + 0x1000..R1.0 + R1.1 as u64).boxed(),
        (R2.0..R2.0 + R2.1 as u64).boxed(),
        (R1.0 + R1.1 as u64..R2.0).boxed(), // the gap
        (R2.0 + R2.1 as u64 - 64..R2.0 + R2.1 as u64).boxed(), // straddles the end
        (R1.0..R1.0 + 0x400).boxed(),       // the ring itself
        any::<u64>().boxed(),
    ]
}

fn desc() -> impl Strategy<Value = Desc> {
    (
        addr(),
        prop_oneof![0u32..2048, any::<u32>()],
        0u16..8,
        0u16..20,
    )
        .prop_map(|(addr, len, f, next)| Desc {
            addr,
            len,
            flags: f & (DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT),
            next,
        })
}

/// A descriptor table, the avail entries, and whether to publish a bogus
/// avail index instead of their count.
fn ring_input() -> impl Strategy<Value = (Vec<Desc>, Vec<u16>, bool)> {
    (
        prop::collection::vec(desc(), usize::from(SIZE)),
        prop::collection::vec(0u16..20, 0..=usize::from(SIZE)),
        prop::bool::weighted(0.05),
    )
}

/// Writes the guest's side of the ring; returns the device's queue.
fn setup(mem: &GuestMem, descs: &[Desc], heads: &[u16], bogus: bool) -> (SplitRing, Queue) {
    let mut r = SplitRing::new(mem, GuestAddress(RING_AT), SIZE);
    for (i, d) in descs.iter().enumerate() {
        r.write_desc(mem, u16::try_from(i).unwrap(), *d);
    }
    for &h in heads {
        r.push_avail(mem, h);
    }
    if bogus {
        r.force_avail_idx(mem, u16::try_from(heads.len()).unwrap() + SIZE + 1);
    } else {
        r.publish(mem);
    }
    let q = crate::testing::unit::device_queue(&r, true);
    (r, q)
}

/// One TX batch over a ring the guest made of `descs` and `heads` (its
/// avail index impossible if `bogus`), with one `writev` per frame or
/// through an io_uring: every avail entry is completed exactly once, in
/// order (the ones a full tap left given back).
fn tx_completes_each_entry_once(
    descs: &[Desc],
    heads: &[u16],
    bogus: bool,
    uring: bool,
) -> Result<(), TestCaseError> {
    let mem = memory();
    let (mut r, mut q) = setup(&mem, descs, heads, bogus);
    let (tap, _peer) = tap_pair();
    let stats = QueueStats::default();
    let mut iov = IoVecBuf::with_capacity(crate::datapath::guest::IOV_MAX);
    let mut ring = uring.then(|| {
        crate::datapath::tx::TxUring::new(
            crate::host::sys::Uring::new(tap.as_fd()).expect("io_uring"),
        )
    });
    let mut batch = Batch::begin(&mut q, &mem, &stats, 1).unwrap();
    let result = crate::datapath::tx::drain(
        &mut batch,
        u64::MAX,
        &mut iov,
        ring.as_mut(),
        Some(&tap),
        12,
    );
    batch
        .finish(&mut Coalescer::new(Policy::Immediate))
        .unwrap();
    if bogus {
        prop_assert!(result.is_err());
    } else {
        let end = result.unwrap();
        let used: Vec<u16> = std::iter::from_fn(|| r.pop_used(&mem))
            .map(|u| u.head)
            .collect();
        if end == crate::datapath::batch::End::TapBlocked {
            // The tap stand-in filled up: the rest waits in the ring.
            prop_assert!(heads.starts_with(&used));
        } else {
            prop_assert_eq!(used, heads);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn every_tx_avail_entry_is_completed_exactly_once((descs, heads, bogus) in ring_input()) {
        tx_completes_each_entry_once(&descs, &heads, bogus, false)?;
    }

    #[test]
    fn every_tx_avail_entry_is_completed_exactly_once_through_io_uring(
        (descs, heads, bogus) in ring_input()
    ) {
        tx_completes_each_entry_once(&descs, &heads, bogus, true)?;
    }

    #[test]
    fn rx_writes_only_into_writable_buffers_the_guest_made_available(
        (descs, heads, _) in ring_input(),
        mergeable in any::<bool>(),
        frames in prop::collection::vec(12usize..3000, 1..4),
        uring in any::<bool>(),
        posted in any::<bool>(),
    ) {
        let mem = std::sync::Arc::new(memory());
        let fill = |base: u64, len: usize| mem.write_slice(&vec![SENTINEL; len], GuestAddress(base)).unwrap();
        fill(R1.0, R1.1);
        fill(R2.0, R2.1);
        let (mut r, mut q) = setup(&mem, &descs, &heads, false);
        let before = snapshot(&mem);
        let (tap, mut peer) = tap_pair();
        for len in &frames {
            peer.write_all(&vec![0x11; *len]).unwrap();
        }
        let stats = QueueStats::default();
        let mut buf = IoVecBuf::default();
        let mut iovecs = buf.bind(&mem);
        let mut chains: Vec<RxChain> = Vec::new();
        let mut bounce = Bounce::default();
        let mut buffers = RxBuffers { chains: &mut chains, iovecs: &mut iovecs, bounce: &mut bounce };
        let params = RxParams { hdr_len: 12, mergeable, max_frame: 3000, max_plain_frame: 3000 };
        let mut batch = Batch::begin(&mut q, &mem, &stats, 0).unwrap();
        // A guest whose buffers overlap its own ring can corrupt it through
        // our writes; the daemon must then report it, not crash.
        // Through an io_uring, chains that are one buffer holding a whole
        // frame are posted (`posted`), chains that hold one are read a
        // round at a time (rx::step_batched); the others frame by frame.
        let mut ring = uring.then(|| crate::host::sys::Uring::new(tap.as_fd()).expect("io_uring"));
        let mut st = rx::RxUring::new(
            posted.then(|| crate::datapath::guest::PostedReads::new(&tap).expect("posted reads")),
        );
        let result = match ring.as_mut() {
            Some(ring) => batch.drain(u64::MAX, |b| {
                rx::step_batched(b, &mut st, ring, &mut buffers, &mem, &tap, params)
            }),
            None => batch.drain(u64::MAX, |b| rx::step(b, &mut buffers, &tap, params)),
        };
        if let Err(e) = result {
            prop_assert!(matches!(e, crate::datapath::batch::RingError::BadAvailIndex(_)), "{e}");
        }
        buffers.give_back(&mut batch);
        // Reads still posted end; their chains go back (frames dropped).
        let (posted_chains, _) = st.unpost();
        batch.give_back(posted_chains);
        batch.finish(&mut Coalescer::new(Policy::Immediate)).unwrap();
        drop(iovecs);

        // Where the device may have written: writable buffers of the
        // available chains, as they were before the run, and the used ring.
        let mut allowed: Vec<(u64, u64)> = vec![(r.used_addr().0, r.used_addr().0 + 6 + 8 * u64::from(SIZE))];
        for &h in &heads {
            writable_ranges(&before, r.desc_addr().0, SIZE, h, true, &mut allowed);
        }
        let ring = (RING_AT, RING_AT + SplitRing::footprint(SIZE));
        let sabotaged = allowed[1..].iter().any(|&(s, e)| s < ring.1 && ring.0 < e);
        if !sabotaged {
            let used: Vec<_> = std::iter::from_fn(|| r.pop_used(&mem)).collect();
            prop_assert!(used.len() <= heads.len());
            for u in &used {
                prop_assert!(heads.contains(&u.head), "used head {} was never available", u.head);
            }
        }
        for (base, len) in [R1, R2] {
            let mut now = vec![0u8; len];
            mem.read_slice(&mut now, GuestAddress(base)).unwrap();
            for (off, b) in now.iter().enumerate() {
                let a = base + off as u64;
                let in_ring_setup = (RING_AT..RING_AT + SplitRing::footprint(SIZE)).contains(&a);
                if *b != SENTINEL && !in_ring_setup {
                    prop_assert!(
                        allowed.iter().any(|(s, e)| (*s..*e).contains(&a)),
                        "device wrote {:#x}, outside every completed writable buffer", a
                    );
                }
            }
        }
    }
}

/// A copy of guest memory.
fn snapshot(mem: &GuestMem) -> GuestMem {
    let copy = memory();
    for (base, len) in [R1, R2] {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(base)).unwrap();
        copy.write_slice(&buf, GuestAddress(base)).unwrap();
    }
    copy
}

/// Adds the writable buffers of the chain at `head` of the table at
/// `table` (`size` entries) to `out`, following NEXT and, from the main
/// table, one level of INDIRECT, as the device does.
fn writable_ranges(
    mem: &GuestMem,
    table: u64,
    size: u16,
    head: u16,
    main: bool,
    out: &mut Vec<(u64, u64)>,
) {
    let mut i = head;
    for _ in 0..size {
        if i >= size {
            return;
        }
        let Ok(raw) = mem.read_obj::<[u8; 16]>(GuestAddress(table + 16 * u64::from(i))) else {
            return;
        };
        let addr = u64::from_le_bytes(raw[..8].try_into().unwrap());
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap());
        let flags = u16::from_le_bytes(raw[12..14].try_into().unwrap());
        let next = u16::from_le_bytes(raw[14..16].try_into().unwrap());
        if flags & DESC_F_INDIRECT != 0 {
            if main {
                let entries = u16::try_from(len / 16).unwrap_or(u16::MAX);
                writable_ranges(mem, addr, entries, 0, false, out);
            }
            return;
        }
        if flags & DESC_F_WRITE != 0 {
            out.push((addr, addr.saturating_add(u64::from(len))));
        }
        if flags & DESC_F_NEXT == 0 {
            return;
        }
        i = next;
    }
}
