//! Each class's filter, installed on a thread of its own: what the class
//! must not do is refused (`EPERM`), what it needs still works.

use super::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use crate::host::{sys, tap};

/// Runs `f` on a new thread under the filter of `class`, and returns what
/// it returns.
fn under<T: Send + 'static>(class: Class, f: impl FnOnce() -> T + Send + 'static) -> T {
    let program = filter(class, Mode::On).unwrap().unwrap();
    std::thread::spawn(move || {
        seccompiler::apply_filter(&program).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> Option<i32> {
    r.unwrap_err().raw_os_error()
}

const EPERM: Option<i32> = Some(libc::EPERM);

/// Opening a file for reading: refused in every class.
fn open_file() -> Option<i32> {
    errno(File::open("/proc/self/stat"))
}

/// An `AF_INET` socket: refused in every class.
fn inet_socket() -> Option<i32> {
    errno(std::net::UdpSocket::bind("127.0.0.1:0"))
}

/// An `AF_UNIX` socket.
fn unix_socket() -> std::io::Result<()> {
    UnixStream::pair().map(drop)
}

/// A file that is not a tap: an allowed tap ioctl reaches the kernel and
/// fails for that (`ENOTTY` or `EINVAL`), a forbidden one never gets there.
fn not_a_tap() -> File {
    File::open("/dev/null").unwrap()
}

/// `TUNSETIFF` on `f`.
fn tunsetiff(f: &File) -> Option<i32> {
    errno(sys::tun_attach(f, "vun-none", 0))
}

/// `TUNSETQUEUE` on `f`.
fn tunsetqueue(f: &File) -> Option<i32> {
    errno(sys::tun_set_queue(f, false))
}

/// `TUNSETOFFLOAD` on `f`.
fn tunsetoffload(f: &File) -> Option<i32> {
    errno(sys::tun_set_offload(f, 0))
}

/// A message with a file attached, sent and received on a socket pair made
/// before the filter: the relay's and the request thread's work.
fn message_with_fd_passes(a: &UnixStream, b: &UnixStream, file: File) {
    let sent = sys::send_with_files(a, b"hello", &[file]).unwrap();
    assert_eq!(sent, 5);
    let mut buf = [0u8; 5];
    let (n, files) = sys::recv_with_files(b, &mut buf).unwrap();
    assert_eq!((&buf[..n], files.len()), (&b"hello"[..], 1));
}

#[test]
fn every_class_builds_in_every_mode() {
    for class in Class::ALL {
        assert!(filter(class, Mode::On).unwrap().is_some(), "{class:?}");
        assert!(filter(class, Mode::Log).unwrap().is_some(), "{class:?}");
        assert!(filter(class, Mode::Off).unwrap().is_none(), "{class:?}");
    }
}

#[test]
fn a_worker_cannot_open_files_sockets_or_ioctl_but_still_moves_data() {
    let (efd, tapless) = (
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        not_a_tap(),
    );
    under(Class::Worker, move || {
        assert_eq!(open_file(), EPERM);
        assert_eq!(inet_socket(), EPERM);
        assert_eq!(errno(unix_socket()), EPERM);
        assert_eq!(tunsetqueue(&tapless), EPERM);
        // What the data path does still works.
        efd.write(3).unwrap();
        assert_eq!(sys::eventfd_take(efd.as_raw_fd()).unwrap(), 3);
        let v: Vec<u8> = vec![0; 1 << 20];
        drop(v);
    });
    // Other threads are not filtered.
    assert!(File::open("/proc/self/stat").is_ok());
}

#[test]
fn a_worker_writes_through_a_ring_made_before_its_filter_but_cannot_make_one() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let ring = sys::Uring::new(a.as_fd()).expect("io_uring on the test machine");
    let got = under(Class::Worker, move || {
        let mut ring = ring;
        let written = ring.write_and_wait(&[7u8; 5]).unwrap();
        // A new ring is refused, as in a container that forbids io_uring:
        // the daemon would fall back to writev.
        (written, errno(sys::Uring::new(a.as_fd())))
    });
    assert_eq!(got, (5, EPERM));
    let mut buf = [0u8; 8];
    assert_eq!(b.read(&mut buf).unwrap(), 5);
}

#[test]
fn the_relay_threads_move_messages_with_fds_and_nothing_else() {
    for class in [Class::RelayRequests, Class::RelayReplies] {
        let (a, b) = UnixStream::pair().unwrap();
        let (tapless, attached) = (not_a_tap(), not_a_tap());
        under(class, move || {
            assert_eq!(open_file(), EPERM);
            assert_eq!(inet_socket(), EPERM);
            assert_eq!(errno(unix_socket()), EPERM);
            assert_eq!(tunsetiff(&tapless), EPERM);
            message_with_fd_passes(&a, &b, attached);
        });
    }
}

#[test]
fn only_relay_requests_may_attach_or_detach_tap_queues() {
    let tapless = not_a_tap();
    let requests = under(Class::RelayRequests, move || tunsetqueue(&tapless));
    assert_ne!(requests, EPERM, "reached the kernel");
    let tapless = not_a_tap();
    let replies = under(Class::RelayReplies, move || tunsetqueue(&tapless));
    assert_eq!(replies, EPERM);
}

#[test]
fn the_request_thread_maps_guest_memory_and_sets_tap_framing_but_opens_nothing() {
    use vm_memory::mmap::MmapRegionBuilder;
    let memfd = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    memfd.set_len(1 << 16).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let (tapless, attached) = (not_a_tap(), not_a_tap());
    under(Class::Requests, move || {
        assert_eq!(open_file(), EPERM);
        assert_eq!(inet_socket(), EPERM);
        assert_eq!(errno(unix_socket()), EPERM);
        assert_eq!(tunsetiff(&tapless), EPERM, "no re-attach here");
        assert_ne!(tunsetoffload(&tapless), EPERM, "reached the kernel");
        message_with_fd_passes(&a, &b, attached);
        let map = |prot| {
            MmapRegionBuilder::<()>::new(1 << 16)
                .with_file_offset(vm_memory::FileOffset::new(memfd.try_clone().unwrap(), 0))
                .with_mmap_prot(prot)
                .with_mmap_flags(libc::MAP_SHARED)
                .build()
        };
        assert!(
            map(libc::PROT_READ | libc::PROT_WRITE).is_ok(),
            "guest memory"
        );
        assert!(
            map(libc::PROT_READ | libc::PROT_EXEC).is_err(),
            "never executable"
        );
    });
}

#[test]
fn frontends_accepts_on_unix_sockets_and_starts_threads_that_narrow_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("s")).unwrap();
    let client = UnixStream::connect(dir.path().join("s")).unwrap();
    let tapless = not_a_tap();
    let path = dir.path().to_owned();
    let children: Vec<_> = [
        Class::RelayRequests,
        Class::RelayReplies,
        Class::Requests,
        Class::Worker,
    ]
    .into_iter()
    .map(|class| {
        let program = filter(class, Mode::On).unwrap().unwrap();
        let attached = if class == Class::Worker {
            File::from(std::os::fd::OwnedFd::from(
                nix::sys::eventfd::EventFd::new().unwrap(),
            ))
        } else {
            not_a_tap()
        };
        (class, program, UnixStream::pair().unwrap(), attached)
    })
    .collect();
    under(Class::Frontends, move || {
        assert_eq!(open_file(), EPERM, "only directories");
        assert_eq!(inet_socket(), EPERM);
        assert_eq!(tunsetiff(&tapless), EPERM);
        assert_eq!(
            errno(std::process::Command::new("/bin/true").status()),
            EPERM,
            "no execve"
        );
        let _ = listener.accept().unwrap();
        drop(client);
        // The private socket's directory: made, used, removed.
        let private = path.join("private");
        std::fs::create_dir(&private).unwrap();
        let inner = UnixListener::bind(private.join("backend.sock")).unwrap();
        drop(UnixStream::connect(private.join("backend.sock")).unwrap());
        drop(inner);
        std::fs::remove_dir_all(&private).unwrap();
        // The threads it starts can narrow themselves, and then do their work.
        for (class, program, (a, b), attached) in children {
            std::thread::Builder::new()
                .name(class.thread_name().into())
                .spawn(move || {
                    seccompiler::apply_filter(&program).unwrap();
                    if class == Class::Worker {
                        // An eventfd, as the data path uses.
                        let mut efd = attached;
                        efd.write_all(&1u64.to_ne_bytes()).unwrap();
                        assert_eq!(sys::eventfd_take(efd.as_raw_fd()).unwrap(), 1);
                    } else {
                        message_with_fd_passes(&a, &b, attached);
                    }
                })
                .unwrap()
                .join()
                .unwrap();
        }
    });
}

#[test]
fn stats_serves_a_connection_but_cannot_ioctl_or_open() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("stats")).unwrap();
    let client = UnixStream::connect(dir.path().join("stats")).unwrap();
    let tapless = not_a_tap();
    under(Class::Stats, move || {
        assert_eq!(open_file(), EPERM);
        assert_eq!(inet_socket(), EPERM);
        assert_eq!(errno(unix_socket()), EPERM);
        assert_eq!(tunsetqueue(&tapless), EPERM);
        let (mut c, _) = listener.accept().unwrap();
        c.write_all(b"counters").unwrap();
    });
    let mut text = String::new();
    (&client).read_to_string(&mut text).unwrap();
    assert_eq!(text, "counters");
}

#[test]
fn prometheus_answers_http_on_tcp_but_cannot_ioctl_or_open() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let tapless = not_a_tap();
    under(Class::Prometheus, move || {
        assert_eq!(open_file(), EPERM);
        assert_eq!(inet_socket(), EPERM, "it only accepts");
        assert_eq!(tunsetqueue(&tapless), EPERM);
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut head = [0u8; 18];
        c.read_exact(&mut head).unwrap();
        c.write_all(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
    });
    let mut text = String::new();
    client.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.0 200"));
}

#[test]
fn tap_watch_re_attaches_taps_but_cannot_touch_interfaces_otherwise() {
    let tapless = not_a_tap();
    under(Class::TapWatch, move || {
        assert_ne!(tunsetiff(&tapless), EPERM, "reached the kernel");
        assert_ne!(tunsetqueue(&tapless), EPERM, "reached the kernel");
        // Interface flags and MTU go through an AF_INET socket: refused.
        assert_eq!(errno(sys::set_link_up("lo")), EPERM);
        assert_eq!(open_file(), EPERM);
        assert_eq!(errno(unix_socket()), EPERM);
        // Looking for the interface works.
        assert!(tap::exists("lo"));
    });
}

#[test]
fn signals_waits_on_its_socket_and_nothing_else() {
    let (a, b) = UnixStream::pair().unwrap();
    let tapless = not_a_tap();
    (&a).write_all(b"\x0f").unwrap();
    under(Class::Signals, move || {
        assert_eq!(open_file(), EPERM);
        assert_eq!(inet_socket(), EPERM);
        assert_eq!(errno(unix_socket()), EPERM);
        assert_eq!(tunsetqueue(&tapless), EPERM);
        let mut buf = [0u8; 1];
        (&b).read_exact(&mut buf).unwrap();
        assert_eq!(buf, [0x0f]);
    });
}

#[test]
fn main_removes_its_sockets_and_notifies_systemd_but_cannot_open_or_ioctl() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vhost.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let notify = std::os::unix::net::UnixDatagram::bind(dir.path().join("notify")).unwrap();
    let notify_path = dir.path().join("notify");
    let tapless = not_a_tap();
    under(Class::Main, move || {
        assert_eq!(open_file(), EPERM);
        assert_eq!(inet_socket(), EPERM);
        assert_eq!(tunsetqueue(&tapless), EPERM);
        let d = std::os::unix::net::UnixDatagram::unbound().unwrap();
        d.connect(&notify_path).unwrap();
        d.send(b"STOPPING=1\n").unwrap();
        std::fs::remove_file(&sock).unwrap();
        drop(listener);
    });
    let mut buf = [0u8; 32];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    assert!(!dir.path().join("vhost.sock").exists());
}

#[test]
fn off_means_no_filter_and_enter_before_init_does_nothing() {
    assert!(worker_filter(Mode::Off).unwrap().is_none());
    assert!(worker_filter(Mode::Log).unwrap().is_some());
    std::thread::spawn(|| {
        if FILTERS.get().is_none() {
            enter(Class::Worker);
            assert!(File::open("/proc/self/stat").is_ok());
        }
    })
    .join()
    .unwrap();
}

/// What the kernel's seccomp action cache (Linux >= 5.11) decides for
/// syscall `nr` at filter install time: `true` when `program` allows it
/// whatever its arguments. For such syscalls the kernel never runs the
/// filter again, so their place in the program costs nothing. This walks
/// the program knowing only the syscall number and the architecture, as
/// the kernel does, and gives up (`false`) at anything else.
fn kernel_caches_allow(program: &[seccompiler::sock_filter], nr: i64) -> bool {
    const LD_W_ABS: u16 = 0x20;
    const RET_K: u16 = 0x06;
    const JA: u16 = 0x05;
    const JEQ_K: u16 = 0x15;
    const JGT_K: u16 = 0x25;
    const JGE_K: u16 = 0x35;
    const JSET_K: u16 = 0x45;
    const AND_K: u16 = 0x54;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const NR_OFFSET: u32 = 0;
    const ARCH_OFFSET: u32 = 4;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let nr = u32::try_from(nr).expect("a syscall number");
    let mut acc = 0u32;
    let mut pc = 0usize;
    while let Some(insn) = program.get(pc) {
        let k = insn.k;
        pc += 1;
        match insn.code {
            LD_W_ABS => match k {
                NR_OFFSET => acc = nr,
                ARCH_OFFSET => acc = AUDIT_ARCH_X86_64,
                _ => return false,
            },
            RET_K => return k == RET_ALLOW,
            JA => pc += k as usize,
            JEQ_K | JGT_K | JGE_K | JSET_K => {
                let taken = match insn.code {
                    JEQ_K => acc == k,
                    JGT_K => acc > k,
                    JGE_K => acc >= k,
                    _ => acc & k != 0,
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            AND_K => acc &= k,
            _ => return false,
        }
    }
    false
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_data_paths_syscalls_never_run_the_filter() {
    // A worker runs under the frontends filter (the thread that created
    // it) and its own. The syscalls it makes per frame or per batch are
    // allowed whatever their arguments, so the kernel's action cache
    // allows them without running either program: their order in the
    // program (seccompiler sorts by number) does not matter. An argument
    // condition on one of them would make every call run the program.
    let hot = [
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_epoll_wait,
        libc::SYS_io_uring_enter,
    ];
    for class in [Class::Frontends, Class::Worker] {
        let program = filter(class, Mode::On).unwrap().unwrap();
        for nr in hot {
            assert!(
                kernel_caches_allow(&program, nr),
                "{class:?}: syscall {nr} would run the filter"
            );
        }
    }
    // The walk does stop at an argument: `openat` is allowed to frontends
    // only for directories.
    let frontends = filter(Class::Frontends, Mode::On).unwrap().unwrap();
    assert!(!kernel_caches_allow(&frontends, libc::SYS_openat));
    // And refuses what is not allowed.
    let worker = filter(Class::Worker, Mode::On).unwrap().unwrap();
    assert!(!kernel_caches_allow(&worker, libc::SYS_socket));
}
