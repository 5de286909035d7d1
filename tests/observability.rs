//! What the daemon tells: kicks and interrupts following the event index, a
//! held interrupt sent by its timer, the `stats` command, the Prometheus
//! endpoint, and counters that stay consistent under a synthetic guest.
//!
//! End to end with the real parts: the daemon process on a real tap in a
//! network namespace, driven by the real vhost-user frontend protocol
//! (`vhost::vhost_user::Frontend`) in QEMU's message order, over memfd-backed
//! guest memory. They need root and /dev/net/tun, so they are `#[ignore]`d
//! for a plain `cargo test`; `bash .ci/test` (as root, what CI runs) runs them.

use std::time::Duration;

use vhost_user_net::control::config::default_mac;
use vhost_user_net_harness as common;
use vhost_user_net_harness::frames::marker;
use vhost_user_net_harness::{eth_frame, Daemon, Netns, TestFrontend};

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn kicks_and_interrupts_follow_the_event_index() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &[]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let src = default_mac(&d.tap);

    // 64 frames published at once with one kick; used_event (0) asks for an
    // interrupt as soon as the first is used.
    for tag in 0..64 {
        fe.queue_tx(0, &eth_frame(src, &marker(tag)));
    }
    assert!(fe.publish_and_kick(1), "the first publish needs a kick");
    fe.wait_used(1, 64);
    common::wait_for("the interrupt", || {
        (fe.vqs[1].take_interrupts() == 1).then_some(())
    });
    let s = d.stats();
    assert_eq!(s.get("frames_total", 1), 64);
    assert_eq!(s.get("kicks_total", 1), 1);
    assert_eq!(s.get("interrupts_sent_total", 1), 1);

    // The guest now asks for no interrupt before entry 1000: ten more
    // frames complete silently, and need one kick (the ring was empty).
    let mem = fe.mem.clone();
    fe.vqs[1].ring.set_used_event(&mem, 1000);
    for tag in 64..74 {
        fe.queue_tx(0, &eth_frame(src, &marker(tag)));
    }
    assert!(fe.publish_and_kick(1));
    fe.wait_used(1, 10);
    let s = common::wait_for("the second batch to be counted", || {
        let s = d.stats();
        (s.get("frames_total", 1) == 74).then_some(s)
    });
    assert_eq!(s.get("kicks_total", 1), 2);
    assert_eq!(
        s.get("interrupts_sent_total", 1),
        1,
        "no interrupt the guest did not ask for"
    );
    assert!(s.get("interrupts_suppressed_total", 1) >= 1);
    assert_eq!(fe.vqs[1].take_interrupts(), 0);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn held_interrupt_arrives_when_the_coalescing_timer_fires() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--tx-coalesce", "frames=32,usecs=2000"]);
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    let src = default_mac(&d.tap);

    for tag in 0..5 {
        fe.queue_tx(0, &eth_frame(src, &marker(tag)));
    }
    fe.publish_and_kick(1);
    fe.wait_used(1, 5);

    common::wait_for("the held interrupt", || {
        (fe.vqs[1].take_interrupts() == 1).then_some(())
    });
    let s = d.stats();
    assert_eq!(s.get("interrupts_deferred_total", 1), 1);
    assert_eq!(s.get("interrupts_sent_total", 1), 1);
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn stats_command_prints_per_queue_counters_policies_and_rates() {
    let ns = Netns::new();
    let d = Daemon::start(
        &ns,
        &[
            "--rx-coalesce",
            "adaptive",
            "--tx-coalesce",
            "frames=32,usecs=1000",
        ],
    );
    let mut fe = TestFrontend::connect(&d.socket, 1, 256, 0);
    for tag in 0..10 {
        fe.send(0, &eth_frame(default_mac(&d.tap), &marker(tag)));
    }
    fe.wait_used(1, 10);
    let bin = env!("CARGO_BIN_EXE_vhost-user-net");
    let stats = d.stats_socket.to_str().unwrap();

    let out = std::process::Command::new(bin)
        .args(["stats", "--stats-socket", stats])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tx = text
        .lines()
        .find(|l| l.starts_with("1 "))
        .expect("queue 1 row");
    assert!(
        tx.contains(" tx ") && tx.contains(" 10 ") && tx.ends_with("frames=32,usecs=1000"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("0 ") && l.ends_with("adaptive,usecs=250")),
        "{text}"
    );

    let mut watch = std::process::Command::new(bin)
        .args(["stats", "--stats-socket", stats, "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("frames/s"));
}

/// GET over `conn` and returns the response.
fn http_get(mut conn: impl std::io::Read + std::io::Write) -> String {
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).unwrap();
    resp
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn prometheus_endpoint_serves_http_on_loopback_and_on_a_unix_socket() {
    let ns = Netns::new();
    ns.ip(&["link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("prom.sock");
    let d = Daemon::start(&ns, &["--prometheus", "127.0.0.1:9717"]);
    let d2 = Daemon::start(&ns, &["--prometheus", &format!("unix:{}", unix.display())]);

    let tcp = ns.within(|| http_get(std::net::TcpStream::connect("127.0.0.1:9717").unwrap()));
    let via_unix = http_get(std::os::unix::net::UnixStream::connect(&unix).unwrap());

    for resp in [&tcp, &via_unix] {
        assert!(resp.starts_with("HTTP/1.0 200 OK\r\n"), "{resp}");
        assert!(resp.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(resp.contains("# TYPE vhost_user_net_frames_total counter"));
        assert!(resp.contains(
            "vhost_user_net_coalesce_policy_info{queue=\"0\",dir=\"rx\",policy=\"immediate\"} 1"
        ));
    }
    drop((d, d2));
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn synthetic_guest_through_a_reflector_keeps_the_counters_consistent() {
    // The same counters whichever way TX reaches the tap.
    for mode in ["uring", "syscall"] {
        reflector_keeps_the_counters_consistent(mode);
    }
}

fn reflector_keeps_the_counters_consistent(tap_io: &str) {
    use common::synthetic::{frame, Guest, Result_, RING, SINK_MAC};
    let ns = Netns::new();
    let d = Daemon::start(
        &ns,
        &[
            "--rx-coalesce",
            "adaptive",
            "--tx-coalesce",
            "frames=32,usecs=500",
            "--tap-io",
            tap_io,
        ],
    );
    // The mode is said at start and in the counters.
    assert!(
        d.log().contains(&format!("pair 0: tap I/O: {tap_io}")),
        "{}",
        d.log()
    );
    for (q, dir) in [(0, "rx"), (1, "tx")] {
        let info = format!(
            "vhost_user_net_tap_io_info{{queue=\"{q}\",dir=\"{dir}\",mode=\"{tap_io}\"}} 1"
        );
        assert!(d.stats().text.contains(&info), "{}", d.stats().text);
    }
    let exec = |args: &[&str]| {
        let mut all = vec!["netns", "exec", &ns.name];
        all.extend_from_slice(args);
        common::run("ip", &all);
    };
    exec(&["tc", "qdisc", "add", "dev", &d.tap, "ingress"]);
    exec(&[
        "tc", "filter", "add", "dev", &d.tap, "parent", "ffff:", "protocol", "all", "prio", "1",
        "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", &d.tap,
    ]);
    let mut g = Guest::new(TestFrontend::connect(&d.socket, 1, RING, 0));
    g.refill(usize::from(RING));
    let f = frame(64, SINK_MAC);
    let (mut sent, mut tx, mut rx) = (0u64, Result_::default(), Result_::default());

    // Half a second of saturating traffic, then let everything drain.
    let end = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < end {
        g.reclaim(Some(&mut tx), f.len());
        sent += g.send(32, &f, 128).0 as u64;
        g.napi_poll(64, &mut rx, common::synthetic::TS_AT);
    }
    common::wait_for("every frame to come back", || {
        g.reclaim(Some(&mut tx), f.len());
        g.napi_poll(64, &mut rx, common::synthetic::TS_AT);
        (g.inflight() == 0 && rx.frames == sent).then_some(())
    });

    let s = d.stats();
    assert!(sent > 1000, "only {sent} frames in half a second");
    assert_eq!(
        s.get("frames_total", 1),
        sent,
        "TX frames written = frames sent"
    );
    assert_eq!(tx.frames, sent, "every TX frame completed");
    assert_eq!(
        s.get("frames_total", 0),
        rx.frames,
        "RX frames delivered = received"
    );
    for q in 0..2 {
        assert_eq!(s.get("kicks_total", q), g.kicks[q], "kicks on queue {q}");
        assert!(
            s.get("interrupts_sent_total", q) <= s.get("batches_total", q),
            "at most one interrupt per batch on queue {q}"
        );
    }
}

/// Receives RX as a halting NAPI guest does until `done()` says so: polls
/// a budget at a time, re-arms `used_event`, and halts for the interrupt
/// when nothing is pending. An interrupt that does not come within 2 s
/// while the daemon has delivered frames the guest has not seen fails.
fn receive_as_napi(
    g: &mut common::synthetic::Guest,
    d: &Daemon,
    res: &mut common::synthetic::Result_,
    done: impl Fn(&common::synthetic::Result_) -> bool,
) {
    use common::synthetic::{wait_irq, HDR};
    loop {
        while g.napi_poll(64, res, HDR) == 64 {}
        // NAPI complete: ask for the next interrupt.
        let more = g.rx_enable_cb();
        if done(res) {
            return;
        }
        if more {
            continue;
        }
        wait_irq(g, &[0], Duration::from_secs(2));
        if g.take_interrupts(&[0]) == 0 {
            let delivered = d.stats().get("frames_total", 0);
            assert!(
                delivered == res.frames,
                "no interrupt in 2 s with {} frames delivered and {} received",
                delivered,
                res.frames
            );
        }
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun (CI runs it)"]
fn adaptive_signals_sparse_frames_at_once_and_coalesces_a_dense_stream() {
    use common::synthetic::{Guest, Result_, GUEST_MAC, RING};
    let ns = Netns::new();
    let d = Daemon::start(&ns, &["--rx-coalesce", "adaptive"]);
    ns.route_to_guest(&d.tap, GUEST_MAC);
    let mut g = Guest::new(TestFrontend::connect(&d.socket, 1, RING, 0));
    g.refill(usize::from(RING));
    let sock = ns.udp_socket();
    let send = |n: usize| {
        for _ in 0..n {
            sock.send_to(&[0x5a; 18], ("198.18.0.2", 9000))
                .expect("send");
        }
    };
    let counters = || {
        let s = d.stats();
        (
            s.get("interrupts_sent_total", 0),
            s.get("interrupts_deferred_total", 0),
        )
    };
    let mut res = Result_::default();

    // Sparse: a frame every 2 ms, each signalled at once, none held.
    let t0 = std::time::Instant::now();
    let before = counters();
    for i in 1..=20 {
        send(1);
        receive_as_napi(&mut g, &d, &mut res, |r| r.frames >= i);
        std::thread::sleep(Duration::from_millis(2));
    }
    let after = counters();
    assert_eq!(after.0 - before.0, 20, "one interrupt per sparse frame");
    assert_eq!(after.1 - before.1, 0, "no sparse frame held");

    eprintln!("sparse took {:?}", t0.elapsed());
    // Dense: bursts of 100 frames, 200 us apart. Interrupts are held, far
    // fewer than frames, and none is lost (the guest would wait 2 s in
    // vain). The sender's pace is the machine's: an attempt whose stream
    // came out sparse (a starved sender) is tried again, up to 5 times.
    for attempt in 1..=5 {
        let before = counters();
        let frames_before = res.frames;
        let started = std::time::Instant::now();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(10)
                {
                    send(100);
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            receive_as_napi(&mut g, &d, &mut res, |r| {
                r.frames - frames_before >= 20_000 || h.is_finished()
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            receive_as_napi(&mut g, &d, &mut res, |r| {
                h.is_finished() && r.frames == d.stats().get("frames_total", 0)
            });
        });
        let after = counters();
        let frames = res.frames - frames_before;
        let interrupts = after.0 - before.0;
        let held = after.1 - before.1;
        #[allow(clippy::cast_precision_loss)]
        let rate = frames as f64 / started.elapsed().as_secs_f64();
        eprintln!("dense attempt {attempt}: {frames} frames ({rate:.0}/s), {interrupts} interrupts, {held} held");
        assert!(frames >= 20_000, "only {frames} frames got through in 10 s");
        assert!(
            frames >= 8 * interrupts,
            "{interrupts} interrupts for {frames} dense frames"
        );
        if held > 0 {
            return;
        }
    }
    panic!("a dense stream held no interrupt in 5 attempts");
}
