//! A third-party frontend: DPDK's `net_virtio_user` (in `testpmd`), which
//! polls, acks MRG_RXBUF and IN_ORDER but never EVENT_IDX, sets
//! `VRING_AVAIL_F_NO_INTERRUPT` and sends SET_VRING_CALL before
//! SET_FEATURES, drives the daemon on a real tap in a namespace: its frames
//! reach the tap, and through a tc `mirred` reflector come back to it,
//! none lost on our side. The same orchestration (harness/src/dpdk.rs)
//! also runs DPDK's own vhost backend, the benchmark's peer.
//!
//! Needs root, /dev/net/tun and DPDK (`dpdk-dev` and its PMD packages);
//! without DPDK it says how to install it and passes. `#[ignore]`d for a
//! plain `cargo test`.

use std::sync::Mutex;

use vhost_user_net_harness::dpdk::{run, Backend, Dpdk, Flow};
use vhost_user_net_harness::Netns;

/// One test at a time: each pins its processes to the same two CPUs, and
/// the cleanup test looks for processes by this test binary's PID.
static SERIAL: Mutex<()> = Mutex::new(());

fn dpdk() -> Option<Dpdk> {
    match Dpdk::find(true) {
        Ok(d) => Some(d),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

#[test]
#[ignore = "needs root, /dev/net/tun and DPDK"]
fn dpdk_virtio_user_frontend_sends_through_our_daemon_and_gets_its_frames_back() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(dpdk) = dpdk() else { return };
    let ns = Netns::new();
    for len in [64, 1500] {
        let tx = run(&dpdk, &ns, Backend::Ours, Flow::Tx, len, 0.5);
        assert!(tx.frames > 0, "{len} B: no frame reached the tap: {tx:?}");
        let lp = run(&dpdk, &ns, Backend::Ours, Flow::Loop, len, 0.5);
        assert!(lp.frames > 0, "{len} B: nothing came back: {lp:?}");
        // Every frame the daemon took from the tap reached the frontend,
        // but those still in its 256-entry RX ring when it stopped.
        let (read, got) = lp.delivered.expect("loop counts delivery");
        assert!(
            read.saturating_sub(got) <= 256,
            "{len} B: frames lost on RX: {lp:?}"
        );
        // What the daemon logged it was acked: mergeable RX buffers, no
        // event index.
        let acked = u64::from_str_radix(tx.features.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("no features logged: {tx:?}"));
        assert_ne!(acked & (1 << 15), 0, "MRG_RXBUF not acked: {tx:?}");
        assert_eq!(acked & (1 << 29), 0, "EVENT_IDX acked: {tx:?}");
    }
}

#[test]
#[ignore = "needs root, /dev/net/tun and DPDK"]
fn dpdk_vhost_backend_peer_runs_with_net_tap_polling() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(dpdk) = dpdk() else { return };
    let ns = Netns::new();
    let r = run(&dpdk, &ns, Backend::Dpdk, Flow::Loop, 64, 0.5);
    assert!(
        r.frames > 0,
        "nothing came back through DPDK's backend: {r:?}"
    );
    // Without cc there is no shim, and the benchmark says it runs the
    // signal variant; with it, net_tap must really poll.
    assert_eq!(
        r.polling,
        Some(dpdk.polls_tap()),
        "net_tap did not take the path the benchmark reports: {r:?}"
    );
}

/// Processes (not zombies) whose command line mentions `needle`.
fn pids_with(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd)
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

#[test]
#[ignore = "needs root, /dev/net/tun and DPDK"]
fn a_run_whose_frontend_dies_leaves_no_process_and_no_dpdk_runtime_directory() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(dpdk) = dpdk() else { return };
    let ns = Netns::new();
    // The harness names DPDK's file prefixes v{b,f}<pid>x<n>.
    let tag = format!("{}x", std::process::id() % 100_000);
    // Kill the frontend (SIGKILL: it cannot clean up) once it runs, while
    // the run is counting with the backend up: the run panics.
    let killer = {
        let mark = format!("--file-prefix=vf{tag}");
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                if let Some(pid) = pids_with(&mark).first() {
                    std::thread::sleep(std::time::Duration::from_secs(2));
                    let pid = nix::unistd::Pid::from_raw(*pid);
                    return nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok();
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            false
        })
    };
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&dpdk, &ns, Backend::Dpdk, Flow::Tx, 64, 10.0)
    }));
    assert!(
        killer.join().expect("killer thread"),
        "found no frontend to kill"
    );
    assert!(failed.is_err(), "the run went on without its frontend");
    for prefix in ["vb", "vf"] {
        let mark = format!("--file-prefix={prefix}{tag}");
        assert_eq!(
            pids_with(&mark),
            Vec::<i32>::new(),
            "{prefix}: left running"
        );
        let left: Vec<_> = std::fs::read_dir("/var/run/dpdk")
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&format!("{prefix}{tag}")))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "DPDK runtime directories left: {left:?}");
    }
}
