//! The host kernel: the tap interface ([`tap`]), the syscalls that need
//! `unsafe` ([`sys`]), and the syscall filters ([`seccomp`]). Knows nothing
//! of virtio rings.

pub mod seccomp;
pub mod sys;
pub mod tap;
