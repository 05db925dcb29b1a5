//! Many seeds of heavy churn: 25% of the hosts crash while as many join, 2% message loss
//! meanwhile; afterwards the graph must be the ideal one, and searches and multicasts must
//! all succeed. A failure names its seed.

mod common;

use common::{build, check_multicasts, check_searches, host_key};
use vp_alm::sim::SimOptions;

fn run(seed: u64) -> Result<(), String> {
    let n = 200;
    let churn_pct = 25;
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
    ok.map_err(|e| format!("before churn: {e}"))?;
    for i in 0..n * churn_pct / 100 {
        let hosts = sim.live_hosts();
        let h = hosts[sim.rng().below(hosts.len() as u64) as usize];
        sim.crash(h);
        let hosts = sim.live_hosts();
        let intro = hosts[sim.rng().below(hosts.len() as u64) as usize];
        let new = sim.add_host();
        let k = host_key(&mut sim);
        sim.insert_key(new, k, Some(intro))
            .map_err(|e| e.to_string())?;
        if i % 3 == 0 {
            sim.run_for(500_000);
        }
    }
    sim.set_loss(0.02);
    sim.run_for(5_000_000);
    sim.set_loss(0.0);
    let mut ok = Err(String::new());
    for _ in 0..12 {
        sim.run_for(5_000_000);
        ok = sim.check_consistency();
        if ok.is_ok() {
            break;
        }
    }
    ok.map_err(|e| format!("after churn: {e}"))?;
    check_searches(&mut sim, 100, seed);
    check_multicasts(&mut sim, 0, 20, seed);
    Ok(())
}

#[test]
fn heavy_churn_many_seeds() {
    let mut failures = Vec::new();
    for seed in 100..130u64 {
        match std::panic::catch_unwind(|| run(seed)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("seed {seed}: {e}")),
            Err(_) => failures.push(format!("seed {seed}: panicked (see above)")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
