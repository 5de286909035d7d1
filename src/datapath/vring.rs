//! The framework's vring, plus two things it does not do: count kicks, and
//! keep an interrupt decided while the ring has no call fd.
//!
//! vhost-user-backend reads a ring's kick eventfd before calling us and throws
//! the value away; the value is the number of kicks since the last read. This
//! wrapper reads it itself and keeps the sum for the worker to collect.
//!
//! The framework drops a ring's call fd at GET_VRING_BASE, and QEMU sets a
//! ring up again with SET_VRING_KICK (the ring runs) before SET_VRING_CALL:
//! an interrupt decided in between would go nowhere, and the guest would
//! wait for it forever. [`TrackedVring::signal`] marks it owed instead, and
//! `set_call` sends it as soon as the frontend gives the fd. Every other
//! call goes to [`VringMutex`] unchanged.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

use vhost_user_backend::{VringMutex, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as QueueError, QueueT};
use vm_memory::GuestMemoryAtomic;

use crate::datapath::guest::GuestMem;
use crate::host::sys;

type Mem = GuestMemoryAtomic<GuestMem>;

/// A vring whose kicks are counted.
#[derive(Clone)]
pub struct TrackedVring {
    inner: VringMutex<Mem>,
    kicks: Arc<AtomicU64>,
    /// An interrupt was decided while the ring had no call fd.
    owed: Arc<AtomicBool>,
}

impl TrackedVring {
    /// Returns the kicks received since the last call.
    pub fn take_kicks(&self) -> u64 {
        self.kicks.swap(0, Ordering::Relaxed)
    }

    /// Signals the guest; `state` is this vring's state, locked by the
    /// caller. Without a call fd the interrupt is owed, and sent by
    /// `set_call`: both look at the call fd under the state's lock, so the
    /// mark cannot fall between `set_call` storing the fd and checking it.
    pub fn signal(&self, state: &VringState<Mem>) -> io::Result<()> {
        match state.get_call() {
            Some(call) => call.notify(),
            None => {
                self.owed.store(true, Ordering::Release);
                Ok(())
            }
        }
    }
}

impl<'a> VringStateGuard<'a, Mem> for TrackedVring {
    type G = MutexGuard<'a, VringState<Mem>>;
}

impl<'a> VringStateMutGuard<'a, Mem> for TrackedVring {
    type G = MutexGuard<'a, VringState<Mem>>;
}

impl VringT<Mem> for TrackedVring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, QueueError> {
        Ok(TrackedVring {
            inner: VringMutex::new(mem, max_queue_size)?,
            kicks: Arc::default(),
            owed: Arc::default(),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
    }

    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), QueueError> {
        self.inner.set_queue_info(desc, avail, used)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base);
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx);
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num);
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled);
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready);
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file);
    }

    /// Reads the kick eventfd, adds its count to the kick counter, and
    /// reports whether the ring is enabled (what the framework expects).
    fn read_kick(&self) -> io::Result<bool> {
        let state = self.inner.get_ref();
        if let Some(kick) = state.get_kick() {
            let n = sys::eventfd_take(kick.as_raw_fd())?;
            self.kicks.fetch_add(n, Ordering::Relaxed);
        }
        Ok(state.is_enabled())
    }

    /// Stores the call fd, then sends one interrupt through it if one is
    /// owed ([`TrackedVring::signal`]) or the ring has a past (its used
    /// index is not 0). The second case is QEMU starting a ring on a new
    /// connection (a migration's destination, a restarted daemon): the
    /// call fd is first its masked notifier, whose pending events it
    /// discards before it sends the guest's own fd, so the restart signal
    /// may have gone there. A spurious interrupt is harmless; a lost one
    /// leaves a guest waiting on an old `used_event` for good.
    fn set_call(&self, file: Option<File>) {
        let present = file.is_some();
        self.inner.set_call(file);
        if !present {
            return;
        }
        let owed = self.owed.swap(false, Ordering::AcqRel);
        let ready = self.inner.get_ref().get_queue().ready();
        let has_past = ready && self.inner.queue_used_idx().is_ok_and(|i| i != 0);
        if owed || has_past {
            if let Err(e) = self.inner.signal_used_queue() {
                log::warn!("cannot signal through the new call fd: {e}");
            }
        }
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file);
    }
}
