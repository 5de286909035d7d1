//! One batch on one virtqueue: the drain loop shared by RX and TX.
//!
//! A [`Batch`] pops chains, writes used entries without publishing them,
//! re-arms guest kicks (with the event-index re-check) when the ring looks
//! empty, and at the end publishes the used index once and makes the one
//! notification decision ([`crate::datapath::notify`]). RX and TX supply only the
//! per-frame step; neither has its own loop.
//!
//! We write the used ring ourselves instead of using virtio-queue's
//! `add_used`, which publishes `used.idx` after every entry: a Linux guest
//! reading a mergeable RX frame could then see its first buffer before the
//! rest and drop the frame ("buffers missing"). Publishing once per batch is
//! also cheaper for the guest's cache.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::time::Instant;

use virtio_queue::{AvailIter, DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::datapath::guest::GuestMem;
use crate::datapath::notify::{self, Coalescer, Verdict};
use crate::stats::QueueStats;

/// Offset of `ring[0]` in the used ring (after `flags` and `idx`).
const USED_RING_HEADER: u64 = 4;
/// Size of one used element (`id`, `len`).
const USED_ELEM_SIZE: u64 = 8;

/// Errors that stop a queue until the frontend sets it up again. All are
/// guest faults: the daemon and the other queues go on.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("guest published an impossible avail index")]
    BadAvailIndex(#[source] virtio_queue::Error),
    #[error("cannot access the guest's ring")]
    RingAccess(#[source] virtio_queue::Error),
    #[error("cannot write the used ring at {0:#x}")]
    UsedRing(u64),
}

/// What the per-frame step reports back to the drain loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// One frame (or bad chain) handled; go on.
    Progress,
    /// The guest's ring has no (or not enough) buffers.
    RingEmpty,
    /// The tap side cannot go on (TX: tap full; RX: tap empty).
    TapBlocked,
    /// The tap's interface is gone (the step counted it; TX dropped the
    /// frame and completed its chain).
    TapGone,
}

/// Why a batch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The ring is empty and guest kicks are re-armed.
    RingEmpty,
    /// The tap side is blocked; wait for the tap.
    TapBlocked,
    /// The budget is spent and work remains: come back soon.
    BudgetSpent,
    /// The tap's interface is gone; it will not come back by waiting.
    TapGone,
}

/// A batch in progress on one queue.
pub struct Batch<'q> {
    queue: &'q mut Queue,
    core: Core<'q>,
}

/// What a batch keeps besides the queue: the part the per-frame step
/// reaches through a [`Ring`] while the queue is lent to the avail ring's
/// iterator.
struct Core<'q> {
    mem: &'q GuestMem,
    stats: &'q QueueStats,
    /// The queue's size and used ring address, read once.
    size: u16,
    used_ring: u64,
    old_used: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// This batch's counts, added to `stats` once, before it publishes.
    tally: Tally,
    warned: bool,
    queue_index: usize,
    /// The frontend logs dirty pages (a migration in progress).
    logging: bool,
    /// Where the used ring is logged when that is not its own address
    /// (`VHOST_VRING_F_LOG` with another `log_guest_addr`).
    used_log: Option<GuestAddress>,
    /// Complete the batch with one used entry ([`Batch::in_order`]).
    in_order: bool,
    /// In that mode, the last chain completed (head, length): the one
    /// entry written.
    last: Option<(u16, u32)>,
}

/// The chains the guest had made available when the drain loop last read
/// the avail index, as the per-frame step sees them: it pops them and
/// completes them. Popping does not read the avail index again (the
/// frontend writes that cache line for every chain it adds); the drain
/// loop reads it once per pass.
pub struct Ring<'a, 'q> {
    avail: AvailIter<'a, &'q GuestMem>,
    core: &'a mut Core<'q>,
    /// Whether a chain was popped since the avail index was read: more may
    /// have come since.
    popped: bool,
    /// Steps the batch's budget has left, this one included.
    budget_left: u64,
}

impl<'q> Batch<'q> {
    /// Starts a batch. The used index is read back from guest memory (only
    /// the device writes it), so a queue restarted at any base stays in step.
    pub fn begin(
        queue: &'q mut Queue,
        mem: &'q GuestMem,
        stats: &'q QueueStats,
        queue_index: usize,
    ) -> Result<Self, RingError> {
        let used = queue
            .used_idx(mem, Ordering::Acquire)
            .map_err(RingError::RingAccess)?;
        // Without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY: a polling
        // driver makes no kick syscalls while we drain. With it, a no-op.
        queue
            .disable_notification(mem)
            .map_err(RingError::RingAccess)?;
        let (size, used_ring) = (queue.size(), queue.used_ring());
        Ok(Batch {
            queue,
            core: Core {
                mem,
                stats,
                size,
                used_ring,
                old_used: used,
                next_used: used,
                tally: Tally::default(),
                warned: false,
                queue_index,
                logging: crate::datapath::dirty::logging(mem),
                used_log: None,
                in_order: false,
                last: None,
            },
        })
    }

    /// Also logs the used ring's writes at `at` (the frontend's
    /// `log_guest_addr`), when it is not the ring's own address.
    pub fn log_used_at(&mut self, at: Option<GuestAddress>) {
        self.core.used_log = at.filter(|a| a.0 != self.core.used_ring);
    }

    /// With `VIRTIO_F_IN_ORDER` acked, completes the batch's chains with
    /// one used entry: the last chain's, written where the batch's first
    /// entry goes, and the used index moved past them all (the virtio
    /// spec's in-order use of a split ring: the driver takes every chain
    /// it made available up to that one as used). For chains whose
    /// lengths the driver does not need: TX, where all are 0.
    pub fn in_order(&mut self, on: bool) {
        self.core.in_order = on;
    }

    /// The guest memory this batch works on.
    pub fn mem(&self) -> &'q GuestMem {
        self.core.mem
    }

    /// Gives back the last `n` popped chains (RX buffers not used when the
    /// batch ends).
    pub fn give_back(&mut self, n: usize) {
        for _ in 0..n {
            self.queue.go_to_previous_position();
        }
    }

    /// Runs `step` until the ring is empty (and kicks are re-armed with no
    /// work raced in), the tap blocks, or `budget` frames were handled.
    /// The avail index is read once per pass over the chains it shows; a
    /// step that finds no more chains ([`Step::RingEmpty`]) after popping
    /// some gets a fresh pass, and only a pass that found nothing re-arms
    /// the guest's kicks.
    pub fn drain(
        &mut self,
        budget: u64,
        mut step: impl FnMut(&mut Ring<'_, 'q>) -> Result<Step, RingError>,
    ) -> Result<End, RingError> {
        let mem = self.core.mem;
        let mut handled = 0;
        loop {
            let avail = self.queue.iter(mem).map_err(|e| match e {
                virtio_queue::Error::InvalidAvailRingIndex => RingError::BadAvailIndex(e),
                other => RingError::RingAccess(other),
            })?;
            let mut ring = Ring {
                avail,
                core: &mut self.core,
                popped: false,
                budget_left: 0,
            };
            loop {
                if handled >= budget {
                    return Ok(End::BudgetSpent);
                }
                ring.budget_left = budget - handled;
                match step(&mut ring)? {
                    Step::Progress => handled += 1,
                    Step::TapBlocked => return Ok(End::TapBlocked),
                    Step::TapGone => return Ok(End::TapGone),
                    Step::RingEmpty => break,
                }
            }
            if ring.popped {
                // The guest may have added chains since the index was read.
                continue;
            }
            // Publish `avail_event` (or clear NO_NOTIFY) and look again: a
            // buffer added just before would get no kick.
            if !self.rearm()? {
                return Ok(End::RingEmpty);
            }
            self.queue
                .disable_notification(mem)
                .map_err(RingError::RingAccess)?;
        }
    }

    /// Re-enables guest kicks; `true` if work arrived meanwhile.
    fn rearm(&mut self) -> Result<bool, RingError> {
        self.queue
            .enable_notification(self.core.mem)
            .map_err(RingError::RingAccess)
    }

    /// Publishes the batch's used entries and makes the batch's one
    /// interrupt decision through the ring's `coalescer`.
    pub fn finish(mut self, coalescer: &mut Coalescer) -> Result<Verdict, RingError> {
        let core = &mut self.core;
        let completed = (core.next_used - core.old_used).0;
        // Counted before the guest can see the entries: whoever waits for
        // them finds the counters up to date.
        let frames = core.tally.frames;
        core.add_tally();
        if let Some((head, len)) = core.last.take() {
            let slot = core.old_used.0 % core.size;
            core.write_used(slot, head, len)?;
        }
        if completed > 0 {
            let idx_at = core.used_ring + 2;
            core.mem
                .store(
                    u16::to_le(core.next_used.0),
                    GuestAddress(idx_at),
                    Ordering::Release,
                )
                .map_err(|_| RingError::UsedRing(idx_at))?;
            self.queue.set_next_used(core.next_used.0);
            core.stats.record_batch(frames);
        }
        if let (true, Some(log)) = (core.logging, core.used_log) {
            core.log_used_elsewhere(log, completed);
        }
        let now = Instant::now();
        let verdict = coalescer.after_batch(
            now,
            completed,
            core.next_used.0,
            core.size,
            guest_wish(self.queue, core.mem),
        );
        // Every interrupt sent is counted, including a fresh start's with
        // nothing new; suppressed and deferred only for batches that
        // completed something.
        if completed > 0 || verdict == Verdict::Signal {
            count_verdict(core.stats, verdict);
        }
        Ok(verdict)
    }
}

impl<'q> Ring<'_, 'q> {
    /// The guest memory this batch works on.
    pub fn mem(&self) -> &'q GuestMem {
        self.core.mem
    }

    /// Whether writes that bypass vm-memory must be logged by hand
    /// ([`crate::datapath::guest::GuestIoVecs::mark_written`]).
    pub fn logging(&self) -> bool {
        self.core.logging
    }

    /// The queue's size (number of descriptors).
    pub fn size(&self) -> u16 {
        self.core.size
    }

    /// Counters of this queue.
    pub fn stats(&self) -> &'q QueueStats {
        self.core.stats
    }

    /// Pops the next chain of this pass. `None`: no more in this pass
    /// ([`Ring::may_have_more`] says whether a new pass may find some).
    pub fn pop(&mut self) -> Option<DescriptorChain<&'q GuestMem>> {
        let chain = self.avail.next();
        self.popped |= chain.is_some();
        chain
    }

    /// Steps (frames, or chains the guest got wrong) the batch's budget
    /// has left, this one included: a step that moves several frames at
    /// once moves no more.
    pub fn budget_left(&self) -> u64 {
        self.budget_left
    }

    /// Whether the guest may have added chains since this pass read the
    /// avail index (this pass popped some): a step that wants more than it
    /// found returns [`Step::RingEmpty`] and gets a fresh pass.
    pub fn may_have_more(&self) -> bool {
        self.popped
    }

    /// Prefetches the start of the next chain's first buffer without
    /// popping the chain: the next frame's bytes come into this core's
    /// cache while the current frame's syscall runs.
    pub fn prefetch_next(&mut self) {
        if let Some(mut chain) = self.avail.next() {
            if let Some(desc) = chain.next() {
                crate::datapath::guest::prefetch(self.core.mem, desc.addr(), desc.len());
            }
            self.avail.go_to_previous_position();
        }
    }

    /// Gives back the last `n` popped chains (a TX frame the tap had no
    /// room for, an RX chain that does not fit one `readv`).
    pub fn give_back(&mut self, n: usize) {
        for _ in 0..n {
            self.avail.go_to_previous_position();
        }
    }

    /// Writes a used entry for chain `head` with `len` bytes written to it.
    /// Not visible to the guest until [`Batch::finish`].
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        self.core.complete(head, len)
    }

    /// Completes a chain the guest got wrong with length 0, counts it, and
    /// warns once per batch.
    pub fn complete_bad(
        &mut self,
        head: u16,
        why: &dyn std::error::Error,
    ) -> Result<(), RingError> {
        self.core.complete_bad(head, why)
    }

    /// Counts one frame moved, of `bytes` bytes (header excluded).
    pub fn count_frame(&mut self, bytes: usize) {
        self.core.count_frame(bytes);
    }

    /// Counts one frame moved (as [`Ring::count_frame`]) that the kernel
    /// read into a buffer posted ahead.
    pub fn count_posted_frame(&mut self, bytes: usize) {
        self.core.count_frame(bytes);
        self.core.tally.posted_frames += 1;
    }
}

/// What a step that completes chains after the fact needs, from inside
/// the drain loop ([`Ring`]) or after it ([`Batch`]): TX through an
/// io_uring learns how its writes went only when it reaps them.
pub trait Completer<'q> {
    /// See [`Ring::complete`].
    fn complete(&mut self, head: u16, len: u32) -> Result<(), RingError>;
    /// See [`Ring::complete_bad`].
    fn complete_bad(&mut self, head: u16, why: &dyn std::error::Error) -> Result<(), RingError>;
    /// See [`Ring::count_frame`].
    fn count_frame(&mut self, bytes: usize);
    /// Gives back the last `n` popped chains.
    fn give_back(&mut self, n: usize);
    /// Counters of this queue.
    fn stats(&self) -> &'q QueueStats;
}

impl<'q> Completer<'q> for Ring<'_, 'q> {
    fn complete(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        Ring::complete(self, head, len)
    }
    fn complete_bad(&mut self, head: u16, why: &dyn std::error::Error) -> Result<(), RingError> {
        Ring::complete_bad(self, head, why)
    }
    fn count_frame(&mut self, bytes: usize) {
        Ring::count_frame(self, bytes);
    }
    fn give_back(&mut self, n: usize) {
        Ring::give_back(self, n);
    }
    fn stats(&self) -> &'q QueueStats {
        self.core.stats
    }
}

impl<'q> Completer<'q> for Batch<'q> {
    fn complete(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        self.core.complete(head, len)
    }
    fn complete_bad(&mut self, head: u16, why: &dyn std::error::Error) -> Result<(), RingError> {
        self.core.complete_bad(head, why)
    }
    fn count_frame(&mut self, bytes: usize) {
        self.core.count_frame(bytes);
    }
    fn give_back(&mut self, n: usize) {
        Batch::give_back(self, n);
    }
    fn stats(&self) -> &'q QueueStats {
        self.core.stats
    }
}

impl Core<'_> {
    fn complete_bad(&mut self, head: u16, why: &dyn std::error::Error) -> Result<(), RingError> {
        self.tally.bad_chains += 1;
        if !self.warned {
            self.warned = true;
            log::warn!(
                "queue {}: descriptor chain {head} returned unused: {why}",
                self.queue_index
            );
        }
        self.complete(head, 0)
    }

    fn count_frame(&mut self, bytes: usize) {
        self.tally.frames += 1;
        self.tally.bytes += bytes as u64;
    }

    fn complete(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        if self.in_order {
            self.last = Some((head, len));
        } else {
            self.write_used(self.next_used.0 % self.size, head, len)?;
        }
        self.next_used += Wrapping(1);
        self.tally.completions += 1;
        Ok(())
    }

    /// Writes used entry `slot` (not published).
    fn write_used(&self, slot: u16, head: u16, len: u32) -> Result<(), RingError> {
        let at = self.used_ring + USED_RING_HEADER + u64::from(slot) * USED_ELEM_SIZE;
        let elem = (u64::from(len) << 32) | u64::from(head);
        self.mem
            .write_obj(u64::to_le(elem), GuestAddress(at))
            .map_err(|_| RingError::UsedRing(at))
    }

    /// Logs what this batch may have written into the used ring at `log`
    /// too (vm-memory logged it at the ring's own address): the `completed`
    /// new entries, and the flags, `used.idx` and `avail_event` fields,
    /// which kick suppression and publishing write (marking an unchanged
    /// field costs one more page sent, never a lost one).
    fn log_used_elsewhere(&self, log: GuestAddress, completed: u16) {
        let size = self.size;
        let mut slot = self.old_used.0 % size;
        for _ in 0..completed {
            let at = log.0 + USED_RING_HEADER + u64::from(slot) * USED_ELEM_SIZE;
            crate::datapath::dirty::mark(self.mem, GuestAddress(at), 8);
            slot = (slot + 1) % size;
        }
        // flags and idx, then avail_event after the ring's entries.
        crate::datapath::dirty::mark(self.mem, log, 4);
        let avail_event = log.0 + USED_RING_HEADER + u64::from(size) * USED_ELEM_SIZE;
        crate::datapath::dirty::mark(self.mem, GuestAddress(avail_event), 2);
    }

    /// Adds the batch's counts to the queue's counters (once: the tally is
    /// emptied).
    fn add_tally(&mut self) {
        let t = std::mem::take(&mut self.tally);
        let stats = self.stats;
        for (counter, n) in [
            (&stats.frames, t.frames),
            (&stats.bytes, t.bytes),
            (&stats.completions, t.completions),
            (&stats.bad_chains, t.bad_chains),
            (&stats.rx_posted_frames, t.posted_frames),
        ] {
            if n > 0 {
                counter.add(n);
            }
        }
    }
}

/// What a batch counts per frame, in locals: the shared counters are
/// atomics (a locked add each), added to once per batch (`Core::add_tally`).
#[derive(Default)]
struct Tally {
    frames: u64,
    bytes: u64,
    completions: u64,
    bad_chains: u64,
    posted_frames: u64,
}

impl Drop for Batch<'_> {
    /// A batch cut short by a ring error still counts what it did.
    fn drop(&mut self) {
        self.core.add_tally();
    }
}

/// The guest's wish for entries `old..new` of `queue`.
fn guest_wish<'a>(queue: &'a Queue, mem: &'a GuestMem) -> impl Fn(u16, u16) -> bool + 'a {
    let (avail, size, event_idx) = (
        GuestAddress(queue.avail_ring()),
        queue.size(),
        queue.event_idx_enabled(),
    );
    move |old, new| notify::guest_wants(mem, avail, size, event_idx, old, new)
}

fn count_verdict(stats: &QueueStats, verdict: Verdict) {
    let counter = match verdict {
        Verdict::Signal => &stats.interrupts_sent,
        Verdict::Suppress => &stats.interrupts_suppressed,
        Verdict::Defer(_) => &stats.interrupts_deferred,
    };
    counter.inc();
}

/// Decides about an interrupt a coalescing policy held back, once its
/// timer fired.
pub fn on_timer(
    queue: &Queue,
    mem: &GuestMem,
    stats: &QueueStats,
    coalescer: &mut Coalescer,
) -> Verdict {
    if !coalescer.deferred() {
        return Verdict::Suppress;
    }
    let verdict = coalescer.on_timer(Instant::now(), queue.size(), guest_wish(queue, mem));
    // A still-deferred interrupt was counted when it was deferred.
    if !matches!(verdict, Verdict::Defer(_)) {
        count_verdict(stats, verdict);
    }
    verdict
}
