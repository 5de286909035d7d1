//! Kernel calls that need `unsafe`: tap ioctls, interface flags, eventfd
//! counter reads, and receiving file descriptors over a unix socket.
//!
//! This is one of the two modules allowed to contain `unsafe` (the other is
//! [`crate::datapath::guest`], which owns every raw pointer into guest memory). Nothing
//! here knows about virtio; callers pass plain fds, names and numbers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Interface names are at most `IFNAMSIZ - 1` bytes long.
pub const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// The kernel's `struct ifreq`: a name and a 24-byte union, of which we use
/// the `short` flags and the `int` MTU/feature members.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn with_name(name: &str) -> io::Result<Self> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut req = IfReq::default();
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens `/dev/net/tun` non-blocking and binds it to tap `name` with `flags`
/// (`IFF_TAP | IFF_NO_PI | ...`), creating the interface if it does not exist.
pub fn tun_set_iff(name: &str, flags: i16) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    tun_attach(&file, name, flags)?;
    Ok(file)
}

/// Binds an open tun fd to tap `name` (again, e.g. after the interface was
/// deleted and re-created: the kernel then detached the fd).
pub fn tun_attach(file: &File, name: &str, flags: i16) -> io::Result<()> {
    let mut req = IfReq::with_name(name)?;
    req.set_short(flags);
    // SAFETY: `file` is an open tun fd; TUNSETIFF reads and writes one
    // `struct ifreq`, and `req` is a live, correctly sized `IfReq`.
    check(unsafe { ioctl_with_mut_ref(file, libc::TUNSETIFF, &mut req) })
}

/// Tells the tap how long the virtio-net header in front of each frame is.
pub fn tun_set_vnet_hdr_size(tap: &File, size: i32) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which
    // points at `size` for the duration of the call.
    check(unsafe { ioctl_with_ref(tap, libc::TUNSETVNETHDRSZ, &size) })
}

/// Tells the tap whether the virtio-net header's fields are little-endian
/// (`true`, as VIRTIO_F_VERSION_1 requires) or in the host's byte order.
pub fn tun_set_vnet_le(tap: &File, little_endian: bool) -> io::Result<()> {
    let value = libc::c_int::from(little_endian);
    // SAFETY: TUNSETVNETLE reads one `int` through the pointer, which points
    // at `value` for the duration of the call.
    check(unsafe { ioctl_with_ref(tap, libc::TUNSETVNETLE, &value) })
}

/// Sets which offloads (`TUN_F_*`) the kernel may use in frames it hands us.
pub fn tun_set_offload(tap: &File, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long);
    // no memory is passed to the kernel.
    check(unsafe {
        vmm_sys_util::ioctl::ioctl_with_val(tap, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags))
    })
}

/// Attaches (`true`) or detaches (`false`) one queue of a multiqueue tap, so
/// the kernel stops steering frames to a queue nobody serves.
pub fn tun_set_queue(tap: &File, attach: bool) -> io::Result<()> {
    let mut req = IfReq::default();
    let flag = if attach {
        libc::IFF_ATTACH_QUEUE
    } else {
        libc::IFF_DETACH_QUEUE
    };
    req.set_short(i16::try_from(flag).expect("IFF_*_QUEUE fits in a short"));
    // SAFETY: TUNSETQUEUE reads one `struct ifreq`; `req` is live and sized.
    check(unsafe { ioctl_with_ref(tap, libc::TUNSETQUEUE, &req) })
}

/// A datagram socket, the handle the kernel wants for interface ioctls.
fn inet_socket() -> io::Result<File> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    Ok(File::from(fd))
}

/// Sets `IFF_UP` on interface `name` (leaves the other flags as they are).
pub fn set_link_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = IfReq::with_name(name)?;
    // SAFETY: SIOCGIFFLAGS fills in one `struct ifreq`; `req` is live and sized.
    check(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS, &mut req) })?;
    let up = i16::try_from(libc::IFF_UP).expect("IFF_UP fits in a short");
    req.set_short(req.short() | up);
    // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`; `req` is live and sized.
    check(unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS, &req) })
}

/// Sets the MTU of interface `name`.
pub fn set_mtu(name: &str, mtu: u16) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = IfReq::with_name(name)?;
    req.set_int(i32::from(mtu));
    // SAFETY: SIOCSIFMTU reads one `struct ifreq`; `req` is live and sized.
    check(unsafe { ioctl_with_ref(&sock, libc::SIOCSIFMTU, &req) })
}

/// The MTU of interface `name`.
pub fn mtu(name: &str) -> io::Result<u32> {
    let sock = inet_socket()?;
    let mut req = IfReq::with_name(name)?;
    // SAFETY: SIOCGIFMTU fills in one `struct ifreq`; `req` is live and sized.
    check(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFMTU, &mut req) })?;
    u32::try_from(req.int()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Reads and resets an eventfd's (or timerfd's) counter: the number of
/// notifications (expirations) since the last read (0 when there were none).
pub fn eventfd_take(fd: RawFd) -> io::Result<u64> {
    let mut value = [0u8; 8];
    match nix::unistd::read(fd, &mut value) {
        Ok(_) => Ok(u64::from_ne_bytes(value)),
        Err(nix::errno::Errno::EAGAIN) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A one-shot monotonic timer whose fd becomes readable when it fires
/// (`timerfd`, non-blocking).
#[derive(Debug)]
pub struct Timer(nix::sys::timerfd::TimerFd);

impl Timer {
    pub fn new() -> io::Result<Timer> {
        use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
        let flags = TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC;
        Ok(Timer(TimerFd::new(ClockId::CLOCK_MONOTONIC, flags)?))
    }

    /// Fires once after `after` (at least 1 ns); `None` disarms.
    pub fn set(&self, after: Option<std::time::Duration>) -> io::Result<()> {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        match after {
            Some(d) => {
                let d = d.max(std::time::Duration::from_nanos(1));
                let when = Expiration::OneShot(TimeSpec::from_duration(d));
                self.0.set(when, TimerSetTimeFlags::empty())?;
            }
            None => self.0.unset()?,
        }
        Ok(())
    }

    /// Consumes the expirations; 0 if it has not fired.
    pub fn take(&self) -> io::Result<u64> {
        eventfd_take(self.as_raw_fd())
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        std::os::fd::AsFd::as_fd(&self.0).as_raw_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes; returns
/// how many are readable (used by the benchmark's guest to wait for
/// interrupts on call eventfds). Test support: not in the daemon's build.
#[cfg(any(test, feature = "test-utils"))]
pub fn wait_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<usize> {
    let timeout = u64::try_from(timeout_ms)
        .ok()
        .map(std::time::Duration::from_millis);
    wait_readable_for(fds, timeout)
}

/// [`wait_readable`] with a finer timeout (`None`: forever).
#[cfg(any(test, feature = "test-utils"))]
pub fn wait_readable_for(fds: &[RawFd], timeout: Option<std::time::Duration>) -> io::Result<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(pfds.len()).expect("few fds");
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos()),
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: `pfds` is a live array of `n` pollfd structs that ppoll(2)
    // reads and writes for the duration of the call; `ts_ptr` is null or
    // points at `ts`, alive until the call returns; a null signal mask
    // leaves the mask alone; a closed fd only yields POLLNVAL.
    let ret = unsafe { libc::ppoll(pfds.as_mut_ptr(), n, ts_ptr, std::ptr::null()) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(usize::try_from(ret).expect("non-negative"))
}

/// Drops root: supplementary groups cleared, then gid, then uid (in that
/// order: after setuid we could no longer change groups).
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    setgroups(&[])?;
    setgid(Gid::from_raw(gid))?;
    setuid(Uid::from_raw(uid))?;
    Ok(())
}

/// Changes the group of `path` (owner unchanged).
pub fn chgrp(path: &std::path::Path, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))
}

/// Closes descriptors that their owner abandoned with `into_raw_fd` and
/// never closes: vhost-user-backend does that with the exit-event fd we give
/// each worker (registered in the worker's epoll, then forgotten), one fd
/// per worker per connection. Call only once that connection's daemon, and
/// with it every epoll handler and worker, has been dropped.
pub fn close_abandoned(fds: Vec<RawFd>) {
    for fd in fds {
        // SAFETY: vhost-user-backend gave up ownership of `fd` (into_raw_fd)
        // and only ever passed it to epoll_ctl on an epoll that is closed by
        // now; it never closes it, and nothing else in this process knows the
        // number, so taking ownership here cannot double-close or close a
        // descriptor someone else uses.
        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    }
}

/// Upper bound on descriptors one vhost-user message carries
/// (`VHOST_MEMORY_MAX_NREGIONS` in the protocol).
pub const MAX_ATTACHED_FDS: usize = 32;

/// Receives up to `buf.len()` bytes from a stream socket together with any
/// file descriptors attached to them (`SCM_RIGHTS`).
pub fn recv_with_files(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<File>)> {
    let mut fds = [-1 as RawFd; MAX_ATTACHED_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec describes `buf`, which is exclusively borrowed for
    // the call, so the kernel may write any bytes into it.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let files = fds[..nfds]
        .iter()
        // SAFETY: the kernel installed these descriptors in our table for this
        // message; nobody else has them, so each `File` becomes their owner.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    Ok((n, files))
}

/// Sends `data` with `files` attached as `SCM_RIGHTS`.
pub fn send_with_files(sock: &UnixStream, data: &[u8], files: &[File]) -> io::Result<usize> {
    let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
    sock.send_with_fds(&[data], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// Takes ownership of an inherited, already listening unix socket (the
/// `--fd` convention of vhost-user backend programs), after checking that it
/// is one, and marks it close-on-exec.
pub fn inherited_listener(fd: RawFd) -> io::Result<UnixListener> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage,
    };
    let invalid = |what| io::Error::new(io::ErrorKind::InvalidInput, what);
    let addr: SockaddrStorage = getsockname(fd)?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(invalid("not a unix socket"));
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    // SAFETY: by the --fd (or LISTEN_FDS) contract our parent handed this
    // descriptor to us to own, nothing else in this process has opened or
    // wrapped it, and getsockname just showed it is an open socket.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    if !getsockopt(&listener, sockopt::AcceptConn)? {
        return Err(invalid("socket is not listening"));
    }
    Ok(listener)
}

/// A [`Uring`]'s one file, registered as fixed file 0 (the opcode
/// builders set `IOSQE_FIXED_FILE` for it).
const THE_FILE: io_uring::types::Fixed = io_uring::types::Fixed(0);

/// Entries of a [`Uring`]'s submission queue: a TX batch's writes (at
/// most [`crate::datapath::queue_pair::BUDGET_FRAMES`] frames) fit at once.
pub const URING_ENTRIES: u32 = 128;

/// An io_uring for one queue pair's tap I/O: `writev` and `readv`
/// requests only, made as plain `write` and `read` when they have one
/// iovec (the kernel then copies no iovec array in: about 5% of the
/// worker's time in the loop), on the one file it was made for
/// (`IORING_REGISTER_RESTRICTIONS`: opcodes `IORING_OP_WRITEV`,
/// `IORING_OP_READV`, `IORING_OP_WRITE` and `IORING_OP_READ`, the SQE flag
/// `IOSQE_FIXED_FILE` required and no other, no register operation once
/// enabled), each with `RWF_NOWAIT`, so a full tap (or an empty one)
/// completes with EAGAIN instead of waiting. The file is registered as
/// fixed file 0: the ring can reach no other file, and a request takes no
/// reference on it (`fget`/`fput`, about 2% of the worker in the loop).
/// Made before the seccomp filters are installed (`io_uring_setup` and
/// `io_uring_register` are then not needed by the worker, only
/// `io_uring_enter`).
pub struct Uring {
    ring: io_uring::IoUring,
    /// Requests pushed and not yet reaped (submitted or not).
    in_flight: usize,
    /// An `io_uring_enter` failed: the ring is not to be used again, and
    /// what it took and did not report stays in `in_flight` for good.
    failed: bool,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Uring {
    /// Sets a ring up for reads and writes of `file` (the kernel keeps a
    /// reference to it as long as the ring lives): created disabled,
    /// `file` registered, restricted to what the data path submits, then
    /// enabled. Fails as the kernel refuses: ENOSYS (no io_uring), EPERM
    /// (`kernel.io_uring_disabled`, a container's seccomp profile), EINVAL
    /// (a kernel older than 5.19 lacks a setup flag).
    pub fn new(file: BorrowedFd<'_>) -> io::Result<Uring> {
        #[cfg(any(test, feature = "test-utils"))]
        if let Some(errno) = refuse::get() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let ring = io_uring::IoUring::builder()
            .setup_r_disabled()
            // A request that fails to start does not stop the rest of the
            // submission: every request pushed gets a completion.
            .setup_submit_all()
            // Completions need no interrupt of the worker: it waits for
            // them in io_uring_enter.
            .setup_coop_taskrun()
            .setup_cqsize(2 * URING_ENTRIES)
            .build(URING_ENTRIES)?;
        use io_uring::opcode::{Read, Readv, Write, Writev};
        restrict_to_file(
            &ring,
            file,
            &[Writev::CODE, Readv::CODE, Write::CODE, Read::CODE],
            0,
        )?;
        Ok(Uring {
            ring,
            in_flight: 0,
            failed: false,
        })
    }

    /// Room left in the submission queue.
    pub fn room(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Requests pushed and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether an `io_uring_enter` failed (see [`Uring::reap`]); then the
    /// ring is never entered again: [`Uring::push_writev`] and
    /// [`Uring::push_readv`] queue nothing and `reap` fails at once.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Queues a non-blocking `writev` of `count` iovecs at `iov` to the
    /// ring's file (a `write` for one iovec).
    /// `false`: the submission queue is full (nothing queued).
    ///
    /// # Safety
    ///
    /// The `count` iovecs at `iov`, and the memory they describe, must
    /// stay valid and unchanged until [`Uring::reap`] has reported this
    /// request (or the process ends).
    pub unsafe fn push_writev(
        &mut self,
        iov: *const libc::iovec,
        count: u32,
        user_data: u64,
    ) -> bool {
        // SAFETY: this fn's contract is `push_rw`'s.
        unsafe { self.push_rw(true, iov, count, user_data) }
    }

    /// Queues a non-blocking `readv` of `count` iovecs at `iov` from the
    /// ring's file (a `read` for one iovec).
    /// `false`: the submission queue is full (nothing queued).
    ///
    /// # Safety
    ///
    /// As [`Uring::push_writev`]; the memory the iovecs describe is
    /// written by the kernel until the request is reaped.
    pub unsafe fn push_readv(
        &mut self,
        iov: *const libc::iovec,
        count: u32,
        user_data: u64,
    ) -> bool {
        // SAFETY: this fn's contract is `push_rw`'s.
        unsafe { self.push_rw(false, iov, count, user_data) }
    }

    /// [`Uring::push_writev`] (`write`) or [`Uring::push_readv`]: a plain
    /// `write`/`read` for one iovec (the kernel then copies no iovec array
    /// in), at the file's position (-1, as `writev(2)`: a tap has none),
    /// with `RWF_NOWAIT`.
    ///
    /// # Safety
    ///
    /// As [`Uring::push_readv`].
    unsafe fn push_rw(
        &mut self,
        write: bool,
        iov: *const libc::iovec,
        count: u32,
        user_data: u64,
    ) -> bool {
        macro_rules! nowait {
            ($op:expr) => {
                $op.offset(u64::MAX).rw_flags(libc::RWF_NOWAIT).build()
            };
        }
        use io_uring::opcode::{Read, Readv, Write, Writev};
        let entry = if count == 1 {
            // SAFETY: the caller gives one valid iovec at `iov`.
            let one = unsafe { *iov };
            let (at, len) = (
                one.iov_base.cast::<u8>(),
                u32::try_from(one.iov_len).unwrap_or(u32::MAX),
            );
            if write {
                nowait!(Write::new(THE_FILE, at.cast_const(), len))
            } else {
                nowait!(Read::new(THE_FILE, at, len))
            }
        } else if write {
            nowait!(Writev::new(THE_FILE, iov, count))
        } else {
            nowait!(Readv::new(THE_FILE, iov, count))
        };
        // SAFETY: the caller keeps the `count` iovecs and the memory they
        // describe valid until the request is reaped (this fn's contract).
        unsafe { self.push(entry, user_data) }
    }

    /// Queues `entry` as request `user_data`; `false`: the submission
    /// queue is full.
    ///
    /// # Safety
    ///
    /// Whatever `entry` points at stays valid until the request is reaped.
    unsafe fn push(&mut self, entry: io_uring::squeue::Entry, user_data: u64) -> bool {
        if self.failed {
            // Never entered again: nothing pushed now would be made.
            return false;
        }
        // SAFETY: the caller's contract: the buffers the entry points at
        // outlive the request.
        let pushed = unsafe { self.ring.submission().push(&entry.user_data(user_data)) }.is_ok();
        if pushed {
            self.in_flight += 1;
        }
        pushed
    }

    /// Submits what was pushed with one `io_uring_enter` and waits until
    /// every request pushed has completed, calling `each(user_data,
    /// result)` per completion (`result`: bytes written, or `-errno`).
    ///
    /// On an error from the kernel (not EINTR/EAGAIN/EBUSY, which are
    /// retried) the ring cannot be trusted any more: the caller drops it.
    /// Completions the kernel posted before the error are still reported.
    /// Requests the kernel took and did not report may still run; the
    /// guest memory they point into must then outlive them
    /// ([`Uring::in_flight`] says whether any is left).
    pub fn reap(&mut self, mut each: impl FnMut(u64, i32)) -> io::Result<()> {
        if self.failed && self.in_flight > 0 {
            // What it took and did not report will not be reported, and
            // what it never took must not go out now (its buffers may be
            // reused): a failed ring is not entered again.
            return Err(io::Error::other("the io_uring failed earlier"));
        }
        while self.in_flight > 0 {
            let entered = enter(&mut self.ring, self.in_flight);
            // Read even after an error: the kernel may have made requests
            // (a tap's writes complete inline) before it failed, and a
            // caller that took them for unmade would make them twice.
            for cqe in self.ring.completion() {
                self.in_flight = self.in_flight.saturating_sub(1);
                each(cqe.user_data(), cqe.result());
            }
            if let Err(e) = entered {
                // What the kernel never took is gone with the ring.
                let unsubmitted = self.ring.submission().len();
                self.in_flight -= unsubmitted.min(self.in_flight);
                self.failed = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// [`Uring::reap`] for `count` requests pushed in the order of their
    /// `user_data`, which is their index: `results[i]` is request `i`'s
    /// result. When the ring fails first, a request it did not report gets
    /// `-ECANCELED` if the kernel never took it (safe to make again) and
    /// `-EINPROGRESS` if it did (it may have been made, or be running:
    /// making it again could make it twice).
    pub fn reap_into(&mut self, results: &mut Vec<i32>, count: usize) -> io::Result<()> {
        results.clear();
        results.resize(count, -libc::EINPROGRESS);
        let outcome = self.reap(|n, res| {
            if let Some(r) = usize::try_from(n).ok().and_then(|n| results.get_mut(n)) {
                *r = res;
            }
        });
        // The kernel takes requests in the order they were pushed: the
        // ones it never took are the last.
        let unsubmitted = self.ring.submission().len().min(count);
        for r in &mut results[count - unsubmitted..] {
            *r = -libc::ECANCELED;
        }
        outcome
    }
}

/// Buffers a [`ReadRing`] can have posted at once (its provided-buffer
/// ring's size: a power of two, as the kernel requires).
pub const POSTED_READS: u16 = 64;

/// The provided-buffer group of a [`ReadRing`]'s one buffer ring.
const READ_GROUP: u16 = 0;

/// `user_data` of the posted read, and of the request that cancels it.
const POSTED_READ: u64 = 1;
const CANCEL_READ: u64 = 2;

/// An io_uring that keeps one read of a tap posted across events: a
/// multishot read (`IORING_OP_READ_MULTISHOT`, Linux >= 6.7) that takes
/// its buffers, in order, from a ring of provided buffers
/// (`IORING_REGISTER_PBUF_RING`), one frame per buffer. The kernel reads a
/// frame into the next buffer as soon as the tap has one, without a
/// syscall of ours; each frame is a completion, and the ring's fd is
/// readable while completions wait ([`ReadRing::fd`], for epoll).
///
/// Restricted as [`Uring`] is (`IORING_REGISTER_RESTRICTIONS`): the
/// multishot read and its cancellation (`IORING_OP_ASYNC_CANCEL`) only, of
/// the one file it was made for (its fixed file 0: `IOSQE_FIXED_FILE`
/// required), the buffer-select flag the only other, no register operation
/// once enabled. Made before the seccomp filters. The kernel runs the read
/// as task work of the thread that armed it (the worker): with
/// `IORING_SETUP_COOP_TASKRUN` at that thread's next syscall, or, if it
/// sleeps interruptibly (in `epoll_wait`, or on a futex: the pair's lock,
/// held by a thread that cancels the read), by waking it. `IORING_SETUP_DEFER_TASKRUN` would
/// leave a cancel from another thread waiting for the worker's next
/// `io_uring_enter`: never set it.
pub struct ReadRing {
    ring: io_uring::IoUring,
    /// The provided-buffer ring the kernel takes buffers from (mmap'd,
    /// page-aligned, [`POSTED_READS`] entries of `struct io_uring_buf`).
    bufs: *mut io_uring::types::BufRingEntry,
    bufs_len: usize,
    /// Entries added so far and entries the kernel has used (both
    /// wrapping): `tail - head` buffers are posted.
    tail: u16,
    head: u16,
    /// The multishot read is live in the kernel (its last completion said
    /// more will come).
    armed: bool,
}

// SAFETY: `bufs` points at memory this ring owns (mapped in `new`,
// unmapped in `drop`), used only through `&mut self`; nothing else holds it.
unsafe impl Send for ReadRing {}

impl std::fmt::Debug for ReadRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadRing")
            .field("posted", &self.posted())
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

/// One completion of a [`ReadRing`]: a frame of `result` bytes in buffer
/// `id`, or (`id` None) the read's end with `-errno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadDone {
    pub id: Option<u16>,
    pub result: i32,
}

impl ReadRing {
    /// Sets a ring up to read `file` (the kernel keeps a reference to it
    /// as long as the ring lives): created disabled, `file` and its buffer
    /// ring registered, restricted, then enabled. Fails as the kernel
    /// refuses: no io_uring (ENOSYS, EPERM) or no multishot read (EINVAL:
    /// Linux < 6.7 knows no such opcode to allow).
    pub fn new(file: BorrowedFd<'_>) -> io::Result<ReadRing> {
        #[cfg(any(test, feature = "test-utils"))]
        if let Some(errno) = refuse::get().or_else(refuse::get_posted) {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let ring = io_uring::IoUring::builder()
            .setup_r_disabled()
            // A frame arriving while the worker runs is read at its next
            // syscall, without an interrupt (an IPI: a hypervisor exit on
            // a VM's host); one arriving while it sleeps (in `epoll_wait`,
            // interruptibly) still wakes it.
            .setup_coop_taskrun()
            // Each buffer is one completion; a cancellation two more.
            .setup_cqsize(4 * u32::from(POSTED_READS))
            .build(4)?;
        let bufs_len = (usize::from(POSTED_READS)
            * std::mem::size_of::<io_uring::types::BufRingEntry>())
        .next_multiple_of(4096);
        // SAFETY: a fresh private anonymous mapping: no existing memory is
        // affected; the result is checked below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bufs_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let this = ReadRing {
            ring,
            bufs: at.cast(),
            bufs_len,
            tail: 0,
            head: 0,
            armed: false,
        };
        let submitter = this.ring.submitter();
        // SAFETY: `bufs` is page-aligned, zeroed (tail 0: no buffers) and
        // `bufs_len` bytes long, room for POSTED_READS entries. The kernel
        // pins its pages at registration; `Drop` unmaps our view only when
        // no read is live (none then selects a buffer from it), and keeps
        // it while one may be.
        unsafe { submitter.register_buf_ring_with_flags(at as u64, POSTED_READS, READ_GROUP, 0)? };
        use io_uring::opcode::{AsyncCancel, ReadMulti};
        restrict_to_file(
            &this.ring,
            file,
            &[ReadMulti::CODE, AsyncCancel::CODE],
            io_uring::squeue::Flags::BUFFER_SELECT.bits(),
        )?;
        Ok(this)
    }

    /// The ring's fd: readable while completions wait.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Buffers posted and not used yet.
    pub fn posted(&self) -> usize {
        usize::from(self.tail.wrapping_sub(self.head))
    }

    /// Whether the read is live in the kernel.
    pub fn armed(&self) -> bool {
        self.armed
    }

    /// Posts `len` bytes at `addr` as buffer `id`, after those posted
    /// already; `false` (nothing posted) if [`POSTED_READS`] are.
    ///
    /// # Safety
    ///
    /// The memory must stay mapped and writable, and hold nothing that
    /// Rust code reads as a typed value, until a completion reports this
    /// buffer used or [`ReadRing::cancel`] has returned `Ok` (or for good,
    /// if the ring fails: see [`ReadRing::leak`]).
    pub unsafe fn post(&mut self, addr: *mut u8, len: u32, id: u16) -> bool {
        if self.posted() >= usize::from(POSTED_READS) {
            return false;
        }
        let slot = usize::from(self.tail & (POSTED_READS - 1));
        // SAFETY: `slot` < POSTED_READS entries of the mapping `bufs`
        // points at; the kernel reads entries only below the tail, which
        // is published after this write.
        let entry = unsafe { &mut *self.bufs.add(slot) };
        entry.set_addr(addr as u64);
        entry.set_len(len);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        self.publish_tail();
        true
    }

    /// Stores our tail where the kernel reads it (the `resv` of the buffer
    /// ring's first entry), after the entries below it.
    fn publish_tail(&mut self) {
        // SAFETY: the tail field of the first entry of the mapping `bufs`
        // points at (mapped in `new` for as long as `self`), written only
        // by us; the release orders the entries written before it.
        unsafe {
            let tail = io_uring::types::BufRingEntry::tail(self.bufs.cast_const());
            std::sync::atomic::AtomicU16::from_ptr(tail.cast_mut())
                .store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// Starts the multishot read of the ring's file if it is not live: one
    /// `io_uring_enter`, which does not wait.
    pub fn arm(&mut self) -> io::Result<()> {
        if self.armed {
            return Ok(());
        }
        let entry = io_uring::opcode::ReadMulti::new(THE_FILE, 0, READ_GROUP)
            .build()
            .user_data(POSTED_READ);
        // SAFETY: the read writes only into posted buffers (the caller's
        // contract on `post`); the submission itself points at nothing.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        enter(&mut self.ring, 0)?;
        self.armed = true;
        Ok(())
    }

    /// Takes the completions waiting (no syscall), in order, into `out`.
    pub fn take(&mut self, out: &mut std::collections::VecDeque<ReadDone>) {
        for cqe in self.ring.completion() {
            let flags = cqe.flags();
            if cqe.user_data() != POSTED_READ {
                continue;
            }
            let id = io_uring::cqueue::buffer_select(flags);
            if id.is_some() {
                self.head = self.head.wrapping_add(1);
            }
            if !io_uring::cqueue::more(flags) {
                self.armed = false;
            }
            out.push_back(ReadDone {
                id,
                result: cqe.result(),
            });
        }
    }

    /// Ends the read (if live) and waits until the kernel says it has
    /// ended; its last completions go to `out`. Then no buffer is posted
    /// any more: the caller owns them all again. An error means the ring
    /// failed with the read perhaps still live: [`ReadRing::leak`] it.
    pub fn cancel(&mut self, out: &mut std::collections::VecDeque<ReadDone>) -> io::Result<()> {
        if self.armed {
            let entry = io_uring::opcode::AsyncCancel::new(POSTED_READ)
                .build()
                // The restrictions require the flag on every request (a
                // cancellation by user data names no file).
                .flags(io_uring::squeue::Flags::FIXED_FILE)
                .user_data(CANCEL_READ);
            // SAFETY: a cancellation points at no memory.
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
            while self.armed {
                enter(&mut self.ring, 1)?;
                self.take(out);
            }
        }
        // No read is live: what the kernel did not use is ours, and the
        // ring starts empty again (the kernel reads the tail afresh).
        self.tail = self.head;
        self.publish_tail();
        Ok(())
    }

    /// Forgets the ring without closing it: a read that may still be live
    /// keeps its buffer ring and the memory it writes (the caller leaks
    /// that) for the life of the process.
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

/// Registers `file` as the disabled `ring`'s fixed file 0, restricts the
/// ring to the opcodes `ops` on that file alone (`IOSQE_FIXED_FILE`
/// required on every request, `flags` the only other SQE flags allowed, no
/// register operation), then enables it.
fn restrict_to_file(
    ring: &io_uring::IoUring,
    file: BorrowedFd<'_>,
    ops: &[u8],
    flags: u8,
) -> io::Result<()> {
    use io_uring::register::Restriction;
    let submitter = ring.submitter();
    submitter.register_files(&[file.as_raw_fd()])?;
    let fixed = io_uring::squeue::Flags::FIXED_FILE.bits();
    let mut rules: Vec<Restriction> = ops.iter().map(|&op| Restriction::sqe_op(op)).collect();
    rules.push(Restriction::sqe_flags_allowed(flags | fixed));
    rules.push(Restriction::sqe_flags_required(fixed));
    submitter.register_restrictions(&mut rules)?;
    submitter.register_enable_rings()
}

/// One `io_uring_enter` submitting what was pushed and waiting for
/// `want` completions, retried on EINTR, EAGAIN and EBUSY.
fn enter(ring: &mut io_uring::IoUring, want: usize) -> io::Result<()> {
    loop {
        #[cfg(any(test, feature = "test-utils"))]
        if let Some(errno) = refuse::take_enter() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        #[cfg(any(test, feature = "test-utils"))]
        if let Some(errno) = refuse::take_enter_after_submit() {
            ring.submit()?;
            return Err(io::Error::from_raw_os_error(errno));
        }
        match ring.submit_and_wait(want) {
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

impl Drop for ReadRing {
    fn drop(&mut self) {
        if self.armed {
            // The kernel may still write the buffers and read the buffer
            // ring: keep the mapping (the caller keeps the buffers).
            return;
        }
        // SAFETY: no read is live, so the kernel selects no buffer from the
        // mapping any more (it pinned the pages at registration and drops
        // them with the ring, closed right after this); it was mapped in
        // `new` with this length and is unmapped only here.
        unsafe { libc::munmap(self.bufs.cast(), self.bufs_len) };
    }
}

#[cfg(test)]
impl Uring {
    /// Writes `data` to the ring's file and waits: the write's result
    /// (bytes, or `-errno`).
    pub fn write_and_wait(&mut self, data: &[u8]) -> io::Result<i32> {
        let iov = [libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        }];
        // SAFETY: `iov` and `data` outlive the request: `reap` below waits
        // for it (and this is the only request pushed).
        assert!(unsafe { self.push_writev(iov.as_ptr(), 1, 0) });
        let mut result = None;
        self.reap(|_, r| result = Some(r))?;
        Ok(result.expect("one completion"))
    }
}

/// A test's way to make [`Uring::new`] fail as a kernel that refuses
/// io_uring would, on this thread.
#[cfg(any(test, feature = "test-utils"))]
pub mod refuse {
    use std::cell::Cell;

    thread_local!(static ERRNO: Cell<Option<i32>> = const { Cell::new(None) });

    /// From now on this thread's `Uring::new` fails with `errno` (`None`:
    /// works again).
    pub fn set(errno: Option<i32>) {
        ERRNO.with(|e| e.set(errno));
    }

    pub(super) fn get() -> Option<i32> {
        ERRNO.with(Cell::get)
    }

    thread_local!(static POSTED_ERRNO: Cell<Option<i32>> = const { Cell::new(None) });

    /// From now on this thread's `ReadRing::new` fails with `errno`, as a
    /// kernel without multishot reads would (`None`: works again).
    pub fn set_posted(errno: Option<i32>) {
        POSTED_ERRNO.with(|e| e.set(errno));
    }

    pub(super) fn get_posted() -> Option<i32> {
        POSTED_ERRNO.with(Cell::get)
    }

    thread_local!(static ENTER_ERRNO: Cell<Option<i32>> = const { Cell::new(None) });

    /// This thread's next `Uring::reap` fails with `errno` before the
    /// kernel takes anything, as a broken `io_uring_enter` would.
    pub fn fail_next_enter(errno: i32) {
        ENTER_ERRNO.with(|e| e.set(Some(errno)));
    }

    pub(super) fn take_enter() -> Option<i32> {
        ENTER_ERRNO.with(Cell::take)
    }

    thread_local!(static LATE_ENTER_ERRNO: Cell<Option<i32>> = const { Cell::new(None) });

    /// This thread's next `Uring::reap` fails with `errno` after the
    /// kernel took (and, for a tap, made) every request pushed, before it
    /// reports any: the case where a retry would make a request twice.
    pub fn fail_next_enter_after_submit(errno: i32) {
        LATE_ENTER_ERRNO.with(|e| e.set(Some(errno)));
    }

    pub(super) fn take_enter_after_submit() -> Option<i32> {
        LATE_ENTER_ERRNO.with(Cell::take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::unit::tap_pair;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn interface_name_too_long_is_rejected() {
        assert!(IfReq::with_name("0123456789abcdef").is_err());
        assert!(IfReq::with_name("").is_err());
        assert!(IfReq::with_name("tap0").is_ok());
    }

    #[test]
    fn timer_fires_once_and_can_be_disarmed() {
        let t = Timer::new().unwrap();
        assert_eq!(t.take().unwrap(), 0);
        t.set(Some(std::time::Duration::from_micros(50))).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(t.take().unwrap(), 1);
        t.set(Some(std::time::Duration::from_millis(1))).unwrap();
        t.set(None).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(t.take().unwrap(), 0);
    }

    #[test]
    fn a_ring_writes_its_own_file_and_no_other() {
        let (tap, mut peer) = tap_pair();
        let (other, mut other_peer) = tap_pair();
        let mut ring = Uring::new(tap.as_fd()).unwrap();
        assert_eq!(ring.write_and_wait(&[1u8; 60]).unwrap(), 60);

        // A request naming a file by its descriptor, as a ring without the
        // restriction would take: refused (EACCES), nothing written.
        let data = [2u8; 60];
        let entry =
            io_uring::opcode::Write::new(io_uring::types::Fd(other.as_raw_fd()), data.as_ptr(), 60)
                .offset(u64::MAX)
                .build();
        // SAFETY: `data` outlives the request: `reap` waits for it.
        assert!(unsafe { ring.push(entry, 7) });
        let mut got = Vec::new();
        ring.reap(|n, r| got.push((n, r))).unwrap();

        assert_eq!(got, [(7, -libc::EACCES)]);
        let mut buf = [0u8; 100];
        assert_eq!(peer.read(&mut buf).unwrap(), 60);
        assert!(
            other_peer.read(&mut buf).is_err(),
            "nothing reached the other file"
        );
    }

    #[test]
    fn a_posted_read_ring_reads_its_own_file_and_no_other() {
        let (tap, _peer) = tap_pair();
        let (other, _other_peer) = tap_pair();
        let mut ring = ReadRing::new(tap.as_fd()).unwrap();

        // A multishot read naming another file by its descriptor: refused.
        let entry =
            io_uring::opcode::ReadMulti::new(io_uring::types::Fd(other.as_raw_fd()), 0, READ_GROUP)
                .build()
                .user_data(POSTED_READ);
        // SAFETY: no buffer is posted: the read could write nowhere.
        unsafe { ring.ring.submission().push(&entry) }.unwrap();
        enter(&mut ring.ring, 1).unwrap();
        let results: Vec<i32> = ring.ring.completion().map(|c| c.result()).collect();

        assert_eq!(results, [-libc::EACCES]);
    }

    #[test]
    fn posted_reads_fill_buffers_in_order_until_cancelled() {
        use std::io::Write;
        let (tap, mut peer) = tap_pair();
        let mut ring = ReadRing::new(tap.as_fd()).unwrap();
        let mut bufs = vec![[0u8; 64]; 4];
        for (id, b) in bufs.iter_mut().enumerate() {
            // SAFETY: `bufs` outlives the ring's use of it: cancelled below.
            assert!(unsafe { ring.post(b.as_mut_ptr(), 64, u16::try_from(id).unwrap()) });
        }
        ring.arm().unwrap();
        // Frames arriving after the read was posted land without a call.
        for n in 1..=3u8 {
            peer.write_all(&[n; 10]).unwrap();
        }
        let mut done = std::collections::VecDeque::new();
        while done.len() < 3 {
            assert_eq!(
                wait_readable(&[ring.fd()], 2000).unwrap(),
                1,
                "no completion"
            );
            ring.take(&mut done);
        }
        let got: Vec<_> = done.iter().map(|d| (d.id, d.result)).collect();
        assert_eq!(got, [(Some(0), 10), (Some(1), 10), (Some(2), 10)]);
        assert_eq!(bufs[2][..10], [3; 10]);
        assert!(ring.armed() && ring.posted() == 1);

        done.clear();
        ring.cancel(&mut done).unwrap();
        assert!(!ring.armed());
        assert_eq!(ring.posted(), 0, "the unused buffer is the caller's again");
        assert_eq!(done.back().map(|d| d.id), Some(None), "the read's end");
        // A frame after the cancel stays in the socket.
        peer.write_all(&[9; 10]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        ring.take(&mut done);
        assert_eq!(bufs[3][..10], [0; 10]);
    }

    #[test]
    fn a_frame_arriving_while_the_arming_thread_sleeps_wakes_it() {
        use std::io::Write;
        let (tap, mut peer) = tap_pair();
        let mut ring = ReadRing::new(tap.as_fd()).unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: `buf` outlives the ring's use of it: cancelled below.
        assert!(unsafe { ring.post(buf.as_mut_ptr(), 64, 0) });
        ring.arm().unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            peer.write_all(&[4; 6]).unwrap();
            peer
        });
        // Asleep in poll when the frame comes: the read (task work of
        // this thread) must still run and post its completion.
        assert_eq!(wait_readable(&[ring.fd()], 2000).unwrap(), 1, "not woken");
        let _peer = sender.join().unwrap();
        let mut done = std::collections::VecDeque::new();
        ring.take(&mut done);
        assert_eq!(
            done[0],
            ReadDone {
                id: Some(0),
                result: 6
            }
        );
        ring.cancel(&mut done).unwrap();
    }

    #[test]
    fn another_thread_cancels_the_read_while_the_arming_thread_waits_for_its_lock() {
        // The daemon's request threads end the worker's posted reads while
        // the worker sleeps on the pair's lock: the cancellation runs as
        // the worker's task work, so the kernel must wake it for that.
        use std::sync::{mpsc, Arc, Mutex};
        let (tap, _peer) = tap_pair();
        let buf = Box::leak(Box::new([0u8; 64])).as_mut_ptr() as usize;
        let ring = Arc::new(Mutex::new(None::<ReadRing>));
        let (armed_tx, armed_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let worker = {
            let ring = ring.clone();
            let tap = tap.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut r = ReadRing::new(tap.as_fd()).unwrap();
                // SAFETY: the buffer is leaked: it outlives any read.
                assert!(unsafe { r.post(buf as *mut u8, 64, 0) });
                r.arm().unwrap();
                *ring.lock().unwrap() = Some(r);
                armed_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                drop(ring.lock().unwrap());
            })
        };
        armed_rx.recv().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let canceller = {
            let ring = ring.clone();
            std::thread::spawn(move || {
                let mut held = ring.lock().unwrap();
                go_tx.send(()).unwrap();
                // The worker is asleep on the lock by now.
                std::thread::sleep(std::time::Duration::from_millis(50));
                let mut done = std::collections::VecDeque::new();
                let r = held.as_mut().unwrap();
                r.cancel(&mut done).unwrap();
                done_tx.send(r.armed()).unwrap();
            })
        };
        let armed = done_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the cancel never returned");
        assert!(!armed);
        canceller.join().unwrap();
        worker.join().unwrap();
    }

    #[test]
    fn a_posted_read_without_buffers_ends_and_can_be_armed_again() {
        use std::io::Write;
        let (tap, mut peer) = tap_pair();
        let mut ring = ReadRing::new(tap.as_fd()).unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: `buf` outlives the ring's use of it: cancelled below.
        assert!(unsafe { ring.post(buf.as_mut_ptr(), 64, 7) });
        ring.arm().unwrap();
        peer.write_all(&[1; 5]).unwrap();
        peer.write_all(&[2; 5]).unwrap();
        let mut done = std::collections::VecDeque::new();
        while ring.armed() {
            assert_eq!(wait_readable(&[ring.fd()], 2000).unwrap(), 1);
            ring.take(&mut done);
        }
        assert_eq!(
            done[0],
            ReadDone {
                id: Some(7),
                result: 5
            }
        );
        assert_eq!(done.back().unwrap().result, -libc::ENOBUFS);
        // SAFETY: as above.
        assert!(unsafe { ring.post(buf.as_mut_ptr(), 64, 8) });
        ring.arm().unwrap();
        done.clear();
        while done.is_empty() {
            assert_eq!(wait_readable(&[ring.fd()], 2000).unwrap(), 1);
            ring.take(&mut done);
        }
        assert_eq!(
            done[0],
            ReadDone {
                id: Some(8),
                result: 5
            }
        );
        assert_eq!(buf[..5], [2; 5]);
        ring.cancel(&mut done).unwrap();
    }

    #[test]
    fn eventfd_take_returns_sum_of_writes_then_zero() {
        let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        efd.write(3).unwrap();
        efd.write(4).unwrap();
        assert_eq!(eventfd_take(efd.as_raw_fd()).unwrap(), 7);
        assert_eq!(eventfd_take(efd.as_raw_fd()).unwrap(), 0);
    }
}
