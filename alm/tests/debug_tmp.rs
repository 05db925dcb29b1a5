mod common;
use vp_alm::sim::SimOptions;
use vp_alm::Key;
#[test]
fn dbg() {
    let seed = 31;
    let mut opts = SimOptions::new(seed);
    opts.config.stabilize_interval_us = 5_000_000;
    let mut sim = common::build(seed, 250, 10, Some(opts));
    let hosts = sim.live_hosts();
    for g in 0..30u32 {
        let mut members: Vec<u32> = Vec::new();
        while members.len() < 5 {
            let h = hosts[sim.rng().below(hosts.len() as u64) as usize];
            if !members.contains(&h) { members.push(h); }
        }
        for h in members { sim.insert_key(h, Key::new(format!("v/{g:04}/{h:06}").into_bytes()), None).unwrap(); }
    }
    let t0 = sim.now();
    let ok = sim.run_until_joined(60_000_000);
    println!("joined {ok} after {}us pending {}", sim.now().micros_since(t0), sim.joins_pending());
    for _ in 0..8 {
        println!("{:?}", sim.check_consistency().err().map(|e| e.chars().take(200).collect::<String>()));
        sim.run_for(5_000_000);
    }
    println!("{:?}", sim.counters.by_kind);
}
#[test]
fn dbg2() {
    let seed = 31;
    let mut opts = SimOptions::new(seed);
    opts.config.stabilize_interval_us = 5_000_000;
    let mut sim = common::build(seed, 250, 10, Some(opts));
    let hosts = sim.live_hosts();
    for g in 0..30u32 {
        let mut members: Vec<u32> = Vec::new();
        while members.len() < 5 {
            let h = hosts[sim.rng().below(hosts.len() as u64) as usize];
            if !members.contains(&h) { members.push(h); }
        }
        for h in members { sim.insert_key(h, Key::new(format!("v/{g:04}/{h:06}").into_bytes()), None).unwrap(); }
    }
    sim.trace = vec![18];
    sim.run_until_joined(60_000_000);
    sim.trace = vec![];
    sim.run_for(10_000_000);
    let keys = sim.live_keys();
    let n = |r: Option<&vp_alm::NodeRef<u32>>| r.map(|r| String::from_utf8_lossy(r.key.as_slice()).chars().take(13).collect::<String>());
    for (k, h) in keys.iter().filter(|(k, _)| k.as_slice().starts_with(b"v/001")) {
        let v = sim.host(*h).unwrap().node(k).unwrap();
        if let Some(l0) = v.levels.first() { println!("K {} L0 {:?} | {:?}", String::from_utf8_lossy(k.as_slice()), n(l0[0].as_ref()), n(l0[1].as_ref())); } else { println!("K {} EMPTY", String::from_utf8_lossy(k.as_slice())); }
    }
}
