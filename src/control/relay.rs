//! A relay between the frontend and vhost-user-backend that fixes QEMU's
//! message order.
//!
//! QEMU (7.2 and 10.0) sends `SET_VRING_ENABLE` for every ring *before*
//! `SET_FEATURES`, and not again afterwards. vhost-user-backend rejects
//! `SET_VRING_ENABLE` until `VHOST_USER_F_PROTOCOL_FEATURES` is acked
//! (`InactiveFeature`) and drops the connection. The relay forwards every
//! message unchanged except those early enables: it holds them (the last
//! value per ring wins), answers the frontend's NEED_REPLY itself, and
//! replays them right after forwarding `SET_FEATURES`, without NEED_REPLY, so
//! the rings end up enabled exactly as the frontend asked.
//!
//! It also tells the backend when the frontend re-initialises a ring
//! ([`Hooks::vring_reset`]), so a ring stopped by a guest fault can restart,
//! and answers `SEND_RARP` itself (the crates have no handler): the backend
//! announces the migrated guest's MAC on the tap ([`Hooks::announce`]).
//! Replies (backend to frontend) pass through untouched.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};

use crate::host::sys;
use crate::stats::connections::connection_log;

/// vhost-user message header: request, flags, payload size (all u32 LE).
const HEADER_LEN: usize = 12;
/// Largest payload accepted (the protocol's messages are far smaller).
const MAX_PAYLOAD: usize = 4096;

/// The protocol version every message carries in its flags (the crate
/// names the field's mask, not the value).
const VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();

const GET_FEATURES: u32 = FrontendReq::GET_FEATURES as u32;
const SET_FEATURES: u32 = FrontendReq::SET_FEATURES as u32;
const RESET_OWNER: u32 = FrontendReq::RESET_OWNER as u32;
const SET_VRING_NUM: u32 = FrontendReq::SET_VRING_NUM as u32;
const SET_VRING_ADDR: u32 = FrontendReq::SET_VRING_ADDR as u32;
const SET_VRING_BASE: u32 = FrontendReq::SET_VRING_BASE as u32;
const SET_PROTOCOL_FEATURES: u32 = FrontendReq::SET_PROTOCOL_FEATURES as u32;
const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
const SET_VRING_KICK: u32 = FrontendReq::SET_VRING_KICK as u32;
const SET_VRING_CALL: u32 = FrontendReq::SET_VRING_CALL as u32;
const SET_VRING_ERR: u32 = FrontendReq::SET_VRING_ERR as u32;
const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
const RESET_DEVICE: u32 = FrontendReq::RESET_DEVICE as u32;
const ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
const SEND_RARP: u32 = FrontendReq::SEND_RARP as u32;
const SET_LOG_FD: u32 = FrontendReq::SET_LOG_FD as u32;

const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const PROTOCOL_F_REPLY_ACK: u64 = VhostUserProtocolFeatures::REPLY_ACK.bits();

/// What the relay tells the backend about.
pub trait Hooks: Send + Sync {
    /// The frontend set ring `queue` up again (size, address or base).
    fn vring_reset(&self, queue: usize);
    /// The frontend enabled or disabled ring `queue` (`SET_VRING_ENABLE`).
    fn vring_enabled(&self, queue: usize, enabled: bool);
    /// Number of rings the device serves.
    fn num_queues(&self) -> usize;
    /// The daemon's connections, whose log budget the relay's lines use.
    fn connections(&self) -> &crate::stats::connections::Connections;
    /// The frontend asked (`SET_VRING_ADDR` with `VHOST_VRING_F_LOG`) for
    /// ring `queue`'s used ring to be logged at guest address `log`, or not
    /// at all (`None`).
    fn vring_log_addr(&self, queue: usize, log: Option<u64>);
    /// The guest with MAC `mac` arrived here by live migration
    /// (`SEND_RARP`): announce it on the tap.
    fn announce(&self, mac: [u8; 6]);
}

/// Names a frontend misconfiguration that the backend would only answer
/// with "invalid parameters", with the fix.
fn diagnose(msg: &Message, num_queues: usize) -> Option<String> {
    let ring = match msg.request() {
        SET_MEM_TABLE | ADD_MEM_REG if msg.files.is_empty() => {
            return Some(
                "the frontend sent guest memory without file descriptors: guest RAM must be \
                 shared (QEMU: -object memory-backend-memfd,id=mem,size=...,share=on \
                 -numa node,memdev=mem)"
                    .to_owned(),
            );
        }
        SET_VRING_NUM | SET_VRING_ADDR | SET_VRING_BASE | SET_VRING_ENABLE => msg.payload_u32(0)?,
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => msg.payload_u32(0)? & 0xff,
        _ => return None,
    };
    (ring as usize >= num_queues).then(|| {
        format!(
            "the frontend uses ring {ring}, but this daemon serves {} queue pair(s): start it \
             with --queue-pairs {} or give the frontend queues={}",
            num_queues / 2,
            ring / 2 + 1,
            num_queues / 2
        )
    })
}

/// One vhost-user message as read from the socket.
struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    files: Vec<std::fs::File>,
}

impl Message {
    fn field(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.header[4 * i..4 * i + 4].try_into().expect("4 bytes"))
    }

    fn request(&self) -> u32 {
        self.field(0)
    }

    fn flags(&self) -> u32 {
        self.field(1)
    }

    fn payload_u32(&self, i: usize) -> Option<u32> {
        let b = self.payload.get(4 * i..4 * i + 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    fn payload_u64(&self) -> Option<u64> {
        let b = self.payload.get(..8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn set_flags(&mut self, flags: u32) {
        self.header[4..8].copy_from_slice(&flags.to_le_bytes());
    }

    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(&self.payload);
        v
    }

    /// Reads one message; `Ok(None)` on a clean end of stream.
    fn read(sock: &mut UnixStream) -> io::Result<Option<Message>> {
        let mut header = [0u8; HEADER_LEN];
        let (n, files) = sys::recv_with_files(sock, &mut header)?;
        if n == 0 {
            return Ok(None);
        }
        sock.read_exact(&mut header[n..])?;
        let size = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message payload of {size} bytes"),
            ));
        }
        let mut payload = vec![0u8; size];
        sock.read_exact(&mut payload)?;
        Ok(Some(Message {
            header,
            payload,
            files,
        }))
    }

    fn write(&self, sock: &UnixStream) -> io::Result<()> {
        let bytes = self.bytes();
        let sent = sys::send_with_files(sock, &bytes, &self.files)?;
        let rest = &bytes[sent..];
        (&*sock).write_all(rest)?;
        Ok(())
    }
}

/// Protocol state the relay tracks to know when enables may pass.
#[derive(Default)]
struct State {
    reply_ack: bool,
    features_acked: bool,
    /// A misconfiguration was reported on this connection (say it once).
    diagnosed: bool,
    /// Early enables by ring index, the last value per ring.
    held: BTreeMap<u32, Message>,
}

/// Starts relaying between `frontend` and `backend` (the socket
/// vhost-user-backend serves). Returns the two relay threads; they end when
/// either side closes.
///
/// Before any frontend message, the crate's request thread is sent a
/// GET_FEATURES of the relay's own (its reply kept from the frontend): our
/// `features()` callback is that thread's earliest hook, where it installs
/// its syscall filter ([`crate::host::seccomp`]), so it reads the
/// frontend's first byte already filtered. Harmless to the protocol: the
/// frontend's own GET_FEATURES gets the same answer.
pub fn spawn(
    frontend: UnixStream,
    mut backend: UnixStream,
    hooks: Arc<dyn Hooks>,
) -> io::Result<[JoinHandle<()>; 2]> {
    prime(&mut backend)?;
    let front_writer = Arc::new(Mutex::new(frontend.try_clone()?));
    let back_reader = backend.try_clone()?;
    let front_for_replies = front_writer.clone();
    let down = thread::Builder::new()
        .name("relay-requests".into())
        .spawn(move || {
            crate::host::seccomp::enter(crate::host::seccomp::Class::RelayRequests);
            let mut front = frontend;
            if let Err(e) = forward_requests(&mut front, &backend, &front_writer, &*hooks) {
                log::debug!("relay: request stream ended: {e}");
            }
            let _ = backend.shutdown(Shutdown::Both);
            let _ = front.shutdown(Shutdown::Both);
        })?;
    let up = thread::Builder::new()
        .name("relay-replies".into())
        .spawn(move || {
            crate::host::seccomp::enter(crate::host::seccomp::Class::RelayReplies);
            let mut back = back_reader;
            if let Err(e) = forward_replies(&mut back, &front_for_replies) {
                log::debug!("relay: reply stream ended: {e}");
            }
            let front = front_for_replies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = front.shutdown(Shutdown::Both);
            let _ = back.shutdown(Shutdown::Both);
        })?;
    Ok([down, up])
}

/// Sends the crate a GET_FEATURES and reads its reply (see [`spawn`]).
fn prime(backend: &mut UnixStream) -> io::Result<()> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&GET_FEATURES.to_le_bytes());
    header[4..8].copy_from_slice(&VERSION.to_le_bytes());
    let request = Message {
        header,
        payload: Vec::new(),
        files: Vec::new(),
    };
    request.write(backend)?;
    match Message::read(backend)? {
        Some(reply) if reply.request() == GET_FEATURES && reply.flags() & FLAG_REPLY != 0 => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the backend did not answer GET_FEATURES",
        )),
    }
}

fn forward_replies(back: &mut UnixStream, front: &Mutex<UnixStream>) -> io::Result<()> {
    while let Some(msg) = Message::read(back)? {
        let front = front
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        msg.write(&front)?;
    }
    Ok(())
}

fn forward_requests(
    front: &mut UnixStream,
    back: &UnixStream,
    front_writer: &Mutex<UnixStream>,
    hooks: &dyn Hooks,
) -> io::Result<()> {
    let mut state = State::default();
    while let Some(mut msg) = Message::read(front)? {
        if !state.diagnosed {
            if let Some(problem) = diagnose(&msg, hooks.num_queues()) {
                connection_log!(hooks.connections(), log::Level::Error, "{problem}");
                state.diagnosed = true;
            }
        }
        match msg.request() {
            SET_PROTOCOL_FEATURES => {
                state.reply_ack = msg.payload_u64().unwrap_or(0) & PROTOCOL_F_REPLY_ACK != 0;
            }
            RESET_OWNER | RESET_DEVICE => state.features_acked = false,
            SET_VRING_NUM | SET_VRING_ADDR | SET_VRING_BASE => {
                if let Some(q) = msg.payload_u32(0) {
                    hooks.vring_reset(q as usize);
                    if msg.request() == SET_VRING_ADDR {
                        hooks.vring_log_addr(q as usize, used_log_addr(&msg));
                    }
                }
            }
            SET_VRING_ENABLE => {
                if let (Some(q), Some(v)) = (msg.payload_u32(0), msg.payload_u32(1)) {
                    hooks.vring_enabled(q as usize, v != 0);
                }
                if state.features_acked {
                    msg.write(back)?;
                    continue;
                }
                answer_here(&msg, &state, front_writer)?;
                msg.set_flags(msg.flags() & !FLAG_NEED_REPLY);
                let ring = msg.payload_u32(0).unwrap_or(u32::MAX);
                log::debug!("relay: holding early SET_VRING_ENABLE for ring {ring}");
                state.held.insert(ring, msg);
                continue;
            }
            SET_LOG_FD => {
                // The log-update eventfd: vhost-user-backend has no handler
                // (the connection would drop) and the daemon never changes
                // the log behind the frontend's back, so it has nothing to
                // signal: answer here; its fd closes with the message.
                answer_here(&msg, &state, front_writer)?;
                continue;
            }
            SEND_RARP => {
                // vhost-user-backend has no handler (the connection would
                // drop): announce here, answer here, do not forward.
                if let Some(b) = msg.payload.get(..6) {
                    let mac: [u8; 6] = b.try_into().expect("6 bytes");
                    hooks.announce(mac);
                }
                answer_here(&msg, &state, front_writer)?;
                continue;
            }
            _ => {}
        }
        let request = msg.request();
        let acked = msg.payload_u64().unwrap_or(0);
        msg.write(back)?;
        if request == SET_FEATURES {
            state.features_acked = true;
            let held = std::mem::take(&mut state.held);
            if acked & PROTOCOL_FEATURES_BIT != 0 {
                for (ring, enable) in held {
                    log::debug!("relay: replaying SET_VRING_ENABLE for ring {ring}");
                    enable.write(back)?;
                }
            } else {
                // Without PROTOCOL_FEATURES the backend enables every ring
                // at SET_FEATURES, as the spec says, and the held enables
                // are moot; the backend hears of it as of an enable.
                for q in 0..hooks.num_queues() {
                    hooks.vring_enabled(q, true);
                }
            }
        }
    }
    Ok(())
}

/// `VHOST_VRING_F_LOG` in `SET_VRING_ADDR`'s flags.
const VRING_F_LOG: u32 = 0x1;

/// The used ring's log address in a `SET_VRING_ADDR` (`struct
/// vhost_vring_addr`: index, flags, then four u64: descriptor, used and
/// avail ring addresses, and `log_guest_addr`), if its flags ask for one.
fn used_log_addr(msg: &Message) -> Option<u64> {
    let flags = msg.payload_u32(1)?;
    let log = msg.payload.get(32..40)?;
    (flags & VRING_F_LOG != 0).then(|| u64::from_le_bytes(log.try_into().expect("8 bytes")))
}

/// Answers a request the relay handles itself (it never reaches the
/// backend): a successful REPLY_ACK when the frontend asked for one.
fn answer_here(msg: &Message, state: &State, front: &Mutex<UnixStream>) -> io::Result<()> {
    if msg.flags() & FLAG_NEED_REPLY != 0 && state.reply_ack {
        ack(front, msg.request())?;
    }
    Ok(())
}

/// Sends a successful REPLY_ACK for `request` to the frontend.
fn ack(front: &Mutex<UnixStream>, request: u32) -> io::Result<()> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&request.to_le_bytes());
    header[4..8].copy_from_slice(&(VERSION | FLAG_REPLY).to_le_bytes());
    header[8..12].copy_from_slice(&8u32.to_le_bytes());
    let reply = Message {
        header,
        payload: 0u64.to_le_bytes().to_vec(),
        files: Vec::new(),
    };
    let front = front
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    reply.write(&front)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(request: u32, payload: &[u8], files: Vec<std::fs::File>) -> Message {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        let size = u32::try_from(payload.len()).unwrap();
        header[8..12].copy_from_slice(&size.to_le_bytes());
        Message {
            header,
            payload: payload.to_vec(),
            files,
        }
    }

    #[test]
    fn memory_without_file_descriptors_is_diagnosed_as_unshared_ram() {
        let msg = message(ADD_MEM_REG, &[0u8; 40], Vec::new());
        let text = diagnose(&msg, 2).expect("diagnosed");
        assert!(text.contains("share=on"), "{text}");
    }

    #[test]
    fn ring_beyond_the_queue_pairs_is_diagnosed_with_the_flag_to_change() {
        let mut payload = 2u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&256u32.to_le_bytes());
        let text = diagnose(&message(SET_VRING_NUM, &payload, Vec::new()), 2).expect("diagnosed");
        assert!(text.contains("--queue-pairs 2"), "{text}");
        let kick = message(SET_VRING_KICK, &3u64.to_le_bytes(), Vec::new());
        assert!(diagnose(&kick, 4).is_none());
        assert!(diagnose(&kick, 2).is_some());
    }
}
