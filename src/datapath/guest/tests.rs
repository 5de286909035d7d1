use vm_memory::GuestAddress;

use super::*;
use crate::datapath::batch::Batch;
use crate::stats::QueueStats;
use crate::testing::driver::{Buf, Desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::testing::unit::{buf_addr, memory, ring};

fn readable(addr: GuestAddress, len: u32) -> Buf {
    Buf {
        addr,
        len,
        device_writes: false,
    }
}

/// Pops the first available chain of `queue` and pushes it into `iov`.
fn push_first(
    mem: &GuestMem,
    queue: &mut virtio_queue::Queue,
    iov: &mut GuestIoVecs<'_, '_>,
    access: Access,
    max: usize,
) -> Result<usize, ChainError> {
    let chain = virtio_queue::QueueOwnedT::iter(queue, mem)
        .unwrap()
        .next()
        .expect("a chain is available");
    iov.push_chain(chain, access, max)
}

#[test]
fn readable_chain_becomes_one_iovec_per_descriptor() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let head = r
        .add_chain(
            &mem,
            &[readable(buf_addr(0, 64), 12), readable(buf_addr(1, 64), 60)],
        )
        .unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    let len = push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 1000).unwrap();
    assert_eq!(len, 72);
    assert_eq!(iov.segments(), 2);
    assert_eq!(iov.capacity(), 72);
}

#[test]
fn writable_descriptor_in_a_tx_chain_is_refused() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let w = Buf {
        addr: buf_addr(1, 64),
        len: 60,
        device_writes: true,
    };
    let head = r
        .add_chain(&mem, &[readable(buf_addr(0, 64), 12), w])
        .unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    let err = push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 1000).unwrap_err();
    assert_eq!(err, ChainError::WrongDirection { index: 1 });
    assert_eq!(iov.segments(), 0, "a refused chain leaves no iovecs behind");
}

#[test]
fn descriptor_outside_guest_memory_is_refused() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let head = r
        .add_chain(&mem, &[readable(GuestAddress(0x4000_0000), 100)])
        .unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    let err = push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 1000).unwrap_err();
    assert!(matches!(
        err,
        ChainError::OutsideGuestMemory {
            addr: 0x4000_0000,
            ..
        }
    ));
}

#[test]
fn descriptor_straddling_the_end_of_guest_memory_is_refused() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let end = crate::testing::unit::MEM_BASE + crate::testing::unit::MEM_SIZE as u64;
    let head = r
        .add_chain(&mem, &[readable(GuestAddress(end - 10), 100)])
        .unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    let err = push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 1000).unwrap_err();
    assert!(matches!(err, ChainError::OutsideGuestMemory { .. }));
}

#[test]
fn chain_longer_than_the_maximum_is_refused() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let head = r
        .add_chain(&mem, &[readable(buf_addr(0, 4096), 4096)])
        .unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    let err = push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 4095).unwrap_err();
    assert_eq!(err, ChainError::TooLong { max: 4095 });
}

#[test]
fn next_index_beyond_the_table_is_a_broken_table() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let d = Desc {
        addr: buf_addr(0, 64).0,
        len: 64,
        flags: DESC_F_NEXT,
        next: 99,
    };
    r.write_desc(&mem, 0, d);
    r.push_avail(&mem, 0);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    let err = push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 1000).unwrap_err();
    assert_eq!(err, ChainError::BrokenTable);
}

#[test]
fn looping_chain_is_a_broken_table() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    for (i, next) in [(0u16, 1u16), (1, 0)] {
        let d = Desc {
            addr: buf_addr(usize::from(i), 64).0,
            len: 64,
            flags: DESC_F_NEXT,
            next,
        };
        r.write_desc(&mem, i, d);
    }
    r.push_avail(&mem, 0);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    let err = push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 1 << 20).unwrap_err();
    assert_eq!(err, ChainError::BrokenTable);
}

#[test]
fn nested_indirect_table_is_a_broken_table() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let table = buf_addr(10, 4096);
    // The indirect table's only entry is itself indirect: not allowed.
    let inner = Desc {
        addr: table.0,
        len: 16,
        flags: DESC_F_INDIRECT,
        next: 0,
    };
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&inner.addr.to_le_bytes());
    raw[8..12].copy_from_slice(&inner.len.to_le_bytes());
    raw[12..14].copy_from_slice(&inner.flags.to_le_bytes());
    vm_memory::Bytes::write_slice(&mem, &raw, table).unwrap();
    r.write_desc(
        &mem,
        0,
        Desc {
            addr: table.0,
            len: 16,
            flags: DESC_F_INDIRECT,
            next: 0,
        },
    );
    r.push_avail(&mem, 0);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    let err = push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 1000).unwrap_err();
    assert_eq!(err, ChainError::BrokenTable);
}

#[test]
fn indirect_table_of_writable_buffers_is_accepted_for_rx() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let table = buf_addr(10, 4096);
    let mut raw = Vec::new();
    for (i, flags) in [(0u16, DESC_F_WRITE | DESC_F_NEXT), (1, DESC_F_WRITE)] {
        raw.extend_from_slice(&buf_addr(usize::from(i), 256).0.to_le_bytes());
        raw.extend_from_slice(&256u32.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
        raw.extend_from_slice(&(i + 1).to_le_bytes());
    }
    vm_memory::Bytes::write_slice(&mem, &raw, table).unwrap();
    r.write_desc(
        &mem,
        0,
        Desc {
            addr: table.0,
            len: 32,
            flags: DESC_F_INDIRECT,
            next: 0,
        },
    );
    r.push_avail(&mem, 0);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    assert_eq!(
        push_first(&mem, &mut q, &mut iov, Access::DeviceWrites, 1000),
        Ok(512)
    );
}

#[test]
fn write_at_crosses_descriptor_boundaries() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let w = |i, len| Buf {
        addr: buf_addr(i, 64),
        len,
        device_writes: true,
    };
    let head = r.add_chain(&mem, &[w(0, 11), w(1, 20)]).unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    push_first(&mem, &mut q, &mut iov, Access::DeviceWrites, 1000).unwrap();
    iov.write_at(10, &[0xaa, 0xbb]).unwrap();
    let a: u8 = vm_memory::Bytes::read_obj(&mem, GuestAddress(buf_addr(0, 64).0 + 10)).unwrap();
    let b: u8 = vm_memory::Bytes::read_obj(&mem, buf_addr(1, 64)).unwrap();
    assert_eq!((a, b), (0xaa, 0xbb));
}

#[test]
fn chain_of_zero_length_descriptors_has_length_zero() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let head = r
        .add_chain(
            &mem,
            &[readable(buf_addr(0, 64), 0), readable(buf_addr(1, 64), 0)],
        )
        .unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    assert_eq!(
        push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 1000),
        Ok(0)
    );
    assert_eq!(iov.segments(), 0, "no iovec for an empty buffer");
}

#[test]
fn indirect_table_whose_length_is_not_a_multiple_of_16_is_a_broken_table() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    r.write_desc(
        &mem,
        0,
        Desc {
            addr: buf_addr(10, 4096).0,
            len: 20,
            flags: DESC_F_INDIRECT,
            next: 0,
        },
    );
    r.push_avail(&mem, 0);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    let err = push_first(&mem, &mut q, &mut iov, Access::DeviceReads, 1000).unwrap_err();
    assert_eq!(err, ChainError::BrokenTable);
}

#[test]
fn used_ring_in_unmapped_memory_is_an_error_not_a_crash() {
    let mem = memory();
    let (r, mut q) = ring(&mem, 16, true);
    let _ = r;
    q.try_set_used_ring_address(GuestAddress(0x4000_0000))
        .unwrap();
    let stats = QueueStats::default();
    assert!(matches!(
        Batch::begin(&mut q, &mem, &stats, 0),
        Err(crate::datapath::batch::RingError::RingAccess(_))
    ));
}

#[test]
fn read_from_goes_on_into_the_overflow_buffer_past_the_guest_buffers() {
    use std::io::Write;
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let w = |i, len| Buf {
        addr: buf_addr(i, 64),
        len,
        device_writes: true,
    };
    let head = r.add_chain(&mem, &[w(0, 11), w(1, 20)]).unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    push_first(&mem, &mut q, &mut iov, Access::DeviceWrites, 1000).unwrap();
    let (tap, mut peer) = crate::testing::unit::tap_pair();
    let frame: Vec<u8> = (0..40).collect();
    peer.write_all(&frame).unwrap();
    let mut overflow = [0u8; 16];

    let n = iov.read_from(&tap, &mut overflow).unwrap();

    assert_eq!(n, 40);
    assert_eq!(&overflow[..9], &frame[31..], "the 9 bytes past 31");
    let mut back = [0u8; 31];
    iov.read_at(0, &mut back).unwrap();
    assert_eq!(&back[..], &frame[..31], "read_at crosses descriptors");
    assert_eq!(iov.segments(), 2, "the overflow iovec is not kept");
}

#[test]
fn writable_chains_leave_one_iovec_slot_free_for_the_overflow_buffer() {
    let mem = memory();
    let (mut r, mut q) = ring(&mem, 16, true);
    let head = r
        .add_chain(
            &mem,
            &[Buf {
                addr: buf_addr(0, 64),
                len: 64,
                device_writes: true,
            }],
        )
        .unwrap();
    r.push_avail(&mem, head);
    r.publish(&mem);
    let mut buf = IoVecBuf::default();
    let mut iov = buf.bind(&mem);
    for _ in 0..IOV_MAX - 1 {
        iov.push_range(buf_addr(1, 64), 1, IOV_MAX).ok().unwrap();
    }
    assert_eq!(
        push_first(&mem, &mut q, &mut iov, Access::DeviceWrites, 1000),
        Err(ChainError::TooManySegments)
    );
}
