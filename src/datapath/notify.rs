//! When to interrupt the guest: the only place that decides.
//!
//! One decision per batch, after the batch's used entries are published.
//! With `VIRTIO_RING_F_EVENT_IDX` the guest's `used_event` says how far the
//! device may go before it wants an interrupt (`vring_need_event`); without
//! it, the guest's `VRING_AVAIL_F_NO_INTERRUPT` flag says whether it wants
//! any (virtio-queue ignores that flag; we honour it).
//!
//! On top of the guest's wish, a [`Coalescer`] applies the direction's
//! [`Policy`]: signal at once, or hold the interrupt for more completions
//! (bounded in count and time). It never signals what the guest did not ask
//! for, never holds an interrupt past the policy's time bound, and never holds
//! one while more than half the ring is completed but unsignalled.
//!
//! Two rules make sure no interrupt is ever lost across a ring's life:
//! - a held interrupt is resolved (signalled) when the ring stops, the
//!   device resets, the frontend goes away or the timer cannot be armed:
//!   [`Coalescer::take_held`] hands it to the caller, who still has the call fd;
//! - the first decision after the ring (re)starts signals if entries were
//!   published on the ring before it, whatever the guest's `used_event` says: the
//!   guest may be waiting on an entry whose interrupt went to a previous
//!   call fd or a previous daemon, and the formula over the new batch alone
//!   would never be satisfied again (the kernel's vhost and DPDK clear
//!   `signalled_used_valid` on restart for the same reason).

use std::fmt;
use std::num::Wrapping;
use std::str::FromStr;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::datapath::guest::GuestMem;

/// `VRING_AVAIL_F_NO_INTERRUPT`, as the `u16` the avail ring's flags hold.
#[allow(clippy::cast_possible_truncation)] // bit 0
const AVAIL_F_NO_INTERRUPT: u16 = virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// The split-ring formula from the virtio spec (`vring_need_event`): the
/// guest wants an interrupt when `used_event` lies in `[old, new)`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    (Wrapping(new) - Wrapping(event) - Wrapping(1)) < (Wrapping(new) - Wrapping(old))
}

/// Whether the guest wants an interrupt for the used entries `old..new`.
/// `avail_ring` and `size` locate the guest's `flags` and `used_event`
/// fields. A failed read of those fields (the guest unmapped its own ring)
/// errs on the side of signalling.
pub fn guest_wants(
    mem: &GuestMem,
    avail_ring: GuestAddress,
    size: u16,
    event_idx: bool,
    old: u16,
    new: u16,
) -> bool {
    if old == new {
        return false;
    }
    // The used index store must be visible before we read the guest's
    // wishes, or we can miss an update it made after reading our index.
    fence(Ordering::SeqCst);
    if event_idx {
        let at = avail_ring.0 + 4 + 2 * u64::from(size);
        mem.load::<u16>(GuestAddress(at), Ordering::Relaxed)
            .map(|event| need_event(u16::from_le(event), new, old))
            .unwrap_or(true)
    } else {
        mem.load::<u16>(avail_ring, Ordering::Relaxed)
            .map(|flags| u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0)
            .unwrap_or(true)
    }
}

/// How a direction coalesces interrupts, as `--rx-coalesce` and
/// `--tx-coalesce` spell it:
///
/// ```
/// use vhost_user_net::datapath::notify::Policy;
///
/// let p: Policy = "frames=32,usecs=1000".parse().unwrap();
/// assert_eq!(p, Policy::Frames { frames: 32, usecs: 1000 });
/// assert_eq!(p.to_string(), "frames=32,usecs=1000");
/// assert!("frames=0,usecs=10".parse::<Policy>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Signal whenever the guest's event index asks.
    Immediate,
    /// Hold the interrupt until `frames` completions since the last
    /// interrupt, or `usecs` after the guest asked, whichever comes first.
    Frames { frames: u32, usecs: u32 },
    /// Signal at once while completions are sparse; while they are dense
    /// (at the recent rate, at least [`DENSE_FRAMES`] more are due within
    /// `usecs`), hold the interrupt the guest asked for until half the ring
    /// is waiting, until the stream pauses (no completion for [`IDLE_GAPS`]
    /// mean gaps, between [`IDLE_MIN`] and [`IDLE_MAX`]), or `usecs` after
    /// the guest asked, whichever comes first. A hold that the pause ended
    /// with fewer than [`DENSE_FRAMES`] completions was only a delay
    /// (request/response traffic): none for [`HOLD_OFF`] after it.
    Adaptive { usecs: u32 },
}

/// Default time bound of the adaptive policy.
pub const ADAPTIVE_DEFAULT_USECS: u32 = 250;

/// Adaptive: completions are dense when at least this many are due within
/// the policy's bound at the recent rate (with the default bound, above
/// 32,000 per second). Below that, holding would buy the guest little and
/// cost it latency.
pub const DENSE_FRAMES: u32 = 8;

/// Adaptive: a held interrupt goes out when no completion came for this
/// many mean gaps: the stream paused, and whatever the guest waits for is
/// not coming soon (it may be waiting for the interrupt before it sends
/// more).
pub const IDLE_GAPS: u32 = 2;

/// Adaptive: the shortest pause that counts as one (timer resolution and
/// scheduling jitter are a few microseconds).
pub const IDLE_MIN: Duration = Duration::from_micros(5);

/// Adaptive: the longest silence a hold waits through: what a guest
/// blocked on the interrupt may lose.
pub const IDLE_MAX: Duration = Duration::from_micros(20);

/// Adaptive: after a hold that only delayed (the stream paused before
/// [`DENSE_FRAMES`] completions), no holding for this long.
pub const HOLD_OFF: Duration = Duration::from_millis(2);

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Immediate => write!(f, "immediate"),
            Policy::Frames { frames, usecs } => write!(f, "frames={frames},usecs={usecs}"),
            Policy::Adaptive { usecs } => write!(f, "adaptive,usecs={usecs}"),
        }
    }
}

/// A policy string that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?}: expected immediate, frames=N,usecs=T (N 1-65535, T 1-1000000) or adaptive[,usecs=T]"
)]
pub struct PolicyError(String);

impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let err = || PolicyError(s.to_owned());
        let mut parts = s.split(',');
        let kind = parts.next().unwrap_or_default();
        let (mut frames, mut usecs) = (None, None);
        let mut adaptive = false;
        match kind {
            "immediate" if s == "immediate" => return Ok(Policy::Immediate),
            "adaptive" => adaptive = true,
            other => parse_kv(other, &mut frames, &mut usecs).ok_or_else(err)?,
        }
        for p in parts {
            parse_kv(p, &mut frames, &mut usecs).ok_or_else(err)?;
        }
        let usecs_ok = |u: u32| (1..=1_000_000).contains(&u);
        match (adaptive, frames, usecs) {
            (true, None, None) => Ok(Policy::Adaptive {
                usecs: ADAPTIVE_DEFAULT_USECS,
            }),
            (true, None, Some(u)) if usecs_ok(u) => Ok(Policy::Adaptive { usecs: u }),
            (false, Some(n), Some(u)) if (1..=65535).contains(&n) && usecs_ok(u) => {
                Ok(Policy::Frames {
                    frames: n,
                    usecs: u,
                })
            }
            _ => Err(err()),
        }
    }
}

fn parse_kv(p: &str, frames: &mut Option<u32>, usecs: &mut Option<u32>) -> Option<()> {
    let (k, v) = p.split_once('=')?;
    let v: u32 = v.parse().ok()?;
    let slot = match k {
        "frames" => frames,
        "usecs" => usecs,
        _ => return None,
    };
    slot.replace(v).is_none().then_some(())
}

/// What to do about the interrupt after a batch or a timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send an interrupt now.
    Signal,
    /// The guest asked for none (or nothing is pending).
    Suppress,
    /// The guest wants one, the policy holds it until this instant (or until
    /// a later batch decides otherwise).
    Defer(Instant),
}

/// Weight of a new sample in the adaptive policy's moving averages.
const EWMA_WEIGHT: f64 = 0.125;

/// Per-ring interrupt coalescing state.
#[derive(Debug)]
pub struct Coalescer {
    policy: Policy,
    /// Used index at the last final decision (signal or suppress): the
    /// guest's wish is evaluated over everything since. `None` until the
    /// ring's first batch.
    checked: Option<Wrapping<u16>>,
    /// Used index after the latest batch.
    latest: Wrapping<u16>,
    /// Completions since the last interrupt, whether or not the guest asked
    /// for one: a guest waiting for its buffers back sees none of them.
    unsignalled: u32,
    /// The guest consumes every completion before it asks for an interrupt
    /// (a receive ring): only completions since it last asked wait for it.
    receive: bool,
    /// When the guest first asked for the interrupt being held.
    first_unsignalled: Option<Instant>,
    /// Completions since the last final decision: what the held interrupt
    /// will tell the guest about.
    held: u32,
    /// No decision since the ring (re)started: the next one signals if
    /// anything was ever published on the ring.
    fresh: bool,
    /// When the last batch with completions ended.
    last_completion: Option<Instant>,
    /// Adaptive: no holding before this instant (a hold was futile).
    hold_off_until: Option<Instant>,
    /// Moving average of the time between completions, per completion.
    mean_gap_ns: f64,
}

impl Coalescer {
    /// For a ring whose guest may ask late for what it has not reclaimed
    /// (a transmit ring: Linux asks after 3/4 of what is outstanding), so
    /// every completion since the last interrupt may be waiting for it.
    pub fn new(policy: Policy) -> Self {
        Coalescer {
            policy,
            receive: false,
            checked: None,
            latest: Wrapping(0),
            unsignalled: 0,
            first_unsignalled: None,
            held: 0,
            fresh: true,
            last_completion: None,
            hold_off_until: None,
            mean_gap_ns: 0.0,
        }
    }

    /// For a receive ring: its guest polls everything before it re-arms
    /// its event index (NAPI), so the completions it polled without an
    /// interrupt are not waiting for one.
    pub fn for_receive(policy: Policy) -> Self {
        Coalescer {
            receive: true,
            ..Coalescer::new(policy)
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Whether an interrupt is being held.
    pub fn deferred(&self) -> bool {
        self.first_unsignalled.is_some()
    }

    /// Forgets any state (the ring was set up again); the next decision is
    /// a fresh start's. A held interrupt must have been taken with
    /// [`Coalescer::take_held`] first, or it is handed to that decision.
    pub fn reset(&mut self) {
        *self = Coalescer {
            receive: self.receive,
            ..Coalescer::new(self.policy)
        };
    }

    /// Takes the held interrupt, if any: the caller signals it now (the ring
    /// is stopping, the device resetting, the frontend leaving, or the timer
    /// could not be armed). `true`: the caller must signal.
    pub fn take_held(&mut self) -> bool {
        let held = self.deferred();
        if held {
            self.settle();
        }
        held
    }

    /// Decides after a batch that published `completed` entries, leaving the
    /// used index at `new`. `wants(old, new)` is the guest's wish for the
    /// entries `old..new` ([`guest_wants`]).
    pub fn after_batch(
        &mut self,
        now: Instant,
        completed: u16,
        new: u16,
        ring_size: u16,
        wants: impl Fn(u16, u16) -> bool,
    ) -> Verdict {
        self.checked
            .get_or_insert(Wrapping(new) - Wrapping(completed));
        if completed > 0 {
            self.learn(now, completed);
            self.unsignalled = self.unsignalled.saturating_add(u32::from(completed));
            self.held = self.held.saturating_add(u32::from(completed));
        }
        self.latest = Wrapping(new);
        let before_start = Wrapping(new) - Wrapping(completed);
        if std::mem::take(&mut self.fresh) && before_start.0 != 0 {
            // First decision since the ring (re)started, and entries were
            // published on it before: the guest may be waiting for an
            // interrupt it never got, and `used_event` judged over this
            // batch alone may never fire. One spurious interrupt is
            // harmless; a lost one stops the queue for good. (A ring that
            // starts at index 0 has no such past: the formula is exact.)
            self.settle();
            return Verdict::Signal;
        }
        if completed == 0 && !self.deferred() {
            return Verdict::Suppress;
        }
        self.decide(now, ring_size, wants)
    }

    /// Decides when a deferred interrupt's time is up.
    pub fn on_timer(
        &mut self,
        now: Instant,
        ring_size: u16,
        wants: impl Fn(u16, u16) -> bool,
    ) -> Verdict {
        if !self.deferred() {
            return Verdict::Suppress;
        }
        self.decide(now, ring_size, wants)
    }

    fn decide(
        &mut self,
        now: Instant,
        ring_size: u16,
        wants: impl Fn(u16, u16) -> bool,
    ) -> Verdict {
        let checked = self.checked.unwrap_or(self.latest);
        if !wants(checked.0, self.latest.0) {
            // Nothing to hold any more; completions stay counted until an
            // interrupt actually tells the guest about them.
            self.checked = Some(self.latest);
            self.first_unsignalled = None;
            self.held = 0;
            return Verdict::Suppress;
        }
        let first = *self.first_unsignalled.get_or_insert(now);
        let waiting = if self.receive {
            self.held
        } else {
            self.unsignalled
        };
        let urgent = u64::from(waiting) * 2 > u64::from(ring_size);
        let hold = |usecs: u32| {
            let deadline = first + Duration::from_micros(u64::from(usecs));
            (now < deadline).then_some(deadline)
        };
        let deadline = match self.policy {
            Policy::Immediate => None,
            Policy::Frames { frames, usecs } if self.unsignalled < frames => hold(usecs),
            Policy::Frames { .. } => None,
            Policy::Adaptive { usecs } => self.adaptive_hold(now, usecs, hold),
        };
        match deadline {
            Some(d) if !urgent => Verdict::Defer(d),
            _ => {
                self.settle();
                Verdict::Signal
            }
        }
    }

    /// An interrupt was sent: everything up to `latest` is signalled.
    fn settle(&mut self) {
        self.checked = Some(self.latest);
        self.unsignalled = 0;
        self.first_unsignalled = None;
        self.held = 0;
    }

    /// Until when the adaptive policy holds the interrupt the guest asked
    /// for (`None`: signal now); `bound` applies the policy's time bound.
    fn adaptive_hold(
        &mut self,
        now: Instant,
        usecs: u32,
        bound: impl Fn(u32) -> Option<Instant>,
    ) -> Option<Instant> {
        let resting = self.hold_off_until.is_some_and(|t| now < t);
        if resting || !self.dense(usecs) {
            return None;
        }
        let deadline = bound(usecs)?;
        let quiet = self.quiet_at();
        if now >= quiet {
            if self.held < DENSE_FRAMES {
                // The stream stopped before anything worth waiting for came:
                // the guest was waiting on this very interrupt.
                self.hold_off_until = Some(now + HOLD_OFF);
            }
            return None;
        }
        Some(deadline.min(quiet))
    }

    /// At the recent rate, at least [`DENSE_FRAMES`] completions are due
    /// within `usecs`: worth holding an interrupt for.
    fn dense(&self, usecs: u32) -> bool {
        self.mean_gap_ns > 0.0
            && self.mean_gap_ns * f64::from(DENSE_FRAMES) <= f64::from(usecs) * 1000.0
    }

    /// When the completion stream counts as paused: [`IDLE_GAPS`] mean gaps
    /// (between [`IDLE_MIN`] and [`IDLE_MAX`]) after the last completion.
    fn quiet_at(&self) -> Instant {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small, positive
        let gaps = Duration::from_nanos((self.mean_gap_ns * f64::from(IDLE_GAPS)) as u64);
        let last = self.last_completion.unwrap_or_else(Instant::now);
        last + gaps.clamp(IDLE_MIN, IDLE_MAX)
    }

    /// Updates the moving average of the time between completions with a
    /// batch of `completed` ending at `now`.
    #[allow(clippy::cast_precision_loss)]
    fn learn(&mut self, now: Instant, completed: u16) {
        if let Some(prev) = self.last_completion {
            let gap = now.saturating_duration_since(prev).as_nanos() as f64 / f64::from(completed);
            if self.mean_gap_ns == 0.0 {
                self.mean_gap_ns = gap;
            } else {
                self.mean_gap_ns += EWMA_WEIGHT * (gap - self.mean_gap_ns);
            }
        }
        self.last_completion = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_fires_only_when_used_event_is_crossed() {
        // Batch moved used from 10 to 20: the guest asked at 15 -> yes.
        assert!(need_event(15, 20, 10));
        // It asked at 10 (the first entry of the batch) -> yes.
        assert!(need_event(10, 20, 10));
        // It asked at 20 (not reached yet) -> no.
        assert!(!need_event(20, 20, 10));
        // It asked long ago (already signalled) -> no.
        assert!(!need_event(5, 20, 10));
    }

    #[test]
    fn need_event_handles_index_wraparound() {
        assert!(need_event(65535, 2, 65530));
        assert!(need_event(0, 2, 65530));
        assert!(!need_event(2, 2, 65530));
    }

    const US: Duration = Duration::from_micros(1);
    const ALWAYS: fn(u16, u16) -> bool = |_, _| true;

    fn frames_32_1ms() -> Coalescer {
        Coalescer::new("frames=32,usecs=1000".parse().unwrap())
    }

    #[test]
    fn policies_parse_and_print_back() {
        for text in ["immediate", "frames=32,usecs=1000", "adaptive,usecs=300"] {
            assert_eq!(text.parse::<Policy>().unwrap().to_string(), text);
        }
        assert_eq!(
            "usecs=5,frames=2".parse(),
            Ok(Policy::Frames {
                frames: 2,
                usecs: 5
            })
        );
        assert_eq!(
            "adaptive".parse(),
            Ok(Policy::Adaptive {
                usecs: ADAPTIVE_DEFAULT_USECS
            })
        );
        for bad in [
            "",
            "frames=32",
            "frames=0,usecs=10",
            "adaptive,frames=3",
            "fast",
            "immediate,usecs=1",
            "frames=1,frames=2,usecs=3",
        ] {
            assert!(bad.parse::<Policy>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn immediate_signals_every_batch_the_guest_asks_for() {
        let mut c = Coalescer::new(Policy::Immediate);
        let t = Instant::now();
        assert_eq!(c.after_batch(t, 3, 3, 256, ALWAYS), Verdict::Signal);
        assert_eq!(c.after_batch(t, 1, 4, 256, |_, _| false), Verdict::Suppress);
    }

    #[test]
    fn frames_policy_holds_31_completions_until_the_timer_and_not_before() {
        let mut c = frames_32_1ms();
        let t0 = Instant::now();
        let v = c.after_batch(t0, 31, 31, 256, ALWAYS);
        assert_eq!(v, Verdict::Defer(t0 + Duration::from_micros(1000)));
        // Silence: a timer firing early (spurious) still holds it.
        assert!(matches!(
            c.on_timer(t0 + Duration::from_micros(999), 256, ALWAYS),
            Verdict::Defer(_)
        ));
        assert_eq!(
            c.on_timer(t0 + Duration::from_micros(1000), 256, ALWAYS),
            Verdict::Signal
        );
        assert_eq!(
            c.on_timer(t0 + Duration::from_micros(2000), 256, ALWAYS),
            Verdict::Suppress
        );
    }

    #[test]
    fn frames_policy_signals_at_the_32nd_completion() {
        let mut c = frames_32_1ms();
        let t0 = Instant::now();
        assert!(matches!(
            c.after_batch(t0, 20, 20, 256, ALWAYS),
            Verdict::Defer(_)
        ));
        assert_eq!(c.after_batch(t0 + US, 12, 32, 256, ALWAYS), Verdict::Signal);
    }

    #[test]
    fn more_than_half_the_ring_unsignalled_is_signalled_at_once() {
        let mut c = Coalescer::new("frames=1000,usecs=100000".parse().unwrap());
        let t0 = Instant::now();
        assert!(matches!(
            c.after_batch(t0, 128, 128, 256, ALWAYS),
            Verdict::Defer(_)
        ));
        assert_eq!(c.after_batch(t0, 1, 129, 256, ALWAYS), Verdict::Signal);
    }

    #[test]
    fn completions_the_guest_did_not_ask_about_still_count_toward_urgency() {
        // A guest reclaiming lazily (Linux TX: interrupt after 3/4 of the
        // outstanding buffers) asks late; by then it may be out of buffers.
        let mut c = Coalescer::new("frames=1000,usecs=100000".parse().unwrap());
        let t0 = Instant::now();
        let asks_at_200 = |old: u16, new: u16| need_event(200, new, old);
        assert_eq!(
            c.after_batch(t0, 120, 120, 256, asks_at_200),
            Verdict::Suppress
        );
        assert_eq!(
            c.after_batch(t0, 90, 210, 256, asks_at_200),
            Verdict::Signal
        );
    }

    #[test]
    fn a_receive_ring_counts_only_what_came_since_its_guest_asked() {
        // The guest polled 200 completions without an interrupt (NAPI),
        // then re-armed: on a receive ring nothing of that waits for an
        // interrupt, on a transmit ring it all may.
        let asks_from_200 = |old: u16, new: u16| need_event(200, new, old);
        let policy = "frames=1000,usecs=100000".parse().unwrap();
        for (c, held) in [
            (Coalescer::for_receive(policy), true),
            (Coalescer::new(policy), false),
        ] {
            let mut c = c;
            let t0 = Instant::now();
            assert_eq!(
                c.after_batch(t0, 200, 200, 256, asks_from_200),
                Verdict::Suppress
            );
            let v = c.after_batch(t0 + US, 2, 202, 256, asks_from_200);
            assert_eq!(matches!(v, Verdict::Defer(_)), held, "{v:?}");
        }
    }

    #[test]
    fn no_policy_signals_what_the_guest_did_not_ask_for() {
        for policy in ["immediate", "frames=1,usecs=1", "adaptive"] {
            let mut c = Coalescer::new(policy.parse().unwrap());
            let t0 = Instant::now();
            assert_eq!(
                c.after_batch(t0, 64, 64, 256, |_, _| false),
                Verdict::Suppress
            );
            let later = t0 + Duration::from_secs(1);
            assert_eq!(c.on_timer(later, 256, |_, _| false), Verdict::Suppress);
        }
    }

    #[test]
    fn guest_wish_is_checked_from_the_last_decision_not_the_last_batch() {
        let mut c = frames_32_1ms();
        let t0 = Instant::now();
        // Deferred at used 10; the guest's used_event (5) lies in 0..10.
        let wants = |old: u16, new: u16| need_event(5, new, old);
        assert!(matches!(
            c.after_batch(t0, 10, 10, 256, wants),
            Verdict::Defer(_)
        ));
        // The next batch (10..20) alone would not cross 5; 0..20 does.
        assert!(matches!(
            c.after_batch(t0 + US, 10, 20, 256, wants),
            Verdict::Defer(_)
        ));
        assert_eq!(
            c.on_timer(t0 + Duration::from_millis(1), 256, wants),
            Verdict::Signal
        );
    }

    /// Feeds `c` one completion every `gap`, starting after `t` at used
    /// index `used`, `n` times; returns the verdicts and the last instant.
    fn stream(
        c: &mut Coalescer,
        t: &mut Instant,
        used: &mut u16,
        gap: Duration,
        n: usize,
        wants: impl Fn(u16, u16) -> bool + Copy,
    ) -> Vec<Verdict> {
        (0..n)
            .map(|_| {
                *t += gap;
                *used = used.wrapping_add(1);
                c.after_batch(*t, 1, *used, 256, wants)
            })
            .collect()
    }

    fn signals(v: &[Verdict]) -> usize {
        v.iter().filter(|v| **v == Verdict::Signal).count()
    }

    /// Where in `v` the interrupts went out.
    fn signalled_at(v: &[Verdict]) -> Vec<usize> {
        (0..v.len()).filter(|&i| v[i] == Verdict::Signal).collect()
    }

    /// A coalescer on `policy` that has learned a completion every `gap`
    /// (40 of them), with nothing held: (it, the time, the used index).
    fn warmed(policy: &str, gap: Duration) -> (Coalescer, Instant, u16) {
        let mut c = Coalescer::new(policy.parse().unwrap());
        let (mut t, mut used) = (Instant::now(), 0);
        stream(&mut c, &mut t, &mut used, gap, 40, ALWAYS);
        c.take_held();
        (c, t, used)
    }

    #[test]
    fn adaptive_signals_sparse_completions_at_once() {
        // 10,000 per second: fewer than DENSE_FRAMES within 250 us.
        let mut c = Coalescer::new("adaptive".parse().unwrap());
        let (mut t, mut used) = (Instant::now(), 0);
        let v = stream(&mut c, &mut t, &mut used, 100 * US, 50, ALWAYS);
        assert_eq!(signals(&v), 50, "{v:?}");
    }

    #[test]
    fn adaptive_holds_a_dense_stream_until_half_the_ring_waits() {
        // RX-like guest: asks at every entry (used_event = its last_used).
        // Learned: one completion every microsecond.
        let (mut c, mut t, mut used) = warmed("adaptive", US);
        let v = stream(&mut c, &mut t, &mut used, US, 400, ALWAYS);
        let at = signalled_at(&v);
        assert!(!at.is_empty(), "never signalled: {v:?}");
        for w in at.windows(2) {
            assert_eq!(w[1] - w[0], 129, "{at:?}");
        }
        for d in v.iter().filter_map(|v| match v {
            Verdict::Defer(d) => Some(*d),
            _ => None,
        }) {
            assert!(d <= t + Duration::from_micros(250), "bounded by usecs");
        }
    }

    #[test]
    fn adaptive_lets_a_held_interrupt_go_when_the_stream_pauses() {
        let (mut c, mut t, mut used) = warmed("adaptive", 2 * US);
        let v = stream(&mut c, &mut t, &mut used, 2 * US, 5, ALWAYS);
        let Some(Verdict::Defer(d)) = v.last().copied() else {
            panic!("dense completions are held: {v:?}");
        };
        // The stream stopped: the interrupt goes at the pause's mark, long
        // before the policy's 250 us bound.
        assert!(
            d <= t + IDLE_MIN,
            "deadline {:?} after the last completion",
            d - t
        );
        assert!(matches!(c.on_timer(d - US, 256, ALWAYS), Verdict::Defer(_)));
        assert_eq!(c.on_timer(d, 256, ALWAYS), Verdict::Signal);
    }

    #[test]
    fn adaptive_stops_holding_for_a_while_when_holding_only_delayed() {
        // Request/response: one completion every 20 us, the guest waiting
        // for each (dense by rate, but nothing follows a completion soon).
        let mut c = Coalescer::new("adaptive".parse().unwrap());
        let (mut t, mut used) = (Instant::now(), 0);
        stream(&mut c, &mut t, &mut used, 20 * US, 20, |_, _| false);
        t += 20 * US;
        used += 1;
        let Verdict::Defer(d) = c.after_batch(t, 1, used, 256, ALWAYS) else {
            panic!("dense by rate: the first is held");
        };
        assert!(d <= t + IDLE_MAX);
        assert_eq!(c.on_timer(d, 256, ALWAYS), Verdict::Signal);
        t = d;
        // For HOLD_OFF, every completion is signalled at once...
        let v = stream(&mut c, &mut t, &mut used, 20 * US, 50, ALWAYS);
        assert_eq!(signals(&v), 50, "{v:?}");
        // ...and then holding is tried again.
        t += HOLD_OFF;
        let v = stream(&mut c, &mut t, &mut used, 20 * US, 40, ALWAYS);
        assert!(v.iter().any(|v| matches!(v, Verdict::Defer(_))), "{v:?}");
    }

    #[test]
    fn adaptive_never_holds_past_its_bound() {
        // 4 us apart: 10 due within 40 us, dense; 64 take 256 us.
        let (mut c, mut t, mut used) = warmed("adaptive,usecs=40", 4 * US);
        let v = stream(&mut c, &mut t, &mut used, 4 * US, 40, ALWAYS);
        let at = signalled_at(&v);
        assert!(at.len() >= 3, "{v:?}");
        for w in at.windows(2) {
            assert!(w[1] - w[0] <= 11, "held past 40 us: {at:?}");
        }
    }

    #[test]
    fn adaptive_switches_between_sparse_and_dense_in_both_directions() {
        // RX-like: asks at every entry. TX-like (Linux with TX NAPI): asks
        // after 3/4 of what it has outstanding, here every 32 entries.
        let tx_like = |old: u16, new: u16| (old..new).any(|i| i % 32 == 31);
        for (name, wants) in [
            ("rx", (|_, _| true) as fn(u16, u16) -> bool),
            ("tx", tx_like),
        ] {
            let mut c = Coalescer::new("adaptive".parse().unwrap());
            let (mut t, mut used) = (Instant::now(), 0);
            let sparse = stream(&mut c, &mut t, &mut used, 200 * US, 64, wants);
            assert!(
                !sparse.iter().any(|v| matches!(v, Verdict::Defer(_))),
                "{name}: sparse held: {sparse:?}"
            );
            let asked = signals(&sparse);
            // Dense: after the moving average caught up (a few dozen
            // completions), fewer interrupts than the guest asked for.
            stream(&mut c, &mut t, &mut used, US, 64, wants);
            let dense = stream(&mut c, &mut t, &mut used, US, 256, wants);
            assert!(
                signals(&dense) * 2 <= 256 / if name == "rx" { 1 } else { 32 },
                "{name}: dense not coalesced: {} signals",
                signals(&dense)
            );
            // Sparse again: back to signalling at once.
            c.take_held();
            stream(&mut c, &mut t, &mut used, 200 * US, 32, wants);
            let again = stream(&mut c, &mut t, &mut used, 200 * US, 64, wants);
            assert_eq!(signals(&again), asked, "{name}: {again:?}");
        }
    }

    #[test]
    fn first_decision_after_a_reset_signals_once_for_a_ring_with_a_past() {
        for policy in ["immediate", "frames=64,usecs=100000", "adaptive"] {
            let mut c = Coalescer::new(policy.parse().unwrap());
            let t0 = Instant::now();
            let never = |_: u16, _: u16| false;
            assert_eq!(c.after_batch(t0, 10, 10, 256, never), Verdict::Suppress);
            c.reset();
            // Restarted at used 10 with nothing new: the guest may still
            // wait for entries it was never interrupted for.
            assert_eq!(
                c.after_batch(t0, 0, 10, 256, never),
                Verdict::Signal,
                "{policy}"
            );
            assert_eq!(c.after_batch(t0, 1, 11, 256, never), Verdict::Suppress);
        }
    }

    #[test]
    fn a_held_interrupt_is_handed_over_once() {
        let mut c = frames_32_1ms();
        let t0 = Instant::now();
        assert!(matches!(
            c.after_batch(t0, 5, 5, 256, ALWAYS),
            Verdict::Defer(_)
        ));
        assert!(c.take_held());
        assert!(!c.deferred());
        assert!(!c.take_held());
        assert_eq!(
            c.on_timer(t0 + Duration::from_millis(2), 256, ALWAYS),
            Verdict::Suppress
        );
    }

    #[test]
    fn a_held_tx_interrupt_goes_only_if_the_guest_still_asks_when_the_hold_ends() {
        // Linux's TX with TX NAPI: after its poll the guest asks at the very
        // next completion (virtqueue_enable_cb_prepare: used_event = its last
        // used index, 100 here); its next start_xmit writes 0
        // (virtqueue_disable_cb) and, at the burst's end, asks after 3/4 of
        // what is outstanding (virtqueue_enable_cb_delayed). The hold ends
        // on the guest's word at that time, read again.
        for moved_on in [true, false] {
            let (mut c, mut t, mut used) = warmed("adaptive", US);
            assert_eq!(used, 40);
            let event = std::cell::Cell::new(used + 60);
            let wants = |old: u16, new: u16| need_event(event.get(), new, old);
            // The guest's poll: it asks at the next completion.
            stream(&mut c, &mut t, &mut used, US, 60, wants);
            assert!(!c.deferred());
            event.set(used);
            t += US;
            used += 4;
            let Verdict::Defer(d) = c.after_batch(t, 4, used, 256, wants) else {
                panic!("a dense stream's interrupt is held");
            };
            if moved_on {
                // start_xmit: disabled, then 3/4 of 150 outstanding ahead.
                event.set(0);
                event.set(used - 4 + 112);
            }
            let v = c.on_timer(d, 256, wants);
            if moved_on {
                assert_eq!(v, Verdict::Suppress, "the guest no longer asks");
                assert!(!c.deferred());
                // Its new ask is honoured when the device gets there.
                t = d;
                // (used_event 212 is crossed by the 109th completion; more
                // than half the ring is then unsignalled: no hold.)
                let v = stream(&mut c, &mut t, &mut used, US, 109, wants);
                assert_eq!(signalled_at(&v), vec![108], "{v:?}");
            } else {
                assert_eq!(v, Verdict::Signal, "the guest still asks");
            }
        }
    }
}
