//! What is counted, per virtqueue, with the unit in every name.
//!
//! Counters are relaxed atomics written only by the queue's worker thread and
//! read by anyone (the stats socket, the exit report). They are cumulative for
//! the life of the daemon, across frontend reconnects. `docs/metrics.md`
//! documents each one; [`QueueStats::FIELDS`] is the single list that the
//! text formats and that document are checked against.

pub mod client;

use std::fmt::Write as _;
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
    /// Batches that completed at least one chain.
    pub batches: Counter,
    /// Used-ring entries written (frames plus chains returned with length 0).
    pub completions: Counter,
    /// Interrupts sent to the guest (call eventfd written).
    pub interrupts_sent: Counter,
    /// Batches after which the guest's event index (or NO_INTERRUPT flag)
    /// said no interrupt was wanted.
    pub interrupts_suppressed: Counter,
    /// Batches whose interrupt a coalescing policy held back (always 0
    /// with the `immediate` policy).
    pub interrupts_deferred: Counter,
    /// Batch sizes, one counter per bucket of [`BATCH_BUCKETS`].
    pub batch_frames_hist: [Counter; BATCH_BUCKETS.len()],
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
    /// (TX: the frame is dropped).
    pub tap_errors: Counter,
    /// Tap reads (RX: tap empty) or writes (TX: tap full) that returned EAGAIN.
    pub tap_eagain: Counter,
}

/// How a counter is exposed: a plain counter or the histogram.
pub enum Kind {
    Counter(fn(&QueueStats) -> &Counter),
    Histogram,
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
            "Batches that completed at least one chain."
        ),
        counter!(
            "completions_total",
            completions,
            "Used-ring entries written."
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
        Field {
            name: "batch_frames",
            help: "Frames completed per batch.",
            kind: Kind::Histogram,
        },
    ];

    /// Records one batch of `frames` completions.
    pub fn record_batch(&self, frames: u64) {
        if frames == 0 {
            return;
        }
        self.batches.inc();
        let bucket = BATCH_BUCKETS
            .iter()
            .position(|&bound| frames <= bound)
            .expect("the last bucket is unbounded");
        self.batch_frames_hist[bucket].inc();
    }
}

/// Counters of every queue of the device: queue `2i` is pair `i`'s RX,
/// queue `2i + 1` its TX (the virtio-net numbering).
#[derive(Debug)]
pub struct Stats {
    pub queues: Vec<QueueStats>,
    /// Coalescing policy of each direction, `[rx, tx]`, as configured.
    pub policies: [String; 2],
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
        }
    }

    /// The counters in Prometheus text format (`# HELP`/`# TYPE` lines,
    /// one sample per queue, labels `queue` and `dir`).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let info = "vhost_user_net_coalesce_policy_info";
        let _ = writeln!(
            out,
            "# HELP {info} Interrupt coalescing policy of the queue (value 1)."
        );
        let _ = writeln!(out, "# TYPE {info} gauge");
        for q in 0..self.queues.len() {
            let policy = &self.policies[q % 2];
            let _ = writeln!(
                out,
                "{info}{{queue=\"{q}\",dir=\"{}\",policy=\"{policy}\"}} 1",
                direction(q)
            );
        }
        for field in QueueStats::FIELDS {
            let name = format!("vhost_user_net_{}", field.name);
            let kind = match field.kind {
                Kind::Counter(_) => "counter",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}", field.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (q, stats) in self.queues.iter().enumerate() {
                let labels = format!("queue=\"{q}\",dir=\"{}\"", direction(q));
                match field.kind {
                    Kind::Counter(get) => {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", get(stats).get());
                    }
                    Kind::Histogram => write_histogram(&mut out, &name, &labels, stats),
                }
            }
        }
        out
    }

    /// A short human summary per queue, with the derived ratios
    /// (frames per interrupt, kicks per frame).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (q, s) in self.queues.iter().enumerate() {
            let frames = s.frames.get();
            let irqs = s.interrupts_sent.get();
            let kicks = s.kicks.get();
            let _ = writeln!(
                out,
                "queue {q} ({}): frames={frames} bytes={} kicks={kicks} interrupts={irqs} \
                 suppressed={} frames/interrupt={} kicks/frame={} bad_chains={} \
                 rx_dropped={} rx_oversize={} tap_errors={} tap_eagain={}",
                direction(q),
                s.bytes.get(),
                s.interrupts_suppressed.get(),
                ratio(frames, irqs),
                ratio(kicks, frames),
                s.bad_chains.get(),
                s.rx_dropped_frames.get(),
                s.rx_dropped_oversize_frames.get(),
                s.tap_errors.get(),
                s.tap_eagain.get(),
            );
        }
        out
    }
}

/// The counters of one queue as read back from the text format.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueSnapshot {
    pub queue: usize,
    pub dir: String,
    pub policy: String,
    /// `name` (without prefix) to value; histogram buckets as `batch_frames_le_N`.
    pub values: std::collections::BTreeMap<String, u64>,
}

impl QueueSnapshot {
    pub fn get(&self, name: &str) -> u64 {
        self.values.get(name).copied().unwrap_or(0)
    }
}

/// Parses what [`Stats::prometheus`] writes (as served by the stats socket).
pub fn parse(text: &str) -> Vec<QueueSnapshot> {
    let mut queues: Vec<QueueSnapshot> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix("vhost_user_net_") else {
            continue;
        };
        let (Some(open), Some(close)) = (rest.find('{'), rest.rfind('}')) else {
            continue;
        };
        let name = &rest[..open];
        let labels = &rest[open + 1..close];
        let value = rest[close + 1..].trim();
        let label = |key: &str| label_value(labels, key);
        let Some(q) = label("queue").and_then(|q| q.parse::<usize>().ok()) else {
            continue;
        };
        while queues.len() <= q {
            let queue = queues.len();
            queues.push(QueueSnapshot {
                queue,
                ..QueueSnapshot::default()
            });
        }
        let entry = &mut queues[q];
        entry.dir = label("dir").unwrap_or_default();
        if name == "coalesce_policy_info" {
            entry.policy = label("policy").unwrap_or_default();
            continue;
        }
        let key = match label("le") {
            Some(le) => format!("{name}_le_{le}"),
            None => name.to_owned(),
        };
        if let Ok(v) = value.parse() {
            entry.values.insert(key, v);
        }
    }
    queues
}

/// The value of `key` in a label set `a="x",b="y,z"` (values may contain
/// commas; ours never contain quotes).
fn label_value(labels: &str, key: &str) -> Option<String> {
    let mut rest = labels;
    while let Some(eq) = rest.find("=\"") {
        let k = rest[..eq].trim_start_matches(',');
        let after = &rest[eq + 2..];
        let end = after.find('"')?;
        if k == key {
            return Some(after[..end].to_owned());
        }
        rest = &after[end + 1..];
    }
    None
}

/// A table of the counters per queue. With `since` (an earlier snapshot
/// and the time between), frames, bytes, kicks and interrupts are rates per
/// second and the ratios cover that interval only.
pub fn table(now: &[QueueSnapshot], since: Option<(&[QueueSnapshot], f64)>) -> String {
    let mut out = String::new();
    let rate = since.is_some();
    let _ = writeln!(
        out,
        "{:<5} {:<3} {:>12} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}  policy",
        "queue",
        "dir",
        if rate { "frames/s" } else { "frames" },
        if rate { "Mbit/s" } else { "bytes" },
        if rate { "kicks/s" } else { "kicks" },
        if rate { "irqs/s" } else { "irqs" },
        "suppressed",
        "deferred",
        "pkts/irq",
        "kicks/pkt",
        "drops",
        "bad",
        "tap_err",
    );
    for q in now {
        let prev = since.and_then(|(p, _)| p.iter().find(|x| x.queue == q.queue));
        let d = |name: &str| q.get(name) - prev.map_or(0, |p| p.get(name)).min(q.get(name));
        let secs = since.map_or(1.0, |(_, s)| s.max(1e-9));
        #[allow(clippy::cast_precision_loss)]
        let per_s = |v: u64| v as f64 / secs;
        let (frames, bytes, kicks, irqs) = (
            d("frames_total"),
            d("bytes_total"),
            d("kicks_total"),
            d("interrupts_sent_total"),
        );
        let fmt = |v: u64| {
            if rate {
                format!("{:.0}", per_s(v))
            } else {
                v.to_string()
            }
        };
        let bytes_col = if rate {
            format!("{:.1}", per_s(bytes) * 8.0 / 1e6)
        } else {
            bytes.to_string()
        };
        let _ = writeln!(
            out,
            "{:<5} {:<3} {:>12} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}  {}",
            q.queue,
            q.dir,
            fmt(frames),
            bytes_col,
            fmt(kicks),
            fmt(irqs),
            d("interrupts_suppressed_total"),
            d("interrupts_deferred_total"),
            ratio(frames, irqs),
            ratio(kicks, frames),
            d("rx_dropped_frames_total") + d("rx_dropped_oversize_frames_total"),
            d("bad_chains_total"),
            d("tap_errors_total"),
            q.policy,
        );
    }
    let _ = writeln!(
        out,
        "batch sizes (frames per batch, batches in each bucket):"
    );
    for q in now {
        let prev = since.and_then(|(p, _)| p.iter().find(|x| x.queue == q.queue));
        let mut last = 0;
        let mut cells = Vec::new();
        for bound in BATCH_BUCKETS {
            let le = if bound == u64::MAX {
                "+Inf".to_owned()
            } else {
                bound.to_string()
            };
            let key = format!("batch_frames_bucket_le_{le}");
            let cum = q.get(&key) - prev.map_or(0, |p| p.get(&key)).min(q.get(&key));
            cells.push(format!("<={le}:{}", cum.saturating_sub(last)));
            last = cum;
        }
        let _ = writeln!(out, "  queue {} {}: {}", q.queue, q.dir, cells.join(" "));
    }
    out
}

fn ratio(num: u64, den: u64) -> String {
    if den == 0 {
        "-".to_owned()
    } else {
        #[allow(clippy::cast_precision_loss)]
        let r = num as f64 / den as f64;
        format!("{r:.2}")
    }
}

fn write_histogram(out: &mut String, name: &str, labels: &str, stats: &QueueStats) {
    let mut cumulative = 0;
    for (bound, count) in BATCH_BUCKETS.iter().zip(&stats.batch_frames_hist) {
        cumulative += count.get();
        let le = if *bound == u64::MAX {
            "+Inf".to_owned()
        } else {
            bound.to_string()
        };
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", stats.completions.get());
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::notify::Policy;
    use crate::testing::driver::{Desc, DESC_F_WRITE};
    use crate::testing::unit::buf_addr;
    use crate::testing::unit::world::World;

    #[test]
    fn batch_of_one_and_of_hundred_land_in_first_and_last_bucket() {
        let s = QueueStats::default();
        s.record_batch(1);
        s.record_batch(100);
        s.record_batch(0);
        assert_eq!(s.batches.get(), 2);
        assert_eq!(s.batch_frames_hist[0].get(), 1);
        assert_eq!(s.batch_frames_hist[7].get(), 1);
    }

    #[test]
    fn prometheus_text_has_help_type_and_one_sample_per_queue() {
        let stats = Stats::new(2, ["adaptive,usecs=250".into(), "immediate".into()]);
        stats.queues[1].frames.add(5);
        let text = stats.prometheus();
        assert!(text.contains("# HELP vhost_user_net_frames_total "));
        assert!(text.contains("# TYPE vhost_user_net_frames_total counter"));
        assert!(text.contains("vhost_user_net_frames_total{queue=\"1\",dir=\"tx\"} 5"));
        assert!(text.contains("vhost_user_net_frames_total{queue=\"0\",dir=\"rx\"} 0"));
        assert!(text
            .contains("vhost_user_net_batch_frames_bucket{queue=\"0\",dir=\"rx\",le=\"+Inf\"} 0"));
    }

    #[test]
    fn text_format_parses_back_into_the_same_counters() {
        let stats = Stats::new(2, ["immediate".into(), "frames=32,usecs=1000".into()]);
        stats.queues[1].frames.add(7);
        stats.queues[1].interrupts_sent.add(2);
        stats.queues[0].record_batch(3);

        let snap = parse(&stats.prometheus());

        assert_eq!(snap.len(), 2);
        assert_eq!(snap[1].get("frames_total"), 7);
        assert_eq!(snap[1].dir, "tx");
        assert_eq!(snap[1].policy, "frames=32,usecs=1000");
        assert_eq!(snap[0].get("batch_frames_bucket_le_4"), 1);
        let t = table(&snap, None);
        assert!(t.contains("3.50"), "frames per interrupt in:\n{t}");
    }

    #[test]
    fn watch_table_shows_rates_over_the_interval() {
        let before = parse(&Stats::new(2, ["immediate".into(), "immediate".into()]).prometheus());
        let stats = Stats::new(2, ["immediate".into(), "immediate".into()]);
        stats.queues[1].frames.add(500);
        stats.queues[1].bytes.add(500 * 1000);
        let after = parse(&stats.prometheus());

        let t = table(&after, Some((&before, 0.5)));

        assert!(t.contains("frames/s"));
        assert!(t.contains(" 1000 "), "500 frames in 0.5 s:\n{t}");
        assert!(t.contains(" 8.0 "), "500 kB in 0.5 s = 8 Mbit/s:\n{t}");
    }

    #[test]
    fn every_field_is_documented_in_metrics_md() {
        let doc = include_str!("../../docs/metrics.md");
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
                Kind::Histogram => q.batch_frames_hist.iter().map(Counter::get).sum(),
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
        assert_eq!(tx.batch_frames_hist[2].get(), 1, "one batch of 3: le_4");
        assert_eq!(tx.interrupts_sent.get(), 1);
        let (w, _) = scenario("bad_chains_total").unwrap();
        let tx = &w.stats.queues[1];
        assert_eq!(
            (tx.bad_chains.get(), tx.completions.get(), tx.frames.get()),
            (1, 1, 0),
            "returned with length 0, not a frame"
        );
    }
}
