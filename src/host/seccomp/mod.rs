//! The syscall filters: one allowlist per thread class ([`Class`]), so every
//! thread that reads frontend (or guest, or client) input may only ask the
//! kernel for what that thread does. The lists, each named after its
//! thread and with the reason for each entry, are in `lists.rs`.
//!
//! Each thread installs its class's filter itself ([`enter`], or
//! [`apply_once`] for the workers) before it handles any input:
//!
//! | thread | hook |
//! |---|---|
//! | main | once every service thread is spawned, before it waits |
//! | `frontends`, `stats`, `prometheus`, `tap-watch`, `signals` | first thing in the thread |
//! | `relay-requests`, `relay-replies` | first thing in the thread |
//! | `vhost-user-net` (the crate's request thread) | our `features()` callback; the relay sends a GET_FEATURES of its own before any frontend byte, so the thread has its filter before it reads the frontend's first message |
//! | `vring_worker` (the crate's) | its first event |
//!
//! A thread runs under the filter of the thread that created it until it
//! installs its own, and filters stack. `frontends` creates the request
//! thread, the workers and the relay threads, so its filter allows what
//! they do too (see `lists.rs`); each of them then narrows itself.
//!
//! A syscall outside the list fails with `EPERM` ([`Mode::On`], the
//! default) rather than killing the process: a syscall missing from a list
//! on a rare path then fails like an I/O error (counted, logged) instead of
//! taking every VM's NIC down; what the list forbids stays forbidden either
//! way. [`Mode::Log`] allows it but has the kernel log it (to find what is
//! missing: `dmesg | grep type=1326`), [`Mode::Off`] installs nothing.
//!
//! Cost on the data path: seccompiler orders a program by syscall number,
//! but the kernel (Linux >= 5.11) caches, per filter, which syscalls it
//! allows whatever their arguments, and does not run the program for
//! those. Every syscall a worker makes per frame or batch is such a one
//! (a test holds it so), so the order of the program does not matter
//! there; what remains is the kernel's seccomp entry (~1% of a worker at
//! 64-byte line rate, `docs/performance.md`).
//!
//! The lists come from `strace -ff` of the daemon over the end-to-end and
//! QEMU suites; `contrib/seccomp-profile.py` regenerates the measurement
//! (the command is in its header and in `docs/robustness.md`).

mod lists;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use lists::{Allow, When};

/// What to do with a syscall outside the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Refuse it (`EPERM`).
    On,
    /// Allow it, but have the kernel log it (audit): to find what is missing.
    Log,
    /// No filter.
    Off,
}

/// The daemon's threads, grouped by what they may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// The main thread, once it has spawned the others.
    Main,
    /// `frontends`: accepts frontends, runs each connection.
    Frontends,
    /// `relay-requests`: frontend to the crate.
    RelayRequests,
    /// `relay-replies`: the crate to the frontend.
    RelayReplies,
    /// `vhost-user-net`: vhost-user-backend's request thread.
    Requests,
    /// `vring_worker`: vhost-user-backend's worker, one per queue pair.
    Worker,
    /// `stats`: the stats socket.
    Stats,
    /// `prometheus`: the HTTP endpoint.
    Prometheus,
    /// `tap-watch`: re-attaches a re-created tap.
    TapWatch,
    /// `signals`: SIGINT/SIGTERM.
    Signals,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 10] = [
        Class::Main,
        Class::Frontends,
        Class::RelayRequests,
        Class::RelayReplies,
        Class::Requests,
        Class::Worker,
        Class::Stats,
        Class::Prometheus,
        Class::TapWatch,
        Class::Signals,
    ];

    /// The name its threads carry (`/proc/PID/task/TID/comm`); the main
    /// thread carries the program's name.
    pub fn thread_name(self) -> &'static str {
        match self {
            Class::Main => "main",
            Class::Frontends => "frontends",
            Class::RelayRequests => "relay-requests",
            Class::RelayReplies => "relay-replies",
            Class::Requests => "vhost-user-net",
            Class::Worker => "vring_worker",
            Class::Stats => "stats",
            Class::Prometheus => "prometheus",
            Class::TapWatch => "tap-watch",
            Class::Signals => "signals",
        }
    }

    fn allowed(self) -> Vec<Allow> {
        match self {
            Class::Main => lists::main(),
            Class::Frontends => lists::frontends(),
            Class::RelayRequests => lists::relay_requests(),
            Class::RelayReplies => lists::relay_replies(),
            Class::Requests => lists::requests(),
            Class::Worker => lists::worker(),
            Class::Stats => lists::stats(),
            Class::Prometheus => lists::prometheus(),
            Class::TapWatch => lists::tap_watch(),
            Class::Signals => lists::signals(),
        }
    }
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// The seccompiler rules of one allowed syscall (any of them matching
/// allows it).
fn rules(when: &When) -> Result<Vec<SeccompRule>, BackendError> {
    let one = |c| SeccompRule::new(vec![c]);
    match when {
        When::Always => Ok(Vec::new()),
        When::ArgIn(arg, values) => values
            .iter()
            .map(|&v| one(condition(*arg, SeccompCmpOp::Eq, v)?))
            .collect(),
        When::ArgWithout(arg, mask) => Ok(vec![one(condition(
            *arg,
            SeccompCmpOp::MaskedEq(*mask),
            0,
        )?)?]),
        When::ArgWith(arg, mask) => Ok(vec![one(condition(
            *arg,
            SeccompCmpOp::MaskedEq(*mask),
            *mask,
        )?)?]),
    }
}

/// Builds the filter of `class` for `mode` (`None` for `Off`).
pub fn filter(class: Class, mode: Mode) -> Result<Option<BpfProgram>, BackendError> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::On => SeccompAction::Errno(u32::try_from(libc::EPERM).expect("small")),
        Mode::Log => SeccompAction::Log,
    };
    // A syscall allowed whatever its arguments in one entry is allowed so
    // (seccompiler reads an empty rule list as "always").
    let mut always = BTreeSet::new();
    let mut conditional: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allow in class.allowed() {
        match allow.when {
            When::Always => {
                always.insert(allow.nr);
            }
            ref when => conditional
                .entry(allow.nr)
                .or_default()
                .extend(rules(when)?),
        }
    }
    for nr in always {
        conditional.insert(nr, Vec::new());
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let filter = SeccompFilter::new(conditional, mismatch, SeccompAction::Allow, arch)?;
    filter.try_into().map(Some)
}

/// Builds the worker filter for `mode` (`None` for `Off`).
pub fn worker_filter(mode: Mode) -> Result<Option<BpfProgram>, BackendError> {
    filter(Class::Worker, mode)
}

/// Every class's filter, built once at start from `--seccomp`.
struct Filters(BTreeMap<Class, BpfProgram>);

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Builds every class's filter for `mode`, for [`enter`] to install. Call
/// once, before the threads start; a later call changes nothing. Until it
/// is called (the library in tests, embedders) [`enter`] does nothing.
pub fn init(mode: Mode) -> Result<(), BackendError> {
    let mut all = BTreeMap::new();
    for class in Class::ALL {
        if let Some(program) = filter(class, mode)? {
            all.insert(class, program);
        }
    }
    let _ = FILTERS.set(Filters(all));
    Ok(())
}

/// Installs the filter of `class` on the calling thread (once per thread;
/// nothing before [`init`] or with `--seccomp off`).
pub fn enter(class: Class) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    install(filters.0.get(&class), class.thread_name());
}

thread_local! {
    static APPLIED: Cell<bool> = const { Cell::new(false) };
}

/// Installs `filter` on the calling thread, once per thread (the workers'
/// hook, which receives its filter from the backend).
pub fn apply_once(filter: Option<&BpfProgram>) {
    install(filter, Class::Worker.thread_name());
}

fn install(filter: Option<&BpfProgram>, class: &str) {
    let Some(filter) = filter else {
        return;
    };
    if APPLIED.with(Cell::get) {
        return;
    }
    APPLIED.with(|a| a.set(true));
    match seccompiler::apply_filter(filter) {
        Ok(()) => log::debug!("seccomp filter of the {class} thread installed"),
        Err(e) => log::error!("cannot install the seccomp filter of the {class} thread: {e}"),
    }
}
