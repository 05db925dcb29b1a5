//! Crashes, joins and message loss: after repair the graph is consistent again and every
//! search and multicast succeeds.

mod common;

use common::{build, check_multicasts, check_searches, for_seeds, host_key};
use vp_alm::sim::SimOptions;

fn churn(seed: u64, n: usize, churn_pct: usize, loss: f64) {
    let mut opts = SimOptions::new(seed);
    opts.config.stabilize_interval_us = 5_000_000;
    opts.config.ping_interval_us = 1_000_000;
    let mut sim = build(seed, n, 10, Some(opts));
    let mut ok = sim.check_consistency();
    for _ in 0..12 {
        if ok.is_ok() {
            break;
        }
        sim.run_for(5_000_000);
        ok = sim.check_consistency();
    }
    if let Err(e) = ok {
        panic!("seed {seed}: before churn: {e}");
    }
    // Crash churn_pct% of the hosts and join as many new ones, spread over 5 s, on a lossy
    // network.
    let victims = n * churn_pct / 100;
    for i in 0..victims {
        let hosts = sim.live_hosts();
        let h = hosts[sim.rng().below(hosts.len() as u64) as usize];
        sim.crash(h);
        let intro = {
            let hosts = sim.live_hosts();
            hosts[sim.rng().below(hosts.len() as u64) as usize]
        };
        let new = sim.add_host();
        let k = host_key(&mut sim);
        sim.insert_key(new, k, Some(intro)).expect("insert");
        if i % 3 == 0 {
            sim.run_for(500_000);
        }
    }
    set_loss(&mut sim, loss);
    sim.run_for(5_000_000);
    set_loss(&mut sim, 0.0);
    // Repair.
    let mut ok = Err(String::new());
    for _ in 0..12 {
        sim.run_for(5_000_000);
        ok = sim.check_consistency();
        if ok.is_ok() {
            break;
        }
    }
    if let Err(e) = ok {
        panic!("seed {seed}: after churn and repair: {e}");
    }
    check_searches(&mut sim, 200, seed);
    check_multicasts(&mut sim, 0, 30, seed);
}

fn set_loss(sim: &mut vp_alm::sim::Sim, loss: f64) {
    sim.set_loss(loss);
}

#[test]
fn crashes_and_joins_are_repaired() {
    for_seeds([61, 62, 63], |seed| {
        churn(seed, 200, 10, 0.0);
    });
}

#[test]
fn heavy_churn_with_message_loss_is_repaired() {
    for_seeds([71, 72], |seed| {
        churn(seed, 200, 25, 0.02);
    });
}
