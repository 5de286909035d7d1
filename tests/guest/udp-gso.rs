//! `vun-udp-gso`: UDP with generic segmentation offload for the busybox
//! test guest, which has no UDP tool of its own. Built by the QEMU tests
//! (`rustc`, statically linked, std only) and added to the guest's
//! initramfs as `/bin/vun-udp-gso`.
//!
//! ```text
//! vun-udp-gso send ADDR:PORT GSO_SIZE LEN TAG
//!     one sendmsg of LEN bytes (pattern TAG) with UDP_SEGMENT = GSO_SIZE:
//!     the kernel sends LEN / GSO_SIZE datagrams (rounded up)
//! vun-udp-gso recv PORT COUNT FILE SECONDS
//!     binds 0.0.0.0:PORT, prints "listening", receives COUNT datagrams
//!     (at most SECONDS apart) and appends them to FILE; prints
//!     "datagrams=N bytes=B sizes=S1,S2,..."; exits 1 if fewer arrived
//! ```
//!
//! The pattern of TAG is the harness's `long_payload(TAG, LEN)`: the
//! 64-byte marker `vhost-user-net-test`, TAG (big-endian u32), 0x42
//! padding; then byte i (from 0) is i % 251.

use std::io::Write;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Duration;

extern "C" {
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const i32, len: u32) -> i32;
}

const SOL_UDP: i32 = 17;
const UDP_SEGMENT: i32 = 103;

fn payload(tag: u32, len: usize) -> Vec<u8> {
    let mut p = b"vhost-user-net-test".to_vec();
    p.extend_from_slice(&tag.to_be_bytes());
    p.resize(64, 0x42);
    let rest = len.saturating_sub(p.len());
    p.extend((0..rest).map(|i| (i % 251) as u8));
    p.truncate(len);
    p
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

fn usage() -> ! {
    eprintln!("usage: vun-udp-gso send ADDR:PORT GSO_SIZE LEN TAG | recv PORT COUNT FILE SECONDS");
    std::process::exit(2)
}

fn send(args: &[String]) {
    let to: std::net::SocketAddr = arg(args, 2);
    let gso: i32 = arg(args, 3);
    let data = payload(arg(args, 5), arg(args, 4));
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    // SAFETY: `value` points to a live i32 of the length given.
    let rc = unsafe { setsockopt(sock.as_raw_fd(), SOL_UDP, UDP_SEGMENT, &gso, 4) };
    if rc != 0 {
        eprintln!("UDP_SEGMENT: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    let n = sock.send_to(&data, to).expect("send");
    println!("sent={n}");
}

fn recv(args: &[String]) {
    let port: u16 = arg(args, 2);
    let count: usize = arg(args, 3);
    let path: String = arg(args, 4);
    let seconds: u64 = arg(args, 5);
    let sock = UdpSocket::bind(("0.0.0.0", port)).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(seconds)))
        .expect("timeout");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("output file");
    println!("listening");
    std::io::stdout().flush().expect("stdout");
    let mut sizes = Vec::new();
    let mut buf = vec![0u8; 65536];
    while sizes.len() < count {
        match sock.recv(&mut buf) {
            Ok(n) => {
                file.write_all(&buf[..n]).expect("write");
                sizes.push(n);
            }
            Err(e) => {
                eprintln!("recv: {e}");
                break;
            }
        }
    }
    let sizes_text: Vec<String> = sizes.iter().map(usize::to_string).collect();
    println!(
        "datagrams={} bytes={} sizes={}",
        sizes.len(),
        sizes.iter().sum::<usize>(),
        sizes_text.join(",")
    );
    std::process::exit(i32::from(sizes.len() < count));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("send") => send(&args),
        Some("recv") => recv(&args),
        _ => usage(),
    }
}
