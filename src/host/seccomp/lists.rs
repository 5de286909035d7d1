//! The allowlists, one per thread class, each named after its thread.
//!
//! Every entry was seen in `strace -ff` of that thread over the end-to-end
//! and QEMU suites (`contrib/seccomp-profile.py` prints what each thread
//! asked for, before and after its own filter; the command that makes the
//! traces is in its header and in `docs/robustness.md`). Entries marked
//! "(code)" were not in the traces but are on a path the code shows (a rare
//! error or teardown path); each says which.
//!
//! A thread runs the filter of the thread that created it until it installs
//! its own, and filters stack (the most restrictive answer wins). So:
//!
//! - Whatever a thread does *before* its hook (thread start-up, installing
//!   its own filter) must be allowed by its creator's filter.
//! - `frontends` creates the crate's request thread, its workers and the
//!   relay threads: its filter is its own list *plus* every descendant's
//!   ([`frontends`]), so a descendant is limited by its own list alone.

use libc::{c_int, c_ulong};

/// When a syscall is allowed.
#[derive(Clone, Debug)]
pub(super) enum When {
    /// Whatever its arguments.
    Always,
    /// Argument `.0` (its low 32 bits) is one of `.1`.
    ArgIn(u8, Vec<u64>),
    /// Argument `.0` has none of the bits of `.1`.
    ArgWithout(u8, u64),
    /// Argument `.0` has every bit of `.1`.
    ArgWith(u8, u64),
}

/// One allowed syscall.
#[derive(Clone, Debug)]
pub(super) struct Allow {
    pub nr: i64,
    pub when: When,
}

fn always(nrs: &[i64]) -> Vec<Allow> {
    nrs.iter()
        .map(|&nr| Allow {
            nr,
            when: When::Always,
        })
        .collect()
}

fn bits(v: c_int) -> u64 {
    u64::try_from(v).expect("flag and family constants are positive")
}

/// `ioctl` with one of these request numbers.
#[allow(
    clippy::useless_conversion,
    reason = "c_ulong is u64 here, u32 on 32-bit targets"
)]
fn ioctl(requests: &[c_ulong]) -> Allow {
    Allow {
        nr: libc::SYS_ioctl,
        when: When::ArgIn(1, requests.iter().map(|&r| u64::from(r)).collect()),
    }
}

/// `socket` of one of these families.
fn socket(families: &[c_int]) -> Allow {
    Allow {
        nr: libc::SYS_socket,
        when: When::ArgIn(0, families.iter().map(|&f| bits(f)).collect()),
    }
}

/// `prctl` with one of these options.
fn prctl(options: &[c_int]) -> Allow {
    Allow {
        nr: libc::SYS_prctl,
        when: When::ArgIn(0, options.iter().map(|&o| bits(o)).collect()),
    }
}

/// `fcntl` with one of these commands.
fn fcntl(commands: &[c_int]) -> Allow {
    Allow {
        nr: libc::SYS_fcntl,
        when: When::ArgIn(1, commands.iter().map(|&c| bits(c)).collect()),
    }
}

/// `write` to stderr only: the log.
fn log() -> Allow {
    Allow {
        nr: libc::SYS_write,
        when: When::ArgIn(0, vec![bits(libc::STDERR_FILENO)]),
    }
}

/// What every thread may do: memory (never executable), futexes, time,
/// the log, closing fds, and ending (exit, or an abort).
fn base() -> Vec<Allow> {
    let mut v = always(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        // glibc's malloc counts the CPUs once per process (at its ninth
        // arena) by reading /sys/devices/system/cpu/online; if a filtered
        // thread gets there the open is refused and glibc asks
        // sched_getaffinity instead: the same answer. (In log mode that
        // shows as one `openat` from whichever thread it was.)
        libc::SYS_sched_getaffinity,
        libc::SYS_close,
        // Signal delivery and return; `std` removes a thread's alternate
        // signal stack when the thread ends.
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_sigaltstack,
        libc::SYS_gettid,
        libc::SYS_getpid,
        // (code) abort() after a failed assertion: SIGABRT to itself.
        libc::SYS_tgkill,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    let exec = bits(libc::PROT_EXEC);
    v.push(Allow {
        nr: libc::SYS_mmap,
        when: When::ArgWithout(2, exec),
    });
    v.push(Allow {
        nr: libc::SYS_mprotect,
        when: When::ArgWithout(2, exec),
    });
    // Debug builds check that an fd is open before `OwnedFd` closes it.
    v.push(fcntl(&[libc::F_GETFD]));
    v.push(log());
    v
}

/// What a new thread does before its closure runs (`std` and glibc), under
/// its creator's filter: register rseq and the robust futex list, unblock
/// signals, name itself, read its stack bounds (sched_getaffinity), set up
/// an alternate signal stack (mmap/mprotect; those in [`base`]).
fn thread_start() -> Vec<Allow> {
    let mut v = always(&[libc::SYS_rseq, libc::SYS_set_robust_list]);
    v.push(prctl(&[libc::PR_SET_NAME]));
    v
}

/// What a thread needs to install its own filter (seccompiler sets
/// `no_new_privs`, then loads the program): the creator allows it so its
/// children can narrow themselves.
fn sandboxing() -> Vec<Allow> {
    vec![
        prctl(&[libc::PR_SET_NO_NEW_PRIVS]),
        Allow {
            nr: libc::SYS_seccomp,
            when: When::ArgIn(0, vec![u64::from(libc::SECCOMP_SET_MODE_FILTER)]),
        },
    ]
}

/// `vring_worker` (one per queue pair, vhost-user-backend's): the data
/// path. Epoll, eventfd/timerfd reads and writes, `readv`/`writev` on the
/// tap, and `io_uring_enter` on the pair's ring (`--tap-io uring|auto`).
/// No ioctl, no socket, no open, and no `io_uring_setup` or
/// `io_uring_register`: the main thread makes each pair's ring, restricted
/// to `IORING_OP_WRITEV`, `IORING_OP_READV` and their one-buffer forms
/// `IORING_OP_WRITE`, `IORING_OP_READ` on the pair's tap alone (its
/// registered file; see `Uring::new` in `host/sys.rs`), before any
/// filter is installed. What a ring does for the worker are not syscalls
/// and never pass a seccomp filter: the ring's restriction, not this list,
/// is what limits them. io_uring's own worker threads (`iou-wrk-*`, made
/// by the kernel for a request that must block) inherit nothing to check
/// either; our reads and writes carry `RWF_NOWAIT` and a tap (Linux >=
/// 6.4) or a socket completes them inline in `io_uring_enter`, so none is
/// made.
pub(super) fn worker() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_timerfd_settime,
        libc::SYS_io_uring_enter,
    ]));
    v
}

/// `relay-requests`: reads the frontend's messages (fds attached), writes
/// them to the crate's socket, acks held enables; its hooks detach or
/// attach tap queues (`TUNSETQUEUE`), signal held interrupts (eventfd
/// write) and disarm their timers.
pub(super) fn relay_requests() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[
        libc::SYS_recvmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_sendto,
        libc::SYS_write,
        libc::SYS_shutdown,
        // (code) the ring-reset hook disarms a held interrupt's timer.
        libc::SYS_timerfd_settime,
        // (code) and ends RX's posted reads (cancels them on the pair's
        // read ring and waits for the kernel to confirm).
        libc::SYS_io_uring_enter,
    ]));
    v.push(ioctl(&[libc::TUNSETQUEUE]));
    v
}

/// `relay-replies`: reads the crate's replies (fds attached), writes them
/// to the frontend. Nothing else.
pub(super) fn relay_replies() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[
        libc::SYS_recvmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_sendto,
        libc::SYS_shutdown,
    ]));
    v
}

/// `vhost-user-net` (vhost-user-backend's request thread, named after the
/// daemon): handles configuration messages. Maps guest memory the frontend
/// sends (`mmap` of its fds, never executable), registers kick fds in the
/// workers' epolls, applies the acked features to the tap (`TUNSETOFFLOAD`,
/// `TUNSETVNETHDRSZ`, `TUNSETVNETLE`), detaches queues at RESET_DEVICE
/// (`TUNSETQUEUE`), signals held interrupts at GET_VRING_BASE.
pub(super) fn requests() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[
        libc::SYS_recvmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_sendto,
        libc::SYS_write,
        libc::SYS_shutdown,
        libc::SYS_epoll_ctl,
        libc::SYS_timerfd_settime,
        // The crate asks whether an fd it was sent is a socket (SO_DOMAIN).
        libc::SYS_getsockopt,
        // (code) GET_VRING_BASE, SET_FEATURES and a new memory table end
        // RX's posted reads (cancel, and wait for the kernel to confirm).
        libc::SYS_io_uring_enter,
    ]));
    v.push(fcntl(&[libc::F_GETFD, libc::F_DUPFD_CLOEXEC]));
    v.push(ioctl(&[
        libc::TUNSETOFFLOAD,
        libc::TUNSETVNETHDRSZ,
        libc::TUNSETVNETLE,
        libc::TUNSETQUEUE,
    ]));
    v
}

/// `frontends`: accepts (or connects to) one frontend at a time; per
/// connection makes a private socket in a fresh 0700 directory (mkdir,
/// socket, bind, listen, connect, accept, unlink, then the directory
/// removed: opened as a directory, listed, unlinked), builds the crate's
/// daemon (epoll, eventfds, the request, worker and relay threads), and at
/// the end detaches the tap queues (`TUNSETQUEUE`) and signals held
/// interrupts. `socket` only `AF_UNIX`, `openat` only directories, no
/// other ioctl. Plus everything its descendants may do (see the module
/// doc), and what they need to start and install their own filters.
pub(super) fn frontends() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[
        libc::SYS_accept4,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_mkdir,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_getdents64,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_settime,
        libc::SYS_write,
        libc::SYS_shutdown,
        libc::SYS_clone3,
    ]));
    v.push(socket(&[libc::AF_UNIX]));
    v.push(Allow {
        nr: libc::SYS_openat,
        when: When::ArgWith(2, bits(libc::O_DIRECTORY)),
    });
    // F_GETFL, F_SETFD: removing the directory checks the fd it opened
    // and marks it close-on-exec.
    v.push(fcntl(&[
        libc::F_GETFD,
        libc::F_GETFL,
        libc::F_SETFD,
        libc::F_DUPFD_CLOEXEC,
    ]));
    v.push(ioctl(&[libc::TUNSETQUEUE]));
    v.extend(thread_start());
    v.extend(sandboxing());
    for descendant in [worker(), relay_requests(), relay_replies(), requests()] {
        v.extend(descendant);
    }
    v
}

/// `stats`: accepts a connection on the stats socket, writes the counters,
/// closes it.
pub(super) fn stats() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[libc::SYS_accept4, libc::SYS_sendto]));
    v
}

/// `prometheus`: accepts an HTTP connection (TCP or unix), reads the
/// request head under a timeout, writes the counters, closes it.
pub(super) fn prometheus() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[
        libc::SYS_accept4,
        libc::SYS_setsockopt,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
    ]));
    v
}

/// `tap-watch`: every 500 ms looks for a deleted tap interface
/// (`/sys/class/net/NAME`, a stat), re-attaches the queue fds to it
/// (`TUNSETIFF`, then header size, byte order, offloads; `TUNSETQUEUE` to
/// detach a queue no ring wants), and wakes the worker (eventfd write).
pub(super) fn tap_watch() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_write,
    ]));
    v.push(ioctl(&[
        libc::TUNSETIFF,
        libc::TUNSETVNETHDRSZ,
        libc::TUNSETVNETLE,
        libc::TUNSETOFFLOAD,
        libc::TUNSETQUEUE,
    ]));
    v
}

/// `signals`: waits on signal-hook's socket for SIGINT/SIGTERM, tells main.
pub(super) fn signals() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[libc::SYS_recvfrom]));
    v
}

/// The main thread once every service thread runs: waits for the end,
/// then tells systemd (`STOPPING=1`: an `AF_UNIX` datagram socket), shuts
/// the frontend connection down, prints the counters and removes its
/// sockets. A signal handler runs here too (signal-hook writes to its
/// socket: `sendto`).
pub(super) fn main() -> Vec<Allow> {
    let mut v = base();
    v.extend(always(&[
        libc::SYS_sendto,
        // The counters to stderr, STOPPING=1 to systemd's socket.
        libc::SYS_write,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_unlink,
    ]));
    v.push(socket(&[libc::AF_UNIX]));
    v
}
