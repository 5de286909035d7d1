//! Fuzzes the guest-controlled inputs of the data path: the descriptor
//! table, the avail ring and the bytes of the buffers (virtio-net header +
//! frame), through the real TX and RX steps (with plain syscalls and
//! through an io_uring: TX batches, RX rounds and RX reads posted ahead)
//! over guest memory with two
//! regions and a gap. Checks: no panic; without a bogus avail index, every
//! TX avail entry is completed exactly once, in order (a prefix of them when
//! the tap stand-in fills up); RX fails only by reporting a bogus avail
//! index (a guest that corrupts its own ring).
//!
//! `cargo +nightly fuzz run rings` (from the repository root).

#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use libfuzzer_sys::fuzz_target;
use vhost_user_net::datapath::batch::{Batch, End, RingError};
use vhost_user_net::datapath::guest::{GuestMem, IoVecBuf, PostedReads};
use vhost_user_net::datapath::notify::{Coalescer, Policy};
use vhost_user_net::datapath::rx::{self, Bounce, RxBuffers, RxChain, RxParams};
use vhost_user_net::datapath::tx;
use vhost_user_net::host::sys::Uring;
use vhost_user_net::stats::QueueStats;
use vhost_user_net::testing::driver::{Desc, SplitRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const SIZE: u16 = 16;
const R1: (u64, usize) = (0x1_0000, 0x4_0000);
const R2: (u64, usize) = (0x10_0000, 0x1_0000);
const RING: u64 = 0x1_0000;
const SPAN: u64 = 0x12_0000 - 0x1_0000;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (a, b) = data.split_at(n);
    *data = b;
    a
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut x = [0u8; 8];
    for (j, v) in b.iter().skip(i).take(8).enumerate() {
        x[j] = *v;
    }
    u64::from_le_bytes(x)
}

fn tap_pair() -> (File, File) {
    let (a, b) = UnixDatagram::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    (File::from(OwnedFd::from(a)), File::from(OwnedFd::from(b)))
}

fn queue(r: &SplitRing) -> Queue {
    let mut q = Queue::new(SIZE).expect("queue");
    q.set_size(SIZE);
    q.try_set_desc_table_address(r.desc_addr()).expect("addr");
    q.try_set_avail_ring_address(r.avail_addr()).expect("addr");
    q.try_set_used_ring_address(r.used_addr()).expect("addr");
    q.set_event_idx(true);
    q.set_ready(true);
    q
}

/// Lays the fuzzer's bytes out as a ring; returns the ring, its queue, the
/// avail heads and whether the avail index was made bogus.
fn build(mem: &GuestMem, data: &mut &[u8]) -> (SplitRing, Queue, Vec<u16>, bool) {
    let mut r = SplitRing::new(mem, GuestAddress(RING), SIZE);
    let table = take(data, 16 * usize::from(SIZE));
    for i in 0..SIZE {
        let o = 16 * usize::from(i);
        let raw = u64_at(table, o);
        // Mostly plausible addresses (in or near guest memory), some wild.
        let addr = if raw >> 63 == 0 {
            R1.0 + raw % SPAN
        } else {
            raw
        };
        let len = u32::try_from(u64_at(table, o + 8) & 0xffff_ffff).unwrap_or(0) % 70_000;
        let flags = u16::try_from(u64_at(table, o + 12) & 0x7).unwrap_or(0);
        let next = u16::try_from(u64_at(table, o + 14) & 0x1f).unwrap_or(0);
        r.write_desc(
            mem,
            i,
            Desc {
                addr,
                len,
                flags,
                next,
            },
        );
    }
    let hdr = take(data, 1 + usize::from(SIZE));
    let count = usize::from(hdr.first().copied().unwrap_or(0) % (SIZE as u8 + 1));
    let bogus = hdr.first().copied().unwrap_or(0) >= 0xf8;
    let heads: Vec<u16> = hdr
        .iter()
        .skip(1)
        .take(count)
        .map(|h| u16::from(*h % 20))
        .collect();
    for &h in &heads {
        r.push_avail(mem, h);
    }
    if bogus {
        r.force_avail_idx(mem, u16::try_from(heads.len()).unwrap_or(0) + SIZE + 1);
    } else {
        r.publish(mem);
    }
    // The rest fills the second region: headers and frames the guest wrote.
    let rest = take(data, R2.1);
    mem.write_slice(rest, GuestAddress(R2.0))
        .expect("in memory");
    let q = queue(&r);
    (r, q, heads, bogus)
}

fuzz_target!(|input: &[u8]| {
    let mem: GuestMem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(R1.0), R1.1), (GuestAddress(R2.0), R2.1)])
            .expect("memory");
    let mergeable = input.first().is_some_and(|b| b & 1 == 1);

    // TX, with one writev per frame, then through an io_uring, each on a
    // fresh ring from the same bytes.
    for uring in [false, true] {
        let mut data = &input[input.len().min(1)..];
        let (mut r, mut q, heads, bogus) = build(&mem, &mut data);
        let (tap, _peer) = tap_pair();
        let stats = QueueStats::default();
        let mut iov = IoVecBuf::with_capacity(1024);
        let mut ring = uring.then(|| tx::TxUring::new(Uring::new(tap.as_fd()).expect("io_uring")));
        let mut batch = Batch::begin(&mut q, &mem, &stats, 1).expect("ring in memory");
        let result = tx::drain(
            &mut batch,
            u64::MAX,
            &mut iov,
            ring.as_mut(),
            Some(&tap),
            12,
        );
        batch
            .finish(&mut Coalescer::new(Policy::Immediate))
            .expect("used ring in memory");
        match result {
            Err(RingError::BadAvailIndex(_)) => assert!(bogus),
            Err(e) => panic!("unexpected TX error {e}"),
            Ok(end) => {
                assert!(!bogus);
                let used: Vec<u16> = std::iter::from_fn(|| r.pop_used(&mem))
                    .map(|u| u.head)
                    .collect();
                if end == End::TapBlocked {
                    // The tap (here a socket nobody reads) is full: the rest
                    // waits in the ring for "tap writable", none is lost.
                    assert!(heads.starts_with(&used), "completed out of order");
                } else {
                    assert_eq!(used, heads, "every avail entry completed exactly once");
                }
            }
        }
    }

    // RX, frame by frame, then in io_uring rounds, then through reads
    // posted ahead, each on a fresh ring from the same bytes.
    let mem = std::sync::Arc::new(mem);
    for mode in 0..3 {
        let mut data = input;
        let _ = take(&mut data, 1);
        let (_r, mut q, _heads, _bogus) = build(&mem, &mut data);
        let (tap, mut peer) = tap_pair();
        for len in input.iter().take(3).map(|b| 12 + usize::from(*b) * 7) {
            let _ = peer.write_all(&vec![0x5a; len]);
        }
        let stats = QueueStats::default();
        let mut buf = IoVecBuf::default();
        let mut iovecs = buf.bind(&mem);
        let mut chains: Vec<RxChain> = Vec::new();
        let mut bounce = Bounce::default();
        let mut buffers = RxBuffers {
            chains: &mut chains,
            iovecs: &mut iovecs,
            bounce: &mut bounce,
        };
        let params = RxParams {
            hdr_len: 12,
            mergeable,
            max_frame: 1800,
            max_plain_frame: 1800,
        };
        let posted = (mode == 2).then(|| PostedReads::new(&tap).expect("posted reads"));
        let mut ring = (mode > 0).then(|| {
            (
                rx::RxUring::new(posted),
                Uring::new(tap.as_fd()).expect("io_uring"),
            )
        });
        let Ok(mut batch) = Batch::begin(&mut q, &mem, &stats, 0) else {
            return;
        };
        let result = batch.drain(u64::MAX, |b| match ring.as_mut() {
            Some((st, ring)) => rx::step_batched(b, st, ring, &mut buffers, &mem, &tap, params),
            None => rx::step(b, &mut buffers, &tap, params),
        });
        if let Err(e) = result {
            assert!(
                matches!(e, RingError::BadAvailIndex(_)),
                "unexpected RX error {e}"
            );
        }
        buffers.give_back(&mut batch);
        if let Some((st, _)) = ring.as_mut() {
            // Reads still posted end; their chains go back.
            batch.give_back(st.unpost().0);
        }
        let _ = batch.finish(&mut Coalescer::new(Policy::Immediate));
    }
});
