//! The daemon's frontend connections: how many, how many ended in a
//! protocol error, and how much of their logging was held back.
//!
//! A connection is a rare event for a VMM (connect, maybe reconnect), and
//! its lines (connected, features, queues, how it ended) are worth reading.
//! A local client opening thousands of bad connections must not turn that
//! into thousands of lines: the first [`LOUD_PER_WINDOW`] connections of
//! every [`WINDOW`] log at their level; the rest log at debug, are counted
//! in `log_lines_suppressed_total`, and one summary line per window says
//! how many there were.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Counter;

/// Connections logged line by line per window.
pub const LOUD_PER_WINDOW: u64 = 10;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Counters and log budget of the daemon's connections.
#[derive(Debug)]
pub struct Connections {
    /// Frontend connections served (accepted, or made with `--client`).
    pub total: Counter,
    /// Connections that ended with a protocol error rather than a hang-up.
    pub errors: Counter,
    /// Log lines about single connections written at debug level instead of
    /// their own, because connections came faster than the budget.
    pub log_lines_suppressed: Counter,
    /// Whether the current connection logs at its own level.
    loud: AtomicBool,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    connections: u64,
    /// Quiet connections (past the budget) and how many of those failed.
    quiet: u64,
    quiet_errors: u64,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            total: Counter::default(),
            errors: Counter::default(),
            log_lines_suppressed: Counter::default(),
            loud: AtomicBool::new(true),
            window: Mutex::new(Window {
                start: Instant::now(),
                connections: 0,
                quiet: 0,
                quiet_errors: 0,
            }),
        }
    }
}

impl Connections {
    /// A connection starts at `now`: counted, and judged loud or quiet.
    pub fn begin(&self, now: Instant) {
        self.total.inc();
        let mut w = self.lock_window();
        roll(&mut w, now);
        w.connections += 1;
        let loud = w.connections <= LOUD_PER_WINDOW;
        if !loud {
            w.quiet += 1;
        }
        self.loud.store(loud, Ordering::Relaxed);
    }

    /// The current connection ended, with a protocol error or not.
    pub fn end(&self, error: bool) {
        if error {
            self.errors.inc();
            if !self.loud() {
                self.lock_window().quiet_errors += 1;
            }
        }
    }

    /// Whether lines about the current connection go out at their level.
    pub fn loud(&self) -> bool {
        self.loud.load(Ordering::Relaxed)
    }

    /// Called now and then (and at each connection): when a window with
    /// quiet connections is over, logs one line about them.
    pub fn tick(&self, now: Instant) {
        roll(&mut self.lock_window(), now);
    }

    fn lock_window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Starts a new window if the current one is over, summarising it.
fn roll(w: &mut Window, now: Instant) {
    if now.saturating_duration_since(w.start) < WINDOW {
        return;
    }
    if w.quiet > 0 {
        log::warn!(
            "{} more frontend connections in the last {} s were logged at debug level \
             only ({} ended with a protocol error); see connections_total and \
             connection_errors_total",
            w.quiet,
            WINDOW.as_secs(),
            w.quiet_errors
        );
    }
    *w = Window {
        start: now,
        connections: 0,
        quiet: 0,
        quiet_errors: 0,
    };
}

/// Logs a line about the current frontend connection: at `$level` while
/// connections are few, at debug (counted) during a flood of them.
macro_rules! connection_log {
    ($connections:expr, $level:expr, $($arg:tt)+) => {{
        let c: &$crate::stats::connections::Connections = $connections;
        if c.loud() {
            log::log!($level, $($arg)+);
        } else {
            c.log_lines_suppressed.inc();
            log::debug!($($arg)+);
        }
    }};
}
pub(crate) use connection_log;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_connections_of_a_window_are_loud_the_rest_quiet_and_counted() {
        let c = Connections::default();
        let t0 = Instant::now();
        for _ in 0..LOUD_PER_WINDOW {
            c.begin(t0);
            assert!(c.loud());
        }
        c.begin(t0);
        assert!(!c.loud(), "past the budget");
        connection_log!(&c, log::Level::Info, "a line about it");
        c.end(true);
        assert_eq!(c.log_lines_suppressed.get(), 1);
        assert_eq!((c.total.get(), c.errors.get()), (LOUD_PER_WINDOW + 1, 1));

        // A new window: loud again.
        c.begin(t0 + WINDOW);
        assert!(c.loud());
    }

    #[test]
    fn a_window_without_quiet_connections_rolls_silently_and_resets() {
        let c = Connections::default();
        let t0 = Instant::now();
        c.begin(t0);
        c.tick(t0 + WINDOW);
        let w = c.lock_window();
        assert_eq!((w.connections, w.quiet), (0, 0));
    }
}
