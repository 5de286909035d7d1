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

/// What the negotiated features say about RX.
#[derive(Clone, Copy, Debug)]
pub struct RxParams {
    /// `VIRTIO_NET_F_MRG_RXBUF` acked: a frame may span several chains.
    pub mergeable: bool,
    /// Largest header + frame the tap may hand us with the offloads in force.
    pub max_frame: usize,
}

/// Buffers popped for RX in the current batch and the iovecs covering them.
pub struct Window<'a, 'b, 'm> {
    pub chains: &'a mut Vec<RxChain>,
    pub iovecs: &'a mut GuestIoVecs<'b, 'm>,
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
    let n = match window.iovecs.read_from(tap) {
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
    if n < VNET_HDR_LEN || (n == capacity && capacity < params.max_frame) {
        // Nothing usable, or possibly cut short by buffers smaller than the
        // largest frame: drop it, keep the buffers for the next frame.
        QueueStats::add(&stats.rx_dropped_frames, 1);
        return Ok(Step::Progress);
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
