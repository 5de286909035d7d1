//! What the user may ask for, and whether it is valid.
//!
//! [`Args`] is the command line as clap parses it; [`Config`] is the
//! validated result the daemon runs with. Every error names the flag and
//! what it accepts.

use std::path::PathBuf;

use clap::Parser;

use crate::datapath::notify::Policy;

/// Most queue pairs accepted (one worker thread each).
pub const MAX_QUEUE_PAIRS: usize = 64;
/// Largest ring size a split virtqueue may have.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// vhost-user virtio-net backend on a Linux tap.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "vhost-user-net",
    version,
    about,
    long_about = None,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Sub>,

    /// Unix socket to listen on for the vhost-user frontend (QEMU, ...);
    /// with --client, the frontend's socket to connect to. Not needed under
    /// systemd socket activation (LISTEN_FDS), which passes the socket.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// An already listening unix socket, inherited from a manager, to accept
    /// frontends on instead of --socket-path.
    #[arg(long, value_name = "FD", conflicts_with_all = ["socket_path", "client"])]
    pub fd: Option<i32>,

    /// Connect to the frontend's socket (QEMU `server=on`) instead of
    /// listening; retry until it appears, reconnect when it goes away.
    #[arg(long)]
    pub client: bool,

    /// Print the backend's capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Tap interface to serve; created (link up) if it does not exist,
    /// attached to if it does (it must be multi_queue and vnet_hdr).
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "print_capabilities"
    )]
    pub tap: Option<String>,

    /// Number of RX/TX queue pairs (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queue_pairs: usize,

    /// Largest virtqueue size the frontend may set (a power of two).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub queue_size: u32,

    /// MAC address shown to the guest [default: derived from the tap name].
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,

    /// MTU shown to the guest and set on the tap.
    #[arg(long, value_name = "N")]
    pub mtu: Option<u32>,

    /// Interrupt coalescing for RX (tap to guest): immediate,
    /// frames=N,usecs=T, or adaptive[,usecs=T] (hold while completions are
    /// dense, until they pause or T µs, default 250).
    #[arg(long, value_name = "POLICY", default_value = "immediate")]
    pub rx_coalesce: Policy,

    /// Interrupt coalescing for TX completions (guest to tap).
    #[arg(long, value_name = "POLICY", default_value = "immediate")]
    pub tx_coalesce: Policy,

    /// How frames move between the rings and the tap: uring (a TX batch's
    /// writes submitted with one io_uring_enter; RX reads into guest
    /// buffers that each hold a whole frame a round per io_uring_enter),
    /// posted (uring, and RX keeps reads posted into such buffers across
    /// events, on Linux >= 6.7), syscall (one writev or readv per frame),
    /// or auto (uring where the kernel allows it). uring, posted and auto
    /// fall back to syscall where io_uring is missing or refused.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub tap_io: crate::host::tap::TapIo,

    /// Also serve the counters over HTTP for Prometheus, on a loopback
    /// address (127.0.0.1:9717) or a unix socket (unix:/run/x.prom).
    #[arg(long, value_name = "ADDR")]
    pub prometheus: Option<String>,

    /// Permissions of the sockets the daemon creates, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600")]
    pub socket_mode: String,

    /// Group (name or number) to give the sockets the daemon creates, so
    /// e.g. `--socket-mode 0660 --socket-group kvm` lets that group connect.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// After opening the tap and binding the sockets, drop privileges to
    /// this user (name or number)...
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// ... and this group (default: the user's primary group).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Syscall filters, one per thread (workers, relay, request thread,
    /// frontends, stats, ...): on (syscalls outside a thread's list fail
    /// with EPERM), log (allowed, logged by the kernel's audit), off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: crate::host::seccomp::Mode,

    /// Unix socket serving the counters as Prometheus text
    /// [default: SOCKET_PATH.stats when listening on --socket-path; none otherwise].
    #[arg(long, value_name = "PATH")]
    pub stats_socket: Option<PathBuf>,
}

/// Commands besides serving a device.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Sub {
    /// Print a running daemon's counters per queue.
    Stats {
        /// The daemon's stats socket [default: SOCKET_PATH.stats].
        #[arg(long, value_name = "PATH")]
        stats_socket: Option<PathBuf>,
        /// The daemon's vhost-user socket (its stats socket is PATH.stats).
        #[arg(long, value_name = "PATH")]
        socket_path: Option<PathBuf>,
        /// Refresh every second, showing rates over the last second.
        #[arg(long)]
        watch: bool,
    },
}

/// Where the Prometheus endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

/// The device as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    pub mac: [u8; 6],
    pub mtu: u16,
    pub queue_pairs: usize,
    pub queue_size: u16,
    /// Interrupt coalescing per direction.
    pub rx_coalesce: Policy,
    pub tx_coalesce: Policy,
    /// How frames reach the tap.
    pub tap_io: crate::host::tap::TapIo,
}

/// How the daemon meets its frontends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frontend {
    /// Listen on a socket it creates at this path.
    Listen(PathBuf),
    /// Accept on an inherited, already listening socket (`--fd`, or the one
    /// systemd passed with socket activation).
    ListenFd(i32),
    /// Connect to the frontend's socket at this path.
    Connect(PathBuf),
}

/// What the user asked the program to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Print capabilities (JSON) and exit.
    PrintCapabilities,
    /// Print (or watch) a running daemon's counters.
    Stats { socket: PathBuf, watch: bool },
    /// Serve a device.
    Serve(Config),
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub frontend: Frontend,
    pub tap: String,
    /// `Some` when `--mtu` was given: the tap's MTU is set to it.
    pub tap_mtu: Option<u16>,
    pub stats_socket: Option<PathBuf>,
    pub prometheus: Option<Endpoint>,
    /// Mode and group of the sockets we create.
    pub socket_mode: u32,
    pub socket_gid: Option<u32>,
    /// Privileges to drop to once set up: `(uid, gid)`.
    pub drop_to: Option<(u32, u32)>,
    pub seccomp: crate::host::seccomp::Mode,
    pub device: DeviceConfig,
}

/// A command-line value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--queue-pairs {0}: must be between 1 and {MAX_QUEUE_PAIRS}")]
    QueuePairs(usize),
    #[error("--queue-size {0}: must be a power of two between 2 and {MAX_QUEUE_SIZE}")]
    QueueSize(u32),
    #[error("--mac {0}: expected six hex bytes like 52:54:00:12:34:56, unicast (first byte even)")]
    Mac(String),
    #[error("--mtu {0}: must be between 68 and 65535")]
    Mtu(u32),
    #[error("--tap {0:?}: must be 1 to 15 characters, without '/', whitespace or NUL")]
    TapName(String),
    #[error("--fd {0}: must be a descriptor number of 3 or more (0-2 are stdio)")]
    Fd(i32),
    #[error("{0} is required (or --print-capabilities)")]
    Missing(&'static str),
    #[error("systemd socket activation: {0}")]
    Activation(String),
    #[error("--prometheus {0}: expected a loopback address like 127.0.0.1:9717 or [::1]:9717, or unix:/path")]
    Prometheus(String),
    #[error("stats: give --stats-socket PATH or --socket-path PATH")]
    StatsSocket,
    #[error("--socket-mode {0}: expected octal permissions like 0600 or 0660")]
    SocketMode(String),
    #[error("{flag} {name}: no such {what} in the system's user database (give an existing name or a number)")]
    UnknownId {
        flag: &'static str,
        name: String,
        what: &'static str,
    },
    #[error("{flag} {name}: cannot look it up in the system's user database: {cause}")]
    Lookup {
        flag: &'static str,
        name: String,
        cause: String,
    },
    #[error("--group needs --user (to drop only the group, give --user root)")]
    GroupWithoutUser,
}

impl TryFrom<Args> for Command {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        if let Some(Sub::Stats {
            stats_socket,
            socket_path,
            watch,
        }) = args.command
        {
            let socket = stats_socket
                .or_else(|| {
                    socket_path.map(|p| {
                        let mut s = p.into_os_string();
                        s.push(".stats");
                        PathBuf::from(s)
                    })
                })
                .ok_or(ConfigError::StatsSocket)?;
            return Ok(Command::Stats { socket, watch });
        }
        if args.print_capabilities {
            return Ok(Command::PrintCapabilities);
        }
        let activated = match (&args.socket_path, args.fd) {
            (None, None) => crate::control::systemd::listen_fd()
                .map_err(|e| ConfigError::Activation(e.to_string()))?,
            _ => None,
        };
        Config::from_args(args, activated).map(Command::Serve)
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        Config::from_args(args, None)
    }
}

impl Config {
    /// Validates `args`; `activated` is the listening socket systemd passed
    /// (used when neither --socket-path nor --fd is given).
    pub fn from_args(args: Args, activated: Option<i32>) -> Result<Self, ConfigError> {
        let frontend = match (&args.socket_path, args.fd, args.client) {
            (_, Some(fd), _) if fd < 3 => return Err(ConfigError::Fd(fd)),
            (_, Some(fd), _) => Frontend::ListenFd(fd),
            (Some(path), None, true) => Frontend::Connect(path.clone()),
            (Some(path), None, false) => Frontend::Listen(path.clone()),
            (None, None, _) => match activated {
                Some(fd) => Frontend::ListenFd(fd),
                None => {
                    return Err(ConfigError::Missing(
                        "--socket-path or --fd (or a socket from systemd socket activation)",
                    ))
                }
            },
        };
        let tap = args.tap.clone().ok_or(ConfigError::Missing("--tap"))?;
        if args.queue_pairs == 0 || args.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(args.queue_pairs));
        }
        let queue_size = u16::try_from(args.queue_size)
            .ok()
            .filter(|s| s.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(s))
            .ok_or(ConfigError::QueueSize(args.queue_size))?;
        if !valid_tap_name(&tap) {
            return Err(ConfigError::TapName(tap));
        }
        let mac = match &args.mac {
            Some(text) => parse_mac(text).ok_or_else(|| ConfigError::Mac(text.clone()))?,
            None => default_mac(&tap),
        };
        let tap_mtu = args
            .mtu
            .map(|m| {
                u16::try_from(m)
                    .ok()
                    .filter(|m| *m >= 68)
                    .ok_or(ConfigError::Mtu(m))
            })
            .transpose()?;
        let stats_socket = args.stats_socket.or_else(|| match &frontend {
            Frontend::Listen(path) => {
                let mut s = path.clone().into_os_string();
                s.push(".stats");
                Some(PathBuf::from(s))
            }
            Frontend::ListenFd(_) | Frontend::Connect(_) => None,
        });
        let prometheus = args.prometheus.as_deref().map(parse_endpoint).transpose()?;
        let socket_mode = u32::from_str_radix(args.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| ConfigError::SocketMode(args.socket_mode.clone()))?;
        let socket_gid = args
            .socket_group
            .as_deref()
            .map(|g| lookup_group("--socket-group", g))
            .transpose()?;
        let drop_to = match (&args.user, &args.group) {
            (None, None) => None,
            (None, Some(_)) => return Err(ConfigError::GroupWithoutUser),
            (Some(u), g) => {
                let (uid, primary) = lookup_user(u)?;
                let gid = g
                    .as_deref()
                    .map(|g| lookup_group("--group", g))
                    .transpose()?;
                Some((uid, gid.unwrap_or(primary)))
            }
        };
        Ok(Config {
            frontend,
            prometheus,
            socket_mode,
            socket_gid,
            drop_to,
            seccomp: args.seccomp,
            tap,
            tap_mtu,
            stats_socket,
            device: DeviceConfig {
                mac,
                mtu: tap_mtu.unwrap_or(1500),
                queue_pairs: args.queue_pairs,
                queue_size,
                rx_coalesce: args.rx_coalesce,
                tx_coalesce: args.tx_coalesce,
                tap_io: args.tap_io,
            },
        })
    }
}

/// Finds a group by number or by name, through the system's user database
/// (NSS: `/etc/group`, LDAP, sssd, systemd-userdb, ...).
fn lookup_group(flag: &'static str, name: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(unknown(flag, name, "group")),
        Err(e) => Err(ConfigError::Lookup {
            flag,
            name: name.to_owned(),
            cause: e.desc().to_owned(),
        }),
    }
}

/// Finds a user (uid, primary gid) by name or number through the system's
/// user database (NSS). A number without an entry is taken as uid and gid.
fn lookup_user(name: &str) -> Result<(u32, u32), ConfigError> {
    use nix::unistd::{Uid, User};
    let lookup_error = |e: nix::errno::Errno| ConfigError::Lookup {
        flag: "--user",
        name: name.to_owned(),
        cause: e.desc().to_owned(),
    };
    if let Ok(uid) = name.parse::<u32>() {
        let user = User::from_uid(Uid::from_raw(uid)).map_err(lookup_error)?;
        return Ok(user.map_or((uid, uid), |u| (uid, u.gid.as_raw())));
    }
    match User::from_name(name).map_err(lookup_error)? {
        Some(u) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        None => Err(unknown("--user", name, "user")),
    }
}

fn unknown(flag: &'static str, name: &str, what: &'static str) -> ConfigError {
    ConfigError::UnknownId {
        flag,
        name: name.to_owned(),
        what,
    }
}

/// Parses `--prometheus`: a loopback socket address or `unix:PATH`.
fn parse_endpoint(text: &str) -> Result<Endpoint, ConfigError> {
    if let Some(path) = text.strip_prefix("unix:") {
        if !path.is_empty() {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
    } else if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        if addr.ip().is_loopback() {
            return Ok(Endpoint::Tcp(addr));
        }
    }
    Err(ConfigError::Prometheus(text.to_owned()))
}

fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < crate::host::sys::IFNAMSIZ
        && !name.contains(|c: char| c == '/' || c.is_whitespace() || c == '\0')
        && name != "."
        && name != ".."
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast addresses.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

/// A stable, locally administered MAC derived from the tap name, so a
/// restarted daemon shows the guest the same address.
pub fn default_mac(tap: &str) -> [u8; 6] {
    // FNV-1a: tiny, stable across releases (unlike std's hasher).
    let hash = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let h = hash.to_le_bytes();
    [0x52, 0x54, 0x00, h[0], h[1], h[2]]
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec![
            "vhost-user-net",
            "--socket-path",
            "/run/x.sock",
            "--tap",
            "vm0",
        ];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults_give_one_pair_1024_entries_mtu_1500() {
        let c = Config::try_from(args(&[])).unwrap();
        assert_eq!(c.device.queue_pairs, 1);
        assert_eq!(c.device.queue_size, 1024);
        assert_eq!(c.device.mtu, 1500);
        assert_eq!(c.tap_mtu, None);
        assert_eq!(c.stats_socket, Some(PathBuf::from("/run/x.sock.stats")));
        assert_eq!(c.frontend, Frontend::Listen(PathBuf::from("/run/x.sock")));
        assert_eq!(c.device.mac, default_mac("vm0"));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let cases: [(&[&str], &str); 6] = [
            (&["--queue-pairs", "0"], "--queue-pairs 0"),
            (&["--queue-size", "1000"], "--queue-size 1000"),
            (&["--queue-size", "65536"], "--queue-size 65536"),
            (&["--mac", "01:00:00:00:00:01"], "--mac 01:00:00:00:00:01"),
            (&["--mac", "52:54:00:zz:00:01"], "--mac"),
            (&["--mtu", "67"], "--mtu 67"),
        ];
        for (extra, flag) in cases {
            let err = Config::try_from(args(extra)).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{err:?} should start with {flag:?}");
        }
    }

    #[test]
    fn client_mode_connects_and_has_no_stats_socket_by_default() {
        let c = Config::try_from(args(&["--client"])).unwrap();
        assert_eq!(c.frontend, Frontend::Connect(PathBuf::from("/run/x.sock")));
        assert_eq!(c.stats_socket, None);
    }

    #[test]
    fn inherited_fd_replaces_the_socket_path() {
        let a = Args::try_parse_from(["vhost-user-net", "--fd", "3", "--tap", "t"]).unwrap();
        assert_eq!(Config::try_from(a).unwrap().frontend, Frontend::ListenFd(3));
        let a = Args::try_parse_from(["vhost-user-net", "--fd", "1", "--tap", "t"]).unwrap();
        assert_eq!(Config::try_from(a), Err(ConfigError::Fd(1)));
    }

    #[test]
    fn prometheus_endpoint_is_loopback_or_unix_only() {
        let c = Config::try_from(args(&["--prometheus", "127.0.0.1:9717"])).unwrap();
        assert_eq!(
            c.prometheus,
            Some(Endpoint::Tcp("127.0.0.1:9717".parse().unwrap()))
        );
        let c = Config::try_from(args(&["--prometheus", "unix:/run/p.sock"])).unwrap();
        assert_eq!(c.prometheus, Some(Endpoint::Unix("/run/p.sock".into())));
        for bad in ["0.0.0.0:9717", "10.1.2.3:80", "localhost", "unix:"] {
            let err = Config::try_from(args(&["--prometheus", bad])).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("--prometheus {bad}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn stats_subcommand_finds_the_stats_socket_from_the_socket_path() {
        let a = Args::try_parse_from([
            "vhost-user-net",
            "stats",
            "--socket-path",
            "/run/v.sock",
            "--watch",
        ])
        .unwrap();
        assert_eq!(
            Command::try_from(a),
            Ok(Command::Stats {
                socket: PathBuf::from("/run/v.sock.stats"),
                watch: true
            })
        );
    }

    #[test]
    fn sockets_are_private_by_default_and_ids_resolve_by_name_or_number() {
        let c = Config::try_from(args(&[])).unwrap();
        assert_eq!(
            (c.socket_mode, c.socket_gid, c.drop_to),
            (0o600, None, None)
        );
        let c = Config::try_from(args(&[
            "--socket-mode",
            "0660",
            "--socket-group",
            "root",
            "--user",
            "0",
        ]))
        .unwrap();
        assert_eq!(
            (c.socket_mode, c.socket_gid, c.drop_to),
            (0o660, Some(0), Some((0, 0)))
        );
        let err = Config::try_from(args(&["--user", "no-such-user-here"])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--user no-such-user-here: no such user"),
            "{err}"
        );
        // Names go through the system's user database (NSS), not a parse
        // of /etc/passwd: nobody is 65534 on Debian.
        let c = Config::try_from(args(&["--user", "nobody", "--group", "nogroup"])).unwrap();
        assert_eq!(c.drop_to, Some((65534, 65534)));
        assert_eq!(
            Config::try_from(args(&["--group", "0"])),
            Err(ConfigError::GroupWithoutUser)
        );
        let err = Config::try_from(args(&["--socket-mode", "999"])).unwrap_err();
        assert!(err.to_string().starts_with("--socket-mode 999:"), "{err}");
    }

    #[test]
    fn print_capabilities_needs_no_other_flag() {
        let a = Args::try_parse_from(["vhost-user-net", "--print-capabilities"]).unwrap();
        assert_eq!(Command::try_from(a), Ok(Command::PrintCapabilities));
    }

    #[test]
    fn coalescing_policies_are_per_direction_and_bad_ones_name_the_flag() {
        let c = Config::try_from(args(&[
            "--rx-coalesce",
            "adaptive",
            "--tx-coalesce",
            "frames=32,usecs=1000",
        ]))
        .unwrap();
        assert_eq!(c.device.rx_coalesce.to_string(), "adaptive,usecs=250");
        assert_eq!(
            c.device.tx_coalesce,
            Policy::Frames {
                frames: 32,
                usecs: 1000
            }
        );
        let err = Args::try_parse_from([
            "vhost-user-net",
            "--socket-path",
            "/x",
            "--tap",
            "t",
            "--rx-coalesce",
            "fast",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--rx-coalesce"), "{err}");
    }

    #[test]
    fn tap_name_longer_than_15_bytes_is_refused() {
        let mut a = args(&[]);
        a.tap = Some("a-very-long-tap-name".into());
        assert!(matches!(Config::try_from(a), Err(ConfigError::TapName(_))));
    }

    #[test]
    fn mac_round_trips_and_default_is_local_unicast() {
        let mac = parse_mac("52:54:00:ab:cd:ef").unwrap();
        assert_eq!(format_mac(&mac), "52:54:00:ab:cd:ef");
        let d = default_mac("tap0");
        assert_eq!(d[0] & 1, 0);
        assert_eq!(d, default_mac("tap0"));
        assert_ne!(d, default_mac("tap1"));
    }
}
