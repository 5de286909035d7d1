//! The syscall filter of the worker threads (one per queue pair): the only
//! threads that touch guest data. Once a worker handles its first event it
//! may only do what the data path does (epoll, eventfd/timerfd reads and
//! writes, `readv`/`writev` on the tap, futexes, memory management, thread
//! exit); anything else, e.g. opening a file or a socket, `ioctl`, `execve`,
//! fails with `EPERM`.
//!
//! `EPERM` rather than killing the process: a syscall missing from the list
//! on a rare path then fails like an I/O error (counted, logged) instead of
//! taking every VM's NIC down; what it forbids stays forbidden either way.
//! The list was taken from `strace -ff` of the workers over the whole test
//! suite (see `docs/robustness.md`).

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// What to do with a syscall outside the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Refuse it (`EPERM`).
    On,
    /// Allow it, but have the kernel log it (audit): to find what is missing.
    Log,
    /// No filter.
    Off,
}

/// Syscalls a worker makes once running.
const ALLOWED: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_timerfd_settime,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Builds the worker filter for `mode` (`None` for `Off`).
pub fn worker_filter(mode: Mode) -> Result<Option<BpfProgram>, seccompiler::BackendError> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::On => SeccompAction::Errno(u32::try_from(libc::EPERM).expect("small")),
        Mode::Log => SeccompAction::Log,
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    filter.try_into().map(Some)
}

thread_local! {
    static APPLIED: Cell<bool> = const { Cell::new(false) };
}

/// Installs `filter` on the calling thread, once per thread.
pub fn apply_once(filter: Option<&BpfProgram>) {
    let Some(filter) = filter else {
        return;
    };
    if APPLIED.with(Cell::get) {
        return;
    }
    APPLIED.with(|a| a.set(true));
    match seccompiler::apply_filter(filter) {
        Ok(()) => log::debug!("seccomp filter installed on this worker"),
        Err(e) => log::error!("cannot install the worker's seccomp filter: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_filtered_thread_cannot_open_files_or_sockets_but_still_moves_data() {
        let filter = worker_filter(Mode::On).unwrap();
        std::thread::spawn(move || {
            let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
            apply_once(filter.as_ref());

            let open = std::fs::File::open("/etc/hostname").unwrap_err();
            assert_eq!(open.raw_os_error(), Some(libc::EPERM));
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap_err();
            assert_eq!(sock.raw_os_error(), Some(libc::EPERM));
            // What the data path does still works.
            efd.write(3).unwrap();
            assert_eq!(crate::host::sys::eventfd_take(efd.as_raw_fd()).unwrap(), 3);
            let v: Vec<u8> = vec![0; 1 << 20];
            drop(v);
        })
        .join()
        .unwrap();
        // Other threads are not filtered.
        assert!(
            std::fs::File::open("/etc/hostname").is_ok()
                || std::fs::File::open("/proc/self/stat").is_ok()
        );
    }

    #[test]
    fn off_means_no_filter() {
        assert!(worker_filter(Mode::Off).unwrap().is_none());
        assert!(worker_filter(Mode::Log).unwrap().is_some());
    }
}
