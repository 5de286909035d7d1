//! How one frame moves from the guest to the tap.
//!
//! The guest's chain (virtio-net header + frame, exactly as the guest wrote
//! it) becomes one `writev` straight from guest memory; the tap, set to the
//! same header length, takes the header as it is, so checksum and
//! segmentation offloads cost nothing here. Before the `writev`, the start
//! of the next chain's buffer is prefetched
//! ([`crate::datapath::batch::Ring::prefetch_next`]). The loop around this
//! step is [`crate::datapath::batch::Batch::drain`].
//!
//! With `--tap-io uring` ([`drain`] with a [`TxUring`]) the step queues
//! the `writev` on the pair's io_uring instead of making it
//! (`step_queued`); the batch submits them all with one `io_uring_enter`
//! and waits for every one before [`crate::datapath::batch::Batch::finish`]
//! publishes the used entries, so those still follow the data, once per
//! batch. The kernel makes the writes one after the other, in order. When
//! the tap refuses one with EAGAIN (its queue is full) and every one after
//! it too, the batch ends with [`Step::TapBlocked`] giving those chains
//! back in order, as with `writev`. If the tap took a later one all the
//! same (it freed room in between: a race the kernel decided), the order
//! is lost already: the refused frame is written again at once, and
//! dropped and counted (`tap_errors_total`, plus a second
//! `tap_eagain_total`) if the tap refuses it again. The requests are not
//! linked (`IOSQE_IO_LINK`), which would keep the order in that race too:
//! each linked write waits for a task-work round trip, and TX 64 B fell
//! to 0.56x of `writev` (docs/performance.md). Any other write error is
//! counted as a `writev`'s is. Chains the guest got wrong are completed
//! with length 0 and counted in their place among the writes.

use std::fs::File;
use std::io;

use crate::datapath::batch::{Batch, Completer, End, Ring, RingError, Step};
use crate::datapath::guest::{Access, ChainError, IoVecBuf, TapWriter, WriterBufs};
use crate::host::sys::Uring;
use crate::VNET_HDR_LEN;

/// Largest chain accepted: header plus a 64 KiB GSO frame with an Ethernet
/// and VLAN header (the largest frame a tap accepts).
pub const MAX_TX_CHAIN: usize = VNET_HDR_LEN + 65535 + 18;

/// Moves one frame from the TX ring to `tap`; the guest's header is
/// `hdr_len` bytes long (the negotiated length, see [`crate::vnet_hdr_len`]).
/// Without a tap (its interface is gone) the frame is dropped, counted in
/// `tap_errors_total`, and its chain completed: the guest's ring keeps
/// moving, without a syscall per frame.
pub fn step(
    batch: &mut Ring<'_, '_>,
    iov: &mut IoVecBuf,
    tap: Option<&File>,
    hdr_len: usize,
) -> Result<Step, RingError> {
    let Some(chain) = batch.pop() else {
        return Ok(Step::RingEmpty);
    };
    let head = chain.head_index();
    let mut iovecs = iov.bind(batch.mem());
    let len = match iovecs.push_chain(chain, Access::DeviceReads, MAX_TX_CHAIN) {
        Ok(len) if len < hdr_len => {
            let e = ChainError::TooShort { min: hdr_len };
            batch.complete_bad(head, &e)?;
            return Ok(Step::Progress);
        }
        Ok(len) => len,
        Err(e) => {
            batch.complete_bad(head, &e)?;
            return Ok(Step::Progress);
        }
    };
    let stats = batch.stats();
    let Some(tap) = tap else {
        drop(iovecs);
        stats.tap_errors.inc();
        batch.complete(head, 0)?;
        return Ok(Step::Progress);
    };
    batch.prefetch_next();
    match iovecs.write_to(tap) {
        Ok(_) => {
            drop(iovecs);
            batch.complete(head, 0)?;
            batch.count_frame(len - hdr_len);
            Ok(Step::Progress)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            stats.tap_eagain.inc();
            batch.give_back(1);
            Ok(Step::TapBlocked)
        }
        Err(e) => {
            // The tap is down (EIO) or gone (EBADFD), the frame is malformed
            // for the kernel (EINVAL), or similar: drop this frame, keep the
            // queue moving (nothing piles up in the guest's ring).
            drop(iovecs);
            stats.tap_errors.inc();
            log::debug!("TX tap write failed: {e}");
            batch.complete(head, 0)?;
            Ok(if crate::host::tap::is_gone(&e) {
                Step::TapGone
            } else {
                Step::Progress
            })
        }
    }
}

/// A queue pair's io_uring for TX, and what its batches keep between
/// them.
pub struct TxUring {
    ring: Uring,
    bufs: WriterBufs,
    queued: Queued,
}

/// The chains a batch popped since its last flush, in order.
#[derive(Default)]
struct Queued {
    entries: Vec<Entry>,
    /// The ring failed (an `io_uring_enter` error): the pair goes back to
    /// plain syscalls.
    failed: bool,
}

/// One popped chain waiting for the flush.
enum Entry {
    /// Write number `n` of the flush, a frame of `bytes` bytes (header
    /// excluded).
    Write { head: u16, bytes: usize, n: usize },
    /// A chain the guest got wrong: completed with length 0 and counted,
    /// in its place.
    Bad { head: u16, why: ChainError },
}

impl TxUring {
    pub fn new(ring: Uring) -> Self {
        TxUring {
            ring,
            bufs: WriterBufs::default(),
            queued: Queued::default(),
        }
    }

    /// The ring, for RX's reads between TX's batches.
    pub fn ring_mut(&mut self) -> &mut Uring {
        &mut self.ring
    }

    /// Whether the ring failed in the last batch (then the pair drops it
    /// and uses plain syscalls).
    pub fn failed(&self) -> bool {
        self.queued.failed
    }
}

/// Runs a TX batch's drain loop: with `uring` (and a tap), frames are
/// queued and written with one `io_uring_enter` before it returns;
/// otherwise one `writev` per frame ([`step`]).
pub fn drain(
    batch: &mut Batch<'_>,
    budget: u64,
    iov: &mut IoVecBuf,
    uring: Option<&mut TxUring>,
    tap: Option<&File>,
    hdr_len: usize,
) -> Result<End, RingError> {
    let (Some(u), Some(tap)) = (uring, tap) else {
        return batch.drain(budget, |b| step(b, iov, tap, hdr_len));
    };
    let mut w = TapWriter::new(iov, &mut u.bufs, batch.mem(), &mut u.ring, tap);
    let queued = &mut u.queued;
    queued.entries.clear();
    let end = batch.drain(budget, |b| step_queued(b, &mut w, queued, hdr_len))?;
    Ok(match settle(batch, &mut w, queued)? {
        Some(Step::TapBlocked) => End::TapBlocked,
        Some(Step::TapGone) => End::TapGone,
        _ => end,
    })
}

/// Queues one frame from the TX ring as a write on the pair's io_uring
/// (flushing first when the ring or the iovec storage is full).
fn step_queued(
    batch: &mut Ring<'_, '_>,
    w: &mut TapWriter<'_, '_>,
    queued: &mut Queued,
    hdr_len: usize,
) -> Result<Step, RingError> {
    if !w.has_room() {
        if let Some(step) = settle(batch, w, queued)? {
            return Ok(step);
        }
    }
    let Some(chain) = batch.pop() else {
        return Ok(Step::RingEmpty);
    };
    let head = chain.head_index();
    match w.push_chain(chain, MAX_TX_CHAIN) {
        Ok(len) if len < hdr_len => {
            w.discard_unqueued();
            let why = ChainError::TooShort { min: hdr_len };
            queued.entries.push(Entry::Bad { head, why });
        }
        Ok(len) => {
            let n = w.queue();
            queued.entries.push(Entry::Write {
                head,
                bytes: len - hdr_len,
                n,
            });
        }
        Err(ChainError::TooManySegments) if w.pending() > 0 => {
            // It fits alone: write what is queued, then take it again.
            batch.give_back(1);
            if let Some(step) = settle(batch, w, queued)? {
                return Ok(step);
            }
            return step_queued(batch, w, queued, hdr_len);
        }
        Err(why) => queued.entries.push(Entry::Bad { head, why }),
    }
    Ok(Step::Progress)
}

/// Writes the queued frames (one `io_uring_enter`, waiting for all) and
/// completes their chains in order. `Some(TapBlocked)`: the tap was full,
/// the unsent chains were given back; `Some(TapGone)`: the tap's
/// interface is gone; the chains after that frame are completed too and
/// counted in `tap_errors_total` (their writes were made and failed).
fn settle<'q>(
    c: &mut impl Completer<'q>,
    w: &mut TapWriter<'_, '_>,
    queued: &mut Queued,
) -> Result<Option<Step>, RingError> {
    if queued.entries.is_empty() {
        return Ok(None);
    }
    // After a write error (or a failed ring) the writes still to make are
    // made one `writev` each, as without the ring.
    let mut one_by_one = false;
    if let Err(e) = w.flush() {
        log::error!("TX io_uring failed, going back to writev: {e}");
        queued.failed = true;
        one_by_one = true;
    }
    let stats = c.stats();
    let (tap_eagain, tap_errors) = (&stats.tap_eagain, &stats.tap_errors);
    let write_now = |n: usize| match w.write_now(n) {
        Ok(k) => i32::try_from(k).unwrap_or(i32::MAX),
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    };
    let entries = &queued.entries;
    // A write the failed ring took and did not report may be on the wire.
    let sent = |e: &Entry| matches!(*e, Entry::Write { n, .. } if w.results()[n] >= 0 || w.results()[n] == -libc::EINPROGRESS);
    let mut end = None;
    let mut settled = 0;
    for (i, entry) in entries.iter().enumerate() {
        let (head, bytes, n) = match *entry {
            Entry::Bad { head, ref why } => {
                c.complete_bad(head, why)?;
                settled += 1;
                continue;
            }
            Entry::Write { head, bytes, n } => (head, bytes, n),
        };
        let mut result = w.results()[n];
        if one_by_one && result == -libc::ECANCELED {
            result = write_now(n);
        }
        if result == -libc::EOPNOTSUPP && !queued.failed {
            // The file cannot take a non-blocking write from a ring (a
            // tap before Linux 6.4): writev from now on.
            log::warn!("the tap refuses io_uring writes: going back to writev");
            queued.failed = true;
            one_by_one = true;
        }
        if one_by_one && result == -libc::EOPNOTSUPP {
            result = write_now(n);
        }
        if result == -libc::EAGAIN {
            tap_eagain.inc();
            if !entries[i + 1..].iter().any(sent) {
                // The tap is full: this chain and the ones after it go
                // back to the ring, in order, for when it has room.
                end = Some(Step::TapBlocked);
                break;
            }
            // The tap took a later frame (it freed room meanwhile): the
            // order is lost already; this one goes now or never.
            result = write_now(n);
            if result == -libc::EAGAIN {
                tap_eagain.inc();
                result = -libc::ENOBUFS;
            }
        }
        if result == -libc::EINPROGRESS {
            // The ring failed after the kernel took this write and before
            // it said how it went: it may be on the wire. Counted as lost
            // rather than made again (which could send it twice).
            log::warn!("TX io_uring failed with a write unreported: counted as a tap error");
        }
        if result >= 0 {
            c.complete(head, 0)?;
            c.count_frame(bytes);
        } else {
            let e = io::Error::from_raw_os_error(-result);
            tap_errors.inc();
            log::debug!("TX tap write failed: {e}");
            c.complete(head, 0)?;
            if crate::host::tap::is_gone(&e) {
                end = Some(Step::TapGone);
            }
        }
        settled += 1;
    }
    c.give_back(queued.entries.len() - settled);
    queued.entries.clear();
    w.clear();
    Ok(end)
}

#[cfg(test)]
mod tests;
