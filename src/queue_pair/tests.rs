use super::*;

#[test]
fn event_ids_avoid_the_framework_reserved_range() {
    for queues in [2, 4, 16] {
        for e in [Event::TapReadable, Event::TapWritable, Event::Resume] {
            assert!(e.id(queues) > queues as u64, "{e:?} with {queues} queues");
        }
        for e in [
            Event::RxKick,
            Event::TxKick,
            Event::TapReadable,
            Event::TapWritable,
            Event::Resume,
        ] {
            let id = u16::try_from(e.id(queues)).unwrap();
            assert_eq!(Event::from_id(id, queues), Some(e));
        }
    }
}

#[test]
fn reserved_exit_id_is_not_one_of_our_events() {
    assert_eq!(Event::from_id(4, 4), None);
}

/// A worker's world without the framework: guest memory with an RX and a TX
/// ring, the pair on a SOCK_SEQPACKET "tap", and a real epoll standing in
/// for the framework's (kick fds at ids 0 and 1, the pair's own fds at the
/// ids it registers).
mod world {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, AsRawFd};
    use std::sync::Arc;

    use nix::sys::eventfd::{EfdFlags, EventFd};
    use vhost_user_backend::VringT;
    use vm_memory::{GuestAddress, GuestMemoryAtomic};
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    use crate::driver::SplitRing;
    use crate::guest::GuestMem;
    use crate::notify::Policy;
    use crate::queue_pair::{Event, Listeners, QueuePair};
    use crate::rx::RxParams;
    use crate::stats::{QueueStats, Stats};
    use crate::testutil::{add_rx_buffers, add_tx_frame, memory, tap_pair, RING_BASE};
    use crate::vring::NetVring;

    pub struct EpollListeners(pub Epoll);

    impl Listeners for EpollListeners {
        fn register(&self, fd: i32, events: EventSet, id: u64) -> std::io::Result<()> {
            self.0
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, id))
        }
        fn unregister(&self, fd: i32, events: EventSet, id: u64) -> std::io::Result<()> {
            self.0
                .ctl(ControlOperation::Delete, fd, EpollEvent::new(events, id))
        }
    }

    pub struct World {
        pub mem: GuestMem,
        pub rings: [SplitRing; 2],
        pub vrings: [NetVring; 2],
        pub kicks: [EventFd; 2],
        pub calls: [EventFd; 2],
        pub pair: QueuePair,
        pub peer: File,
        pub stats: Arc<Stats>,
        pub epoll: Arc<EpollListeners>,
    }

    fn eventfd() -> EventFd {
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap()
    }

    /// A second handle on `e`, as the framework holds it.
    fn eventfd_file(e: &EventFd) -> File {
        File::from(e.as_fd().try_clone_to_owned().unwrap())
    }

    impl World {
        /// Rings of `size` entries, event index on, the given policies.
        pub fn new(size: u16, policies: [Policy; 2]) -> World {
            let mem = memory();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            let rings = [0u64, 1]
                .map(|i| SplitRing::new(&mem, GuestAddress(RING_BASE + i * 0x1_0000), size));
            let kicks = [0, 1].map(|_| eventfd());
            let calls = [0, 1].map(|_| eventfd());
            let vrings = [0, 1].map(|i| {
                let v = <NetVring as VringT<_>>::new(atomic.clone(), size).unwrap();
                let r = &rings[i];
                v.set_queue_size(size);
                v.set_queue_info(r.desc_addr().0, r.avail_addr().0, r.used_addr().0)
                    .unwrap();
                v.set_queue_event_idx(true);
                v.set_queue_ready(true);
                v.set_enabled(true);
                v.set_kick(Some(eventfd_file(&kicks[i])));
                v.set_call(Some(eventfd_file(&calls[i])));
                v
            });
            let (tap, peer) = tap_pair();
            let stats = Arc::new(Stats::new(2, [String::new(), String::new()]));
            let mut pair = QueuePair::new(0, 2, tap, stats.clone(), policies).unwrap();
            pair.set_rx_params(RxParams {
                hdr_len: 12,
                mergeable: false,
                max_frame: 12 + 1518,
                max_plain_frame: 12 + 1518,
            });
            let epoll = Arc::new(EpollListeners(Epoll::new().unwrap()));
            for (id, k) in kicks.iter().enumerate() {
                epoll
                    .0
                    .ctl(
                        ControlOperation::Add,
                        k.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, id as u64),
                    )
                    .unwrap();
            }
            pair.connect(atomic, epoll.clone()).unwrap();
            World {
                mem,
                rings,
                vrings,
                kicks,
                calls,
                pair,
                peer,
                stats,
                epoll,
            }
        }

        pub fn frames(&self, ring: usize) -> u64 {
            QueueStats::get(&self.stats.queues[ring].frames)
        }

        pub fn interrupts(&self, ring: usize) -> u64 {
            self.calls[ring].read().unwrap_or(0)
        }

        /// Posts `count` RX buffers of 2048 bytes.
        pub fn post_rx(&mut self, count: usize) {
            add_rx_buffers(&self.mem, &mut self.rings[0], count, 2048);
        }

        /// Queues `count` 60-byte TX frames (in buffer slots after the RX
        /// buffers) and publishes them.
        pub fn queue_tx(&mut self, count: usize) {
            for i in 0..count {
                add_tx_frame(&self.mem, &mut self.rings[1], 2048 + i, &[0x5a; 60]);
            }
            self.rings[1].publish(&self.mem);
        }

        /// Writes frames into the tap until its buffer is full.
        pub fn fill_tap(&mut self) {
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&[0xa5; 60]);
            while self.peer.write(&frame).is_ok() {}
        }

        /// Reads everything the pair wrote to the tap.
        pub fn drain_tap(&mut self) {
            let mut buf = [0u8; 2048];
            while self.peer.read(&mut buf).is_ok() {}
        }

        /// Waits for the next ready event (at most `ms`) and hands it to the
        /// pair as the framework would. `false`: nothing was ready.
        pub fn step(&mut self, ms: i32) -> bool {
            let mut events = [EpollEvent::default(); 1];
            let n = self.epoll.0.wait(ms, &mut events).unwrap();
            if n == 0 {
                return false;
            }
            let id = u16::try_from(events[0].data()).unwrap();
            if usize::from(id) < 2 {
                self.vrings[usize::from(id)].read_kick().unwrap();
            }
            let event = Event::from_id(id, 2).expect("one of ours");
            self.pair.handle(event, &self.vrings);
            true
        }

        pub fn kick(&self, ring: usize) {
            self.kicks[ring].write(1).unwrap();
        }

        /// Queues `count` TX frames, kicks, and runs the worker until they
        /// are on the tap.
        pub fn transmit(&mut self, count: usize) {
            let target = self.frames(1) + count as u64;
            self.queue_tx(count);
            self.kick(1);
            while self.frames(1) < target {
                assert!(self.step(1000), "the worker stalled");
            }
        }
    }
}

use std::os::fd::AsFd;

use vhost_user_backend::VringT;
use world::World;

#[test]
fn rx_and_tx_take_turns_when_both_spend_their_budget() {
    let mut w = World::new(1024, [Policy::Immediate; 2]);
    w.post_rx(1024);
    // The tap is empty at first: RX waits for it (level-triggered).
    w.kick(0);
    assert!(w.step(1000));
    w.queue_tx(1024);
    w.fill_tap();
    w.kick(1);
    let mut worst = 0u64;
    while w.frames(0) + w.frames(1) < 1024 {
        assert!(w.step(1000), "the worker stalled");
        w.drain_tap();
        w.fill_tap();
        worst = worst.max(w.frames(0).abs_diff(w.frames(1)));
    }
    // One turn is one budget; a direction may be at most one turn ahead.
    assert!(
        worst <= BUDGET_FRAMES,
        "one direction got extra turns: RX {} vs TX {} frames (worst gap {worst})",
        w.frames(0),
        w.frames(1)
    );
}

/// Holds an interrupt for up to a second (64 frames).
const HOLD_1S: Policy = Policy::Frames {
    frames: 64,
    usecs: 1_000_000,
};

#[test]
fn held_interrupt_is_signalled_when_the_ring_stops() {
    let mut w = World::new(256, [HOLD_1S; 2]);
    w.transmit(5);
    assert_eq!(w.interrupts(1), 0, "held by the policy");

    w.pair.ring_stopped(1);

    assert_eq!(w.interrupts(1), 1, "signalled at the stop");
    assert_eq!(QueueStats::get(&w.stats.queues[1].interrupts_sent), 1);
    // The timer was disarmed: nothing fires later.
    while w.step(20) {}
    assert_eq!(w.interrupts(1), 0);
}

#[test]
fn held_interrupt_is_signalled_when_the_frontend_disconnects() {
    let mut w = World::new(256, [HOLD_1S; 2]);
    w.transmit(3);
    assert_eq!(w.interrupts(1), 0, "held by the policy");

    w.pair.disconnect();

    assert_eq!(w.interrupts(1), 1);
}

#[test]
fn first_decision_after_a_restart_signals_although_used_event_lies_behind() {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    w.transmit(4);
    let _ = w.interrupts(1);
    // The guest asks for an interrupt at entry 2 (already passed): the
    // interrupt for it went to a call fd that no longer exists, e.g. the
    // previous daemon's. Nothing new is published after the restart.
    w.rings[1].set_used_event(&w.mem, 2);
    w.pair.ring_reset(1);

    w.kick(1);
    assert!(w.step(1000));

    assert_eq!(w.interrupts(1), 1, "the restarted ring signals once");
    // And only once: the next batch judges used_event as usual.
    w.kick(1);
    assert!(w.step(1000));
    assert_eq!(w.interrupts(1), 0);
}

#[test]
fn a_ring_that_starts_at_index_zero_gets_no_spurious_interrupt() {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    w.rings[1].set_used_event(&w.mem, 100);
    w.kick(1);
    assert!(w.step(1000));
    w.queue_tx(1);
    w.kick(1);
    assert!(w.step(1000));
    assert_eq!(w.frames(1), 1);
    assert_eq!(w.interrupts(1), 0, "used_event 100 is not reached");
}

#[test]
fn interrupt_decided_before_the_frontend_gives_the_call_fd_is_sent_when_it_does() {
    // QEMU restarts a ring with KICK before CALL, and the crate dropped the
    // old call fd at GET_VRING_BASE: a batch in between has nowhere to
    // signal.
    let mut w = World::new(256, [Policy::Immediate; 2]);
    w.vrings[1].set_call(None);
    w.transmit(2);
    assert_eq!(w.interrupts(1), 0, "no call fd yet");

    let call = w.calls[1].as_fd().try_clone_to_owned().unwrap();
    w.vrings[1].set_call(Some(std::fs::File::from(call)));

    assert_eq!(
        w.interrupts(1),
        1,
        "the owed interrupt is sent with the call fd"
    );
}
