//! What the vhost-user protocol needs from us: features, config space,
//! memory, and which worker thread handles which event.
//!
//! [`NetBackend`] owns the queue pairs (each behind its own lock, taken only
//! by that pair's worker thread and, briefly, by configuration requests) and
//! the counters. It outlives frontend connections: [`NetBackend::connect`]
//! and [`NetBackend::disconnect`] bracket each one.
//!
//! It serves tap queue fds: a real tap's ([`NetBackend::new`]), or any fds
//! that carry one frame per read and write, with a [`TapControl`] for what
//! only a tap can do ([`NetBackend::from_queues`]; the tests use socket
//! pairs and a recorder).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_HOST_USO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::control::config::DeviceConfig;
use crate::datapath::dirty::{self, VHOST_F_LOG_ALL};
use crate::datapath::guest::GuestMem;
use crate::datapath::queue_pair::{Event, Listeners, QueuePair};
use crate::datapath::rx::RxParams;
use crate::datapath::vring::TrackedVring;
use crate::host::tap::{self, Tap, TapControl};
use crate::stats::connections::connection_log;
use crate::stats::Stats;

/// Virtio features offered to the driver of a device with `pairs` queue
/// pairs on a tap that accepts the `TUN_F_*` flags `tap_offloads`
/// ([`TapControl::offloads`]): UDP segmentation offload only where the
/// kernel has it, both ways (a kernel that takes `TUN_F_USO4/6` also takes
/// `VIRTIO_NET_HDR_GSO_UDP_L4` frames on write).
pub fn offered_features(pairs: usize, tap_offloads: u32) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        // We use every ring's buffers in the order they were made
        // available; TX then completes a batch with one used entry.
        VIRTIO_F_IN_ORDER,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        // QEMU then has the guest announce itself after a migration.
        VIRTIO_NET_F_GUEST_ANNOUNCE,
    ];
    if pairs > 1 {
        bits.push(VIRTIO_NET_F_MQ);
    }
    if tap_offloads & tap::USO_OFFLOADS == tap::USO_OFFLOADS {
        bits.extend([
            VIRTIO_NET_F_HOST_USO,
            VIRTIO_NET_F_GUEST_USO4,
            VIRTIO_NET_F_GUEST_USO6,
        ]);
    }
    bits.iter().fold(0u64, |acc, &b| acc | (1u64 << b))
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VHOST_F_LOG_ALL
}

/// vhost-user protocol features offered to the frontend. Only what
/// vhost-user-backend serves: see `../shared/docs/crate-notes.md`.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::LOG_SHMFD
        // SEND_RARP is answered by the relay (the crates have no handler).
        | VhostUserProtocolFeatures::RARP
}

/// A RARP request ("reverse request", RFC 903) from `mac` about itself,
/// broadcast, padded to the 60-byte Ethernet minimum.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]); // to everyone
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]); // address lengths
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(60, 0);
    f
}

/// Receive offloads that let the tap hand us 64 KiB GSO frames.
const GUEST_GSO: u64 = (1u64 << VIRTIO_NET_F_GUEST_TSO4)
    | (1u64 << VIRTIO_NET_F_GUEST_TSO6)
    | (1u64 << VIRTIO_NET_F_GUEST_UFO)
    | (1u64 << VIRTIO_NET_F_GUEST_USO4)
    | (1u64 << VIRTIO_NET_F_GUEST_USO6);

/// The largest header + frame the tap may hand us once the guest acked
/// `features`: 64 KiB GSO frames with receive offloads, else one MTU frame,
/// behind the header length the features call for.
pub fn max_rx_frame(features: u64, mtu: u16) -> usize {
    let has_gso = features & GUEST_GSO != 0 && features & (1u64 << VIRTIO_NET_F_GUEST_CSUM) != 0;
    // Ethernet header plus one VLAN tag in front of the payload.
    let l2 = 18;
    crate::vnet_hdr_len(features)
        + if has_gso {
            65535 + l2
        } else {
            usize::from(mtu) + l2
        }
}

/// What RX may expect once the guest acked `features` on a device that
/// offers `mtu`. With `VIRTIO_NET_F_MTU` acked, a frame without GSO never
/// exceeds that MTU (the virtio spec's device requirement), even when the
/// guest takes 64 KiB GSO frames.
pub fn rx_params(features: u64, mtu: u16) -> RxParams {
    let max_frame = max_rx_frame(features, mtu);
    let mtu_acked = features & (1u64 << VIRTIO_NET_F_MTU) != 0;
    let no_gso = features & !GUEST_GSO;
    RxParams {
        hdr_len: crate::vnet_hdr_len(features),
        mergeable: features & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0,
        max_frame,
        max_plain_frame: if mtu_acked {
            max_rx_frame(no_gso, mtu)
        } else {
            max_frame
        },
    }
}

/// The virtio-net device: its queue pairs, tap and counters.
pub struct NetBackend {
    config: DeviceConfig,
    pairs: Vec<Mutex<QueuePair>>,
    /// The tap's device-wide settings and queue attachment.
    tap_ctl: Arc<dyn TapControl>,
    stats: Arc<Stats>,
    acked_features: AtomicU64,
    /// The virtio-net header length the tap is set to (12 as opened; what
    /// SET_FEATURES applied since): frames the daemon writes itself (a
    /// RARP announce) carry one of this length, whatever raced in.
    tap_hdr_len: std::sync::atomic::AtomicUsize,
    /// The connection's guest memory, whose regions log writes while the
    /// frontend acks `VHOST_F_LOG_ALL` (a migration in progress).
    mem: Mutex<Option<GuestMemoryAtomic<GuestMem>>>,
    /// Exit-event fds handed to vhost-user-backend, which never closes them;
    /// closed after each connection ([`NetBackend::close_abandoned_fds`]).
    abandoned_fds: Mutex<Vec<std::os::fd::RawFd>>,
    /// Syscall filter each worker installs on its first event.
    worker_filter: Option<seccompiler::BpfProgram>,
}

impl NetBackend {
    /// A device serving `tap`'s queues with `config`; workers install
    /// `worker_filter` (see [`crate::host::seccomp`]).
    pub fn new(
        config: DeviceConfig,
        tap: Tap,
        worker_filter: Option<seccompiler::BpfProgram>,
    ) -> io::Result<Self> {
        let tap_ctl = Arc::new(tap.control()?);
        Self::from_queues(config, tap.into_queues(), tap_ctl, worker_filter)
    }

    /// A device serving `queues` (one non-blocking fd per queue pair, in
    /// order, each carrying one frame with its virtio-net header per read
    /// and write, as a tap queue does), whose device-wide settings and
    /// attachment go through `tap_ctl`.
    pub fn from_queues(
        config: DeviceConfig,
        queues: Vec<File>,
        tap_ctl: Arc<dyn TapControl>,
        worker_filter: Option<seccompiler::BpfProgram>,
    ) -> io::Result<Self> {
        if queues.len() != config.queue_pairs {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} tap queue(s) for {} queue pair(s)",
                    queues.len(),
                    config.queue_pairs
                ),
            ));
        }
        let num_queues = 2 * config.queue_pairs;
        let policies = [
            config.rx_coalesce.to_string(),
            config.tx_coalesce.to_string(),
        ];
        let stats = Arc::new(Stats::new(num_queues, policies));
        let pairs = queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let policies = [config.rx_coalesce, config.tx_coalesce];
                let ctl = tap_ctl.clone();
                let mut pair = QueuePair::new(i, num_queues, q, ctl, stats.clone(), policies)?;
                let mode = pair.set_tap_io(config.tap_io);
                log::info!("pair {i}: tap I/O: {mode}");
                // No frontend yet: the kernel must neither queue frames for
                // nobody nor steer flows to us (another backend may share
                // the tap). Attached again when a frontend enables the ring.
                pair.set_tap_attached(false);
                Ok(Mutex::new(pair))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(NetBackend {
            config,
            pairs,
            tap_ctl,
            stats,
            acked_features: AtomicU64::new(0),
            tap_hdr_len: std::sync::atomic::AtomicUsize::new(crate::VNET_HDR_LEN),
            mem: Mutex::default(),
            abandoned_fds: Mutex::default(),
            worker_filter,
        })
    }

    /// The counters of every queue.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Features the driver acked on the current connection (0 before).
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Relaxed)
    }

    fn pair(&self, index: usize) -> MutexGuard<'_, QueuePair> {
        // A worker that panicked left its pair in an unknown state; the
        // counters and fds are still fine to use, so recover the guard.
        self.pairs[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Binds every pair to a new connection's memory and worker epolls.
    pub fn connect(
        &self,
        mem: &GuestMemoryAtomic<GuestMem>,
        listeners: Vec<Arc<dyn Listeners>>,
    ) -> io::Result<()> {
        self.acked_features.store(0, Ordering::Relaxed);
        // The previous frontend's dirty log is not this one's.
        dirty::forget_log();
        *self.mem_slot() = Some(mem.clone());
        for (i, l) in listeners.into_iter().enumerate().take(self.pairs.len()) {
            self.pair(i).connect(mem.clone(), l)?;
        }
        Ok(())
    }

    /// Forgets the connection (its workers are stopping): held interrupts
    /// are signalled and every tap queue is detached until the next
    /// frontend enables its rings.
    pub fn disconnect(&self) {
        for i in 0..self.pairs.len() {
            self.pair(i).disconnect();
        }
        self.acked_features.store(0, Ordering::Relaxed);
        *self.mem_slot() = None;
    }

    fn mem_slot(&self) -> MutexGuard<'_, Option<GuestMemoryAtomic<GuestMem>>> {
        self.mem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logs guest memory writes into the frontend's dirty log while the
    /// acked `features` include `VHOST_F_LOG_ALL`, not otherwise, in every
    /// region of the current memory table (regions created since the last
    /// SET_LOG_BASE get their part of the log first). Returns once no batch
    /// that started before runs: a batch asks once whether to log its
    /// `readv`s, and the frontend counts on the log from its reply on.
    fn apply_logging(&self, features: u64) {
        if let Some(mem) = self.mem_slot().as_ref() {
            let snapshot = mem.memory();
            dirty::attach_log(&snapshot);
            dirty::set_logging(&snapshot, features & VHOST_F_LOG_ALL != 0);
        }
        for i in 0..self.pairs.len() {
            // A worker holds its pair's lock for a whole event.
            drop(self.pair(i));
        }
    }

    /// Re-attaches the queues whose tap interface was deleted, if it exists
    /// again (called periodically by the server, outside the workers'
    /// syscall filter). Returns how many queues came back.
    pub fn reattach_gone_taps(&self) -> usize {
        let framing = tap::Framing::from_features(self.acked_features());
        let mut back = 0;
        for i in 0..self.pairs.len() {
            let mut pair = self.pair(i);
            if !pair.tap_gone() || !self.tap_ctl.exists() {
                continue;
            }
            match pair.reattach(framing) {
                Ok(()) => back += 1,
                Err(e) => log::debug!(
                    "pair {i}: cannot re-attach tap {}: {e}",
                    self.tap_ctl.name()
                ),
            }
        }
        back
    }

    /// Closes the exit-event fds vhost-user-backend abandoned. Call after the
    /// connection's `VhostUserDaemon` has been dropped.
    pub fn close_abandoned_fds(&self) {
        let fds = std::mem::take(
            &mut *self
                .abandoned_fds
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        crate::host::sys::close_abandoned(fds);
    }

    /// The frontend (re)configured vring `queue`: resolve a held interrupt,
    /// clear its error state.
    pub fn vring_reset(&self, queue: usize) {
        if queue / 2 < self.pairs.len() {
            self.pair(queue / 2).ring_reset(queue % 2);
        }
    }

    /// The frontend enabled or disabled ring `queue`. A pair whose RX ring
    /// is disabled has its tap queue detached, so the kernel stops steering
    /// flows to a queue nobody reads (they go to the pairs in use).
    pub fn vring_enabled(&self, queue: usize, enabled: bool) {
        if queue % 2 == 0 && queue / 2 < self.pairs.len() {
            self.pair(queue / 2).set_tap_attached(enabled);
        }
    }

    /// Where ring `queue`'s used ring is to be logged during a migration
    /// (`log_guest_addr`), if the frontend gave one.
    pub fn vring_log_addr(&self, queue: usize, log: Option<u64>) {
        if queue / 2 < self.pairs.len() {
            self.pair(queue / 2)
                .set_used_log(queue % 2, log.map(vm_memory::GuestAddress));
        }
    }

    /// Announces that the guest with `mac` is now behind this tap (after a
    /// live migration, SEND_RARP): one RARP request from `mac`, as QEMU's
    /// own announce does, written into the tap so the switches and bridges
    /// on the host side learn where the MAC went.
    pub fn announce(&self, mac: [u8; 6]) -> io::Result<()> {
        let hdr_len = self.tap_hdr_len.load(Ordering::Relaxed);
        let mut frame = vec![0u8; hdr_len];
        frame.extend_from_slice(&rarp_frame(mac));
        let pair = self.pair(0);
        let written = std::io::Write::write(&mut pair.tap(), &frame)?;
        if written != frame.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "RARP frame cut"));
        }
        connection_log!(
            &self.stats.connections,
            log::Level::Info,
            "announced {} on tap {} (RARP)",
            crate::control::config::format_mac(&mac),
            self.tap_ctl.name()
        );
        Ok(())
    }

    /// The virtio-net config space: MAC, link status, queue pairs, MTU.
    fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.config.mac);
        let status = u16::try_from(VIRTIO_NET_S_LINK_UP).expect("status bit fits u16");
        c[6..8].copy_from_slice(&status.to_le_bytes());
        let pairs = u16::try_from(self.config.queue_pairs).expect("validated by config");
        c[8..10].copy_from_slice(&pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        c
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = crate::datapath::dirty::DirtyLog;
    type Vring = TrackedVring;

    fn num_queues(&self) -> usize {
        2 * self.config.queue_pairs
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.config.queue_size)
    }

    fn features(&self) -> u64 {
        // Called on the crate's request thread only (GET_FEATURES, which
        // the relay sends before any frontend message, and SET_FEATURES):
        // the thread's earliest hook, where it narrows its syscalls.
        crate::host::seccomp::enter(crate::host::seccomp::Class::Requests);
        offered_features(self.config.queue_pairs, self.tap_ctl.offloads())
    }

    fn acked_features(&self, features: u64) {
        let before = self.acked_features.swap(features, Ordering::Relaxed);
        self.apply_logging(features);
        if before != 0 && (before ^ features) == VHOST_F_LOG_ALL {
            // A migration starts or is cancelled: only the log changes.
            let what = if features & VHOST_F_LOG_ALL != 0 {
                "on: a migration started"
            } else {
                "off"
            };
            connection_log!(
                &self.stats.connections,
                log::Level::Info,
                "dirty page logging {what}"
            );
            return;
        }
        let framing = tap::Framing::from_features(features);
        let applied = self.tap_ctl.apply(framing);
        if applied.is_ok() {
            self.tap_hdr_len.store(framing.hdr_len, Ordering::Relaxed);
        }
        if let Err(e) = applied {
            // The header length is what a misframed frame would get wrong:
            // say so, the ring's frames will not make sense to the guest.
            log::error!(
                "cannot set the tap to the guest's {}-byte header and receive offloads: {e}",
                framing.hdr_len
            );
        }
        if !framing.little_endian && cfg!(target_endian = "big") {
            log::error!(
                "the guest did not ack VERSION_1: a legacy device on a big-endian host \
                 is not supported (virtio-queue reads rings as little-endian)"
            );
        }
        let params = rx_params(features, self.config.mtu);
        let in_order = features & (1u64 << VIRTIO_F_IN_ORDER) != 0;
        for i in 0..self.pairs.len() {
            let mut pair = self.pair(i);
            pair.set_rx_params(params);
            pair.set_in_order(in_order);
        }
        connection_log!(
            &self.stats.connections,
            log::Level::Info,
            "features acked: {features:#x} ({}-byte header, tap offloads {:#x}, mergeable RX {}, \
             event index {}, in order {in_order})",
            framing.hdr_len,
            framing.offloads,
            params.mergeable,
            features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        offered_protocol_features()
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Each ring's Queue knows; the data path asks it.
    }

    /// GET_VRING_BASE: the framework calls this before it drops the ring's
    /// call fd, so a held interrupt is signalled now, not into nothing.
    fn stop_vring(&self, queue: u32) -> io::Result<()> {
        let queue = queue as usize;
        if queue / 2 < self.pairs.len() {
            self.pair(queue / 2).ring_stopped(queue % 2);
        }
        Ok(())
    }

    /// RESET_DEVICE: every ring stops (held interrupts are signalled) and is
    /// disabled, so the tap queues are detached until enabled again.
    fn reset_device(&self) {
        for i in 0..self.pairs.len() {
            self.pair(i).reset_device();
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let (offset, size) = (offset as usize, size as usize);
        // The reply must be exactly `size` bytes; fields we do not offer read as 0.
        (offset..offset.saturating_add(size))
            .map(|i| space.get(i).copied().unwrap_or(0))
            .collect()
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        for i in 0..self.pairs.len() {
            self.pair(i).memory_changed();
        }
        // The pairs (and `mem_slot`) hold this same GuestMemoryAtomic, which
        // the framework has already updated; each batch takes a fresh
        // snapshot of it. New regions log as the old ones did.
        self.apply_logging(self.acked_features());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One bitmask per worker thread: pair i has rings 2i and 2i+1.
        (0..self.config.queue_pairs)
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                self.abandoned_fds
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(std::os::fd::AsRawFd::as_raw_fd(&pair.0));
                Some(pair)
            }
            Err(e) => {
                log::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[TrackedVring],
        thread_id: usize,
    ) -> io::Result<()> {
        crate::host::seccomp::apply_once(self.worker_filter.as_ref());
        let Some(event) = Event::from_id(device_event, self.num_queues()) else {
            log::warn!("pair {thread_id}: unknown event id {device_event} ({evset:?})");
            return Ok(());
        };
        if thread_id < self.pairs.len() {
            self.pair(thread_id).handle(event, vrings);
        }
        // Never an error: an error here kills the worker thread for good.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_features_never_include_what_the_crates_cannot_serve() {
        let f = offered_features(2, tap::BASE_OFFLOADS);
        let packed = 1u64 << 34; // VIRTIO_F_RING_PACKED
        let iommu = 1u64 << 33; // VIRTIO_F_ACCESS_PLATFORM
        assert_eq!(f & (packed | iommu), 0);
        assert_ne!(f & (1u64 << VIRTIO_RING_F_EVENT_IDX), 0);
        assert_ne!(f & (1u64 << VIRTIO_F_IN_ORDER), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let p = offered_protocol_features();
        for bad in [
            VhostUserProtocolFeatures::STATUS,
            VhostUserProtocolFeatures::MTU,
            VhostUserProtocolFeatures::INBAND_NOTIFICATIONS,
            VhostUserProtocolFeatures::CROSS_ENDIAN,
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        ] {
            assert!(!p.contains(bad), "{bad:?} offered");
        }
    }

    #[test]
    fn what_live_migration_needs_is_offered() {
        let f = offered_features(1, tap::BASE_OFFLOADS);
        assert_ne!(f & (1u64 << 26), 0, "VHOST_F_LOG_ALL");
        assert_ne!(f & (1u64 << VIRTIO_NET_F_GUEST_ANNOUNCE), 0);
        let p = offered_protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        assert!(p.contains(VhostUserProtocolFeatures::RARP));
    }

    #[test]
    fn rarp_frame_is_a_reverse_request_from_the_mac_about_itself() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(
            (&f[..6], &f[6..12], &f[12..14]),
            (&[0xff; 6][..], &mac[..], &[0x80, 0x35][..])
        );
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!((&f[22..28], &f[32..38]), (&mac[..], &mac[..]));
    }

    #[test]
    fn mq_is_offered_only_with_more_than_one_pair() {
        assert_eq!(
            offered_features(1, tap::BASE_OFFLOADS) & (1u64 << VIRTIO_NET_F_MQ),
            0
        );
        assert_ne!(
            offered_features(2, tap::BASE_OFFLOADS) & (1u64 << VIRTIO_NET_F_MQ),
            0
        );
    }

    #[test]
    fn max_rx_frame_is_64k_with_guest_tso_and_mtu_sized_without() {
        let v1 = 1u64 << VIRTIO_F_VERSION_1;
        let tso = (1u64 << VIRTIO_NET_F_GUEST_CSUM) | (1u64 << VIRTIO_NET_F_GUEST_TSO4);
        assert_eq!(max_rx_frame(v1 | tso, 1500), 12 + 65535 + 18);
        assert_eq!(max_rx_frame(v1, 1500), 12 + 1500 + 18);
        assert_eq!(max_rx_frame(0, 1500), 10 + 1500 + 18, "legacy header");
    }

    const USO: u64 = (1u64 << VIRTIO_NET_F_HOST_USO)
        | (1u64 << VIRTIO_NET_F_GUEST_USO4)
        | (1u64 << VIRTIO_NET_F_GUEST_USO6);

    #[test]
    fn uso_is_offered_when_the_tap_accepts_tun_uso() {
        let f = offered_features(1, tap::BASE_OFFLOADS | tap::USO_OFFLOADS);
        assert_eq!(f & USO, USO);
    }

    #[test]
    fn uso_is_not_offered_when_the_tap_refuses_tun_uso() {
        let f = offered_features(1, tap::BASE_OFFLOADS);
        assert_eq!(f & USO, 0);
        // Everything else stays offered.
        assert_eq!(
            f,
            offered_features(1, tap::BASE_OFFLOADS | tap::USO_OFFLOADS) & !USO
        );
    }

    #[test]
    fn the_device_offers_uso_as_its_tap_control_accepts_it() {
        use crate::testing::tap::RecordingTap;
        let device = |tap: RecordingTap| {
            let (queue, _peer) = crate::testing::unit::tap_pair();
            let config = DeviceConfig {
                tap_io: crate::host::tap::TapIo::Syscall,
                mac: [0x52, 0x54, 0, 0, 0, 1],
                mtu: 1500,
                queue_pairs: 1,
                queue_size: 256,
                rx_coalesce: crate::datapath::notify::Policy::Immediate,
                tx_coalesce: crate::datapath::notify::Policy::Immediate,
            };
            NetBackend::from_queues(config, vec![queue], Arc::new(tap), None).unwrap()
        };
        assert_eq!(device(RecordingTap::new()).features() & USO, USO);
        assert_eq!(device(RecordingTap::refusing_uso()).features() & USO, 0);
    }

    #[test]
    fn max_rx_frame_is_64k_with_guest_uso() {
        let v1 = 1u64 << VIRTIO_F_VERSION_1;
        let uso = (1u64 << VIRTIO_NET_F_GUEST_CSUM)
            | (1u64 << VIRTIO_NET_F_GUEST_USO4)
            | (1u64 << VIRTIO_NET_F_GUEST_USO6);
        assert_eq!(max_rx_frame(v1 | uso, 1500), 12 + 65535 + 18);
        let told = rx_params(v1 | uso | (1u64 << VIRTIO_NET_F_MTU), 1500);
        assert_eq!(told.max_plain_frame, 12 + 1500 + 18);
    }

    #[test]
    fn legacy_feature_set_has_a_10_byte_header_and_no_num_buffers_to_merge() {
        let legacy = rx_params(1u64 << VIRTIO_NET_F_CSUM, 1500);
        assert_eq!((legacy.hdr_len, legacy.mergeable), (10, false));
        let mrg = rx_params(1u64 << VIRTIO_NET_F_MRG_RXBUF, 1500);
        assert_eq!((mrg.hdr_len, mrg.mergeable), (12, true));
        let v1 = rx_params(1u64 << VIRTIO_F_VERSION_1, 1500);
        assert_eq!(v1.hdr_len, 12);
    }

    #[test]
    fn frames_without_gso_are_held_to_the_mtu_only_once_the_guest_acked_it() {
        let tso = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_NET_F_GUEST_CSUM)
            | (1u64 << VIRTIO_NET_F_GUEST_TSO4);
        let told = rx_params(tso | (1u64 << VIRTIO_NET_F_MTU), 1500);
        assert_eq!(told.max_frame, 12 + 65535 + 18);
        assert_eq!(told.max_plain_frame, 12 + 1500 + 18);
        let not_told = rx_params(tso, 1500);
        assert_eq!(not_told.max_plain_frame, not_told.max_frame);
    }
}
