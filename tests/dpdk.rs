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

use vhost_user_net_harness::dpdk::{run, Backend, Dpdk, Flow};
use vhost_user_net_harness::Netns;

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
    let Some(dpdk) = dpdk() else { return };
    let ns = Netns::new();
    for len in [64, 1500] {
        let tx = run(&dpdk, &ns, Backend::Ours, Flow::Tx, len, 0.5);
        assert!(tx.frames > 0, "{len} B: no frame reached the tap: {tx:?}");
        let lp = run(&dpdk, &ns, Backend::Ours, Flow::Loop, len, 0.5);
        assert!(lp.frames > 0, "{len} B: nothing came back: {lp:?}");
        // Every frame the daemon took from the tap reached the frontend
        // (up to the few still in flight when it stopped).
        let delivered = lp.delivered.expect("loop counts delivery");
        assert!(delivered > 0.99, "{len} B: frames lost on RX: {lp:?}");
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
    let Some(dpdk) = dpdk() else { return };
    let ns = Netns::new();
    let r = run(&dpdk, &ns, Backend::Dpdk, Flow::Loop, 64, 0.5);
    assert!(
        r.frames > 0,
        "nothing came back through DPDK's backend: {r:?}"
    );
    assert_eq!(
        r.polling,
        Some(true),
        "net_tap did not take the polling path: {r:?}"
    );
}
