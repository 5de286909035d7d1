//! End to end with QEMU and a real Linux guest (its `virtio_net` driver):
//! ping and 64 MiB TCP transfers both ways with offloads on, two queue pairs,
//! QEMU 10 (MSI-X) and Debian 12's QEMU 7.2 (`vectors=0`), backend restart,
//! QEMU restart, client mode, UDP GSO sends both ways with the daemon's USO
//! offer seen by QEMU; and, under each interrupt coalescing
//! policy, RX surviving VM pause/resume (QMP `stop`/`cont`) and a backend
//! restart under RX load.
//!
//! Needs root, QEMU 10, QEMU 7.2 and the guest image: `.ci/install-deps.sh`
//! installs them. `#[ignore]`d for a plain `cargo test`; CI runs them with
//! `--include-ignored`. Guests run one at a time (TCG on a 2-core machine).

use vhost_user_net_harness as common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::qemu::{Chardev, Guest, Options, Qemu, Version};
use common::{Daemon, Mode, Netns, Stats};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const HOST_IP: &str = "198.18.0.1";
const GUEST_IP: &str = "198.18.0.2";
const GUEST_CIDR: &str = "198.18.0.2/24";
const TRANSFER_MIB: usize = 64;
const LONG: Duration = Duration::from_secs(300);
const SHORT: Duration = Duration::from_secs(30);

/// One guest at a time: TCG guests on two cores starve each other.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A host process killed (by PID) on drop.
struct Proc(Child);

impl Proc {
    /// Waits for the process to exit, at most `limit` (a stalled transfer
    /// must fail the test, not hang it); panics with `what` after that.
    fn wait_within(&mut self, limit: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_ns(ns: &Netns, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]).args(args);
    c
}

fn md5_of(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("md5sum output")
        .to_owned()
}

/// The tap gets 198.18.0.1/24 inside the namespace.
fn address_tap(ns: &Netns, tap: &str) {
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
}

fn ping_from_namespace(ns: &Netns, count: u32) {
    let out = in_ns(
        ns,
        &[
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-W",
            "2",
            "-q",
            GUEST_IP,
        ],
    )
    .output()
    .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("{count} received, 0% packet loss")),
        "ping namespace -> guest: {text}"
    );
}

fn ping_from_guest(g: &mut Guest, count: u32) {
    let out = g.ok(&format!("ping -c {count} -i 0.02 -W 2 -q {HOST_IP}"), LONG);
    assert!(
        out.contains(&format!("{count} packets received, 0% packet loss")),
        "ping guest -> namespace: {out}"
    );
}

/// Waits until the namespace reaches the guest (e.g. after a restart),
/// then a second more: a guest that has just come back lost one ping in 20
/// in one CI run (seen once, right after boot; the 100-ping checks on a
/// settled guest have not lost any).
fn wait_reachable(ns: &Netns) {
    assert!(
        reachable_within(ns, Duration::from_secs(60)).is_some(),
        "guest never became reachable again"
    );
    std::thread::sleep(Duration::from_secs(1));
}

/// How long until one ping from the namespace is answered, if within `limit`.
fn reachable_within(ns: &Netns, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let ok = in_ns(ns, &["ping", "-c", "1", "-W", "1", "-q", GUEST_IP])
            .stdout(Stdio::null())
            .status()
            .expect("ping")
            .success();
        if ok {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
    }
}

/// `ping` from the namespace to the guest, running in the background until
/// [`BackgroundPing::finish`]; killed by PID on drop.
struct BackgroundPing {
    proc: Proc,
    started: Instant,
    interval: Duration,
    output: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// What a [`BackgroundPing`] saw.
struct PingResult {
    transmitted: u32,
    received: u32,
    /// Sequence numbers (from 1) that were never answered.
    lost: Vec<u32>,
    interval: Duration,
}

impl BackgroundPing {
    /// Pings every `interval` with `size` bytes of payload.
    fn start(ns: &Netns, interval: Duration, size: u32) -> BackgroundPing {
        // To a file, not a pipe: nothing reads it while ping runs.
        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("ping.out");
        let out = std::fs::File::create(&output).expect("ping output");
        let child = in_ns(
            ns,
            &[
                "ping",
                "-n",
                "-i",
                &format!("{:.3}", interval.as_secs_f64()),
                "-s",
                &size.to_string(),
                GUEST_IP,
            ],
        )
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("ping");
        BackgroundPing {
            proc: Proc(child),
            started: Instant::now(),
            interval,
            output,
            _dir: dir,
        }
    }

    /// Time since the first ping was sent.
    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops ping as Ctrl-C does (SIGINT: it prints its summary) and reads
    /// its counts. Replies still in flight at that moment count as lost.
    fn finish(mut self) -> PingResult {
        let pid = Pid::from_raw(i32::try_from(self.proc.0.id()).expect("pid"));
        kill(pid, Signal::SIGINT).expect("SIGINT to ping");
        self.proc.wait_within(SHORT, "ping ignored SIGINT");
        let text = std::fs::read_to_string(&self.output).expect("ping output");
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary in:\n{text}"));
        // "240 packets transmitted, 238 received, [+N errors, ]0.8% packet loss, time ..."
        let count = |what: &str| -> u32 {
            summary
                .split(',')
                .find(|f| f.trim_end().ends_with(what))
                .and_then(|f| f.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no '{what}' in ping summary: {summary}"))
        };
        let (transmitted, received) = (count("packets transmitted"), count("received"));
        let answered: std::collections::BTreeSet<u32> = text
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.split("icmp_seq=").nth(1))
            .filter_map(|r| r.split_whitespace().next())
            .filter_map(|n| n.parse().ok())
            .collect();
        let lost = (1..=transmitted)
            .filter(|s| !answered.contains(s))
            .collect();
        PingResult {
            transmitted,
            received,
            lost,
            interval: self.interval,
        }
    }
}

impl PingResult {
    fn loss_percent(&self) -> f64 {
        100.0 * f64::from(self.transmitted - self.received.min(self.transmitted))
            / f64::from(self.transmitted.max(1))
    }

    /// The unanswered pings as runs of sequence numbers, e.g. `#19-214`
    /// (ping sends one every interval while it is answered; it slows down
    /// while the guest's address does not resolve).
    fn lost_runs(&self) -> String {
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &s in &self.lost {
            match runs.last_mut() {
                Some((_, end)) if *end + 1 == s => *end = s,
                _ => runs.push((s, s)),
            }
        }
        let shown: Vec<String> = runs
            .iter()
            .take(10)
            .map(|&(a, b)| {
                if a == b {
                    format!("#{a}")
                } else {
                    format!("#{a}-{b}")
                }
            })
            .collect();
        let more = runs.len().saturating_sub(shown.len());
        let tail = if more > 0 {
            format!(" and {more} more runs")
        } else {
            String::new()
        };
        format!("{}{tail}", shown.join(", "))
    }
}

impl std::fmt::Display for PingResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1}% of {} pings (every {} ms) lost",
            self.loss_percent(),
            self.transmitted,
            self.interval.as_millis()
        )?;
        if !self.lost.is_empty() {
            write!(f, ": {}", self.lost_runs())?;
        }
        Ok(())
    }
}

/// `mib` MiB from the guest (pinned with `cpu_mask`) to a socat sink in the
/// namespace; the md5 sums on both ends must match.
fn transfer_guest_to_host(ns: &Netns, g: &mut Guest, mib: usize, cpu_mask: u32, port: u16) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = dir.path().join("rx");
    let sink = Proc(
        in_ns(
            ns,
            &[
                "socat",
                "-u",
                &format!("TCP-LISTEN:{port},reuseaddr"),
                &format!("CREATE:{}", rx.display()),
            ],
        )
        .spawn()
        .expect("socat sink"),
    );
    g.ok(
        &format!("dd if=/dev/urandom of=/tmp/tx bs=1M count={mib} 2>/dev/null"),
        LONG,
    );
    let sum = g.ok("md5sum /tmp/tx", SHORT);
    let start = Instant::now();
    g.ok(
        &format!(
            "for i in 1 2 3 4 5 6 7 8 9 10; do taskset {cpu_mask} nc {HOST_IP} {port} </tmp/tx && exit 0; sleep 1; done; exit 1"
        ),
        LONG,
    );
    let mut sink = sink;
    sink.wait_within(SHORT, "socat sink never finished");
    eprintln!("guest -> host {mib} MiB in {:.1?}", start.elapsed());
    g.ok("rm -f /tmp/tx", SHORT);
    assert_eq!(
        md5_of(&rx),
        sum.split_whitespace().next().expect("md5"),
        "guest -> host data differs"
    );
}

/// `mib` MiB from the namespace to `nc` listening in the guest.
fn transfer_host_to_guest(ns: &Netns, g: &mut Guest, mib: usize, port: u16) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tx = dir.path().join("tx");
    let mut data = vec![0u8; mib << 20];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("urandom"),
        &mut data,
    )
    .expect("random data");
    std::fs::write(&tx, &data).expect("write tx");
    g.ok(
        &format!("nc -l -p {port} >/tmp/rx 2>/tmp/nc.err & echo $! >/tmp/nc.pid"),
        SHORT,
    );
    let start = Instant::now();
    let mut socat = Proc(
        in_ns(
            ns,
            &[
                "socat",
                "-u",
                &format!("OPEN:{}", tx.display()),
                &format!("TCP:{GUEST_IP}:{port},retry=20,interval=0.5"),
            ],
        )
        .spawn()
        .expect("socat source"),
    );
    let status = socat.wait_within(
        LONG,
        &format!("the transfer into the guest stalled ({mib} MiB)"),
    );
    assert!(status.success(), "socat to the guest failed");
    g.ok(
        "while kill -0 $(cat /tmp/nc.pid) 2>/dev/null; do sleep 0.2; done",
        LONG,
    );
    eprintln!("host -> guest {mib} MiB in {:.1?}", start.elapsed());
    let sum = g.ok("md5sum /tmp/rx && rm -f /tmp/rx", LONG);
    assert_eq!(
        sum.split_whitespace().next().expect("md5"),
        md5_of(&tx),
        "host -> guest data differs"
    );
}

/// `(rx_bytes, rx_packets, tx_bytes, tx_packets)` of eth0 as the guest counts.
fn guest_counters(g: &mut Guest) -> (u64, u64, u64, u64) {
    let out = g.ok("cat /proc/net/dev", SHORT);
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("eth0:"))
        .expect("eth0 in /proc/net/dev");
    let v: Vec<u64> = line
        .split_once(':')
        .expect("colon")
        .1
        .split_whitespace()
        .map(|x| x.parse().expect("number"))
        .collect();
    (v[0], v[1], v[8], v[9])
}

/// Sums a counter over the RX (even) or TX (odd) queues.
fn sum(stats: &Stats, name: &str, pairs: usize, tx: bool) -> u64 {
    (0..pairs)
        .map(|p| stats.get(name, 2 * p + usize::from(tx)))
        .sum()
}

/// The daemon's counters agree with the guest's own: every frame the guest
/// sent was written to the tap, every frame it received came from us.
fn check_counters_match(d: &Daemon, g: &mut Guest, pairs: usize) -> Stats {
    let mut last = String::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(500));
        let s = d.stats();
        let (rx_bytes, rx_packets, tx_bytes, tx_packets) = guest_counters(g);
        let ours = (
            sum(&s, "frames_total", pairs, false),
            sum(&s, "bytes_total", pairs, false),
            sum(&s, "frames_total", pairs, true),
            sum(&s, "bytes_total", pairs, true),
        );
        let rx_ok = ours.0 == rx_packets && ours.1 <= rx_bytes && rx_bytes <= ours.1 + 12 * ours.0;
        let tx_ok = ours.2 == tx_packets && ours.3 <= tx_bytes && tx_bytes <= ours.3 + 12 * ours.2;
        if rx_ok && tx_ok && d.stats().text == s.text {
            return s;
        }
        last = format!(
            "daemon rx {}/{}B tx {}/{}B, guest rx {rx_packets}/{rx_bytes}B tx {tx_packets}/{tx_bytes}B",
            ours.0, ours.1, ours.2, ours.3
        );
    }
    panic!("counters disagree: {last}");
}

/// Prints frames per interrupt and kicks per frame for each queue.
/// Pings both ways and moves `TRANSFER_MIB` each way (guest to host
/// first) through the guest.
fn pings_and_transfers_both_ways(ns: &Netns, g: &mut Guest) {
    ping_from_namespace(ns, 100);
    ping_from_guest(g, 100);
    transfer_guest_to_host(ns, g, TRANSFER_MIB, 1, 5001);
    transfer_host_to_guest(ns, g, TRANSFER_MIB, 5002);
}

fn report(s: &Stats, pairs: usize) {
    for q in 0..2 * pairs {
        let frames = s.get("frames_total", q);
        let irqs = s.get("interrupts_sent_total", q);
        let kicks = s.get("kicks_total", q);
        #[allow(clippy::cast_precision_loss)]
        let (per_irq, per_kick) = (
            frames as f64 / irqs.max(1) as f64,
            kicks as f64 / frames.max(1) as f64,
        );
        eprintln!(
            "queue {q}: frames={frames} interrupts={irqs} kicks={kicks} \
             frames/interrupt={per_irq:.1} kicks/frame={per_kick:.3} suppressed={}",
            s.get("interrupts_suppressed_total", q)
        );
    }
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_guest_pings_and_transfers_both_ways_with_offloads_on_two_queue_pairs() {
    let _one = serial();
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--queue-pairs", "2"]);
    address_tap(&ns, &d.tap);
    let opts = Options {
        cpus: 2,
        queue_pairs: 2,
        ..Options::default()
    };
    let (_qemu, mut g) = Qemu::boot("qemu10-mq", &d.socket, GUEST_CIDR, &opts);

    let features = g.ok("vun-features eth0", SHORT);
    eprintln!("guest: {}", features.trim());
    for name in [
        "CSUM",
        "GUEST_CSUM",
        "GUEST_TSO4",
        "GUEST_TSO6",
        "HOST_TSO4",
        "HOST_TSO6",
        "MRG_RXBUF",
        "RING_EVENT_IDX",
        "MQ",
        "VERSION_1",
    ] {
        assert!(
            features.split(['=', ',']).any(|n| n.trim() == name),
            "{name} not negotiated"
        );
    }
    let acked = d
        .log()
        .lines()
        .find(|l| l.contains("features acked"))
        .map(str::to_owned);
    eprintln!("daemon: {}", acked.expect("features acked in the log"));
    let queues = g.ok("ls -1 /sys/class/net/eth0/queues", SHORT);
    assert!(
        queues.contains("rx-1") && queues.contains("tx-1"),
        "guest queues: {queues}"
    );

    pings_and_transfers_both_ways(&ns, &mut g);
    // A second TX flow from the other vCPU uses the other queue (XPS).
    transfer_guest_to_host(&ns, &mut g, 1, 2, 5003);
    // Flows from the namespace are spread over the tap queues by hash.
    let udp = ns.udp_socket();
    for port in 0..64u16 {
        udp.send_to(b"spread", (GUEST_IP, 7000 + port))
            .expect("udp");
    }

    let s = check_counters_match(&d, &mut g, 2);
    report(&s, 2);
    for q in 0..4 {
        assert!(s.get("frames_total", q) > 0, "queue {q} carried no traffic");
    }
    assert_eq!(
        sum(&s, "bad_chains_total", 2, false) + sum(&s, "bad_chains_total", 2, true),
        0
    );
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_guest_without_receive_offloads_pings_and_transfers_both_ways() {
    // Without mergeable buffers and receive segmentation, each of a Linux
    // guest's RX buffers holds one whole frame: with --tap-io uring (the
    // default where io_uring works) RX reads a round of frames per
    // io_uring_enter.
    let _one = serial();
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d.tap);
    let opts = Options {
        device_props: ",mrg_rxbuf=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off,guest_uso4=off,guest_uso6=off",
        ..Options::default()
    };
    let (_qemu, mut g) = Qemu::boot("qemu10-noguestgso", &d.socket, GUEST_CIDR, &opts);

    let features = g.ok("vun-features eth0", SHORT);
    assert!(
        !features.contains("GUEST_TSO4") && !features.contains("MRG_RXBUF"),
        "{features}"
    );
    pings_and_transfers_both_ways(&ns, &mut g);

    let s = check_counters_match(&d, &mut g, 1);
    report(&s, 1);
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_guest_with_mergeable_buffers_and_no_receive_offloads_gets_frames_through_posted_reads() {
    // Without receive segmentation a Linux guest's mergeable buffers (1536
    // bytes and up, one descriptor each) each hold a whole frame: with
    // --tap-io posted on Linux >= 6.7 RX keeps reads posted into them.
    let _one = serial();
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--tap-io", "posted"]);
    address_tap(&ns, &d.tap);
    let opts = Options {
        device_props: ",guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off,guest_uso4=off,guest_uso6=off",
        ..Options::default()
    };
    let (_qemu, mut g) = Qemu::boot("qemu10-mrg-nogso", &d.socket, GUEST_CIDR, &opts);

    let features = g.ok("vun-features eth0", SHORT);
    assert!(
        !features.contains("GUEST_TSO4") && features.contains("MRG_RXBUF"),
        "{features}"
    );
    pings_and_transfers_both_ways(&ns, &mut g);

    let s = check_counters_match(&d, &mut g, 1);
    report(&s, 1);
    let posted = s.get("rx_posted_frames_total", 0);
    if vhost_user_net_harness::posted_reads_supported() {
        assert!(
            posted * 10 >= s.get("frames_total", 0) * 9,
            "RX through posted reads: {posted} of {} frames",
            s.get("frames_total", 0)
        );
    } else {
        assert_eq!(posted, 0);
    }
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu72_with_vectors0_guest_pings_and_transfers_both_ways() {
    let _one = serial();
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d.tap);
    let opts = Options {
        version: Version::Qemu72,
        ..Options::default()
    };
    let (_qemu, mut g) = Qemu::boot("qemu72", &d.socket, GUEST_CIDR, &opts);

    let features = g.ok("vun-features eth0", SHORT);
    assert!(
        features.contains("GUEST_TSO4") && features.contains("RING_EVENT_IDX"),
        "{features}"
    );
    pings_and_transfers_both_ways(&ns, &mut g);

    let s = check_counters_match(&d, &mut g, 1);
    report(&s, 1);
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn killed_daemon_restarted_on_the_same_socket_and_tap_brings_the_guest_back() {
    let _one = serial();
    let ns = Netns::new();
    let mut d = Daemon::paths();
    // A tap made by the administrator outlives the daemon, addresses included.
    ns.add_tap(&d.tap);
    address_tap(&ns, &d.tap);
    d.spawn(&ns, &[]);
    let (_qemu, mut g) = Qemu::boot("restart-daemon", &d.socket, GUEST_CIDR, &Options::default());
    ping_from_namespace(&ns, 10);

    d.kill();
    d.spawn(&ns, &[]);

    // No command in the guest: QEMU reconnects and the link comes back.
    wait_reachable(&ns);
    ping_from_namespace(&ns, 20);
    ping_from_guest(&mut g, 20);
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn daemon_serves_a_new_qemu_after_the_first_is_killed() {
    let _one = serial();
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d.tap);
    let (mut first, _g) = Qemu::boot("first-qemu", &d.socket, GUEST_CIDR, &Options::default());
    ping_from_namespace(&ns, 10);

    first.kill();
    let (_second, mut g) = Qemu::boot("second-qemu", &d.socket, GUEST_CIDR, &Options::default());

    wait_reachable(&ns);
    ping_from_namespace(&ns, 20);
    ping_from_guest(&mut g, 20);
    assert!(d.log().matches("frontend connected").count() >= 2);
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn client_mode_daemon_connects_to_qemu_and_follows_a_qemu_restart() {
    let _one = serial();
    let ns = Netns::new();
    let mut d = Daemon::paths();
    d.mode = Mode::Client;
    // The daemon starts first and waits for QEMU's socket to appear.
    d.spawn(&ns, &[]);
    address_tap(&ns, &d.tap);
    let opts = Options {
        chardev: Chardev::Server,
        ..Options::default()
    };
    let (mut first, _g) = Qemu::boot("client-first", &d.socket, GUEST_CIDR, &opts);
    ping_from_namespace(&ns, 10);

    first.kill();
    let (_second, mut g) = Qemu::boot("client-second", &d.socket, GUEST_CIDR, &opts);

    wait_reachable(&ns);
    ping_from_namespace(&ns, 20);
    ping_from_guest(&mut g, 20);
}

/// Highest ping loss accepted across pauses or a backend restart: pings sent
/// while the VM is paused are answered late, not lost.
const MAX_LOSS_PERCENT: f64 = 5.0;
/// Between pings in the loss measurements.
const PING_EVERY: Duration = Duration::from_millis(50);

/// What the guest's RX side has seen since boot: frames its driver took
/// and interrupts of its RX queue (`virtioN-input.0` in /proc/interrupts).
#[derive(Clone, Copy, Default)]
struct GuestRx {
    frames: u64,
    interrupts: u64,
}

fn guest_rx(g: &mut Guest) -> GuestRx {
    let (_, frames, _, _) = guest_counters(g);
    let out = g.ok("cat /proc/interrupts", SHORT);
    let interrupts = out
        .lines()
        .find(|l| l.trim_end().ends_with("-input.0"))
        .map_or(0, |l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|n| n.parse::<u64>().ok())
                .sum()
        });
    GuestRx { frames, interrupts }
}

/// The daemon's view of RX next to the guest's, for a failure message: a
/// guest that took fewer frames than the daemon put on its ring never heard
/// about the rest; fewer interrupts than the daemon counted as sent were
/// lost on the way. `before` is the guest's view when this daemon process
/// started.
fn rx_diagnosis(d: &Daemon, g: &mut Guest, before: GuestRx) -> String {
    let s = d.stats();
    let now = guest_rx(g);
    format!(
        "daemon put {} frames on the RX ring, counted {} interrupts sent (deferred {}, \
         suppressed {}); meanwhile the guest took {} frames and saw {} RX interrupts",
        s.get("frames_total", 0),
        s.get("interrupts_sent_total", 0),
        s.get("interrupts_deferred_total", 0),
        s.get("interrupts_suppressed_total", 0),
        now.frames - before.frames,
        now.interrupts - before.interrupts,
    )
}

/// Pauses and resumes the VM (QMP `stop`/`cont`: QEMU stops the rings with
/// GET_VRING_BASE and sets them up again) four times while the namespace
/// pings the guest every 50 ms, with `policy` for both directions; then at
/// most 5% of the pings may be lost and a TCP transfer into the guest must
/// arrive intact.
fn pause_resume_keeps_rx_working(label: &str, policy: &str) {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--rx-coalesce", policy, "--tx-coalesce", policy]);
    address_tap(&ns, &d.tap);
    let name = format!("pause-{label}");
    let (mut qemu, mut g) = Qemu::boot(&name, &d.socket, GUEST_CIDR, &Options::default());
    wait_reachable(&ns);

    let start = Instant::now();
    let ping = BackgroundPing::start(&ns, PING_EVERY, 56);
    std::thread::sleep(Duration::from_secs(1));
    let mut pauses = Vec::new();
    for _ in 0..4 {
        let at = ping.elapsed();
        qemu.pause();
        std::thread::sleep(Duration::from_millis(500));
        qemu.resume();
        pauses.push(format!(
            "{:.1}-{:.1} s",
            at.as_secs_f64(),
            ping.elapsed().as_secs_f64()
        ));
        std::thread::sleep(Duration::from_millis(1500));
    }
    // A tail: pings sent during the last pause are answered after it.
    std::thread::sleep(Duration::from_secs(3));
    let result = ping.finish();
    eprintln!(
        "{policy}: pause/resume x4 (paused {}): {result} (in {:.1?})",
        pauses.join(", "),
        start.elapsed()
    );
    if result.loss_percent() > MAX_LOSS_PERCENT {
        let why = rx_diagnosis(&d, &mut g, GuestRx::default());
        panic!(
            "--rx-coalesce/--tx-coalesce {policy}: {result} across 4 pause/resume cycles \
             (paused {}), more than {MAX_LOSS_PERCENT}%; {why}",
            pauses.join(", ")
        );
    }
    // The scenario happened: QEMU set the device up again at each resume.
    let setups = d.log().matches("features acked").count();
    assert!(setups > 4, "{setups} device setups for 4 resumes");
    transfer_host_to_guest(&ns, &mut g, 4, 5002);
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_pause_resume_keeps_rx_working_with_immediate_interrupts() {
    let _one = serial();
    pause_resume_keeps_rx_working("immediate", "immediate");
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_pause_resume_keeps_rx_working_with_frames_coalescing() {
    let _one = serial();
    pause_resume_keeps_rx_working("frames", "frames=64,usecs=100000");
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_pause_resume_keeps_rx_working_with_adaptive_coalescing() {
    let _one = serial();
    pause_resume_keeps_rx_working("adaptive", "adaptive");
}

/// Kills the daemon (SIGKILL) while the namespace floods the guest with
/// pings (100 a second, 1000 bytes: with `frames=64,usecs=100000` an RX
/// interrupt is held most of the time) and restarts it on the same socket
/// and administrator-made tap. With no command in the guest, the guest must
/// be reachable again, lose at most 5% of 50 ms pings once it is, and take
/// a TCP transfer intact.
fn daemon_restart_under_rx_load_keeps_rx_working(label: &str, policy: &str) {
    let ns = Netns::new();
    let mut d = Daemon::paths();
    ns.add_tap(&d.tap);
    address_tap(&ns, &d.tap);
    let flags = ["--rx-coalesce", policy, "--tx-coalesce", policy];
    d.spawn(&ns, &flags);
    let name = format!("restart-load-{label}");
    let (_qemu, mut g) = Qemu::boot(&name, &d.socket, GUEST_CIDR, &Options::default());
    wait_reachable(&ns);

    let load = BackgroundPing::start(&ns, Duration::from_millis(10), 1000);
    std::thread::sleep(Duration::from_secs(2));
    d.kill();
    let at_kill = guest_rx(&mut g);
    d.spawn(&ns, &flags);
    let back = reachable_within(&ns, Duration::from_secs(20));
    let load = load.finish();
    let reach = match back {
        Some(t) => format!("reachable again {t:.1?} after the restart"),
        None => "not reachable within 20 s of the restart".to_owned(),
    };
    eprintln!(
        "{policy}: guest {reach}; flood (every 10 ms) across the restart: {:.1}% of {} lost",
        load.loss_percent(),
        load.transmitted
    );
    // Settle, then measure.
    std::thread::sleep(Duration::from_secs(1));
    let ping = BackgroundPing::start(&ns, PING_EVERY, 56);
    std::thread::sleep(Duration::from_secs(8));
    let result = ping.finish();
    eprintln!("{policy}: after the restart: {result}");
    if back.is_none() || result.loss_percent() > MAX_LOSS_PERCENT {
        let why = rx_diagnosis(&d, &mut g, at_kill);
        panic!(
            "--rx-coalesce/--tx-coalesce {policy}: after the daemon was killed under RX load \
             and restarted, the guest was {reach}; then {result} (limit {MAX_LOSS_PERCENT}%); \
             restarted daemon: {why}"
        );
    }
    assert!(d.log().matches("frontend connected").count() >= 2);
    transfer_host_to_guest(&ns, &mut g, 4, 5002);
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_daemon_killed_under_rx_load_comes_back_with_immediate_interrupts() {
    let _one = serial();
    daemon_restart_under_rx_load_keeps_rx_working("immediate", "immediate");
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_daemon_killed_under_rx_load_comes_back_with_frames_coalescing() {
    let _one = serial();
    daemon_restart_under_rx_load_keeps_rx_working("frames", "frames=64,usecs=100000");
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_daemon_killed_under_rx_load_comes_back_with_adaptive_coalescing() {
    let _one = serial();
    daemon_restart_under_rx_load_keeps_rx_working("adaptive", "adaptive");
}

/// Live migration on this host: the guest moves between two daemons on one
/// multiqueue tap (the destination QEMU runs `-incoming`, `migrate` goes to
/// the source's monitor), there and back and there again, while the
/// namespace pings it every 50 ms; a TCP transfer into the guest runs
/// during the first migration and arrives intact on the destination.
#[test]
#[ignore = "needs root, /dev/net/tun, QEMU and the guest image (CI runs it)"]
fn qemu10_guest_migrates_between_two_daemons_on_one_tap_three_times() {
    let _serial = serial();
    let ns = Netns::new();
    let mut a = Daemon::paths();
    ns.add_tap(&a.tap);
    a.spawn(&ns, &[]);
    let mut b = Daemon::paths();
    b.tap = a.tap.clone();
    b.spawn(&ns, &[]);
    address_tap(&ns, &a.tap);
    let daemons = [&a, &b];
    let opts = Options::default();
    let (mut src, mut g) = Qemu::boot("migrate-0", &a.socket, GUEST_CIDR, &opts);
    wait_reachable(&ns);

    // The transfer: the namespace sends 256 MiB, the guest sums them as
    // they come (its RAM could not hold them), long enough to span the
    // first migration.
    let dir = tempfile::tempdir().expect("tempdir");
    let tx = dir.path().join("tx");
    let mut data = vec![0u8; 256 << 20];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("urandom"),
        &mut data,
    )
    .expect("random data");
    std::fs::write(&tx, &data).expect("write tx");
    let port = 5201;
    g.ok(
        &format!("rm -f /tmp/rx.md5; (nc -l -p {port} 2>/tmp/nc.err | md5sum >/tmp/rx.md5) &"),
        SHORT,
    );
    let ping = BackgroundPing::start(&ns, PING_EVERY, 56);
    let mut sender = Proc(
        in_ns(
            &ns,
            &[
                "socat",
                "-u",
                &format!("OPEN:{}", tx.display()),
                &format!("TCP:{GUEST_IP}:{port},retry=20,interval=0.5"),
            ],
        )
        .spawn()
        .expect("socat source"),
    );
    std::thread::sleep(Duration::from_millis(300));

    let mut migrations = Vec::new();
    for i in 1..=3 {
        let to = daemons[i % 2];
        let uri = dir.path().join(format!("migrate-{i}.sock"));
        let dst = Qemu::incoming(&format!("migrate-{i}"), &to.socket, GUEST_CIDR, &opts, &uri);
        let at = ping.elapsed();
        let reply = src.migrate_to(&uri);
        // QEMU has the guest announce itself on the destination
        // (VIRTIO_NET_F_GUEST_ANNOUNCE: its announce rounds run for about
        // a second): gratuitous ARPs from the guest cross the new daemon.
        let cap = ns.packet_socket();
        migrations.push(format!("#{i} at {:.1} s: {reply}", at.as_secs_f64()));
        if i == 1 {
            assert!(
                sender.0.try_wait().expect("wait").is_none(),
                "the transfer ended before the migration did: make it longer"
            );
        }
        let guest_ip: std::net::Ipv4Addr = GUEST_IP.parse().expect("IPv4");
        let garp = common::capture(&cap, common::TIMEOUT, |f| {
            // ARP, sender and target protocol address both the guest's.
            f.len() >= 42
                && f[12..14] == [0x08, 0x06]
                && f[28..32] == guest_ip.octets()
                && f[38..42] == guest_ip.octets()
        });
        assert!(
            garp.is_some(),
            "the guest did not announce itself after migration {i}"
        );
        drop(src);
        src = dst;
        g = src.take_guest();
        if i == 1 {
            let status = sender.wait_within(
                LONG,
                &format!("the transfer into the guest stalled after migration {i}"),
            );
            assert!(status.success(), "socat to the guest failed");
            let sum = g.ok(
                "while [ ! -s /tmp/rx.md5 ]; do sleep 0.2; done; cat /tmp/rx.md5",
                LONG,
            );
            assert_eq!(
                sum.split_whitespace().next().expect("md5"),
                md5_of(&tx),
                "host -> guest data differs after the migration"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(2));
    let result = ping.finish();
    eprintln!("migrations: {}\nping: {result}", migrations.join("\n"));
    assert!(
        result.loss_percent() <= MAX_LOSS_PERCENT,
        "{result} across 3 migrations, more than {MAX_LOSS_PERCENT}%: {}",
        migrations.join("; ")
    );
    ping_from_guest(&mut g, 5);
    assert!(
        a.log().contains("dirty page logging on") && b.log().contains("dirty page logging on"),
        "both daemons logged for a migration"
    );
}

/// `vun-udp-gso` (`tests/guest/udp-gso.rs`) for the guest: std only,
/// statically linked, so it runs in the busybox initramfs.
fn udp_gso_helper() -> std::path::PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vun-udp-gso");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/udp-gso.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args(["--edition", "2021", "-O", "-C", "strip=symbols"])
        .args(["-C", "target-feature=+crt-static", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run rustc");
    assert!(status.success(), "cannot build {}", src.display());
    out
}

/// The JSON object of the first `"key": {...}` in `text` (QMP replies
/// carry no braces inside strings).
fn json_object<'a>(text: &'a str, key: &str) -> &'a str {
    let at = text
        .find(&format!("\"{key}\": {{"))
        .unwrap_or_else(|| panic!("no \"{key}\" object in {text}"));
    let open = at + text[at..].find('{').expect("an object");
    let mut depth = 0;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &text[open..=open + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced \"{key}\" object in {text}")
}

#[test]
#[ignore = "needs root, QEMU and the guest image (.ci/install-deps.sh)"]
fn qemu10_udp_gso_crosses_both_ways_and_uso_is_offered_to_qemu() {
    use common::frames::{long_payload, send_udp_gso_to_guest};
    let _one = serial();
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    address_tap(&ns, &d.tap);
    let opts = Options {
        extra_files: vec![(udp_gso_helper(), "/bin/vun-udp-gso".into())],
        ..Options::default()
    };
    let (mut qemu, mut g) = Qemu::boot("qemu10-uso", &d.socket, GUEST_CIDR, &opts);

    // The daemon's offer, as QEMU's vhost device holds it.
    let list = qemu.monitor("x-query-virtio");
    let path = list
        .split("\"path\": \"")
        .nth(1)
        .and_then(|p| p.split('"').next())
        .expect("a virtio device path");
    let status = qemu.monitor_with(
        "x-query-virtio-status",
        &format!("{{\"path\": \"{path}\"}}"),
    );
    let backend_offer = json_object(json_object(&status, "vhost-dev"), "features");
    for bit in ["VIRTIO_NET_F_HOST_USO", "VIRTIO_NET_F_GUEST_USO4"] {
        assert!(
            backend_offer.contains(bit),
            "{bit} not offered: {backend_offer}"
        );
    }
    // QEMU 10.0 passes USO to the guest only for netdevs that say they
    // have it, which vhost-user does not (see docs/qemu.md).
    let to_guest = json_object(&status, "host-features").contains("_USO");
    let negotiated = g.ok("vun-features eth0", SHORT);
    eprintln!(
        "QEMU offers the guest USO: {to_guest}; guest: {}",
        negotiated.trim()
    );
    ping_from_namespace(&ns, 5);

    // Host -> guest: one send of 7 segments of 1000 bytes and one of 600.
    g.ok(
        "vun-udp-gso recv 9000 8 /tmp/u 30 >/tmp/u.out 2>&1 & echo $! >/tmp/u.pid",
        SHORT,
    );
    g.ok(
        "while ! grep -q listening /tmp/u.out; do sleep 0.1; done",
        SHORT,
    );
    let payload = long_payload(21, 7600);
    send_udp_gso_to_guest(&ns, 9000, &payload, 1000);
    g.ok(
        "while kill -0 $(cat /tmp/u.pid) 2>/dev/null; do sleep 0.1; done",
        SHORT,
    );
    let got = g.ok("cat /tmp/u.out; md5sum /tmp/u", SHORT);
    assert!(
        got.contains("datagrams=8 bytes=7600 sizes=1000,1000,1000,1000,1000,1000,1000,600"),
        "host -> guest: {got}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let sent = dir.path().join("sent");
    std::fs::write(&sent, &payload).expect("write payload");
    assert!(
        got.contains(&md5_of(&sent)),
        "host -> guest data differs: {got}"
    );

    // Guest -> host: one send with UDP_SEGMENT from the guest.
    let sock = ns.within(|| std::net::UdpSocket::bind((HOST_IP, 9100)).expect("bind"));
    sock.set_read_timeout(Some(SHORT)).expect("timeout");
    g.ok(
        &format!("vun-udp-gso send {HOST_IP}:9100 1000 7600 22"),
        SHORT,
    );
    let mut buf = [0u8; 65536];
    let got: Vec<Vec<u8>> = (0..8)
        .map(|_| {
            let n = sock.recv(&mut buf).expect("a datagram from the guest");
            buf[..n].to_vec()
        })
        .collect();
    let want: Vec<Vec<u8>> = long_payload(22, 7600)
        .chunks(1000)
        .map(<[u8]>::to_vec)
        .collect();
    assert!(got == want, "guest -> host datagrams differ");

    let s = d.stats();
    assert_eq!(
        s.get("bad_chains_total", 0) + s.get("bad_chains_total", 1),
        0
    );
}
