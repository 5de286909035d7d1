//! Test harness: a network namespace, the daemon running in it, and a
//! vhost-user frontend that drives the daemon exactly as QEMU does, with
//! rings written by `vhost_user_net::testing::driver` in memfd-backed guest memory.
//!
//! Everything created here is removed on drop (namespace, processes by PID),
//! also when a test fails.

#![allow(dead_code)]

pub mod qemu;
pub mod synthetic;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};
use nix::unistd::Pid;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_net::datapath::guest::GuestMem;
use vhost_user_net::testing::driver::{Buf, SplitRing, Used};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique short name for this process and call.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop. IPv6 is off in it, so the kernel
/// sends no unsolicited frames to the tap.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("vun");
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        for key in ["all", "default"] {
            let k = format!("net.ipv6.conf.{key}.disable_ipv6=1");
            run("ip", &["netns", "exec", &ns.name, "sysctl", "-qw", &k]);
        }
        ns
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Creates a persistent multiqueue tap with a virtio-net header, as an
    /// administrator would (`ip tuntap add`), and sets it up.
    pub fn add_tap(&self, name: &str) {
        self.ip(&[
            "tuntap",
            "add",
            "dev",
            name,
            "mode",
            "tap",
            "multi_queue",
            "vnet_hdr",
        ]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// Addresses `tap` as 198.18.0.1/24 and adds a permanent neighbour entry
    /// for the guest (198.18.0.2 at `guest_mac`), so traffic from the
    /// namespace reaches the guest without ARP.
    pub fn route_to_guest(&self, tap: &str, guest_mac: [u8; 6]) {
        let mac = vhost_user_net::control::config::format_mac(&guest_mac);
        self.ip(&["addr", "add", "198.18.0.1/24", "dev", tap]);
        self.ip(&[
            "neigh",
            "replace",
            "198.18.0.2",
            "lladdr",
            &mac,
            "dev",
            tap,
            "nud",
            "permanent",
        ]);
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it
    /// creates live in the namespace).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(path).expect("namespace file");
            setns(ns, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// A raw packet socket in the namespace that sees every frame (the only
    /// interface up in the namespace is the tap).
    pub fn packet_socket(&self) -> OwnedFd {
        self.within(|| {
            let fd = socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
            .expect("packet socket");
            let tv = nix::sys::time::TimeVal::new(0, 200_000);
            setsockopt(&fd, sockopt::ReceiveTimeout, &tv).expect("timeout");
            fd
        })
    }

    /// A UDP socket in the namespace.
    pub fn udp_socket(&self) -> std::net::UdpSocket {
        self.within(|| std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Reads frames from a packet socket until `pred` matches one or time runs out.
pub fn capture(fd: &OwnedFd, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 70_000];
    while Instant::now() < deadline {
        if let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            if pred(&buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
    }
    None
}

/// How the daemon meets the test's frontend.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// `--socket-path` (the daemon listens).
    Listen,
    /// `--socket-path --client` (the test listens).
    Client,
    /// `--fd N`: a listening socket the test made and the daemon inherits.
    Fd(i32),
}

/// The daemon, run inside a namespace; killed (by PID) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub stats_socket: PathBuf,
    pub tap: String,
    stderr_path: PathBuf,
    pub mode: Mode,
    /// The daemon's `RUST_LOG` (debug unless a test counts log lines).
    pub log_filter: &'static str,
}

impl Daemon {
    /// Starts `vhost-user-net` in `ns` on a new tap with `extra` flags and
    /// waits for its socket.
    pub fn start(ns: &Netns, extra: &[&str]) -> Daemon {
        Self::start_in_mode(ns, Mode::Listen, extra)
    }

    /// Starts the daemon with `mode`; `socket` is where the test listens
    /// (client mode) or has bound its socket (fd mode).
    pub fn start_in_mode(ns: &Netns, mode: Mode, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vhost.sock");
        let stats_socket = dir.path().join("vhost.sock.stats");
        let tap = unique("vt");
        let stderr_path = dir.path().join("daemon.log");
        let mut d = Daemon {
            child: None,
            dir,
            socket,
            stats_socket,
            tap,
            stderr_path,
            mode: Mode::Listen,
            log_filter: "debug",
        };
        d.mode = mode;
        d.spawn(ns, extra);
        d
    }

    /// A daemon record with paths chosen but no process yet (to bind the
    /// test's own socket first).
    pub fn paths() -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Daemon {
            child: None,
            socket: dir.path().join("vhost.sock"),
            stats_socket: dir.path().join("vhost.sock.stats"),
            tap: unique("vt"),
            stderr_path: dir.path().join("daemon.log"),
            mode: Mode::Listen,
            log_filter: "debug",
            dir,
        }
    }

    /// (Re)starts the process on the same socket and tap.
    pub fn spawn(&mut self, ns: &Netns, extra: &[&str]) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("log file");
        let socket = self.socket.to_str().expect("utf-8 path").to_owned();
        let stats = self.stats_socket.to_str().expect("utf-8 path").to_owned();
        let fd_text;
        // VUN_DAEMON_WRAP (e.g. "strace -ff -o /tmp/t") runs the daemon
        // under a tool; a debugging aid, unset in CI.
        let wrap = std::env::var("VUN_DAEMON_WRAP").unwrap_or_default();
        let mut args = vec!["netns", "exec", &ns.name];
        args.extend(wrap.split_whitespace());
        args.push(env!("CARGO_BIN_EXE_vhost-user-net"));
        match self.mode {
            Mode::Listen => args.extend(["--socket-path", &socket]),
            Mode::Client => args.extend(["--socket-path", &socket, "--client"]),
            Mode::Fd(fd) => {
                fd_text = fd.to_string();
                args.extend(["--fd", &fd_text]);
            }
        }
        args.extend(["--tap", &self.tap, "--stats-socket", &stats]);
        args.extend_from_slice(extra);
        let child = Command::new("ip")
            .args(&args)
            // Its own process group: kill() takes down a wrapper's children too.
            .process_group(0)
            .env("RUST_LOG", self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        // Ready when the stats socket answers: the daemon serves it only
        // once its setup (tap, sockets, privilege drop) is complete.
        let answers = |path: &Path| {
            let mut text = String::new();
            UnixStream::connect(path)
                .and_then(|mut s| s.read_to_string(&mut text))
                .is_ok_and(|n| n > 0)
        };
        while !answers(&self.stats_socket) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("daemon exited early ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon socket never appeared: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.as_ref().expect("running").id()).expect("pid"))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; returns its status and log.
    pub fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status, self.log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon ignored SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (and its process group, e.g. a wrapper's child)
    /// hard, with no cleanup, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = i32::try_from(child.id()).expect("pid fits i32");
            let _ = kill(Pid::from_raw(-group), Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The counters, as the stats socket serves them.
    pub fn stats(&self) -> Stats {
        let mut s = UnixStream::connect(&self.stats_socket).expect("stats socket");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("stats");
        Stats { text }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}

/// A Prometheus text snapshot.
pub struct Stats {
    pub text: String,
}

impl Stats {
    /// Value of `vhost_user_net_<name>` for queue `q`, read by the parser
    /// the `stats` command uses.
    pub fn get(&self, name: &str, q: usize) -> u64 {
        vhost_user_net::stats::format::parse(&self.text)
            .get(q)
            .and_then(|queue| queue.values.get(name).copied())
            .unwrap_or_else(|| panic!("no {name} for queue {q} in:\n{}", self.text))
    }

    /// Value of the daemon-wide counter `vhost_user_net_<name>`.
    pub fn get_device(&self, name: &str) -> u64 {
        vhost_user_net::stats::format::parse_device(&self.text)
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} in:\n{}", self.text))
    }
}

/// Accepts one connection on `listener` within `TIMEOUT`.
pub fn accept(listener: &std::os::unix::net::UnixListener) -> UnixStream {
    listener.set_nonblocking(true).expect("nonblocking");
    let s = wait_for("the daemon to connect", || {
        listener.accept().ok().map(|(s, _)| s)
    });
    s.set_nonblocking(false).expect("blocking");
    s
}

/// Polls `f` until it returns `Some`, or panics after `TIMEOUT`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub const GUEST_BASE: u64 = 0x10_0000;
pub const GUEST_SIZE: usize = 160 << 20;
const RINGS_SIZE: u64 = 1 << 20;
pub const BUF_AREA: u64 = 16 << 20;

/// One virtqueue as the frontend (the guest) sees it.
pub struct Vq {
    pub ring: SplitRing,
    pub kick: EventFd,
    pub call: EventFd,
    err: EventFd,
    buf_base: u64,
    buf_size: u32,
    next_buf: usize,
    pub event_idx: bool,
}

impl Vq {
    /// Sets the size of the buffers [`Vq::next_buffer`] hands out.
    pub fn set_buf_size(&mut self, size: u32) {
        self.buf_size = size;
    }

    /// Address of a fresh buffer in this queue's area (round robin).
    pub fn next_buffer(&mut self) -> GuestAddress {
        let slots = usize::try_from(BUF_AREA / u64::from(self.buf_size)).expect("small");
        let i = self.next_buf % slots;
        self.next_buf += 1;
        GuestAddress(self.buf_base + i as u64 * u64::from(self.buf_size))
    }

    /// Interrupts received since the last call (reads the call eventfd).
    pub fn take_interrupts(&self) -> u64 {
        self.call.read().unwrap_or(0)
    }
}

/// A vhost-user frontend with its guest memory and rings.
pub struct TestFrontend {
    pub fe: Frontend,
    raw: UnixStream,
    pub mem: GuestMem,
    _mem_file: File,
    pub vqs: Vec<Vq>,
    pub features: u64,
}

/// Virtio-net features a Linux guest acks (everything we offer but the ones
/// `drop` names).
pub fn guest_features(offered: u64, drop: u64) -> u64 {
    offered & !drop
}

impl TestFrontend {
    /// Connects to `socket` and sets the device up with QEMU's exact
    /// message order (early SET_VRING_ENABLE with NEED_REPLY included).
    /// Features the frontend acks are what is offered minus `drop`.
    pub fn connect(socket: &Path, pairs: usize, queue_size: u16, drop: u64) -> TestFrontend {
        let sock = wait_for("the daemon's socket", || UnixStream::connect(socket).ok());
        Self::over(sock, pairs, queue_size, drop)
    }

    /// Like [`TestFrontend::connect`] over a stream already connected to
    /// the daemon (client mode: the daemon connected to us).
    pub fn over(sock: UnixStream, pairs: usize, queue_size: u16, drop: u64) -> TestFrontend {
        sock.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let raw = sock.try_clone().expect("clone");
        let num_queues = 2 * pairs;
        let mut fe = Frontend::from_stream(sock, num_queues as u64);

        let mem_file = tempfile::tempfile().expect("memory file");
        mem_file.set_len(GUEST_SIZE as u64).expect("size");
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(GUEST_BASE),
            GUEST_SIZE,
            Some(FileOffset::new(mem_file.try_clone().expect("clone"), 0)),
        )])
        .expect("guest memory");

        // 1-7: what QEMU asks first.
        let offered = fe.get_features().expect("GET_FEATURES");
        let proto = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE;
        fe.set_protocol_features(proto & wanted)
            .expect("SET_PROTOCOL_FEATURES");
        let queues = fe.get_queue_num().expect("GET_QUEUE_NUM");
        assert!(queues >= num_queues as u64, "daemon serves {queues} queues");
        fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
        fe.set_owner().expect("SET_OWNER");
        let offered_again = fe.get_features().expect("GET_FEATURES");
        assert_eq!(offered, offered_again);

        let event_idx = offered & (1 << 29) != 0 && drop & (1 << 29) == 0;
        let mut vqs = Vec::new();
        for q in 0..num_queues {
            let base = GUEST_BASE + q as u64 * (RINGS_SIZE / 8);
            let ring = SplitRing::new(&mem, GuestAddress(base), queue_size);
            let buf_base = GUEST_BASE + RINGS_SIZE + q as u64 * BUF_AREA;
            let vq = Vq {
                ring,
                kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
                call: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
                err: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
                buf_base,
                buf_size: 4096,
                next_buf: 0,
                event_idx,
            };
            // 8: call and err fds per queue.
            fe.set_vring_call(q, &vq.call).expect("SET_VRING_CALL");
            fe.set_vring_err(q, &vq.err).expect("SET_VRING_ERR");
            vqs.push(vq);
        }
        let mut t = TestFrontend {
            fe,
            raw,
            mem,
            _mem_file: mem_file,
            vqs,
            features: 0,
        };
        // 9: SET_VRING_ENABLE(q, 1) with NEED_REPLY, before SET_FEATURES.
        for q in 0..num_queues {
            t.raw_vring_enable(q, true);
        }
        // 10: SET_FEATURES.
        let features = guest_features(offered, drop);
        t.fe.set_features(features).expect("SET_FEATURES");
        t.features = features;
        // 11: ADD_MEM_REG.
        let region = t.mem.find_region(GuestAddress(GUEST_BASE)).expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        t.fe.add_mem_region(&info).expect("ADD_MEM_REG");
        // 12: per queue NUM, BASE, ADDR, KICK, CALL.
        for q in 0..num_queues {
            t.setup_vring(q);
        }
        t
    }

    /// Per-queue NUM, BASE, ADDR, KICK, CALL, as QEMU sends them.
    pub fn setup_vring(&mut self, q: usize) {
        let base = self.vqs[q].ring.last_used();
        self.setup_vring_at(q, base);
    }

    /// Stops ring `q` (GET_VRING_BASE) and sets it up again from where the
    /// device stopped, as QEMU does when it restarts a device.
    pub fn restart_vring(&mut self, q: usize) {
        let base = self.fe.get_vring_base(q).expect("GET_VRING_BASE");
        self.setup_vring_at(q, u16::try_from(base).expect("a ring index"));
    }

    /// Per-queue NUM, BASE (`base`), ADDR, KICK, CALL.
    pub fn setup_vring_at(&mut self, q: usize, base: u16) {
        let vq = &self.vqs[q];
        let host = |a: GuestAddress| {
            self.mem
                .get_host_address(a)
                .expect("ring address in memory") as u64
        };
        let size = vq.ring.size();
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host(vq.ring.desc_addr()),
            used_ring_addr: host(vq.ring.used_addr()),
            avail_ring_addr: host(vq.ring.avail_addr()),
            log_addr: None,
        };
        self.fe.set_vring_num(q, size).expect("SET_VRING_NUM");
        self.fe.set_vring_base(q, base).expect("SET_VRING_BASE");
        self.fe.set_vring_addr(q, &cfg).expect("SET_VRING_ADDR");
        self.fe.set_vring_kick(q, &vq.kick).expect("SET_VRING_KICK");
        self.fe.set_vring_call(q, &vq.call).expect("SET_VRING_CALL");
    }

    /// SET_VRING_ENABLE written by hand: vhost's Frontend refuses to send it
    /// before SET_FEATURES, but QEMU does exactly that.
    pub fn raw_vring_enable(&mut self, q: usize, enable: bool) {
        let mut msg = Vec::new();
        msg.extend_from_slice(&18u32.to_le_bytes()); // SET_VRING_ENABLE
        msg.extend_from_slice(&(0x1u32 | 0x8).to_le_bytes()); // version | NEED_REPLY
        msg.extend_from_slice(&8u32.to_le_bytes());
        msg.extend_from_slice(&u32::try_from(q).expect("small").to_le_bytes());
        msg.extend_from_slice(&u32::from(enable).to_le_bytes());
        self.raw.write_all(&msg).expect("send SET_VRING_ENABLE");
        let mut reply = [0u8; 20];
        self.raw
            .read_exact(&mut reply)
            .expect("SET_VRING_ENABLE reply");
        assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 18);
        assert_eq!(
            u64::from_le_bytes(reply[12..20].try_into().unwrap()),
            0,
            "NACK"
        );
    }

    /// Queues one TX frame (header + `frame`) on pair `pair`,
    /// publishes it and kicks if the device asks. Returns whether it kicked.
    pub fn send(&mut self, pair: usize, frame: &[u8]) -> bool {
        self.queue_tx(pair, frame);
        self.publish_and_kick(2 * pair + 1)
    }

    /// Length of the virtio-net header the acked features call for: 12
    /// bytes with VERSION_1 or MRG_RXBUF, else the legacy 10 bytes.
    pub fn hdr_len(&self) -> usize {
        const VERSION_1: u64 = 1 << 32;
        const MRG_RXBUF: u64 = 1 << 15;
        if self.features & (VERSION_1 | MRG_RXBUF) != 0 {
            12
        } else {
            10
        }
    }

    /// Queues one TX frame (a zeroed header of [`TestFrontend::hdr_len`]
    /// bytes, then `frame`) without publishing it.
    pub fn queue_tx(&mut self, pair: usize, frame: &[u8]) {
        let hdr_len = self.hdr_len();
        let vq = &mut self.vqs[2 * pair + 1];
        let addr = vq.next_buffer();
        let mut bytes = vec![0u8; hdr_len];
        bytes.extend_from_slice(frame);
        assert!(
            bytes.len() <= vq.buf_size as usize,
            "frame too large for a TX buffer"
        );
        self.mem.write_slice(&bytes, addr).expect("write frame");
        let len = u32::try_from(bytes.len()).expect("small");
        push_one(&self.mem, vq, addr, len, false);
    }

    /// Publishes queued chains of queue `q`; kicks if the device asks.
    pub fn publish_and_kick(&mut self, q: usize) -> bool {
        let vq = &mut self.vqs[q];
        let (old, new) = vq.ring.publish(&self.mem);
        let kick = vq.ring.needs_kick(&self.mem, vq.event_idx, old, new);
        if kick {
            vq.kick.write(1).expect("kick");
        }
        kick
    }

    /// Posts `count` writable RX buffers of `size` bytes on pair `pair`.
    pub fn post_rx(&mut self, pair: usize, count: usize, size: u32) {
        let vq = &mut self.vqs[2 * pair];
        vq.buf_size = size;
        for _ in 0..count {
            let addr = vq.next_buffer();
            push_one(&self.mem, vq, addr, size, true);
        }
        self.publish_and_kick(2 * pair);
    }

    /// Used entries of queue `q` published so far.
    pub fn used(&mut self, q: usize) -> Vec<Used> {
        let vq = &mut self.vqs[q];
        std::iter::from_fn(|| vq.ring.pop_used(&self.mem)).collect()
    }

    /// Waits until queue `q` has used at least `n` entries in total (the
    /// entries are returned, including earlier ones passed in `acc`).
    pub fn wait_used(&mut self, q: usize, n: usize) -> Vec<Used> {
        let mut acc = Vec::new();
        wait_for(&format!("{n} used entries on queue {q}"), || {
            acc.extend(self.used(q));
            (acc.len() >= n).then(|| acc.clone())
        })
    }

    /// Guest address of the buffer behind used entry `u` of RX queue `q`.
    pub fn rx_buffer(&self, q: usize, u: Used) -> Vec<u8> {
        let d = self.read_desc(q, u.head);
        let mut out = vec![0u8; u.len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(d.0))
            .expect("read buffer");
        out
    }

    fn read_desc(&self, q: usize, index: u16) -> (u64, u32) {
        let at = GuestAddress(self.vqs[q].ring.desc_addr().0 + 16 * u64::from(index));
        let addr: u64 = self.mem.read_obj(at).expect("descriptor");
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(at.0 + 8))
            .expect("descriptor");
        (u64::from_le(addr), u32::from_le(len))
    }
}

/// Adds a one-buffer chain to `vq` and puts it in the avail ring (not yet
/// published).
fn push_one(mem: &GuestMem, vq: &mut Vq, addr: GuestAddress, len: u32, device_writes: bool) {
    let buf = Buf {
        addr,
        len,
        device_writes,
    };
    let head = vq.ring.add_chain(mem, &[buf]).expect("free descriptors");
    vq.ring.push_avail(mem, head);
}

/// An Ethernet frame: broadcast destination, `src` MAC, ethertype 0x88b5
/// (local experimental), `payload`.
pub fn eth_frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(payload);
    f
}
