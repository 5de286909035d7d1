//! `cargo bench --bench netbench` (as root): throughput, packets per
//! interrupt, kicks per packet and latency of the daemon (release build)
//! under a synthetic guest that speaks the real vhost-user protocol and
//! drives its rings as Linux `virtio_net` does, per coalescing policy, frame
//! size and offered load. Prints one table per direction and the bare
//! syscall floor measured in the same run; optionally writes an SVG plot.
//!
//! Directions:
//! - `tx`: guest to tap; the kernel drops the frames (addressed to another
//!   host) right after the tap: a sink.
//! - `rx`: a UDP sender in the namespace to the guest (frames built by the
//!   kernel, one `sendto` each); the guest runs NAPI.
//! - `loop`: guest TX, a tc `mirred` reflector on the tap sends every frame
//!   straight back, guest RX; no third process. 64 KiB GSO frames stay GSO.
//!
//! Options (after `--`): `--secs S` per run (default 1.5), `--quick`
//! (fewer combinations), `--svg PATH` (plot of the loop runs),
//! `--dirty-log` (the guest's dirty log shared and LOG_ALL on, as during a
//! live migration), `--dir`, `--policy`, `--size`, `--max-only` to narrow.
//! `--tap-io uring,syscall` (or the flag repeated) runs a daemon per
//! policy and tap I/O mode, side by side, alternating as the policies do;
//! rows are labelled `POLICY MODE` (without it the daemon runs its
//! default, or `VUN_TAP_IO`).
//!
//! `--peer dpdk` (or `dpdk-signal`: DPDK's `net_tap` left on its RT-signal
//! RX trigger) runs only the side-by-side comparison with DPDK's vhost
//! backend, `--runs N` (at least 3) alternating runs each of `--secs S`:
//! see `harness/src/dpdk.rs`. There `VUN_PEER_ONLY=loop:64,tx` narrows the
//! modes, `VUN_PEER_BASELINE=PATH` alternates a second build of the daemon
//! with ours and DPDK (before/after in one invocation), and
//! `VUN_PEER_PERF=DIR` (with `VUN_PEER_PERF_FLOW=loop` for the loop)
//! records each backend's 64 B runs with `perf record`.

use vhost_user_net_harness as common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::synthetic::{
    frame, now_ns, wait_irq, ExitCosts, Guest, Load, Pacer, Result_, TxState, GUEST_MAC, HDR,
    NAPI_BUDGET, RING, SINK_MAC, TS_AT,
};
use common::{Daemon, Netns, TestFrontend};

const POLICIES: [&str; 3] = ["immediate", "frames=32,usecs=1000", "adaptive"];
/// What an interrupt costs the guest by default, in ns (docs/performance.md
/// cites the measurements behind it).
const IRQ_COST_NS: u64 = 2000;
/// What a kick costs the guest by default, in ns (same source).
const KICK_COST_NS: u64 = 1000;
/// The longest the guest halts waiting for an interrupt before it looks
/// again (a lost interrupt shows as a stall, not a hang).
const WAIT: Duration = Duration::from_millis(10);
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
    Loop,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Tx => "tx",
            Dir::Rx => "rx",
            Dir::Loop => "loop",
        }
    }
}

struct Opts {
    secs: f64,
    runs: usize,
    costs: ExitCosts,
    quick: bool,
    svg: Option<String>,
    dir: Option<String>,
    policies: Vec<String>,
    size: Option<usize>,
    max_only: bool,
    dirty_log: bool,
    peer: Option<String>,
    /// `--tap-io` modes to compare (empty: the daemon's default).
    tap_io: Vec<String>,
}

/// What `--help` prints (see docs/performance.md for what each mode measures).
const USAGE: &str = "usage: cargo bench --bench netbench -- [options]
  --secs S            seconds per measurement (default 1.5)
  --runs N            alternating runs of each combination (medians, ranges, run-by-run verdicts)
  --irq-cost NS       guest CPU per interrupt (default 2000; 0: free)
  --kick-cost NS      guest CPU per kick (default 1000; 0: free)
  --quick             fewer loads and sizes
  --svg PATH          write the packets-per-interrupt plot
  --dir tx|rx|loop    one direction only
  --policy P          a coalescing policy to compare (repeatable; default: all)
  --size N            one frame size only
  --max-only          saturation only (no fixed loads)
  --dirty-log         the guest shares a dirty log (live migration's cost)
  --peer dpdk|dpdk-signal  side by side with DPDK's vhost backend
  --tap-io LIST       tap I/O modes to alternate (uring,syscall,auto)";

fn opts() -> Opts {
    let mut o = Opts {
        secs: 1.5,
        runs: 1,
        costs: ExitCosts {
            irq_ns: IRQ_COST_NS,
            kick_ns: KICK_COST_NS,
        },
        quick: false,
        svg: None,
        dir: None,
        policies: Vec::new(),
        size: None,
        max_only: false,
        dirty_log: false,
        peer: None,
        tap_io: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    // The value after a flag, parsed; `usage` names the flag and its value.
    fn value<T: std::str::FromStr>(args: &mut impl Iterator<Item = String>, usage: &str) -> T {
        args.next().and_then(|v| v.parse().ok()).expect(usage)
    }
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => o.secs = value(&mut args, "--secs S"),
            "--runs" => o.runs = value(&mut args, "--runs N"),
            "--irq-cost" => o.costs.irq_ns = value(&mut args, "--irq-cost NS"),
            "--kick-cost" => o.costs.kick_ns = value(&mut args, "--kick-cost NS"),
            "--quick" => o.quick = true,
            "--svg" => o.svg = args.next(),
            "--dir" => o.dir = args.next(),
            "--policy" => o.policies.extend(args.next()),
            "--size" => o.size = args.next().and_then(|v| v.parse().ok()),
            "--max-only" => o.max_only = true,
            "--dirty-log" => o.dirty_log = true,
            "--peer" => o.peer = args.next(),
            "--tap-io" => o.tap_io.extend(
                args.next()
                    .iter()
                    .flat_map(|v| v.split(',').map(str::to_owned)),
            ),
            "--bench" => {}
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("netbench: unknown option {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    o
}

struct Setup {
    ns: Netns,
    daemon: Daemon,
    guest: Guest,
}

/// The daemon and a synthetic guest on `policy`; with `dirty_log`, the
/// guest shares a dirty log and acks LOG_ALL, as QEMU does for the whole of
/// a live migration (the worst case of its cost).
fn setup(policy: &str, tap_io: Option<&str>, dirty_log: bool, costs: ExitCosts) -> Setup {
    let ns = Netns::new();
    let mut flags = vec!["--rx-coalesce", policy, "--tx-coalesce", policy];
    flags.extend(tap_io.iter().flat_map(|t| ["--tap-io", t]));
    let daemon = Daemon::start(&ns, &flags);
    ns.route_to_guest(&daemon.tap, GUEST_MAC);
    // NETBENCH_IN_ORDER=1: the guest acks VIRTIO_F_IN_ORDER and drives its
    // rings in order (as DPDK's virtio-user does; Linux does not).
    // NETBENCH_NO_GUEST_GSO=1: the guest acks no receive segmentation
    // (TSO, UFO, USO), so its largest frame is one MTU and each of its
    // 4 KiB RX buffers holds one whole: RX reads through the io_uring a
    // round at a time (docs/performance.md, "io_uring tap I/O").
    let drop = if std::env::var_os("NETBENCH_NO_GUEST_GSO").is_some_and(|v| v == "1") {
        use virtio_bindings::virtio_net::{
            VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6,
        };
        [
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_GUEST_USO4,
            VIRTIO_NET_F_GUEST_USO6,
        ]
        .iter()
        .fold(0u64, |m, &b| m | 1 << b)
    } else {
        0
    };
    let mut fe = if std::env::var_os("NETBENCH_IN_ORDER").is_some_and(|v| v == "1") {
        TestFrontend::connect_in_order(&daemon.socket, 1, RING, drop)
    } else {
        TestFrontend::connect(&daemon.socket, 1, RING, drop)
    };
    if dirty_log {
        fe.share_dirty_log();
        fe.set_log_all(true);
    }
    let mut guest = Guest::new(fe);
    guest.costs = costs;
    guest.refill(usize::from(RING));
    Setup { ns, daemon, guest }
}

fn reflector(ns: &Netns, tap: &str, on: bool) {
    if on {
        ns_cmd(ns, &["tc", "qdisc", "add", "dev", tap, "ingress"]);
        ns_cmd(
            ns,
            &[
                "tc", "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "prio",
                "1", "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect",
                "dev", tap,
            ],
        );
    } else {
        ns_cmd(ns, &["tc", "qdisc", "del", "dev", tap, "ingress"]);
    }
}

fn ns_cmd(ns: &Netns, args: &[&str]) {
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .status()
        .expect("spawn");
    assert!(st.success(), "{args:?} failed");
}

/// Frames the kernel dropped on their way into the tap (its queue to us was
/// full): RX the guest never saw.
fn tap_drops(ns: &Netns, tap: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "cat"])
        .arg(format!("/sys/class/net/{tap}/statistics/tx_dropped"))
        .output()
        .expect("spawn");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// CPU time the daemon's threads have used so far, in ns (the scheduler's
/// own accounting in /proc/PID/task/*/schedstat, exact to the ns).
fn daemon_cpu_ns(d: &Daemon) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", d.pid())) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Interrupts and kicks of the RX ring, of the TX ring, and all four summed.
fn daemon_counters(d: &Daemon) -> (u64, u64, u64, u64, u64) {
    let s = d.stats();
    let c = (
        s.get("interrupts_sent_total", 0),
        s.get("kicks_total", 0),
        s.get("interrupts_sent_total", 1),
        s.get("kicks_total", 1),
    );
    (c.0, c.1, c.2, c.3, c.0 + c.1 + c.2 + c.3)
}

/// Guest to tap sink.
fn run_tx(s: &mut Setup, len: usize, load: Load, secs: f64) -> Result_ {
    let f = frame(len, SINK_MAC);
    let g = &mut s.guest;
    let cap = if len > 4096 { 200 } else { usize::from(RING) };
    let mut res = Result_::default();
    let before = daemon_counters(&s.daemon);
    let cpu = daemon_cpu_ns(&s.daemon);
    let deferred = s.daemon.stats().get("interrupts_deferred_total", 1);
    let paid = g.notify_ns;
    let mut pacer = Pacer::new(load);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        // The interrupt schedules TX NAPI, whose poll reclaims (and counts
        // the frames and their completion latency) before the next
        // start_xmit.
        g.take_tx_interrupts();
        g.tx_napi(Some(&mut res), f.len());
        match g.transmit(&mut pacer, &f, cap) {
            TxState::Stopped => wait_irq(g, &[1], WAIT),
            // Paced, idle: an interrupt may come (the guest asked for one
            // at the next completion after its last poll).
            TxState::NotDue(_) => std::hint::spin_loop(),
            TxState::Sent => {}
        }
    }
    res.secs = start.elapsed().as_secs_f64();
    res.deferred = s.daemon.stats().get("interrupts_deferred_total", 1) - deferred;
    res.notify_ns = g.notify_ns - paid;
    res.daemon_cpu_ns = daemon_cpu_ns(&s.daemon) - cpu;
    let after = daemon_counters(&s.daemon);
    res.interrupts = after.2 - before.2;
    res.kicks = after.3 - before.3;
    res.notifications = after.4 - before.4;
    // Drain what is still in flight so the next run starts clean.
    let deadline = Instant::now() + Duration::from_secs(2);
    while g.inflight() > 0 && Instant::now() < deadline {
        g.take_tx_interrupts();
        g.tx_poll(None, f.len());
    }
    res
}

/// UDP from the namespace to the guest; the guest runs NAPI.
fn run_rx(s: &mut Setup, len: usize, load: Load, secs: f64) -> Result_ {
    let payload = len.saturating_sub(42).max(18);
    let sock = s.ns.udp_socket();
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = s.guest.epoch;
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || source(&sock, payload, load, epoch, &stop))
    };
    let mut res = napi_loop(s, secs, &[0], |_| TxState::Stopped);
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    drain_rx(&mut s.guest);
    res.frames = res.frames.max(1);
    res
}

fn source(sock: &UdpSocket, payload: usize, load: Load, epoch: Instant, stop: &AtomicBool) {
    let mut buf = vec![0x5au8; payload];
    let mut pacer = Pacer::new(load);
    while !stop.load(Ordering::Relaxed) {
        let n = pacer.allowed(16);
        for _ in 0..n {
            // UDP payload sits at frame offset 42 (+12 of header = TS_AT).
            buf[12..20].copy_from_slice(&now_ns(epoch).to_le_bytes());
            let _ = sock.send_to(&buf, ("198.18.0.2", 9000));
        }
        pacer.sent += n as u64;
        if n == 0 {
            std::hint::spin_loop();
        }
    }
}

/// NAPI on RX (and, with `tx`, a sender running between polls): RX is
/// processed only after an RX interrupt, a budget per poll, and `used_event`
/// re-armed when a poll comes up short (`virtqueue_napi_complete`). The
/// guest halts (waits for an interrupt) only when it has nothing else to
/// do: nothing to poll and its sender stopped or not due.
fn napi_loop(
    s: &mut Setup,
    secs: f64,
    wait_on: &[usize],
    mut tx: impl FnMut(&mut Guest) -> TxState,
) -> Result_ {
    let g = &mut s.guest;
    let mut res = Result_::default();
    let before = daemon_counters(&s.daemon);
    let cpu = daemon_cpu_ns(&s.daemon);
    let drops = tap_drops(&s.ns, &s.daemon.tap);
    let deferred = s.daemon.stats().get("interrupts_deferred_total", 0);
    let paid = g.notify_ns;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    // The UDP payload timestamp is at frame offset 42 + 12 (+12 header).
    let ts = if wait_on.contains(&1) {
        TS_AT
    } else {
        HDR + 42 + 12
    };
    let mut polling = g.rx_enable_cb();
    while Instant::now() < end {
        let rx_irq = g.take_interrupts(&[0]) > 0;
        g.take_tx_interrupts();
        let sender = tx(g);
        polling |= rx_irq;
        if polling {
            // virtnet_poll: TX completions first (virtnet_poll_cleantx).
            g.poll_cleantx();
            if g.napi_poll(NAPI_BUDGET, &mut res, ts) < NAPI_BUDGET {
                polling = g.rx_enable_cb();
            }
            continue;
        }
        match sender {
            TxState::Sent => {}
            TxState::Stopped => wait_irq(g, wait_on, WAIT),
            TxState::NotDue(d) => wait_irq(g, wait_on, d.min(WAIT)),
        }
    }
    res.secs = start.elapsed().as_secs_f64();
    res.notify_ns = g.notify_ns - paid;
    res.daemon_cpu_ns = daemon_cpu_ns(&s.daemon) - cpu;
    res.tap_drops = tap_drops(&s.ns, &s.daemon.tap) - drops;
    res.deferred = s.daemon.stats().get("interrupts_deferred_total", 0) - deferred;
    let after = daemon_counters(&s.daemon);
    res.interrupts = after.0 - before.0;
    res.kicks = after.1 - before.1;
    res.notifications = after.4 - before.4;
    res
}

fn drain_rx(g: &mut Guest) {
    let mut scratch = Result_::default();
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        g.napi_poll(usize::MAX, &mut scratch, HDR);
    }
}

/// Guest TX reflected by the kernel into guest RX.
fn run_loop(s: &mut Setup, len: usize, load: Load, secs: f64) -> Result_ {
    let tap = s.daemon.tap.clone();
    reflector(&s.ns, &tap, true);
    let f = frame(len, SINK_MAC);
    let cap = if len > 4096 {
        48
    } else {
        usize::from(RING) / 2
    };
    let mut pacer = Pacer::new(load);
    let res = napi_loop(s, secs, &[0, 1], |g| {
        g.tx_napi(None, f.len());
        g.transmit(&mut pacer, &f, cap)
    });
    reflector(&s.ns, &tap, false);
    drain_rx(&mut s.guest);
    res
}

/// The floor: bare `writev` (TX), UDP source into bare `readv` (RX), or
/// `writev` + `readv` through the reflector (loop), one frame per call, on a
/// tap of our own in the same namespace.
fn floor(ns: &Netns, dir: Dir, len: usize, secs: f64) -> f64 {
    let tap = common::unique("fl");
    let f = frame(len, SINK_MAC);
    let q = common::floor::sink_tap(ns, &tap);
    if dir == Dir::Loop {
        reflector(ns, &tap, true);
    }
    if dir == Dir::Rx {
        return rx_floor(ns, &tap, &q, len, secs);
    }
    let mut buf = vec![0u8; 70_000];
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            if (&q).write(&f).is_ok() {
                n += 1;
                if dir == Dir::Loop {
                    while std::io::Read::read(&mut &q, &mut buf).is_err() {}
                }
            }
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let mpps = n as f64 / start.elapsed().as_secs_f64() / 1e6;
    mpps
}

fn rx_floor(ns: &Netns, tap: &str, q: &std::fs::File, len: usize, secs: f64) -> f64 {
    ns.route_to_guest(tap, GUEST_MAC);
    let sock = ns.udp_socket();
    let stop = Arc::new(AtomicBool::new(false));
    let payload = len.saturating_sub(42).max(18);
    let sender = {
        let stop = stop.clone();
        let epoch = Instant::now();
        std::thread::spawn(move || source(&sock, payload, Load::Max, epoch, &stop))
    };
    let mut buf = vec![0u8; 70_000];
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        if std::io::Read::read(&mut &*q, &mut buf).is_ok() {
            n += 1;
        } else {
            let _ = vhost_user_net::host::sys::wait_readable(&[q.as_raw_fd()], 10);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    #[allow(clippy::cast_precision_loss)]
    let mpps = n as f64 / start.elapsed().as_secs_f64() / 1e6;
    mpps
}

struct Row {
    dir: Dir,
    policy: &'static str,
    len: usize,
    load: Load,
    run: usize,
    res: Result_,
}

/// The runs of one (direction, policy, size, load): medians and ranges.
struct Summary {
    dir: Dir,
    policy: &'static str,
    len: usize,
    load: Load,
    mpps: Vec<f64>,
    gbps: f64,
    per_irq: Option<f64>,
    kicks_per: f64,
    notify_ns_per: f64,
    exits_per_sec: f64,
    p50: f64,
    p99: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Summary {
    fn median_mpps(&self) -> f64 {
        median(self.mpps.clone())
    }

    fn of(rows: &mut [Row]) -> Vec<Summary> {
        let mut out: Vec<Summary> = Vec::new();
        // Each combination once, in the order it first ran.
        let mut keys: Vec<(Dir, &'static str, usize, String)> = Vec::new();
        for r in rows.iter() {
            let key = (r.dir, r.policy, r.len, r.load.label());
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        for (dir, policy, len, load) in keys {
            let mut group: Vec<&mut Row> = rows
                .iter_mut()
                .filter(|r| {
                    r.dir == dir && r.policy == policy && r.len == len && r.load.label() == load
                })
                .collect();
            let m = |f: &dyn Fn(&Result_) -> f64, g: &[&mut Row]| {
                median(g.iter().map(|r| f(&r.res)).collect())
            };
            let any_irq = group.iter().any(|r| r.res.interrupts > 0);
            out.push(Summary {
                dir,
                policy,
                len,
                load: group[0].load,
                mpps: group.iter().map(|r| r.res.mpps()).collect(),
                gbps: m(&|r| r.gbps(), &group),
                per_irq: any_irq.then(|| m(&|r| r.per_irq(), &group)),
                kicks_per: m(&|r| r.kicks_per(), &group),
                notify_ns_per: m(&|r| r.notify_ns_per(), &group),
                exits_per_sec: m(&|r| r.exits_per_sec(), &group),
                p50: median(group.iter_mut().map(|r| r.res.pct(50)).collect()),
                p99: median(group.iter_mut().map(|r| r.res.pct(99)).collect()),
            });
        }
        out
    }
}

fn main() {
    let o = opts();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("netbench needs root (network namespaces, taps)");
        std::process::exit(1);
    }
    if let Some(peer) = &o.peer {
        common::dpdk::main(peer, o.runs.max(3), o.secs);
        return;
    }
    let all_sizes: &[usize] = if o.quick {
        &[64, 1514]
    } else {
        &[64, 1514, 65536]
    };
    let sizes: Vec<usize> = all_sizes
        .iter()
        .copied()
        .filter(|l| o.size.is_none_or(|s| s == *l))
        .collect();
    let loads: Vec<Load> = if o.max_only {
        vec![Load::Max]
    } else if o.quick {
        vec![Load::Pps(10_000), Load::Max]
    } else {
        vec![Load::Pps(10_000), Load::Pps(100_000), Load::Max]
    };
    eprintln!(
        "synthetic guest pays {} ns per interrupt and {} ns per kick \
         (--irq-cost/--kick-cost; docs/performance.md says where these come from)",
        o.costs.irq_ns, o.costs.kick_ns
    );
    // One daemon per policy, side by side; the policies take turns in every
    // combination, in a rotating order, so drift hits them alike.
    // With --tap-io, one daemon per policy and mode, labelled "POLICY MODE".
    let modes: Vec<Option<&str>> = if o.tap_io.is_empty() {
        vec![None]
    } else {
        o.tap_io.iter().map(|m| Some(m.as_str())).collect()
    };
    let mut setups: Vec<(&'static str, Setup)> = POLICIES
        .into_iter()
        .filter(|p| o.policies.is_empty() || o.policies.iter().any(|q| q == p))
        .flat_map(|p| modes.iter().map(move |m| (p, *m)))
        .map(|(p, m)| {
            let label: &'static str = match m {
                None => p,
                Some(m) => Box::leak(format!("{p} {m}").into_boxed_str()),
            };
            (label, setup(p, m, o.dirty_log, o.costs))
        })
        .collect();
    let dirs: Vec<Dir> = [Dir::Tx, Dir::Rx, Dir::Loop]
        .into_iter()
        .filter(|d| o.dir.as_deref().is_none_or(|x| x == d.name()))
        .collect();
    let mut rows = Vec::new();
    for run in 0..o.runs {
        for &dir in &dirs {
            for &len in &sizes {
                if dir == Dir::Rx && len > 1514 {
                    continue; // the UDP source cannot make GSO frames
                }
                for &load in &loads {
                    let n = setups.len();
                    for k in 0..n {
                        let (policy, s) = &mut setups[(k + run) % n];
                        let policy = *policy;
                        let res = match dir {
                            Dir::Tx => run_tx(s, len, load, o.secs),
                            Dir::Rx => run_rx(s, len, load, o.secs),
                            Dir::Loop => run_loop(s, len, load, o.secs),
                        };
                        eprintln!(
                            "run {run} {:>4} {policy:<22} {len:>6} B {:>9}: {:.3} Mpps, \
                             {:.1} pkts/irq, {} deferred, {} tap drops, daemon {:.0} ns/pkt",
                            dir.name(),
                            load.label(),
                            res.mpps(),
                            res.per_irq(),
                            res.deferred,
                            res.tap_drops,
                            res.daemon_cpu_ns as f64 / res.frames.max(1) as f64,
                        );
                        rows.push(Row {
                            dir,
                            policy,
                            len,
                            load,
                            run,
                            res,
                        });
                    }
                }
            }
        }
    }
    if o.dirty_log {
        for (policy, s) in &setups {
            // Proof the runs above paid for logging: pages the daemon marked.
            eprintln!(
                "{policy}: {} guest pages marked dirty in the log",
                s.guest.fe.dirty_pages().len()
            );
        }
    }
    drop(setups);
    let ns = Netns::new();
    let floors: Vec<(Dir, usize, f64)> = dirs
        .iter()
        .flat_map(|&d| sizes.iter().map(move |&l| (d, l)))
        .filter(|&(d, l)| d == Dir::Tx || l <= 1514)
        .map(|(d, l)| (d, l, floor(&ns, d, l, o.secs)))
        .collect();
    if dirs.contains(&Dir::Tx) {
        print!("{}", common::floor::cold_tx_report(&ns, &sizes, o.secs));
    }
    let sums = Summary::of(&mut rows);
    print!("{}", report(&sums, &floors, &o));
    print!("{}", by_load(&sums));
    print!("{}", targets(&rows, &sums, &floors));
    if let Some(path) = &o.svg {
        std::fs::write(path, svg(&sums)).expect("write svg");
        eprintln!("plot written to {path}");
    }
}

fn report(sums: &[Summary], floors: &[(Dir, usize, f64)], o: &Opts) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nsyscall floor, same run (tx: one writev per frame; rx: the UDP source into one \
         readv per frame; loop: writev + readv through the reflector):"
    );
    for (d, l, f) in floors {
        let _ = writeln!(out, "  {:<4} {l:>6} B: {f:.3} Mpps", d.name());
    }
    let _ = writeln!(
        out,
        "\nguest notification costs: {} ns per interrupt, {} ns per kick; medians of {} run(s)",
        o.costs.irq_ns, o.costs.kick_ns, o.runs
    );
    for dir in [Dir::Tx, Dir::Rx, Dir::Loop] {
        if !sums.iter().any(|r| r.dir == dir) {
            continue;
        }
        let _ = writeln!(
            out,
            "\n{} ({})",
            dir.name(),
            match dir {
                Dir::Tx => "guest -> tap sink",
                Dir::Rx => "UDP in the namespace -> guest",
                Dir::Loop => "guest -> tap -> mirred reflector -> guest",
            }
        );
        let _ = writeln!(
            out,
            "| policy | frame | offered | Mpps | range | Gbit/s | pkts/irq | kicks/pkt | notif. ns/pkt | notif./s | p50 us | p99 us | vs floor |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in sums.iter().filter(|r| r.dir == dir) {
            let mpps = r.median_mpps();
            let fl = floors
                .iter()
                .find(|(d, l, _)| *d == dir && *l == r.len)
                .map_or("-".to_owned(), |(_, _, f)| format!("{:.2}", mpps / f));
            let per_irq = r.per_irq.map_or("none".to_owned(), |p| format!("{p:.1}"));
            let lo = r.mpps.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.mpps.iter().copied().fold(0.0, f64::max);
            // Reflected GSO frames come back segmented: RX counts segments.
            let segmented = dir == Dir::Loop && r.len > 1514;
            let (mpps, range, fl) = if segmented {
                ("(segments)".to_owned(), "-".to_owned(), "-".to_owned())
            } else {
                (format!("{mpps:.3}"), format!("{lo:.3}-{hi:.3}"), fl)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {mpps} | {range} | {:.2} | {per_irq} | {:.3} | {:.0} | {:.0} | {:.0} | {:.0} | {fl} |",
                r.policy,
                r.len,
                r.load.label(),
                r.gbps,
                r.kicks_per,
                r.notify_ns_per,
                r.exits_per_sec,
                r.p50,
                r.p99,
            );
        }
    }
    out
}

/// Packets per interrupt by policy and load, host to guest and guest to
/// host (the shape of lguest's table), with what would be exits per second
/// and the throughput: one line per direction, size and load.
fn by_load(sums: &[Summary]) -> String {
    let mut policies: Vec<&str> = Vec::new();
    for r in sums {
        if !policies.contains(&r.policy) {
            policies.push(r.policy);
        }
    }
    let mut out = String::from(
        "\npackets per interrupt / notifications per second / Mpps, by policy and load:\n| direction | frame | offered |",
    );
    for p in &policies {
        let _ = write!(out, " {p} |");
    }
    out.push_str("\n|---|---|---|");
    out.push_str(&"---|".repeat(policies.len()));
    out.push('\n');
    let mut seen: Vec<(Dir, usize, String)> = Vec::new();
    for r in sums {
        let key = (r.dir, r.len, r.load.label());
        if seen.contains(&key) {
            continue;
        }
        let label = match r.dir {
            Dir::Rx => "rx (host -> guest)",
            Dir::Tx => "tx (guest -> host)",
            Dir::Loop => "loop",
        };
        let _ = write!(out, "| {label} | {} | {} |", r.len, key.2);
        for p in &policies {
            match sums
                .iter()
                .find(|x| x.policy == *p && (x.dir, x.len, x.load.label()) == key)
            {
                Some(x) => {
                    let per_irq = x.per_irq.map_or("none".to_owned(), |v| format!("{v:.1}"));
                    let _ = write!(
                        out,
                        " {per_irq} / {:.0} / {:.3} |",
                        x.exits_per_sec,
                        x.median_mpps()
                    );
                }
                None => out.push_str(" - |"),
            }
        }
        out.push('\n');
        seen.push(key);
    }
    out
}

/// The targets of the notification work, judged on this run.
fn targets(rows: &[Row], sums: &[Summary], floors: &[(Dir, usize, f64)]) -> String {
    let mut out = String::from("\ntargets (this run):\n");
    let mut line = |text: String, ok: bool| {
        let _ = writeln!(out, "  [{}] {text}", if ok { "met" } else { "MISSED" });
    };
    let find = |dir: Dir, policy: &str, len: usize, max: bool| {
        sums.iter().find(|r| {
            r.dir == dir && r.policy == policy && r.len == len && matches!(r.load, Load::Max) == max
        })
    };
    for dir in [Dir::Tx, Dir::Rx] {
        let floor = floors
            .iter()
            .find(|(d, l, _)| *d == dir && *l == 64)
            .map(|f| f.2);
        if let (Some(r), Some(f)) = (find(dir, "immediate", 64, true), floor) {
            let ratio = r.median_mpps() / f;
            line(
                format!(
                    "{} 64 B at >= 0.95x the syscall floor: {ratio:.2}x",
                    dir.name()
                ),
                ratio >= 0.95,
            );
        }
    }
    // --tap-io uring,syscall: TX 64 B through io_uring against one
    // syscall per frame, per policy, run by run.
    for p in POLICIES {
        let per_run = |mode: &str| {
            let label = format!("{p} {mode}");
            rows.iter()
                .filter(|r| {
                    r.dir == Dir::Tx
                        && r.len == 64
                        && r.policy == label
                        && matches!(r.load, Load::Max)
                })
                .map(|r| (r.run, r.res.mpps()))
                .collect::<Vec<_>>()
        };
        let (uring, syscall) = (per_run("uring"), per_run("syscall"));
        if uring.is_empty() || syscall.is_empty() {
            continue;
        }
        let ratios: Vec<f64> = uring
            .iter()
            .filter_map(|(run, u)| syscall.iter().find(|(r, _)| r == run).map(|(_, s)| u / s))
            .collect();
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        line(
            format!(
                "tx 64 B {p}: io_uring >= 1.3x one syscall per frame: median {median:.2}x (runs: {})",
                ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" ")
            ),
            median >= 1.3,
        );
    }
    let worst_kicks = sums
        .iter()
        .filter(|r| matches!(r.load, Load::Max) && r.len == 64)
        .map(|r| r.kicks_per)
        .fold(0.0, f64::max);
    line(
        format!("<= 0.02 kicks per packet at saturation (64 B): worst {worst_kicks:.3}"),
        worst_kicks <= 0.02,
    );
    for dir in [Dir::Tx, Dir::Rx, Dir::Loop] {
        for len in [64, 1514] {
            let (Some(a), Some(i)) = (
                find(dir, "adaptive", len, true),
                find(dir, "immediate", len, true),
            ) else {
                continue;
            };
            // Run by run: adaptive against immediate of the same run.
            let per_run = |policy: &str| {
                rows.iter()
                    .filter(|r| {
                        r.dir == dir
                            && r.len == len
                            && r.policy == policy
                            && matches!(r.load, Load::Max)
                    })
                    .map(|r| (r.run, r.res.mpps()))
                    .collect::<Vec<_>>()
            };
            let imm = per_run("immediate");
            let wins = per_run("adaptive")
                .iter()
                .filter(|(run, m)| imm.iter().any(|(r2, m2)| r2 == run && m >= m2))
                .count();
            line(
                format!(
                    "{} {len} B adaptive Mpps >= immediate in every run: {wins} of {} ({:.3} vs {:.3} median)",
                    dir.name(),
                    imm.len(),
                    a.median_mpps(),
                    i.median_mpps()
                ),
                wins == imm.len(),
            );
            if let (Some(pa), Some(pi)) = (a.per_irq, i.per_irq) {
                line(
                    format!(
                        "{} {len} B adaptive >= 2x immediate's packets per interrupt: {pa:.1} vs {pi:.1}",
                        dir.name()
                    ),
                    pa >= 2.0 * pi,
                );
            }
        }
        if let (Some(a), Some(i)) = (
            sums.iter().find(|r| {
                r.dir == dir
                    && r.policy == "adaptive"
                    && r.len == 64
                    && matches!(r.load, Load::Pps(10_000))
            }),
            sums.iter().find(|r| {
                r.dir == dir
                    && r.policy == "immediate"
                    && r.len == 64
                    && matches!(r.load, Load::Pps(10_000))
            }),
        ) {
            line(
                format!(
                    "{} 64 B adaptive p50 at 10k pps <= 1.05x immediate: {:.1} vs {:.1} us",
                    dir.name(),
                    a.p50,
                    i.p50
                ),
                a.p50 <= i.p50 * 1.05,
            );
        }
    }
    out
}

/// A two-panel SVG: packets per interrupt and Mpps against offered load,
/// one line per policy, for the 64-byte loop runs.
fn svg(rows: &[Summary]) -> String {
    let pick: Vec<&Summary> = rows
        .iter()
        .filter(|r| r.dir == Dir::Loop && r.len == 64)
        .collect();
    let loads: Vec<String> = {
        let mut v: Vec<String> = pick.iter().map(|r| r.load.label()).collect();
        v.dedup();
        v.truncate(pick.len() / POLICIES.len().max(1));
        v
    };
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    let (w, h, pad) = (420.0, 260.0, 50.0);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='11'>\n",
        2.0 * w,
        h + 40.0
    );
    for (panel, (title, value)) in [
        (
            "packets per interrupt",
            (|r: &Summary| r.per_irq.unwrap_or(0.0)) as fn(&Summary) -> f64,
        ),
        ("Mpps", |r: &Summary| r.median_mpps()),
    ]
    .iter()
    .enumerate()
    {
        #[allow(clippy::cast_precision_loss)]
        let x0 = panel as f64 * w;
        let max = pick
            .iter()
            .map(|r| value(r))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.1;
        let _ = writeln!(
            out,
            "<text x='{}' y='15'>loop, 64 B: {title}</text>",
            x0 + pad
        );
        let _ = writeln!(
            out,
            "<rect x='{}' y='25' width='{}' height='{}' fill='none' stroke='#888'/>",
            x0 + pad,
            w - 1.5 * pad,
            h - pad
        );
        let _ = writeln!(out, "<text x='{}' y='35'>{max:.2}</text>", x0 + 5.0);
        #[allow(clippy::cast_precision_loss)]
        let xs =
            |i: usize| x0 + pad + (i as f64 + 0.5) * (w - 1.5 * pad) / loads.len().max(1) as f64;
        for (i, l) in loads.iter().enumerate() {
            let _ = writeln!(
                out,
                "<text x='{}' y='{}' text-anchor='middle'>{l}</text>",
                xs(i),
                h
            );
        }
        for (pi, policy) in POLICIES.iter().enumerate() {
            let pts: Vec<String> = pick
                .iter()
                .filter(|r| r.policy == *policy)
                .enumerate()
                .map(|(i, r)| {
                    format!(
                        "{:.1},{:.1}",
                        xs(i),
                        25.0 + (h - pad) * (1.0 - value(r) / max)
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "<polyline points='{}' fill='none' stroke='{}' stroke-width='2'/>",
                pts.join(" "),
                colors[pi % 3]
            );
            #[allow(clippy::cast_precision_loss)]
            let ly = h + 15.0 + 0.0 * pi as f64;
            #[allow(clippy::cast_precision_loss)]
            let lx = x0 + pad + pi as f64 * 130.0;
            let _ = writeln!(
                out,
                "<text x='{lx}' y='{ly}' fill='{}'>{policy}</text>",
                colors[pi % 3]
            );
        }
    }
    out.push_str("</svg>\n");
    out
}
