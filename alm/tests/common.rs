#![allow(dead_code)]
//! Helpers shared by the simulation tests.

use vp_alm::sim::{Sim, SimOptions};
use vp_alm::{Event, Key, OpId};

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
