//! The counters' text formats: the Prometheus text the stats socket and
//! `--prometheus` serve ([`Stats::prometheus`]), its parser ([`parse`]),
//! and the human table of the `stats` command ([`table`]).
//!
//! Knows the counters only through [`QueueStats::FIELDS`] (plus the
//! histogram's layout); nothing about the data path or sockets.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::stats::{direction, Histogram, Kind, QueueStats, Stats, BATCH_BUCKETS, DEVICE_FIELDS};

impl Stats {
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
        let info = "vhost_user_net_tap_io_info";
        let _ = writeln!(
            out,
            "# HELP {info} How the queue moves frames to or from the tap (--tap-io): posted (RX reads posted ahead), uring or syscall (value 1)."
        );
        let _ = writeln!(out, "# TYPE {info} gauge");
        for q in 0..self.queues.len() {
            let _ = writeln!(
                out,
                "{info}{{queue=\"{q}\",dir=\"{}\",mode=\"{}\"}} 1",
                direction(q),
                self.tap_io(q)
            );
        }
        for (name, help, get) in DEVICE_FIELDS {
            let name = format!("vhost_user_net_{name}");
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", get(self).get());
        }
        for field in QueueStats::FIELDS {
            let name = format!("vhost_user_net_{}", field.name);
            let kind = match field.kind {
                Kind::Counter(_) => "counter",
                Kind::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}", field.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (q, stats) in self.queues.iter().enumerate() {
                let labels = format!("queue=\"{q}\",dir=\"{}\"", direction(q));
                match field.kind {
                    Kind::Counter(get) => {
                        let _ = writeln!(out, "{name}{{{labels}}} {}", get(stats).get());
                    }
                    Kind::Histogram(get) => write_histogram(&mut out, &name, &labels, get(stats)),
                }
            }
        }
        out
    }

    /// The counters now, per queue, as the `stats` command reads them: the
    /// Prometheus text parsed back, so [`table`] shows the exit report and
    /// `stats` from the same figures.
    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        parse(&self.prometheus())
    }
}

/// The counters of one queue as read back from the text format.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueSnapshot {
    pub queue: usize,
    pub dir: String,
    pub policy: String,
    /// How the queue moves frames to or from the tap: `uring` or `syscall`.
    pub tap_io: String,
    /// `name` (without prefix) to value; histogram buckets as `batch_frames_le_N`.
    pub values: BTreeMap<String, u64>,
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
        if name == "tap_io_info" {
            entry.tap_io = label("mode").unwrap_or_default();
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

/// The daemon-wide counters (samples without labels) in Prometheus text,
/// by name without the `vhost_user_net_` prefix.
pub fn parse_device(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| l.strip_prefix("vhost_user_net_"))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
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

/// A table of the counters per queue: what `stats` prints, and the exit
/// report (of the final [`Stats::snapshot`]). With `since` (an earlier snapshot
/// and the time between), frames, bytes, kicks and interrupts are rates per
/// second and the ratios cover that interval only.
pub fn table(now: &[QueueSnapshot], since: Option<(&[QueueSnapshot], f64)>) -> String {
    let mut out = String::new();
    let rate = since.is_some();
    let _ = writeln!(
        out,
        "{:<5} {:<3} {:>12} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:<7}  policy",
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
        "tap_io",
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
            "{:<5} {:<3} {:>12} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:<7}  {}",
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
            q.tap_io,
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
            let le = le_label(bound);
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

/// The `le` label of a histogram bucket's upper bound.
fn le_label(bound: u64) -> String {
    if bound == u64::MAX {
        "+Inf".to_owned()
    } else {
        bound.to_string()
    }
}

fn write_histogram(out: &mut String, name: &str, labels: &str, histogram: &Histogram) {
    let mut cumulative = 0;
    for (bound, count) in BATCH_BUCKETS.iter().zip(&histogram.buckets) {
        cumulative += count.get();
        let le = le_label(*bound);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", histogram.sum.get());
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
