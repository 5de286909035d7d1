//! How one frame moves from the guest to the tap.
//!
//! The guest's chain (virtio-net header + frame, exactly as the guest wrote
//! it) becomes one `writev` straight from guest memory; the tap, set to the
//! same header length, takes the header as it is, so checksum and
//! segmentation offloads cost nothing here. Before the `writev`, the start
//! of the next chain's buffer is prefetched
//! ([`crate::datapath::batch::Ring::prefetch_next`]). The loop around this
//! step is [`crate::datapath::batch::Batch::drain`].

use std::fs::File;
use std::io;

use crate::datapath::batch::{Ring, RingError, Step};
use crate::datapath::guest::{Access, ChainError, IoVecBuf};
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

#[cfg(test)]
mod tests;
