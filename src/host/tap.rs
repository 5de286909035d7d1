//! The Linux tap interface: create or attach, one fd per queue pair,
//! `IFF_VNET_HDR`, and the header length, byte order and offloads the
//! guest's features call for ([`Framing`]).
//!
//! Knows the kernel's tap API (through [`crate::host::sys`]) and the mapping from
//! virtio-net offload feature bits to `TUN_F_*` flags; nothing about rings.
//!
//! The device reads and writes frames on the queue fds; everything else it
//! asks of the tap goes through [`TapControl`], which [`KernelTap`]
//! implements with ioctls. A socket pair standing in for a tap queue (in the
//! tests) carries frames the same way but has none of those ioctls: its
//! control is a recorder instead.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6,
};

use crate::host::sys;
use crate::VNET_HDR_LEN;

/// How a queue pair moves frames to the tap (`--tap-io`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TapIo {
    /// io_uring where the kernel allows it, plain syscalls otherwise (the
    /// default: see `docs/performance.md`, "io_uring tap I/O").
    Auto,
    /// io_uring; plain syscalls (with a warning) where it is refused.
    Uring,
    /// As `uring`, and RX keeps reads posted into the guest's buffers
    /// across events where it can (Linux >= 6.7; see
    /// `docs/performance.md`, "Posted RX reads": slower than rounds at
    /// saturation on our test machine).
    Posted,
    /// One `writev` per frame.
    Syscall,
}

/// Sets up an io_uring for a pair's tap writes if `mode` asks for one,
/// saying why not when the kernel refuses it (ENOSYS: no io_uring; EPERM:
/// `kernel.io_uring_disabled` or a container's seccomp profile).
pub fn open_uring(mode: TapIo, tap: &File, pair: usize) -> Option<sys::Uring> {
    if mode == TapIo::Syscall {
        return None;
    }
    match sys::Uring::new(tap.as_fd()) {
        Ok(ring) => Some(ring),
        Err(e) => {
            let level = if mode != TapIo::Auto {
                log::Level::Warn
            } else {
                log::Level::Info
            };
            log::log!(
                level,
                "pair {pair}: io_uring refused ({e}): tap writes use writev"
            );
            None
        }
    }
}

/// Errors opening or configuring the tap. All are host faults.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open queue {queue} of tap {name} ({hint})")]
    Open {
        name: String,
        queue: usize,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure tap {name}: {what}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An open multiqueue tap: one non-blocking fd per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
    created: bool,
    mtu: u32,
    /// `TUN_F_*` flags the kernel accepts on this tap ([`probe_uso`]).
    offloads: u32,
}

/// How the tap must frame what it hands us and takes from us, from the
/// guest's acked features. Device-wide: applying it through one queue fd
/// sets it for all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    /// `TUNSETVNETHDRSZ`: 12, or 10 for a legacy feature set.
    pub hdr_len: usize,
    /// `TUNSETVNETLE`: header fields little-endian (VERSION_1), else in the
    /// host's byte order (legacy).
    pub little_endian: bool,
    /// `TUNSETOFFLOAD` flags ([`offload_flags`]).
    pub offloads: u32,
}

impl Framing {
    pub fn from_features(features: u64) -> Framing {
        Framing {
            hdr_len: crate::vnet_hdr_len(features),
            little_endian: features & (1u64 << VIRTIO_F_VERSION_1) != 0,
            offloads: offload_flags(features),
        }
    }
}

/// `TUN_F_*` flags every kernel we run on accepts (UFO is dropped again
/// where refused, see [`set_offloads`]).
pub const BASE_OFFLOADS: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN | libc::TUN_F_UFO;

/// UDP segmentation offload (Linux >= 6.2): the kernel takes the two only
/// together, and only with `TUN_F_CSUM`.
pub const USO_OFFLOADS: u32 = libc::TUN_F_USO4 | libc::TUN_F_USO6;

/// `TUN_F_*` offload flags the kernel may use for frames it gives us, from
/// the guest's acked `VIRTIO_NET_F_GUEST_*` features.
pub fn offload_flags(features: u64) -> u32 {
    let map = [
        (VIRTIO_NET_F_GUEST_CSUM, libc::TUN_F_CSUM),
        (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_ECN, libc::TUN_F_TSO_ECN),
        (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
        (VIRTIO_NET_F_GUEST_USO4, libc::TUN_F_USO4),
        (VIRTIO_NET_F_GUEST_USO6, libc::TUN_F_USO6),
    ];
    let mut flags = 0;
    for (bit, flag) in map {
        if features & (1 << bit) != 0 {
            flags |= flag;
        }
    }
    // The kernel refuses one of USO4/USO6 without the other (EINVAL, which
    // would cost every other offload): a guest that takes only one gets
    // segmented datagrams, which it may always receive.
    if flags & USO_OFFLOADS != USO_OFFLOADS {
        flags &= !USO_OFFLOADS;
    }
    // Segmentation offloads are meaningless (and refused) without checksum.
    if flags & libc::TUN_F_CSUM == 0 {
        flags = 0;
    }
    flags
}

/// What the device asks of the tap besides frames on its queue fds: the
/// framing of every queue, and which queues the kernel hands frames to.
pub trait TapControl: Send + Sync {
    /// The interface's name, for logs.
    fn name(&self) -> &str;

    /// The `TUN_F_*` offload flags the tap accepts: what the device may
    /// offer the guest ([`crate::control::backend::offered_features`]).
    fn offloads(&self) -> u32;

    /// Applies `framing` to the whole device (every queue).
    fn apply(&self, framing: Framing) -> io::Result<()>;

    /// Attaches (or detaches) queue `index`, whose fd is `queue`: whether
    /// the kernel queues frames on it and steers flows to it.
    fn set_queue_attached(&self, index: usize, queue: &File, attached: bool) -> io::Result<()>;

    /// Whether the interface exists (it may be deleted and re-created
    /// while we hold its queues).
    fn exists(&self) -> bool;

    /// Attaches queue `index` (fd `queue`) to the re-created interface,
    /// with `framing`.
    fn reattach(&self, index: usize, queue: &File, framing: Framing) -> io::Result<()>;
}

/// The kernel's tap as [`TapControl`]: device-wide ioctls through a second
/// handle on queue 0, so configuration requests never wait for a worker.
#[derive(Debug)]
pub struct KernelTap {
    name: String,
    device: File,
    offloads: u32,
}

impl TapControl for KernelTap {
    fn name(&self) -> &str {
        &self.name
    }

    fn offloads(&self) -> u32 {
        self.offloads
    }

    fn apply(&self, framing: Framing) -> io::Result<()> {
        apply(&self.device, framing)
    }

    fn set_queue_attached(&self, _index: usize, queue: &File, attached: bool) -> io::Result<()> {
        sys::tun_set_queue(queue, attached)
    }

    fn exists(&self) -> bool {
        exists(&self.name)
    }

    fn reattach(&self, _index: usize, queue: &File, framing: Framing) -> io::Result<()> {
        reattach(queue, &self.name, framing)
    }
}

impl Tap {
    /// Attaches `pairs` queues to tap `name`, creating it (and setting its
    /// link up) if it does not exist. With `mtu`, sets the interface MTU.
    pub fn open(name: &str, pairs: usize, mtu: Option<u16>) -> Result<Tap, TapError> {
        let existed = exists(name);
        let flags = queue_flags();
        let mut queues = Vec::with_capacity(pairs);
        for queue in 0..pairs {
            let file = sys::tun_set_iff(name, flags).map_err(|source| TapError::Open {
                name: name.to_owned(),
                queue,
                hint: open_hint(&source, existed),
                source,
            })?;
            set_vnet_hdr_size(&file, VNET_HDR_LEN).map_err(|source| TapError::Configure {
                name: name.to_owned(),
                what: "set the virtio-net header size",
                source,
            })?;
            queues.push(file);
        }
        let mut tap = Tap {
            name: name.to_owned(),
            queues,
            created: !existed,
            mtu: 0,
            offloads: BASE_OFFLOADS,
        };
        if let Some(mtu) = mtu {
            sys::set_mtu(name, mtu).map_err(|source| tap.configure_error("set the MTU", source))?;
        }
        tap.mtu = sys::mtu(name).map_err(|source| tap.configure_error("read the MTU", source))?;
        if tap.created {
            sys::set_link_up(name)
                .map_err(|source| tap.configure_error("set the link up", source))?;
        }
        match probe_uso(&tap.queues[0]) {
            Ok(()) => tap.offloads |= USO_OFFLOADS,
            Err(e) => log::info!(
                "tap {name}: the kernel refuses UDP segmentation offload (TUN_F_USO4/6, \
                 Linux >= 6.2): {e}; HOST_USO and GUEST_USO4/6 are not offered"
            ),
        }
        tap.set_offload_flags(0)?;
        log::info!(
            "tap {name}: {} with {pairs} queue(s)",
            if tap.created { "created" } else { "attached" }
        );
        Ok(tap)
    }

    fn configure_error(&self, what: &'static str, source: io::Error) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source,
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's MTU when it was opened (after `--mtu` was applied).
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// What to tell the user when the tap's MTU is not the `guest_mtu`
    /// offered to the guest; `None` when they agree.
    pub fn mtu_mismatch(&self, guest_mtu: u16) -> Option<String> {
        let (tap, guest) = (self.mtu, u32::from(guest_mtu));
        let name = &self.name;
        let consequence = if tap > guest {
            format!(
                "frames longer than {guest} bytes from the tap will be dropped and counted \
                 in rx_dropped_oversize_frames_total"
            )
        } else if tap < guest {
            format!("frames longer than {tap} bytes from the guest may be dropped by the host")
        } else {
            return None;
        };
        Some(format!(
            "tap {name} has MTU {tap} but the guest is offered MTU {guest}: {consequence}; \
             give --mtu {tap} to offer the tap's MTU (or change the tap's)"
        ))
    }

    /// Whether this process created the interface (it goes away with us).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Takes the per-queue fds (one per queue pair, in order).
    pub fn into_queues(self) -> Vec<File> {
        self.queues
    }

    /// The device's control, on a second handle of queue 0.
    pub fn control(&self) -> io::Result<KernelTap> {
        let first = self
            .queues
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "tap has no queues"))?;
        Ok(KernelTap {
            name: self.name.clone(),
            device: first.try_clone()?,
            offloads: self.offloads,
        })
    }

    /// Applies `TUN_F_*` offload flags (device-wide, through queue 0).
    pub fn set_offload_flags(&self, flags: u32) -> Result<(), TapError> {
        set_offloads(&self.queues[0], flags)
            .map_err(|source| self.configure_error("set offloads", source))
    }
}

/// `TUNSETIFF` flags of every queue: tap, no packet info, virtio-net
/// header, multiqueue.
fn queue_flags() -> i16 {
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;
    i16::try_from(flags).expect("IFF_* flags fit in a short")
}

fn set_vnet_hdr_size(queue: &File, len: usize) -> io::Result<()> {
    sys::tun_set_vnet_hdr_size(queue, i32::try_from(len).expect("10 or 12 fits"))
}

/// Whether a tap read or write failed because the interface was deleted
/// under our fd (EBADFD): it stays so until [`reattach`].
pub fn is_gone(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::EBADFD)
}

/// Whether interface `name` exists.
pub fn exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Re-attaches a queue fd to tap `name` after the interface was deleted and
/// re-created (the kernel detached our fd), with the `framing` it had.
pub fn reattach(queue: &File, name: &str, framing: Framing) -> io::Result<()> {
    sys::tun_attach(queue, name, queue_flags())?;
    apply(queue, framing)
}

/// Applies `framing` to the tap behind `queue`: header length, byte order,
/// offloads.
pub fn apply(queue: &File, framing: Framing) -> io::Result<()> {
    set_vnet_hdr_size(queue, framing.hdr_len)?;
    sys::tun_set_vnet_le(queue, framing.little_endian)?;
    set_offloads(queue, framing.offloads)
}

/// Whether the kernel's tap behind `queue` takes UDP segmentation offload:
/// `TUNSETOFFLOAD` with checksum and USO, which kernels before 6.2 refuse
/// (EINVAL for a flag they do not know). Leaves those flags set; the
/// caller sets what it wants next. Taking `TUN_F_USO4/6` also means the
/// tap takes `VIRTIO_NET_HDR_GSO_UDP_L4` frames on write (same release).
pub fn probe_uso(queue: &File) -> io::Result<()> {
    sys::tun_set_offload(queue, libc::TUN_F_CSUM | USO_OFFLOADS)
}

/// Applies `flags` to the tap behind `queue`. If the kernel refuses UFO
/// (older kernels), retries without it.
pub fn set_offloads(queue: &File, flags: u32) -> io::Result<()> {
    match sys::tun_set_offload(queue, flags) {
        Err(e) if flags & libc::TUN_F_UFO != 0 && e.raw_os_error() == Some(libc::EINVAL) => {
            log::warn!("kernel refuses UFO on the tap; guest UFO frames will be segmented");
            sys::tun_set_offload(queue, flags & !libc::TUN_F_UFO)
        }
        other => other,
    }
}

fn open_hint(e: &io::Error, existed: bool) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "needs CAP_NET_ADMIN, or a tap owned by this user"
        }
        Some(libc::EINVAL) if existed => {
            "the existing tap is not multi_queue: recreate it with \
             `ip link del NAME; ip tuntap add dev NAME mode tap multi_queue vnet_hdr`"
        }
        Some(libc::EBUSY) => "another process holds the tap without multi_queue",
        Some(libc::ENOENT) | Some(libc::ENODEV) => "/dev/net/tun is missing: load the tun module",
        _ => "see the cause below",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_offloads_map_to_tun_flags() {
        let f = (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4);
        assert_eq!(offload_flags(f), libc::TUN_F_CSUM | libc::TUN_F_TSO4);
    }

    fn tap_with_mtu(mtu: u32) -> Tap {
        Tap {
            name: "tap0".into(),
            queues: Vec::new(),
            created: false,
            mtu,
            offloads: BASE_OFFLOADS,
        }
    }

    #[test]
    fn mtu_mismatch_names_both_mtus_the_consequence_and_the_fix() {
        let jumbo = tap_with_mtu(9000).mtu_mismatch(1500).unwrap();
        assert!(
            jumbo.contains("MTU 9000") && jumbo.contains("MTU 1500"),
            "{jumbo}"
        );
        assert!(
            jumbo.contains("rx_dropped_oversize_frames_total"),
            "{jumbo}"
        );
        assert!(jumbo.contains("--mtu 9000"), "{jumbo}");
        let small = tap_with_mtu(1400).mtu_mismatch(1500).unwrap();
        assert!(small.contains("--mtu 1400"), "{small}");
        assert_eq!(tap_with_mtu(1500).mtu_mismatch(1500), None);
    }

    #[test]
    fn framing_follows_version_1_and_mergeable_buffers() {
        let v1 = 1u64 << VIRTIO_F_VERSION_1;
        let mrg = 1u64 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
        let f = |features| {
            let Framing {
                hdr_len,
                little_endian,
                ..
            } = Framing::from_features(features);
            (hdr_len, little_endian)
        };
        assert_eq!(f(v1), (12, true));
        assert_eq!(f(v1 | mrg), (12, true));
        assert_eq!(f(mrg), (12, false), "legacy virtio_net_hdr_mrg_rxbuf");
        assert_eq!(f(0), (10, false), "legacy virtio_net_hdr");
    }

    #[test]
    fn guest_uso_maps_to_tun_uso_only_with_checksum_and_both_families() {
        let csum = 1u64 << VIRTIO_NET_F_GUEST_CSUM;
        let uso4 = 1u64 << VIRTIO_NET_F_GUEST_USO4;
        let uso6 = 1u64 << VIRTIO_NET_F_GUEST_USO6;
        assert_eq!(
            offload_flags(csum | uso4 | uso6),
            libc::TUN_F_CSUM | libc::TUN_F_USO4 | libc::TUN_F_USO6
        );
        // The kernel refuses TUN_F_USO4 without TUN_F_USO6 (and the
        // reverse) with EINVAL, which would lose every other offload.
        assert_eq!(offload_flags(csum | uso4), libc::TUN_F_CSUM);
        assert_eq!(offload_flags(csum | uso6), libc::TUN_F_CSUM);
        assert_eq!(offload_flags(uso4 | uso6), 0, "no checksum offload");
    }

    #[test]
    fn segmentation_without_checksum_offload_gives_no_flags() {
        assert_eq!(offload_flags(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
    }
}
