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

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
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
    mem: &'q GuestMem,
    stats: &'q QueueStats,
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
        Ok(Batch {
            queue,
            mem,
            stats,
            old_used: used,
            next_used: used,
            tally: Tally::default(),
            warned: false,
            queue_index,
            logging: crate::datapath::dirty::logging(mem),
            used_log: None,
        })
    }

    /// Also logs the used ring's writes at `at` (the frontend's
    /// `log_guest_addr`), when it is not the ring's own address.
    pub fn log_used_at(&mut self, at: Option<GuestAddress>) {
        self.used_log = at.filter(|a| a.0 != self.queue.used_ring());
    }

    /// The guest memory this batch works on.
    pub fn mem(&self) -> &'q GuestMem {
        self.mem
    }

    /// Logs what this batch may have written into the used ring at `log`
    /// too (vm-memory logged it at the ring's own address): the `completed`
    /// new entries, and the flags, `used.idx` and `avail_event` fields,
    /// which kick suppression and publishing write (marking an unchanged
    /// field costs one more page sent, never a lost one).
    fn log_used_elsewhere(&self, log: GuestAddress, completed: u16) {
        let size = self.queue.size();
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

    /// Whether writes that bypass vm-memory must be logged by hand
    /// ([`crate::datapath::guest::GuestIoVecs::mark_written`]).
    pub fn logging(&self) -> bool {
        self.logging
    }

    /// The queue's size (number of descriptors).
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Counters of this queue.
    pub fn stats(&self) -> &'q QueueStats {
        self.stats
    }

    /// Pops the next available chain. `Ok(None)`: nothing available.
    pub fn pop(&mut self) -> Result<Option<DescriptorChain<&'q GuestMem>>, RingError> {
        let mem = self.mem;
        let mut iter = self.queue.iter(mem).map_err(|e| match e {
            virtio_queue::Error::InvalidAvailRingIndex => RingError::BadAvailIndex(e),
            other => RingError::RingAccess(other),
        })?;
        Ok(iter.next())
    }

    /// Gives back the last `n` popped chains (unused RX buffers, or a TX
    /// frame the tap had no room for).
    pub fn give_back(&mut self, n: usize) {
        for _ in 0..n {
            self.queue.go_to_previous_position();
        }
    }

    /// Writes a used entry for chain `head` with `len` bytes written to it.
    /// Not visible to the guest until [`Batch::finish`].
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), RingError> {
        let slot = u64::from(self.next_used.0 % self.queue.size());
        let at = self.queue.used_ring() + USED_RING_HEADER + slot * USED_ELEM_SIZE;
        let elem = (u64::from(len) << 32) | u64::from(head);
        self.mem
            .write_obj(u64::to_le(elem), GuestAddress(at))
            .map_err(|_| RingError::UsedRing(at))?;
        self.next_used += Wrapping(1);
        self.tally.completions += 1;
        Ok(())
    }

    /// Completes a chain the guest got wrong with length 0, counts it, and
    /// warns once per batch.
    pub fn complete_bad(
        &mut self,
        head: u16,
        why: &dyn std::error::Error,
    ) -> Result<(), RingError> {
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

    /// Counts one frame moved, of `bytes` bytes (header excluded).
    pub fn count_frame(&mut self, bytes: usize) {
        self.tally.frames += 1;
        self.tally.bytes += bytes as u64;
    }

    /// Runs `step` until the ring is empty (and kicks are re-armed with no
    /// work raced in), the tap blocks, or `budget` frames were handled.
    pub fn drain(
        &mut self,
        budget: u64,
        mut step: impl FnMut(&mut Self) -> Result<Step, RingError>,
    ) -> Result<End, RingError> {
        let mut handled = 0;
        loop {
            if handled >= budget {
                return Ok(End::BudgetSpent);
            }
            match step(self)? {
                Step::Progress => handled += 1,
                Step::TapBlocked => return Ok(End::TapBlocked),
                Step::TapGone => return Ok(End::TapGone),
                Step::RingEmpty => {
                    // Publish `avail_event` (or clear NO_NOTIFY) and look
                    // again: a buffer added just before would get no kick.
                    if !self.rearm()? {
                        return Ok(End::RingEmpty);
                    }
                    self.queue
                        .disable_notification(self.mem)
                        .map_err(RingError::RingAccess)?;
                }
            }
        }
    }

    /// Re-enables guest kicks; `true` if work arrived meanwhile.
    fn rearm(&mut self) -> Result<bool, RingError> {
        self.queue
            .enable_notification(self.mem)
            .map_err(RingError::RingAccess)
    }

    /// Publishes the batch's used entries and makes the batch's one
    /// interrupt decision through the ring's `coalescer`.
    pub fn finish(mut self, coalescer: &mut Coalescer) -> Result<Verdict, RingError> {
        let completed = (self.next_used - self.old_used).0;
        // Counted before the guest can see the entries: whoever waits for
        // them finds the counters up to date.
        let frames = self.tally.frames;
        self.add_tally();
        if completed > 0 {
            let idx_at = self.queue.used_ring() + 2;
            self.mem
                .store(
                    u16::to_le(self.next_used.0),
                    GuestAddress(idx_at),
                    Ordering::Release,
                )
                .map_err(|_| RingError::UsedRing(idx_at))?;
            self.queue.set_next_used(self.next_used.0);
            self.stats.record_batch(frames);
        }
        if let (true, Some(log)) = (self.logging, self.used_log) {
            self.log_used_elsewhere(log, completed);
        }
        let now = Instant::now();
        let verdict = coalescer.after_batch(
            now,
            completed,
            self.next_used.0,
            self.queue.size(),
            guest_wish(self.queue, self.mem),
        );
        // Every interrupt sent is counted, including a fresh start's with
        // nothing new; suppressed and deferred only for batches that
        // completed something.
        if completed > 0 || verdict == Verdict::Signal {
            count_verdict(self.stats, verdict);
        }
        Ok(verdict)
    }
}

/// What a batch counts per frame, in locals: the shared counters are
/// atomics (a locked add each), added to once per batch ([`Batch::add_tally`]).
#[derive(Default)]
struct Tally {
    frames: u64,
    bytes: u64,
    completions: u64,
    bad_chains: u64,
}

impl Batch<'_> {
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
        ] {
            if n > 0 {
                counter.add(n);
            }
        }
    }
}

impl Drop for Batch<'_> {
    /// A batch cut short by a ring error still counts what it did.
    fn drop(&mut self) {
        self.add_tally();
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
