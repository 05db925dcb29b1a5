mod common;
use vp_alm::sim::{Sim, SimOptions};
use vp_alm::{Event};
fn l0(sim: &Sim) -> Option<String> {
    let keys = sim.live_keys();
    let mut out = None;
    for (i, (k, h)) in keys.iter().enumerate() {
        let v = sim.host(*h).unwrap().node(k).unwrap();
        let r = v.levels.first().and_then(|p| p[1].as_ref()).map(|r| r.host.0 as u32);
        let want = keys.get(i + 1).map(|x| x.1);
        if r != want && out.is_none() {
            out = Some(format!("host {h}: right {r:?} want {want:?}"));
        }
    }
    out
}
#[test]
fn dbg() {
    let mut opts = SimOptions::new(13);
    opts.config.stabilize_interval_us = 5_000_000;
    opts.config.neighbour_events = true;
    let mut sim = Sim::new(opts);
    let first = sim.add_host();
    let k = common::host_key(&mut sim);
    sim.insert_key(first, k, None).unwrap();
    let mut joined = vec![first];
    while sim.host_count() < 300 {
        let mut new = vec![];
        for _ in 0..20 {
            let h = sim.add_host();
            let intro = joined[sim.rng().below(joined.len() as u64) as usize];
            let k = common::host_key(&mut sim);
            sim.insert_key(h, k, Some(intro)).unwrap();
            new.push(h);
        }
        sim.run_until_joined(100_000_000);
        joined.extend(new.clone());
        if let Some(e) = l0(&sim) {
            println!("after batch ending {}: {e}", sim.host_count());
            let keys = sim.live_keys();
            for (k, h) in &keys {
                let v = sim.host(*h).unwrap().node(k).unwrap();
                println!("  {h} {:?} new={} L0 {:?} | {:?}", k, new.contains(h), v.levels.first().and_then(|p| p[0].as_ref()).map(|r| r.host.0), v.levels.first().and_then(|p| p[1].as_ref()).map(|r| r.host.0));
            }
            for (h, e) in &sim.events {
                if let Event::NeighbourChanged { level: 0, side, neighbour, .. } = e {
                    if new.contains(h) { println!("host {h} {side:?} -> {:?}", neighbour.as_ref().map(|n| n.host.0)); }
                }
            }
            break;
        }
    }
}
