//! Shared pieces for unit tests: guest memory, a ring and the device's
//! `Queue` on it, buffers, and a SOCK_SEQPACKET pair standing in for the tap
//! (it keeps frame boundaries as a tap does).

use std::fs::File;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::driver::{Buf, SplitRing};
use crate::guest::GuestMem;

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
