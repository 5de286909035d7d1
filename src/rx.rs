//! How one frame moves from the tap to the guest.
//!
//! Guest buffers are gathered into a window of popped chains until they can
//! hold the largest frame the tap may hand us (with `VIRTIO_NET_F_MRG_RXBUF`
//! several chains; without it one chain), then one `readv` straight into
//! guest memory reads exactly one frame. The chains the frame filled are
//! completed, each with its own length, and `num_buffers` is set; chains not
//! needed stay in the window for the next frame, and are given back to the
//! ring when the batch ends. The loop around this step is
//! [`crate::ring::Batch::drain`].
//!
//! A tap's `read` silently cuts a frame to the buffers it is given, so the
//! `readv` goes on past the guest's buffers into a host buffer
//! ([`Bounce`]): a frame with bytes there did not fit, and a frame longer
//! than the guest may receive ([`RxParams`]) is dropped and counted, never
//! delivered cut.

use std::fs::File;
use std::io;

use crate::guest::{Access, ChainError, GuestIoVecs};
use crate::ring::{Batch, RingError, Step};
use crate::stats::QueueStats;
use crate::VNET_HDR_LEN;

/// Byte offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Largest chain accepted on RX (a Linux guest's "big packets" buffers are
/// about 64 KiB; anything far beyond is a broken descriptor).
pub const MAX_RX_CHAIN: usize = 1 << 20;

/// A popped RX chain waiting for a frame.
#[derive(Clone, Copy, Debug)]
pub struct RxChain {
    head: u16,
    len: usize,
    segments: usize,
}

/// `gso_type` is the second byte of the virtio-net header.
const GSO_TYPE_OFFSET: usize = 1;
/// `VIRTIO_NET_HDR_GSO_ECN`: a flag on top of a GSO type, not a type.
const GSO_ECN: u8 = 0x80;

/// Length of a [`Bounce`] buffer: one byte more than the largest header +
/// frame any negotiation allows (a 64 KiB GSO frame, or a 65535-byte MTU,
/// with an Ethernet and VLAN header), so a frame longer than that always
/// leaves bytes in it.
pub const BOUNCE_LEN: usize = VNET_HDR_LEN + 65535 + 18 + 1;

/// What the negotiated features say about RX.
#[derive(Clone, Copy, Debug)]
pub struct RxParams {
    /// `VIRTIO_NET_F_MRG_RXBUF` acked: a frame may span several chains.
    pub mergeable: bool,
    /// Largest header + frame the guest may receive: a GSO frame with the
    /// receive offloads it acked, else one MTU-sized frame. Longer frames
    /// (a tap whose MTU is above the guest's) are dropped and counted.
    pub max_frame: usize,
    /// Largest header + frame whose header says "no GSO": the MTU the guest
    /// was told (`VIRTIO_NET_F_MTU`) bounds it even when GSO frames may be
    /// longer. Equal to `max_frame` when no such promise was made.
    pub max_plain_frame: usize,
}

/// A worker's host-side frame buffer. The tap's `readv` goes on into it
/// after the guest's buffers: bytes landing here belong to a frame the
/// guest's buffers could not hold.
pub struct Bounce {
    buf: Box<[u8]>,
}

impl Default for Bounce {
    fn default() -> Self {
        Bounce {
            buf: vec![0u8; BOUNCE_LEN].into_boxed_slice(),
        }
    }
}

/// Buffers popped for RX in the current batch, the iovecs covering them,
/// and the worker's host-side [`Bounce`] buffer.
pub struct Window<'a, 'b, 'm> {
    pub chains: &'a mut Vec<RxChain>,
    pub iovecs: &'a mut GuestIoVecs<'b, 'm>,
    pub bounce: &'a mut Bounce,
}

impl Window<'_, '_, '_> {
    fn capacity(&self) -> usize {
        self.chains.iter().map(|c| c.len).sum()
    }

    /// Completes every chain in the window with length 0 (used when a broken
    /// chain sits behind them in the ring, so they cannot be given back).
    fn flush_unused(&mut self, batch: &mut Batch<'_>) -> Result<(), RingError> {
        for c in self.chains.drain(..) {
            batch.complete(c.head, 0)?;
        }
        let n = self.iovecs.segments();
        self.iovecs.drop_front(n);
        Ok(())
    }

    /// Gives the window's chains back to the ring (end of batch).
    pub fn give_back(&mut self, batch: &mut Batch<'_>) {
        batch.give_back(self.chains.len());
        self.chains.clear();
        let n = self.iovecs.segments();
        self.iovecs.drop_front(n);
    }

    /// Pops chains until the window can hold `params.max_frame` bytes (or
    /// one chain without mergeable buffers). `false`: not enough buffers.
    fn fill(&mut self, batch: &mut Batch<'_>, params: RxParams) -> Result<bool, RingError> {
        loop {
            let enough = if params.mergeable {
                self.capacity() >= params.max_frame
            } else {
                !self.chains.is_empty()
            };
            if enough {
                return Ok(true);
            }
            let Some(chain) = batch.pop()? else {
                // Every buffer the guest has is in the window: use them,
                // even if a maximal frame would not fit.
                let whole_ring = self.chains.len() >= usize::from(batch.size());
                return Ok(!self.chains.is_empty() && whole_ring);
            };
            let head = chain.head_index();
            let before = self.iovecs.segments();
            let pushed = match self
                .iovecs
                .push_chain(chain, Access::DeviceWrites, MAX_RX_CHAIN)
            {
                Ok(len) if len < VNET_HDR_LEN => Err(ChainError::TooShort { min: VNET_HDR_LEN }),
                other => other,
            };
            match pushed {
                Ok(len) => self.chains.push(RxChain {
                    head,
                    len,
                    segments: self.iovecs.segments() - before,
                }),
                Err(e) => {
                    self.flush_unused(batch)?;
                    batch.complete_bad(head, &e)?;
                }
            }
        }
    }
}

/// What to do with a frame of `n` bytes (as the tap reported it) read into
/// a window of `capacity` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// It fits: complete the chains it filled.
    Deliver,
    /// Longer than the guest may receive: drop, count as oversize.
    Oversize,
    /// Shorter than a header, or longer than the guest's buffers: drop.
    Unfit,
}

fn judge(n: usize, capacity: usize, params: RxParams, gso_type: impl FnOnce() -> u8) -> Verdict {
    if n < VNET_HDR_LEN {
        Verdict::Unfit
    } else if n > params.max_frame || (n > params.max_plain_frame && gso_type() & !GSO_ECN == 0) {
        Verdict::Oversize
    } else if n > capacity {
        Verdict::Unfit
    } else {
        Verdict::Deliver
    }
}

/// Moves one frame from `tap` into the guest's RX buffers.
pub fn step(
    batch: &mut Batch<'_>,
    window: &mut Window<'_, '_, '_>,
    tap: &File,
    params: RxParams,
) -> Result<Step, RingError> {
    if !window.fill(batch, params)? {
        return Ok(Step::RingEmpty);
    }
    let stats = batch.stats();
    let n = match window.iovecs.read_from(tap, &mut window.bounce.buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            QueueStats::add(&stats.tap_eagain, 1);
            return Ok(Step::TapBlocked);
        }
        Err(e) => {
            batch.note_tap_error(&e);
            return Ok(Step::TapBlocked);
        }
    };
    let capacity = window.capacity();
    let iovecs = &*window.iovecs;
    let gso_type = || {
        let mut b = [0u8];
        // The header sits in the first chain, which is at least a header
        // long; an unreadable byte reads as "no GSO" (the stricter limit).
        iovecs.read_at(GSO_TYPE_OFFSET, &mut b).map_or(0, |()| b[0])
    };
    match judge(n, capacity, params, gso_type) {
        Verdict::Deliver => {}
        Verdict::Oversize => {
            // The buffers keep nothing of it that the guest will see: they
            // stay in the window for the next frame.
            QueueStats::add(&stats.rx_dropped_oversize_frames, 1);
            return Ok(Step::Progress);
        }
        Verdict::Unfit => {
            QueueStats::add(&stats.rx_dropped_frames, 1);
            return Ok(Step::Progress);
        }
    }
    let mut left = n;
    let mut used = 0;
    let mut segments = 0;
    for c in window.chains.iter() {
        let take = left.min(c.len);
        left -= take;
        used += 1;
        segments += c.segments;
        if left == 0 {
            break;
        }
    }
    let num_buffers = u16::try_from(used).expect("a window holds at most a queue of chains");
    if let Err(e) = window
        .iovecs
        .write_at(NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes())
    {
        // Cannot happen for chains that passed validation; count and drop.
        log::debug!("cannot set num_buffers: {e}");
        QueueStats::add(&stats.rx_dropped_frames, 1);
        return Ok(Step::Progress);
    }
    let mut left = n;
    for c in window.chains.drain(..used) {
        let take = left.min(c.len);
        left -= take;
        batch.complete(c.head, u32::try_from(take).expect("chain length fits u32"))?;
    }
    window.iovecs.drop_front(segments);
    batch.count_frame(n - VNET_HDR_LEN);
    Ok(Step::Progress)
}

#[cfg(test)]
mod tests;
