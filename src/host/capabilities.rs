//! Capabilities: once set up, the daemon keeps only what its running
//! threads need, and can never gain more (`no_new_privs`).
//!
//! Capabilities, the bounding set and `no_new_privs` belong to a thread in
//! Linux, and a new thread copies its creator's: call these on the main
//! thread after the set-up that needs privileges (the tap opened, the
//! sockets bound) and before any other thread is spawned.
//!
//! What a running daemon started as root still needs (measured: every
//! end-to-end test passes with no capability at all, except the two named
//! here, which fail without theirs):
//!
//! - `CAP_NET_ADMIN`: re-attaching a queue fd to a tap that was deleted and
//!   re-created for another user (`ip tuntap add ... user U`): `TUNSETIFF`
//!   on an existing tap needs it unless the tap's owner and group are ours
//!   (`frontend::tap_re_created_for_another_user_is_re_attached_with_the_one_capability_kept`).
//!   Attaching and detaching queues (`TUNSETQUEUE`) needs no capability,
//!   nor does re-attaching a tap without an owner.
//! - With `--client` also `CAP_DAC_OVERRIDE`: the daemon connects to the
//!   frontend's socket after the drop, and again at every reconnect; a
//!   frontend running as another user (QEMU under libvirt) makes a socket
//!   only that user may write to
//!   (`frontend::client_mode_reaches_a_frontend_socket_owned_by_another_user`).
//!
//! Nothing else: the sockets the daemon removes on exit are its own, in
//! directories root owns; where root may not write without
//! `CAP_DAC_OVERRIDE` (a directory of another user's) the socket stays
//! behind, and the next start replaces it (a stale socket is replaced).

use caps::{CapSet, Capability, CapsHashSet};

/// Why the capabilities could not be reduced.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

impl From<caps::errors::CapsError> for Error {
    fn from(e: caps::errors::CapsError) -> Self {
        Error(e.to_string())
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error(format!("cannot set no_new_privs: {e}"))
    }
}

/// The capabilities a running daemon keeps; `client` when it connects to
/// its frontend (`--client`).
pub fn needed(client: bool) -> CapsHashSet {
    let mut keep = CapsHashSet::from([Capability::CAP_NET_ADMIN]);
    if client {
        keep.insert(Capability::CAP_DAC_OVERRIDE);
    }
    keep
}

/// Reduces the calling thread's capabilities to `keep` (of those it has):
/// the bounding set (when we may: it takes `CAP_SETPCAP`), the ambient and
/// inheritable sets (emptied), then effective and permitted. Returns what
/// is left in the permitted set.
pub fn keep_only(keep: &CapsHashSet) -> Result<CapsHashSet, Error> {
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    // Effective first: it must stay within permitted.
    let effective = &caps::read(None, CapSet::Effective)? & keep;
    caps::set(None, CapSet::Effective, &effective)?;
    let permitted = &caps::read(None, CapSet::Permitted)? & keep;
    caps::set(None, CapSet::Permitted, &permitted)?;
    Ok(permitted)
}

/// Empties the calling thread's bounding set (when we may), for a daemon
/// that is about to become an unprivileged user (`--user`): nothing it or
/// its threads run can ever regain a capability.
pub fn clear_bounding_set() -> Result<(), Error> {
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        caps::clear(None, CapSet::Bounding)?;
    }
    Ok(())
}

/// Sets `no_new_privs` on the calling thread (and so on the threads it
/// creates): no execve can grant privileges (setuid binaries, file
/// capabilities). The seccomp filters need it too.
pub fn no_new_privs() -> Result<(), Error> {
    nix::sys::prctl::set_no_new_privs()?;
    Ok(())
}

/// Names of `set`, sorted (for the log).
pub fn names(set: &CapsHashSet) -> String {
    let mut v: Vec<String> = set.iter().map(ToString::to_string).collect();
    v.sort();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_also_keeps_dac_override_to_reach_the_frontend_socket() {
        assert_eq!(
            needed(false),
            CapsHashSet::from([Capability::CAP_NET_ADMIN])
        );
        assert!(needed(true).contains(&Capability::CAP_DAC_OVERRIDE));
        assert_eq!(names(&needed(false)), "CAP_NET_ADMIN");
    }

    #[test]
    fn a_thread_keeps_only_what_it_is_told_and_cannot_regain_the_rest() {
        let outside = nix::sys::prctl::get_no_new_privs().unwrap();
        std::thread::spawn(|| {
            let before = caps::read(None, CapSet::Permitted).unwrap();
            let keep = needed(false);
            let left = keep_only(&keep).unwrap();
            assert_eq!(left, &before & &keep);
            assert!(caps::read(None, CapSet::Inheritable).unwrap().is_empty());
            assert!(caps::read(None, CapSet::Ambient).unwrap().is_empty());
            if before.contains(&Capability::CAP_SETPCAP) {
                // Run as root: the bounding set went too.
                assert_eq!(caps::read(None, CapSet::Bounding).unwrap(), keep);
            }
            assert!(caps::raise(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).is_err());
            no_new_privs().unwrap();
            assert!(nix::sys::prctl::get_no_new_privs().unwrap());
        })
        .join()
        .unwrap();
        // Per thread: the spawning thread keeps its own.
        assert_eq!(nix::sys::prctl::get_no_new_privs().unwrap(), outside);
    }
}
