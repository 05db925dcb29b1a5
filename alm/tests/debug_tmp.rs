mod common;
use vp_alm::sim::SimOptions;
use vp_alm::Key;
#[test]
fn dbg() {
    let seed = 41;
    let mut opts = SimOptions::new(seed);
    opts.config.stabilize_interval_us = 5_000_000;
    let mut sim = common::build(seed, 200, 10, Some(opts));
    let hosts = sim.live_hosts();
    for g in 0..10u32 {
        let mut members: Vec<u32> = Vec::new();
        while members.len() < 5 {
            let h = hosts[sim.rng().below(hosts.len() as u64) as usize];
            if !members.contains(&h) { members.push(h); }
        }
        for h in members { sim.insert_key(h, Key::new(format!("v/{g:04}/{h:06}").into_bytes()), None).unwrap(); }
    }
    sim.run_until_joined(60_000_000);
    let keys = sim.live_keys();
    for (i, (k, h)) in keys.iter().enumerate() {
        if i % 4 == 1 || i % 9 == 2 {
            sim.remove_key(*h, k).expect("remove");
            if i % 3 == 0 { sim.run_for(100_000); }
        }
    }
    sim.run_for(40_000_000);
    println!("{:?}", sim.check_consistency());
    let keys = sim.live_keys();
    let (k, _) = keys.iter().find(|(_, h)| *h == 119).unwrap().clone();
    let v = sim.host(119).unwrap().node(&k).unwrap();
    for (l, p) in v.levels.iter().enumerate().take(4) {
        println!("  L{l}: {:?} | {:?}", p[0].as_ref().map(|r| r.host.0), p[1].as_ref().map(|r| r.host.0));
    }
    println!("fills {:?}", sim.host(119).unwrap().debug_fills(&k));
    sim.trace = vec![119];
    sim.run_for(6_000_000);
}
