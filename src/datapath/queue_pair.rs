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
use crate::stats::connections::connection_log;
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

/// One ring's state for one frontend connection.
struct RingState {
    /// Stopped by a guest fault until the frontend sets the ring up again.
    broken: bool,
    /// Spent its budget with work left: runs again on [`Event::Resume`].
    pending: bool,
    /// The fd this direction waits on, if it is in the epoll set: the tap
    /// (a `dup` of it for TX), or for RX with posted reads their ring.
    watching: Option<RawFd>,
    /// Interrupt coalescing state.
    coalescer: Coalescer,
    /// The deadline the ring's timer is armed for.
    timer_deadline: Option<Instant>,
    /// Until when the policy holds the ring's deferred interrupt (valid
    /// while its coalescer has one deferred).
    hold_until: Option<Instant>,
    /// Where the frontend wants the used ring logged (`log_guest_addr`).
    used_log: Option<vm_memory::GuestAddress>,
}

/// State that lives for one frontend connection.
struct Connection {
    mem: GuestMemoryAtomic<GuestMem>,
    listeners: Arc<dyn Listeners>,
    /// Indexed by ring: RX, TX.
    rings: [RingState; 2],
    /// This pair's `[rx, tx]` vrings, kept from the first event so a held
    /// interrupt can be signalled from outside the worker (ring stop,
    /// device reset, disconnect) while the call fd is still there.
    vrings: Option<[TrackedVring; 2]>,
}

/// What one direction keeps across connections.
struct Direction {
    /// How it coalesces interrupts.
    policy: Policy,
    /// Fires when a held interrupt is due.
    timer: Timer,
    /// The tap fd it waits on when the tap blocks it (RX: the queue fd,
    /// readable; TX: a `dup` of it, writable: epoll cannot hold one fd twice
    /// with different interest), and the event that reports it.
    tap_fd: File,
    tap_events: EventSet,
    tap_event: Event,
    /// Iovec storage its steps reuse (no allocation per frame).
    iov: IoVecBuf,
}

/// RX's buffers between steps: the chains popped for the next frame and
/// the host buffer behind them ([`Bounce`]).
struct RxScratch {
    chains: Vec<RxChain>,
    bounce: Bounce,
}

/// One queue pair: RX is ring 0 of the pair, TX ring 1.
pub struct QueuePair {
    index: usize,
    num_queues: usize,
    tap: File,
    /// Attaches and detaches `tap` (the kernel's tap, or a test's recorder).
    tap_ctl: Arc<dyn TapControl>,
    resume: EventFd,
    stats: Arc<Stats>,
    rx_params: RxParams,
    /// `VIRTIO_F_IN_ORDER` acked: a TX batch's completions are one used
    /// entry ([`Batch::in_order`]).
    in_order: bool,
    /// Indexed by ring: RX, TX.
    dirs: [Direction; 2],
    rx: RxScratch,
    /// The pair's io_uring (`--tap-io uring|auto` where the kernel allows
    /// it), with what TX keeps for it; RX borrows the ring between TX's
    /// batches (one thread: never at once).
    tx_uring: Option<tx::TxUring>,
    /// What RX keeps for the ring (present with it).
    rx_uring: Option<rx::RxUring>,
    /// Whether our tap queue is attached (receives frames from the kernel).
    tap_attached: bool,
    /// Whether it should be: a frontend has this pair's RX ring enabled.
    tap_wanted: bool,
    /// The tap's interface was deleted: our fd is detached until
    /// [`QueuePair::reattach`]. TX drops frames, RX does not watch the fd
    /// (it would report an error forever).
    tap_gone: bool,
    conn: Option<Connection>,
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
        let direction = |ring: usize, tap_fd: File| -> io::Result<Direction> {
            let (tap_events, tap_event) = if ring == RX {
                (EventSet::IN, Event::TapReadable)
            } else {
                (EventSet::OUT, Event::TapWritable)
            };
            Ok(Direction {
                policy: policies[ring],
                timer: Timer::new()?,
                tap_fd,
                tap_events,
                tap_event,
                iov: IoVecBuf::with_capacity(IOV_MAX),
            })
        };
        Ok(QueuePair {
            index,
            num_queues,
            dirs: [
                direction(RX, tap.try_clone()?)?,
                direction(TX, tap.try_clone()?)?,
            ],
            tap,
            tap_ctl,
            resume: EventFd::new(EFD_NONBLOCK)?,
            stats,
            rx_params: RxParams::default(),
            in_order: false,
            rx: RxScratch {
                chains: Vec::with_capacity(usize::from(u16::MAX)),
                bounce: Bounce::default(),
            },
            tx_uring: None,
            rx_uring: None,
            tap_attached: true,
            tap_wanted: true,
            tap_gone: false,
            conn: None,
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
                connection_log!(
                    &self.stats.connections,
                    log::Level::Info,
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
        // A posted read may hold the old tap's last word (EBADFD) still
        // unread: after a re-attach it would mark the tap gone again.
        self.unpost_rx();
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
            for r in &mut conn.rings {
                r.pending = true;
            }
            self.resume.write(1)?;
        }
        Ok(())
    }

    /// Chooses how the pair moves frames to and from the tap
    /// (`--tap-io`): through an io_uring set up here (before the seccomp
    /// filters: the worker then needs only `io_uring_enter`), or one
    /// syscall per frame when `mode` says so or the kernel refuses
    /// io_uring. Returns the mode it runs in, which the counters show too
    /// (`tap_io_info`).
    pub fn set_tap_io(&mut self, mode: crate::host::tap::TapIo) -> &'static str {
        self.tx_uring =
            crate::host::tap::open_uring(mode, &self.tap, self.index).map(tx::TxUring::new);
        let posting = mode == crate::host::tap::TapIo::Posted;
        self.rx_uring = self.tx_uring.as_ref().map(|_| {
            let posted = posting.then(|| {
                crate::datapath::guest::PostedReads::new(&self.tap)
                    .inspect_err(|e| {
                        log::info!(
                            "pair {}: no posted reads ({e}): RX reads by rounds",
                            self.index
                        );
                    })
                    .ok()
            });
            rx::RxUring::new(posted.flatten())
        });
        self.show_tap_io();
        self.stats.tap_io(2 * self.index + TX)
    }

    /// Tells the counters how the pair's queues move frames: through the
    /// ring or not, RX with posted reads or not.
    fn show_tap_io(&self) {
        use crate::stats::{TAP_IO_POSTED, TAP_IO_SYSCALL, TAP_IO_URING};
        let uring = if self.tx_uring.is_some() {
            TAP_IO_URING
        } else {
            TAP_IO_SYSCALL
        };
        let rx = if self.rx_uring.as_ref().is_some_and(rx::RxUring::posting) {
            TAP_IO_POSTED
        } else {
            uring
        };
        for (ring, mode) in [(RX, rx), (TX, uring)] {
            self.stats.tap_io_mode[2 * self.index + ring]
                .store(mode, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Sets what RX may expect from the tap (at SET_FEATURES).
    pub fn set_rx_params(&mut self, params: RxParams) {
        if params != self.rx_params {
            // Chains posted for the old largest frame may be too short.
            self.unpost_rx();
        }
        self.rx_params = params;
        if let Some(st) = self.rx_uring.as_mut() {
            st.features_changed();
        }
        self.show_tap_io();
    }

    /// Whether the driver acked `VIRTIO_F_IN_ORDER` (at SET_FEATURES).
    pub fn set_in_order(&mut self, in_order: bool) {
        self.in_order = in_order;
    }

    /// Starts serving a new connection: guest memory and the worker's epoll.
    pub fn connect(
        &mut self,
        mem: GuestMemoryAtomic<GuestMem>,
        listeners: Arc<dyn Listeners>,
    ) -> io::Result<()> {
        let n = self.num_queues;
        listeners.register(self.resume.as_raw_fd(), EventSet::IN, Event::Resume.id(n))?;
        for (dir, event) in self.dirs.iter().zip([Event::RxTimer, Event::TxTimer]) {
            dir.timer.set(None)?;
            listeners.register(dir.timer.as_raw_fd(), EventSet::IN, event.id(n))?;
        }
        let ring = |coalescer| RingState {
            broken: false,
            pending: false,
            watching: None,
            coalescer,
            timer_deadline: None,
            hold_until: None,
            used_log: None,
        };
        self.conn = Some(Connection {
            mem,
            listeners,
            rings: [
                ring(Coalescer::for_receive(self.dirs[RX].policy)),
                ring(Coalescer::new(self.dirs[TX].policy)),
            ],
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
        self.reset_device();
        self.conn = None;
    }

    /// The device is reset (RESET_DEVICE, or the frontend went away): held
    /// interrupts are signalled, a frame held for the guest's RX buffers is
    /// dropped (and counted: the re-initialised driver must not get it),
    /// and the tap queue is detached until a ring is enabled again.
    pub fn reset_device(&mut self) {
        for ring in [RX, TX] {
            self.ring_stopped(ring);
        }
        self.rx
            .bounce
            .drop_held(&self.stats.queues[2 * self.index + RX]);
        self.set_tap_attached(false);
    }

    /// The frontend set ring `ring` (0 RX, 1 TX) up again: forget that it
    /// was broken; the next interrupt decision is a fresh start's.
    pub fn ring_reset(&mut self, ring: usize) {
        self.ring_stopped(ring);
        if let Some(r) = self.conn.as_mut().and_then(|c| c.rings.get_mut(ring)) {
            r.broken = false;
        }
    }

    /// The frontend wants ring `ring`'s used ring logged at `log` during a
    /// migration (`SET_VRING_ADDR` with `VHOST_VRING_F_LOG`).
    pub fn set_used_log(&mut self, ring: usize, log: Option<vm_memory::GuestAddress>) {
        if let Some(r) = self.conn.as_mut().and_then(|c| c.rings.get_mut(ring)) {
            r.used_log = log;
        }
    }

    /// Ring `ring` stops (GET_VRING_BASE, a device reset, a disconnect, or
    /// it is set up again): signal its held interrupt while the call fd is
    /// still there, disarm its timer, and make the next decision a fresh
    /// start's (which signals if the guest may still be waiting).
    pub fn ring_stopped(&mut self, ring: usize) {
        if ring == RX {
            self.unpost_rx();
        }
        let (Some(conn), Some(dir)) = (self.conn.as_mut(), self.dirs.get(ring)) else {
            return;
        };
        let r = &mut conn.rings[ring];
        let held = r.coalescer.take_held();
        r.coalescer.reset();
        if r.timer_deadline.take().is_some() {
            if let Err(e) = dir.timer.set(None) {
                log::warn!(
                    "pair {}: cannot disarm the interrupt timer: {e}",
                    self.index
                );
            }
        }
        let vring = conn.vrings.as_ref().map(|v| v[ring].clone());
        if let (true, Some(vring)) = (held, vring) {
            self.signal_held(ring, &vring, &vring.get_ref());
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
        let runs = match event {
            Event::RxKick | Event::TapReadable => [true, false],
            Event::TxKick | Event::TapWritable => [false, true],
            Event::Resume => {
                let _ = self.resume.read();
                let conn = self.conn.as_mut().expect("checked above");
                conn.rings
                    .each_mut()
                    .map(|r| std::mem::take(&mut r.pending))
            }
            Event::RxTimer | Event::TxTimer => {
                let ring = if event == Event::RxTimer { RX } else { TX };
                let _ = self.dirs[ring].timer.take();
                if let Some(conn) = self.conn.as_mut() {
                    conn.rings[ring].timer_deadline = None;
                }
                self.fire_timer(ring, &vrings[ring]);
                [false, false]
            }
        };
        // TX first: its completions free guest memory RX may then fill.
        for ring in [TX, RX] {
            if runs[ring] {
                self.run(ring, &vrings[ring]);
            }
        }
        self.check_holds(vrings);
    }

    /// After each event: a held interrupt whose time is up is decided now;
    /// one still held is covered by its timer only if the worker may go
    /// idle. While a resume is pending the worker comes back here at once,
    /// so a busy worker ends holds without a timer (arming one is a
    /// hypervisor exit on a VM's host: about 15 us on our test machine).
    fn check_holds(&mut self, vrings: &[TrackedVring]) {
        for ring in [RX, TX] {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            let r = &conn.rings[ring];
            let Some(due) = r.hold_until.filter(|_| r.coalescer.deferred()) else {
                continue;
            };
            if due <= Instant::now() {
                self.fire_timer(ring, &vrings[ring]);
            }
            self.cover_hold(ring, &vrings[ring]);
        }
    }

    /// Arms ring `ring`'s timer for its held interrupt, unless the worker
    /// runs again at once (a resume is pending) or a timer fires no later.
    fn cover_hold(&mut self, ring: usize, vring: &TrackedVring) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let busy = conn.rings.iter().any(|r| r.pending);
        let r = &mut conn.rings[ring];
        let Some(due) = r.hold_until.filter(|_| r.coalescer.deferred()) else {
            return;
        };
        // An armed timer that fires no later decides again then: moving a
        // deadline out costs no syscall.
        if busy || r.timer_deadline.is_some_and(|armed| armed <= due) {
            return;
        }
        let after = due.saturating_duration_since(Instant::now());
        match self.dirs[ring].timer.set(Some(after)) {
            Ok(()) => r.timer_deadline = Some(due),
            Err(e) => {
                // Nothing would ever fire: signal now rather than leave the
                // guest waiting.
                log::error!("pair {}: cannot arm the interrupt timer: {e}", self.index);
                if r.coalescer.take_held() {
                    self.signal_held(ring, vring, &vring.get_ref());
                }
            }
        }
    }

    /// The guest's memory table changed: chains posted for RX point into
    /// the old one (kept mapped while they are posted): take them back.
    pub fn memory_changed(&mut self) {
        self.unpost_rx();
    }

    /// Ends RX's posted reads outside a batch: their chains go back to the
    /// ring (they are the last the ring popped: a batch gives back the
    /// chains it did not use before it ends), and frames the kernel read
    /// into them are dropped and counted.
    fn unpost_rx(&mut self) {
        let Some(st) = self.rx_uring.as_mut() else {
            return;
        };
        // The reads' ring stays in the epoll set if it is there: with every
        // completion taken it is not readable, and RX's next batch watches
        // what it then needs (epoll_ctl is the worker's to call).
        let (chains, frames) = st.unpost();
        if chains == 0 {
            return;
        }
        self.queue_stats(RX).rx_dropped_frames.add(frames);
        // RX waits on what it then needs (the tap, the guest's kick) only
        // once it has run again: the guest will not kick for the chains
        // it gave before, and nothing else would wake it.
        self.resume_later(RX);
        let vring = self
            .conn
            .as_ref()
            .and_then(|c| c.vrings.as_ref())
            .map(|v| v[RX].clone());
        if let Some(vring) = vring {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let back = u16::try_from(chains).expect("at most POSTED_READS");
            queue.set_next_avail(queue.next_avail().wrapping_sub(back));
        }
    }

    fn queue_stats(&self, ring: usize) -> &QueueStats {
        &self.stats.queues[2 * self.index + ring]
    }

    /// Runs one batch on ring `ring` (RX or TX: only the step differs),
    /// acts on its interrupt verdict, and decides what to wait for next.
    fn run(&mut self, ring: usize, vring: &TrackedVring) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mem = conn.mem.memory().into_inner();
        let mut state = vring.get_mut();
        let idle = conn.rings[ring].broken
            || !state.is_enabled()
            || !state.get_queue().ready()
            || (ring == RX && self.tap_gone);
        if idle {
            drop(state);
            self.watch_tap(ring, false);
            return;
        }
        let posting = self.rx_uring.as_ref().is_some_and(rx::RxUring::posting);
        let queue_index = 2 * self.index + ring;
        let stats = &self.stats.queues[queue_index];
        let used_log = conn.rings[ring].used_log;
        let coalescer = &mut conn.rings[ring].coalescer;
        let (dir, rx, params) = (&mut self.dirs[ring], &mut self.rx, self.rx_params);
        let tap = (!self.tap_gone).then_some(&self.tap);
        // RX completes each chain with its own length: the driver reads
        // every entry (DPDK's in-order RX does), so only TX batches them.
        let in_order = self.in_order && ring == TX;
        let result =
            Batch::begin(state.get_queue_mut(), &mem, stats, queue_index).and_then(|mut batch| {
                batch.log_used_at(used_log);
                batch.in_order(in_order);
                let end = match ring {
                    RX => {
                        let tap = tap.expect("RX does not run while the tap is gone");
                        let mut iovecs = dir.iov.bind(&mem);
                        let mut buffers = RxBuffers {
                            chains: &mut rx.chains,
                            iovecs: &mut iovecs,
                            bounce: &mut rx.bounce,
                        };
                        let end = match (self.tx_uring.as_mut(), self.rx_uring.as_mut()) {
                            (Some(u), Some(st)) => {
                                st.start_batch();
                                let ring = u.ring_mut();
                                batch.drain(BUDGET_FRAMES, |b| {
                                    rx::step_batched(b, st, ring, &mut buffers, &mem, tap, params)
                                })
                            }
                            _ => batch
                                .drain(BUDGET_FRAMES, |b| rx::step(b, &mut buffers, tap, params)),
                        };
                        buffers.give_back(&mut batch);
                        end
                    }
                    _ => tx::drain(
                        &mut batch,
                        BUDGET_FRAMES,
                        &mut dir.iov,
                        self.tx_uring.as_mut(),
                        tap,
                        params.hdr_len,
                    ),
                }?;
                Ok((end, batch.finish(coalescer)?))
            });
        let end = self.settle_batch(result, vring, &state, ring);
        drop(state);
        if ring == RX && self.rx_uring.as_ref().is_some_and(rx::RxUring::posting) != posting {
            // The guest's chains cannot be posted, or the reads' ring failed.
            self.show_tap_io();
        }
        let failed = self.tx_uring.as_ref().is_some_and(tx::TxUring::failed)
            || self.rx_uring.as_ref().is_some_and(rx::RxUring::failed);
        if failed {
            // One ring serves both directions: what a failed enter left in
            // its submission queue must never go out with the other's
            // requests.
            self.unpost_rx();
            // RX may be watching the posted reads' ring, which goes now.
            self.watch_tap(RX, false);
            self.tx_uring = None;
            self.rx_uring = None;
            self.show_tap_io();
            log::error!(
                "pair {}: io_uring failed: the tap is read and written with plain syscalls from now on",
                self.index
            );
        }
        match end {
            Some(End::TapBlocked) => self.watch_tap(ring, true),
            Some(End::RingEmpty) | None => self.watch_tap(ring, false),
            Some(End::BudgetSpent) => {
                // The resume event gives this direction its next turn, after
                // the other's: a level-triggered tap watch would give RX a
                // second one.
                self.watch_tap(ring, false);
                self.resume_later(ring);
            }
            Some(End::TapGone) => {
                self.mark_tap_gone();
                self.watch_tap(ring, false);
                if ring == TX {
                    // The rest of the guest's frames are dropped without
                    // touching the tap, on the next turn.
                    self.resume_later(TX);
                }
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
        match result {
            Ok((end, verdict)) => {
                self.apply_verdict(ring, verdict, vring, state);
                Some(end)
            }
            Err(e) => {
                if matches!(e, RingError::BadAvailIndex(_)) {
                    self.queue_stats(ring).bad_avail_index.inc();
                }
                log::error!(
                    "queue {} stopped until the frontend resets it: {e}",
                    2 * self.index + ring
                );
                if let Some(conn) = self.conn.as_mut() {
                    conn.rings[ring].broken = true;
                }
                None
            }
        }
    }

    /// Signals the guest, or records until when its interrupt is held.
    /// `state` is `vring`'s, locked by the caller.
    fn apply_verdict(
        &mut self,
        ring: usize,
        verdict: Verdict,
        vring: &TrackedVring,
        state: &VringState<GuestMemoryAtomic<GuestMem>>,
    ) {
        let deadline = match verdict {
            Verdict::Signal => return self.signal_locked(ring, vring, state),
            Verdict::Suppress => return,
            Verdict::Defer(deadline) => deadline,
        };
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.rings[1 - ring].coalescer.deferred() {
            // The pair's other interrupt is held already: a guest waiting
            // for either would wait for both. One held per pair.
            if conn.rings[ring].coalescer.take_held() {
                self.signal_held(ring, vring, state);
            }
            return;
        }
        // Covered by the timer, or by the worker's next turn
        // ([`QueuePair::check_holds`]).
        conn.rings[ring].hold_until = Some(deadline);
    }

    /// Signals a held interrupt of `ring` outside a batch's decision
    /// (counted here: batches count their own verdicts); `state` is
    /// `vring`'s.
    fn signal_held(
        &self,
        ring: usize,
        vring: &TrackedVring,
        state: &VringState<GuestMemoryAtomic<GuestMem>>,
    ) {
        self.queue_stats(ring).interrupts_sent.inc();
        self.signal_locked(ring, vring, state);
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

    /// A ring's held interrupt is due (its timer fired, or the worker
    /// found it due): decide about it.
    fn fire_timer(&mut self, ring: usize, vring: &TrackedVring) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let r = &mut conn.rings[ring];
        let mem = conn.mem.memory();
        let state = vring.get_ref();
        let stats = &self.stats.queues[2 * self.index + ring];
        let verdict = batch::on_timer(state.get_queue(), &mem, stats, &mut r.coalescer);
        self.apply_verdict(ring, verdict, vring, &state);
    }

    fn resume_later(&mut self, ring: usize) {
        if let Some(conn) = self.conn.as_mut() {
            // The other direction's pending turn wrote the eventfd already
            // (the resume event takes both flags at once): one write per
            // turn, not one per direction.
            let written = conn.rings.iter().any(|r| r.pending);
            conn.rings[ring].pending = true;
            if written {
                return;
            }
        }
        if let Err(e) = self.resume.write(1) {
            log::error!("pair {}: cannot schedule more work: {e}", self.index);
        }
    }

    /// Registers or unregisters the fd direction `ring` waits on when the
    /// tap blocks it (RX: the tap readable, or the posted reads' ring
    /// while reads are posted; TX: the tap writable) in the connection's
    /// epoll when that changes.
    fn watch_tap(&mut self, ring: usize, armed: bool) {
        let dir = &self.dirs[ring];
        let posted = (ring == RX)
            .then(|| self.rx_uring.as_ref().and_then(rx::RxUring::posted_fd))
            .flatten();
        let (fd, events, id) = (
            posted.unwrap_or(dir.tap_fd.as_raw_fd()),
            dir.tap_events,
            dir.tap_event.id(self.num_queues),
        );
        let want = armed.then_some(fd);
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let watching = &mut conn.rings[ring].watching;
        if *watching == want {
            return;
        }
        if let Some(old) = *watching {
            match conn.listeners.unregister(old, events, id) {
                Ok(()) => *watching = None,
                Err(e) => log::error!(
                    "pair {}: cannot stop the {:?} watch: {e}",
                    self.index,
                    dir.tap_event
                ),
            }
        }
        if let Some(new) = want {
            match conn.listeners.register(new, events, id) {
                Ok(()) => *watching = Some(new),
                Err(e) => log::error!(
                    "pair {}: cannot start the {:?} watch: {e}",
                    self.index,
                    dir.tap_event
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests;
