//! Guest buffers as iovecs: the only place where raw pointers into guest
//! memory are made and handed to the kernel.
//!
//! A descriptor chain is validated here (direction, bounds, total length,
//! a descriptor table that ends properly) and turned into `iovec`s that one
//! `readv`/`writev` uses. This module knows guest memory and descriptor
//! chains; it knows nothing about rings, notifications or what a frame is.
//!
//! Soundness rests on one type: [`GuestIoVecs`] borrows the guest memory
//! (`'m`) for as long as it holds pointers into it, and empties itself when
//! dropped, so no pointer outlives the mapping it came from.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd};

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileSlice,
};

use crate::datapath::dirty::DirtyLog;
use crate::host::sys::{ReadDone, ReadRing, Uring, POSTED_READS};

/// The guest memory type the daemon maps, with a dirty-page log per region
/// for live migration ([`crate::datapath::dirty`]).
pub type GuestMem = GuestMemoryMmap<DirtyLog>;

/// One region of [`GuestMem`].
type GuestRegion = <GuestMem as GuestMemoryBackend>::R;

/// The kernel's limit on iovecs per `readv`/`writev`.
pub const IOV_MAX: usize = 1024;

/// Most iovecs into guest memory a chain the device writes may add: one
/// slot of the `readv` stays free for the host overflow buffer of
/// [`GuestIoVecs::read_from`].
const MAX_WRITE_SEGMENTS: usize = IOV_MAX - 1;

/// Which way the device moves data through a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device reads the buffers (TX): all descriptors must be readable.
    DeviceReads,
    /// The device writes the buffers (RX): all descriptors must be writable.
    DeviceWrites,
}

/// Why a guest's descriptor chain was refused. All of these are guest
/// faults: the chain is completed with length 0 and counted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {index} of the chain has the wrong direction")]
    WrongDirection { index: usize },
    #[error("descriptor at {addr:#x} (+{len} bytes) is outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("chain is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("chain is shorter than {min} bytes")]
    TooShort { min: usize },
    #[error("chain needs more memory segments than one readv/writev takes ({IOV_MAX})")]
    TooManySegments,
    #[error("descriptor table is broken (bad index, loop, or bad indirect table)")]
    BrokenTable,
}

/// Reusable storage for iovecs, owned by a worker so the data path does not
/// allocate per frame. It never holds pointers between uses: see
/// [`IoVecBuf::bind`].
#[derive(Default)]
pub struct IoVecBuf {
    iovecs: Vec<libc::iovec>,
    /// Guest address and length of each iovec, for bounds-checked writes.
    spans: Vec<(GuestAddress, usize)>,
}

// SAFETY: the raw pointers in `iovecs` are only ever set inside a
// `GuestIoVecs`, which clears them before its borrow ends, so between uses the
// buffer holds no pointers and moving it across threads shares nothing.
unsafe impl Send for IoVecBuf {}

impl IoVecBuf {
    /// Creates a buffer with room for `segments` iovecs.
    pub fn with_capacity(segments: usize) -> Self {
        IoVecBuf {
            iovecs: Vec::with_capacity(segments),
            spans: Vec::with_capacity(segments),
        }
    }

    /// Starts filling the buffer with pointers into `mem`. The returned value
    /// cannot outlive `mem`, and clears the buffer when dropped.
    pub fn bind<'a, 'm>(&'a mut self, mem: &'m GuestMem) -> GuestIoVecs<'a, 'm> {
        self.clear();
        GuestIoVecs {
            buf: self,
            mem,
            region: None,
            _mem: PhantomData,
        }
    }

    fn clear(&mut self) {
        self.iovecs.clear();
        self.spans.clear();
    }
}

/// Iovecs pointing into guest memory `'m`, built only from validated chains.
pub struct GuestIoVecs<'a, 'm> {
    buf: &'a mut IoVecBuf,
    mem: &'m GuestMem,
    /// The region of the last translation: a guest's buffers sit in few
    /// regions, so most translations skip vm-memory's region lookup.
    region: Option<&'m GuestRegion>,
    _mem: PhantomData<&'m GuestMem>,
}

impl Drop for GuestIoVecs<'_, '_> {
    fn drop(&mut self) {
        self.buf.clear();
    }
}

impl GuestIoVecs<'_, '_> {
    /// Number of iovecs held.
    pub fn segments(&self) -> usize {
        self.buf.iovecs.len()
    }

    /// Total bytes the iovecs cover.
    pub fn capacity(&self) -> usize {
        self.buf.spans.iter().map(|s| s.1).sum()
    }

    /// Appends the buffers of `chain` (all of direction `access`), refusing
    /// the chain if it is broken, points outside guest memory or is longer
    /// than `max_len` bytes. Returns the chain's length in bytes. On error the
    /// iovecs are left exactly as they were before the call.
    pub fn push_chain<M>(
        &mut self,
        chain: DescriptorChain<M>,
        access: Access,
        max_len: usize,
    ) -> Result<usize, ChainError>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let mark = self.buf.iovecs.len();
        let result = self.push_chain_inner(chain, access, max_len);
        if result.is_err() {
            self.buf.iovecs.truncate(mark);
            self.buf.spans.truncate(mark);
        }
        result
    }

    fn push_chain_inner<M>(
        &mut self,
        chain: DescriptorChain<M>,
        access: Access,
        max_len: usize,
    ) -> Result<usize, ChainError>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let limit = match access {
            Access::DeviceReads => IOV_MAX,
            Access::DeviceWrites => MAX_WRITE_SEGMENTS,
        };
        let mut total: usize = 0;
        let mut count = 0;
        let mut ends_properly = false;
        for (index, desc) in chain.enumerate() {
            count = index + 1;
            ends_properly = !desc.has_next();
            if desc.is_write_only() != (access == Access::DeviceWrites) {
                return Err(ChainError::WrongDirection { index });
            }
            let len = desc.len() as usize;
            total = total.saturating_add(len);
            if total > max_len {
                return Err(ChainError::TooLong { max: max_len });
            }
            self.push_range(desc.addr(), len, limit)
                .map_err(|e| match e {
                    RangeError::Outside => ChainError::OutsideGuestMemory {
                        addr: desc.addr().0,
                        len: desc.len(),
                    },
                    RangeError::TooManySegments => ChainError::TooManySegments,
                })?;
        }
        // The chain iterator stops silently on a bad next index, a loop or a
        // bad indirect table: a chain whose last descriptor still says "next"
        // was cut short by one of those.
        if count == 0 || !ends_properly {
            return Err(ChainError::BrokenTable);
        }
        Ok(total)
    }

    fn push_range(
        &mut self,
        addr: GuestAddress,
        len: usize,
        limit: usize,
    ) -> Result<(), RangeError> {
        if len == 0 {
            return Ok(());
        }
        if let Some((region, at)) = self.region.and_then(|r| within(r, addr, len)) {
            let slice = region.get_slice(at, len).map_err(|_| RangeError::Outside)?;
            return self.push_slice(addr, &slice, limit);
        }
        let mut next = addr;
        for slice in GuestMemoryBackend::get_slices(self.mem, addr, len) {
            let slice = slice.map_err(|_| RangeError::Outside)?;
            let n = slice.len();
            self.push_slice(next, &slice, limit)?;
            next = GuestAddress(next.0 + n as u64);
        }
        self.region = self.mem.find_region(addr);
        Ok(())
    }

    /// Appends one iovec for `slice`, which starts at guest address `addr`.
    fn push_slice<B: BitmapSlice>(
        &mut self,
        addr: GuestAddress,
        slice: &VolatileSlice<'_, B>,
        limit: usize,
    ) -> Result<(), RangeError> {
        if self.buf.iovecs.len() >= limit {
            return Err(RangeError::TooManySegments);
        }
        // Guest memory is plain mmap (no Xen foreign mappings), so the
        // guard is a no-op wrapper and the pointer stays valid for as long
        // as `self.mem` (the mapping) is alive, which `'m` guarantees.
        let ptr = slice.ptr_guard_mut().as_ptr();
        self.buf.iovecs.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: slice.len(),
        });
        self.buf.spans.push((addr, slice.len()));
        Ok(())
    }

    /// Drops the first `segments` iovecs (buffers already used), keeping the rest.
    pub fn drop_front(&mut self, segments: usize) {
        let n = segments.min(self.buf.iovecs.len());
        self.buf.iovecs.drain(..n);
        self.buf.spans.drain(..n);
    }

    /// One `writev` of all iovecs to `file` (the device reads guest memory).
    pub fn write_to(&self, file: &File) -> io::Result<usize> {
        self.vectored(libc::SYS_writev, file)
    }

    /// One `readv` from `file` into all iovecs (the device writes guest
    /// memory), then on into `overflow`, a host buffer: whatever lands
    /// there did not fit the guest's buffers. Returns the count the kernel
    /// reports, which may exceed what the iovecs and `overflow` hold when
    /// the kernel reports a cut datagram's full length.
    pub fn read_from(&mut self, file: &File, overflow: &mut [u8]) -> io::Result<usize> {
        self.buf.iovecs.push(libc::iovec {
            iov_base: overflow.as_mut_ptr().cast(),
            iov_len: overflow.len(),
        });
        let result = self.vectored(libc::SYS_readv, file);
        self.buf.iovecs.pop();
        result
    }

    /// `readv` or `writev` (`nr`) of all iovecs on `file`, as a raw syscall:
    /// that skips libc's cancellation-point wrapper (~4% of a worker at
    /// 64-byte line rate); we never use thread cancellation.
    fn vectored(&self, nr: libc::c_long, file: &File) -> io::Result<usize> {
        self.vectored_range(nr, file, 0, self.buf.iovecs.len())
    }

    /// [`GuestIoVecs::vectored`] of the `count` iovecs from `start`.
    fn vectored_range(
        &self,
        nr: libc::c_long,
        file: &File,
        start: usize,
        count: usize,
    ) -> io::Result<usize> {
        let iovecs = &self.buf.iovecs[start..start + count];
        let count = libc::c_int::try_from(count).expect("at most IOV_MAX iovecs");
        // SAFETY: every iovec was made by `push_range` from a bounds-checked
        // slice of `self.mem`, which `'m` keeps mapped for the whole call,
        // except the last one of a `read_from`: it describes the `overflow`
        // slice that `read_from` borrows mutably across this call, and is
        // removed before it returns.
        // `nr` is only ever SYS_readv or SYS_writev (private fn, two callers):
        // the kernel reads or writes at most the iovecs' total length. Guest
        // memory is shared with the guest by design, so no Rust reference to
        // it exists that a write could invalidate, and a guest racing on it
        // changes bytes, not the validity of the pointers.
        let n = unsafe { libc::syscall(nr, file.as_raw_fd(), iovecs.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(usize::try_from(n).expect("the kernel returned a non-negative count"))
    }

    /// Logs the first `len` bytes of the area the iovecs describe as
    /// written (what a `readv` put there: it bypasses vm-memory's own
    /// logging). One bitmap call per span; a no-op while logging is off.
    pub fn mark_written(&self, len: usize) {
        let mut left = len;
        for &(addr, span) in &self.buf.spans {
            if left == 0 {
                break;
            }
            let n = left.min(span);
            // Each span lies in one region (`push_range` made it from one
            // of vm-memory's per-region slices).
            mark_written(self.mem, addr, n);
            left -= n;
        }
    }

    /// Reads `out.len()` bytes at byte `offset` of the area the iovecs
    /// describe, through vm-memory's checked accessors.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), ChainError> {
        self.each_span(offset, out.len(), |at, range| {
            self.mem.read_slice(&mut out[range], at).is_ok()
        })
    }

    /// Writes `bytes` at byte `offset` of the area the iovecs describe,
    /// through vm-memory's checked accessors (used for `num_buffers`).
    pub fn write_at(&self, offset: usize, bytes: &[u8]) -> Result<(), ChainError> {
        self.each_span(offset, bytes.len(), |at, range| {
            self.mem.write_slice(&bytes[range], at).is_ok()
        })
    }

    /// Walks the `len` bytes at byte `offset` of the area the iovecs
    /// describe: `f(guest address, range of those bytes)` once per span
    /// they touch, `false` when the access failed.
    fn each_span(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
    ) -> Result<(), ChainError> {
        let mut skip = offset;
        let mut done = 0;
        for &(addr, span) in &self.buf.spans {
            if done == len {
                break;
            }
            if skip >= span {
                skip -= span;
                continue;
            }
            let n = (len - done).min(span - skip);
            let at = GuestAddress(addr.0 + skip as u64);
            if !f(at, done..done + n) {
                return Err(ChainError::OutsideGuestMemory {
                    addr: at.0,
                    len: u32::try_from(n).unwrap_or(u32::MAX),
                });
            }
            done += n;
            skip = 0;
        }
        if done == len {
            Ok(())
        } else {
            Err(ChainError::TooLong { max: offset })
        }
    }
}

/// Frames written to a tap through an io_uring ([`Uring`]): each
/// validated chain becomes one queued `writev` straight from guest memory,
/// and one `io_uring_enter` submits them all and waits for every one.
///
/// Soundness: the queued requests point at this writer's iovecs, which
/// point into guest memory `'m`. The iovecs are only appended to (never
/// moved: the storage has room for [`IOV_MAX`] and no more are pushed)
/// while requests are in flight, and are cleared only after
/// [`TapWriter::flush`] has reaped every request; dropping the writer
/// flushes first. So no request outlives the iovecs or the borrow of the
/// guest memory (the ring keeps its file, the tap, open itself). The guest
/// memory a worker borrows is a snapshot (`GuestMemoryAtomic::memory`) that
/// stays mapped while the batch holds it, even if the frontend sends a new
/// memory table meanwhile; a batch waits for all its requests before it
/// ends, so nothing is in flight across events, ring stops, resets or
/// disconnects. The exception is a ring whose `io_uring_enter` failed:
/// what the kernel took and did not report may still run, so the flush
/// keeps the memory mapped for good; what it never took stays in the
/// submission queue, pointing at iovecs that are then reused, so the ring
/// is never entered again ([`Uring::failed`]): the writer makes the rest
/// of the batch's writes itself, one `writev` each, as they are queued.
pub struct TapWriter<'a, 'm> {
    iovecs: GuestIoVecs<'a, 'm>,
    ring: &'a mut Uring,
    tap: &'a File,
    /// Iovecs already queued (the rest belong to the chain being pushed).
    queued: usize,
    /// First iovec and iovec count of each queued write, by request number.
    writes: &'a mut Vec<(usize, usize)>,
    /// The result of each write after a flush (bytes or `-errno`).
    results: &'a mut Vec<i32>,
    /// A test's result for one write of the next flush, in place of the
    /// kernel's (the write is still made).
    #[cfg(test)]
    pub fake_result: Option<(usize, i32)>,
}

/// What a [`TapWriter`] keeps between batches (no allocation per batch).
#[derive(Default)]
pub struct WriterBufs {
    writes: Vec<(usize, usize)>,
    results: Vec<i32>,
}

impl<'a, 'm> TapWriter<'a, 'm> {
    /// A writer of frames from `mem` to `tap` through `ring` (made for
    /// `tap`: [`Uring::new`]; writes the ring cannot make go to `tap` with
    /// `writev`), with iovec storage `iov` (at least [`IOV_MAX`] iovecs of
    /// capacity: see [`IoVecBuf::with_capacity`]).
    pub fn new(
        iov: &'a mut IoVecBuf,
        bufs: &'a mut WriterBufs,
        mem: &'m GuestMem,
        ring: &'a mut Uring,
        tap: &'a File,
    ) -> Self {
        iov.iovecs.reserve(IOV_MAX);
        iov.spans.reserve(IOV_MAX);
        bufs.writes.clear();
        bufs.results.clear();
        TapWriter {
            iovecs: iov.bind(mem),
            ring,
            tap,
            queued: 0,
            writes: &mut bufs.writes,
            results: &mut bufs.results,
            #[cfg(test)]
            fake_result: None,
        }
    }

    /// Writes queued and not flushed yet.
    pub fn pending(&self) -> usize {
        self.writes.len()
    }

    /// Whether the ring takes one more write without a flush first.
    pub fn has_room(&mut self) -> bool {
        self.ring.failed() || self.ring.room() > 0
    }

    /// Appends the buffers of TX `chain` (see [`GuestIoVecs::push_chain`])
    /// after those already queued; `TooManySegments` when they do not fit
    /// beside them (flush, then push the chain again).
    pub fn push_chain<M>(
        &mut self,
        chain: DescriptorChain<M>,
        max_len: usize,
    ) -> Result<usize, ChainError>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        self.iovecs.push_chain(chain, Access::DeviceReads, max_len)
    }

    /// Forgets the chain pushed last (not queued: refused after all).
    pub fn discard_unqueued(&mut self) {
        self.iovecs.buf.iovecs.truncate(self.queued);
        self.iovecs.buf.spans.truncate(self.queued);
    }

    /// Queues the chain pushed last as one `writev`. Returns its number in
    /// [`TapWriter::flush`]'s results. The caller checked
    /// [`TapWriter::has_room`] before pushing the chain.
    pub fn queue(&mut self) -> usize {
        let start = self.queued;
        let count = self.iovecs.segments() - start;
        let n = self.writes.len();
        if self.ring.failed() {
            // Not to be entered again (see the type's doc): the write is
            // made now, its result kept for the flush.
            self.writes.push((start, count));
            self.queued = self.iovecs.segments();
            let result = match self.write_now(n) {
                Ok(k) => i32::try_from(k).unwrap_or(i32::MAX),
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            };
            self.results.push(result);
            return n;
        }
        // SAFETY: the iovecs `start..start + count` live in storage that is
        // not moved or cleared until `flush` has reaped this request (see
        // the type's doc), and describe guest memory `'m` that this writer
        // borrows for as long; the ring keeps its file (the tap) open.
        let pushed = unsafe {
            self.ring.push_writev(
                self.iovecs.buf.iovecs.as_ptr().add(start),
                u32::try_from(count).expect("at most IOV_MAX iovecs"),
                n as u64,
            )
        };
        assert!(pushed, "queue() without has_room()");
        self.writes.push((start, count));
        self.queued = self.iovecs.segments();
        n
    }

    /// Submits the queued writes (one `io_uring_enter`) and waits for all;
    /// then [`TapWriter::results`] has one result per write, in order.
    /// An error means the ring failed: see [`Uring::reap`].
    pub fn flush(&mut self) -> io::Result<()> {
        let outcome = if self.ring.failed() {
            // Made as they were queued: the results are in.
            Ok(())
        } else {
            let outcome = self.ring.reap_into(self.results, self.writes.len());
            if outcome.is_err() && self.ring.in_flight() > 0 {
                // Requests the kernel took may still read guest memory:
                // keep the mapping forever rather than let one read freed
                // memory.
                std::mem::forget(self.iovecs.mem.clone());
            }
            outcome
        };
        #[cfg(test)]
        if let Some((n, result)) = self.fake_result.take() {
            self.results[n] = result;
        }
        outcome
    }

    /// The results of the last flush: bytes written, or `-errno`
    /// (when the ring failed: `-ECANCELED` for a write the kernel never
    /// took, `-EINPROGRESS` for one it took and did not report; see
    /// [`Uring::reap_into`]).
    pub fn results(&self) -> &[i32] {
        self.results
    }

    /// Makes write `n` of the last flush again, now, with `writev(2)`.
    pub fn write_now(&self, n: usize) -> io::Result<usize> {
        let (start, count) = self.writes[n];
        self.iovecs
            .vectored_range(libc::SYS_writev, self.tap, start, count)
    }

    /// Forgets the flushed writes: the storage is free for more.
    pub fn clear(&mut self) {
        debug_assert!(self.ring.in_flight() == 0 || self.ring.failed());
        self.writes.clear();
        self.results.clear();
        let n = self.iovecs.segments();
        self.iovecs.drop_front(n);
        self.queued = 0;
    }
}

impl Drop for TapWriter<'_, '_> {
    /// A writer dropped with writes in flight (an error ended the batch
    /// before its flush) waits for them first, unless the ring failed.
    fn drop(&mut self) {
        if self.ring.in_flight() > 0 && !self.ring.failed() {
            if let Err(e) = self.flush() {
                log::error!("io_uring failed with writes in flight: {e}");
            }
        }
    }
}

/// Up to a few frames read from a tap through an io_uring ([`Uring`]):
/// each read goes into the buffers of one validated RX chain, straight
/// into guest memory, then on into one byte of host memory (a frame with a
/// byte there did not fit); one `io_uring_enter` submits them all and
/// waits for every one ([`TapReads::submit`]).
///
/// Soundness: `submit` pushes the requests, and reaps every one of them
/// before it returns: no request outlives the call, so none outlives the
/// iovecs (not touched during the call), the guest memory `'m` they
/// point into, or the overflow bytes (borrowed mutably for `'a`; leaked if
/// the ring fails with reads in flight). The ring reads the tap it was
/// made for (its registered file, which it keeps open).
pub struct TapReads<'a, 'm> {
    reads: Vec<GuestIoVecs<'a, 'm>>,
    /// A read into one guest buffer longer than this needs no overflow
    /// byte (see [`TapReads::new`]).
    exact_above: usize,
    overflow: &'a mut Box<[u8]>,
    ring: &'a mut Uring,
    results: &'a mut Vec<i32>,
}

/// What [`TapReads`] keeps between rounds (no allocation per frame).
pub struct ReaderBufs {
    iov: Vec<IoVecBuf>,
    /// One byte per read behind each read's guest buffers (a frame longer
    /// than the chain reaches it). Leaked, and replaced, if the ring fails
    /// with reads in flight: the kernel might still write it.
    overflow: Box<[u8]>,
    results: Vec<i32>,
}

impl ReaderBufs {
    /// Room for `reads` reads per round.
    pub fn new(reads: usize) -> Self {
        ReaderBufs {
            iov: (0..reads).map(|_| IoVecBuf::default()).collect(),
            overflow: vec![0u8; reads].into_boxed_slice(),
            results: Vec::with_capacity(reads),
        }
    }

    /// Reads per round.
    pub fn reads(&self) -> usize {
        self.iov.len()
    }
}

impl<'a, 'm> TapReads<'a, 'm> {
    /// Room for `reads` reads (at most [`ReaderBufs::reads`]) into `mem`.
    /// A read whose buffers are one guest buffer longer than `exact_above`
    /// bytes goes without the overflow byte (a plain `read`, no iovec
    /// array for the kernel to copy in): a frame that fills the buffer is
    /// longer than `exact_above` whether or not the tap cut it, and the
    /// caller drops every frame that long.
    pub fn new(
        bufs: &'a mut ReaderBufs,
        reads: usize,
        exact_above: usize,
        mem: &'m GuestMem,
        ring: &'a mut Uring,
    ) -> Self {
        bufs.results.clear();
        TapReads {
            exact_above,
            reads: bufs
                .iov
                .iter_mut()
                .take(reads)
                .map(|b| b.bind(mem))
                .collect(),
            overflow: &mut bufs.overflow,
            ring,
            results: &mut bufs.results,
        }
    }

    /// Puts the buffers of RX `chain` behind read `i` (see
    /// [`GuestIoVecs::push_chain`]); returns their length.
    pub fn push_chain<M>(
        &mut self,
        i: usize,
        chain: DescriptorChain<M>,
        max_len: usize,
    ) -> Result<usize, ChainError>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let read = &mut self.reads[i];
        let n = read.segments();
        read.drop_front(n);
        let len = read.push_chain(chain, Access::DeviceWrites, max_len)?;
        if let Some(first) = read.buf.iovecs.first() {
            // The frontend's core touched this buffer last: ask for its
            // first lines now, so the kernel's write of the header does not
            // wait for them after the round is submitted.
            prefetch_for_write(first.iov_base.cast::<u8>(), first.iov_len);
        }
        Ok(len)
    }

    /// The buffers of read `i`.
    pub fn read(&self, i: usize) -> &GuestIoVecs<'a, 'm> {
        &self.reads[i]
    }

    /// Reads `count` frames (reads `0..count`) with one `io_uring_enter`,
    /// and waits for all; then [`TapReads::result`] has each one's result.
    /// An error means the ring failed: see [`Uring::reap`].
    pub fn submit(&mut self, count: usize) -> io::Result<()> {
        let mut pushed = 0;
        for (i, (read, byte)) in self
            .reads
            .iter_mut()
            .zip(self.overflow.iter_mut())
            .take(count)
            .enumerate()
        {
            let exact = matches!(read.buf.iovecs[..], [one] if one.iov_len > self.exact_above);
            if !exact {
                read.buf.iovecs.push(libc::iovec {
                    iov_base: std::ptr::from_mut(byte).cast(),
                    iov_len: 1,
                });
            }
            let iovecs = &read.buf.iovecs;
            // SAFETY: the iovecs of read `i` describe its guest buffers,
            // bounds-checked slices of `'m`, and one overflow byte borrowed
            // mutably for `'a`; `reap` below waits for this request before
            // this function returns, and nothing touches the iovecs or the
            // memory meanwhile (guest memory is shared with the guest by
            // design, as for `readv`).
            pushed += usize::from(unsafe {
                self.ring.push_readv(
                    iovecs.as_ptr(),
                    u32::try_from(iovecs.len()).expect("at most IOV_MAX iovecs"),
                    i as u64,
                )
            });
        }
        debug_assert_eq!(pushed, count, "more reads than the ring holds");
        // A read not pushed (the queue full, or the ring failed) was not
        // made: `result` says ECANCELED for it.
        let outcome = self.ring.reap_into(self.results, pushed);
        if outcome.is_err() && self.ring.in_flight() > 0 {
            // Requests the kernel took may still write guest memory and
            // the overflow bytes: keep both for good.
            std::mem::forget(self.reads[0].mem.clone());
            let fresh = vec![0u8; self.overflow.len()].into_boxed_slice();
            Box::leak(std::mem::replace(self.overflow, fresh));
        }
        for read in self.reads.iter_mut().take(count) {
            // The guest buffers' iovecs (each has its span): without the
            // overflow byte's.
            let guest = read.buf.spans.len();
            read.buf.iovecs.truncate(guest);
        }
        outcome
    }

    /// The result of read `i` of the last submit: bytes, or `-errno`.
    pub fn result(&self, i: usize) -> i32 {
        self.results.get(i).copied().unwrap_or(-libc::ECANCELED)
    }

    /// Copies the first `n` bytes of read `from`'s buffers to read `to`'s,
    /// through `scratch`, with vm-memory's checked accessors.
    pub fn copy(
        &self,
        from: usize,
        to: usize,
        n: usize,
        scratch: &mut [u8],
    ) -> Result<(), ChainError> {
        let max = scratch.len();
        let tmp = scratch.get_mut(..n).ok_or(ChainError::TooLong { max })?;
        self.reads[from].read_at(0, tmp)?;
        self.reads[to].write_at(0, tmp)
    }
}

impl Drop for TapReads<'_, '_> {
    fn drop(&mut self) {
        debug_assert!(
            self.ring.in_flight() == 0 || self.ring.failed(),
            "submit reaps every read"
        );
    }
}

/// An RX chain posted to a [`PostedReads`]: one guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostedChain {
    pub head: u16,
    pub addr: GuestAddress,
    pub len: usize,
}

/// What a [`PostedReads`] reports, in the order the chains were posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    /// The kernel read a frame of `n` bytes (as the tap reported it: a
    /// frame longer than the chain was cut to it) into `chain`.
    Frame { chain: PostedChain, n: usize },
    /// The read ended with `-errno` (ENOBUFS: every posted chain is used;
    /// ECANCELED: cancelled); it is armed again by [`PostedReads::arm`].
    Ended(i32),
}

/// RX reads kept posted into guest buffers across events: a [`ReadRing`]
/// whose kernel-side read fills the chains posted here, in order, as
/// frames arrive, with no syscall of ours per frame.
///
/// Soundness: a posted chain is one validated guest buffer of `mem`, a
/// snapshot of the guest memory that this value keeps (an `Arc`: the
/// mapping stays even if the frontend sends a new memory table) until no
/// read is live and no chain is posted ([`PostedReads::cancel`]). If the
/// ring fails with the read perhaps live, the snapshot and the ring are
/// leaked, so the kernel never writes into memory that was unmapped.
pub struct PostedReads {
    /// `None` once the ring failed (it is leaked: see [`ReadRing::leak`]).
    ring: Option<ReadRing>,
    mem: Option<std::sync::Arc<GuestMem>>,
    chains: std::collections::VecDeque<PostedChain>,
    /// Buffer id of the next chain posted (the kernel reports it back).
    next_id: u16,
    done: std::collections::VecDeque<ReadDone>,
    /// Iovec storage for validating chains.
    scratch: IoVecBuf,
}

impl std::fmt::Debug for PostedReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostedReads")
            .field("ring", &self.ring)
            .field("chains", &self.chains.len())
            .finish_non_exhaustive()
    }
}

impl PostedReads {
    /// Sets the ring up to read `tap`; fails where the kernel has no
    /// multishot read or refuses io_uring ([`ReadRing::new`]).
    pub fn new(tap: &File) -> io::Result<Self> {
        Ok(PostedReads {
            ring: Some(ReadRing::new(tap.as_fd())?),
            mem: None,
            chains: std::collections::VecDeque::with_capacity(usize::from(POSTED_READS)),
            next_id: 0,
            done: std::collections::VecDeque::with_capacity(4 * usize::from(POSTED_READS)),
            scratch: IoVecBuf::with_capacity(2),
        })
    }

    /// The fd to wait on: readable while reads have completed.
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.ring.as_ref().map(ReadRing::fd)
    }

    /// Whether the ring failed (then chains are no longer posted).
    pub fn failed(&self) -> bool {
        self.ring.is_none()
    }

    /// Chains posted and not reported yet.
    pub fn posted(&self) -> usize {
        self.chains.len()
    }

    /// Whether the chains posted (if any) point into `mem`.
    pub fn maps(&self, mem: &std::sync::Arc<GuestMem>) -> bool {
        self.mem
            .as_ref()
            .is_none_or(|m| std::sync::Arc::ptr_eq(m, mem))
    }

    /// Whether another chain can be posted.
    pub fn has_room(&self) -> bool {
        self.chains.len() < usize::from(POSTED_READS)
    }

    /// Whether the read is live in the kernel.
    pub fn armed(&self) -> bool {
        self.ring.as_ref().is_some_and(ReadRing::armed)
    }

    /// Posts RX `chain` of `mem` if it is one guest buffer longer than
    /// `above` bytes (a frame that fills it is then longer than `above`,
    /// whether or not the tap cut it): `Ok(Some(len))`. `Ok(None)`: it is
    /// a good chain that cannot be posted (several buffers, too short, or
    /// from another memory snapshot than the chains posted already): the
    /// caller gives it back. An error: the guest got the chain wrong.
    pub fn post<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &std::sync::Arc<GuestMem>,
        above: usize,
        max_len: usize,
    ) -> Result<Option<usize>, ChainError>
    where
        M: std::ops::Deref,
        M::Target: vm_memory::GuestMemory,
    {
        if !self.has_room() || !self.maps(mem) {
            return Ok(None);
        }
        let Some(ring) = self.ring.as_mut() else {
            return Ok(None);
        };
        let head = chain.head_index();
        let mut iov = self.scratch.bind(mem);
        let len = iov.push_chain(chain, Access::DeviceWrites, max_len)?;
        let (&[one], &[(addr, _)]) = (&iov.buf.iovecs[..], &iov.buf.spans[..]) else {
            return Ok(None);
        };
        if len <= above {
            return Ok(None);
        }
        let id = self.next_id;
        // SAFETY: `one` is a bounds-checked slice of `mem`, which this
        // value keeps mapped (the Arc stored below) until the kernel has
        // reported the buffer used or the read cancelled, and leaks if the
        // ring fails first (see the type's soundness note). Guest memory
        // is shared with the guest by design: no Rust value lives there.
        let posted = unsafe {
            ring.post(
                one.iov_base.cast(),
                u32::try_from(len).expect("a chain of at most MAX_RX_CHAIN bytes"),
                id,
            )
        };
        drop(iov);
        if !posted {
            return Ok(None);
        }
        self.mem.get_or_insert_with(|| mem.clone());
        self.next_id = id.wrapping_add(1);
        self.chains.push_back(PostedChain { head, addr, len });
        Ok(Some(len))
    }

    /// Makes sure the read of the tap is live (one non-waiting
    /// `io_uring_enter` if it is not). An error: the ring failed.
    pub fn arm(&mut self) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut() else {
            return Err(io::Error::other("the posted reads' ring failed"));
        };
        if self.chains.is_empty() || ring.armed() {
            return Ok(());
        }
        ring.arm().inspect_err(|_| self.fail())
    }

    /// The next report, in post order, or `None` if none is waiting. An
    /// error: the kernel reported a buffer out of order (the ring cannot
    /// be trusted: it is dropped).
    pub fn next_report(&mut self) -> io::Result<Option<Posted>> {
        if let (true, Some(ring)) = (self.done.is_empty(), self.ring.as_mut()) {
            ring.take(&mut self.done);
        }
        let Some(d) = self.done.pop_front() else {
            return Ok(None);
        };
        self.report(d).map(Some)
    }

    fn report(&mut self, d: ReadDone) -> io::Result<Posted> {
        let Some(id) = d.id else {
            return Ok(Posted::Ended(d.result));
        };
        let expected = self
            .next_id
            .wrapping_sub(u16::try_from(self.chains.len()).expect("at most POSTED_READS"));
        let (Some(chain), true) = (self.chains.front().copied(), id == expected) else {
            self.fail();
            return Err(io::Error::other(format!(
                "posted read filled buffer {id}, expected {expected}"
            )));
        };
        self.chains.pop_front();
        if self.chains.is_empty() && !self.armed() {
            self.mem = None;
        }
        Ok(Posted::Frame {
            chain,
            n: usize::try_from(d.result).unwrap_or(0),
        })
    }

    /// Ends the read and takes every chain back: `each` gets what was
    /// read before it ended (frames the caller delivers or drops), then
    /// the chains still posted are returned, in post order (the caller
    /// gives them back to the ring). If the ring fails meanwhile
    /// ([`PostedReads::failed`] says so) they are not returned: they stay
    /// the kernel's, with the snapshot, for good.
    pub fn cancel(&mut self, mut each: impl FnMut(Posted)) -> Vec<PostedChain> {
        let outcome = match self.ring.as_mut() {
            Some(ring) => ring.cancel(&mut self.done),
            None => Ok(()),
        };
        if let Err(e) = outcome {
            log::error!("cannot cancel the posted RX reads: {e}");
            self.fail();
        }
        while let Some(d) = self.done.pop_front() {
            match self.report(d) {
                Ok(p) => each(p),
                Err(_) => break,
            }
        }
        let left = self.chains.drain(..).collect();
        if !self.armed() {
            self.mem = None;
        }
        left
    }

    /// [`PostedReads::cancel`] dropping what was read: returns how many
    /// chains the caller gives back to the ring (every chain posted: the
    /// last popped) and how many of them held a frame (dropped).
    pub fn take_back(&mut self) -> (usize, u64) {
        let mut frames = 0u64;
        let left = self.cancel(|r| frames += u64::from(matches!(r, Posted::Frame { .. })));
        let read = usize::try_from(frames).expect("at most POSTED_READS");
        (read + left.len(), frames)
    }

    /// The ring failed: keep the snapshot, the ring and the chains posted
    /// for good (a live read may still write them); the caller goes back
    /// to plain reads.
    fn fail(&mut self) {
        if let Some(mem) = self.mem.take() {
            std::mem::forget(mem);
        }
        if let Some(ring) = self.ring.take() {
            ring.leak();
        }
        // Nor are the chains posted given back: the guest would post them
        // again while the kernel may still write them.
        self.chains.clear();
    }
}

impl Drop for PostedReads {
    fn drop(&mut self) {
        if self.armed() {
            // Dropped without a cancel (a bug): keep what a live read writes.
            log::error!("posted RX reads dropped while live: leaking their memory");
            if let Some(mem) = self.mem.take() {
                std::mem::forget(mem);
            }
        }
    }
}

/// Logs `len` bytes at `addr` (within one region) as written, for writes
/// that bypass vm-memory (a `readv`, the kernel's posted reads). A no-op
/// while logging is off.
pub fn mark_written(mem: &GuestMem, addr: GuestAddress, len: usize) {
    if let Some((region, at)) = mem.to_region_addr(addr) {
        let offset = usize::try_from(at.0).expect("a region offset fits usize");
        vm_memory::GuestMemoryRegion::bitmap(region).mark_dirty(offset, len);
    }
}

/// Bytes of a buffer [`prefetch`] brings in: a small frame and its header.
const PREFETCH_BYTES: usize = 128;
const CACHE_LINE: usize = 64;

/// Asks the CPU to bring the first bytes of the guest buffer at `addr`
/// (`len` bytes long) into its cache, so that a copy of it soon after (the
/// kernel's, in the next `writev`) does not wait for the other core that
/// wrote it. A hint: nothing happens where the buffer is not guest memory,
/// or off x86-64.
pub fn prefetch(mem: &GuestMem, addr: GuestAddress, len: u32) {
    let len = usize::try_from(len).map_or(PREFETCH_BYTES, |l| l.min(PREFETCH_BYTES));
    let Ok(slice) = mem.get_slice(addr, len) else {
        return;
    };
    each_line(slice.ptr_guard().as_ptr(), slice.len(), prefetch_line);
}

/// Calls `hint` with the start of every cache line of the `len` bytes at
/// `p` (only the addresses: nothing is dereferenced).
fn each_line(p: *const u8, len: usize, hint: fn(*const u8)) {
    let end = p.addr() + len;
    let mut line = p.wrapping_sub(p.addr() % CACHE_LINE);
    while line.addr() < end {
        hint(line);
        line = line.wrapping_add(CACHE_LINE);
    }
}

#[cfg(target_arch = "x86_64")]
fn prefetch_line(p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: a prefetch is a hint: it reads nothing the program sees and
    // never faults, whatever the address; SSE, which it needs, is part of
    // every x86-64 CPU.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch_line(_: *const u8) {}

/// Asks the CPU for the first [`PREFETCH_BYTES`] of the `len` bytes at
/// `p` (a translated guest buffer) with intent to write. A hint.
fn prefetch_for_write(p: *const u8, len: usize) {
    each_line(p, len.min(PREFETCH_BYTES), prefetch_line_for_write);
}

#[cfg(target_arch = "x86_64")]
fn prefetch_line_for_write(p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
    // SAFETY: as `prefetch_line`: a hint that never faults; a CPU without
    // PREFETCHW runs it as a no-op (its opcode is a NOP there).
    unsafe { _mm_prefetch::<_MM_HINT_ET0>(p.cast()) }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch_line_for_write(_: *const u8) {}

/// `region` and the offset of `addr` in it, if all `len` bytes at `addr`
/// lie in it.
fn within(
    region: &GuestRegion,
    addr: GuestAddress,
    len: usize,
) -> Option<(&GuestRegion, MemoryRegionAddress)> {
    let offset = addr.0.checked_sub(region.start_addr().0)?;
    let end = offset.checked_add(u64::try_from(len).ok()?)?;
    (end <= region.len()).then_some((region, MemoryRegionAddress(offset)))
}

enum RangeError {
    Outside,
    TooManySegments,
}

#[cfg(test)]
mod tests;
