//! The `stats` command: reads a running daemon's counters from its stats
//! socket and prints them per queue, once or every second with rates.
//!
//! Knows the text format ([`crate::stats::format::parse`]) and the terminal; nothing
//! about the data path.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::stats::format::{parse, table, QueueSnapshot};

/// Why the counters could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read counters from {path} (is the daemon running, and is this its --stats-socket?)"
)]
pub struct StatsError {
    path: String,
    #[source]
    source: io::Error,
}

fn fetch(path: &Path) -> Result<Vec<QueueSnapshot>, StatsError> {
    let read = || -> io::Result<String> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    };
    read().map(|t| parse(&t)).map_err(|source| StatsError {
        path: path.display().to_string(),
        source,
    })
}

/// Prints the counters of the daemon behind `socket`; with `watch`, every
/// second until interrupted, as rates over the last second.
pub fn run(socket: &Path, watch: bool) -> Result<(), StatsError> {
    let mut prev = fetch(socket)?;
    let mut at = Instant::now();
    let mut out = io::stdout();
    if !watch {
        let _ = out.write_all(table(&prev, None).as_bytes());
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = fetch(socket)?;
        let secs = at.elapsed().as_secs_f64();
        at = Instant::now();
        // Clear the screen between refreshes, as `watch` does.
        let _ = write!(out, "\x1b[H\x1b[2J{}", table(&now, Some((&prev, secs))));
        let _ = out.flush();
        prev = now;
    }
}
