//! The bare TX syscall floor, pinned: one `writev` per frame into a tap on
//! CPU 1, with the frame either hot (the writer's own buffer, written once)
//! or cold (written by a producer on CPU 0 into a ring of slots just ahead
//! of the writer, as a frontend on the other core writes its frames, so the
//! kernel's copy first pulls the frame's cache lines across).

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use crate::synthetic::{frame, SINK_MAC};
use crate::Netns;

/// Slots of the producer's ring (a virtio ring's usual 256).
const SLOTS: usize = 256;

/// A counter alone on its cache line, so the two cores do not share it by
/// accident with the other.
#[repr(align(64))]
#[derive(Default)]
struct Line(AtomicU64);

/// A frame slot whose lock is alone on its cache line: the producer
/// refills the slot next to the one the writer holds.
#[repr(align(64))]
struct Slot(Mutex<Vec<u8>>);

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("cpu in range");
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// A one-queue tap `name` with the virtio-net header, in `ns`, sending to
/// the kernel's sink; removed when the returned queue is closed.
fn sink_tap(ns: &Netns, name: &str) -> File {
    let q = ns.within({
        let name = name.to_owned();
        move || {
            let t = vhost_user_net::host::tap::Tap::open(&name, 1, None).expect("floor tap");
            t.into_queues().pop().expect("one queue")
        }
    });
    vhost_user_net::host::tap::set_offloads(&q, libc::TUN_F_CSUM | libc::TUN_F_TSO4)
        .expect("offloads");
    q
}

/// Frames per second (in millions) of one `writev` per `len`-byte frame
/// into a sink tap in `ns` for `secs`, the writer on CPU 1; with `cold`,
/// each frame is written by a thread on CPU 0 just before (at most
/// `SLOTS` frames ahead of) its `writev`.
pub fn tx_floor(ns: &Netns, len: usize, secs: f64, cold: bool) -> f64 {
    let q = sink_tap(ns, &crate::unique("fc"));
    let template = frame(len, SINK_MAC);
    let slots: Arc<Vec<Slot>> = Arc::new(
        (0..SLOTS)
            .map(|_| Slot(Mutex::new(template.clone())))
            .collect(),
    );
    let produced = Arc::new(Line::default());
    let consumed = Arc::new(Line::default());
    let stop = Arc::new(AtomicBool::new(false));
    let producer = cold.then(|| {
        let (slots, produced, consumed, stop) = (
            slots.clone(),
            produced.clone(),
            consumed.clone(),
            stop.clone(),
        );
        let template = template.clone();
        std::thread::spawn(move || {
            pin_thread(0);
            let mut head = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if head - consumed.0.load(Ordering::Acquire) >= SLOTS as u64 {
                    std::hint::spin_loop();
                    continue;
                }
                {
                    let mut s = slots[slot(head)].0.lock().expect("slot");
                    // The whole frame, as a frontend writes it, with a
                    // sequence number so no two frames are alike.
                    s.copy_from_slice(&template);
                    let at = s.len() - 8;
                    s[at..].copy_from_slice(&head.to_le_bytes());
                }
                head += 1;
                produced.0.store(head, Ordering::Release);
            }
        })
    });
    let writer = std::thread::spawn(move || {
        pin_thread(1);
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let mut tail = 0u64;
        let mut sent = 0u64;
        while Instant::now() < end {
            for _ in 0..64 {
                if cold {
                    if produced.0.load(Ordering::Acquire) == tail {
                        std::hint::spin_loop();
                        continue;
                    }
                    let s = slots[slot(tail)].0.lock().expect("slot");
                    if (&q).write(&s).is_ok() {
                        sent += 1;
                    }
                    drop(s);
                    tail += 1;
                    consumed.0.store(tail, Ordering::Release);
                } else if (&q).write(&template).is_ok() {
                    sent += 1;
                }
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let mpps = sent as f64 / start.elapsed().as_secs_f64() / 1e6;
        mpps
    });
    let mpps = writer.join().expect("writer thread");
    stop.store(true, Ordering::Relaxed);
    if let Some(p) = producer {
        p.join().expect("producer thread");
    }
    mpps
}

fn slot(n: u64) -> usize {
    usize::try_from(n % SLOTS as u64).expect("below SLOTS")
}

/// Lines for the cold floor next to a benchmark's other floors: `len`
/// bytes each, measured in `ns`.
pub fn cold_tx_report(ns: &Netns, sizes: &[usize], secs: f64) -> String {
    let mut out = String::from(
        "\ncold-cache tx floor (one writev per frame on CPU 1; each frame written by CPU 0 \
         just before, at most 256 frames ahead; pinned hot floor alongside):\n",
    );
    for &len in sizes {
        let hot = tx_floor(ns, len, secs, false);
        let cold = tx_floor(ns, len, secs, true);
        let _ = writeln!(
            out,
            "  tx   {len:>6} B: cold {cold:.3} Mpps, hot {hot:.3} Mpps (cold/hot {:.2})",
            cold / hot
        );
    }
    out
}
