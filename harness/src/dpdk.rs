//! DPDK's vhost backend as a peer: one third-party frontend (DPDK
//! `testpmd` with `net_virtio_user`, polling, on CPU 0) drives, in turn,
//! DPDK's vhost PMD forwarding into a kernel tap (`testpmd` io forwarding
//! between `net_vhost` and `net_tap`, polling on CPU 1) and our daemon on a
//! kernel tap (pinned to CPU 1), in a namespace of the harness.
//!
//! Rates are counter deltas over measured time, read from the kernel's
//! counters of the tap (the same referee for both backends): TX counts the
//! frames the backend wrote into the tap, loop the frames the backend took
//! back out of it (a tc `mirred` reflector on the tap sends every frame
//! back). `testpmd`'s printed rates are not used: its 1 s stats loop skips
//! ticks.
//!
//! Every process is stopped by PID (SIGINT, then SIGKILL) and DPDK's runtime
//! directory removed on drop, also when a run panics.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{unique, Daemon, Netns};

/// How to install what the peer needs (Debian 12, DPDK 22.11).
pub const INSTALL_HINT: &str = "apt-get update && apt-get install -y --no-install-recommends \
     dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-net-tap23 librte-net-null23";

/// An `LD_PRELOAD` shim for the backend `testpmd`: asked (with no new
/// action) about a real-time signal, `sigaction` says it is ignored, i.e.
/// taken. `net_tap` then finds no free signal for its per-packet RX trigger
/// and polls its tap with `readv`, as our daemon's worker and DPDK's other
/// PMDs do. Every other call goes to libc.
const SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <string.h>

int sigaction(int sig, const struct sigaction *act, struct sigaction *old)
{
	static int (*next)(int, const struct sigaction *, struct sigaction *);

	if (act == NULL && old != NULL && sig >= SIGRTMIN && sig <= SIGRTMAX) {
		memset(old, 0, sizeof(*old));
		old->sa_handler = SIG_IGN;
		return 0;
	}
	if (next == NULL)
		next = dlsym(RTLD_NEXT, "sigaction");
	return next(sig, act, old);
}
"#;

/// What `net_tap` logs when it found no signal and polls.
const POLLING_LINE: &str = "No Rx trigger signal available";

/// Which backend a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// DPDK's vhost PMD + `net_tap`, io forwarding in `testpmd`.
    Dpdk,
    /// Our daemon (the release build cargo made for the benchmark).
    Ours,
    /// Another build of our daemon, `VUN_PEER_BASELINE=PATH`: alternated
    /// with the others run by run, to compare two builds in one invocation.
    Baseline,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Dpdk => "DPDK vhost+net_tap",
            Backend::Ours => "vhost-user-net",
            Backend::Baseline => "baseline build",
        }
    }
}

/// What the frontend sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// `txonly` into the tap; the kernel drops the frames (not for it).
    Tx,
    /// `flowgen` through the tap and a `mirred` reflector back to the frontend.
    Loop,
}

impl Flow {
    pub fn name(self) -> &'static str {
        match self {
            Flow::Tx => "tx",
            Flow::Loop => "loop",
        }
    }
}

/// DPDK found on this machine, with a scratch directory for sockets,
/// outputs and the shim.
pub struct Dpdk {
    testpmd: PathBuf,
    dir: tempfile::TempDir,
    /// The built shim, or why there is none (then `net_tap` uses signals).
    shim: Result<PathBuf, String>,
}

impl Dpdk {
    /// `dpdk-testpmd` from `PATH`; with `poll_tap`, the polling shim built
    /// with `cc`. `Err` says what is missing and how to install it.
    pub fn find(poll_tap: bool) -> Result<Dpdk, String> {
        let testpmd = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("dpdk-testpmd"))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!("dpdk-testpmd is not installed; install DPDK: {INSTALL_HINT}")
            })?;
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let shim = if poll_tap {
            build_shim(dir.path())
        } else {
            Err("not asked for (--peer dpdk-signal)".to_owned())
        };
        Ok(Dpdk { testpmd, dir, shim })
    }

    /// Whether the backend's `net_tap` is made to poll (the shim was built).
    pub fn polls_tap(&self) -> bool {
        self.shim.is_ok()
    }

    /// Which `net_tap` RX variant the backend runs, for the report.
    pub fn tap_variant(&self) -> String {
        match &self.shim {
            Ok(_) => "polling (readv; RT-signal trigger disabled by an LD_PRELOAD sigaction \
                      shim built with cc at bench time)"
                .to_owned(),
            Err(why) => format!("one RT signal per packet (net_tap's default; no shim: {why})"),
        }
    }
}

fn build_shim(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("tap-poll-shim.c");
    let so = dir.join("tap-poll-shim.so");
    std::fs::write(&src, SHIM_C).map_err(|e| format!("write the shim: {e}"))?;
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
        .map_err(|e| format!("cc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(so)
}

/// A process, stopped by PID on drop: SIGINT (testpmd prints its final
/// counters and frees its ports), SIGKILL after 10 s.
struct Proc {
    child: Option<Child>,
    out: PathBuf,
    /// DPDK's runtime directory of this `--file-prefix`, removed on drop.
    runtime: Option<PathBuf>,
}

impl Proc {
    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Stops the process (if it runs) and returns everything it printed.
    fn stop(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
            let _ = kill(pid, Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(dir) = &self.runtime {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.output()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Dpdk {
    /// Starts `testpmd` in `ns` with EAL arguments `eal` and application
    /// arguments `app`, its output in the scratch directory.
    fn testpmd(&self, ns: &Netns, name: &str, eal: &[&str], app: &[&str], shim: bool) -> Proc {
        let prefix = unique(name);
        let out = self.dir.path().join(format!("{prefix}.out"));
        let log = File::create(&out).expect("testpmd output file");
        let err = log.try_clone().expect("clone output file");
        let prefix_arg = format!("--file-prefix={prefix}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(&self.testpmd)
            .args(["--no-pci", "--no-huge", "-m", "512", &prefix_arg])
            .args(eal)
            .arg("--")
            .args(["--nb-cores=1", "--burst=32", "--stats-period", "1"])
            .args(["--total-num-mbufs=16384"])
            .args(app)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if let (true, Ok(so)) = (shim, &self.shim) {
            cmd.env("LD_PRELOAD", so);
        }
        let child = cmd.spawn().expect("spawn dpdk-testpmd");
        Proc {
            child: Some(child),
            out,
            runtime: Some(Path::new("/var/run/dpdk").join(prefix)),
        }
    }
}

/// The backend of one run, stopped on drop.
enum Running {
    Dpdk(Proc),
    Ours(Daemon),
}

/// With `VUN_PEER_PERF=DIR`, a `perf record` of the backend process over
/// the counted time of each TX 64 B run, into
/// `DIR/<backend>-tx64-<n>.data`; `perf report -i FILE --no-children
/// --sort symbol` shows where the backend's CPU went.
fn profile(dpdk: &Dpdk, backend: Backend, flow: Flow, len: usize, pid: u32) -> Option<Proc> {
    let dir = PathBuf::from(std::env::var_os("VUN_PEER_PERF")?);
    // VUN_PEER_PERF_FLOW=loop profiles the loop's 64 B runs instead.
    let wanted = match std::env::var("VUN_PEER_PERF_FLOW").as_deref() {
        Ok("loop") => Flow::Loop,
        _ => Flow::Tx,
    };
    if flow != wanted || len != 64 {
        return None;
    }
    let tag = match backend {
        Backend::Dpdk => "dpdk",
        Backend::Ours => "ours",
        Backend::Baseline => "baseline",
    };
    let data = dir.join(format!("{tag}-{}64-{}.data", flow.name(), unique("")));
    let out = dpdk.dir.path().join(format!("{}.perf.out", unique("p")));
    let log = File::create(&out).expect("perf output file");
    let child = Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "4999",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&data)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone output file"))
        .stderr(log)
        .spawn()
        .map_err(|e| eprintln!("perf record: {e}"))
        .ok()?;
    eprintln!("perf record of {} into {}", backend.name(), data.display());
    Some(Proc {
        child: Some(child),
        out,
        runtime: None,
    })
}

/// One measured run.
#[derive(Clone, Debug)]
pub struct Run {
    pub backend: Backend,
    pub flow: Flow,
    pub len: usize,
    /// Frames counted over `secs`.
    pub frames: u64,
    pub secs: f64,
    /// Loop only, over the frontend's whole life: (frames the backend took
    /// from the tap, frames the frontend received). The difference is
    /// frames the backend dropped, or still in the frontend's RX ring
    /// (at most its 256 entries) when it stopped.
    pub delivered: Option<(u64, u64)>,
    /// The feature line the backend logged for this connection.
    pub features: String,
    /// Which `net_tap` variant the DPDK backend logged (None for ours).
    pub polling: Option<bool>,
    /// Share of the counted time the backend's and the frontend's threads
    /// waited to run (other work on the CPUs): the run's noise.
    pub waited: (f64, f64),
    /// CPU time the backend's threads used over the counted time.
    pub backend_cpu_ns: u64,
    /// Our daemon in the loop: share of its RX frames read through reads
    /// posted ahead (`rx_posted_frames_total` / `frames_total`).
    pub rx_posted: Option<f64>,
    /// Our daemon (either build): TX kicks per frame, frames per batch.
    pub notifications: Option<Notifications>,
}

impl Run {
    /// Backend CPU time per frame (a polling backend also spends it on
    /// empty polls, so it is an upper bound for DPDK's).
    pub fn cpu_ns_per_frame(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let v = self.backend_cpu_ns as f64 / self.frames.max(1) as f64;
        v
    }

    pub fn mpps(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let f = self.frames as f64;
        f / self.secs / 1e6
    }
}

/// `(rx_packets, tx_packets)` of interface `dev` in `ns` (the kernel's
/// view: rx = written into the tap by its user, tx = read from it), from
/// `/proc/thread-self/net/dev` on a thread inside the namespace.
pub fn tap_packets(ns: &Netns, dev: &str) -> Option<(u64, u64)> {
    let dev = format!("{dev}:");
    ns.within(move || {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev").ok()?;
        let line = text.lines().find(|l| l.trim_start().starts_with(&dev))?;
        let fields: Vec<u64> = line
            .trim_start()
            .strip_prefix(&dev)?
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        Some((*fields.get(1)?, *fields.get(9)?))
    })
}

/// The counter that measures `flow`, with the time it was read (the middle
/// of the read).
fn sample(ns: &Netns, tap: &str, flow: Flow) -> (Instant, u64) {
    let before = Instant::now();
    let (rx, tx) = tap_packets(ns, tap).expect("tap counters");
    let after = Instant::now();
    let at = before + (after - before) / 2;
    (at, if flow == Flow::Tx { rx } else { tx })
}

fn ns_run(ns: &Netns, args: &[&str]) {
    let mut all = vec!["netns", "exec", &ns.name];
    all.extend_from_slice(args);
    crate::run("ip", &all);
}

/// A tc `mirred` reflector on `tap`: every frame the tap's user writes
/// is sent straight back to it.
fn reflector(ns: &Netns, tap: &str) {
    ns_run(ns, &["tc", "qdisc", "replace", "dev", tap, "ingress"]);
    ns_run(
        ns,
        &[
            "tc", "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1",
            "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", tap,
        ],
    );
}

/// `name: N` in a `testpmd` counter line (the last such line: the
/// accumulated forward statistics printed on exit).
fn last_counter(out: &str, name: &str) -> Option<u64> {
    out.lines()
        .rev()
        .filter(|l| l.contains("-dropped:"))
        .find_map(|l| {
            let rest = l.split(name).nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
}

fn wait_until(
    what: &str,
    secs: u64,
    mut ok: impl FnMut() -> bool,
    alive: &mut dyn FnMut() -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(alive(), "{what}: the process exited");
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `backend` in `ns`; returns it, its socket and its tap.
fn start_backend(dpdk: &Dpdk, ns: &Netns, backend: Backend) -> (Running, PathBuf, String) {
    match backend {
        Backend::Dpdk => {
            let sock = dpdk.dir.path().join(format!("{}.sock", unique("vh")));
            let tap = unique("dt");
            let vhost = format!("net_vhost0,iface={},queues=1", sock.display());
            let tap_dev = format!("net_tap0,iface={tap}");
            // Lcore 1 (CPU 1) forwards; the main lcore (CPU 0) only
            // prints stats once a second.
            let mut p = dpdk.testpmd(
                ns,
                "vb",
                &[
                    "-l",
                    "0,1",
                    "--main-lcore",
                    "0",
                    "--vdev",
                    &vhost,
                    "--vdev",
                    &tap_dev,
                ],
                &["--forward-mode=io"],
                true,
            );
            wait_until(
                "the DPDK backend's socket and tap",
                60,
                || sock.exists() && tap_packets(ns, &tap).is_some(),
                &mut || p.alive(),
            );
            (Running::Dpdk(p), sock, tap)
        }
        Backend::Ours | Backend::Baseline => {
            let d = match baseline().filter(|_| backend == Backend::Baseline) {
                Some(bin) => Daemon::start_binary(ns, &bin, &[]),
                None => Daemon::start(ns, &[]),
            };
            // Every thread on CPU 1; the workers, started when the
            // frontend sets up its rings, inherit it.
            crate::run("taskset", &["-a", "-c", "-p", "1", &d.pid().to_string()]);
            let (sock, tap) = (d.socket.clone(), d.tap.clone());
            (Running::Ours(d), sock, tap)
        }
    }
}

/// `VUN_PEER_BASELINE`: a second build of the daemon to alternate with.
fn baseline() -> Option<PathBuf> {
    std::env::var_os("VUN_PEER_BASELINE").map(PathBuf::from)
}

/// `VUN_PEER_ONLY=FLOW[:LEN],...` (e.g. `loop:64`): run only those modes.
fn selected(flow: Flow, len: usize) -> bool {
    let Ok(only) = std::env::var("VUN_PEER_ONLY") else {
        return true;
    };
    only.split(',').any(|m| {
        let mut p = m.trim().split(':');
        p.next() == Some(flow.name()) && p.next().is_none_or(|l| l == len.to_string())
    })
}

/// One run: `backend` serves the frontend's `flow` of `len`-byte frames;
/// counted for `secs` after the traffic started and a 0.5 s warm-up.
pub fn run(dpdk: &Dpdk, ns: &Netns, backend: Backend, flow: Flow, len: usize, secs: f64) -> Run {
    let (mut running, sock, tap) = start_backend(dpdk, ns, backend);
    if flow == Flow::Loop {
        reflector(ns, &tap);
    }
    let (_, start_count) = sample(ns, &tap, flow);
    let virtio = format!("net_virtio_user0,path={},queues=1", sock.display());
    let mode = match flow {
        Flow::Tx => "--forward-mode=txonly",
        Flow::Loop => "--forward-mode=flowgen",
    };
    let txpkts = format!("--txpkts={len}");
    // Lcore 0 (CPU 0) sends; the main lcore (CPU 1) prints stats.
    let mut fe = dpdk.testpmd(
        ns,
        "vf",
        &["-l", "0,1", "--main-lcore", "1", "--vdev", &virtio],
        &[mode, &txpkts],
        false,
    );
    wait_until(
        "traffic through the tap",
        60,
        || sample(ns, &tap, flow).1 > start_count,
        &mut || fe.alive(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let pid = match &mut running {
        Running::Dpdk(p) => p.child.as_ref().map_or(0, Child::id),
        Running::Ours(d) => u32::try_from(d.pid().as_raw()).expect("pid"),
    };
    let fe_pid = fe.child.as_ref().map_or(0, Child::id);
    let mut perf = profile(dpdk, backend, flow, len, pid);
    let (be0, fe0) = (sched_ns(pid), sched_ns(fe_pid));
    let (t0, c0) = sample(ns, &tap, flow);
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (t1, c1) = sample(ns, &tap, flow);
    let (be1, fe1) = (sched_ns(pid), sched_ns(fe_pid));
    let window = (t1 - t0).as_secs_f64() * 1e9;
    #[allow(clippy::cast_precision_loss)]
    let waited = (
        be1.1.saturating_sub(be0.1) as f64 / window,
        fe1.1.saturating_sub(fe0.1) as f64 / window,
    );
    let backend_cpu_ns = be1.0.saturating_sub(be0.0);
    if let Some(p) = perf.as_mut() {
        p.stop();
    }
    assert!(fe.alive(), "the frontend exited: {}", fe.output());
    let fe_out = fe.stop();
    let (_, end_count) = sample(ns, &tap, flow);
    let delivered = (flow == Flow::Loop).then(|| {
        let got = last_counter(&fe_out, "RX-packets:").unwrap_or(0);
        (end_count - start_count, got)
    });
    let mut rx_posted = None;
    let mut notifications = None;
    let (features, polling) = match &mut running {
        Running::Dpdk(p) => {
            let out = p.stop();
            let f = out
                .lines()
                .find(|l| l.contains("negotiated Virtio features"))
                .map_or(String::new(), |l| {
                    l.rsplit(':').next().unwrap_or("").trim().to_owned()
                });
            (f, Some(out.contains(POLLING_LINE)))
        }
        Running::Ours(d) => {
            let f = d
                .log()
                .lines()
                .find_map(|l| l.split("features acked: ").nth(1))
                .and_then(|l| l.split_whitespace().next())
                .unwrap_or("")
                .to_owned();
            let s = d.stats();
            #[allow(clippy::cast_precision_loss)]
            let per = |a: u64, b: u64| a as f64 / b.max(1) as f64;
            let (rx_frames, tx_frames) = (s.get("frames_total", 0), s.get("frames_total", 1));
            notifications = Some(Notifications {
                tx_kicks_per_frame: per(s.get("kicks_total", 1), tx_frames),
                rx_frames_per_batch: per(rx_frames, s.get("batches_total", 0)),
                tx_frames_per_batch: per(tx_frames, s.get("batches_total", 1)),
            });
            // (A baseline build may predate the counter.)
            if flow == Flow::Loop && backend == Backend::Ours {
                rx_posted = Some(per(s.get("rx_posted_frames_total", 0), rx_frames));
            }
            (f, None)
        }
    };
    drop(running);
    Run {
        backend,
        flow,
        len,
        frames: c1 - c0,
        secs: (t1 - t0).as_secs_f64(),
        delivered,
        features,
        polling,
        waited,
        backend_cpu_ns,
        rx_posted,
        notifications,
    }
}

/// Our daemon's kicks and batches over its life (warm-up included).
#[derive(Clone, Copy, Debug)]
pub struct Notifications {
    pub tx_kicks_per_frame: f64,
    pub rx_frames_per_batch: f64,
    pub tx_frames_per_batch: f64,
}

/// Nanoseconds the threads of process `pid` have spent on a CPU and
/// runnable but not running (`/proc/PID/task/*/schedstat`, first and second
/// fields): what the process used, and how much other work took from it.
fn sched_ns(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| {
            let mut f = s.split_whitespace().map(|v| v.parse::<u64>().ok());
            Some((f.next()??, f.next()??))
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// The virtio feature bits in `hex` (e.g. `0x950008000`) by name.
pub fn feature_names(hex: &str) -> String {
    let Some(bits) = hex
        .strip_prefix("0x")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
    else {
        return "?".to_owned();
    };
    let name = |bit: u32| match bit {
        0 => "CSUM".to_owned(),
        1 => "GUEST_CSUM".to_owned(),
        5 => "MAC".to_owned(),
        15 => "MRG_RXBUF".to_owned(),
        17 => "CTRL_VQ".to_owned(),
        22 => "MQ".to_owned(),
        28 => "INDIRECT_DESC".to_owned(),
        29 => "EVENT_IDX".to_owned(),
        30 => "PROTOCOL_FEATURES".to_owned(),
        32 => "VERSION_1".to_owned(),
        35 => "IN_ORDER".to_owned(),
        other => format!("bit {other}"),
    };
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(name)
        .collect::<Vec<_>>()
        .join(" ")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The whole comparison: for each flow and size, `runs` runs of each
/// backend, alternating (ABBA order, so a drift in the machine's load hits
/// both alike); prints each run as it ends and returns the summary.
pub fn bench(dpdk: &Dpdk, runs: usize, secs: f64) -> String {
    let ns = Netns::new();
    let mut all = Vec::new();
    for flow in [Flow::Tx, Flow::Loop] {
        for len in [64, 1500] {
            if !selected(flow, len) {
                continue;
            }
            for i in 0..runs {
                let mut order = vec![Backend::Dpdk, Backend::Ours];
                if baseline().is_some() {
                    order.push(Backend::Baseline);
                }
                if i % 2 == 1 {
                    order.reverse();
                }
                for backend in order {
                    let r = run(dpdk, &ns, backend, flow, len, secs);
                    let extra = r.delivered.map_or(String::new(), |(read, got)| {
                        #[allow(clippy::cast_precision_loss)]
                        let share = got as f64 / read.max(1) as f64;
                        format!(", delivered/read {share:.3}")
                    }) + &r
                        .rx_posted
                        .map_or(String::new(), |p| format!(", RX posted {:.0}%", p * 100.0))
                        + &r.notifications.map_or(String::new(), |n| {
                            format!(
                                ", TX kicks/frame {:.3}, frames/batch RX {:.1} TX {:.1}",
                                n.tx_kicks_per_frame, n.rx_frames_per_batch, n.tx_frames_per_batch
                            )
                        });
                    eprintln!(
                        "peer {:<4} {len:>4} B run {} {:<18}: {:.3} Mpps ({} frames in {:.2} s{extra}; \
                         waited to run: backend {:.0}%, frontend {:.0}%; backend CPU {:.0} ns/frame)",
                        flow.name(),
                        i + 1,
                        backend.name(),
                        r.mpps(),
                        r.frames,
                        r.secs,
                        r.waited.0 * 100.0,
                        r.waited.1 * 100.0,
                        r.cpu_ns_per_frame(),
                    );
                    all.push(r);
                }
            }
        }
    }
    summary(dpdk, &all, runs, secs)
}

fn summary(dpdk: &Dpdk, all: &[Run], runs: usize, secs: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nside by side with DPDK's vhost backend ({runs} alternating runs each, {secs} s counted \
         per run; frontend: testpmd net_virtio_user on CPU 0; backend on CPU 1; rates from the \
         tap's kernel counters)"
    );
    let _ = writeln!(out, "net_tap RX: {}", dpdk.tap_variant());
    let logged: Vec<bool> = all.iter().filter_map(|r| r.polling).collect();
    let _ = writeln!(
        out,
        "net_tap logged \"{POLLING_LINE}\" in {} of {} DPDK runs",
        logged.iter().filter(|p| **p).count(),
        logged.len()
    );
    for b in [Backend::Dpdk, Backend::Ours, Backend::Baseline] {
        if let Some(r) = all.iter().find(|r| r.backend == b) {
            let _ = writeln!(
                out,
                "features the frontend acked with {}: {} = {}",
                b.name(),
                r.features,
                feature_names(&r.features)
            );
        }
    }
    let _ = writeln!(
        out,
        "| mode | frame | DPDK runs (Mpps) | DPDK median [range] | ours runs (Mpps) | ours median [range] | ours / DPDK | backend CPU ns/frame, DPDK / ours (median) | backend + frontend waited to run, DPDK / ours (median) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for flow in [Flow::Tx, Flow::Loop] {
        for len in [64, 1500] {
            let pick = |b: Backend| -> Vec<f64> {
                all.iter()
                    .filter(|r| r.backend == b && r.flow == flow && r.len == len)
                    .map(Run::mpps)
                    .collect()
            };
            let (mut d, mut o) = (pick(Backend::Dpdk), pick(Backend::Ours));
            if d.is_empty() || o.is_empty() {
                continue;
            }
            let list = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let wait = |b: Backend| {
                let mut w: Vec<f64> = all
                    .iter()
                    .filter(|r| r.backend == b && r.flow == flow && r.len == len)
                    .map(|r| r.waited.0 + r.waited.1)
                    .collect();
                median(&mut w) * 100.0
            };
            let (wd, wo) = (wait(Backend::Dpdk), wait(Backend::Ours));
            let cost = |b: Backend| {
                let mut c: Vec<f64> = all
                    .iter()
                    .filter(|r| r.backend == b && r.flow == flow && r.len == len)
                    .map(Run::cpu_ns_per_frame)
                    .collect();
                median(&mut c)
            };
            let (cd, co) = (cost(Backend::Dpdk), cost(Backend::Ours));
            let (dl, ol) = (list(&d), list(&o));
            let (md, mo) = (median(&mut d), median(&mut o));
            let range = |v: &[f64]| format!("[{:.3}–{:.3}]", v[0], v[v.len() - 1]);
            let _ = writeln!(
                out,
                "| {} | {len} B | {dl} | {md:.3} {} | {ol} | {mo:.3} {} | {:.2} | {cd:.0} / {co:.0} | {wd:.0}% / {wo:.0}% |",
                flow.name(),
                range(&d),
                range(&o),
                mo / md
            );
            let mut b = pick(Backend::Baseline);
            if !b.is_empty() {
                let bl = list(&b);
                let mb = median(&mut b);
                let _ = writeln!(
                    out,
                    "| {} | {len} B | baseline build | {bl} | {mb:.3} {} | baseline / DPDK {:.2}, ours / baseline {:.2} | CPU ns/frame {:.0} | waited {:.0}% |",
                    flow.name(),
                    range(&b),
                    mb / md,
                    mo / mb,
                    cost(Backend::Baseline),
                    wait(Backend::Baseline)
                );
            }
        }
    }
    out
}

/// `netbench --peer PEER`: `dpdk` (net_tap polling, the fair variant) or
/// `dpdk-signal` (net_tap's own RT-signal trigger). Without DPDK, says how
/// to install it and returns.
pub fn main(peer: &str, runs: usize, secs: f64) {
    let poll_tap = match peer {
        "dpdk" => true,
        "dpdk-signal" => false,
        other => panic!("unknown peer {other}: use --peer dpdk or --peer dpdk-signal"),
    };
    let dpdk = match Dpdk::find(poll_tap) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipping the DPDK peer: {why}");
            return;
        }
    };
    eprintln!("net_tap RX: {}", dpdk.tap_variant());
    let report = bench(&dpdk, runs, secs);
    let ns = Netns::new();
    print!("{}", crate::floor::cold_tx_report(&ns, &[64, 1500], secs));
    print!("{report}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_accumulated_forward_counters() {
        let out = "  RX-packets: 5          RX-missed: 0          RX-bytes:  0\n\
                   \x20 RX-packets: 7              RX-dropped: 1             RX-total: 8\n\
                   \x20 TX-packets: 9              TX-dropped: 2             TX-total: 11\n";
        assert_eq!(last_counter(out, "RX-packets:"), Some(7));
        assert_eq!(last_counter(out, "TX-dropped:"), Some(2));
    }

    #[test]
    fn names_the_features_a_polling_frontend_acks() {
        assert_eq!(
            feature_names("0x950008000"),
            "MRG_RXBUF INDIRECT_DESC PROTOCOL_FEATURES VERSION_1 IN_ORDER"
        );
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert!((median(&mut [3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
        assert!((median(&mut [4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-12);
    }
}
