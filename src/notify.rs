//! When to interrupt the guest: the only place that decides.
//!
//! One decision per batch, after the batch's used entries are published.
//! With `VIRTIO_RING_F_EVENT_IDX` the guest's `used_event` says how far the
//! device may go before it wants an interrupt (`vring_need_event`); without
//! it, the guest's `VRING_AVAIL_F_NO_INTERRUPT` flag says whether it wants
//! any (virtio-queue ignores that flag; we honour it). Coalescing policies
//! beyond this (issue "measure") plug in here and nowhere else.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress};

use crate::guest::GuestMem;

/// `VRING_AVAIL_F_NO_INTERRUPT` from the virtio spec.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// What the guest's ring says about interrupts for the used entries
/// `old..new` (the entries of one batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send an interrupt.
    Signal,
    /// The guest asked not to be interrupted for these entries.
    Suppress,
}

/// The split-ring formula from the virtio spec (`vring_need_event`): the
/// guest wants an interrupt when `used_event` lies in `[old, new)`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    (Wrapping(new) - Wrapping(event) - Wrapping(1)) < (Wrapping(new) - Wrapping(old))
}

/// Decides, for a batch that moved the used index from `old` to `new`,
/// whether the guest wants an interrupt. `avail_ring` and `size` locate the
/// guest's `flags` and `used_event` fields. A failed read of those fields
/// (the guest unmapped its own ring) errs on the side of signalling.
pub fn decide(
    mem: &GuestMem,
    avail_ring: GuestAddress,
    size: u16,
    event_idx: bool,
    old: u16,
    new: u16,
) -> Decision {
    if old == new {
        return Decision::Suppress;
    }
    // The used index store must be visible before we read the guest's
    // wishes, or we can miss an update it made after reading our index.
    fence(Ordering::SeqCst);
    let wants = if event_idx {
        let at = avail_ring.0 + 4 + 2 * u64::from(size);
        mem.load::<u16>(GuestAddress(at), Ordering::Relaxed)
            .map(|event| need_event(u16::from_le(event), new, old))
            .unwrap_or(true)
    } else {
        mem.load::<u16>(avail_ring, Ordering::Relaxed)
            .map(|flags| u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0)
            .unwrap_or(true)
    };
    if wants {
        Decision::Signal
    } else {
        Decision::Suppress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_fires_only_when_used_event_is_crossed() {
        // Batch moved used from 10 to 20: the guest asked at 15 -> yes.
        assert!(need_event(15, 20, 10));
        // It asked at 10 (the first entry of the batch) -> yes.
        assert!(need_event(10, 20, 10));
        // It asked at 20 (not reached yet) -> no.
        assert!(!need_event(20, 20, 10));
        // It asked long ago (already signalled) -> no.
        assert!(!need_event(5, 20, 10));
    }

    #[test]
    fn need_event_handles_index_wraparound() {
        assert!(need_event(65535, 2, 65530));
        assert!(need_event(0, 2, 65530));
        assert!(!need_event(2, 2, 65530));
    }
}
