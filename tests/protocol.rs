//! The control plane in-process, without root: the daemon's own connection
//! path (`serve_connection`: a fresh `VhostUserDaemon` per connection behind
//! the relay) serves one end of a socket pair, the test frontend drives the
//! other in QEMU's message order over memfd guest memory, and one
//! `SOCK_SEQPACKET` pair per queue pair stands in for the tap's queues. The
//! tap's control is a recorder: what the device asked of the tap (framing,
//! queues attached and detached) is asserted on its record.
//!
//! Nothing here needs /dev/net/tun, a network namespace or CAP_NET_ADMIN.

use vhost_user_net_harness as common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use common::{eth_frame, TestFrontend, TIMEOUT};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use vhost::VhostBackend;
use vhost_user_net::control::backend::NetBackend;
use vhost_user_net::control::config::DeviceConfig;
use vhost_user_net::control::server::{serve_connection, ConnectionError};
use vhost_user_net::datapath::notify::Policy;
use vhost_user_net::host::sys::wait_readable;
use vhost_user_net::host::tap::Framing;
use vhost_user_net::testing::driver::Used;
use vhost_user_net::testing::tap::{RecordingTap, TapRequest};
use vhost_user_net::VNET_HDR_LEN;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const QUEUE_SIZE: u16 = 256;

/// A device on socket-pair "tap" queues, with no frontend yet.
struct Device {
    backend: Arc<NetBackend>,
    tap: Arc<RecordingTap>,
    pairs: usize,
    /// The kernel's side of each pair's tap queue.
    peers: Vec<File>,
}

impl Device {
    fn new(pairs: usize) -> Device {
        Device::with_tx_coalesce(pairs, "immediate")
    }

    /// A device whose TX rings use coalescing `policy`.
    fn with_tx_coalesce(pairs: usize, policy: &str) -> Device {
        let _ = env_logger::builder().is_test(true).try_init();
        let config = DeviceConfig {
            tap_io: vhost_user_net::host::tap::TapIo::Syscall,
            mac: MAC,
            mtu: 1500,
            queue_pairs: pairs,
            queue_size: QUEUE_SIZE,
            rx_coalesce: Policy::Immediate,
            tx_coalesce: policy.parse().expect("a coalescing policy"),
        };
        let (queues, peers) = (0..pairs).map(|_| seqpacket_pair()).unzip();
        let tap = Arc::new(RecordingTap::new());
        let backend = NetBackend::from_queues(config, queues, tap.clone(), None)
            .expect("a device on socket pairs");
        Device {
            backend: Arc::new(backend),
            tap,
            pairs,
            peers,
        }
    }

    /// Serves a new connection on a thread, as the daemon does for each
    /// frontend, and runs the test frontend's QEMU-order handshake on it.
    fn connect(&self) -> (TestFrontend, Connection) {
        let (frontend_end, daemon_end) = UnixStream::pair().expect("socket pair");
        let (done_tx, done) = mpsc::channel();
        let backend = self.backend.clone();
        let stop = daemon_end.try_clone().expect("clone");
        let server = thread::Builder::new()
            .name("serve_connection".into())
            .spawn(move || {
                let _ = done_tx.send(serve_connection(&backend, daemon_end));
            })
            .expect("spawn");
        let connection = Connection {
            stop,
            done,
            server: Some(server),
        };
        let fe = TestFrontend::over(frontend_end, self.pairs, QUEUE_SIZE, 0);
        (fe, connection)
    }

    /// Writes `frame` behind a zeroed virtio-net header into pair `pair`'s
    /// tap queue, as the kernel hands a frame to a tap queue.
    fn inject(&self, pair: usize, frame: &[u8]) {
        let mut bytes = vec![0u8; VNET_HDR_LEN];
        bytes.extend_from_slice(frame);
        (&self.peers[pair])
            .write_all(&bytes)
            .expect("write to the tap");
    }

    /// The next frame the device wrote into pair `pair`'s tap queue,
    /// without its virtio-net header.
    fn next_on_tap(&self, pair: usize) -> Vec<u8> {
        let peer = &self.peers[pair];
        let timeout_ms = i32::try_from(TIMEOUT.as_millis()).expect("a short timeout");
        let ready = wait_readable(&[peer.as_raw_fd()], timeout_ms).expect("poll the tap");
        assert_eq!(ready, 1, "no frame on pair {pair}'s tap within {TIMEOUT:?}");
        let mut buf = vec![0u8; 65536];
        let n = (&*peer).read(&mut buf).expect("read the tap");
        buf.truncate(n);
        buf.split_off(VNET_HDR_LEN)
    }

    /// Frames moved on queue `queue` since the device was created.
    fn frames(&self, queue: usize) -> u64 {
        self.backend.stats().queues[queue].frames.get()
    }
}

/// One frontend connection being served.
struct Connection {
    /// The daemon's end of the frontend socket, to end a connection a
    /// failing test leaves behind.
    stop: UnixStream,
    done: mpsc::Receiver<Result<(), ConnectionError>>,
    server: Option<JoinHandle<()>>,
}

impl Connection {
    /// The frontend goes away (as QEMU does when it quits): returns what
    /// `serve_connection` returned, once it has.
    fn hang_up(mut self, fe: TestFrontend) -> Result<(), ConnectionError> {
        let server = self.server.take().expect("still served");
        drop(fe);
        let result = self
            .done
            .recv_timeout(TIMEOUT)
            .expect("serve_connection returns when the frontend hangs up");
        server.join().expect("the server thread");
        result
    }
}

impl Drop for Connection {
    /// A test that failed while connected: end the connection from the
    /// daemon's side. A server stuck past `TIMEOUT` is left behind rather
    /// than hanging the test run (the test has failed already).
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.stop.shutdown(std::net::Shutdown::Both);
            if !matches!(
                self.done.recv_timeout(TIMEOUT),
                Err(mpsc::RecvTimeoutError::Timeout)
            ) {
                let _ = server.join();
            }
        }
    }
}

/// `(device end, kernel end)` of a `SOCK_SEQPACKET` pair: it keeps frame
/// boundaries as a tap queue does. Non-blocking, as the daemon's tap fds.
fn seqpacket_pair() -> (File, File) {
    let (device, kernel) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    (File::from(device), File::from(kernel))
}

fn millis_left(deadline: Instant) -> i32 {
    let left = deadline.saturating_duration_since(Instant::now());
    i32::try_from(left.as_millis()).expect("a short timeout")
}

/// Waits, as a virtio driver does, until queue `q` has `n` new used
/// entries: asks for an interrupt after the last entry it read
/// (`used_event`), checks once more, then sleeps on the call eventfd.
fn wait_used(fe: &mut TestFrontend, q: usize, n: usize) -> Vec<Used> {
    let deadline = Instant::now() + TIMEOUT;
    let mut used = Vec::new();
    loop {
        used.extend(fe.used(q));
        if used.len() >= n {
            return used;
        }
        let vq = &fe.vqs[q];
        vq.ring.set_used_event(&fe.mem, vq.ring.last_used());
        fence(Ordering::SeqCst);
        if vq.ring.used_idx(&fe.mem) != vq.ring.last_used() {
            continue;
        }
        let ready = wait_readable(&[vq.call.as_raw_fd()], millis_left(deadline))
            .expect("poll the call eventfd");
        assert_eq!(
            ready,
            1,
            "timed out with {} of {n} used entries on queue {q}",
            used.len()
        );
        vq.take_interrupts();
    }
}

/// The frame the guest received in used entry `u` of RX queue `q`, without
/// its virtio-net header (whose `num_buffers` must be 1).
fn received(fe: &TestFrontend, q: usize, u: Used) -> Vec<u8> {
    let mut buf = fe.rx_buffer(q, u);
    assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");
    buf.split_off(VNET_HDR_LEN)
}

/// A 78-byte Ethernet frame whose payload starts with `tag`.
fn frame(tag: &str) -> Vec<u8> {
    let mut payload = tag.as_bytes().to_vec();
    payload.resize(64, 0);
    eth_frame(MAC, &payload)
}

/// Checks that `got` is exactly [`frame`]`(tag)`, naming what came instead.
fn assert_frame(got: &[u8], tag: &str) {
    if got != frame(tag).as_slice() {
        let payload = got.get(14..).unwrap_or_default();
        let text = String::from_utf8_lossy(payload);
        panic!(
            "expected the frame {tag:?}, got {} bytes: {:?}",
            got.len(),
            text.trim_end_matches('\0')
        );
    }
}

/// A request with a reply: once it returns, the backend (and the relay
/// in front of it) has handled every request sent before it.
fn handled(fe: &TestFrontend) {
    fe.fe.get_features().expect("GET_FEATURES");
}

/// Queues `count` TX frames on pair 0 and kicks once; returns when the
/// device has written them all to the tap.
fn transmit(dev: &Device, fe: &mut TestFrontend, count: usize) {
    for i in 0..count {
        fe.queue_tx(0, &frame(&format!("frame {i}")));
    }
    fe.publish_and_kick(1);
    for i in 0..count {
        assert_frame(&dev.next_on_tap(0), &format!("frame {i}"));
    }
}

/// Moves one frame each way on pair `pair`, TX first, and checks both
/// arrive; returns once both are completed on the rings (and counted).
fn exchange(dev: &Device, fe: &mut TestFrontend, pair: usize, tag: &str) {
    fe.post_rx(pair, 8, 4096);
    fe.send(pair, &frame(&format!("{tag}: from the guest")));
    assert_frame(&dev.next_on_tap(pair), &format!("{tag}: from the guest"));
    // On the tap as soon as it is written; counted before the batch
    // publishes its used entry.
    wait_used(fe, 2 * pair + 1, 1);

    // The RX kick came before the TX kick, so RX has run and found the tap
    // empty: the frame from the network wakes it through the tap.
    dev.inject(pair, &frame(&format!("{tag}: to the guest")));
    let used = wait_used(fe, 2 * pair, 1);
    assert_frame(
        &received(fe, 2 * pair, used[0]),
        &format!("{tag}: to the guest"),
    );
}

/// Attach (`true`) and detach requests for queue `queue`, in order.
fn attachments(tap: &RecordingTap, queue: usize) -> Vec<bool> {
    tap.requests()
        .into_iter()
        .filter_map(|r| match r {
            TapRequest::Attach { queue: q, attached } if q == queue => Some(attached),
            _ => None,
        })
        .collect()
}

#[test]
fn rings_enabled_before_set_features_move_frames_once_features_are_acked() {
    let dev = Device::new(1);
    // QEMU's order: SET_VRING_ENABLE(1), NEED_REPLY, for every ring before
    // SET_FEATURES. The relay holds those and replays them after it.
    let (mut fe, conn) = dev.connect();
    fe.post_rx(0, 8, 4096);

    dev.inject(0, &frame("to the guest"));
    fe.send(0, &frame("from the guest"));

    let used = wait_used(&mut fe, 0, 1);
    assert_frame(&received(&fe, 0, used[0]), "to the guest");
    assert_frame(&dev.next_on_tap(0), "from the guest");
    conn.hang_up(fe).expect("a hang-up is a normal end");
}

#[test]
fn a_second_frontend_is_served_on_the_same_device_with_the_counters_carried_on() {
    let dev = Device::new(1);
    let (mut first, conn) = dev.connect();
    exchange(&dev, &mut first, 0, "first");
    conn.hang_up(first).expect("a hang-up is a normal end");

    let (mut second, conn) = dev.connect();
    exchange(&dev, &mut second, 0, "second");

    assert_eq!(dev.frames(0), 2, "RX frames of both connections");
    assert_eq!(dev.frames(1), 2, "TX frames of both connections");
    conn.hang_up(second).expect("a hang-up is a normal end");
}

#[test]
fn two_queue_pairs_carry_traffic_independently() {
    let dev = Device::new(2);
    let (mut fe, conn) = dev.connect();
    fe.post_rx(0, 8, 4096);
    fe.post_rx(1, 8, 4096);

    dev.inject(1, &frame("to pair 1"));
    dev.inject(0, &frame("to pair 0"));
    fe.send(1, &frame("from pair 1"));
    fe.send(0, &frame("from pair 0"));

    let rx0 = wait_used(&mut fe, 0, 1);
    let rx1 = wait_used(&mut fe, 2, 1);
    assert_frame(&received(&fe, 0, rx0[0]), "to pair 0");
    assert_frame(&received(&fe, 2, rx1[0]), "to pair 1");
    assert_frame(&dev.next_on_tap(0), "from pair 0");
    assert_frame(&dev.next_on_tap(1), "from pair 1");
    wait_used(&mut fe, 1, 1);
    wait_used(&mut fe, 3, 1);
    let counts: Vec<u64> = (0..4).map(|q| dev.frames(q)).collect();
    assert_eq!(counts, [1, 1, 1, 1], "frames per queue");
    conn.hang_up(fe).expect("a hang-up is a normal end");
}

/// A TX policy that holds interrupts for up to a second, or 64 frames.
const HOLDING: &str = "frames=64,usecs=1000000";

#[test]
fn an_interrupt_held_by_the_policy_is_sent_when_the_ring_is_stopped() {
    let dev = Device::with_tx_coalesce(1, HOLDING);
    let (mut fe, conn) = dev.connect();
    transmit(&dev, &mut fe, 3);

    // QEMU's `stop`: GET_VRING_BASE, which waits for the batch to end.
    let base = fe.fe.get_vring_base(1).expect("GET_VRING_BASE");

    let tx = &dev.backend.stats().queues[1];
    assert_eq!(tx.interrupts_deferred.get(), 1, "the policy held it");
    assert!(
        fe.vqs[1].take_interrupts() >= 1,
        "the guest never heard of its 3 frames: the held interrupt was lost with the ring stop"
    );
    assert_eq!((base, fe.used(1).len()), (3, 3));
    conn.hang_up(fe).expect("a hang-up is a normal end");
}

#[test]
fn an_interrupt_held_by_the_policy_is_sent_when_the_ring_is_set_up_again() {
    let dev = Device::with_tx_coalesce(1, HOLDING);
    let (mut fe, conn) = dev.connect();
    transmit(&dev, &mut fe, 3);

    // No GET_VRING_BASE: the frontend sets the running ring up again
    // (NUM, BASE, ADDR, KICK, CALL) from where the device is.
    fe.setup_vring_at(1, 3);
    handled(&fe);

    let tx = &dev.backend.stats().queues[1];
    assert_eq!(tx.interrupts_deferred.get(), 1, "the policy held it");
    assert!(
        fe.vqs[1].take_interrupts() >= 1,
        "the guest never heard of its 3 frames: the held interrupt was lost with the ring's set-up"
    );
    assert_eq!(fe.used(1).len(), 3);
    conn.hang_up(fe).expect("a hang-up is a normal end");
}

#[test]
fn tap_queues_are_attached_only_while_a_frontend_has_the_rx_rings_enabled() {
    let dev = Device::new(2);
    assert!(
        !dev.tap.attached(0) && !dev.tap.attached(1),
        "no frontend yet: the kernel must not queue frames for nobody"
    );

    let (fe, conn) = dev.connect();
    assert!(
        dev.tap.attached(0) && dev.tap.attached(1),
        "the frontend enabled the RX rings"
    );

    conn.hang_up(fe).expect("a hang-up is a normal end");
    assert_eq!(attachments(&dev.tap, 0), [false, true, false]);
    assert_eq!(attachments(&dev.tap, 1), [false, true, false]);
}

#[test]
fn a_disabled_rx_ring_detaches_its_tap_queue_only() {
    let dev = Device::new(2);
    let (mut fe, conn) = dev.connect();

    fe.raw_vring_enable(2, false);

    assert!(dev.tap.attached(0), "pair 0 is still in use");
    assert!(!dev.tap.attached(1), "pair 1's RX ring is disabled");
    conn.hang_up(fe).expect("a hang-up is a normal end");
}

#[test]
fn the_tap_is_framed_as_the_features_the_guest_acked_say() {
    let dev = Device::new(1);
    let (fe, conn) = dev.connect();
    handled(&fe);

    let framing = dev.tap.framing().expect("framing applied at SET_FEATURES");
    assert_eq!(framing, Framing::from_features(fe.features));
    assert_eq!((framing.hdr_len, framing.little_endian), (12, true));
    assert_ne!(framing.offloads, 0, "the guest acked receive offloads");
    conn.hang_up(fe).expect("a hang-up is a normal end");
}
