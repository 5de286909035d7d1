//! QEMU with the test guest (Debian kernel + busybox initramfs built by
//! `.ci/install-deps.sh`), and a client for the guest's serial control
//! agent (protocol in `tests/guest/README.md`).
//!
//! QEMU is killed by PID on drop; if the test is failing, its console log is
//! kept under `target/qemu-artifacts/`. Its QMP monitor listens on a socket
//! in the same tempdir ([`Qemu::monitor`], [`Qemu::pause`], [`Qemu::resume`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Boot plus guest-side setup under TCG takes ~10 s; leave room for a
/// loaded machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Paths written by `.ci/install-deps.sh` into `$VUN_CACHE/env.sh`.
pub struct GuestEnv {
    vars: HashMap<String, String>,
}

impl GuestEnv {
    pub fn load() -> GuestEnv {
        let cache =
            std::env::var("VUN_CACHE").unwrap_or_else(|_| "/var/cache/vhost-user-net".into());
        let path = Path::new(&cache).join("env.sh");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `sudo .ci/install-deps.sh` first",
                path.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect();
        GuestEnv { vars }
    }

    pub fn get(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from env.sh; rerun .ci/install-deps.sh"))
    }
}

/// Which QEMU to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// 10.0 from bookworm-backports, MSI-X.
    Qemu10,
    /// Debian 12's 7.2, with `vectors=0` (its MSI-X path crashes under TCG).
    Qemu72,
}

/// How QEMU reaches the daemon's socket.
#[derive(Clone, Copy, Debug)]
pub enum Chardev {
    /// QEMU connects; reconnects every second if the daemon goes away.
    Client,
    /// QEMU listens (`server=on`), the daemon runs with `--client`.
    Server,
}

/// Options of one guest.
pub struct Options {
    pub version: Version,
    pub cpus: u32,
    pub queue_pairs: usize,
    pub chardev: Chardev,
    pub mac: &'static str,
    /// Files added to the guest's initramfs: (host path, absolute path in
    /// the guest, in a directory the image has, e.g. `/bin/NAME`), e.g. a
    /// helper program built by the test.
    pub extra_files: Vec<(PathBuf, String)>,
    /// More properties of the virtio-net device, e.g.
    /// `",mrg_rxbuf=off"`.
    pub device_props: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            version: Version::Qemu10,
            cpus: 1,
            queue_pairs: 1,
            chardev: Chardev::Client,
            mac: "52:54:00:12:34:56",
            extra_files: Vec::new(),
            device_props: "",
        }
    }
}

/// A running QEMU; killed on drop.
pub struct Qemu {
    child: Option<Child>,
    pub console: PathBuf,
    name: String,
    qmp_path: PathBuf,
    qmp: Option<Qmp>,
    /// A migration destination's guest-agent listener, until taken.
    ctl: Option<UnixListener>,
    _dir: tempfile::TempDir,
}

impl Qemu {
    /// Boots the guest with its NIC on the vhost-user socket `socket`, the
    /// guest at `ip` (CIDR). Returns once QEMU is started; the guest agent
    /// is reached through the returned [`Guest`].
    pub fn boot(name: &str, socket: &Path, ip: &str, opts: &Options) -> (Qemu, Guest) {
        let (mut qemu, ctl) = Self::spawn(name, socket, ip, opts, &[]);
        let stream = qemu.accept_control(&ctl);
        let mut guest = Guest::new(stream);
        guest.wait_ready(&mut qemu);
        (qemu, guest)
    }

    /// Starts a migration destination with the same devices as
    /// [`Qemu::boot`], waiting for the guest on `-incoming unix:{path}`;
    /// its NIC is on `socket`. After the migration, [`Qemu::take_guest`]
    /// reaches the guest's agent through it.
    pub fn incoming(name: &str, socket: &Path, ip: &str, opts: &Options, path: &Path) -> Qemu {
        let uri = format!("unix:{}", path.display());
        let (mut qemu, ctl) = Self::spawn(name, socket, ip, opts, &["-incoming".into(), uri]);
        qemu.ctl = Some(ctl);
        qemu
    }

    /// The guest's agent on a migration destination (QEMU's serial port
    /// connected to it at start; the guest uses it once it runs here).
    pub fn take_guest(&mut self) -> Guest {
        let ctl = self.ctl.take().expect("an incoming QEMU");
        let stream = self.accept_control(&ctl);
        Guest::new(stream)
    }

    /// Migrates this VM to the QEMU waiting on `unix:{path}` (QMP
    /// `migrate`) and polls `query-migrate` until it completed; returns
    /// the reply (status, downtime, RAM counts).
    pub fn migrate_to(&mut self, path: &Path) -> String {
        // The destination listens once it has started.
        crate::wait_for("the destination's migration socket", || {
            path.exists().then_some(())
        });
        let args = format!("{{\"uri\": \"unix:{}\"}}", path.display());
        self.monitor_with("migrate", &args);
        let deadline = Instant::now() + MONITOR_TIMEOUT;
        loop {
            let reply = self.monitor("query-migrate");
            let compact: String = reply.chars().filter(|c| !c.is_whitespace()).collect();
            if compact.contains("\"status\":\"completed\"") {
                return reply;
            }
            assert!(
                !compact.contains("\"status\":\"failed\""),
                "migration failed: {reply}\n{}",
                self.log()
            );
            assert!(Instant::now() < deadline, "migration not done: {reply}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts QEMU with `extra` arguments; returns it with the listener its
    /// guest agent's serial port connects to.
    fn spawn(
        name: &str,
        socket: &Path,
        ip: &str,
        opts: &Options,
        extra: &[String],
    ) -> (Qemu, UnixListener) {
        let env = GuestEnv::load();
        let dir = tempfile::tempdir().expect("tempdir");
        let ctl_path = dir.path().join("ctl.sock");
        let ctl = UnixListener::bind(&ctl_path).expect("bind control socket");
        let console = dir.path().join("console.log");
        let qmp_path = dir.path().join("qmp.sock");
        let sock = socket.to_str().expect("utf-8 path");
        let chardev = match (opts.chardev, opts.version) {
            (Chardev::Client, Version::Qemu10) => {
                format!("socket,id=chr0,path={sock},reconnect-ms=1000")
            }
            (Chardev::Client, Version::Qemu72) => format!("socket,id=chr0,path={sock},reconnect=1"),
            (Chardev::Server, _) => format!("socket,id=chr0,path={sock},server=on"),
        };
        let vectors = match opts.version {
            Version::Qemu10 => String::new(),
            Version::Qemu72 => ",vectors=0".to_owned(),
        };
        let mq = if opts.queue_pairs > 1 { ",mq=on" } else { "" };
        let binary = match opts.version {
            Version::Qemu10 => env.get("VUN_QEMU10"),
            Version::Qemu72 => env.get("VUN_QEMU72"),
        };
        let initrd = with_extra_files(env.get("VUN_INITRAMFS"), &opts.extra_files, dir.path());
        let append = format!("console=ttyS0 panic=-1 ipv6.disable=1 vun.ip={ip} vun.ctl=ttyS1");
        let args: Vec<String> = [
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-m",
            "512",
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([
            "-smp".into(),
            opts.cpus.to_string(),
            "-object".into(),
            "memory-backend-memfd,id=mem,size=512M,share=on".into(),
            "-numa".into(),
            "node,memdev=mem".into(),
            "-kernel".into(),
            env.get("VUN_KERNEL").into(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            append,
            "-serial".into(),
            format!("file:{}", console.display()),
            // wait=off: QEMU does not wait for a monitor client to start.
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
            "-chardev".into(),
            format!("socket,id=ctl,path={}", ctl_path.display()),
            "-serial".into(),
            "chardev:ctl".into(),
            "-chardev".into(),
            chardev,
            "-netdev".into(),
            format!(
                "vhost-user,id=net0,chardev=chr0,queues={}",
                opts.queue_pairs
            ),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=net0,mac={}{mq}{vectors}{}",
                opts.mac, opts.device_props
            ),
        ])
        // VUN_QEMU_ARGS (e.g. "-trace vhost_user_write -trace vhost_user_read",
        // traces go to QEMU's stderr, kept with a failing test's artifacts)
        // adds arguments; a debugging aid, unset in CI.
        .chain(extra.iter().cloned())
        .chain(
            std::env::var("VUN_QEMU_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned),
        )
        .collect();
        let qemu_log = std::fs::File::create(dir.path().join("qemu.log")).expect("qemu log");
        let child = Command::new(binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(qemu_log)
            .spawn()
            .expect("start QEMU");
        let qemu = Qemu {
            child: Some(child),
            console,
            name: name.to_owned(),
            qmp_path,
            qmp: None,
            ctl: None,
            _dir: dir,
        };
        (qemu, ctl)
    }

    fn accept_control(&mut self, ctl: &UnixListener) -> UnixStream {
        ctl.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Ok((s, _)) = ctl.accept() {
                s.set_nonblocking(false).expect("blocking");
                return s;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "QEMU never opened its control channel"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics with QEMU's stderr if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            let log =
                std::fs::read_to_string(self._dir.path().join("qemu.log")).unwrap_or_default();
            panic!("QEMU exited ({status}): {log}");
        }
    }

    /// QEMU's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("qemu.log")).unwrap_or_default()
    }

    /// Runs the argument-less QMP command `command` (e.g. `stop`, `cont`,
    /// `query-status`) and returns QEMU's reply line (`{"return": ...}`).
    /// Panics if QEMU answers with an error or not within [`MONITOR_TIMEOUT`].
    pub fn monitor(&mut self, command: &str) -> String {
        self.monitor_with(command, "")
    }

    /// Runs QMP `command` with `arguments` (a JSON object, or "" for none).
    pub fn monitor_with(&mut self, command: &str, arguments: &str) -> String {
        assert!(
            command
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "a bare QMP command name: {command}"
        );
        if self.qmp.is_none() {
            let path = self.qmp_path.clone();
            let qmp = Qmp::connect(&path, self);
            self.qmp = Some(qmp);
        }
        let mut qmp = self.qmp.take().expect("connected above");
        let reply = qmp.execute(command, arguments, self);
        self.qmp = Some(qmp);
        reply
    }

    /// Pauses the VM (QMP `stop`): its vCPUs stop and QEMU stops the
    /// vhost-user rings (GET_VRING_BASE) before answering.
    pub fn pause(&mut self) {
        self.monitor("stop");
        self.assert_status("paused");
    }

    /// Resumes a paused VM (QMP `cont`): QEMU sets the rings up again.
    pub fn resume(&mut self) {
        self.monitor("cont");
        self.assert_status("running");
    }

    fn assert_status(&mut self, want: &str) {
        let status = self.monitor("query-status");
        let compact: String = status.chars().filter(|c| !c.is_whitespace()).collect();
        assert!(
            compact.contains(&format!("\"status\":\"{want}\"")),
            "VM not {want}: {status}"
        );
    }

    /// Kills QEMU (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The initramfs to boot: `base` itself, or with `extra` files a copy of it
/// in `dir` followed by a second (gzipped newc) cpio archive holding them;
/// the kernel unpacks concatenated archives in order.
fn with_extra_files(base: &str, extra: &[(PathBuf, String)], dir: &Path) -> PathBuf {
    if extra.is_empty() {
        return PathBuf::from(base);
    }
    let stage = dir.join("extra-root");
    let mut names = Vec::new();
    for (host, guest) in extra {
        let rel = guest.trim_start_matches('/');
        let to = stage.join(rel);
        std::fs::create_dir_all(to.parent().expect("a file in a directory")).expect("stage dir");
        std::fs::copy(host, &to).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
        names.push(rel.to_owned());
    }
    let cpio = Command::new("sh")
        .arg("-c")
        .arg("cpio -o -H newc --owner=0:0 --quiet | gzip -n")
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn cpio");
    let mut stdin = cpio.stdin.as_ref().expect("piped");
    stdin
        .write_all(names.join("\n").as_bytes())
        .and_then(|()| stdin.write_all(b"\n"))
        .expect("file list to cpio");
    let out = cpio.wait_with_output().expect("cpio");
    assert!(out.status.success(), "cpio of the extra files failed");
    let path = dir.join("initramfs.cpio.gz");
    let mut initrd = std::fs::read(base).unwrap_or_else(|e| panic!("{base}: {e}"));
    initrd.extend_from_slice(&out.stdout);
    std::fs::write(&path, initrd).expect("write the initramfs");
    path
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let dir = crate::artifacts_dir().join("qemu-artifacts");
            let _ = std::fs::create_dir_all(&dir);
            let keep = dir.join(format!("{}-console.log", self.name));
            let _ = std::fs::copy(&self.console, &keep);
            let _ = std::fs::write(dir.join(format!("{}-qemu.log", self.name)), self.log());
            eprintln!("guest console log kept at {}", keep.display());
        }
    }
}

/// How long one QMP command may take (`stop` waits for the backend's
/// GET_VRING_BASE replies).
pub const MONITOR_TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP client: one JSON object per line each way; replies carry the `id`
/// of their command, asynchronous events (`STOP`, `RESUME`, ...) none.
struct Qmp {
    stream: UnixStream,
    pending: Vec<u8>,
    seq: u32,
}

impl Qmp {
    /// Connects to QEMU's monitor socket and leaves capabilities
    /// negotiation mode (`qmp_capabilities`).
    fn connect(path: &Path, qemu: &mut Qemu) -> Qmp {
        let deadline = Instant::now() + MONITOR_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    qemu.assert_running();
                    assert!(
                        Instant::now() < deadline,
                        "QMP socket {}: {e}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut qmp = Qmp {
            stream,
            pending: Vec::new(),
            seq: 0,
        };
        let greeting = qmp.line(qemu, deadline);
        assert!(
            greeting.contains("\"QMP\""),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", "", qemu);
        qmp
    }

    /// The next line from QEMU.
    fn line(&mut self, qemu: &mut Qemu, deadline: Instant) -> String {
        loop {
            if let Some(nl) = self.pending.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=nl).collect();
                return String::from_utf8_lossy(&line).trim().to_owned();
            }
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("QEMU closed its monitor: {}", qemu.log()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(_) => {
                    qemu.assert_running();
                    assert!(Instant::now() < deadline, "QMP: no answer from QEMU");
                }
            }
        }
    }

    /// Sends `command` (with `arguments`, a JSON object or "") and returns
    /// its reply, skipping events.
    fn execute(&mut self, command: &str, arguments: &str, qemu: &mut Qemu) -> String {
        self.seq += 1;
        let id = format!("\"vun-{}\"", self.seq);
        let arguments = if arguments.is_empty() {
            String::new()
        } else {
            format!(", \"arguments\": {arguments}")
        };
        self.stream
            .write_all(
                format!("{{\"execute\": \"{command}\"{arguments}, \"id\": {id}}}\n").as_bytes(),
            )
            .expect("send QMP command");
        let deadline = Instant::now() + MONITOR_TIMEOUT;
        loop {
            let line = self.line(qemu, deadline);
            if !line.contains(&id) {
                continue;
            }
            assert!(line.contains("\"return\""), "QMP {command} failed: {line}");
            return line;
        }
    }
}

/// The guest's control agent, over QEMU's second serial port.
pub struct Guest {
    stream: UnixStream,
    pending: Vec<u8>,
    seq: u32,
}

impl Guest {
    fn new(stream: UnixStream) -> Guest {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Guest {
            stream,
            pending: Vec::new(),
            seq: 0,
        }
    }

    /// Reads more bytes into `pending`; false on a timeout.
    fn fill(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf) {
            Ok(0) => panic!("guest control channel closed"),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                true
            }
            Err(_) => false,
        }
    }

    fn find(&self, needle: &[u8]) -> Option<usize> {
        self.pending.windows(needle.len()).position(|w| w == needle)
    }

    fn wait_ready(&mut self, qemu: &mut Qemu) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while self.find(b"__VUN_READY__").is_none() {
            qemu.assert_running();
            assert!(Instant::now() < deadline, "guest never became ready");
            self.fill();
        }
        self.pending.clear();
    }

    /// Runs one shell command line in the guest; returns exit status and
    /// output (stdout and stderr).
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        assert!(!cmd.contains('\n'), "one line per request");
        self.seq += 1;
        let tag = format!("t{}", self.seq);
        self.stream
            .write_all(format!("VUN {tag} {cmd}\n").as_bytes())
            .expect("send request");
        let begin = format!("__VUN_BEGIN__ {tag}\n");
        let done = format!("\n__VUN_DONE__ {tag} rc=");
        let deadline = Instant::now() + timeout;
        loop {
            if let (Some(b), Some(d)) = (self.find(begin.as_bytes()), self.find(done.as_bytes())) {
                let rest = &self.pending[d + done.len()..];
                if let Some(nl) = rest.iter().position(|&c| c == b'\n') {
                    let rc: i32 = String::from_utf8_lossy(&rest[..nl])
                        .trim()
                        .parse()
                        .unwrap_or(-1);
                    let out =
                        String::from_utf8_lossy(&self.pending[b + begin.len()..d]).into_owned();
                    self.pending.drain(..d + done.len() + nl + 1);
                    return (rc, out);
                }
            }
            assert!(Instant::now() < deadline, "guest command timed out: {cmd}");
            self.fill();
        }
    }

    /// Runs `cmd`, panicking unless it exits 0; returns its output.
    pub fn ok(&mut self, cmd: &str, timeout: Duration) -> String {
        let (rc, out) = self.run(cmd, timeout);
        assert_eq!(rc, 0, "guest command failed: {cmd}\n{out}");
        out
    }
}
