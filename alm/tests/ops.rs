//! Searches find their owner; multicasts reach exactly the keys in their range, once each;
//! graceful leaves and several keys per host keep the lists consistent.

mod common;

use common::{add_groups, build, check_multicasts, check_searches, for_seeds, group_key, host_key};
use vp_alm::sim::SimOptions;

#[test]
fn searches_find_their_owner() {
    for_seeds([21, 22], |seed| {
        let mut sim = build(seed, 300, 10, None);
        check_searches(&mut sim, 300, seed);
    });
}

/// A search for a key nobody holds ends at one of the two keys around it and
/// names the other (`next`): placement counts both as drawn, so a host is
/// not missed because every search arrives from its other side.
#[test]
fn searches_for_absent_keys_name_both_keys_around_them() {
    for_seeds([23, 24], |seed| {
        let mut sim = build(seed, 120, 10, None);
        let keys: Vec<vp_alm::Key> = sim.live_keys().into_iter().map(|(k, _)| k).collect();
        let hosts = common::hosts_with_keys(&sim);
        let mut sent = Vec::new();
        for _ in 0..300 {
            let from = hosts[sim.rng().below(hosts.len() as u64) as usize];
            let target = host_key(&mut sim);
            let op = sim.search(from, target.clone()).expect("search");
            sent.push((op, target));
        }
        sim.run_for(10_000_000);
        let mut ends = 0;
        for (op, target) in sent {
            let (found, next) = sim
                .events
                .iter()
                .find_map(|(_, e)| match e {
                    vp_alm::Event::SearchDone {
                        op: o, found, next, ..
                    } if *o == op => {
                        Some((found.key.clone(), next.as_ref().map(|n| n.key.clone())))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("seed {seed}: search {op} got no answer"));
            let below = keys.iter().rev().find(|k| **k < target).cloned();
            let above = keys.iter().find(|k| **k > target).cloned();
            let mut got = vec![Some(found.clone()), next];
            let mut want = vec![below, above];
            got.sort();
            want.sort();
            assert_eq!(got, want, "seed {seed}: search for {target} found {found}");
            ends += usize::from(want[0].is_none());
        }
        // Most targets lie between two keys; the check covers that case.
        assert!(
            ends < 30,
            "seed {seed}: {ends} of 300 targets beyond the ends"
        );
    });
}

#[test]
fn multicasts_reach_exactly_their_range_once() {
    for_seeds([31, 32], |seed| {
        let mut opts = SimOptions::new(seed);
        opts.config.stabilize_interval_us = 5_000_000;
        let mut sim = build(seed, 250, 10, Some(opts));
        add_groups(&mut sim, 30, 5);
        assert!(
            sim.run_until_joined(60_000_000),
            "seed {seed}: group keys did not join"
        );
        sim.run_for(30_000_000);
        if let Err(e) = sim.check_consistency() {
            panic!("seed {seed}: {e}");
        }
        check_multicasts(&mut sim, 30, 20, seed);
        check_searches(&mut sim, 100, seed);
    });
}

#[test]
fn graceful_leaves_keep_lists_consistent() {
    for_seeds([41, 42, 43], |seed| {
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
    });
}

#[test]
fn host_keys_and_member_keys_on_one_host() {
    for_seeds([51], one_host_many_keys);
}

fn one_host_many_keys(seed: u64) {
    let mut opts = SimOptions::new(seed);
    opts.config.stabilize_interval_us = 5_000_000;
    let mut sim = build(seed, 60, 5, Some(opts));
    // One host holds many keys at once, inserted and removed independently.
    let busy = sim.live_hosts()[3];
    for g in 0..40 {
        sim.insert_key(busy, group_key(g, busy), None)
            .expect("insert");
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
