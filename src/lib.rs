//! A vhost-user virtio-net device backend on a Linux tap.
//!
//! A frontend (QEMU, Cloud Hypervisor, DPDK's virtio-user) connects over a
//! unix socket and shares guest memory; the daemon serves the RX and TX
//! virtqueues and moves frames between them and a tap, in batches, with
//! guest kicks and interrupts suppressed through the virtio event index.
//!
//! The tree shows three layers, each importing only from the ones below it
//! (and `stats`, which all may count into):
//!
//! ```text
//! main.rs        parse, log, run
//!   control/     the vhost-user control plane: the daemon's life, the
//!                relay, the protocol backend, the configuration
//!     datapath/  one batch on one ring and what drives it: RX, TX,
//!                interrupt decisions, guest memory, the vrings
//!       host/    the host kernel: tap, syscalls, seccomp, capabilities
//! stats/         what is counted, its text formats, the `stats` client
//! testing/       the guest side of a ring and a recording tap control (feature
//!                `test-utils`), unit-test helpers
//! ```
//!
//! | module | question |
//! |---|---|
//! | [`control::config`] | what may the user ask for; is it valid |
//! | [`control::server`] | the daemon's life: listen, serve connection after connection, stop |
//! | [`control::relay`] | how QEMU's early `SET_VRING_ENABLE` is made to work |
//! | [`control::backend`] | what the vhost-user protocol needs from us |
//! | [`control::systemd`] | socket activation and readiness under systemd |
//! | [`datapath::queue_pair`] | which event drives which step, per worker |
//! | [`datapath::batch`] | one batch on one virtqueue: the drain loop RX and TX share |
//! | [`datapath::rx`] / [`datapath::tx`] | how one frame moves |
//! | [`datapath::notify`] | when to interrupt the guest |
//! | [`datapath::guest`] | guest buffers as iovecs (the only guest-memory `unsafe`) |
//! | [`datapath::dirty`] | which guest pages we wrote while a migration logs them |
//! | [`datapath::vring`] | the framework's vring, with kick counting and owed interrupts |
//! | [`host::tap`] | the tap interface |
//! | [`host::sys`] | kernel calls that need `unsafe` |
//! | [`host::seccomp`] | what each thread may ask of the kernel |
//! | [`host::capabilities`] | which privileges the running daemon keeps |
//! | [`stats`] | what is counted |
//! | [`stats::format`] | the counters as text: Prometheus, its parser, the `stats` table |
//! | [`stats::connections`] | how many frontends came, and how much of their logging a flood may cost |
//! | [`stats::client`] | the `stats` command: a running daemon's counters |

#![deny(unsafe_op_in_unsafe_fn)]

pub mod control;
pub mod datapath;
pub mod host;
pub mod stats;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

/// Length of `virtio_net_hdr_v1` (and of the legacy
/// `virtio_net_hdr_mrg_rxbuf`, same layout): the header in front of every
/// frame on the rings and the tap (`TUNSETVNETHDRSZ`) once the guest acked
/// `VIRTIO_F_VERSION_1` or `VIRTIO_NET_F_MRG_RXBUF`; the longest header.
pub const VNET_HDR_LEN: usize = 12;

/// Length of the legacy `virtio_net_hdr` (no `num_buffers`), used when the
/// guest acked neither `VIRTIO_F_VERSION_1` nor `VIRTIO_NET_F_MRG_RXBUF`.
pub const VNET_HDR_LEN_LEGACY: usize = 10;

/// The virtio-net header length the guest's acked `features` call for.
pub fn vnet_hdr_len(features: u64) -> usize {
    let v1 = 1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    let mrg = 1u64 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
    if features & (v1 | mrg) != 0 {
        VNET_HDR_LEN
    } else {
        VNET_HDR_LEN_LEGACY
    }
}
