//! The vhost-user control plane: the daemon's life ([`server`]), the relay
//! that fixes QEMU's message order ([`relay`]), what the protocol needs from
//! the device ([`backend`]), what the user may ask for ([`config`]) and
//! systemd's side ([`systemd`]). Drives the data path; never moves frames.

pub mod backend;
pub mod config;
pub mod relay;
pub mod server;
pub mod systemd;
