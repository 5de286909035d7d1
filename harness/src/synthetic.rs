//! The benchmark's synthetic guest, shared with the tests: drives a
//! [`TestFrontend`]'s rings as Linux `virtio_net` does (TX bursts with kick
//! suppression and TX NAPI, RX NAPI with a budget of 64), with timestamps in
//! the payload for latency.
//!
//! TX follows Linux with TX NAPI (`napi_tx`, on by default) as the driver
//! has it since commit e13b6da7045f ("virtio-net: tweak for better TX
//! performance in NAPI mode", Linux 6.15; read in drivers/net/virtio_net.c and
//! drivers/virtio/virtio_ring.c of a 2025 linux-next tree), split ring with
//! `VIRTIO_RING_F_EVENT_IDX`. What it writes to `used_event`:
//! - `start_xmit` reclaims nothing. Per frame it calls
//!   `virtqueue_disable_cb`: the first call after callbacks were enabled
//!   writes 0 (`virtqueue_disable_cb_split`), unless an interrupt came since
//!   (`event_triggered`). The queue stops at fewer than 2 + `MAX_SKB_FRAGS`
//!   free descriptors (`tx_may_stop`). The burst's last frame (or the
//!   stopping one) kicks, then `virtqueue_enable_cb_delayed` asks for an
//!   interrupt after 3/4 of what is outstanding (since the last reclaim)
//!   and schedules the TX poll if that many are used already.
//! - A TX interrupt (`vring_interrupt`, `IRQ_NONE` without used entries;
//!   `skb_xmit_done`) schedules `virtnet_poll_tx`: reclaim everything used,
//!   wake the queue, then `virtqueue_enable_cb_prepare` writes `used_event`
//!   = the last used index, an interrupt at the very next completion, and
//!   `virtqueue_poll` re-checks (more used: poll again).
//! - RX NAPI (`virtnet_poll`) first runs `virtnet_poll_cleantx`: reclaim
//!   TX until `virtqueue_enable_cb_delayed` holds.
//!
//! So between a TX poll and the next `start_xmit` the guest asks at the next
//! completion. Here the guest takes interrupts, runs its polls and sends
//! from one thread: an interrupt is taken where the loop looks (between
//! bursts), and the sender is ready right after the poll, as a saturating
//! sender is. Notification costs are paid as busy time ([`ExitCosts`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use vhost_user_net::testing::driver::Buf;
use vm_memory::{Bytes, GuestAddress};

use super::TestFrontend;

pub const RING: u16 = 256;
pub const NAPI_BUDGET: usize = 64;
pub const TX_BURST: usize = 32;
/// Linux's `MAX_SKB_FRAGS` (its default, 17): `tx_may_stop` stops the TX
/// queue when fewer than 2 + this many descriptors are free.
pub const MAX_SKB_FRAGS: usize = 17;
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Frames sent to this MAC are dropped by the kernel right after the tap.
pub const SINK_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const HDR: usize = 12;

/// Offered load: frames per second, or as fast as possible.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    Pps(u64),
    Max,
}

impl Load {
    pub fn label(self) -> String {
        match self {
            Load::Pps(p) if p >= 1000 => format!("{}k pps", p / 1000),
            Load::Pps(p) => format!("{p} pps"),
            Load::Max => "max".to_owned(),
        }
    }
}

/// What a notification costs the guest in a real VM, paid here as busy
/// time on the guest's thread: an interrupt is an injection into the vCPU
/// (and, without posted interrupts, the exits around it and the EOI), a kick
/// is an I/O exit to the host and back. Zero costs model a guest for which
/// notifications are free (an eventfd read in a thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCosts {
    pub irq_ns: u64,
    pub kick_ns: u64,
}

impl ExitCosts {
    /// Spins for `n` notifications of `ns` each; returns the time spent.
    fn pay(n: u64, ns: u64) -> u64 {
        let total = n.saturating_mul(ns);
        if total > 0 {
            let until = Instant::now() + std::time::Duration::from_nanos(total);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        total
    }
}

/// One run's results.
#[derive(Clone, Debug, Default)]
pub struct Result_ {
    pub frames: u64,
    pub bytes: u64,
    pub secs: f64,
    pub interrupts: u64,
    pub kicks: u64,
    /// Guest time spent on notifications ([`ExitCosts`]), in ns.
    pub notify_ns: u64,
    /// Interrupts and kicks on both rings: what would be exits in a VM.
    pub notifications: u64,
    /// Interrupts the daemon held (`interrupts_deferred_total`) on the
    /// measured ring.
    pub deferred: u64,
    /// Frames the kernel dropped before the tap (RX the guest never saw).
    pub tap_drops: u64,
    /// CPU time the daemon used during the run, in ns.
    pub daemon_cpu_ns: u64,
    pub lat: Vec<u64>,
}

impl Result_ {
    #[allow(clippy::cast_precision_loss)]
    pub fn mpps(&self) -> f64 {
        self.frames as f64 / self.secs / 1e6
    }
    #[allow(clippy::cast_precision_loss)]
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs / 1e9
    }
    #[allow(clippy::cast_precision_loss)]
    pub fn per_irq(&self) -> f64 {
        self.frames as f64 / self.interrupts.max(1) as f64
    }
    #[allow(clippy::cast_precision_loss)]
    pub fn kicks_per(&self) -> f64 {
        self.kicks as f64 / self.frames.max(1) as f64
    }
    /// Guest time spent on notifications per frame, in ns.
    #[allow(clippy::cast_precision_loss)]
    pub fn notify_ns_per(&self) -> f64 {
        self.notify_ns as f64 / self.frames.max(1) as f64
    }
    /// Notifications (interrupts + kicks) per second: what would be exits.
    #[allow(clippy::cast_precision_loss)]
    pub fn exits_per_sec(&self) -> f64 {
        self.notifications as f64 / self.secs
    }
    pub fn pct(&mut self, p: usize) -> f64 {
        if self.lat.is_empty() {
            return f64::NAN;
        }
        self.lat.sort_unstable();
        let i = (self.lat.len() * p / 100).min(self.lat.len() - 1);
        #[allow(clippy::cast_precision_loss)]
        let us = self.lat[i] as f64 / 1000.0;
        us
    }
}

/// Nanoseconds since the benchmark's epoch, for payload timestamps.
pub fn now_ns(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).expect("fits")
}

/// An Ethernet + IPv4 + TCP frame of `len` bytes (payload starts at 54)
/// with a virtio-net header in front; GSO for frames beyond 1514 bytes.
pub fn frame(len: usize, dst: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; HDR + len];
    if len > 1514 {
        f[0] = 1; // NEEDS_CSUM
        f[1] = 1; // GSO TCPV4
        f[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        f[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
        f[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        f[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    }
    let e = &mut f[HDR..];
    e[..6].copy_from_slice(&dst);
    e[6..12].copy_from_slice(&GUEST_MAC);
    e[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut e[14..34];
    ip[0] = 0x45;
    let total = u16::try_from(len - 14).unwrap_or(u16::MAX);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[198, 18, 0, 2]);
    ip[16..20].copy_from_slice(&[198, 18, 0, 1]);
    let tcp = &mut e[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x10;
    f
}

/// Where the payload timestamp sits in a frame (after the TCP header).
pub const TS_AT: usize = HDR + 54;

pub struct Guest {
    pub fe: TestFrontend,
    pub epoch: Instant,
    /// Kicks this guest sent, per ring (RX, TX).
    pub kicks: [u64; 2],
    /// What interrupts and kicks cost this guest.
    pub costs: ExitCosts,
    /// Time spent paying [`ExitCosts`] so far, in ns.
    pub notify_ns: u64,
    /// The driver's state of its TX queue.
    tx: TxQueue,
}

/// What Linux's driver keeps about its TX queue that decides what it
/// writes to `used_event`: the virtqueue's (drivers/virtio/virtio_ring.c,
/// `struct vring_virtqueue`) and the send queue's (drivers/net/virtio_net.c).
#[derive(Debug)]
struct TxQueue {
    /// `VRING_AVAIL_F_NO_INTERRUPT` in `avail_flags_shadow`: callbacks
    /// disabled (`virtqueue_disable_cb`) since they were last enabled.
    cb_disabled: bool,
    /// `event_triggered`: `vring_interrupt` ran since callbacks were last
    /// enabled (the device will not interrupt again until they are).
    event_triggered: bool,
    /// The TX poll is scheduled and has not run yet.
    napi_scheduled: bool,
    /// The queue is stopped (`tx_may_stop`) until the TX poll wakes it.
    stopped: bool,
    /// The benchmark's bound on chains in flight (the last `transmit`'s).
    cap: usize,
}

impl Guest {
    pub fn new(fe: TestFrontend) -> Guest {
        Guest {
            fe,
            epoch: Instant::now(),
            kicks: [0; 2],
            costs: ExitCosts::default(),
            notify_ns: 0,
            // Callbacks enabled (`used_event` 0 in the zeroed ring), and
            // `virtnet_napi_tx_enable` schedules the TX poll once.
            tx: TxQueue {
                cb_disabled: false,
                event_triggered: false,
                napi_scheduled: true,
                stopped: false,
                cap: usize::from(RING),
            },
        }
    }
}

impl Guest {
    /// Takes the interrupts delivered on rings `qs` since the last call and
    /// pays for each; returns how many there were.
    pub fn take_interrupts(&mut self, qs: &[usize]) -> u64 {
        let n: u64 = qs.iter().map(|&q| self.fe.vqs[q].take_interrupts()).sum();
        self.notify_ns += ExitCosts::pay(n, self.costs.irq_ns);
        n
    }

    /// Publishes ring `q`'s new avail entries and kicks if the device asks;
    /// pays for the kick.
    fn publish(&mut self, q: usize) -> bool {
        let kicked = self.fe.publish_and_kick(q);
        if kicked {
            self.kicks[q] += 1;
            self.notify_ns += ExitCosts::pay(1, self.costs.kick_ns);
        }
        kicked
    }

    /// Posts `n` 4 KiB mergeable RX buffers.
    pub fn refill(&mut self, n: usize) -> bool {
        if n == 0 {
            return false;
        }
        let vq = &mut self.fe.vqs[0];
        for _ in 0..n {
            let addr = next_slot(vq, 4096);
            let b = Buf {
                addr,
                len: 4096,
                device_writes: true,
            };
            let Some(head) = vq.ring.add_chain(&self.fe.mem, &[b]) else {
                break;
            };
            vq.ring.push_avail(&self.fe.mem, head);
        }
        self.publish(0)
    }

    /// One NAPI poll of RX: up to `budget` frames; returns how many.
    pub fn napi_poll(&mut self, budget: usize, res: &mut Result_, ts_offset: usize) -> usize {
        let mut done = 0;
        let mut bufs = 0;
        while done < budget {
            let Some(u) = self.fe.vqs[0].ring.pop_used(&self.fe.mem) else {
                break;
            };
            bufs += 1;
            let addr = self.buf_addr(0, u.head);
            let mut h = [0u8; HDR];
            let _ = self.fe.mem.read_slice(&mut h, addr);
            let nbuf = u16::from_le_bytes([h[10], h[11]]).max(1);
            let mut len = u64::from(u.len);
            let mut ts = [0u8; 8];
            let _ = self
                .fe
                .mem
                .read_slice(&mut ts, GuestAddress(addr.0 + ts_offset as u64));
            for _ in 1..nbuf {
                match self.fe.vqs[0].ring.pop_used(&self.fe.mem) {
                    Some(more) => {
                        len += u64::from(more.len);
                        bufs += 1;
                    }
                    None => break,
                }
            }
            let sent = u64::from_le_bytes(ts);
            let now = now_ns(self.epoch);
            if sent > 0 && sent <= now && res.lat.len() < 200_000 {
                res.lat.push(now - sent);
            }
            res.frames += 1;
            res.bytes += len - HDR as u64;
            done += 1;
        }
        self.refill(bufs);
        done
    }

    pub fn buf_addr(&self, q: usize, head: u16) -> GuestAddress {
        let at = GuestAddress(self.fe.vqs[q].ring.desc_addr().0 + 16 * u64::from(head));
        GuestAddress(u64::from_le(self.fe.mem.read_obj(at).expect("descriptor")))
    }

    /// Queues up to `n` TX frames (template `f`, timestamped); publishes and
    /// kicks as Linux does at the end of a burst. Returns frames queued.
    pub fn send(&mut self, n: usize, f: &[u8], cap: usize) -> (usize, bool) {
        let sent = self.queue_frames(n, f, cap);
        let kicked = sent > 0 && self.publish(1);
        (sent, kicked)
    }

    /// Adds up to `n` TX frames (template `f`, timestamped) while fewer
    /// than `cap` are in flight, without publishing them; returns how many.
    fn queue_frames(&mut self, n: usize, f: &[u8], cap: usize) -> usize {
        let epoch = self.epoch;
        let vq = &mut self.fe.vqs[1];
        let mut sent = 0;
        while sent < n && usize::from(RING) - vq.ring.free_descriptors() < cap {
            let slot = u32::try_from(f.len().next_multiple_of(4096)).expect("frame fits u32");
            let addr = next_slot(vq, slot);
            let _ = self.fe.mem.write_slice(f, addr);
            let ts = now_ns(epoch).to_le_bytes();
            let _ = self
                .fe
                .mem
                .write_slice(&ts, GuestAddress(addr.0 + TS_AT as u64));
            let b = Buf {
                addr,
                len: u32::try_from(f.len()).expect("frame fits u32"),
                device_writes: false,
            };
            let Some(head) = vq.ring.add_chain(&self.fe.mem, &[b]) else {
                break;
            };
            vq.ring.push_avail(&self.fe.mem, head);
            sent += 1;
        }
        sent
    }

    /// Reclaims TX completions; returns how many, and records completion
    /// latency from the payload timestamp.
    pub fn reclaim(&mut self, res: Option<&mut Result_>, frame_len: usize) -> usize {
        let mut n = 0;
        let mut lat = Vec::new();
        while let Some(u) = self.fe.vqs[1].ring.pop_used(&self.fe.mem) {
            if res.is_some() && n % 16 == 0 {
                let addr = self.buf_addr(1, u.head);
                let mut ts = [0u8; 8];
                let _ = self
                    .fe
                    .mem
                    .read_slice(&mut ts, GuestAddress(addr.0 + TS_AT as u64));
                lat.push(u64::from_le_bytes(ts));
            }
            n += 1;
        }
        if let Some(res) = res {
            let now = now_ns(self.epoch);
            res.lat.extend(
                lat.into_iter()
                    .filter(|&t| t > 0 && t <= now)
                    .map(|t| now - t),
            );
            res.frames += n as u64;
            res.bytes += (n * (frame_len - HDR)) as u64;
        }
        n
    }

    /// One transmit opportunity: Linux's `start_xmit` (drivers/net/virtio_net.c,
    /// TX NAPI on) for each frame of a burst of what `pacer` allows (up to
    /// [`TX_BURST`]; `xmit_more` on all but the last). Nothing is reclaimed
    /// here: with TX NAPI only the TX poll ([`Guest::tx_napi`]) and RX
    /// NAPI's `virtnet_poll_cleantx` ([`Guest::poll_cleantx`]) reclaim.
    ///
    /// - Each frame starts with `virtqueue_disable_cb` ([`Guest::tx_disable_cb`]:
    ///   `used_event` = 0 unless an interrupt came since callbacks were
    ///   last enabled).
    /// - `tx_may_stop`: the queue stops when fewer than 2 + `MAX_SKB_FRAGS`
    ///   descriptors are free (or `cap` chains are in flight, the
    ///   benchmark's own bound); a stopped queue gets no `start_xmit` until
    ///   the TX poll wakes it: [`TxState::Stopped`].
    /// - The burst's last frame, or the one that stopped the queue, kicks
    ///   (`kick` from `__netdev_tx_sent_queue`), then
    ///   `virtqueue_enable_cb_delayed` asks for an interrupt after 3/4 of
    ///   what is outstanding; if more than that is used already, it
    ///   schedules the TX poll (`virtqueue_napi_schedule`).
    pub fn transmit(&mut self, pacer: &mut Pacer, f: &[u8], cap: usize) -> TxState {
        self.tx.cap = cap;
        if self.tx.stopped {
            return TxState::Stopped;
        }
        let n = pacer.allowed(TX_BURST);
        if n == 0 {
            return TxState::NotDue(pacer.next_due());
        }
        let mut sent = 0;
        while sent < n {
            self.tx_disable_cb();
            if self.queue_frames(1, f, usize::from(RING)) == 0 {
                // No descriptor left: tx_may_stop keeps this from happening.
                self.tx.stopped = true;
                break;
            }
            sent += 1;
            if !self.tx_room() {
                self.tx.stopped = true;
                break;
            }
        }
        pacer.sent += sent as u64;
        self.publish(1);
        if !self.tx_enable_cb_delayed() {
            self.tx_napi_schedule();
        }
        if sent == 0 {
            return TxState::Stopped;
        }
        TxState::Sent
    }

    /// `tx_may_stop`'s condition, negated (also `virtnet_poll_tx`'s for
    /// waking the queue): at least 2 + `MAX_SKB_FRAGS` descriptors free,
    /// and fewer than the benchmark's `cap` chains in flight.
    fn tx_room(&self) -> bool {
        self.fe.vqs[1].ring.free_descriptors() >= 2 + MAX_SKB_FRAGS && self.inflight() < self.tx.cap
    }

    /// TX chains the device has not completed.
    pub fn inflight(&self) -> usize {
        usize::from(RING) - self.fe.vqs[1].ring.free_descriptors()
    }

    /// Takes the TX interrupts delivered since the last call, pays for each
    /// and, as Linux's `vring_interrupt` does for one with work
    /// (drivers/virtio/virtio_ring.c; without used entries it is
    /// `IRQ_NONE`), notes `event_triggered` and calls the driver's
    /// `skb_xmit_done`: `virtqueue_disable_cb`, then the TX poll is
    /// scheduled (`virtqueue_napi_schedule`). Returns the interrupts taken.
    pub fn take_tx_interrupts(&mut self) -> u64 {
        let n = self.take_interrupts(&[1]);
        if n > 0 && self.tx_more_used() {
            self.tx.event_triggered = true;
            self.tx_disable_cb();
            self.tx_napi_schedule();
        }
        n
    }

    /// Runs the TX poll if it is scheduled (NAPI runs it in the softirq
    /// after the interrupt, before the sender's next `start_xmit`); returns
    /// the chains reclaimed.
    pub fn tx_napi(&mut self, res: Option<&mut Result_>, frame_len: usize) -> usize {
        if !self.tx.napi_scheduled {
            return 0;
        }
        self.tx_poll(res, frame_len)
    }

    /// Linux's `virtnet_poll_tx`: `virtqueue_disable_cb`, reclaim
    /// everything used (`free_old_xmit`), wake the queue if it has room,
    /// then `virtqueue_enable_cb_prepare` (`used_event` = the next used
    /// entry: an interrupt at the very next completion) and
    /// `napi_complete_done`; if `virtqueue_poll` then finds more used, the
    /// poll is scheduled again (`napi_schedule_prep`, `virtqueue_disable_cb`)
    /// and runs again. Returns the chains reclaimed.
    pub fn tx_poll(&mut self, mut res: Option<&mut Result_>, frame_len: usize) -> usize {
        let mut n = 0;
        loop {
            self.tx_disable_cb();
            n += self.reclaim(res.as_deref_mut(), frame_len);
            if self.tx_room() {
                self.tx.stopped = false;
            }
            let opaque = self.tx_enable_cb_prepare();
            if !self.tx_poll_used(opaque) {
                break;
            }
        }
        self.tx.napi_scheduled = false;
        n
    }

    /// Linux's `virtnet_poll_cleantx`, which RX NAPI's `virtnet_poll` runs
    /// before it receives (TX NAPI on): reclaim TX, each time after
    /// `virtqueue_disable_cb`, until `virtqueue_enable_cb_delayed` finds no
    /// more than 3/4 of the outstanding used; wake the queue if it has room.
    pub fn poll_cleantx(&mut self) -> usize {
        let mut n = 0;
        loop {
            self.tx_disable_cb();
            n += self.reclaim(None, HDR);
            if self.tx_enable_cb_delayed() {
                break;
            }
        }
        if self.tx_room() {
            self.tx.stopped = false;
        }
        n
    }

    /// `virtqueue_napi_schedule`: if the TX poll is not scheduled yet
    /// (`napi_schedule_prep`), `virtqueue_disable_cb` and schedule it.
    fn tx_napi_schedule(&mut self) {
        if !self.tx.napi_scheduled {
            self.tx.napi_scheduled = true;
            self.tx_disable_cb();
        }
    }

    /// `virtqueue_disable_cb` on the TX ring (split ring, EVENT_IDX,
    /// `virtqueue_disable_cb_split`): the first call after callbacks were
    /// enabled sets `VRING_AVAIL_F_NO_INTERRUPT` in the driver's shadow
    /// and, unless an interrupt came since (`event_triggered`: the device
    /// will not send another), writes 0 to `used_event` (the source calls
    /// that value a hack: the device interrupts only when its used index
    /// passes 0, once per 65536 entries). Later calls write nothing.
    fn tx_disable_cb(&mut self) {
        if self.tx.cb_disabled {
            return;
        }
        self.tx.cb_disabled = true;
        if !self.tx.event_triggered {
            self.fe.vqs[1].ring.set_used_event(&self.fe.mem, 0);
        }
    }

    /// `virtqueue_enable_cb_prepare` on the TX ring: clears
    /// `event_triggered` and the shadow flag, writes `used_event` = the
    /// driver's last used index; returns that index for
    /// [`Guest::tx_poll_used`].
    fn tx_enable_cb_prepare(&mut self) -> u16 {
        self.tx.event_triggered = false;
        self.tx.cb_disabled = false;
        let vq = &self.fe.vqs[1];
        let last = vq.ring.last_used();
        vq.ring.set_used_event(&self.fe.mem, last);
        last
    }

    /// `virtqueue_poll`: after a full barrier, whether the device's used
    /// index moved past `opaque`.
    fn tx_poll_used(&self, opaque: u16) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.fe.vqs[1].ring.used_idx(&self.fe.mem) != opaque
    }

    /// Used TX entries the driver has not taken (`more_used_split`).
    fn tx_more_used(&self) -> bool {
        let vq = &self.fe.vqs[1];
        vq.ring.used_idx(&self.fe.mem) != vq.ring.last_used()
    }

    /// Linux's `virtqueue_enable_cb_delayed` on the TX ring
    /// (`virtqueue_enable_cb_delayed_split`): clears `event_triggered` and
    /// the shadow flag, asks for an interrupt after 3/4 of the outstanding
    /// buffers are used, and returns false if more than that are used
    /// already (the caller polls).
    fn tx_enable_cb_delayed(&mut self) -> bool {
        self.tx.event_triggered = false;
        self.tx.cb_disabled = false;
        let inflight = self.inflight();
        let vq = &self.fe.vqs[1];
        let bufs = u16::try_from(inflight * 3 / 4).expect("small");
        let last = vq.ring.last_used();
        vq.ring
            .set_used_event(&self.fe.mem, last.wrapping_add(bufs));
        std::sync::atomic::fence(Ordering::SeqCst);
        vq.ring.used_idx(&self.fe.mem).wrapping_sub(last) <= bufs
    }

    /// RX: `virtqueue_enable_cb_prepare` (interrupt at the next used entry);
    /// returns true if more work already arrived.
    pub fn rx_enable_cb(&self) -> bool {
        let vq = &self.fe.vqs[0];
        vq.ring.set_used_event(&self.fe.mem, vq.ring.last_used());
        std::sync::atomic::fence(Ordering::SeqCst);
        vq.ring.used_idx(&self.fe.mem) != vq.ring.last_used()
    }
}

pub fn next_slot(vq: &mut super::Vq, size: u32) -> GuestAddress {
    vq.set_buf_size(size);
    vq.next_buffer()
}

/// What the sender can do after a transmit opportunity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxState {
    /// It sent a burst and may send more at once.
    Sent,
    /// Its queue is full: it waits for a TX interrupt.
    Stopped,
    /// Paced: nothing is due for this long.
    NotDue(std::time::Duration),
}

/// Waits (halted, as an idle vCPU) until an interrupt arrives on any of
/// `qs` or `timeout` passes.
pub fn wait_irq(g: &Guest, qs: &[usize], timeout: std::time::Duration) {
    let fds: Vec<_> = qs.iter().map(|&q| g.fe.vqs[q].call.as_raw_fd()).collect();
    let _ = vhost_user_net::host::sys::wait_readable_for(&fds, Some(timeout));
}

/// Paces a sender at `load`.
pub struct Pacer {
    start: Instant,
    pub sent: u64,
    pps: Option<u64>,
}

impl Pacer {
    pub fn new(load: Load) -> Self {
        Pacer {
            start: Instant::now(),
            sent: 0,
            pps: match load {
                Load::Pps(p) => Some(p),
                Load::Max => None,
            },
        }
    }

    /// How long until the next frame is due (zero if one is due now, or
    /// unpaced).
    pub fn next_due(&self) -> std::time::Duration {
        let Some(pps) = self.pps else {
            return std::time::Duration::ZERO;
        };
        let due = std::time::Duration::from_secs_f64((self.sent + 1) as f64 / pps as f64);
        due.saturating_sub(self.start.elapsed())
    }

    /// Frames that may be sent now (up to `max`).
    pub fn allowed(&self, max: usize) -> usize {
        match self.pps {
            None => max,
            Some(pps) => {
                let due = u64::try_from(self.start.elapsed().as_micros()).expect("fits") * pps
                    / 1_000_000;
                usize::try_from(due.saturating_sub(self.sent))
                    .unwrap_or(max)
                    .min(max)
            }
        }
    }
}
