//! Shared pieces for unit tests: guest memory, a ring and the device's
//! `Queue` on it, buffers, and a SOCK_SEQPACKET pair standing in for the tap
//! (it keeps frame boundaries as a tap does).

use std::fs::File;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::datapath::guest::GuestMem;
use crate::testing::driver::{Buf, SplitRing};

pub const MEM_BASE: u64 = 0x1_0000;
pub const MEM_SIZE: usize = 8 << 20;
pub const RING_BASE: u64 = 0x1_0000;
pub const BUF_BASE: u64 = 0x10_0000;

pub fn memory() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(MEM_BASE), MEM_SIZE)]).unwrap()
}

/// The device's view of `ring`.
pub fn device_queue(ring: &SplitRing, event_idx: bool) -> Queue {
    let mut q = Queue::new(ring.size()).unwrap();
    q.set_size(ring.size());
    q.try_set_desc_table_address(ring.desc_addr()).unwrap();
    q.try_set_avail_ring_address(ring.avail_addr()).unwrap();
    q.try_set_used_ring_address(ring.used_addr()).unwrap();
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
}

/// A guest-side ring of `size` entries plus the device's queue on it.
pub fn ring(mem: &GuestMem, size: u16, event_idx: bool) -> (SplitRing, Queue) {
    let r = SplitRing::new(mem, GuestAddress(RING_BASE), size);
    let q = device_queue(&r, event_idx);
    (r, q)
}

/// `(device end, peer end)`: non-blocking SOCK_SEQPACKET sockets.
pub fn tap_pair() -> (File, File) {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    (File::from(a), File::from(b))
}

/// Buffer `i` of `size` bytes in the buffer area.
pub fn buf_addr(i: usize, size: usize) -> GuestAddress {
    GuestAddress(BUF_BASE + (i * size) as u64)
}

/// A TX chain: header + `frame` in one readable buffer at slot `slot`.
pub fn add_tx_frame(mem: &GuestMem, ring: &mut SplitRing, slot: usize, frame: &[u8]) -> u16 {
    let addr = buf_addr(slot, 2048);
    let mut bytes = vec![0u8; crate::VNET_HDR_LEN];
    bytes[0] = 0x01; // NEEDS_CSUM: must reach the tap unchanged
    bytes.extend_from_slice(frame);
    mem.write_slice(&bytes, addr).unwrap();
    let head = ring
        .add_chain(
            mem,
            &[Buf {
                addr,
                len: u32::try_from(bytes.len()).unwrap(),
                device_writes: false,
            }],
        )
        .unwrap();
    ring.push_avail(mem, head);
    head
}

/// `count` RX chains of one writable `size`-byte buffer each, published.
pub fn add_rx_buffers(mem: &GuestMem, ring: &mut SplitRing, count: usize, size: u32) -> Vec<u16> {
    add_rx_buffers_at(mem, ring, 0..count, size)
}

/// RX chains of one writable `size`-byte buffer each, in buffer slots
/// `slots` (a guest refilling after earlier buffers), published.
pub fn add_rx_buffers_at(
    mem: &GuestMem,
    ring: &mut SplitRing,
    slots: std::ops::Range<usize>,
    size: u32,
) -> Vec<u16> {
    let heads = slots
        .map(|i| {
            let b = Buf {
                addr: buf_addr(i, size as usize),
                len: size,
                device_writes: true,
            };
            let head = ring.add_chain(mem, &[b]).unwrap();
            ring.push_avail(mem, head);
            head
        })
        .collect();
    ring.publish(mem);
    heads
}

/// A worker's world without the framework: guest memory with an RX and a TX
/// ring, the pair on a SOCK_SEQPACKET "tap", and a real epoll standing in
/// for the framework's (kick fds at ids 0 and 1, the pair's own fds at the
/// ids it registers).
pub mod world {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, AsRawFd};
    use std::sync::Arc;

    use nix::sys::eventfd::{EfdFlags, EventFd};
    use vhost_user_backend::VringT;
    use vm_memory::{GuestAddress, GuestMemoryAtomic};
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    use crate::datapath::guest::GuestMem;
    use crate::datapath::notify::Policy;
    use crate::datapath::queue_pair::{Event, Listeners, QueuePair};
    use crate::datapath::rx::RxParams;
    use crate::datapath::vring::TrackedVring;
    use crate::stats::Stats;
    use crate::testing::driver::SplitRing;
    use crate::testing::unit::{add_rx_buffers, add_tx_frame, memory, tap_pair, RING_BASE};

    pub struct EpollListeners(pub Epoll);

    impl Listeners for EpollListeners {
        fn register(&self, fd: i32, events: EventSet, id: u64) -> std::io::Result<()> {
            self.0
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, id))
        }
        fn unregister(&self, fd: i32, events: EventSet, id: u64) -> std::io::Result<()> {
            self.0
                .ctl(ControlOperation::Delete, fd, EpollEvent::new(events, id))
        }
    }

    pub struct World {
        pub mem: GuestMem,
        pub rings: [SplitRing; 2],
        pub vrings: [TrackedVring; 2],
        pub kicks: [EventFd; 2],
        pub calls: [EventFd; 2],
        pub pair: QueuePair,
        pub peer: File,
        pub stats: Arc<Stats>,
        pub epoll: Arc<EpollListeners>,
    }

    fn eventfd() -> EventFd {
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap()
    }

    /// A second handle on `e`, as the framework holds it.
    fn eventfd_file(e: &EventFd) -> File {
        File::from(e.as_fd().try_clone_to_owned().unwrap())
    }

    impl World {
        /// Rings of `size` entries, event index on, the given policies.
        pub fn new(size: u16, policies: [Policy; 2]) -> World {
            let mem = memory();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            let rings = [0u64, 1]
                .map(|i| SplitRing::new(&mem, GuestAddress(RING_BASE + i * 0x1_0000), size));
            let kicks = [0, 1].map(|_| eventfd());
            let calls = [0, 1].map(|_| eventfd());
            let vrings = [0, 1].map(|i| {
                let v = <TrackedVring as VringT<_>>::new(atomic.clone(), size).unwrap();
                let r = &rings[i];
                v.set_queue_size(size);
                v.set_queue_info(r.desc_addr().0, r.avail_addr().0, r.used_addr().0)
                    .unwrap();
                v.set_queue_event_idx(true);
                v.set_queue_ready(true);
                v.set_enabled(true);
                v.set_kick(Some(eventfd_file(&kicks[i])));
                v.set_call(Some(eventfd_file(&calls[i])));
                v
            });
            let (tap, peer) = tap_pair();
            let stats = Arc::new(Stats::new(2, [String::new(), String::new()]));
            let tap_ctl = Arc::new(crate::testing::tap::RecordingTap::new());
            let mut pair = QueuePair::new(0, 2, tap, tap_ctl, stats.clone(), policies).unwrap();
            pair.set_rx_params(RxParams {
                hdr_len: 12,
                mergeable: false,
                max_frame: 12 + 1518,
                max_plain_frame: 12 + 1518,
            });
            let epoll = Arc::new(EpollListeners(Epoll::new().unwrap()));
            for (id, k) in kicks.iter().enumerate() {
                epoll
                    .0
                    .ctl(
                        ControlOperation::Add,
                        k.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, id as u64),
                    )
                    .unwrap();
            }
            pair.connect(atomic, epoll.clone()).unwrap();
            World {
                mem,
                rings,
                vrings,
                kicks,
                calls,
                pair,
                peer,
                stats,
                epoll,
            }
        }

        pub fn frames(&self, ring: usize) -> u64 {
            self.stats.queues[ring].frames.get()
        }

        pub fn interrupts(&self, ring: usize) -> u64 {
            self.calls[ring].read().unwrap_or(0)
        }

        /// Posts `count` RX buffers of 2048 bytes.
        pub fn post_rx(&mut self, count: usize) {
            add_rx_buffers(&self.mem, &mut self.rings[0], count, 2048);
        }

        /// Queues `count` 60-byte TX frames (in buffer slots after the RX
        /// buffers) and publishes them.
        pub fn queue_tx(&mut self, count: usize) {
            for i in 0..count {
                add_tx_frame(&self.mem, &mut self.rings[1], 2048 + i, &[0x5a; 60]);
            }
            self.rings[1].publish(&self.mem);
        }

        /// Writes frames into the tap until its buffer is full.
        pub fn fill_tap(&mut self) {
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&[0xa5; 60]);
            while self.peer.write(&frame).is_ok() {}
        }

        /// Reads everything the pair wrote to the tap.
        pub fn drain_tap(&mut self) {
            let mut buf = [0u8; 2048];
            while self.peer.read(&mut buf).is_ok() {}
        }

        /// Waits for the next ready event (at most `ms`) and hands it to the
        /// pair as the framework would. `false`: nothing was ready.
        pub fn step(&mut self, ms: i32) -> bool {
            let mut events = [EpollEvent::default(); 1];
            let n = self.epoll.0.wait(ms, &mut events).unwrap();
            if n == 0 {
                return false;
            }
            let id = u16::try_from(events[0].data()).unwrap();
            if usize::from(id) < 2 {
                self.vrings[usize::from(id)].read_kick().unwrap();
            }
            let event = Event::from_id(id, 2).expect("one of ours");
            self.pair.handle(event, &self.vrings);
            true
        }

        /// Writes one frame (header included) into the tap for RX.
        pub fn inject(&mut self, frame: &[u8]) {
            self.peer.write_all(frame).unwrap();
        }

        /// Closes the far end of the "tap": the pair's writes fail.
        pub fn close_peer(&mut self) {
            let (a, _b) = tap_pair();
            self.peer = a;
        }

        pub fn kick(&self, ring: usize) {
            self.kicks[ring].write(1).unwrap();
        }

        /// Queues `count` TX frames, kicks, and runs the worker until they
        /// are on the tap.
        pub fn transmit(&mut self, count: usize) {
            let target = self.frames(1) + count as u64;
            self.queue_tx(count);
            self.kick(1);
            while self.frames(1) < target {
                assert!(self.step(1000), "the worker stalled");
            }
        }
    }
}
