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
    frame, now_ns, wait_irq, Guest, Load, Pacer, Result_, GUEST_MAC, HDR, NAPI_BUDGET, RING,
    SINK_MAC, TS_AT,
};
use common::{Daemon, Netns, TestFrontend};

const POLICIES: [&str; 3] = ["immediate", "frames=32,usecs=1000", "adaptive"];
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
    quick: bool,
    svg: Option<String>,
    dir: Option<String>,
    policy: Option<String>,
    size: Option<usize>,
    max_only: bool,
    dirty_log: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        secs: 1.5,
        quick: false,
        svg: None,
        dir: None,
        policy: None,
        size: None,
        max_only: false,
        dirty_log: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => o.secs = args.next().and_then(|v| v.parse().ok()).expect("--secs S"),
            "--quick" => o.quick = true,
            "--svg" => o.svg = args.next(),
            "--dir" => o.dir = args.next(),
            "--policy" => o.policy = args.next(),
            "--size" => o.size = args.next().and_then(|v| v.parse().ok()),
            "--max-only" => o.max_only = true,
            "--dirty-log" => o.dirty_log = true,
            "--bench" => {}
            other => panic!(
                "unknown option {other}: use --secs S, --quick, --svg PATH, \
                 --dir tx|rx|loop, --policy P, --size N, --max-only, --dirty-log"
            ),
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
fn setup(policy: &str, dirty_log: bool) -> Setup {
    let ns = Netns::new();
    let daemon = Daemon::start(&ns, &["--rx-coalesce", policy, "--tx-coalesce", policy]);
    ns.route_to_guest(&daemon.tap, GUEST_MAC);
    let mut fe = TestFrontend::connect(&daemon.socket, 1, RING, 0);
    if dirty_log {
        fe.share_dirty_log();
        fe.set_log_all(true);
    }
    let mut guest = Guest::new(fe);
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

fn daemon_counters(d: &Daemon) -> (u64, u64, u64, u64) {
    let s = d.stats();
    (
        s.get("interrupts_sent_total", 0),
        s.get("kicks_total", 0),
        s.get("interrupts_sent_total", 1),
        s.get("kicks_total", 1),
    )
}

/// Guest to tap sink.
fn run_tx(s: &mut Setup, len: usize, load: Load, secs: f64) -> Result_ {
    let f = frame(len, SINK_MAC);
    let g = &mut s.guest;
    let cap = if len > 4096 { 200 } else { usize::from(RING) };
    let mut res = Result_::default();
    let before = daemon_counters(&s.daemon);
    let _ = g.interrupts(1);
    let mut pacer = Pacer::new(load);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        g.reclaim(Some(&mut res), f.len());
        if g.transmit(&mut pacer, &f, cap) {
            wait_irq(g, &[1], 10);
        } else if matches!(load, Load::Pps(_)) {
            std::hint::spin_loop();
        }
    }
    res.secs = start.elapsed().as_secs_f64();
    let after = daemon_counters(&s.daemon);
    res.interrupts = after.2 - before.2;
    res.kicks = after.3 - before.3;
    // Drain what is still in flight so the next run starts clean.
    let deadline = Instant::now() + Duration::from_secs(2);
    while g.inflight() > 0 && Instant::now() < deadline {
        g.reclaim(None, f.len());
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
    let mut res = napi_loop(s, secs, &[0], |_, _| {});
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

/// NAPI on RX (and, with `tx`, a sender between polls): wait for an
/// interrupt, poll up to the budget, re-arm `used_event` when done.
fn napi_loop(
    s: &mut Setup,
    secs: f64,
    wait_on: &[usize],
    mut tx: impl FnMut(&mut Guest, bool),
) -> Result_ {
    let g = &mut s.guest;
    let mut res = Result_::default();
    let before = daemon_counters(&s.daemon);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut polling = false;
    // The UDP payload timestamp is at frame offset 42 + 12 (+12 header).
    let ts = if wait_on.contains(&1) {
        TS_AT
    } else {
        HDR + 42 + 12
    };
    while Instant::now() < end {
        tx(g, polling);
        if !polling {
            if g.rx_enable_cb() {
                polling = true;
            } else {
                wait_irq(g, wait_on, 10);
                let _ = g.interrupts(0);
                polling = true;
            }
        }
        let done = g.napi_poll(NAPI_BUDGET, &mut res, ts);
        if done < NAPI_BUDGET {
            polling = false;
        }
    }
    res.secs = start.elapsed().as_secs_f64();
    let after = daemon_counters(&s.daemon);
    res.interrupts = after.0 - before.0;
    res.kicks = after.1 - before.1;
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
    let res = napi_loop(s, secs, &[0, 1], |g, _| {
        g.reclaim(None, f.len());
        g.transmit(&mut pacer, &f, cap);
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
    let q = ns.within({
        let name = tap.clone();
        move || {
            let t = vhost_user_net::host::tap::Tap::open(&name, 1, None).expect("floor tap");
            t.into_queues().pop().expect("one queue")
        }
    });
    vhost_user_net::host::tap::set_offloads(&q, libc::TUN_F_CSUM | libc::TUN_F_TSO4)
        .expect("offloads");
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
    res: Result_,
}

fn main() {
    let o = opts();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("netbench needs root (network namespaces, taps)");
        std::process::exit(1);
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
    let mut rows = Vec::new();
    for policy in POLICIES
        .into_iter()
        .filter(|p| o.policy.as_deref().is_none_or(|q| q == *p))
    {
        let mut s = setup(policy, o.dirty_log);
        let dirs = [Dir::Tx, Dir::Rx, Dir::Loop];
        for dir in dirs
            .into_iter()
            .filter(|d| o.dir.as_deref().is_none_or(|x| x == d.name()))
        {
            for &len in &sizes {
                if dir == Dir::Rx && len > 1514 {
                    continue; // the UDP source cannot make GSO frames
                }
                for &load in &loads {
                    let res = match dir {
                        Dir::Tx => run_tx(&mut s, len, load, o.secs),
                        Dir::Rx => run_rx(&mut s, len, load, o.secs),
                        Dir::Loop => run_loop(&mut s, len, load, o.secs),
                    };
                    eprintln!(
                        "{:>4} {policy:<22} {len:>6} B {:>9}: {:.3} Mpps",
                        dir.name(),
                        load.label(),
                        res.mpps()
                    );
                    rows.push(Row {
                        dir,
                        policy,
                        len,
                        load,
                        res,
                    });
                }
            }
        }
        if o.dirty_log {
            // Proof the runs above paid for logging: pages the daemon marked.
            eprintln!(
                "{policy}: {} guest pages marked dirty in the log",
                s.guest.fe.dirty_pages().len()
            );
        }
    }
    let ns = Netns::new();
    let floors: Vec<(Dir, usize, f64)> = [Dir::Tx, Dir::Rx, Dir::Loop]
        .iter()
        .filter(|d| o.dir.as_deref().is_none_or(|x| x == d.name()))
        .flat_map(|&d| sizes.iter().map(move |&l| (d, l)))
        .filter(|&(d, l)| d == Dir::Tx || l <= 1514)
        .map(|(d, l)| (d, l, floor(&ns, d, l, o.secs)))
        .collect();
    print!("{}", report(&mut rows, &floors));
    print!("{}", targets(&mut rows, &floors));
    if let Some(path) = &o.svg {
        std::fs::write(path, svg(&rows)).expect("write svg");
        eprintln!("plot written to {path}");
    }
}

fn report(rows: &mut [Row], floors: &[(Dir, usize, f64)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nsyscall floor, same run (tx: one writev per frame; rx: the UDP source into one \
         readv per frame; loop: writev + readv through the reflector):"
    );
    for (d, l, f) in floors {
        let _ = writeln!(out, "  {:<4} {l:>6} B: {f:.3} Mpps", d.name());
    }
    for dir in [Dir::Tx, Dir::Rx, Dir::Loop] {
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
            "| policy | frame | offered | Mpps | Gbit/s | pkts/irq | kicks/pkt | p50 us | p99 us | vs floor |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for r in rows.iter_mut().filter(|r| r.dir == dir) {
            let fl = floors
                .iter()
                .find(|(d, l, _)| *d == dir && *l == r.len)
                .map_or("-".to_owned(), |(_, _, f)| {
                    format!("{:.2}", r.res.mpps() / f)
                });
            let (p50, p99) = (r.res.pct(50), r.res.pct(99));
            let per_irq = if r.res.interrupts == 0 {
                "none".to_owned()
            } else {
                format!("{:.1}", r.res.per_irq())
            };
            // Reflected GSO frames come back segmented: RX counts segments.
            let segmented = dir == Dir::Loop && r.len > 1514;
            let (mpps, fl) = if segmented {
                ("(segments)".to_owned(), "-".to_owned())
            } else {
                (format!("{:.3}", r.res.mpps()), fl)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {mpps} | {:.2} | {per_irq} | {:.3} | {:.0} | {:.0} | {fl} |",
                r.policy,
                r.len,
                r.load.label(),
                r.res.gbps(),
                r.res.kicks_per(),
                p50,
                p99,
            );
        }
    }
    out
}

/// The targets, judged on this run's rows (64-byte frames).
fn targets(rows: &mut [Row], floors: &[(Dir, usize, f64)]) -> String {
    let mut out = String::from("\ntargets (64 B, this run):\n");
    let find = |rows: &[Row], dir: Dir, policy: &str, max: bool| {
        rows.iter().position(|r| {
            r.dir == dir && r.policy == policy && r.len == 64 && matches!(r.load, Load::Max) == max
        })
    };
    let mut line = |text: String, ok: bool| {
        let _ = writeln!(out, "  [{}] {text}", if ok { "met" } else { "MISSED" });
    };
    for dir in [Dir::Tx, Dir::Rx] {
        let floor = floors
            .iter()
            .find(|(d, l, _)| *d == dir && *l == 64)
            .map(|f| f.2);
        if let (Some(i), Some(f)) = (find(rows, dir, "immediate", true), floor) {
            let ratio = rows[i].res.mpps() / f;
            line(
                format!("{} at >= 0.95x the syscall floor: {ratio:.2}x", dir.name()),
                ratio >= 0.95,
            );
        }
    }
    let sat: Vec<&Row> = rows
        .iter()
        .filter(|r| matches!(r.load, Load::Max) && r.len == 64)
        .collect();
    let worst_kicks = sat.iter().map(|r| r.res.kicks_per()).fold(0.0, f64::max);
    line(
        format!("<= 0.02 kicks per packet at saturation: worst {worst_kicks:.3}"),
        worst_kicks <= 0.02,
    );
    for r in sat
        .iter()
        .filter(|r| r.dir != Dir::Tx && r.res.interrupts > 0)
    {
        let ppi = r.res.per_irq();
        line(
            format!(
                "{} {} >= 64 packets per interrupt at saturation: {ppi:.1}",
                r.dir.name(),
                r.policy
            ),
            ppi >= 64.0 - 0.5,
        );
    }
    for dir in [Dir::Tx, Dir::Rx, Dir::Loop] {
        let low = |rows: &mut [Row], policy: &str| {
            let i = rows.iter().position(|r| {
                r.dir == dir
                    && r.policy == policy
                    && r.len == 64
                    && matches!(r.load, Load::Pps(10_000))
            })?;
            Some(rows[i].res.pct(50))
        };
        if let (Some(a), Some(b)) = (low(rows, "adaptive"), low(rows, "immediate")) {
            line(
                format!(
                    "{} adaptive p50 at 10k pps <= 1.05x immediate: {a:.0} vs {b:.0} us",
                    dir.name()
                ),
                a <= b * 1.05,
            );
        }
        if let (Some(a), Some(b)) = (
            find(rows, dir, "adaptive", true),
            find(rows, dir, "immediate", true),
        ) {
            let (ta, tb) = (rows[a].res.mpps(), rows[b].res.mpps());
            line(
                format!(
                    "{} adaptive throughput >= immediate: {ta:.3} vs {tb:.3} Mpps",
                    dir.name()
                ),
                ta >= tb,
            );
        }
    }
    out
}

/// A two-panel SVG: packets per interrupt and Mpps against offered load,
/// one line per policy, for the 64-byte loop runs.
fn svg(rows: &[Row]) -> String {
    let pick: Vec<&Row> = rows
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
            (|r: &Row| r.res.per_irq()) as fn(&Row) -> f64,
        ),
        ("Mpps", |r: &Row| r.res.mpps()),
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
