//! What is counted, per virtqueue, with the unit in every name.
//!
//! Counters are relaxed atomics written only by the queue's worker thread and
//! read by anyone (the stats socket, the exit report). They are cumulative for
//! the life of the daemon, across frontend reconnects. `docs/metrics.md`
//! documents each one; [`QueueStats::FIELDS`] is the single list that the
//! text formats and that document are checked against.
//!
//! This module defines the counters and nothing about how they are shown:
//! [`format`](mod@format) writes and parses their text formats (Prometheus,
//! the table), [`client`] is the `stats` command that prints a running
//! daemon's.

pub mod client;
pub mod connections;
pub mod format;

use std::sync::atomic::{AtomicU64, Ordering};

/// A count that only grows: written by one queue's worker, read by anyone
/// (relaxed: each counter is exact on its own; a snapshot of several is not
/// atomic).
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (inclusive) of the batch-size histogram buckets, in frames.
/// The last bucket counts every batch larger than the previous bound.
pub const BATCH_BUCKETS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, u64::MAX];

/// A histogram over [`BATCH_BUCKETS`], as Prometheus defines one: how many
/// values fell in each bucket, and the sum of the values.
#[derive(Default, Debug)]
pub struct Histogram {
    /// Values observed per bucket (each counted in its own bucket only;
    /// the text format makes them cumulative).
    pub buckets: [Counter; BATCH_BUCKETS.len()],
    /// Sum of the values observed.
    pub sum: Counter,
}

impl Histogram {
    /// Counts `value` in its bucket and adds it to the sum.
    pub fn observe(&self, value: u64) {
        let bucket = BATCH_BUCKETS
            .iter()
            .position(|&bound| value <= bound)
            .expect("the last bucket is unbounded");
        self.buckets[bucket].inc();
        self.sum.add(value);
    }

    /// How many values were observed.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(Counter::get).sum()
    }
}

/// Counters of one virtqueue.
#[derive(Default, Debug)]
pub struct QueueStats {
    /// Frames moved (TX: written to the tap; RX: delivered to the guest).
    pub frames: Counter,
    /// Frame bytes moved, excluding the virtio-net header (12 bytes, or 10
    /// with a legacy feature set).
    pub bytes: Counter,
    /// Guest kicks: sum of the kick eventfd's counter over every read (one
    /// read can stand for several kicks).
    pub kicks: Counter,
    /// Batches that moved at least one frame. A batch that only returned
    /// refused chains (length 0) is not counted.
    pub batches: Counter,
    /// Chains completed: what the used index advanced by (frames, RX
    /// buffers of a merged frame, chains returned with length 0). One used
    /// entry each, except a TX batch with `VIRTIO_F_IN_ORDER`: one for all.
    pub completions: Counter,
    /// Interrupts sent to the guest (call eventfd written).
    pub interrupts_sent: Counter,
    /// Batches after which the guest's event index (or NO_INTERRUPT flag)
    /// said no interrupt was wanted.
    pub interrupts_suppressed: Counter,
    /// Batches whose interrupt a coalescing policy held back (always 0
    /// with the `immediate` policy).
    pub interrupts_deferred: Counter,
    /// Frames per batch, for the batches counted in `batches`.
    pub batch_frames: Histogram,
    /// RX frames read from the tap that the guest's buffers could not hold
    /// (or shorter than the virtio-net header, or held for more mergeable
    /// buffers when the connection ended), dropped.
    pub rx_dropped_frames: Counter,
    /// RX frames read from the tap that were longer than the guest may
    /// receive (its MTU, or a 64 KiB GSO frame), dropped, never delivered
    /// cut: the tap's MTU is above the one the guest was given.
    pub rx_dropped_oversize_frames: Counter,
    /// Descriptor chains refused (wrong direction, outside guest memory,
    /// too long or short, broken table) and returned with length 0.
    pub bad_chains: Counter,
    /// Times the guest published an impossible avail index; the queue stops.
    pub bad_avail_index: Counter,
    /// Tap reads or writes that failed with an error other than EAGAIN
    /// (TX: the frame is dropped), or that a failed io_uring took and
    /// never reported (counted as lost, never made again).
    pub tap_errors: Counter,
    /// Tap reads (RX: tap empty) or writes (TX: tap full) that returned EAGAIN.
    pub tap_eagain: Counter,
    /// RX frames the kernel read into guest buffers posted ahead
    /// (`--tap-io posted` on Linux >= 6.7, one guest buffer per chain
    /// that holds the largest frame): no syscall of the daemon's per frame.
    pub rx_posted_frames: Counter,
}

/// How a field is exposed: a plain counter or a histogram.
pub enum Kind {
    Counter(fn(&QueueStats) -> &Counter),
    Histogram(fn(&QueueStats) -> &Histogram),
}

/// One exported field: name (with unit), help text, accessor.
pub struct Field {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
}

macro_rules! counter {
    ($name:literal, $field:ident, $help:literal) => {
        Field {
            name: $name,
            help: $help,
            kind: Kind::Counter(|s| &s.$field),
        }
    };
}

impl QueueStats {
    /// Every exported field, in output order.
    pub const FIELDS: &'static [Field] = &[
        counter!("frames_total", frames, "Frames moved through the queue."),
        counter!(
            "bytes_total",
            bytes,
            "Frame bytes moved, without the virtio-net header."
        ),
        counter!(
            "kicks_total",
            kicks,
            "Guest kicks received (sum of eventfd counts)."
        ),
        counter!(
            "batches_total",
            batches,
            "Batches that moved at least one frame."
        ),
        counter!(
            "completions_total",
            completions,
            "Chains completed (what the used index advanced by)."
        ),
        counter!(
            "interrupts_sent_total",
            interrupts_sent,
            "Interrupts sent to the guest."
        ),
        counter!(
            "interrupts_suppressed_total",
            interrupts_suppressed,
            "Batches for which the guest asked for no interrupt."
        ),
        counter!(
            "interrupts_deferred_total",
            interrupts_deferred,
            "Batches whose interrupt the coalescing policy held back."
        ),
        counter!(
            "rx_dropped_frames_total",
            rx_dropped_frames,
            "RX frames that did not fit the guest's buffers."
        ),
        counter!(
            "rx_dropped_oversize_frames_total",
            rx_dropped_oversize_frames,
            "RX frames longer than the guest may receive (tap MTU above the guest's)."
        ),
        counter!(
            "bad_chains_total",
            bad_chains,
            "Malformed chains returned with length 0."
        ),
        counter!(
            "bad_avail_index_total",
            bad_avail_index,
            "Impossible avail indexes seen (the queue was stopped)."
        ),
        counter!(
            "tap_errors_total",
            tap_errors,
            "Tap reads/writes failed (not EAGAIN)."
        ),
        counter!(
            "tap_eagain_total",
            tap_eagain,
            "Tap reads/writes that returned EAGAIN."
        ),
        counter!(
            "rx_posted_frames_total",
            rx_posted_frames,
            "RX frames the kernel read into guest buffers posted ahead (io_uring)."
        ),
        Field {
            name: "batch_frames",
            help: "Frames moved per batch.",
            kind: Kind::Histogram(|s| &s.batch_frames),
        },
    ];

    /// Records a batch that moved `frames` frames (chains refused with
    /// length 0 are not frames); a batch that moved none is not recorded.
    pub fn record_batch(&self, frames: u64) {
        if frames == 0 {
            return;
        }
        self.batches.inc();
        self.batch_frames.observe(frames);
    }
}

/// Counters of every queue of the device: queue `2i` is pair `i`'s RX,
/// queue `2i + 1` its TX (the virtio-net numbering).
#[derive(Debug)]
pub struct Stats {
    pub queues: Vec<QueueStats>,
    /// Coalescing policy of each direction, `[rx, tx]`, as configured.
    pub policies: [String; 2],
    /// The daemon's frontend connections.
    pub connections: connections::Connections,
    /// Per queue: how it moves frames to or from the tap (`--tap-io`), one
    /// of [`TAP_IO_SYSCALL`], [`TAP_IO_URING`], [`TAP_IO_POSTED`].
    pub tap_io_mode: Vec<std::sync::atomic::AtomicU8>,
}

/// One syscall per frame.
pub const TAP_IO_SYSCALL: u8 = 0;
/// Through the queue pair's io_uring.
pub const TAP_IO_URING: u8 = 1;
/// Through the io_uring, RX with reads posted ahead (`--tap-io posted`).
pub const TAP_IO_POSTED: u8 = 2;

/// The daemon-wide counters (no queue label): name, help, accessor.
#[allow(clippy::type_complexity)]
pub const DEVICE_FIELDS: &[(&str, &str, fn(&Stats) -> &Counter)] = &[
    ("connections_total", "Frontend connections served.", |s| {
        &s.connections.total
    }),
    (
        "connection_errors_total",
        "Frontend connections that ended with a protocol error.",
        |s| &s.connections.errors,
    ),
    (
        "log_lines_suppressed_total",
        "Log lines about single connections written at debug level during a flood of connections.",
        |s| &s.connections.log_lines_suppressed,
    ),
];

impl Stats {
    /// How queue `q` moves frames to or from the tap: `posted` (RX reads
    /// posted ahead), `uring` or `syscall`.
    pub fn tap_io(&self, q: usize) -> &'static str {
        let mode = self.tap_io_mode.get(q).map_or(TAP_IO_SYSCALL, |m| {
            m.load(std::sync::atomic::Ordering::Relaxed)
        });
        match mode {
            TAP_IO_POSTED => "posted",
            TAP_IO_URING => "uring",
            _ => "syscall",
        }
    }
}

/// Name of a queue's direction from its index.
pub fn direction(queue: usize) -> &'static str {
    if queue % 2 == 0 {
        "rx"
    } else {
        "tx"
    }
}

impl Stats {
    pub fn new(num_queues: usize, policies: [String; 2]) -> Self {
        Stats {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
            policies,
            connections: connections::Connections::default(),
            tap_io_mode: (0..num_queues)
                .map(|_| std::sync::atomic::AtomicU8::new(TAP_IO_SYSCALL))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::notify::Policy;
    use crate::testing::driver::{Buf, Desc, DESC_F_WRITE};
    use crate::testing::unit::buf_addr;
    use crate::testing::unit::world::World;

    #[test]
    fn batch_of_one_and_of_hundred_land_in_first_and_last_bucket() {
        let s = QueueStats::default();
        s.record_batch(1);
        s.record_batch(100);
        s.record_batch(0);
        assert_eq!(s.batches.get(), 2);
        assert_eq!(s.batch_frames.buckets[0].get(), 1);
        assert_eq!(s.batch_frames.buckets[7].get(), 1);
    }

    #[test]
    fn every_field_is_documented_in_metrics_md() {
        let doc = include_str!("../../docs/metrics.md");
        for (name, _, _) in DEVICE_FIELDS {
            assert!(doc.contains(name), "docs/metrics.md lacks {name}");
        }
        for field in QueueStats::FIELDS {
            assert!(
                doc.contains(field.name),
                "docs/metrics.md lacks {}",
                field.name
            );
        }
    }

    /// Each exported counter, and a scenario on the real worker (rings in
    /// memory, a SOCK_SEQPACKET "tap", a real epoll) that drives the
    /// condition the counter names. Returns the queue whose counter must
    /// have moved.
    fn scenario(name: &str) -> Option<(World, usize)> {
        let hold = Policy::Frames {
            frames: 64,
            usecs: 1_000_000,
        };
        let w = match name {
            "frames_total"
            | "bytes_total"
            | "batches_total"
            | "completions_total"
            | "kicks_total"
            | "interrupts_sent_total"
            | "batch_frames" => {
                let mut w = World::new(256, [Policy::Immediate; 2]);
                w.transmit(3);
                (w, 1)
            }
            "interrupts_suppressed_total" => {
                let mut w = World::new(256, [Policy::Immediate; 2]);
                w.rings[1].set_used_event(&w.mem, 100);
                w.transmit(3);
                (w, 1)
            }
            "interrupts_deferred_total" => {
                let mut w = World::new(256, [hold; 2]);
                w.transmit(3);
                (w, 1)
            }
            "bad_chains_total" => {
                let mut w = World::new(256, [Policy::Immediate; 2]);
                // A TX chain the device would have to write: refused.
                let d = Desc {
                    addr: buf_addr(0, 2048).0,
                    len: 100,
                    flags: DESC_F_WRITE,
                    next: 0,
                };
                w.rings[1].write_desc(&w.mem, 7, d);
                w.rings[1].push_avail(&w.mem, 7);
                w.rings[1].publish(&w.mem);
                w.kick(1);
                assert!(w.step(1000));
                (w, 1)
            }
            "bad_avail_index_total" => {
                let mut w = World::new(256, [Policy::Immediate; 2]);
                w.rings[1].force_avail_idx(&w.mem, 1000);
                w.kick(1);
                assert!(w.step(1000));
                (w, 1)
            }
            "tap_errors_total" => {
                let mut w = World::new(256, [Policy::Immediate; 2]);
                // The other end of the "tap" is gone: writes fail (EPIPE).
                w.close_peer();
                w.queue_tx(1);
                w.kick(1);
                assert!(w.step(1000));
                (w, 1)
            }
            "tap_eagain_total" => {
                let mut w = World::new(256, [Policy::Immediate; 2]);
                w.post_rx(4);
                w.kick(0);
                assert!(w.step(1000));
                (w, 0)
            }
            "rx_dropped_frames_total" => {
                let mut w = World::new(256, [Policy::Immediate; 2]);
                w.post_rx(4);
                w.inject(&[0u8; 4]); // shorter than a virtio-net header
                w.kick(0);
                assert!(w.step(1000));
                (w, 0)
            }
            "rx_posted_frames_total" => {
                let mut w = World::new(256, [Policy::Immediate; 2]);
                w.pair.set_tap_io(crate::host::tap::TapIo::Posted);
                w.post_rx(4);
                w.inject(&[0u8; 12 + 60]);
                w.kick(0);
                assert!(w.step(1000));
                (w, 0)
            }
            "rx_dropped_oversize_frames_total" => {
                let mut w = World::new(256, [Policy::Immediate; 2]);
                w.post_rx(4);
                w.inject(&vec![0u8; 12 + 2000]); // above the 1500 MTU
                w.kick(0);
                assert!(w.step(1000));
                (w, 0)
            }
            _ => return None,
        };
        Some(w)
    }

    #[test]
    fn every_counter_moves_when_the_condition_it_names_happens() {
        for field in QueueStats::FIELDS {
            let (w, queue) =
                scenario(field.name).unwrap_or_else(|| panic!("no scenario drives {}", field.name));
            let q = &w.stats.queues[queue];
            let value = match field.kind {
                Kind::Counter(get) => get(q).get(),
                Kind::Histogram(get) => get(q).count(),
            };
            assert!(value > 0, "{} did not move in its scenario", field.name);
            // ... and nothing moved on the other queue's copy of it.
            let other = &w.stats.queues[1 - queue];
            if let Kind::Counter(get) = field.kind {
                if !matches!(field.name, "kicks_total" | "tap_eagain_total") {
                    assert_eq!(
                        get(other).get(),
                        0,
                        "{} moved on the idle queue",
                        field.name
                    );
                }
            }
        }
    }

    #[test]
    fn counters_count_what_they_name_not_just_something() {
        let (w, _) = scenario("frames_total").unwrap();
        let tx = &w.stats.queues[1];
        assert_eq!(tx.frames.get(), 3);
        assert_eq!(tx.bytes.get(), 3 * 60, "frame bytes, header excluded");
        assert_eq!(tx.completions.get(), 3);
        assert_eq!(tx.batches.get(), 1);
        assert_eq!(tx.batch_frames.buckets[2].get(), 1, "one batch of 3: le_4");
        assert_eq!(tx.interrupts_sent.get(), 1);
        let (w, _) = scenario("bad_chains_total").unwrap();
        let tx = &w.stats.queues[1];
        assert_eq!(
            (
                tx.bad_chains.get(),
                tx.completions.get(),
                tx.frames.get(),
                tx.batches.get()
            ),
            (1, 1, 0, 0),
            "returned with length 0, not a frame, in no counted batch"
        );
    }

    #[test]
    fn batch_frames_sum_is_the_frames_of_the_batches_not_their_used_entries() {
        let mut w = World::new(256, [Policy::Immediate; 2]);
        // One batch of three chains: one the device would have to write
        // (refused, returned with length 0), then two frames.
        let refused = Buf {
            addr: buf_addr(0, 2048),
            len: 100,
            device_writes: true,
        };
        let head = w.rings[1].add_chain(&w.mem, &[refused]).unwrap();
        w.rings[1].push_avail(&w.mem, head);

        w.transmit(2);

        let tx = &w.stats.snapshot()[1];
        assert_eq!(tx.get("completions_total"), 3);
        assert_eq!(tx.get("batch_frames_count"), 1);
        assert_eq!(tx.get("batch_frames_sum"), 2, "frames, not used entries");
    }
}
