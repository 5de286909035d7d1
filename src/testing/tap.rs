//! A stand-in for the tap's control, for tests whose tap queues are one end
//! of a `SOCK_SEQPACKET` socket pair each (a socket keeps frame boundaries
//! as a tap queue does, but has none of the tap's ioctls).
//!
//! [`RecordingTap`] does nothing and records what the device asked, so a
//! test can assert that framing was applied and that queues were attached
//! and detached when they should be.

use std::fs::File;
use std::io;
use std::sync::{Mutex, MutexGuard};

use crate::host::tap::{self, Framing, TapControl};

/// One request the device made of the tap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapRequest {
    /// Header length, byte order and offloads for every queue.
    Apply(Framing),
    /// Queue `queue` attached (`true`) or detached (`TUNSETQUEUE`).
    Attach { queue: usize, attached: bool },
    /// Queue `queue` re-attached to a re-created interface.
    Reattach { queue: usize, framing: Framing },
}

/// A [`TapControl`] that records requests and always succeeds.
#[derive(Debug)]
pub struct RecordingTap {
    requests: Mutex<Vec<TapRequest>>,
    offloads: u32,
}

impl Default for RecordingTap {
    fn default() -> Self {
        RecordingTap::with_offloads(tap::BASE_OFFLOADS | tap::USO_OFFLOADS)
    }
}

impl RecordingTap {
    /// A tap that accepts every offload (a kernel >= 6.2).
    pub fn new() -> RecordingTap {
        RecordingTap::default()
    }

    /// A tap of a kernel older than 6.2: no UDP segmentation offload.
    pub fn refusing_uso() -> RecordingTap {
        RecordingTap::with_offloads(tap::BASE_OFFLOADS)
    }

    /// A tap that accepts the `TUN_F_*` flags `offloads`.
    pub fn with_offloads(offloads: u32) -> RecordingTap {
        RecordingTap {
            requests: Mutex::default(),
            offloads,
        }
    }

    fn log(&self) -> MutexGuard<'_, Vec<TapRequest>> {
        // A test thread that panicked while recording leaves a whole entry
        // or none: the log is still readable.
        self.requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<TapRequest> {
        self.log().clone()
    }

    /// Whether queue `queue` is attached now: the last attach or detach
    /// asked for it (a freshly opened tap queue is attached).
    pub fn attached(&self, queue: usize) -> bool {
        self.log()
            .iter()
            .rev()
            .find_map(|r| match *r {
                TapRequest::Attach { queue: q, attached } if q == queue => Some(attached),
                TapRequest::Reattach { queue: q, .. } if q == queue => Some(true),
                _ => None,
            })
            .unwrap_or(true)
    }

    /// The framing applied last, if any.
    pub fn framing(&self) -> Option<Framing> {
        self.log().iter().rev().find_map(|r| match *r {
            TapRequest::Apply(f) => Some(f),
            _ => None,
        })
    }
}

impl TapControl for RecordingTap {
    fn name(&self) -> &str {
        "socketpair"
    }

    fn offloads(&self) -> u32 {
        self.offloads
    }

    fn apply(&self, framing: Framing) -> io::Result<()> {
        self.log().push(TapRequest::Apply(framing));
        Ok(())
    }

    fn set_queue_attached(&self, index: usize, _queue: &File, attached: bool) -> io::Result<()> {
        self.log().push(TapRequest::Attach {
            queue: index,
            attached,
        });
        Ok(())
    }

    fn exists(&self) -> bool {
        true
    }

    fn reattach(&self, index: usize, _queue: &File, framing: Framing) -> io::Result<()> {
        self.log().push(TapRequest::Reattach {
            queue: index,
            framing,
        });
        Ok(())
    }
}
