//! How one frame moves from the tap to the guest.
//!
//! Guest buffers are gathered into a set of popped chains ([`RxBuffers`]), then one
//! `readv` straight into guest memory reads exactly one frame. The chains
//! the frame filled are completed, each with its own length, and
//! `num_buffers` is set; chains not needed stay in the buffers for the next
//! frame, and are given back to the ring when the batch ends. The loop
//! around this step is [`crate::datapath::batch::Batch::drain`].
//!
//! Without `VIRTIO_NET_F_MRG_RXBUF` the buffers are one chain. With it, the
//! buffers gathers chains until it can hold the largest frame the guest may
//! receive; when the ring runs dry first, the frame is read into the
//! buffers there are, so a small frame never waits for 64 KiB of buffers.
//!
//! A tap's `read` silently cuts a frame to the buffers it is given, so the
//! `readv` goes on past the guest's buffers into a host buffer
//! ([`Bounce`]): a frame with bytes there did not fit. One longer than the
//! guest may receive ([`RxParams`]) is dropped and counted, never delivered
//! cut; a mergeable one that is merely longer than the buffers posted so
//! far is held there, whole, and delivered first once the guest has posted
//! enough (the tap is not read meanwhile).
//!
//! With the pair's io_uring (`--tap-io uring|auto`), chains that each hold
//! the largest frame the guest may receive are read a round at a time:
//! [`step_batched`], up to [`URING_READS`] `readv`s per `io_uring_enter`.
//! With `--tap-io posted`, chains that are one buffer each holding it are
//! posted ahead instead, and the kernel reads frames into them as they
//! arrive (`step_posted`).

use std::fs::File;
use std::io;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::datapath::batch::{Batch, Ring, RingError, Step};
use crate::datapath::guest::{
    Access, ChainError, GuestIoVecs, GuestMem, Posted, PostedChain, PostedReads, ReaderBufs,
    TapReads,
};
use crate::host::sys::{Uring, POSTED_READS};
use crate::stats::QueueStats;
use crate::VNET_HDR_LEN;

/// Byte offset of `num_buffers` in `virtio_net_hdr_v1` (the legacy 10-byte
/// header ends there: it has none).
const NUM_BUFFERS_OFFSET: usize = 10;

/// Largest chain accepted on RX (a Linux guest's "big packets" buffers are
/// about 64 KiB; anything far beyond is a broken descriptor).
pub const MAX_RX_CHAIN: usize = 1 << 20;

/// A popped RX chain waiting for a frame.
#[derive(Clone, Copy, Debug)]
pub struct RxChain {
    head: u16,
    len: usize,
    segments: usize,
}

/// `gso_type` is the second byte of the virtio-net header.
const GSO_TYPE_OFFSET: usize = 1;
/// `VIRTIO_NET_HDR_GSO_ECN`: a flag on top of a GSO type, not a type.
const GSO_ECN: u8 = 0x80;

/// Length of a [`Bounce`] buffer: one byte more than the largest header +
/// frame any negotiation allows (a 64 KiB GSO frame, or a 65535-byte MTU,
/// with an Ethernet and VLAN header), so a frame longer than that always
/// leaves bytes in it.
pub const BOUNCE_LEN: usize = VNET_HDR_LEN + 65535 + 18 + 1;

/// What the negotiated features say about RX (and, for `hdr_len`, TX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxParams {
    /// Length of the virtio-net header in front of every frame, on the
    /// rings and the tap: 12, or 10 for a legacy feature set
    /// ([`crate::vnet_hdr_len`]).
    pub hdr_len: usize,
    /// `VIRTIO_NET_F_MRG_RXBUF` acked: a frame may span several chains.
    pub mergeable: bool,
    /// Largest header + frame the guest may receive: a GSO frame with the
    /// receive offloads it acked, else one MTU-sized frame. Longer frames
    /// (a tap whose MTU is above the guest's) are dropped and counted.
    pub max_frame: usize,
    /// Largest header + frame whose header says "no GSO": the MTU the guest
    /// was told (`VIRTIO_NET_F_MTU`) bounds it even when GSO frames may be
    /// longer. Equal to `max_frame` when no such promise was made.
    pub max_plain_frame: usize,
}

impl Default for RxParams {
    /// Before SET_FEATURES: the 12-byte header the tap is opened with, and
    /// no frame may be received.
    fn default() -> Self {
        RxParams {
            hdr_len: VNET_HDR_LEN,
            mergeable: false,
            max_frame: 0,
            max_plain_frame: 0,
        }
    }
}

/// A worker's host-side frame buffer. The tap's `readv` goes on into it
/// after the guest's buffers: bytes landing here belong to a frame the
/// guest's buffers could not hold. With mergeable buffers such a frame,
/// if the guest may receive it, is kept here whole until the guest has
/// posted enough buffers (a held frame).
pub struct Bounce {
    buf: Box<[u8]>,
    /// Length of the held frame in `buf`, header included (0: none).
    held: usize,
}

impl Default for Bounce {
    fn default() -> Self {
        Bounce {
            buf: vec![0u8; BOUNCE_LEN].into_boxed_slice(),
            held: 0,
        }
    }
}

impl Bounce {
    /// Whether a frame waits here for guest buffers.
    pub fn holds_frame(&self) -> bool {
        self.held > 0
    }

    /// Drops the held frame, if any, counting it in `stats`: the
    /// connection went away (its guest will never take it), or the guest's
    /// ring cannot hold it.
    pub fn drop_held(&mut self, stats: &QueueStats) {
        if self.held > 0 {
            self.held = 0;
            stats.rx_dropped_frames.inc();
        }
    }

    /// Keeps a frame of `n` bytes whose first `in_guest` bytes were read
    /// into the guest buffers of `iovecs` and the rest into this buffer.
    fn hold(&mut self, n: usize, in_guest: usize, iovecs: &GuestIoVecs<'_, '_>) -> bool {
        let Some(tail) = n.checked_sub(in_guest).filter(|_| n <= self.buf.len()) else {
            return false;
        };
        self.buf.copy_within(..tail, in_guest);
        if iovecs.read_at(0, &mut self.buf[..in_guest]).is_err() {
            return false;
        }
        self.held = n;
        true
    }
}

/// How filling the RX buffers ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    /// The buffers hold the bytes asked for (without mergeable buffers,
    /// one chain).
    Ready,
    /// The guest has posted fewer bytes than asked for, and some.
    /// `can_grow`: the buffers could still take more chains (it is false
    /// when the buffers already holds a queue's worth of chains, or as many
    /// memory segments as one `readv` takes).
    Short { can_grow: bool },
    /// The guest has posted no buffers, or the buffers are short and a
    /// fresh pass over the avail ring may find more
    /// ([`Ring::may_have_more`]).
    Empty,
    /// A chain the guest got wrong was returned with length 0: one step
    /// of the batch's budget, like a frame (a guest re-posting bad chains
    /// must not keep the worker in one batch).
    Refused,
}

/// Buffers popped for RX in the current batch, the iovecs covering them,
/// and the worker's host-side [`Bounce`] buffer.
pub struct RxBuffers<'a, 'b, 'm> {
    pub chains: &'a mut Vec<RxChain>,
    pub iovecs: &'a mut GuestIoVecs<'b, 'm>,
    pub bounce: &'a mut Bounce,
}

impl RxBuffers<'_, '_, '_> {
    fn capacity(&self) -> usize {
        self.chains.iter().map(|c| c.len).sum()
    }

    /// Completes every chain in the buffers with length 0 (used when a broken
    /// chain sits behind them in the ring, so they cannot be given back).
    fn flush_unused(&mut self, batch: &mut Ring<'_, '_>) -> Result<(), RingError> {
        for c in self.chains.drain(..) {
            batch.complete(c.head, 0)?;
        }
        let n = self.iovecs.segments();
        self.iovecs.drop_front(n);
        Ok(())
    }

    /// Gives the popped chains back to the ring (end of batch).
    pub fn give_back(&mut self, batch: &mut Batch<'_>) {
        batch.give_back(self.chains.len());
        self.chains.clear();
        let n = self.iovecs.segments();
        self.iovecs.drop_front(n);
    }

    /// Pops chains until the buffers hold `want` bytes, or (without
    /// `mergeable` buffers) one chain.
    /// Chains shorter than a `hdr_len`-byte header are refused.
    fn fill(
        &mut self,
        batch: &mut Ring<'_, '_>,
        want: usize,
        mergeable: bool,
        hdr_len: usize,
    ) -> Result<Fill, RingError> {
        let mut capacity = self.capacity();
        loop {
            let enough = if mergeable {
                capacity >= want
            } else {
                !self.chains.is_empty()
            };
            if enough {
                return Ok(Fill::Ready);
            }
            if self.chains.len() >= usize::from(batch.size()) {
                return Ok(Fill::Short { can_grow: false });
            }
            let Some(chain) = batch.pop() else {
                // Chains added since the avail index was read count as
                // posted: a fresh pass looks for them first.
                return Ok(if self.chains.is_empty() || batch.may_have_more() {
                    Fill::Empty
                } else {
                    Fill::Short { can_grow: true }
                });
            };
            let head = chain.head_index();
            let before = self.iovecs.segments();
            let pushed = match self
                .iovecs
                .push_chain(chain, Access::DeviceWrites, MAX_RX_CHAIN)
            {
                Ok(len) if len < hdr_len => Err(ChainError::TooShort { min: hdr_len }),
                other => other,
            };
            match pushed {
                Ok(len) => {
                    capacity += len;
                    self.chains.push(RxChain {
                        head,
                        len,
                        segments: self.iovecs.segments() - before,
                    });
                }
                Err(ChainError::TooManySegments) if !self.chains.is_empty() => {
                    // A good chain that only the other popped chains
                    // leave no iovecs for: it waits in the ring.
                    batch.give_back(1);
                    return Ok(Fill::Short { can_grow: false });
                }
                Err(e) => {
                    self.flush_unused(batch)?;
                    batch.complete_bad(head, &e)?;
                    return Ok(Fill::Refused);
                }
            }
        }
    }

    /// Completes the chains a frame of `n` bytes (with a `hdr_len`-byte
    /// header), already in the buffers, filled, with `num_buffers` set if the
    /// header has it, and counts it.
    fn complete_frame(
        &mut self,
        batch: &mut Ring<'_, '_>,
        n: usize,
        hdr_len: usize,
    ) -> Result<Step, RingError> {
        let mut left = n;
        let mut used = 0;
        let mut segments = 0;
        for c in self.chains.iter() {
            let take = left.min(c.len);
            left -= take;
            used += 1;
            segments += c.segments;
            if left == 0 {
                break;
            }
        }
        let num_buffers = u16::try_from(used).expect("the buffers hold at most a queue of chains");
        // Little-endian with VERSION_1; a legacy header is in the guest's
        // byte order, which is the host's (no cross-endian support) and, as
        // virtio-queue reads rings as little-endian only, little-endian too.
        let has_num_buffers = hdr_len >= NUM_BUFFERS_OFFSET + 2;
        if has_num_buffers {
            if let Err(e) = self
                .iovecs
                .write_at(NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes())
            {
                // Cannot happen for chains that passed validation; count and drop.
                log::debug!("cannot set num_buffers: {e}");
                batch.stats().rx_dropped_frames.inc();
                return Ok(Step::Progress);
            }
        }
        let mut left = n;
        for c in self.chains.drain(..used) {
            let take = left.min(c.len);
            left -= take;
            batch.complete(c.head, u32::try_from(take).expect("chain length fits u32"))?;
        }
        self.iovecs.drop_front(segments);
        batch.count_frame(n.saturating_sub(hdr_len));
        Ok(Step::Progress)
    }

    /// Delivers the held frame once the guest has posted room for it.
    fn deliver_held(
        &mut self,
        batch: &mut Ring<'_, '_>,
        params: RxParams,
    ) -> Result<Step, RingError> {
        let n = self.bounce.held;
        let fill = if params.mergeable {
            self.fill(batch, n, true, params.hdr_len)?
        } else {
            // Features changed under a held frame: it cannot be merged.
            Fill::Short { can_grow: false }
        };
        match fill {
            Fill::Ready => {}
            Fill::Refused => return Ok(Step::Progress),
            Fill::Empty | Fill::Short { can_grow: true } => return Ok(Step::RingEmpty),
            Fill::Short { can_grow: false } => {
                // Every buffer the guest can post is here, and the frame
                // is still longer: it can never be delivered.
                self.bounce.drop_held(batch.stats());
                return Ok(Step::Progress);
            }
        }
        self.bounce.held = 0;
        let frame = self
            .bounce
            .buf
            .get(..n)
            .expect("hold() keeps a frame within the buffer");
        if let Err(e) = self.iovecs.write_at(0, frame) {
            // Cannot happen for chains that passed validation; count and drop.
            log::debug!("cannot copy a held frame: {e}");
            batch.stats().rx_dropped_frames.inc();
            return Ok(Step::Progress);
        }
        self.complete_frame(batch, n, params.hdr_len)
    }
}

/// What to do with a frame of `n` bytes (as the tap reported it) read into
/// RX buffers of `capacity` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// It fits: complete the chains it filled.
    Deliver,
    /// Longer than the guest may receive: drop, count as oversize.
    Oversize,
    /// Longer than the buffers, but the guest may receive it in more
    /// mergeable buffers: hold it until they are posted.
    Hold,
    /// Shorter than a header, or longer than the guest's buffers can ever
    /// be: drop.
    Unfit,
}

/// Decides about a frame of `n` bytes read into RX buffers of `capacity`
/// bytes that `can_grow` (see [`Fill::Short`]); `gso_type` reads the
/// frame's header, only for frames above the MTU.
fn judge(
    n: usize,
    capacity: usize,
    params: RxParams,
    can_grow: bool,
    gso_type: impl FnOnce() -> u8,
) -> Verdict {
    if n < params.hdr_len {
        Verdict::Unfit
    } else if n > params.max_frame || (n > params.max_plain_frame && gso_type() & !GSO_ECN == 0) {
        Verdict::Oversize
    } else if n <= capacity {
        Verdict::Deliver
    } else if params.mergeable && can_grow {
        Verdict::Hold
    } else {
        Verdict::Unfit
    }
}

/// Moves one frame from `tap` into the guest's RX buffers (a held frame
/// first, before the tap is read again).
pub fn step(
    batch: &mut Ring<'_, '_>,
    buffers: &mut RxBuffers<'_, '_, '_>,
    tap: &File,
    params: RxParams,
) -> Result<Step, RingError> {
    if buffers.bounce.holds_frame() {
        return buffers.deliver_held(batch, params);
    }
    let can_grow = match buffers.fill(batch, params.max_frame, params.mergeable, params.hdr_len)? {
        Fill::Empty => return Ok(Step::RingEmpty),
        Fill::Refused => return Ok(Step::Progress),
        Fill::Ready => true,
        Fill::Short { can_grow } => can_grow,
    };
    let stats = batch.stats();
    let n = match buffers.iovecs.read_from(tap, &mut buffers.bounce.buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            stats.tap_eagain.inc();
            return Ok(Step::TapBlocked);
        }
        Err(e) => {
            stats.tap_errors.inc();
            log::debug!("RX tap read failed: {e}");
            return Ok(if crate::host::tap::is_gone(&e) {
                Step::TapGone
            } else {
                Step::TapBlocked
            });
        }
    };
    let capacity = buffers.capacity();
    if batch.logging() {
        // Whatever the verdict, the readv wrote these bytes.
        buffers.iovecs.mark_written(n.min(capacity));
    }
    let iovecs = &*buffers.iovecs;
    let gso_type = || {
        let mut b = [0u8];
        // The header sits in the first chain, which is at least a header
        // long; an unreadable byte reads as "no GSO" (the stricter limit).
        iovecs.read_at(GSO_TYPE_OFFSET, &mut b).map_or(0, |()| b[0])
    };
    match judge(n, capacity, params, can_grow, gso_type) {
        Verdict::Deliver => buffers.complete_frame(batch, n, params.hdr_len),
        Verdict::Oversize => {
            // The buffers keep nothing the guest will see: they stay in
            // the buffers for the next frame.
            stats.rx_dropped_oversize_frames.inc();
            Ok(Step::Progress)
        }
        Verdict::Hold => {
            if buffers.bounce.hold(n, capacity, buffers.iovecs) {
                // Stop reading the tap; the drain loop re-arms the guest's
                // kick, which brings the buffers the frame needs.
                Ok(Step::RingEmpty)
            } else {
                stats.rx_dropped_frames.inc();
                Ok(Step::Progress)
            }
        }
        Verdict::Unfit => {
            stats.rx_dropped_frames.inc();
            Ok(Step::Progress)
        }
    }
}

/// Reads one io_uring round makes at most: a batch's budget
/// ([`crate::datapath::queue_pair::BUDGET_FRAMES`]), so a batch that finds
/// a burst in the tap can read it with one `io_uring_enter`.
pub const URING_READS: usize = 64;

/// Reads of a round at least (unless the budget left is smaller): what a
/// round read before its size followed the tap.
pub const URING_MIN_READS: usize = 8;

/// RX through the pair's io_uring (`--tap-io uring|auto`): what a batch
/// keeps between steps ([`step_batched`]).
pub struct RxUring {
    bufs: ReaderBufs,
    /// Frames the last round read beyond the one its step reported: the
    /// next steps report them, so the batch's budget counts every frame.
    credits: usize,
    /// How the last round ended (tap empty, ...), reported after them.
    pending: Option<Step>,
    /// Reads the next round posts, learnt from the tap: a round that
    /// found the tap empty sizes the next one to the frames it got (plus
    /// a little), one that did not doubles it. Every read posted beyond
    /// the frames in the tap costs an EAGAIN; every round short of them
    /// another `io_uring_enter`.
    round: usize,
    /// The guest's chains are shorter than the largest frame it may
    /// receive: RX reads frame by frame ([`step`]) until the features
    /// change ([`RxUring::features_changed`]); a guest's buffers keep
    /// their size (a Linux guest's mergeable buffers vary a little, far
    /// below a 64 KiB GSO frame), and looking costs a pop per batch.
    small: bool,
    /// The ring failed: the pair goes back to plain syscalls.
    failed: bool,
    /// Reads kept posted into the guest's chains across events, where the
    /// kernel has them (Linux >= 6.7) and the guest's chains are each one
    /// buffer that holds the largest frame: [`step_posted`].
    posted: Option<PostedReads>,
    /// The guest's chains cannot be posted (several buffers each): rounds
    /// until the features change.
    unpostable: bool,
    /// Rounds submitted (the tests' proof that a round ran).
    #[cfg(test)]
    pub(crate) rounds: usize,
}

impl RxUring {
    /// RX's state for the pair's ring, with `posted` reads if the kernel
    /// has them.
    pub fn new(posted: Option<PostedReads>) -> Self {
        RxUring {
            bufs: ReaderBufs::new(URING_READS),
            credits: 0,
            pending: None,
            round: URING_MIN_READS,
            small: false,
            failed: false,
            posted,
            unpostable: false,
            #[cfg(test)]
            rounds: 0,
        }
    }

    /// Whether RX posts reads ahead (it has them, and neither the ring
    /// failed nor the guest's chains turned out unpostable).
    pub fn posting(&self) -> bool {
        !self.unpostable && self.posted.as_ref().is_some_and(|p| !p.failed())
    }

    /// The fd RX waits on while reads are posted (readable when some
    /// completed), instead of the tap's.
    pub fn posted_fd(&self) -> Option<std::os::fd::RawFd> {
        self.posted
            .as_ref()
            .filter(|p| p.posted() > 0)
            .and_then(PostedReads::fd)
    }

    /// Ends the posted reads, if any, outside a batch (the ring stops, the
    /// guest's memory or features change, the ring failed): returns how
    /// many chains the caller gives back to the ring (the last popped),
    /// and how many frames read into them are dropped.
    pub fn unpost(&mut self) -> (usize, u64) {
        let Some(p) = self.posted.as_mut() else {
            return (0, 0);
        };
        let taken = p.take_back();
        if p.failed() {
            self.posted = None;
        }
        taken
    }

    /// Forgets what the last batch left (call before each batch).
    pub fn start_batch(&mut self) {
        self.credits = 0;
        self.pending = None;
    }

    /// Sizes the next round after one of `posted` reads that got `frames`
    /// frames and found the tap empty (`eagain`) or not.
    fn learn(&mut self, posted: usize, frames: usize, eagain: bool) {
        self.round = if eagain {
            // The tap held `frames`: expect as many next time, a few more
            // if it keeps growing, and forget a burst only slowly.
            (frames + frames / 4 + 2)
                .max(self.round / 2)
                .max(URING_MIN_READS)
        } else {
            (posted * 2).max(self.round)
        }
        .min(URING_READS);
    }

    /// Reads the next round posts (before `RxUring::learn` of it).
    pub fn round(&self) -> usize {
        self.round
    }

    /// The guest acked features (its largest frame may have changed):
    /// look at its chains again.
    pub fn features_changed(&mut self) {
        self.small = false;
        self.unpostable = false;
    }

    /// Whether the ring failed (then the pair drops it).
    pub fn failed(&self) -> bool {
        self.failed
    }
}

/// Moves up to [`URING_READS`] frames from `tap` into the guest's RX
/// chains with one `io_uring_enter` (a round sized to what the tap held
/// last time, within the batch's budget): one read per chain, each chain able
/// to hold the largest frame the guest may receive. The frames are
/// delivered in the order the chains were popped: if a read found the tap
/// empty (or its frame was dropped) and a later one got a frame, that
/// frame is copied into the earlier chain, so the chains left over are
/// the last popped and go back to the ring in order (also with
/// `VIRTIO_F_IN_ORDER`). Chains shorter than that (mergeable buffers
/// smaller than the largest frame), a held frame or a chain the guest got
/// wrong take the frame-by-frame [`step`].
pub fn step_batched(
    batch: &mut Ring<'_, '_>,
    st: &mut RxUring,
    ring: &mut Uring,
    buffers: &mut RxBuffers<'_, '_, '_>,
    mem: &Arc<GuestMem>,
    tap: &File,
    params: RxParams,
) -> Result<Step, RingError> {
    if st.credits > 0 {
        st.credits -= 1;
        return Ok(Step::Progress);
    }
    if let Some(end) = st.pending.take() {
        return Ok(end);
    }
    if st.small || st.failed || buffers.bounce.holds_frame() || !buffers.chains.is_empty() {
        return step(batch, buffers, tap, params);
    }
    if st.posting() {
        match step_posted(batch, st, mem, params)? {
            Some(end) => return Ok(end),
            // The guest's chains cannot be posted: rounds from now on.
            None => st.unpostable = true,
        }
    }
    // Never more than the batch's budget: the frames a round reads beyond
    // the one this step reports are reported by the next steps (credits).
    let left = usize::try_from(batch.budget_left()).unwrap_or(usize::MAX);
    let want = st.round.min(left).clamp(1, URING_READS);
    // A frame longer than the guest may receive is dropped (`judge`):
    // one that fills a buffer longer than that needs no overflow byte.
    let mut reads = TapReads::new(&mut st.bufs, want, params.max_frame, batch.mem(), ring);
    let mut heads = [(0u16, 0usize); URING_READS];
    let mut count = 0;
    while count < want {
        let Some(chain) = batch.pop() else {
            break;
        };
        let head = chain.head_index();
        match reads.push_chain(count, chain, MAX_RX_CHAIN) {
            Ok(len) if len >= params.max_frame && len >= params.hdr_len => {
                heads[count] = (head, len);
                count += 1;
            }
            Ok(_) => {
                batch.give_back(1);
                st.small |= count == 0;
                break;
            }
            Err(_) => {
                batch.give_back(1);
                break;
            }
        }
    }
    if count == 0 {
        drop(reads);
        return step(batch, buffers, tap, params);
    }
    #[cfg(test)]
    {
        st.rounds += 1;
    }
    if let Err(e) = reads.submit(count) {
        log::error!("RX io_uring failed, going back to readv: {e}");
        st.failed = true;
    }
    let stats = batch.stats();
    let has_num_buffers = params.hdr_len >= NUM_BUFFERS_OFFSET + 2;
    let (mut filled, mut frames, mut eagain, mut end) = (0, 0, false, None);
    for (j, &(_, capacity)) in heads.iter().enumerate().take(count) {
        let result = reads.result(j);
        if result == -libc::EOPNOTSUPP {
            // A tap that cannot take non-blocking ring reads (before
            // Linux 6.4): readv from now on.
            st.failed = true;
        }
        let Ok(n) = usize::try_from(result) else {
            if result == -libc::EAGAIN {
                eagain = true;
            } else if result != -libc::ECANCELED && result != -libc::EOPNOTSUPP {
                let e = io::Error::from_raw_os_error(-result);
                stats.tap_errors.inc();
                log::debug!("RX tap read failed: {e}");
                end = Some(if crate::host::tap::is_gone(&e) {
                    Step::TapGone
                } else {
                    Step::TapBlocked
                });
            }
            continue;
        };
        frames += 1;
        let read = reads.read(j);
        if batch.logging() {
            read.mark_written(n.min(capacity));
        }
        let gso_type = || {
            let mut b = [0u8];
            read.read_at(GSO_TYPE_OFFSET, &mut b).map_or(0, |()| b[0])
        };
        match judge(n, capacity, params, false, gso_type) {
            Verdict::Deliver => {
                // Into the first chain not used yet: the same one unless
                // an earlier read got no frame.
                let placed = (j == filled
                    || reads.copy(j, filled, n, &mut buffers.bounce.buf).is_ok())
                    && (!has_num_buffers
                        || reads
                            .read(filled)
                            .write_at(NUM_BUFFERS_OFFSET, &1u16.to_le_bytes())
                            .is_ok());
                if !placed {
                    // Cannot happen for chains that passed validation.
                    stats.rx_dropped_frames.inc();
                    continue;
                }
                let len = u32::try_from(n).expect("a frame within a chain fits u32");
                batch.complete(heads[filled].0, len)?;
                batch.count_frame(n - params.hdr_len);
                filled += 1;
            }
            Verdict::Oversize => stats.rx_dropped_oversize_frames.inc(),
            Verdict::Hold | Verdict::Unfit => stats.rx_dropped_frames.inc(),
        }
    }
    drop(reads);
    batch.give_back(count - filled);
    st.learn(count, frames, eagain);
    if eagain {
        stats.tap_eagain.inc();
        end = end.or(Some(Step::TapBlocked));
    }
    if frames == 0 {
        return Ok(end.unwrap_or(Step::Progress));
    }
    st.credits = frames - 1;
    st.pending = end;
    Ok(Step::Progress)
}

/// Moves one frame the posted reads got into the guest (after posting
/// the guest's new chains, while fewer than half of [`POSTED_READS`] are),
/// or, if none got one yet, posts what the guest has and waits
/// ([`Step::TapBlocked`]: the pair then waits on the reads' fd rather
/// than the tap's). The kernel fills the chains in the order they were
/// posted, which is the order they were popped: frames are delivered in
/// ring order (also with `VIRTIO_F_IN_ORDER`). A frame too long for the
/// guest is dropped and counted, its chain completed with length 0 (the
/// chains after it are filled already).
/// `None`: the guest's chains cannot be posted (several buffers each, or
/// too short for the largest frame): the reads are ended, what they got
/// is delivered, and the caller reads by rounds.
fn step_posted(
    batch: &mut Ring<'_, '_>,
    st: &mut RxUring,
    mem: &Arc<GuestMem>,
    params: RxParams,
) -> Result<Option<Step>, RingError> {
    let posted = st.posted.as_mut().expect("checked by the caller");
    if !posted.maps(mem) {
        // A new memory table, and this batch came before `update_memory`
        // (which takes them back too): the posted chains point into the
        // old one. Frames read there are dropped, the chains given back.
        let (chains, frames) = posted.take_back();
        batch.stats().rx_dropped_frames.add(frames);
        batch.give_back(chains);
    }
    if posted.posted() < usize::from(POSTED_READS) / 2 && !post(batch, posted, mem, params)? {
        return stop_posting(batch, posted, params);
    }
    // Posting and arming once: a read armed while the tap holds frames
    // reads them at once (inline, in the `io_uring_enter` that arms it).
    let mut armed_now = false;
    loop {
        let report = match posted.next_report() {
            Ok(r) => r,
            Err(e) => {
                log::error!("posted RX reads failed, reading by rounds: {e}");
                return Ok(Some(Step::Progress));
            }
        };
        match report {
            Some(Posted::Frame { chain, n }) => {
                deliver_posted(batch, chain, n, params)?;
                return Ok(Some(Step::Progress));
            }
            Some(Posted::Ended(e)) if e == -libc::ENOBUFS || e == -libc::ECANCELED => {}
            Some(Posted::Ended(e)) if e == -libc::EINVAL || e == -libc::EOPNOTSUPP => {
                // This file cannot take a posted read: rounds.
                log::info!(
                    "posted RX reads refused ({}): reading by rounds",
                    io::Error::from_raw_os_error(-e)
                );
                return stop_posting(batch, posted, params);
            }
            Some(Posted::Ended(e)) => {
                let e = io::Error::from_raw_os_error(-e);
                batch.stats().tap_errors.inc();
                log::debug!("RX tap read failed: {e}");
                if crate::host::tap::is_gone(&e) {
                    return Ok(Some(Step::TapGone));
                }
                // Armed again below (once per step: an error that stays
                // waits for the next event, as a blocked tap does).
            }
            None if armed_now => break,
            None => {
                if !post(batch, posted, mem, params)? {
                    return stop_posting(batch, posted, params);
                }
                if let Err(e) = posted.arm() {
                    log::error!("posted RX reads failed, reading by rounds: {e}");
                    return Ok(Some(Step::Progress));
                }
                armed_now = true;
            }
        }
    }
    // With chains posted RX waits for frames, not for the guest: its kicks
    // stay off, and the chains it adds meanwhile are posted when a frame
    // comes (fewer than half posted) or when the posted ones are used up
    // (no chain posted: the ring counts as empty and kicks come back on).
    Ok(Some(if posted.posted() > 0 {
        Step::TapBlocked
    } else {
        Step::RingEmpty
    }))
}

/// Ends the posted reads for good (until the features change): what they
/// read is delivered, their other chains go back to the ring (the last
/// popped, after any given back already). Returns what [`step_posted`]
/// does then: `None`, read by rounds.
fn stop_posting(
    batch: &mut Ring<'_, '_>,
    posted: &mut PostedReads,
    params: RxParams,
) -> Result<Option<Step>, RingError> {
    let mut reads = Vec::new();
    let left = posted.cancel(|r| reads.push(r));
    for r in reads {
        if let Posted::Frame { chain, n } = r {
            deliver_posted(batch, chain, n, params)?;
        }
    }
    batch.give_back(left.len());
    Ok(None)
}

/// Posts the guest's chains until [`POSTED_READS`] are posted or the ring
/// has no more; `false`: a chain could not be posted (given back).
/// A chain the guest got wrong is completed with length 0.
fn post(
    batch: &mut Ring<'_, '_>,
    posted: &mut PostedReads,
    mem: &Arc<GuestMem>,
    params: RxParams,
) -> Result<bool, RingError> {
    // A frame that fills a chain longer than this is dropped (`judge`),
    // whether or not the tap cut it; and a chain holds a header at least.
    let above = params.max_frame.max(params.hdr_len - 1);
    while posted.has_room() {
        let Some(chain) = batch.pop() else {
            break;
        };
        let head = chain.head_index();
        match posted.post(chain, mem, above, MAX_RX_CHAIN) {
            Ok(Some(_)) => {}
            Ok(None) => {
                batch.give_back(1);
                return Ok(false);
            }
            Err(_) if posted.posted() > 0 => {
                // Completed in its turn, after the chains posted before it
                // (used entries in ring order, and no chain completed
                // before one popped earlier): it waits in the ring until
                // they are used.
                batch.give_back(1);
                break;
            }
            Err(e) => batch.complete_bad(head, &e)?,
        }
    }
    Ok(true)
}

/// Completes a posted `chain` into which the kernel read a frame of `n`
/// bytes (or drops the frame, completing the chain with length 0).
fn deliver_posted(
    batch: &mut Ring<'_, '_>,
    chain: PostedChain,
    n: usize,
    params: RxParams,
) -> Result<(), RingError> {
    let (mem, stats) = (batch.mem(), batch.stats());
    if batch.logging() {
        crate::datapath::guest::mark_written(mem, chain.addr, n.min(chain.len));
    }
    let at = |offset: usize| GuestAddress(chain.addr.0 + offset as u64);
    let gso_type = || mem.read_obj::<u8>(at(GSO_TYPE_OFFSET)).unwrap_or(0);
    let delivered = match judge(n, chain.len, params, false, gso_type) {
        Verdict::Deliver => {
            let has_num_buffers = params.hdr_len >= NUM_BUFFERS_OFFSET + 2;
            let ok = !has_num_buffers
                || mem
                    .write_slice(&1u16.to_le_bytes(), at(NUM_BUFFERS_OFFSET))
                    .is_ok();
            if !ok {
                // Cannot happen for a chain that passed validation.
                stats.rx_dropped_frames.inc();
            }
            ok
        }
        Verdict::Oversize => {
            stats.rx_dropped_oversize_frames.inc();
            false
        }
        Verdict::Hold | Verdict::Unfit => {
            stats.rx_dropped_frames.inc();
            false
        }
    };
    if !delivered {
        return batch.complete(chain.head, 0);
    }
    batch.complete(
        chain.head,
        u32::try_from(n).expect("a frame within a chain fits u32"),
    )?;
    batch.count_posted_frame(n - params.hdr_len);
    Ok(())
}

#[cfg(test)]
mod tests;
