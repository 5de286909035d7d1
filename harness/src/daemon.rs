//! The daemon process, run in a namespace, and its counters.

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{unique, Netns, TIMEOUT};

/// How the daemon meets the test's frontend.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// `--socket-path` (the daemon listens).
    Listen,
    /// `--socket-path --client` (the test listens).
    Client,
    /// `--fd N`: a listening socket the test made and the daemon inherits.
    Fd(i32),
}

/// The daemon, run inside a namespace; killed (by PID) on drop.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub stats_socket: PathBuf,
    pub tap: String,
    stderr_path: PathBuf,
    pub mode: Mode,
    /// The daemon's `RUST_LOG` (debug unless a test counts log lines).
    pub log_filter: &'static str,
    /// The binary to run instead of [`crate::daemon_binary`] (a benchmark
    /// comparing two builds).
    pub binary: Option<PathBuf>,
}

impl Daemon {
    /// Starts `vhost-user-net` in `ns` on a new tap with `extra` flags and
    /// waits for its socket.
    pub fn start(ns: &Netns, extra: &[&str]) -> Daemon {
        Self::start_in_mode(ns, Mode::Listen, extra)
    }

    /// Starts `binary` (another build of the daemon) like [`Daemon::start`].
    pub fn start_binary(ns: &Netns, binary: &Path, extra: &[&str]) -> Daemon {
        let mut d = Self::paths();
        d.binary = Some(binary.to_owned());
        d.spawn(ns, extra);
        d
    }

    /// Starts the daemon with `mode`; `socket` is where the test listens
    /// (client mode) or has bound its socket (fd mode).
    pub fn start_in_mode(ns: &Netns, mode: Mode, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vhost.sock");
        let stats_socket = dir.path().join("vhost.sock.stats");
        let tap = unique("vt");
        let stderr_path = dir.path().join("daemon.log");
        let mut d = Daemon {
            child: None,
            dir,
            socket,
            stats_socket,
            tap,
            stderr_path,
            mode: Mode::Listen,
            log_filter: "debug",
            binary: None,
        };
        d.mode = mode;
        d.spawn(ns, extra);
        d
    }

    /// A daemon record with paths chosen but no process yet (to bind the
    /// test's own socket first).
    pub fn paths() -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Daemon {
            child: None,
            socket: dir.path().join("vhost.sock"),
            stats_socket: dir.path().join("vhost.sock.stats"),
            tap: unique("vt"),
            stderr_path: dir.path().join("daemon.log"),
            mode: Mode::Listen,
            log_filter: "debug",
            binary: None,
            dir,
        }
    }

    /// (Re)starts the process on the same socket and tap.
    pub fn spawn(&mut self, ns: &Netns, extra: &[&str]) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("log file");
        let socket = self.socket.to_str().expect("utf-8 path").to_owned();
        let stats = self.stats_socket.to_str().expect("utf-8 path").to_owned();
        let fd_text;
        let binary = self.binary.clone().unwrap_or_else(crate::daemon_binary);
        let binary = binary.to_str().expect("utf-8 path");
        // VUN_DAEMON_WRAP (e.g. "strace -ff -o /tmp/t") runs the daemon
        // under a tool; a debugging aid, unset in CI.
        let wrap = std::env::var("VUN_DAEMON_WRAP").unwrap_or_default();
        let mut args = vec!["netns", "exec", &ns.name];
        args.extend(wrap.split_whitespace());
        args.push(binary);
        match self.mode {
            Mode::Listen => args.extend(["--socket-path", &socket]),
            Mode::Client => args.extend(["--socket-path", &socket, "--client"]),
            Mode::Fd(fd) => {
                fd_text = fd.to_string();
                args.extend(["--fd", &fd_text]);
            }
        }
        args.extend(["--tap", &self.tap, "--stats-socket", &stats]);
        args.extend_from_slice(extra);
        // VUN_TAP_IO (uring, syscall, auto) picks the daemon's --tap-io
        // unless the test gives one: CI runs the end-to-end suites in
        // both modes.
        let tap_io = std::env::var("VUN_TAP_IO").unwrap_or_default();
        if !tap_io.is_empty() && !extra.contains(&"--tap-io") {
            args.extend(["--tap-io", &tap_io]);
        }
        let child = Command::new("ip")
            .args(&args)
            // Its own process group: kill() takes down a wrapper's children too.
            .process_group(0)
            .env("RUST_LOG", self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        // Ready when the stats socket answers: the daemon serves it only
        // once its setup (tap, sockets, privilege drop) is complete.
        let answers = |path: &Path| {
            let mut text = String::new();
            UnixStream::connect(path)
                .and_then(|mut s| s.read_to_string(&mut text))
                .is_ok_and(|n| n > 0)
        };
        while !answers(&self.stats_socket) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("daemon exited early ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "daemon socket never appeared: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.as_ref().expect("running").id()).expect("pid"))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; returns its status and log.
    pub fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status, self.log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon ignored SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (and its process group, e.g. a wrapper's child)
    /// hard, with no cleanup, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = i32::try_from(child.id()).expect("pid fits i32");
            let _ = kill(Pid::from_raw(-group), Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The counters, as the stats socket serves them.
    pub fn stats(&self) -> Stats {
        let mut s = UnixStream::connect(&self.stats_socket).expect("stats socket");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("stats");
        Stats { text }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}

/// A Prometheus text snapshot.
pub struct Stats {
    pub text: String,
}

impl Stats {
    /// Value of `vhost_user_net_<name>` for queue `q`, read by the parser
    /// the `stats` command uses.
    pub fn get(&self, name: &str, q: usize) -> u64 {
        vhost_user_net::stats::format::parse(&self.text)
            .get(q)
            .and_then(|queue| queue.values.get(name).copied())
            .unwrap_or_else(|| panic!("no {name} for queue {q} in:\n{}", self.text))
    }

    /// Value of the daemon-wide counter `vhost_user_net_<name>`.
    pub fn get_device(&self, name: &str) -> u64 {
        vhost_user_net::stats::format::parse_device(&self.text)
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} in:\n{}", self.text))
    }
}

/// `(open fds, RSS in KiB)` of process `pid`.
pub fn fds_and_rss(pid: nix::unistd::Pid) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    (fds, rss)
}
