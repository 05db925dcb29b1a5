//! How to reach a host by its id: filled by the node from every message and
//! overlay reference, read by member threads when they send.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use vp_consensus::HostId;

use crate::node::overlay::PeerContact;

/// Hosts remembered.
pub const DIRECTORY_HOSTS_MAX: usize = 100_000;

/// Host id to contact. Cheap to clone; shared between threads.
#[derive(Clone, Debug, Default)]
pub struct Directory(Arc<RwLock<HashMap<HostId, PeerContact>>>);

impl Directory {
    /// The contact of `host`, if known.
    pub fn get(&self, host: HostId) -> Option<PeerContact> {
        self.0.read().expect("directory lock").get(&host).cloned()
    }

    /// Up to `n` hosts drawn at random, none of them refused by `skip`.
    pub fn sample(
        &self,
        n: usize,
        skip: impl Fn(HostId, &PeerContact) -> bool,
    ) -> Vec<(HostId, PeerContact)> {
        use rand::seq::IteratorRandom;
        let map = self.0.read().expect("directory lock");
        map.iter()
            .filter(|(h, c)| !skip(**h, c))
            .map(|(h, c)| (*h, c.clone()))
            .choose_multiple(&mut rand::thread_rng(), n)
    }

    /// Remember (or refresh) how to reach `host`.
    pub fn learn(&self, host: HostId, contact: &PeerContact) {
        let mut map = self.0.write().expect("directory lock");
        if map.get(&host) == Some(contact) {
            return;
        }
        if map.len() >= DIRECTORY_HOSTS_MAX
            && !map.contains_key(&host)
            && let Some(victim) = map.keys().next().copied()
        {
            map.remove(&victim);
        }
        // Keep addresses we knew if the new contact carries none.
        let mut contact = contact.clone();
        if contact.addrs.is_empty()
            && let Some(old) = map.get(&host)
        {
            contact.addrs = old.addrs.clone();
        }
        map.insert(host, contact);
    }
}
