mod common;
use common::{build, host_key, check_searches, check_multicasts};
use vp_alm::sim::SimOptions;
#[test]
fn soak() {
    let mut fails = 0;
    for seed in 100..140u64 {
        let r = std::panic::catch_unwind(|| {
            let n = 200; let churn_pct = 25;
            let mut opts = SimOptions::new(seed);
            opts.config.stabilize_interval_us = 5_000_000;
            opts.config.ping_interval_us = 1_000_000;
            let mut sim = build(seed, n, 10, Some(opts));
            let mut ok = sim.check_consistency();
            for _ in 0..12 { if ok.is_ok() { break; } sim.run_for(5_000_000); ok = sim.check_consistency(); }
            if let Err(e) = ok { panic!("before: {e}"); }
            for i in 0..n * churn_pct / 100 {
                let hosts = sim.live_hosts();
                let h = hosts[sim.rng().below(hosts.len() as u64) as usize];
                sim.crash(h);
                let intro = { let hosts = sim.live_hosts(); hosts[sim.rng().below(hosts.len() as u64) as usize] };
                let new = sim.add_host();
                let k = host_key(&mut sim);
                sim.insert_key(new, k, Some(intro)).expect("insert");
                if i % 3 == 0 { sim.run_for(500_000); }
            }
            sim.set_loss(0.02);
            sim.run_for(5_000_000);
            sim.set_loss(0.0);
            let mut ok = Err(String::new());
            for _ in 0..12 { sim.run_for(5_000_000); ok = sim.check_consistency(); if ok.is_ok() { break; } }
            if let Err(e) = ok { panic!("after: {e}"); }
            check_searches(&mut sim, 100, seed);
            check_multicasts(&mut sim, 0, 20, seed);
        });
        if r.is_err() { fails += 1; println!("seed {seed} FAILED"); }
    }
    println!("fails {fails}");
}
