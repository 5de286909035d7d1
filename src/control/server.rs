//! The daemon's life: open the tap, listen, serve one frontend connection
//! after another, stop cleanly on SIGINT/SIGTERM.
//!
//! Each connection gets a fresh `VhostUserDaemon` (the crate serves exactly
//! one connection per daemon) built on the same [`NetBackend`], which keeps
//! the tap and the counters, so a frontend that goes away and comes back (or
//! a new one) finds the device as it was. Between the frontend and the
//! daemon sits [`crate::control::relay`], on a private socket pair.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost::vhost_user::{Error as ProtocolError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::control::backend::NetBackend;
use crate::control::config::{format_mac, Config, Endpoint, Frontend};
use crate::control::relay;
use crate::datapath::queue_pair::Listeners;
use crate::host::seccomp::{self, Class};
use crate::host::tap::{Tap, TapError};
use crate::host::{capabilities, sys};
use crate::stats::connections::connection_log;

/// Why the daemon could not start or had to stop. All are host faults.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the tap")]
    Tap(#[from] TapError),
    #[error("cannot set up the device")]
    Device(#[source] io::Error),
    #[error("{0} exists and is not a socket; refusing to replace it (choose another path)")]
    NotASocket(PathBuf),
    #[error("{0} is in use by another process (a live socket answers there)")]
    SocketInUse(PathBuf),
    #[error("cannot listen on {path}: the directory {dir} does not exist (create it, e.g. mkdir -p {dir}, or choose another path)")]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--fd {fd} is not a usable listening unix socket")]
    InheritedFd {
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("cannot accept a frontend connection")]
    Accept(#[source] io::Error),
    #[error("cannot wait for signals")]
    Signals(#[source] io::Error),
    #[error("cannot set the permissions of {path} (--socket-mode/--socket-group)")]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot drop privileges (--user/--group)")]
    DropPrivileges(#[source] io::Error),
    #[error("cannot build the syscall filters (--seccomp off to run without)")]
    Seccomp(#[source] seccompiler::BackendError),
    #[error("cannot drop the capabilities the daemon no longer needs")]
    Capabilities(#[source] crate::host::capabilities::Error),
}

/// Runs the daemon until SIGINT or SIGTERM. Prints the counters on exit and
/// removes the sockets it created.
pub fn run(config: Config) -> Result<(), Error> {
    // Sockets first: a bad path is reported before the tap is touched.
    let mut sockets = SocketFiles(Vec::new());
    let source = match &config.frontend {
        Frontend::Listen(path) => {
            let l = bind(path)?;
            sockets.0.push(path.clone());
            restrict(path, &config)?;
            Source::Listener(l)
        }
        Frontend::ListenFd(fd) => Source::Listener(
            sys::inherited_listener(*fd)
                .map_err(|source| Error::InheritedFd { fd: *fd, source })?,
        ),
        Frontend::Connect(path) => Source::Connect(path.clone()),
    };
    let stats_listener = match &config.stats_socket {
        Some(path) => {
            let l = bind(path)?;
            sockets.0.push(path.clone());
            restrict(path, &config)?;
            Some(l)
        }
        None => None,
    };

    let filter = seccomp::worker_filter(config.seccomp).map_err(Error::Seccomp)?;
    seccomp::init(config.seccomp).map_err(Error::Seccomp)?;
    let tap = Tap::open(&config.tap, config.device.queue_pairs, config.tap_mtu)?;
    if let Some(warning) = tap.mtu_mismatch(config.device.mtu) {
        log::warn!("{warning}");
    }
    let backend =
        Arc::new(NetBackend::new(config.device.clone(), tap, filter).map_err(Error::Device)?);
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(Error::Signals)?;
    log::info!(
        "{}, tap {}, {} queue pair(s), MAC {}{}",
        source.describe(),
        config.tap,
        config.device.queue_pairs,
        format_mac(&config.device.mac),
        config
            .stats_socket
            .as_ref()
            .map(|p| format!(", stats on {}", p.display()))
            .unwrap_or_default()
    );

    let prometheus = match &config.prometheus {
        Some(endpoint) => {
            let (listener, path) = bind_prometheus(endpoint)?;
            if let Some(p) = &path {
                restrict(p, &config)?;
            }
            sockets.0.extend(path);
            Some((listener, endpoint))
        }
        None => None,
    };
    // Everything that needs privileges is done: the tap is open (the fds
    // keep working), the sockets are bound. No other thread runs yet, so
    // every thread spawned below inherits what is left.
    drop_privileges(&config)?;
    if let Some((listener, endpoint)) = prometheus {
        spawn_prometheus(listener, endpoint, backend.clone())?;
    }
    // The stats socket answers once setup is complete (a readiness signal).
    if let Some(l) = stats_listener {
        spawn_stats_server(l, backend.clone()).map_err(Error::Device)?;
    }
    {
        let backend = backend.clone();
        thread::Builder::new()
            .name("tap-watch".into())
            .spawn(move || {
                seccomp::enter(Class::TapWatch);
                loop {
                    thread::sleep(TAP_WATCH_INTERVAL);
                    backend.reattach_gone_taps();
                    backend.stats().connections.tick(std::time::Instant::now());
                }
            })
            .map_err(Error::Device)?;
    }
    let current: Arc<Mutex<Option<UnixStream>>> = Arc::default();
    let (done_tx, done_rx) = mpsc::channel::<Result<(), Error>>();
    {
        let (backend, current, done_tx) = (backend.clone(), current.clone(), done_tx.clone());
        thread::Builder::new()
            .name("frontends".into())
            .spawn(move || {
                seccomp::enter(Class::Frontends);
                let _ = done_tx.send(serve_frontends(&source, &backend, &current));
            })
            .map_err(Error::Device)?;
    }
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            seccomp::enter(Class::Signals);
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: shutting down");
                let _ = done_tx.send(Ok(()));
            }
        })
        .map_err(Error::Device)?;
    // Everything is set up and frontends are being accepted (or connected
    // to): tell a `Type=notify` service manager.
    crate::control::systemd::ready(&format!("serving tap {}", config.tap));
    seccomp::enter(Class::Main);

    let result = done_rx.recv().unwrap_or(Ok(()));
    crate::control::systemd::stopping();
    if let Some(conn) = current.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }
    drop(sockets);
    let report = crate::stats::format::table(&backend.stats().snapshot(), None);
    let _ = io::stderr().write_all(report.as_bytes());
    result
}

/// What `--print-capabilities` prints (vhost-user "backend program
/// conventions").
pub const CAPABILITIES: &str = r#"{"type": "net"}"#;

/// Where frontend connections come from.
enum Source {
    Listener(UnixListener),
    Connect(PathBuf),
}

/// How often a deleted tap interface is looked for again.
const TAP_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// How long client mode waits between attempts to reach the frontend.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Listener(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_owned))
            {
                Some(p) => format!("listening on {}", p.display()),
                None => "listening on an inherited socket".to_owned(),
            },
            Source::Connect(p) => format!("connecting to {}", p.display()),
        }
    }

    /// The next frontend: accepted, or (client mode) connected to, retrying
    /// until the frontend's socket answers.
    fn next(&self) -> Result<UnixStream, Error> {
        match self {
            Source::Listener(l) => loop {
                match l.accept() {
                    Ok((s, _)) => return Ok(s),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::Accept(e)),
                }
            },
            Source::Connect(path) => {
                let mut said = false;
                loop {
                    match UnixStream::connect(path) {
                        Ok(s) => return Ok(s),
                        Err(e) => {
                            if !said {
                                log::info!("waiting for the frontend at {}: {e}", path.display());
                                said = true;
                            }
                            thread::sleep(RECONNECT_INTERVAL);
                        }
                    }
                }
            }
        }
    }
}

/// Applies `--socket-mode` and `--socket-group` to a socket we created.
fn restrict(path: &Path, config: &Config) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| Error::Permissions {
        path: path.to_owned(),
        source,
    };
    if let Some(gid) = config.socket_gid {
        sys::chgrp(path, gid).map_err(err)?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(config.socket_mode)).map_err(err)
}

/// Socket files we created, removed when the daemon stops (or fails to start).
struct SocketFiles(Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

/// Binds a unix socket at `path`. A stale socket file (nobody answers) is
/// replaced; anything else that exists there is refused, never deleted.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::NotASocket(path.to_owned()));
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse(path.to_owned()));
            }
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| match path.parent() {
        Some(dir)
            if source.kind() == io::ErrorKind::NotFound
                && !dir.as_os_str().is_empty()
                && !dir.exists() =>
        {
            Error::NoDirectory {
                path: path.to_owned(),
                dir: dir.to_owned(),
            }
        }
        _ => Error::Listen {
            path: path.to_owned(),
            source,
        },
    })
}

fn serve_frontends(
    source: &Source,
    backend: &Arc<NetBackend>,
    current: &Mutex<Option<UnixStream>>,
) -> Result<(), Error> {
    loop {
        let frontend = source.next()?;
        let connections = &backend.stats().connections;
        connections.begin(std::time::Instant::now());
        connection_log!(connections, log::Level::Info, "frontend connected");
        if let Ok(clone) = frontend.try_clone() {
            *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(clone);
        }
        let result = serve_connection(backend, frontend);
        connections.end(result.is_err());
        match result {
            Ok(()) => connection_log!(
                connections,
                log::Level::Info,
                "frontend disconnected; waiting for the next one"
            ),
            Err(e) => connection_log!(
                connections,
                log::Level::Warn,
                "connection ended with an error: {}; waiting for the next one",
                error_chain(&e)
            ),
        }
        current.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Why serving one frontend connection failed (a host fault: the next
/// frontend is served all the same).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot create the vhost-user daemon")]
    NewDaemon(#[source] vhost_user_backend::VhostUserHandlerError),
    #[error("cannot register worker events")]
    Register(#[source] io::Error),
    #[error("cannot set up the private socket to the vhost-user daemon")]
    PrivateSocket(#[source] io::Error),
    #[error("cannot listen on the private socket")]
    PrivateListener(#[source] ProtocolError),
    #[error("cannot start serving")]
    Start(#[source] io::Error),
    #[error("cannot start the relay")]
    Relay(#[source] io::Error),
    #[error("a frontend request failed")]
    Request(#[source] ProtocolError),
    #[error("the vhost-user request thread panicked")]
    Panicked,
}

impl ConnectionError {
    /// vhost-user-backend's errors show their cause but do not give it as
    /// `source()`: take it out.
    fn from_daemon(e: vhost_user_backend::Error) -> ConnectionError {
        use vhost_user_backend::Error as E;
        match e {
            E::NewVhostUserHandler(e) => ConnectionError::NewDaemon(e),
            E::CreateBackendListener(e)
            | E::CreateBackendReqHandler(e)
            | E::CreateVhostUserListener(e) => ConnectionError::PrivateListener(e),
            E::StartDaemon(e) => ConnectionError::Start(e),
            E::HandleRequest(e) => ConnectionError::Request(e),
            E::WaitDaemon(_) => ConnectionError::Panicked,
        }
    }
}

/// `e` and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// Serves one frontend connection until it ends: a fresh
/// `VhostUserDaemon` on `backend`, reached through the relay. The
/// frontend disconnecting is a normal end (`Ok`). Returns once the
/// connection's workers are stopped and `backend` has forgotten it, on
/// every path, so the next connection starts clean.
pub fn serve_connection(
    backend: &Arc<NetBackend>,
    frontend: UnixStream,
) -> Result<(), ConnectionError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("vhost-user-net".into(), backend.clone(), mem.clone())
        .map_err(ConnectionError::from_daemon)?;
    let result = serve_with(&mut daemon, backend, &mem, frontend);
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    backend.disconnect();
    drop(daemon);
    backend.close_abandoned_fds();
    result
}

/// The part of [`serve_connection`] that may fail half way; the caller
/// cleans up.
fn serve_with(
    daemon: &mut VhostUserDaemon<Arc<NetBackend>>,
    backend: &Arc<NetBackend>,
    mem: &GuestMemoryAtomic<crate::datapath::guest::GuestMem>,
    frontend: UnixStream,
) -> Result<(), ConnectionError> {
    let listeners = daemon
        .get_epoll_handlers()
        .into_iter()
        .map(|h| h as Arc<dyn Listeners>)
        .collect();
    backend
        .connect(mem, listeners)
        .map_err(ConnectionError::Register)?;

    // The daemon accepts only from a Listener: give it a private one, in a
    // fresh 0700 directory, and connect the relay to it.
    let dir = private_dir().map_err(ConnectionError::PrivateSocket)?;
    let inner_path = dir.path().join("backend.sock");
    let mut inner = Listener::new(&inner_path, true).map_err(ConnectionError::PrivateListener)?;
    let backend_side = UnixStream::connect(&inner_path).map_err(ConnectionError::PrivateSocket)?;
    daemon
        .start(&mut inner)
        .map_err(ConnectionError::from_daemon)?;
    drop(inner);
    drop(dir);

    let relays = match relay::spawn(frontend, backend_side, backend.clone()) {
        Ok(relays) => relays,
        Err(e) => {
            daemon.request_shutdown();
            let _ = daemon.wait();
            return Err(ConnectionError::Relay(e));
        }
    };
    let result = daemon.wait();
    for r in relays {
        let _ = r.join();
    }
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            ProtocolError::Disconnected | ProtocolError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(ConnectionError::from_daemon(e)),
    }
}

impl relay::Hooks for NetBackend {
    fn vring_reset(&self, queue: usize) {
        NetBackend::vring_reset(self, queue);
    }

    fn vring_enabled(&self, queue: usize, enabled: bool) {
        NetBackend::vring_enabled(self, queue, enabled);
    }

    fn num_queues(&self) -> usize {
        vhost_user_backend::VhostUserBackend::num_queues(self)
    }

    fn connections(&self) -> &crate::stats::connections::Connections {
        &self.stats().connections
    }

    fn vring_log_addr(&self, queue: usize, log: Option<u64>) {
        NetBackend::vring_log_addr(self, queue, log);
    }

    fn announce(&self, mac: [u8; 6]) {
        if let Err(e) = NetBackend::announce(self, mac) {
            log::warn!("cannot announce the migrated guest on the tap: {e}");
        }
    }
}

/// What is left of root's privileges once set up: with `--user`, none
/// (the bounding set emptied, then the user and group switched); as root
/// without it, the capabilities [`capabilities::needed`] names. Either way
/// `no_new_privs`. On the main thread before any other is spawned:
/// capabilities belong to a thread, and new threads copy their creator's.
fn drop_privileges(config: &Config) -> Result<(), Error> {
    if let Some((uid, gid)) = config.drop_to {
        capabilities::clear_bounding_set().map_err(Error::Capabilities)?;
        sys::drop_privileges(uid, gid).map_err(Error::DropPrivileges)?;
        log::info!("running as uid {uid}, gid {gid}");
    } else {
        let keep = capabilities::needed(matches!(config.frontend, Frontend::Connect(_)));
        let left = capabilities::keep_only(&keep).map_err(Error::Capabilities)?;
        log::info!("capabilities kept: {}", capabilities::names(&left));
    }
    capabilities::no_new_privs().map_err(Error::Capabilities)
}

/// Binds the Prometheus endpoint: a loopback TCP address or a unix socket.
/// Returns the socket file to remove on exit, if any.
fn bind_prometheus(endpoint: &Endpoint) -> Result<(HttpListener, Option<PathBuf>), Error> {
    Ok(match endpoint {
        Endpoint::Tcp(addr) => {
            let l = std::net::TcpListener::bind(addr).map_err(|source| Error::Listen {
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
            (HttpListener::Tcp(l), None)
        }
        Endpoint::Unix(path) => (HttpListener::Unix(bind(path)?), Some(path.clone())),
    })
}

/// Serves the counters over HTTP (any request gets them) for Prometheus.
fn spawn_prometheus(
    listener: HttpListener,
    endpoint: &Endpoint,
    backend: Arc<NetBackend>,
) -> Result<(), Error> {
    thread::Builder::new()
        .name("prometheus".into())
        .spawn(move || {
            seccomp::enter(Class::Prometheus);
            loop {
                match listener.accept() {
                    Ok(mut c) => {
                        if let Err(e) = answer_http(&mut *c, &backend.stats().prometheus()) {
                            log::debug!("prometheus client: {e}");
                        }
                    }
                    Err(e) => log::warn!("prometheus endpoint: {e}"),
                }
            }
        })
        .map_err(Error::Device)?;
    log::info!("Prometheus metrics on {endpoint:?}");
    Ok(())
}

/// The Prometheus endpoint's listening socket.
enum HttpListener {
    Tcp(std::net::TcpListener),
    Unix(UnixListener),
}

impl HttpListener {
    fn accept(&self) -> io::Result<Box<dyn HttpConn>> {
        Ok(match self {
            HttpListener::Tcp(l) => Box::new(l.accept()?.0),
            HttpListener::Unix(l) => Box::new(l.accept()?.0),
        })
    }
}

/// A connection the Prometheus endpoint answers (TCP or unix).
trait HttpConn: io::Read + io::Write + Send {
    fn set_timeout(&self, d: Duration) -> io::Result<()>;
}

impl HttpConn for std::net::TcpStream {
    fn set_timeout(&self, d: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(d))
    }
}

impl HttpConn for UnixStream {
    fn set_timeout(&self, d: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(d))
    }
}

/// Reads the request head (whatever it asks) and answers with `body`.
fn answer_http(c: &mut dyn HttpConn, body: &str) -> io::Result<()> {
    c.set_timeout(Duration::from_secs(2))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    write!(
        c,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn spawn_stats_server(listener: UnixListener, backend: Arc<NetBackend>) -> io::Result<()> {
    thread::Builder::new().name("stats".into()).spawn(move || {
        seccomp::enter(Class::Stats);
        for conn in listener.incoming() {
            match conn {
                Ok(mut c) => {
                    let _ = c.write_all(backend.stats().prometheus().as_bytes());
                }
                Err(e) => log::warn!("stats socket: {e}"),
            }
        }
    })?;
    Ok(())
}

/// A fresh directory only we may enter (0700, whatever the umask), for the
/// backend's private socket.
fn private_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt as _;
    tempfile::Builder::new()
        .prefix("vhost-user-net.")
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir()
}

#[cfg(test)]
mod private_dir_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_private_socket_directory_is_ours_alone() {
        let dir = private_dir().unwrap();
        let mode = fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "mode {mode:o}");
    }
}
