//! A vhost-user frontend that drives the daemon exactly as QEMU does, with
//! rings written by `vhost_user_net::testing::driver` in memfd-backed guest
//! memory.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_net::datapath::guest::GuestMem;
use vhost_user_net::testing::driver::{Buf, SplitRing, Used};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{wait_for, TIMEOUT};

pub const GUEST_BASE: u64 = 0x10_0000;
pub const GUEST_SIZE: usize = 160 << 20;
const RINGS_SIZE: u64 = 1 << 20;
pub const BUF_AREA: u64 = 16 << 20;
/// Guest bytes per bit of the dirty log.
pub const LOG_PAGE: u64 = 4096;

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
    /// The dirty log shared with SET_LOG_BASE, if any.
    log: Option<File>,
}

/// `VHOST_F_LOG_ALL`: not a guest feature; QEMU acks it only while it
/// migrates.
pub const LOG_ALL: u64 = 1 << 26;

/// `VIRTIO_F_IN_ORDER`: Linux's split-ring driver does not ack it (nor
/// does QEMU pass it on by default); DPDK's virtio-user does.
pub const IN_ORDER: u64 = 1 << 35;

/// Virtio-net features a Linux guest acks (everything we offer but the ones
/// `drop` names, and never `VHOST_F_LOG_ALL` or `VIRTIO_F_IN_ORDER`).
pub fn guest_features(offered: u64, drop: u64) -> u64 {
    offered & !drop & !LOG_ALL & !IN_ORDER
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
        Self::over_acking(sock, pairs, queue_size, drop, 0)
    }

    /// Like [`TestFrontend::connect`], and acks `VIRTIO_F_IN_ORDER` too
    /// if the daemon offers it, driving every ring in order
    /// ([`SplitRing::set_in_order`]), as DPDK's virtio-user does.
    pub fn connect_in_order(
        socket: &Path,
        pairs: usize,
        queue_size: u16,
        drop: u64,
    ) -> TestFrontend {
        let sock = wait_for("the daemon's socket", || UnixStream::connect(socket).ok());
        Self::over_acking(sock, pairs, queue_size, drop, IN_ORDER)
    }

    /// Like [`TestFrontend::over`], acking also the offered features of
    /// `extra` that a Linux guest would not ack.
    fn over_acking(
        sock: UnixStream,
        pairs: usize,
        queue_size: u16,
        drop: u64,
        extra: u64,
    ) -> TestFrontend {
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
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::LOG_SHMFD;
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
            log: None,
        };
        // 9: SET_VRING_ENABLE(q, 1) with NEED_REPLY, before SET_FEATURES.
        for q in 0..num_queues {
            t.raw_vring_enable(q, true);
        }
        // 10: SET_FEATURES.
        let features = guest_features(offered, drop) | (offered & extra);
        if features & IN_ORDER != 0 {
            for vq in &mut t.vqs {
                vq.ring.set_in_order(true);
            }
        }
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
        // A round trip: the daemon handles requests in order, so once this
        // is answered it has taken the whole setup (the calls above do not
        // all wait for a reply), and a test starts from a settled device.
        t.fe.get_features().expect("GET_FEATURES");
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
        let base = self.stop_vring(q);
        self.setup_vring_at(q, base);
    }

    /// Stops ring `q` (GET_VRING_BASE): the index of the next chain the
    /// device would have used.
    pub fn stop_vring(&mut self, q: usize) -> u16 {
        let base = self.fe.get_vring_base(q).expect("GET_VRING_BASE");
        u16::try_from(base).expect("a ring index")
    }

    /// Per-queue NUM, BASE (`base`), ADDR, KICK, CALL.
    pub fn setup_vring_at(&mut self, q: usize, base: u16) {
        let cfg = self.vring_config(q, None);
        let vq = &self.vqs[q];
        self.fe
            .set_vring_num(q, cfg.queue_size)
            .expect("SET_VRING_NUM");
        self.fe.set_vring_base(q, base).expect("SET_VRING_BASE");
        self.fe.set_vring_addr(q, &cfg).expect("SET_VRING_ADDR");
        self.fe.set_vring_kick(q, &vq.kick).expect("SET_VRING_KICK");
        self.fe.set_vring_call(q, &vq.call).expect("SET_VRING_CALL");
    }

    /// Sets ring `q`'s addresses again, asking (`VHOST_VRING_F_LOG`) for
    /// its used ring to be logged at guest address `log` during a migration
    /// (`None`: no separate log address).
    pub fn set_used_log(&mut self, q: usize, log: Option<u64>) {
        let cfg = self.vring_config(q, log);
        self.fe.set_vring_addr(q, &cfg).expect("SET_VRING_ADDR");
    }

    /// Ring `q`'s SET_VRING_ADDR payload: the ring addresses as the
    /// frontend's virtual addresses, and `log` with `VHOST_VRING_F_LOG`.
    fn vring_config(&self, q: usize, log: Option<u64>) -> VringConfigData {
        let ring = &self.vqs[q].ring;
        let host = |a: GuestAddress| {
            self.mem
                .get_host_address(a)
                .expect("ring address in memory") as u64
        };
        VringConfigData {
            queue_max_size: ring.size(),
            queue_size: ring.size(),
            flags: u32::from(log.is_some()),
            desc_table_addr: host(ring.desc_addr()),
            used_ring_addr: host(ring.used_addr()),
            avail_ring_addr: host(ring.avail_addr()),
            log_addr: log,
        }
    }

    /// SET_LOG_FD written by hand (vhost's Frontend has no call for it): the
    /// log-update eventfd `fd` attached, with NEED_REPLY; returns once the
    /// daemon acknowledged it.
    pub fn set_log_fd(&mut self, fd: std::os::fd::RawFd) {
        self.raw_request(7, &[], &[fd]); // SET_LOG_FD
    }

    /// SEND_RARP written by hand (vhost's Frontend has no call for it), with
    /// NEED_REPLY; returns once the daemon acknowledged it.
    pub fn send_rarp(&mut self, mac: [u8; 6]) {
        let mut payload = mac.to_vec();
        payload.extend_from_slice(&[0, 0]);
        self.raw_request(19, &payload, &[]); // SEND_RARP
    }

    /// SET_VRING_ENABLE written by hand: vhost's Frontend refuses to send it
    /// before SET_FEATURES, but QEMU does exactly that.
    pub fn raw_vring_enable(&mut self, q: usize, enable: bool) {
        let mut payload = u32::try_from(q).expect("small").to_le_bytes().to_vec();
        payload.extend_from_slice(&u32::from(enable).to_le_bytes());
        self.raw_request(18, &payload, &[]); // SET_VRING_ENABLE
    }

    /// Sends request `code` with `payload` (and `fds` attached) and
    /// NEED_REPLY on the raw socket; returns once the daemon acknowledged
    /// it with success.
    fn raw_request(&mut self, code: u32, payload: &[u8], fds: &[std::os::fd::RawFd]) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let mut msg = Vec::new();
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&(0x1u32 | 0x8).to_le_bytes()); // version | NEED_REPLY
        msg.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_le_bytes());
        msg.extend_from_slice(payload);
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        let sent = sendmsg::<()>(
            self.raw.as_raw_fd(),
            &[std::io::IoSlice::new(&msg)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap_or_else(|e| panic!("send request {code}: {e}"));
        assert_eq!(sent, msg.len(), "request {code} sent whole");
        let mut reply = [0u8; 20];
        self.raw
            .read_exact(&mut reply)
            .unwrap_or_else(|e| panic!("reply to request {code}: {e}"));
        assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), code);
        assert_eq!(
            u64::from_le_bytes(reply[12..20].try_into().unwrap()),
            0,
            "NACK"
        );
    }

    /// Shares a fresh, zeroed dirty log covering all guest memory
    /// (SET_LOG_BASE with its fd, as QEMU does before a migration).
    pub fn share_dirty_log(&mut self) {
        let pages = (GUEST_BASE + GUEST_SIZE as u64).div_ceil(LOG_PAGE);
        let size = pages.div_ceil(8).next_multiple_of(4096);
        let file = tempfile::tempfile().expect("log file");
        file.set_len(size).expect("log size");
        let region = VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        self.fe.set_log_base(0, Some(region)).expect("SET_LOG_BASE");
        self.log = Some(file);
    }

    /// Acks the guest's features again with `VHOST_F_LOG_ALL` on or off
    /// (what QEMU does when a migration starts or is cancelled).
    pub fn set_log_all(&mut self, on: bool) {
        let features = if on {
            self.features | LOG_ALL
        } else {
            self.features & !LOG_ALL
        };
        // QEMU waits for the reply to this SET_FEATURES: the backend logs
        // from then on (without it the frames sent next could race it).
        self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let acked = self.fe.set_features(features);
        self.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        acked.expect("SET_FEATURES");
        self.features = features;
    }

    /// Guest page numbers (address / 4096) whose bit is set in the log.
    pub fn dirty_pages(&self) -> BTreeSet<u64> {
        let log = self.log.as_ref().expect("share_dirty_log first");
        let mut bytes = vec![0u8; usize::try_from(log.metadata().expect("size").len()).unwrap()];
        log.read_exact_at(&mut bytes, 0).expect("read the log");
        let mut pages = BTreeSet::new();
        for (i, b) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pages.insert(i as u64 * 8 + bit);
                }
            }
        }
        pages
    }

    /// Clears every bit of the log (the frontend has synced it).
    pub fn clear_dirty_log(&self) {
        let log = self.log.as_ref().expect("share_dirty_log first");
        let len = usize::try_from(log.metadata().expect("size").len()).unwrap();
        log.write_all_at(&vec![0u8; len], 0).expect("clear the log");
    }

    /// A byte-for-byte copy of guest memory.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; GUEST_SIZE];
        self.mem
            .read_slice(&mut out, GuestAddress(GUEST_BASE))
            .expect("read guest memory");
        out
    }

    /// Guest address of the descriptor buffer of chain `head` on queue `q`.
    pub fn buffer_addr(&self, q: usize, head: u16) -> u64 {
        self.read_desc(q, head).0
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
        let hdr = vec![0u8; self.hdr_len()];
        self.queue_tx_with_header(pair, &hdr, frame);
    }

    /// Queues one TX frame behind the virtio-net header `hdr` (e.g. one
    /// that asks for segmentation) without publishing it.
    pub fn queue_tx_with_header(&mut self, pair: usize, hdr: &[u8], frame: &[u8]) {
        let vq = &mut self.vqs[2 * pair + 1];
        let addr = vq.next_buffer();
        let mut bytes = hdr.to_vec();
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
