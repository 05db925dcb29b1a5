#![allow(dead_code)]
//! Helpers shared by the simulation tests.

use std::collections::{BTreeMap, HashMap};

use vp_alm::sim::{Sim, SimOptions};
use vp_alm::{Bytes, Event, Key, KeyRange, OpId};

/// Run `f` for every seed; a failure (panic) is reported with the seed that reproduces it.
pub fn for_seeds(seeds: impl IntoIterator<Item = u64>, f: impl Fn(u64)) {
    for seed in seeds {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(seed))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            panic!("failed with seed {seed} (rerun with this seed to reproduce): {msg}");
        }
    }
}

/// A host key: `h/` and 8 random bytes.
pub fn host_key(sim: &mut Sim) -> Key {
    let r = sim.rng().next_u64();
    let mut k = b"h/".to_vec();
    k.extend_from_slice(&r.to_be_bytes());
    Key::new(k)
}

/// Build `n` hosts by protocol joins. `concurrent` joins are started at once, each through
/// a random already-joined host.
pub fn build(seed: u64, n: usize, concurrent: usize, opts: Option<SimOptions>) -> Sim {
    let mut sim = Sim::new(opts.unwrap_or_else(|| SimOptions::new(seed)));
    let first = sim.add_host();
    let k = host_key(&mut sim);
    sim.insert_key(first, k, None).expect("first key");
    let mut joined = vec![first];
    while sim.host_count() < n {
        let batch = concurrent.min(n - sim.host_count());
        let mut new = Vec::new();
        for _ in 0..batch {
            let h = sim.add_host();
            let intro = joined[sim.rng().below(joined.len() as u64) as usize];
            let k = host_key(&mut sim);
            sim.insert_key(h, k, Some(intro)).expect("insert");
            new.push(h);
        }
        assert!(
            sim.run_until_joined(120_000_000),
            "seed {seed}: joins did not finish ({} pending)",
            sim.joins_pending()
        );
        joined.extend(new);
    }
    sim
}

/// Searches done (op -> (found key, found host, exact, hops)).
pub fn search_results(sim: &Sim) -> std::collections::HashMap<OpId, (Key, u64, bool, u32)> {
    sim.events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::SearchDone {
                op,
                found,
                exact,
                hops,
                ..
            } => Some((*op, (found.key.clone(), found.host.0, *exact, *hops))),
            _ => None,
        })
        .collect()
}

pub fn group_key(group: u32, host: u32) -> Key {
    Key::new(format!("v/{group:04}/{host:06}").into_bytes())
}

/// Give `groups` groups of `size` random hosts one key each under `v/<group>/`.
pub fn add_groups(sim: &mut Sim, groups: u32, size: usize) {
    let hosts = sim.live_hosts();
    for g in 0..groups {
        let mut members: Vec<u32> = Vec::new();
        while members.len() < size {
            let h = hosts[sim.rng().below(hosts.len() as u64) as usize];
            if !members.contains(&h) {
                members.push(h);
            }
        }
        for h in members {
            sim.insert_key(h, group_key(g, h), None).expect("group key");
        }
    }
}

/// Deliveries per (multicast, key).
pub fn deliveries(sim: &Sim) -> HashMap<OpId, BTreeMap<Key, u32>> {
    let mut d: HashMap<OpId, BTreeMap<Key, u32>> = HashMap::new();
    for (_, e) in &sim.events {
        if let Event::Delivered { op, key, .. } = e {
            *d.entry(*op).or_default().entry(key.clone()).or_insert(0) += 1;
        }
    }
    d
}

/// Live hosts that hold at least one key (others cannot route).
pub fn hosts_with_keys(sim: &Sim) -> Vec<u32> {
    let mut hosts: Vec<u32> = sim.live_keys().into_iter().map(|(_, h)| h).collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts
}

/// Run `count` searches for existing keys from random hosts; all must find the owner.
pub fn check_searches(sim: &mut Sim, count: usize, seed: u64) {
    let keys = sim.live_keys();
    let hosts = hosts_with_keys(sim);
    let mut want = HashMap::new();
    for _ in 0..count {
        let from = hosts[sim.rng().below(hosts.len() as u64) as usize];
        let (k, owner) = keys[sim.rng().below(keys.len() as u64) as usize].clone();
        let op = sim.search(from, k.clone()).expect("search");
        want.insert(op, (k, owner));
    }
    sim.run_for(10_000_000);
    let got = search_results(sim);
    for (op, (k, owner)) in &want {
        let Some((fk, fh, exact, _)) = got.get(op) else {
            panic!("seed {seed}: search {op} for {k} got no answer");
        };
        assert!(
            *exact && fk == k && *fh == u64::from(*owner),
            "seed {seed}: search {op} for {k} (host {owner}) found {fk} on host {fh}"
        );
    }
}

/// Multicast over random prefixes and ranges; each must reach exactly its keys, once.
pub fn check_multicasts(sim: &mut Sim, groups: u32, random_ranges: usize, seed: u64) {
    let keys = sim.live_keys();
    let hosts = hosts_with_keys(sim);
    let mut ranges = Vec::new();
    for g in 0..groups {
        ranges.push(KeyRange::prefix(format!("v/{g:04}/").as_bytes()));
    }
    for _ in 0..random_ranges {
        let a = keys[sim.rng().below(keys.len() as u64) as usize].0.clone();
        let b = keys[sim.rng().below(keys.len() as u64) as usize].0.clone();
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        ranges.push(KeyRange::inclusive(lo, hi));
    }
    // A range with no key at all.
    ranges.push(KeyRange::prefix(b"zzz-nobody/"));
    let mut sent = Vec::new();
    for r in ranges {
        let from = hosts[sim.rng().below(hosts.len() as u64) as usize];
        let op = sim
            .multicast(from, r.clone(), Bytes::from(&b"payload"[..]))
            .expect("multicast");
        sent.push((op, r));
    }
    sim.run_for(10_000_000);
    let d = deliveries(sim);
    let empty = BTreeMap::new();
    for (op, r) in &sent {
        let want: Vec<&Key> = keys
            .iter()
            .map(|(k, _)| k)
            .filter(|k| r.contains(k))
            .collect();
        let got = d.get(op).unwrap_or(&empty);
        for (k, n) in got {
            assert!(
                r.contains(k),
                "seed {seed}: multicast {op} delivered outside {r:?} to {k}"
            );
            assert_eq!(
                *n, 1,
                "seed {seed}: multicast {op} delivered {n} times to {k}"
            );
        }
        assert_eq!(
            got.len(),
            want.len(),
            "seed {seed}: multicast {op} over {r:?} reached {} of {} keys",
            got.len(),
            want.len()
        );
    }
}
