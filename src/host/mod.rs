//! The host kernel: the tap interface ([`tap`]), the syscalls that need
//! `unsafe` ([`sys`]), the syscall filters ([`seccomp`]) and the
//! capabilities the daemon keeps ([`capabilities`]). Knows nothing of
//! virtio rings.

pub mod capabilities;
pub mod seccomp;
pub mod sys;
pub mod tap;
