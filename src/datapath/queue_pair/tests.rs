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

use std::os::fd::AsFd;

use crate::testing::unit::world::World;
use vhost_user_backend::VringT;

/// Runs RX and TX both with more than a budget of work (the tap through
/// `tap_io`, which must come out as `mode`); returns the largest lead one
/// direction had in frames.
fn worst_lead_with_both_busy(tap_io: crate::host::tap::TapIo, mode: &str) -> u64 {
    let mut w = World::new(1024, [Policy::Immediate; 2]);
    assert_eq!(w.pair.set_tap_io(tap_io), mode);
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
    worst
}

#[test]
fn rx_and_tx_take_turns_when_both_spend_their_budget() {
    // One turn is one budget; a direction may be at most one turn ahead.
    let worst = worst_lead_with_both_busy(crate::host::tap::TapIo::Syscall, "syscall");
    assert!(
        worst <= BUDGET_FRAMES,
        "one direction got extra turns (worst lead {worst} frames)"
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
    assert_eq!(w.stats.queues[1].interrupts_sent.get(), 1);
    // The timer was disarmed: nothing fires later.
    while w.step(20) {}
    assert_eq!(w.interrupts(1), 0);
}

#[test]
fn a_pair_holds_one_interrupt_at_most() {
    // A guest waiting for either ring (Linux's RX NAPI also reclaims TX)
    // would otherwise wait for both holds.
    let mut w = World::new(256, [HOLD_1S; 2]);
    w.transmit(3);
    assert_eq!(w.interrupts(1), 0, "TX held by the policy");

    w.post_rx(8);
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xa5; 60]);
    w.inject(&frame);
    w.kick(0);
    while w.frames(0) < 1 {
        assert!(w.step(1000), "the worker stalled");
    }

    assert_eq!(w.interrupts(0), 1, "RX signalled at once: TX holds already");
    assert_eq!(w.interrupts(1), 0, "TX still held");
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

#[test]
fn a_new_call_fd_on_a_ring_with_a_past_gets_an_interrupt() {
    // QEMU starting a ring on a new connection (a migration's destination,
    // a restarted daemon): the call fd is its masked notifier until it
    // sends the guest's; it discards what the masked notifier got in
    // between. The restart signal may land there, so the guest's own fd
    // gets one too.
    let mut w = World::new(256, [Policy::Immediate; 2]);
    w.transmit(3);
    let _ = w.interrupts(1);
    w.rings[1].set_used_event(&w.mem, 1);
    w.pair.ring_reset(1);
    w.kick(1);
    assert!(w.step(1000));
    assert_eq!(
        w.interrupts(1),
        1,
        "the restart signal, on the masked notifier"
    );

    let guest =
        nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_NONBLOCK).unwrap();
    let file = std::fs::File::from(guest.as_fd().try_clone_to_owned().unwrap());
    w.vrings[1].set_call(Some(file));

    assert_eq!(guest.read().unwrap_or(0), 1, "the guest's fd got one too");
}

#[test]
fn a_call_fd_on_a_ring_without_a_past_sends_nothing() {
    let w = World::new(256, [Policy::Immediate; 2]);
    let guest =
        nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_NONBLOCK).unwrap();
    let file = std::fs::File::from(guest.as_fd().try_clone_to_owned().unwrap());
    w.vrings[1].set_call(Some(file));

    assert!(
        guest.read().is_err(),
        "nothing to tell a fresh ring's guest"
    );
}

/// Holds an interrupt for up to 50 ms (64 frames): long beside a step,
/// even on a loaded machine.
const HOLD_50MS: Policy = Policy::Frames {
    frames: 64,
    usecs: 50_000,
};

#[test]
fn a_busy_worker_ends_a_hold_at_its_deadline_without_arming_a_timer() {
    // Arming a timer is a hypervisor exit on a VM's host; while a resume is
    // pending the worker checks its holds after every event instead.
    let mut w = World::new(1024, [Policy::Immediate, HOLD_50MS]);
    w.post_rx(1024);
    w.fill_tap();
    w.kick(0);
    assert!(w.step(1000));
    assert!(w.pair.conn.as_ref().unwrap().rings[RX].pending, "RX busy");
    w.queue_tx(3);
    w.kick(1);
    let start = Instant::now();
    while w.frames(1) < 3 {
        assert!(w.step(1000), "the worker stalled");
    }
    let mut busy_steps = 0;
    while w.interrupts(1) == 0 {
        let conn = w.pair.conn.as_ref().unwrap();
        assert!(
            conn.rings[RX].pending,
            "RX ran out of work before the deadline"
        );
        assert_eq!(conn.rings[TX].timer_deadline, None, "a timer was armed");
        w.fill_tap();
        std::thread::sleep(std::time::Duration::from_millis(4));
        assert!(w.step(1000), "the worker stalled");
        busy_steps += 1;
    }
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(50),
        "signalled before the policy's bound"
    );
    assert!(busy_steps > 1, "the hold ended at once");
    assert_eq!(w.stats.queues[1].interrupts_sent.get(), 1);
}

#[test]
fn an_idle_worker_covers_a_hold_with_its_timer() {
    let mut w = World::new(256, [Policy::Immediate, HOLD_50MS]);
    w.transmit(3);
    assert_eq!(w.interrupts(1), 0, "held by the policy");
    assert!(
        w.pair.conn.as_ref().unwrap().rings[TX]
            .timer_deadline
            .is_some(),
        "nothing else wakes an idle worker"
    );
    while w.interrupts(1) == 0 {
        assert!(w.step(1000), "the held interrupt was never sent");
    }
}

#[test]
fn tap_io_auto_writes_through_a_ring_and_the_counters_say_so() {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(w.pair.set_tap_io(crate::host::tap::TapIo::Auto), "uring");
    w.queue_tx(100);
    w.kick(1);
    assert!(w.step(1000));
    while w.step(0) {}
    assert_eq!(w.frames(1), 100);
    let mut buf = [0u8; 2048];
    let mut read = 0;
    while std::io::Read::read(&mut w.peer, &mut buf).is_ok() {
        read += 1;
    }
    assert_eq!(read, 100);
    let text = w.stats.prometheus();
    assert!(text.contains("vhost_user_net_tap_io_info{queue=\"0\",dir=\"rx\",mode=\"uring\"} 1"));
    assert!(text.contains("vhost_user_net_tap_io_info{queue=\"1\",dir=\"tx\",mode=\"uring\"} 1"));
    let table = crate::stats::format::table(&w.stats.snapshot(), None);
    assert!(table.contains("uring"), "{table}");
}

#[test]
fn refused_io_uring_falls_back_to_writev_and_says_so() {
    for errno in [libc::EPERM, libc::ENOSYS] {
        let mut w = World::new(256, [Policy::Immediate; 2]);
        crate::host::sys::refuse::set(Some(errno));
        let mode = w.pair.set_tap_io(crate::host::tap::TapIo::Uring);
        crate::host::sys::refuse::set(None);
        assert_eq!(mode, "syscall");
        assert!(w
            .stats
            .prometheus()
            .contains("vhost_user_net_tap_io_info{queue=\"1\",dir=\"tx\",mode=\"syscall\"} 1"));
        w.queue_tx(10);
        w.kick(1);
        assert!(w.step(1000));
        assert_eq!(w.frames(1), 10);
    }
}

#[test]
fn with_io_uring_rx_and_tx_still_take_turns_when_both_spend_their_budget() {
    let worst = worst_lead_with_both_busy(crate::host::tap::TapIo::Uring, "uring");
    assert!(worst <= BUDGET_FRAMES, "worst lead {worst} frames");
}

#[test]
fn with_posted_rx_reads_rx_and_tx_still_take_turns_when_both_spend_their_budget() {
    // Failed before RX looked for the frames its arming read inline: TX
    // got two or three turns for each of RX's.
    let worst = worst_lead_with_both_busy(crate::host::tap::TapIo::Posted, "uring");
    assert!(worst <= BUDGET_FRAMES, "worst lead {worst} frames");
}

/// Sets the pair up with io_uring and posted reads asked for, on a kernel
/// without them (before 6.7): RX reads by rounds. Returns the mode.
fn uring_by_rounds(w: &mut World) -> &'static str {
    crate::host::sys::refuse::set_posted(Some(libc::EINVAL));
    let mode = w.pair.set_tap_io(crate::host::tap::TapIo::Posted);
    crate::host::sys::refuse::set_posted(None);
    assert!(w.pair.rx_uring.as_ref().unwrap().posted_fd().is_none());
    mode
}

/// A frame for RX: header (flags 0) and `len` bytes of `fill`.
fn rx_frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend(std::iter::repeat_n(fill, len));
    f
}

/// The RX used entries so far, with the first payload byte of each
/// chain's buffer (slot `i` of 2048 bytes holds chain `i`).
fn rx_used(w: &mut World) -> Vec<(u16, u32, u8, u16)> {
    use vm_memory::Bytes;
    std::iter::from_fn(|| w.rings[0].pop_used(&w.mem))
        .map(|u| {
            let at = crate::testing::unit::buf_addr(usize::from(u.head), 2048);
            let first: u8 = w.mem.read_obj(vm_memory::GuestAddress(at.0 + 12)).unwrap();
            let num_buffers: u16 = w.mem.read_obj(vm_memory::GuestAddress(at.0 + 10)).unwrap();
            (u.head, u.len, first, num_buffers)
        })
        .collect()
}

#[test]
fn uring_rx_reads_a_round_of_frames_in_one_enter_in_the_order_of_the_chains() {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(uring_by_rounds(&mut w), "uring");
    w.post_rx(32);
    for i in 0..20u8 {
        w.inject(&rx_frame(60 + usize::from(i), i + 1));
    }
    w.kick(0);
    while w.frames(0) < 20 {
        assert!(w.step(1000), "the worker stalled");
    }
    let used = rx_used(&mut w);
    assert_eq!(used.len(), 20);
    for (i, &(head, len, first, num_buffers)) in used.iter().enumerate() {
        let i = u16::try_from(i).unwrap();
        assert_eq!(head, i, "chains used in the order they were made available");
        assert_eq!(len, 12 + 60 + u32::from(i));
        assert_eq!(first, u8::try_from(i).unwrap() + 1);
        assert_eq!(num_buffers, 1);
    }
    let s = &w.stats.queues[0];
    assert_eq!(s.frames.get(), 20);
    assert_eq!(s.tap_eagain.get(), 1, "the round that found the tap empty");
    let rounds = w.pair.rx_uring.as_ref().unwrap().rounds;
    assert_eq!(
        rounds, 2,
        "8 frames, then 16 reads: 12 frames (and the empty tap)"
    );
    assert_eq!(
        w.pair.rx_uring.as_ref().unwrap().round(),
        crate::datapath::rx::URING_MIN_READS.max(12 + 12 / 4 + 2),
        "the next round expects what the tap held"
    );
    // The chains not used went back to the ring for the next frames.
    w.inject(&rx_frame(60, 0x77));
    while w.frames(0) < 21 {
        assert!(w.step(1000), "the worker stalled");
    }
    assert_eq!(rx_used(&mut w)[..], [(20, 72, 0x77, 1)]);
}

#[test]
fn uring_rx_a_dropped_frame_leaves_its_chain_to_the_next_frame() {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(uring_by_rounds(&mut w), "uring");
    w.post_rx(8);
    // Longer than the guest may receive (1518 + header): read into the
    // second chain and dropped; the third frame goes into that chain.
    w.inject(&rx_frame(60, 1));
    w.inject(&rx_frame(2000, 2));
    w.inject(&rx_frame(70, 3));
    w.kick(0);
    while w.frames(0) < 2 {
        assert!(w.step(1000), "the worker stalled");
    }
    assert_eq!(rx_used(&mut w), [(0, 72, 1, 1), (1, 82, 3, 1)]);
    assert_eq!(w.stats.queues[0].rx_dropped_oversize_frames.get(), 1);
    assert_eq!(w.stats.queues[0].frames.get(), 2);
    assert_eq!(w.pair.rx_uring.as_ref().unwrap().rounds, 1);
}

#[test]
fn uring_rx_with_chains_shorter_than_a_frame_reads_frame_by_frame() {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(uring_by_rounds(&mut w), "uring");
    w.pair.set_rx_params(RxParams {
        hdr_len: 12,
        mergeable: true,
        max_frame: 12 + 1518,
        max_plain_frame: 12 + 1518,
    });
    crate::testing::unit::add_rx_buffers(&w.mem, &mut w.rings[0], 8, 1024);
    w.inject(&rx_frame(1500, 9));
    w.inject(&rx_frame(60, 8));
    w.kick(0);
    while w.frames(0) < 2 {
        assert!(w.step(1000), "the worker stalled");
    }
    let used: Vec<(u16, u32)> = std::iter::from_fn(|| w.rings[0].pop_used(&w.mem))
        .map(|u| (u.head, u.len))
        .collect();
    assert_eq!(used, [(0, 1024), (1, 488), (2, 72)]);
    assert_eq!(w.pair.rx_uring.as_ref().unwrap().rounds, 0);
}

#[test]
fn uring_rx_rounds_follow_the_frames_in_the_tap_within_the_budget() {
    let mut w = World::new(1024, [Policy::Immediate; 2]);
    assert_eq!(uring_by_rounds(&mut w), "uring");
    w.post_rx(512);
    // 100 frames: rounds of 8, 16, 32 reads fill up, then the budget
    // (64 frames per batch) leaves 8; the next batch reads the other 36.
    for i in 0..100u8 {
        w.inject(&rx_frame(60, i));
    }
    w.kick(0);
    while w.frames(0) < 100 {
        assert!(w.step(1000), "the worker stalled");
    }
    let used = rx_used(&mut w);
    assert_eq!(used.len(), 100);
    for (i, &(head, _, first, _)) in used.iter().enumerate() {
        assert_eq!(usize::from(head), i);
        assert_eq!(usize::from(first), i);
    }
    let st = w.pair.rx_uring.as_ref().unwrap();
    assert_eq!(st.rounds, 5, "8 + 16 + 32 + 8, then 36 of 64 reads");
    assert_eq!(w.stats.queues[0].batches.get(), 2, "the budget split them");
    assert_eq!(st.round(), 36 + 36 / 4 + 2);
    // A tap that stays empty shrinks the rounds back, slowly.
    for _ in 0..8 {
        w.inject(&rx_frame(60, 0));
        let target = w.frames(0) + 1;
        while w.frames(0) < target {
            assert!(w.step(1000), "the worker stalled");
        }
    }
    assert_eq!(
        w.pair.rx_uring.as_ref().unwrap().round(),
        crate::datapath::rx::URING_MIN_READS
    );
}

#[test]
fn uring_rx_a_frame_longer_than_a_whole_buffer_is_dropped_not_delivered_cut() {
    // One 2048-byte buffer per chain, above the 1530 bytes the guest may
    // receive: reads go without the overflow byte, and a frame the tap
    // cuts to the buffer is still longer than the guest may receive.
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(uring_by_rounds(&mut w), "uring");
    w.post_rx(4);
    w.inject(&rx_frame(3000, 1));
    w.inject(&rx_frame(2048 - 12, 2));
    w.inject(&rx_frame(1518, 3));
    w.kick(0);
    while w.frames(0) < 1 {
        assert!(w.step(1000), "the worker stalled");
    }
    assert_eq!(rx_used(&mut w), [(0, 12 + 1518, 3, 1)]);
    assert_eq!(w.stats.queues[0].rx_dropped_oversize_frames.get(), 2);
    assert_eq!(w.pair.rx_uring.as_ref().unwrap().rounds, 1);
}

/// A pair reading RX by io_uring rounds, `frames` frames in the tap, and
/// `fail` set to make the round's `io_uring_enter` fail (EINVAL); returns
/// once the guest got the frames.
fn rx_round_that_fails(frames: u8, fail: fn(i32)) -> World {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(uring_by_rounds(&mut w), "uring");
    w.post_rx(32);
    for i in 1..=frames {
        w.inject(&rx_frame(60, i));
    }
    fail(libc::EINVAL);
    w.kick(0);
    while w.frames(0) < u64::from(frames) {
        assert!(w.step(1000), "the worker stalled");
    }
    w
}

#[test]
fn a_ring_that_fails_in_an_rx_round_is_dropped_for_both_directions() {
    // The failed round's reads stay in the submission queue: TX must not
    // submit them with its next writes (they point into buffers the guest
    // may have remapped by then, and their completions would pass for
    // TX's).
    let mut w = rx_round_that_fails(1, crate::host::sys::refuse::fail_next_enter);

    assert!(w.pair.tx_uring.is_none(), "TX kept the failed ring");
    assert!(w.pair.rx_uring.is_none());
    let metrics = w.stats.prometheus();
    assert!(
        metrics.contains("vhost_user_net_tap_io_info{queue=\"0\",dir=\"rx\",mode=\"syscall\"} 1"),
        "{metrics}"
    );
    // Both directions go on with plain syscalls.
    w.transmit(5);
    w.inject(&rx_frame(60, 2));
    while w.frames(0) < 2 {
        assert!(w.step(1000), "the worker stalled");
    }
    assert_eq!(w.stats.queues[1].frames.get(), 5);
}

#[test]
fn frames_read_before_the_ring_failed_reach_the_guest() {
    // The kernel made the round's reads (a tap's complete inline) and then
    // `io_uring_enter` failed before reporting them: the frames are in
    // the guest's buffers already and must be delivered, not lost.
    let w = rx_round_that_fails(2, crate::host::sys::refuse::fail_next_enter_after_submit);

    assert!(w.pair.rx_uring.is_none(), "the ring is dropped");
    assert_eq!(w.stats.queues[0].tap_errors.get(), 0);
    assert_eq!(w.stats.queues[0].rx_dropped_frames.get(), 0);
}

fn next_avail(w: &World, ring: usize) -> u16 {
    w.vrings[ring].get_ref().get_queue().next_avail()
}

/// A pair with posted RX reads and `n` 2 KiB RX buffers posted to the
/// kernel (the tap still empty): RX waits on the reads' ring.
fn posted_world(n: usize) -> World {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(w.pair.set_tap_io(crate::host::tap::TapIo::Posted), "uring");
    w.post_rx(n);
    w.kick(0);
    assert!(w.step(1000));
    assert!(
        w.pair.rx_uring.as_ref().unwrap().posted_fd().is_some(),
        "RX waits on its posted reads"
    );
    assert_eq!(usize::from(next_avail(&w, 0)), n, "every chain posted");
    let metrics = w.stats.prometheus();
    for (q, dir, mode) in [(0, "rx", "posted"), (1, "tx", "uring")] {
        let line = format!("tap_io_info{{queue=\"{q}\",dir=\"{dir}\",mode=\"{mode}\"}} 1");
        assert!(metrics.contains(&line), "{metrics}");
    }
    w
}

#[test]
fn posted_reads_deliver_frames_that_arrive_while_the_worker_waits_in_ring_order() {
    let mut w = posted_world(8);
    for fill in 1..=3 {
        w.inject(&rx_frame(60, fill));
    }
    while w.frames(0) < 3 {
        assert!(w.step(1000), "the worker stalled");
    }

    assert_eq!(
        rx_used(&mut w),
        [(0, 72, 1, 1), (1, 72, 2, 1), (2, 72, 3, 1)]
    );
    assert_eq!(w.stats.queues[0].rx_posted_frames.get(), 3);
    assert_eq!(
        w.stats.queues[0].tap_eagain.get(),
        0,
        "no read found it empty"
    );
}

#[test]
fn posted_reads_drop_an_oversize_frame_and_complete_its_chain_empty() {
    let mut w = posted_world(4);
    w.inject(&rx_frame(2000, 1)); // above the 1518-byte frames the guest takes
    w.inject(&rx_frame(60, 2));
    while w.frames(0) < 1 {
        assert!(w.step(1000), "the worker stalled");
    }

    assert_eq!(rx_used(&mut w), [(0, 0, 1, 0), (1, 72, 2, 1)]);
    assert_eq!(w.stats.queues[0].rx_dropped_oversize_frames.get(), 1);
}

#[test]
fn a_ring_stop_takes_posted_chains_back_and_drops_what_they_read() {
    let mut w = posted_world(8);
    w.inject(&rx_frame(60, 1));
    w.inject(&rx_frame(60, 2));
    // The kernel read them into the posted chains already (the read runs
    // as the injecting thread returns from its write); nothing delivered.
    assert_eq!(w.frames(0), 0);

    w.pair.ring_stopped(0);

    assert_eq!(
        next_avail(&w, 0),
        0,
        "every posted chain is the guest's again"
    );
    assert_eq!(w.stats.queues[0].rx_dropped_frames.get(), 2);
    assert!(w.pair.rx_uring.as_ref().unwrap().posted_fd().is_none());
    restarts_from_the_first_chain(&mut w, 3);
}

/// The RX ring, its posted chains taken back, goes on from its first
/// chain: the chains are posted afresh and a frame (filled with `fill`)
/// lands in the first.
fn restarts_from_the_first_chain(w: &mut World, fill: u8) {
    w.kick(0);
    assert!(w.step(1000));
    w.inject(&rx_frame(60, fill));
    while w.frames(0) < 1 {
        assert!(w.step(1000), "the worker stalled");
    }
    assert_eq!(rx_used(w), [(0, 72, fill, 1)]);
}

#[test]
fn a_new_memory_table_takes_posted_chains_back() {
    let mut w = posted_world(8);

    w.pair.memory_changed();

    assert_eq!(next_avail(&w, 0), 0);
    restarts_from_the_first_chain(&mut w, 4);
}

#[test]
fn chains_too_short_to_post_are_read_by_rounds_instead() {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(w.pair.set_tap_io(crate::host::tap::TapIo::Posted), "uring");
    crate::testing::unit::add_rx_buffers(&w.mem, &mut w.rings[0], 8, 1024);
    w.inject(&rx_frame(60, 1));
    w.kick(0);
    while w.frames(0) < 1 {
        assert!(w.step(1000), "the worker stalled");
    }

    assert_eq!(w.stats.queues[0].rx_posted_frames.get(), 0);
    assert!(w.pair.rx_uring.as_ref().unwrap().posted_fd().is_none());
    assert_eq!(next_avail(&w, 0), 1, "the other chains wait in the ring");
    assert!(
        w.stats
            .prometheus()
            .contains("tap_io_info{queue=\"0\",dir=\"rx\",mode=\"uring\"} 1"),
        "RX no longer says posted"
    );
}

#[test]
fn tap_io_uring_reads_by_rounds_where_posted_reads_would_do() {
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(w.pair.set_tap_io(crate::host::tap::TapIo::Uring), "uring");
    w.post_rx(8);
    w.inject(&rx_frame(60, 1));
    w.kick(0);
    while w.frames(0) < 1 {
        assert!(w.step(1000), "the worker stalled");
    }

    assert_eq!(w.stats.queues[0].rx_posted_frames.get(), 0);
    assert_eq!(w.pair.rx_uring.as_ref().unwrap().rounds, 1);
}

#[test]
fn rx_goes_on_without_a_kick_after_a_new_memory_table_took_its_posted_chains() {
    // The guest gave those chains long ago: it will not kick for them.
    let mut w = posted_world(8);

    w.pair.memory_changed();
    w.inject(&rx_frame(60, 5));

    while w.frames(0) < 1 {
        assert!(w.step(1000), "RX stalled: nothing woke it");
    }
    assert_eq!(rx_used(&mut w), [(0, 72, 5, 1)]);
}

#[test]
fn a_bad_chain_behind_posted_chains_is_completed_in_its_turn() {
    use crate::testing::unit::{add_rx_buffers_at, add_tx_frame};
    let mut w = World::new(256, [Policy::Immediate; 2]);
    assert_eq!(w.pair.set_tap_io(crate::host::tap::TapIo::Posted), "uring");
    add_rx_buffers_at(&w.mem, &mut w.rings[0], 0..2, 2048);
    // A chain the device may not write (the guest got it wrong).
    add_tx_frame(&w.mem, &mut w.rings[0], 2, &[0; 60]);
    add_rx_buffers_at(&w.mem, &mut w.rings[0], 3..5, 2048);
    w.kick(0);
    assert!(w.step(1000));
    assert_eq!(next_avail(&w, 0), 2, "posted up to the bad chain");

    for fill in 1..=3 {
        w.inject(&rx_frame(60, fill));
    }
    while w.frames(0) < 3 {
        assert!(w.step(1000), "the worker stalled");
    }

    let used: Vec<_> = rx_used(&mut w).iter().map(|u| (u.0, u.1)).collect();
    assert_eq!(used, [(0, 72), (1, 72), (2, 0), (3, 72)]);
    assert_eq!(w.stats.queues[0].bad_chains.get(), 1);
    w.pair.ring_stopped(0);
    assert_eq!(next_avail(&w, 0), 4, "the posted 5th chain is given back");
}
