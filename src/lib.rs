//! A vhost-user virtio-net device backend on a Linux tap.
//!
//! A frontend (QEMU, Cloud Hypervisor, DPDK's virtio-user) connects over a
//! unix socket and shares guest memory; the daemon serves the RX and TX
//! virtqueues and moves frames between them and a tap, in batches, with
//! guest kicks and interrupts suppressed through the virtio event index.
//!
//! Map of the modules, each answering one question:
//!
//! | module | question |
//! |---|---|
//! | [`config`] | what may the user ask for; is it valid |
//! | [`server`] | the daemon's life: listen, serve connection after connection, stop |
//! | [`relay`] | how QEMU's early `SET_VRING_ENABLE` is made to work |
//! | [`backend`] | what the vhost-user protocol needs from us |
//! | [`queue_pair`] | which event drives which step, per worker |
//! | [`ring`] | one batch on one virtqueue: the drain loop RX and TX share |
//! | [`rx`] / [`tx`] | how one frame moves |
//! | [`notify`] | when to interrupt the guest |
//! | [`guest`] | guest buffers as iovecs (the only guest-memory `unsafe`) |
//! | [`tap`] | the tap interface |
//! | [`sys`] | kernel calls that need `unsafe` |
//! | [`seccomp`] | what the worker threads may ask of the kernel |
//! | [`vring`] | the framework's vring, with kick counting |
//! | [`stats`] | what is counted, and its text format |
//! | [`stats_client`] | the `stats` command: a running daemon's counters |
//! | [`systemd`] | socket activation and readiness under systemd |
//! | [`driver`] | the guest side of a ring, for tests and the benchmark |

#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod config;
pub mod driver;
pub mod guest;
pub mod notify;
pub mod queue_pair;
pub mod relay;
pub mod ring;
pub mod rx;
pub mod seccomp;
pub mod server;
pub mod stats;
pub mod stats_client;
pub mod sys;
pub mod systemd;
pub mod tap;
pub mod tx;
pub mod vring;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod testutil;

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
