//! One queue pair's worker: which event drives which step.
//!
//! A pair owns its tap queue fd (plus a `dup` of it for "tap writable"), a
//! resume eventfd, its iovec buffers and its per-connection state. Its
//! worker thread (one per pair, run by vhost-user-backend) calls
//! [`QueuePair::handle`] for each event; no other thread touches the data
//! path of this pair. Events and their epoll ids are [`Event`].
//!
//! Listening on the tap follows the guest: while the RX ring has buffers we
//! wait for the tap to be readable; when it runs dry we stop listening (a
//! level-triggered tap would otherwise spin) and wait for the guest's refill
//! kick. TX waits for "tap writable" only after a write returned EAGAIN.
//!
//! Fairness: a direction that spends its budget with work left gets its
//! next turn from the resume event, which runs TX then RX once each; RX
//! stops watching the tap meanwhile, so neither direction gets two turns
//! for the other's one.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use vhost_user_backend::{VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::datapath::batch::{self, Batch, End, RingError};
use crate::datapath::guest::{GuestMem, IoVecBuf, IOV_MAX};
use crate::datapath::notify::{Coalescer, Policy, Verdict};
use crate::datapath::rx::{self, Bounce, RxBuffers, RxChain, RxParams};
use crate::datapath::tx;
use crate::datapath::vring::TrackedVring;
use crate::host::sys::Timer;
use crate::host::tap::{Framing, TapControl};
use crate::stats::{QueueStats, Stats};

/// Frames one direction may move before the other gets a turn.
pub const BUDGET_FRAMES: u64 = 64;

/// Events of one worker. Vring kicks use the framework's ids (the ring's
/// index within the pair); our own ids start after the framework's reserved
/// range `0..=num_queues`, so they are derived from the queue count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The guest kicked the RX ring (it added buffers), or the ring was enabled.
    RxKick,
    /// The guest kicked the TX ring (it added frames), or the ring was enabled.
    TxKick,
    /// The tap has frames to read.
    TapReadable,
    /// The tap has room again after a write returned EAGAIN.
    TapWritable,
    /// A direction spent its budget with work left: continue.
    Resume,
    /// The RX ring's deferred interrupt is due.
    RxTimer,
    /// The TX ring's deferred interrupt is due.
    TxTimer,
}

impl Event {
    /// The epoll id of this event, for a device with `num_queues` queues.
    pub fn id(self, num_queues: usize) -> u64 {
        let base = num_queues as u64;
        match self {
            Event::RxKick => 0,
            Event::TxKick => 1,
            Event::TapReadable => base + 1,
            Event::TapWritable => base + 2,
            Event::Resume => base + 3,
            Event::RxTimer => base + 4,
            Event::TxTimer => base + 5,
        }
    }

    /// The event with epoll id `id`, if it is one of ours.
    pub fn from_id(id: u16, num_queues: usize) -> Option<Event> {
        [
            Event::RxKick,
            Event::TxKick,
            Event::TapReadable,
            Event::TapWritable,
            Event::Resume,
            Event::RxTimer,
            Event::TxTimer,
        ]
        .into_iter()
        .find(|e| e.id(num_queues) == u64::from(id))
    }
}

/// Where a worker registers its extra fds (the framework's epoll handler).
pub trait Listeners: Send + Sync {
    fn register(&self, fd: RawFd, events: EventSet, id: u64) -> io::Result<()>;
    fn unregister(&self, fd: RawFd, events: EventSet, id: u64) -> io::Result<()>;
}

impl<T> Listeners for vhost_user_backend::VringEpollHandler<T>
where
    T: vhost_user_backend::VhostUserBackend,
    T::Bitmap: Send + Sync,
    T::Vring: Send + Sync,
{
    fn register(&self, fd: RawFd, events: EventSet, id: u64) -> io::Result<()> {
        self.register_listener(fd, events, id)
    }

    fn unregister(&self, fd: RawFd, events: EventSet, id: u64) -> io::Result<()> {
        self.unregister_listener(fd, events, id)
    }
}

/// State that lives for one frontend connection.
struct Connection {
    mem: GuestMemoryAtomic<GuestMem>,
    listeners: Arc<dyn Listeners>,
    /// Indexed by [`Watch`]: whether the fd is in the epoll set.
    watching: [bool; 2],
    broken: [bool; 2],
    pending: [bool; 2],
    /// Interrupt coalescing state per ring.
    coalescers: [Coalescer; 2],
    /// The deadline each ring's timer is armed for.
    timer_deadline: [Option<Instant>; 2],
    /// This pair's `[rx, tx]` vrings, kept from the first event so a held
    /// interrupt can be signalled from outside the worker (ring stop,
    /// device reset, disconnect) while the call fd is still there.
    vrings: Option<[TrackedVring; 2]>,
}

/// One queue pair: RX is ring 0 of the pair, TX ring 1.
pub struct QueuePair {
    index: usize,
    num_queues: usize,
    tap: File,
    tap_out: File,
    /// Attaches and detaches `tap` (the kernel's tap, or a test's recorder).
    tap_ctl: Arc<dyn TapControl>,
    resume: EventFd,
    stats: Arc<Stats>,
    rx_params: RxParams,
    /// Coalescing policy per ring (RX, TX).
    policies: [Policy; 2],
    /// Timer per ring for deferred interrupts.
    timers: [Timer; 2],
    /// Whether our tap queue is attached (receives frames from the kernel).
    tap_attached: bool,
    /// Whether it should be: a frontend has this pair's RX ring enabled.
    tap_wanted: bool,
    /// The tap's interface was deleted: our fd is detached until
    /// [`QueuePair::reattach`]. TX drops frames, RX does not watch the fd
    /// (it would report an error forever).
    tap_gone: bool,
    conn: Option<Connection>,
    tx_iov: IoVecBuf,
    rx_iov: IoVecBuf,
    rx_chains: Vec<RxChain>,
    rx_bounce: Bounce,
}

const RX: usize = 0;
const TX: usize = 1;

impl QueuePair {
    /// A pair serving tap queue `tap` (attached and detached through
    /// `tap_ctl`) as queue pair `index` of `num_queues`, with interrupt
    /// coalescing `policies` (RX, TX).
    pub fn new(
        index: usize,
        num_queues: usize,
        tap: File,
        tap_ctl: Arc<dyn TapControl>,
        stats: Arc<Stats>,
        policies: [Policy; 2],
    ) -> io::Result<Self> {
        Ok(QueuePair {
            index,
            num_queues,
            tap_out: tap.try_clone()?,
            tap,
            tap_ctl,
            resume: EventFd::new(EFD_NONBLOCK)?,
            stats,
            rx_params: RxParams::default(),
            policies,
            timers: [Timer::new()?, Timer::new()?],
            tap_attached: true,
            tap_wanted: true,
            tap_gone: false,
            conn: None,
            tx_iov: IoVecBuf::with_capacity(IOV_MAX),
            rx_iov: IoVecBuf::with_capacity(IOV_MAX),
            rx_chains: Vec::with_capacity(usize::from(u16::MAX)),
            rx_bounce: Bounce::default(),
        })
    }

    /// The tap queue fd (for device-wide tap ioctls).
    pub fn tap(&self) -> &File {
        &self.tap
    }

    /// Attaches or detaches this pair's tap queue (`TUNSETQUEUE`).
    pub fn set_tap_attached(&mut self, attached: bool) {
        self.tap_wanted = attached;
        if self.tap_attached == attached {
            return;
        }
        match self
            .tap_ctl
            .set_queue_attached(self.index, &self.tap, attached)
        {
            Ok(()) => {
                self.tap_attached = attached;
                log::info!(
                    "pair {}: tap queue {}",
                    self.index,
                    if attached { "attached" } else { "detached" }
                );
            }
            Err(e) => log::error!("pair {}: cannot change the tap queue: {e}", self.index),
        }
    }

    /// Whether the tap's interface went away under us.
    pub fn tap_gone(&self) -> bool {
        self.tap_gone
    }

    fn mark_tap_gone(&mut self) {
        if !self.tap_gone {
            log::warn!(
                "pair {}: the tap interface is gone; dropping frames until it is back",
                self.index
            );
            self.tap_gone = true;
        }
    }

    /// Re-attaches our fd to the re-created tap with `framing`, and gets
    /// both directions moving again.
    pub fn reattach(&mut self, framing: Framing) -> io::Result<()> {
        self.tap_ctl.reattach(self.index, &self.tap, framing)?;
        self.tap_gone = false;
        self.tap_attached = true;
        log::info!("pair {}: tap {} is back", self.index, self.tap_ctl.name());
        if !self.tap_wanted {
            self.set_tap_attached(false);
        }
        if let Some(conn) = self.conn.as_mut() {
            conn.pending = [true, true];
            self.resume.write(1)?;
        }
        Ok(())
    }

    /// Sets what RX may expect from the tap (at SET_FEATURES).
    pub fn set_rx_params(&mut self, params: RxParams) {
        self.rx_params = params;
    }

    /// Starts serving a new connection: guest memory and the worker's epoll.
    pub fn connect(
        &mut self,
        mem: GuestMemoryAtomic<GuestMem>,
        listeners: Arc<dyn Listeners>,
    ) -> io::Result<()> {
        let n = self.num_queues;
        listeners.register(self.resume.as_raw_fd(), EventSet::IN, Event::Resume.id(n))?;
        for (timer, event) in self.timers.iter().zip([Event::RxTimer, Event::TxTimer]) {
            timer.set(None)?;
            listeners.register(timer.as_raw_fd(), EventSet::IN, event.id(n))?;
        }
        self.conn = Some(Connection {
            mem,
            listeners,
            watching: [false; 2],
            broken: [false; 2],
            pending: [false; 2],
            coalescers: self.policies.map(Coalescer::new),
            timer_deadline: [None; 2],
            vrings: None,
        });
        Ok(())
    }

    /// Stops serving the connection (the frontend went away): held
    /// interrupts are signalled (a reconnecting frontend such as QEMU keeps
    /// its call fds), a frame held for the guest's RX buffers is dropped
    /// (and counted), and the tap queue is detached so the kernel queues no
    /// frames for nobody. The connection's epoll is being torn down with it,
    /// so nothing needs unregistering.
    pub fn disconnect(&mut self) {
        for ring in [RX, TX] {
            self.ring_stopped(ring);
        }
        self.rx_bounce
            .drop_held(&self.stats.queues[2 * self.index + RX]);
        self.conn = None;
        self.set_tap_attached(false);
    }

    /// The frontend set ring `ring` (0 RX, 1 TX) up again: forget that it
    /// was broken; the next interrupt decision is a fresh start's.
    pub fn ring_reset(&mut self, ring: usize) {
        self.ring_stopped(ring);
        if let Some(b) = self.conn.as_mut().and_then(|c| c.broken.get_mut(ring)) {
            *b = false;
        }
    }

    /// Ring `ring` stops (GET_VRING_BASE, a device reset, a disconnect, or
    /// it is set up again): signal its held interrupt while the call fd is
    /// still there, disarm its timer, and make the next decision a fresh
    /// start's (which signals if the guest may still be waiting).
    pub fn ring_stopped(&mut self, ring: usize) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let (Some(coalescer), Some(deadline)) = (
            conn.coalescers.get_mut(ring),
            conn.timer_deadline.get_mut(ring),
        ) else {
            return;
        };
        let held = coalescer.take_held();
        coalescer.reset();
        if deadline.take().is_some() {
            if let Err(e) = self.timers[ring].set(None) {
                log::warn!(
                    "pair {}: cannot disarm the interrupt timer: {e}",
                    self.index
                );
            }
        }
        let vring = conn.vrings.as_ref().map(|v| v[ring].clone());
        if let (true, Some(vring)) = (held, vring) {
            self.signal(ring, &vring);
        }
    }

    /// Handles one event; `vrings` are this pair's `[rx, tx]`.
    pub fn handle(&mut self, event: Event, vrings: &[TrackedVring]) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let [rx, tx] = vrings else {
            return;
        };
        conn.vrings.get_or_insert_with(|| [rx.clone(), tx.clone()]);
        for (ring, vring) in vrings.iter().enumerate() {
            let kicks = vring.take_kicks();
            if kicks > 0 {
                self.queue_stats(ring).kicks.add(kicks);
            }
        }
        let (run_rx, run_tx) = match event {
            Event::RxKick | Event::TapReadable => (true, false),
            Event::TxKick => (false, true),
            Event::TapWritable => {
                self.watch_tap_writable(false);
                (false, true)
            }
            Event::Resume => {
                let _ = self.resume.read();
                let conn = self.conn.as_mut().expect("checked above");
                let pending = std::mem::take(&mut conn.pending);
                (pending[RX], pending[TX])
            }
            Event::RxTimer | Event::TxTimer => {
                let ring = if event == Event::RxTimer { RX } else { TX };
                let _ = self.timers[ring].take();
                self.fire_timer(ring, &vrings[ring]);
                (false, false)
            }
        };
        if run_tx {
            self.run_tx(&vrings[TX]);
        }
        if run_rx {
            self.run_rx(&vrings[RX]);
        }
    }

    fn queue_stats(&self, ring: usize) -> &QueueStats {
        &self.stats.queues[2 * self.index + ring]
    }

    fn run_tx(&mut self, vring: &TrackedVring) {
        let conn = self.conn.as_ref().expect("caller checked");
        if conn.broken[TX] {
            return;
        }
        let mem = conn.mem.memory();
        let stats = &self.stats.queues[2 * self.index + TX];
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return;
        }
        let queue_index = 2 * self.index + TX;
        let (tap, iov, hdr_len) = (&self.tap, &mut self.tx_iov, self.rx_params.hdr_len);
        let coalescer = &mut self.conn.as_mut().expect("caller checked").coalescers[TX];
        let mut tap_failed = false;
        let result = (|| {
            let mut batch = Batch::begin(state.get_queue_mut(), &mem, stats, queue_index)?;
            let end = batch.drain(BUDGET_FRAMES, |b| tx::step(b, iov, tap, hdr_len))?;
            tap_failed = batch.tap_failed();
            Ok((end, batch.finish(coalescer)?))
        })();
        let end = self.settle_batch(result, vring, &state, TX);
        drop(state);
        if tap_failed {
            self.mark_tap_gone();
        }
        match end {
            Some(End::TapBlocked) => self.watch_tap_writable(true),
            Some(End::BudgetSpent) => self.resume_later(TX),
            Some(End::RingEmpty) | None => {}
        }
    }

    fn run_rx(&mut self, vring: &TrackedVring) {
        let conn = self.conn.as_ref().expect("caller checked");
        let mem = conn.mem.memory();
        let mut state = vring.get_mut();
        if self.tap_gone || conn.broken[RX] || !state.is_enabled() || !state.get_queue().ready() {
            drop(state);
            self.watch_tap_readable(false);
            return;
        }
        let queue_index = 2 * self.index + RX;
        let stats = &self.stats.queues[queue_index];
        let (tap, params) = (&self.tap, self.rx_params);
        let mut iovecs = self.rx_iov.bind(&mem);
        let mut buffers = RxBuffers {
            chains: &mut self.rx_chains,
            iovecs: &mut iovecs,
            bounce: &mut self.rx_bounce,
        };
        let coalescer = &mut self.conn.as_mut().expect("caller checked").coalescers[RX];
        let mut tap_failed = false;
        let result = (|| {
            let mut batch = Batch::begin(state.get_queue_mut(), &mem, stats, queue_index)?;
            let end = batch.drain(BUDGET_FRAMES, |b| rx::step(b, &mut buffers, tap, params));
            buffers.give_back(&mut batch);
            tap_failed = batch.tap_failed();
            let end = end?;
            Ok((end, batch.finish(coalescer)?))
        })();
        drop(iovecs);
        let end = self.settle_batch(result, vring, &state, RX);
        drop(state);
        if tap_failed {
            self.mark_tap_gone();
            self.watch_tap_readable(false);
            return;
        }
        match end {
            Some(End::TapBlocked) => self.watch_tap_readable(true),
            Some(End::RingEmpty) | None => self.watch_tap_readable(false),
            Some(End::BudgetSpent) => {
                // The resume event gives RX its next turn, after TX's: a
                // level-triggered tap watch would give it a second one.
                self.watch_tap_readable(false);
                self.resume_later(RX);
            }
        }
    }

    /// Acts on the batch's interrupt verdict; on a ring error, stops the
    /// ring (a guest fault: the daemon and other rings go on).
    fn settle_batch(
        &mut self,
        result: Result<(End, Verdict), RingError>,
        vring: &TrackedVring,
        state: &VringState<GuestMemoryAtomic<GuestMem>>,
        ring: usize,
    ) -> Option<End> {
        let queue_index = 2 * self.index + ring;
        match result {
            Ok((end, verdict)) => {
                self.apply_verdict(ring, verdict, vring, state);
                Some(end)
            }
            Err(e) => {
                if matches!(e, RingError::BadAvailIndex(_)) {
                    self.stats.queues[queue_index].bad_avail_index.inc();
                }
                log::error!("queue {queue_index} stopped until the frontend resets it: {e}");
                if let Some(conn) = self.conn.as_mut() {
                    conn.broken[ring] = true;
                }
                None
            }
        }
    }

    /// Signals the guest, or arms the ring's timer for a deferred interrupt.
    /// `state` is `vring`'s, locked by the caller.
    fn apply_verdict(
        &mut self,
        ring: usize,
        verdict: Verdict,
        vring: &TrackedVring,
        state: &VringState<GuestMemoryAtomic<GuestMem>>,
    ) {
        match verdict {
            Verdict::Signal => self.signal_locked(ring, vring, state),
            Verdict::Suppress => {}
            Verdict::Defer(deadline) => {
                let Some(conn) = self.conn.as_mut() else {
                    return;
                };
                if conn.timer_deadline[ring] == Some(deadline) {
                    return;
                }
                let after = deadline.saturating_duration_since(Instant::now());
                match self.timers[ring].set(Some(after)) {
                    Ok(()) => conn.timer_deadline[ring] = Some(deadline),
                    Err(e) => {
                        // Nothing would ever fire: signal now rather than
                        // leave the guest waiting.
                        log::error!("pair {}: cannot arm the interrupt timer: {e}", self.index);
                        if conn.coalescers[ring].take_held() {
                            self.queue_stats(ring).interrupts_sent.inc();
                            self.signal_locked(ring, vring, state);
                        }
                    }
                }
            }
        }
    }

    /// Signals a held interrupt of `ring` from outside a batch (counted
    /// here: batches count their own verdicts).
    fn signal(&self, ring: usize, vring: &TrackedVring) {
        self.queue_stats(ring).interrupts_sent.inc();
        self.signal_locked(ring, vring, &vring.get_ref());
    }

    /// Writes the ring's call eventfd (or owes the interrupt until the
    /// frontend gives one: [`TrackedVring::signal`]); `state` is `vring`'s.
    fn signal_locked(
        &self,
        ring: usize,
        vring: &TrackedVring,
        state: &VringState<GuestMemoryAtomic<GuestMem>>,
    ) {
        if let Err(e) = vring.signal(state) {
            log::warn!(
                "queue {}: cannot signal the guest: {e}",
                2 * self.index + ring
            );
        }
    }

    /// A ring's interrupt timer fired: decide about the held interrupt.
    fn fire_timer(&mut self, ring: usize, vring: &TrackedVring) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        conn.timer_deadline[ring] = None;
        let mem = conn.mem.memory();
        let state = vring.get_ref();
        let stats = &self.stats.queues[2 * self.index + ring];
        let verdict = batch::on_timer(state.get_queue(), &mem, stats, &mut conn.coalescers[ring]);
        self.apply_verdict(ring, verdict, vring, &state);
    }

    fn resume_later(&mut self, ring: usize) {
        if let Some(conn) = self.conn.as_mut() {
            conn.pending[ring] = true;
        }
        if let Err(e) = self.resume.write(1) {
            log::error!("pair {}: cannot schedule more work: {e}", self.index);
        }
    }

    fn watch_tap_readable(&mut self, armed: bool) {
        self.watch(Watch::TapIn, armed);
    }

    fn watch_tap_writable(&mut self, armed: bool) {
        self.watch(Watch::TapOut, armed);
    }

    /// Registers or unregisters a tap fd in the connection's epoll when its
    /// watched state changes.
    fn watch(&mut self, what: Watch, armed: bool) {
        let (fd, events, event) = match what {
            Watch::TapIn => (self.tap.as_raw_fd(), EventSet::IN, Event::TapReadable),
            Watch::TapOut => (self.tap_out.as_raw_fd(), EventSet::OUT, Event::TapWritable),
        };
        let id = event.id(self.num_queues);
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let watching = &mut conn.watching[what as usize];
        if *watching == armed {
            return;
        }
        let result = if armed {
            conn.listeners.register(fd, events, id)
        } else {
            conn.listeners.unregister(fd, events, id)
        };
        match result {
            Ok(()) => *watching = armed,
            Err(e) => log::error!("pair {}: cannot change {what:?} watch: {e}", self.index),
        }
    }
}

/// The tap fds a worker may watch.
#[derive(Clone, Copy, Debug)]
enum Watch {
    TapIn = 0,
    TapOut = 1,
}

#[cfg(test)]
mod tests;
