//! How the daemon names things in the skip graph, and how overlay references
//! map to libp2p peers.

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vp_alm::{Contact, HostId, HostRef, Key};
use vp_guest_sdk::VpId;

/// Addresses carried in one contact.
pub const CONTACT_ADDRS_MAX: usize = 8;

/// How to reach a host: its peer id and the addresses it listens on. Carried
/// in every overlay reference, so a host learned second-hand can be dialed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerContact {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
}

impl Contact for PeerContact {
    fn size_bytes(&self) -> usize {
        self.peer.to_bytes().len() + self.addrs.iter().map(|a| a.len() + 2).sum::<usize>()
    }
}

/// The overlay and consensus id of a host: the first 8 bytes of SHA-256 of its
/// peer id. Messages claiming another host's id are refused, because the id is
/// derived from the authenticated peer id.
pub fn host_id_of(peer: &PeerId) -> HostId {
    let digest = Sha256::digest(peer.to_bytes());
    HostId(u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")))
}

/// This host's reference for the overlay.
pub fn host_ref(peer: PeerId, addrs: &[Multiaddr]) -> HostRef<PeerContact> {
    HostRef {
        host: host_id_of(&peer),
        contact: PeerContact {
            peer,
            addrs: addrs.iter().take(CONTACT_ADDRS_MAX).cloned().collect(),
        },
    }
}

/// Prefix of the keys hosts insert for themselves.
pub const HOST_KEY_PREFIX: &str = "h/";
/// Prefix of the keys virtual-peer members insert.
pub const VP_KEY_PREFIX: &str = "v/";

/// A host's own key: `h/<host id, 16 hex digits>`.
pub fn host_key(host: HostId) -> Key {
    Key::new(format!("{HOST_KEY_PREFIX}{:016x}", host.0).into_bytes())
}

/// The key a member of `vp` inserts: `v/<vp id>/<host id>`.
pub fn member_key(vp: VpId, host: HostId) -> Key {
    Key::new(format!("{VP_KEY_PREFIX}{vp}/{:016x}", host.0).into_bytes())
}

/// The prefix every member key of `vp` starts with; a message to `vp` is a
/// multicast over it.
pub fn vp_prefix(vp: VpId) -> Vec<u8> {
    format!("{VP_KEY_PREFIX}{vp}/").into_bytes()
}

/// A key as text (keys the daemon makes are ASCII; others are shown escaped).
pub fn key_text(key: &Key) -> String {
    String::from_utf8(key.as_slice().to_vec())
        .unwrap_or_else(|_| format!("0x{}", hex::encode(key.as_slice())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_vp_then_host() {
        let (a, b) = (
            member_key(VpId(1), HostId(9)),
            member_key(VpId(1), HostId(10)),
        );
        let other = member_key(VpId(2), HostId(0));
        assert!(a < b && b < other);
        let prefix = vp_prefix(VpId(1));
        assert!(a.as_slice().starts_with(&prefix) && !other.as_slice().starts_with(&prefix));
        assert!(key_text(&host_key(HostId(255))).ends_with("00000000000000ff"));
    }

    #[test]
    fn host_ids_are_stable_per_peer() {
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        assert_eq!(host_id_of(&peer), host_id_of(&peer));
        let other = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        assert_ne!(host_id_of(&peer), host_id_of(&other));
    }
}
