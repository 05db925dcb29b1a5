mod common;
use common::{build, host_key};
use vp_alm::sim::SimOptions;
#[test]
fn dbg() {
    let seed = 105u64; let n = 200; let churn_pct = 25;
    let mut opts = SimOptions::new(seed);
    opts.config.stabilize_interval_us = 5_000_000;
    opts.config.ping_interval_us = 1_000_000;
    let mut sim = build(seed, n, 10, Some(opts));
    let mut ok = sim.check_consistency();
    for _ in 0..12 { if ok.is_ok() { break; } sim.run_for(5_000_000); ok = sim.check_consistency(); }
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
    for _ in 0..12 { sim.run_for(5_000_000); }
    println!("{:?}", sim.check_consistency());
    let keys = sim.live_keys();
    let err = sim.check_consistency().unwrap_err();
    let hh: u32 = err.split("(host ").nth(1).unwrap().split(')').next().unwrap().parse().unwrap();
    let i = keys.iter().position(|(_, h)| *h == hh).unwrap();
    for (k, h) in &keys[i.saturating_sub(1)..(i + 4).min(keys.len())] {
        let v = sim.host(*h).unwrap().node(k).unwrap();
        println!("{h} {k:?} joined={} L0 {:?} | {:?} len {} fills {:?} dead {:?}", v.joined, v.levels.first().and_then(|p| p[0].as_ref()).map(|r| r.host.0), v.levels.first().and_then(|p| p[1].as_ref()).map(|r| r.host.0), v.levels.len(), sim.host(*h).unwrap().debug_fills(k), sim.host(*h).unwrap().debug_recent());
    }
    let evs: Vec<_> = sim.events.iter().filter(|(h, _)| *h == hh).map(|(_, e)| format!("{e:?}").chars().take(150).collect::<String>()).collect();
    println!("{evs:#?}");
}
