//! The driver side of a split virtqueue, written the way a guest's driver
//! writes it: for tests and the benchmark's synthetic guest.
//!
//! It lays a ring out in guest memory, adds descriptor chains, publishes the
//! avail index, reads used entries back, and speaks both notification
//! schemes (event index, or the flags). It uses only vm-memory's checked
//! accessors. Nothing in the daemon uses it.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress};

use virtio_bindings::virtio_ring;

use crate::datapath::guest::GuestMem;
use crate::datapath::notify::need_event;

/// Ring flags from `virtio_bindings` as the `u16`s the ring fields hold
/// (the bindings declare them `u32`; each is a small bit).
const fn flag(bit: u32) -> u16 {
    assert!(bit <= u16::MAX as u32, "a ring flag fits the 16-bit field");
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let v = bit as u16;
    v
}

/// `VRING_DESC_F_NEXT`.
pub const DESC_F_NEXT: u16 = flag(virtio_ring::VRING_DESC_F_NEXT);
/// `VRING_DESC_F_WRITE` (the device writes this buffer).
pub const DESC_F_WRITE: u16 = flag(virtio_ring::VRING_DESC_F_WRITE);
/// `VRING_DESC_F_INDIRECT`.
pub const DESC_F_INDIRECT: u16 = flag(virtio_ring::VRING_DESC_F_INDIRECT);
/// `VRING_USED_F_NO_NOTIFY`.
pub const USED_F_NO_NOTIFY: u16 = flag(virtio_ring::VRING_USED_F_NO_NOTIFY);
/// `VRING_AVAIL_F_NO_INTERRUPT`.
pub const AVAIL_F_NO_INTERRUPT: u16 = flag(virtio_ring::VRING_AVAIL_F_NO_INTERRUPT);

/// One raw descriptor as it sits in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A buffer of a chain: guest address, length, and whether the device
/// writes it (RX) or reads it (TX).
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub device_writes: bool,
}

/// Driver state of one split virtqueue.
#[derive(Debug)]
pub struct SplitRing {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    avail_idx: Wrapping<u16>,
    last_used: Wrapping<u16>,
    /// Free descriptors, next to use first.
    free: VecDeque<u16>,
    /// Descriptors of each outstanding chain, by head.
    chains: Vec<Vec<u16>>,
    /// `VIRTIO_F_IN_ORDER` acked ([`SplitRing::set_in_order`]).
    in_order: bool,
    /// In order: heads made available and not yet used, oldest first.
    avail_order: VecDeque<u16>,
    /// In order: chains a used entry said were used, not yet returned.
    used_backlog: VecDeque<Used>,
    /// Used entries read from the ring.
    entries_read: u64,
}

/// A used entry read back: chain head and bytes the device wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

impl SplitRing {
    /// Bytes a ring of `size` entries needs (table, avail, used, aligned).
    pub fn footprint(size: u16) -> u64 {
        let s = u64::from(size);
        let avail_end = 16 * s + 6 + 2 * s;
        let used = avail_end.next_multiple_of(4);
        used + 6 + 8 * s
    }

    /// Lays out a ring of `size` entries at `base` and zeroes it.
    pub fn new(mem: &GuestMem, base: GuestAddress, size: u16) -> Self {
        assert!(size.is_power_of_two(), "ring size must be a power of two");
        let s = u64::from(size);
        let desc = base;
        let avail = GuestAddress(base.0 + 16 * s);
        let used = GuestAddress((avail.0 + 6 + 2 * s).next_multiple_of(4));
        let zero = vec![0u8; usize::try_from(Self::footprint(size)).expect("small")];
        mem.write_slice(&zero, base)
            .expect("ring inside guest memory");
        SplitRing {
            size,
            desc,
            avail,
            used,
            avail_idx: Wrapping(0),
            last_used: Wrapping(0),
            free: (0..size).collect(),
            chains: vec![Vec::new(); usize::from(size)],
            in_order: false,
            avail_order: VecDeque::new(),
            used_backlog: VecDeque::new(),
            entries_read: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Drives the ring as `VIRTIO_F_IN_ORDER` asks of a driver: descriptors
    /// are used in table order (wrapping at the end, each `next` the one
    /// after), and one used entry may stand for several chains: the one
    /// it names and every chain made available before it
    /// ([`SplitRing::pop_used`]). Set before any chain is added.
    pub fn set_in_order(&mut self, on: bool) {
        assert_eq!(
            self.free.len(),
            usize::from(self.size),
            "set before any chain is added"
        );
        self.in_order = on;
    }

    /// Used entries read from the ring so far (one per chain, unless the
    /// device batched them in order).
    pub fn entries_read(&self) -> u64 {
        self.entries_read
    }

    pub fn desc_addr(&self) -> GuestAddress {
        self.desc
    }

    pub fn avail_addr(&self) -> GuestAddress {
        self.avail
    }

    pub fn used_addr(&self) -> GuestAddress {
        self.used
    }

    /// Free descriptors left.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Writes descriptor `index` of the table as is (for hostile chains).
    pub fn write_desc(&self, mem: &GuestMem, index: u16, d: Desc) {
        let at = GuestAddress(self.desc.0 + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        mem.write_slice(&raw, at)
            .expect("descriptor inside the table");
    }

    /// Adds a chain of `bufs` (not yet visible to the device); returns its
    /// head, or `None` when descriptors ran out.
    pub fn add_chain(&mut self, mem: &GuestMem, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len())
            .map(|_| self.free.pop_front().expect("checked"))
            .collect();
        for (i, (b, &id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < ids.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(
                mem,
                id,
                Desc {
                    addr: b.addr.0,
                    len: b.len,
                    flags,
                    next,
                },
            );
        }
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        Some(head)
    }

    /// Puts `head` in the avail ring (not yet visible: see [`Self::publish`]).
    pub fn push_avail(&mut self, mem: &GuestMem, head: u16) {
        if self.in_order {
            self.avail_order.push_back(head);
        }
        let slot = u64::from(self.avail_idx.0 % self.size);
        let at = GuestAddress(self.avail.0 + 4 + 2 * slot);
        mem.write_obj(head.to_le(), at)
            .expect("avail ring in memory");
        self.avail_idx += Wrapping(1);
    }

    /// Makes everything pushed so far visible; returns the old and new
    /// avail index (to decide about a kick).
    pub fn publish(&mut self, mem: &GuestMem) -> (u16, u16) {
        let at = GuestAddress(self.avail.0 + 2);
        let old: u16 = mem
            .load::<u16>(at, Ordering::Relaxed)
            .map(u16::from_le)
            .expect("avail idx in memory");
        mem.store(self.avail_idx.0.to_le(), at, Ordering::Release)
            .expect("avail idx in memory");
        (old, self.avail_idx.0)
    }

    /// Sets the avail index to any value (a broken driver).
    pub fn force_avail_idx(&mut self, mem: &GuestMem, idx: u16) {
        self.avail_idx = Wrapping(idx);
        self.publish(mem);
    }

    /// Whether the device wants a kick for avail entries `old..new`.
    pub fn needs_kick(&self, mem: &GuestMem, event_idx: bool, old: u16, new: u16) -> bool {
        fence(Ordering::SeqCst);
        if event_idx {
            let at = GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size));
            let event = mem
                .load::<u16>(at, Ordering::Relaxed)
                .map(u16::from_le)
                .unwrap_or(0);
            need_event(event, new, old)
        } else {
            self.used_flags(mem) & USED_F_NO_NOTIFY == 0
        }
    }

    /// The device's `flags` in the used ring.
    pub fn used_flags(&self, mem: &GuestMem) -> u16 {
        mem.load::<u16>(self.used, Ordering::Relaxed)
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// The device's published used index.
    pub fn used_idx(&self, mem: &GuestMem) -> u16 {
        mem.load::<u16>(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// Writes `used_event` (interrupt me after the device passes this).
    pub fn set_used_event(&self, mem: &GuestMem, value: u16) {
        let at = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size));
        mem.store(value.to_le(), at, Ordering::Release)
            .expect("in memory");
    }

    /// Writes the avail ring's `flags` (e.g. [`AVAIL_F_NO_INTERRUPT`]).
    pub fn set_avail_flags(&self, mem: &GuestMem, flags: u16) {
        mem.store(flags.to_le(), self.avail, Ordering::Release)
            .expect("in memory");
    }

    /// Index of the next used entry the driver will read.
    pub fn last_used(&self) -> u16 {
        self.last_used.0
    }

    /// Returns the next chain the device used, if it published one, and
    /// frees its descriptors. In order, a used entry names the last chain
    /// of a batch: the chains made available before it come first, with
    /// length 0 (the device did not say; TX's are 0).
    pub fn pop_used(&mut self, mem: &GuestMem) -> Option<Used> {
        if let Some(u) = self.used_backlog.pop_front() {
            return Some(u);
        }
        let published = Wrapping(self.used_idx(mem));
        if published == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used.0 % self.size);
        let at = GuestAddress(self.used.0 + 4 + 8 * slot);
        let raw: u64 = mem.read_obj(at).expect("used ring in memory");
        let raw = u64::from_le(raw);
        self.entries_read += 1;
        let head = u16::try_from(raw & 0xffff_ffff).unwrap_or(u16::MAX);
        let len = u32::try_from(raw >> 32).expect("upper half fits u32");
        if !self.in_order {
            self.last_used += Wrapping(1);
            self.release(head);
            return Some(Used { head, len });
        }
        let start = self.last_used;
        loop {
            let next = self.avail_order.pop_front().unwrap_or_else(|| {
                panic!("used entry names chain {head}, which is not outstanding")
            });
            self.release(next);
            self.last_used += Wrapping(1);
            let last = next == head;
            self.used_backlog.push_back(Used {
                head: next,
                len: if last { len } else { 0 },
            });
            if last {
                break;
            }
        }
        assert!(
            (published - start).0 >= (self.last_used - start).0,
            "the device's used index is short of the batch its entry names"
        );
        self.used_backlog.pop_front()
    }

    /// Frees the descriptors of chain `head`: reused last-freed-first, or
    /// in table order when in order.
    fn release(&mut self, head: u16) {
        let Some(ids) = self.chains.get_mut(usize::from(head)) else {
            return;
        };
        for id in ids.drain(..) {
            if self.in_order {
                self.free.push_back(id);
            } else {
                self.free.push_front(id);
            }
        }
    }
}
