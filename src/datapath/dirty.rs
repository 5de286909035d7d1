//! The dirty-page log for live migration: which guest pages the daemon
//! wrote while the frontend asked for it.
//!
//! The frontend shares a log (`SET_LOG_BASE`, one bit per 4 KiB guest page)
//! and acks `VHOST_F_LOG_ALL` while it copies guest memory to the
//! destination. [`DirtyLog`] is the bitmap of one guest memory region:
//! vm-memory calls it for every write through its accessors (used ring
//! entries, `used.idx`, `avail_event`, `num_buffers`, held frames); the
//! data path calls it for what it writes with a raw `readv`
//! ([`crate::datapath::guest::GuestIoVecs::mark_written`]).
//!
//! vhost-user-backend maps the log and hands each region its part
//! ([`BitmapReplace`]); it never stops logging. Logging here is also
//! switched by the acked `VHOST_F_LOG_ALL` ([`set_logging`]), so a cancelled
//! migration stops it and the next one starts it again; while off, a write
//! costs one atomic load. This module knows pages and bits, not rings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::{fmt, io};

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

/// Guest bytes one bit of the log stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 4096;

/// `VHOST_F_LOG_ALL`: the frontend wants every write logged.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// The dirty log of one guest memory region (cheap to clone: shared).
#[derive(Clone, Default)]
pub struct DirtyLog(Arc<Shared>);

#[derive(Default)]
struct Shared {
    /// `VHOST_F_LOG_ALL` is acked: writes are logged.
    on: AtomicBool,
    /// This region's part of the frontend's log, once it sent one.
    log: RwLock<Option<RegionLog>>,
}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("on", &self.is_on())
            .finish_non_exhaustive()
    }
}

impl DirtyLog {
    /// Whether writes are logged now.
    pub fn is_on(&self) -> bool {
        self.0.on.load(Ordering::Acquire)
    }

    fn set_on(&self, on: bool) {
        self.0.on.store(on, Ordering::Release);
    }
}

/// The frontend's log as seen from one region: the bits of its pages.
pub struct RegionLog {
    log: Arc<MmapLogReg>,
    /// Guest address where the region starts.
    start: u64,
    /// Number of the region's last page (absolute, in `LOG_PAGE_SIZE` units).
    last_page: u64,
}

impl MemRegionBitmap for RegionLog {
    fn new<R: GuestMemoryRegion>(region: &R, log: Arc<MmapLogReg>) -> io::Result<Self> {
        // The framework's own bitmap checks that the log covers the region
        // (the log's length is private to it): reuse that check.
        AtomicBitmapMmap::new(region, log.clone())?;
        let start = region.start_addr().raw_value();
        let last = start
            .checked_add(region.len() - 1)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
        Ok(RegionLog {
            log,
            start,
            last_page: last / LOG_PAGE_SIZE,
        })
    }
}

impl RegionLog {
    /// Sets the bits of the pages `len` bytes at region offset `offset`
    /// touch. Release: a frontend that sees the bit sees the bytes.
    fn mark(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = self.start.saturating_add(offset as u64);
        let last = first.saturating_add(len as u64 - 1) / LOG_PAGE_SIZE;
        for page in first / LOG_PAGE_SIZE..=last.min(self.last_page) {
            let (word, bit) = ((page / 8) as usize, page % 8);
            self.log[word].fetch_or(1 << bit, Ordering::Release);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = self.start.saturating_add(offset as u64) / LOG_PAGE_SIZE;
        page <= self.last_page
            && self.log[(page / 8) as usize].load(Ordering::Acquire) & (1 << (page % 8)) != 0
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, DirtyLog>;
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if !self.is_on() {
            return;
        }
        let log = self.0.log.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(log) = log.as_ref() {
            log.mark(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let log = self.0.log.read().unwrap_or_else(PoisonError::into_inner);
        log.as_ref().is_some_and(|l| l.dirty_at(offset))
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, DirtyLog> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

/// The log the frontend shared last (each SET_LOG_BASE hands every region
/// its part of it through [`BitmapReplace::replace`]). Regions the crate
/// creates afterwards (SET_MEM_TABLE or ADD_MEM_REG during a migration;
/// QEMU resizes the log before it changes the memory table) start without
/// one: [`attach_log`] gives them theirs. A process serves one frontend
/// connection at a time; [`forget_log`] clears it for the next.
static LATEST_LOG: RwLock<Option<Arc<MmapLogReg>>> = RwLock::new(None);

impl BitmapReplace for DirtyLog {
    type InnerBitmap = RegionLog;

    fn replace(&self, log: RegionLog) {
        *LATEST_LOG.write().unwrap_or_else(PoisonError::into_inner) = Some(log.log.clone());
        *self.0.log.write().unwrap_or_else(PoisonError::into_inner) = Some(log);
    }
}

/// Gives every region of `mem` that has no log yet its part of the log the
/// frontend shared last, if any.
pub fn attach_log(mem: &GuestMemoryMmap<DirtyLog>) {
    let Some(log) = LATEST_LOG
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
    else {
        return;
    };
    for region in mem.iter() {
        let bitmap = region_log(region);
        let missing = bitmap
            .0
            .log
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none();
        if !missing {
            continue;
        }
        match RegionLog::new(region, log.clone()) {
            Ok(part) => {
                *bitmap.0.log.write().unwrap_or_else(PoisonError::into_inner) = Some(part);
            }
            // A log too small for the region: the frontend resizes it and
            // sends SET_LOG_BASE again, which gives this region its part.
            Err(e) => log::warn!(
                "guest memory at {:#x} has no dirty log yet: {e}",
                region.start_addr().raw_value()
            ),
        }
    }
}

/// Forgets the last shared log (a new frontend connection).
pub fn forget_log() {
    *LATEST_LOG.write().unwrap_or_else(PoisonError::into_inner) = None;
}

/// The log of one region of the daemon's guest memory.
fn region_log(region: &MmapRegion<DirtyLog>) -> &DirtyLog {
    region.bitmap()
}

/// Switches logging on or off in every region of `mem` (the acked
/// `VHOST_F_LOG_ALL`).
pub fn set_logging(mem: &GuestMemoryMmap<DirtyLog>, on: bool) {
    for region in mem.iter() {
        region_log(region).set_on(on);
    }
}

/// Whether writes into `mem` are logged now (asked once per batch).
/// Logs `len` bytes at guest address `at` as written (for writes the
/// device makes to one place and must log at another: a used ring whose
/// frontend gave it a separate `log_guest_addr`). Within one region;
/// nothing outside guest memory is touched.
pub fn mark(mem: &GuestMemoryMmap<DirtyLog>, at: vm_memory::GuestAddress, len: usize) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    if let Some((region, offset)) = mem.to_region_addr(at) {
        let offset = usize::try_from(offset.0).expect("a region offset fits usize");
        region.bitmap().mark_dirty(offset, len);
    }
}

pub fn logging(mem: &GuestMemoryMmap<DirtyLog>) -> bool {
    mem.iter().any(|r| region_log(r).is_on())
}
