//! Searches find their owner; multicasts reach exactly the keys in their range, once each;
//! graceful leaves and several keys per host keep the lists consistent.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::{build, host_key, search_results};
use vp_alm::sim::{Sim, SimOptions};
use vp_alm::{Bytes, Event, Key, KeyRange, OpId};

fn group_key(group: u32, host: u32) -> Key {
    Key::new(format!("v/{group:04}/{host:06}").into_bytes())
}

/// Give `groups` groups of `size` random hosts one key each under `v/<group>/`.
fn add_groups(sim: &mut Sim, groups: u32, size: usize) {
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
fn deliveries(sim: &Sim) -> HashMap<OpId, BTreeMap<Key, u32>> {
    let mut d: HashMap<OpId, BTreeMap<Key, u32>> = HashMap::new();
    for (_, e) in &sim.events {
        if let Event::Delivered { op, key, .. } = e {
            *d.entry(*op).or_default().entry(key.clone()).or_insert(0) += 1;
        }
    }
    d
}

/// Live hosts that hold at least one key (others cannot route).
fn hosts_with_keys(sim: &Sim) -> Vec<u32> {
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
        let want: Vec<&Key> = keys.iter().map(|(k, _)| k).filter(|k| r.contains(k)).collect();
        let got = d.get(op).unwrap_or(&empty);
        for (k, n) in got {
            assert!(r.contains(k), "seed {seed}: multicast {op} delivered outside {r:?} to {k}");
            assert_eq!(*n, 1, "seed {seed}: multicast {op} delivered {n} times to {k}");
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

#[test]
fn searches_find_their_owner() {
    for seed in [21, 22] {
        let mut sim = build(seed, 300, 10, None);
        check_searches(&mut sim, 300, seed);
    }
}

#[test]
fn multicasts_reach_exactly_their_range_once() {
    for seed in [31, 32] {
        let mut opts = SimOptions::new(seed);
        opts.config.stabilize_interval_us = 5_000_000;
        let mut sim = build(seed, 250, 10, Some(opts));
        add_groups(&mut sim, 30, 5);
        assert!(sim.run_until_joined(60_000_000), "seed {seed}: group keys did not join");
        sim.run_for(30_000_000);
        if let Err(e) = sim.check_consistency() {
            panic!("seed {seed}: {e}");
        }
        check_multicasts(&mut sim, 30, 20, seed);
        check_searches(&mut sim, 100, seed);
    }
}

#[test]
fn graceful_leaves_keep_lists_consistent() {
    for seed in [41, 42, 43] {
        let mut opts = SimOptions::new(seed);
        opts.config.stabilize_interval_us = 5_000_000;
        let mut sim = build(seed, 200, 10, Some(opts));
        add_groups(&mut sim, 10, 5);
        assert!(sim.run_until_joined(60_000_000));
        // Remove a quarter of the keys, several at a time, some of them adjacent.
        let keys = sim.live_keys();
        for (i, (k, h)) in keys.iter().enumerate() {
            if i % 4 == 1 || i % 9 == 2 {
                sim.remove_key(*h, k).expect("remove");
                if i % 3 == 0 {
                    sim.run_for(100_000);
                }
            }
        }
        sim.run_for(1_000_000);
        let mut ok = sim.check_consistency();
        for _ in 0..10 {
            if ok.is_ok() {
                break;
            }
            sim.run_for(5_000_000);
            ok = sim.check_consistency();
        }
        if let Err(e) = ok {
            panic!("seed {seed}: {e}");
        }
        check_searches(&mut sim, 100, seed);
        check_multicasts(&mut sim, 10, 10, seed);
    }
}

#[test]
fn host_keys_and_member_keys_on_one_host() {
    let seed = 51;
    let mut opts = SimOptions::new(seed);
    opts.config.stabilize_interval_us = 5_000_000;
    let mut sim = build(seed, 60, 5, Some(opts));
    // One host holds many keys at once, inserted and removed independently.
    let busy = sim.live_hosts()[3];
    for g in 0..40 {
        sim.insert_key(busy, group_key(g, busy), None).expect("insert");
    }
    assert!(sim.run_until_joined(60_000_000));
    sim.run_for(5_000_000);
    if let Err(e) = sim.check_consistency() {
        panic!("seed {seed}: {e}");
    }
    for g in (0..40).step_by(3) {
        sim.remove_key(busy, &group_key(g, busy)).expect("remove");
    }
    let k = host_key(&mut sim);
    sim.insert_key(busy, k, None).expect("second host key");
    assert!(sim.run_until_joined(60_000_000));
    sim.run_for(35_000_000);
    if let Err(e) = sim.check_consistency() {
        panic!("seed {seed}: {e}");
    }
    check_searches(&mut sim, 100, seed);
    check_multicasts(&mut sim, 40, 5, seed);
}
