//! A network namespace with a tap in it, and frames captured there.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};

use crate::{run, unique};

/// A network namespace, deleted on drop. IPv6 is off in it, so the kernel
/// sends no unsolicited frames to the tap.
pub struct Netns {
    pub name: String,
}

impl Netns {
    #[allow(clippy::new_without_default)] // creating a namespace is not a default
    pub fn new() -> Netns {
        let name = unique("vun");
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        for key in ["all", "default"] {
            let k = format!("net.ipv6.conf.{key}.disable_ipv6=1");
            run("ip", &["netns", "exec", &ns.name, "sysctl", "-qw", &k]);
        }
        ns
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// The MAC address of interface `dev` in the namespace.
    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-br", "link", "show", "dev", dev])
            .output()
            .expect("spawn ip");
        let text = String::from_utf8_lossy(&out.stdout);
        let field = text
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no MAC for {dev}: {text}"));
        let mut mac = [0u8; 6];
        for (b, hex) in mac.iter_mut().zip(field.split(':')) {
            *b = u8::from_str_radix(hex, 16).expect("a MAC address");
        }
        mac
    }

    /// Creates a persistent multiqueue tap with a virtio-net header, as an
    /// administrator would (`ip tuntap add`), and sets it up.
    pub fn add_tap(&self, name: &str) {
        self.ip(&[
            "tuntap",
            "add",
            "dev",
            name,
            "mode",
            "tap",
            "multi_queue",
            "vnet_hdr",
        ]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// Addresses `tap` as 198.18.0.1/24 and adds a permanent neighbour entry
    /// for the guest (198.18.0.2 at `guest_mac`), so traffic from the
    /// namespace reaches the guest without ARP.
    pub fn route_to_guest(&self, tap: &str, guest_mac: [u8; 6]) {
        let mac = vhost_user_net::control::config::format_mac(&guest_mac);
        self.ip(&["addr", "add", "198.18.0.1/24", "dev", tap]);
        self.ip(&[
            "neigh",
            "replace",
            "198.18.0.2",
            "lladdr",
            &mac,
            "dev",
            tap,
            "nud",
            "permanent",
        ]);
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it
    /// creates live in the namespace).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(path).expect("namespace file");
            setns(ns, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// A raw packet socket in the namespace that sees every frame (the only
    /// interface up in the namespace is the tap).
    pub fn packet_socket(&self) -> OwnedFd {
        self.within(|| {
            let fd = socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
            .expect("packet socket");
            let tv = nix::sys::time::TimeVal::new(0, 200_000);
            setsockopt(&fd, sockopt::ReceiveTimeout, &tv).expect("timeout");
            fd
        })
    }

    /// A UDP socket in the namespace.
    pub fn udp_socket(&self) -> std::net::UdpSocket {
        self.within(|| std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Reads frames from a packet socket until `pred` matches one or time runs out.
pub fn capture(fd: &OwnedFd, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 70_000];
    while Instant::now() < deadline {
        if let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            if pred(&buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
    }
    None
}
