//! The bare TX syscall floor, pinned: one `write` per frame into a tap on
//! CPU 1, with the frame either hot (the writer's own buffer, written once)
//! or cold (written by a producer on CPU 0 into a ring of slots just ahead
//! of the writer, as a frontend on the other core writes its frames, so the
//! kernel's copy first pulls the frame's cache lines across).

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, WriteVolatile};

use crate::synthetic::{frame, SINK_MAC};
use crate::Netns;

/// Slots of the producer's ring (a virtio ring's usual 256).
const SLOTS: u64 = 256;
/// Frames the producer publishes, and the writer takes, at a time (a
/// frontend's and a backend's usual burst).
const BATCH: u64 = 32;

/// A counter alone on its cache line.
#[repr(align(64))]
#[derive(Default)]
struct Line(AtomicU64);

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("cpu in range");
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// A one-queue tap `name` with the virtio-net header and checksum and TSO4
/// offloads, in `ns`; removed when the returned queue is closed.
pub fn sink_tap(ns: &Netns, name: &str) -> File {
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

/// Frames per second (in millions) of one `write` per `len`-byte frame
/// into a sink tap in `ns` for `secs`, the writer on CPU 1.
///
/// Hot: the writer's own buffer, the same frame every time. Cold: a
/// producer on CPU 0 writes each frame into a ring of `SLOTS` slots of
/// shared memory and publishes them `BATCH` at a time; the writer reads the
/// published index once per batch, writes the batch's frames straight from
/// the slots, and returns the batch at once: a frontend and a backend
/// without the descriptors, so what remains over the hot floor is the
/// kernel's copy of a frame last written by the other core.
pub fn tx_floor(ns: &Netns, len: usize, secs: f64, cold: bool) -> f64 {
    let q = sink_tap(ns, &crate::unique("fc"));
    let template = frame(len, SINK_MAC);
    let slot_len = template.len().next_multiple_of(2048);
    let bytes = usize::try_from(SLOTS).expect("fits") * slot_len;
    let mem: Arc<GuestMemoryMmap> = Arc::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes.next_multiple_of(4096))])
            .expect("slot memory"),
    );
    let at = move |n: u64| GuestAddress((n % SLOTS) * slot_len as u64);
    let produced = Arc::new(Line::default());
    let consumed = Arc::new(Line::default());
    let stop = Arc::new(AtomicBool::new(false));
    let producer = cold.then(|| {
        let (mem, produced, consumed, stop) = (
            mem.clone(),
            produced.clone(),
            consumed.clone(),
            stop.clone(),
        );
        let template = template.clone();
        std::thread::spawn(move || {
            pin_thread(0);
            let mut head = 0u64;
            let seq_at = template.len() as u64 - 8;
            while !stop.load(Ordering::Relaxed) {
                let free = SLOTS - (head - consumed.0.load(Ordering::Acquire));
                if free == 0 {
                    std::hint::spin_loop();
                    continue;
                }
                for n in head..head + free.min(BATCH) {
                    // The whole frame, as a frontend writes it, with a
                    // sequence number so no two frames are alike.
                    mem.write_slice(&template, at(n)).expect("slot");
                    mem.write_obj(n, at(n).unchecked_add(seq_at)).expect("slot");
                }
                head += free.min(BATCH);
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
                if !cold {
                    if (&q).write(&template).is_ok() {
                        sent += 1;
                    }
                    continue;
                }
                let avail = produced.0.load(Ordering::Acquire);
                if avail == tail {
                    std::hint::spin_loop();
                    continue;
                }
                let n = (avail - tail).min(BATCH);
                for t in tail..tail + n {
                    let s = mem.get_slice(at(t), template.len()).expect("slot");
                    if (&q).write_volatile(&s).is_ok() {
                        sent += 1;
                    }
                }
                tail += n;
                consumed.0.store(tail, Ordering::Release);
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

/// Lines for the cold floor next to a benchmark's other floors: `len`
/// bytes each, measured in `ns`.
pub fn cold_tx_report(ns: &Netns, sizes: &[usize], secs: f64) -> String {
    let mut out = String::from(
        "\ncold-cache tx floor (one write per frame on CPU 1; each frame written by CPU 0 \
         just before, published 32 at a time into a 256-slot ring; pinned hot floor alongside):\n",
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
