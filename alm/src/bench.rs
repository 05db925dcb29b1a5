//! `vp-host bench alm`: the skip graph in simulation, n hosts, with and without churn.
//!
//! The network of `hosts` hosts (each with its host key) plus `groups` five-member groups
//! (one key per member under `v/<group>/`) is bulk-loaded as a consistent skip graph (the
//! state sequential joins produce; the tests check protocol-built graphs against the same
//! ideal). Then, by the protocol: `joins` new hosts join (messages per join), `searches`
//! searches run (hops), one multicast per group runs (hand-offs and hops per multicast,
//! delivery). With `churn_pct`, that share of the hosts crashes while as many join, repair
//! runs until the graph is the ideal one again, and searches and multicasts are measured
//! once more.

use std::collections::BTreeMap;
use std::time::Instant;

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::config::Config;
use crate::host::Event;
use crate::sim::{LINK_KINDS, Sim, SimOptions};
use crate::types::{Bytes, Key, KeyRange, OpId};

/// What to run.
#[derive(Clone, Debug)]
pub struct AlmBenchOptions {
    /// Hosts in the network.
    pub hosts: usize,
    /// Percentage of hosts that crash (and as many that join) in the churn phase; 0: none.
    pub churn_pct: f64,
    /// Seed of everything random.
    pub seed: u64,
    /// Searches per measurement.
    pub searches: usize,
    /// Five-member groups (one multicast each per measurement).
    pub groups: usize,
    /// Hosts that join by the protocol to measure the join cost.
    pub joins: usize,
    /// Message loss during the churn phase.
    pub loss: f64,
    /// Longest simulated time to wait for repair after the churn before measuring again.
    pub repair_secs_max: u64,
}

impl Default for AlmBenchOptions {
    fn default() -> AlmBenchOptions {
        AlmBenchOptions {
            hosts: 10_000,
            churn_pct: 0.0,
            seed: 1,
            searches: 2_000,
            groups: 200,
            joins: 100,
            loss: 0.0,
            repair_secs_max: 120,
        }
    }
}

/// Search and multicast figures of one measurement.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OpFigures {
    /// Searches issued.
    pub searches: usize,
    /// Searches that found exactly the owner of the key.
    pub searches_ok: usize,
    /// Mean forwards per successful search.
    pub search_hops_mean: f64,
    /// 99th percentile of forwards per search.
    pub search_hops_p99: u32,
    /// Multicasts issued (one per group).
    pub multicasts: usize,
    /// Mean multicast hand-offs (messages carrying the payload, routing included) per
    /// multicast.
    pub multicast_messages_mean: f64,
    /// Mean forwards from the sender to a member (over all deliveries).
    pub multicast_hops_mean: f64,
    /// Mean over multicasts of the forwards to the last member reached.
    pub multicast_hops_max_mean: f64,
    /// Members reached (each exactly once) over members that should be reached.
    pub delivery_ratio: f64,
    /// Deliveries beyond the first to one key (must be 0).
    pub duplicate_deliveries: usize,
    /// Deliveries to keys outside the range (must be 0).
    pub stray_deliveries: usize,
}

/// The summary line of `vp-host bench alm`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AlmBenchReport {
    /// Benchmark name.
    pub bench: &'static str,
    /// Hosts.
    pub hosts: usize,
    /// Keys in the network at the start (host keys and group member keys).
    pub keys: usize,
    /// log2(hosts), for comparison with the hop counts.
    pub log2_hosts: f64,
    /// Seed.
    pub seed: u64,
    /// Churn percentage.
    pub churn_pct: f64,
    /// Members per group.
    pub group_size: usize,
    /// Searches and multicasts in the stable network.
    pub stable: OpFigures,
    /// Protocol joins measured.
    pub joins: usize,
    /// Mean messages per join (search, links, walks; no pings).
    pub join_messages_mean: f64,
    /// 99th percentile... of messages per join batch member (approximate: batch mean max).
    pub join_messages_max: f64,
    /// Mean simulated time per join, milliseconds.
    pub join_ms_mean: f64,
    /// Hosts crashed (and joined) in the churn phase.
    pub churned: usize,
    /// Searches and multicasts started right after the churn, while repair is going on,
    /// given 30 simulated seconds to complete.
    pub during_churn: Option<OpFigures>,
    /// Simulated seconds from the end of the churn until the graph was ideal again (None:
    /// not within `repair_secs_max`; see `repair_wrong_links`).
    pub repair_secs: Option<f64>,
    /// Wrong links (versus the ideal graph) every 10 simulated seconds after the churn.
    pub repair_wrong_links: Vec<usize>,
    /// The consistency checker's verdict at the end of the repair window (lowest level
    /// at which a link is still wrong), if not yet ideal.
    pub repair_remaining: Option<String>,
    /// Link messages (joins, repairs, stabilisation) per churned host, until repaired.
    pub repair_messages_per_churned: Option<f64>,
    /// Searches and multicasts after repair converged.
    pub after_repair: Option<OpFigures>,
    /// Wall-clock seconds to bulk-load the network.
    pub build_secs: f64,
    /// Wall-clock seconds for the whole run.
    pub run_secs: f64,
    /// Simulated messages in all.
    pub sim_messages: u64,
    /// Simulated messages per wall-clock second.
    pub sim_messages_per_sec: f64,
    /// Resident memory per host after loading (from /proc/self/statm; 0 if unknown).
    pub rss_bytes_per_host: u64,
    /// The core's own estimate of its state per host.
    pub state_bytes_per_host: u64,
    /// Messages by kind over the whole run.
    pub messages_by_kind: BTreeMap<&'static str, u64>,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn host_key(r: u64) -> Key {
    let mut k = b"h/".to_vec();
    k.extend_from_slice(&r.to_be_bytes());
    Key::new(k)
}

fn group_prefix(g: usize) -> Vec<u8> {
    format!("v/{g:08x}/").into_bytes()
}

fn group_key(g: usize, host: u32) -> Key {
    let mut k = group_prefix(g);
    k.extend_from_slice(format!("{host:08x}").as_bytes());
    Key::new(k)
}

/// The configuration used for the benchmark's hosts: slower background traffic than the
/// default (pings every 20 s, stabilisation every 60 s) so that 100,000 hosts simulate
/// quickly; repair is driven by pings and by requests that go unanswered, and finished
/// by stabilisation.
#[must_use]
pub fn bench_config() -> Config {
    Config {
        ping_interval_us: 20_000_000,
        ping_timeout_us: 1_000_000,
        stabilize_interval_us: 60_000_000,
        ..Config::default()
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn random_host(sim: &mut Sim) -> u32 {
    loop {
        let n = sim.host_count() as u64;
        let h = sim.rng().below(n) as u32;
        if sim.host(h).is_some_and(|x| x.keys().next().is_some()) {
            return h;
        }
    }
}

/// Issue searches and one multicast per group; measure after `settle_us` of simulated time.
fn measure(sim: &mut Sim, opts: &AlmBenchOptions, settle_us: u64) -> OpFigures {
    let keys = sim.live_keys();
    let events_from = sim.events.len();
    let mut searches: FxHashMap<OpId, (Key, u32)> = FxHashMap::default();
    for _ in 0..opts.searches {
        let from = random_host(sim);
        let (k, owner) = keys[sim.rng().below(keys.len() as u64) as usize].clone();
        if let Ok(op) = sim.search(from, k.clone()) {
            searches.insert(op, (k, owner));
        }
    }
    let mut multicasts: FxHashMap<OpId, KeyRange> = FxHashMap::default();
    for g in 0..opts.groups {
        let from = random_host(sim);
        let range = KeyRange::prefix(&group_prefix(g));
        if let Ok(op) = sim.multicast(from, range.clone(), Bytes::from(&b"bench payload"[..])) {
            multicasts.insert(op, range);
        }
    }
    sim.run_for(settle_us);
    // Ground truth after the fact: keys present now (members that crashed meanwhile are
    // not expected).
    let live = sim.live_keys();
    let mut hops = Vec::new();
    let mut ok = 0;
    let mut delivered: FxHashMap<OpId, FxHashMap<Key, (u32, u32)>> = FxHashMap::default();
    for (_, e) in &sim.events[events_from..] {
        match e {
            Event::SearchDone {
                op,
                found,
                exact,
                hops: h,
                ..
            } => {
                if let Some((k, owner)) = searches.get(op)
                    && *exact
                    && found.key == *k
                    && found.host.0 == u64::from(*owner)
                {
                    ok += 1;
                    hops.push(*h);
                }
            }
            Event::Delivered {
                op, key, hops: h, ..
            } if multicasts.contains_key(op) => {
                let e = delivered
                    .entry(*op)
                    .or_default()
                    .entry(key.clone())
                    .or_insert((0, *h));
                e.0 += 1;
            }
            _ => {}
        }
    }
    hops.sort_unstable();
    let mut fig = OpFigures {
        searches: searches.len(),
        searches_ok: ok,
        search_hops_mean: hops.iter().map(|h| f64::from(*h)).sum::<f64>()
            / hops.len().max(1) as f64,
        search_hops_p99: percentile(&hops, 0.99),
        multicasts: multicasts.len(),
        ..OpFigures::default()
    };
    let (mut want_total, mut got_total) = (0usize, 0usize);
    let (mut msgs, mut hop_sum, mut hop_n, mut max_sum) = (0u64, 0f64, 0usize, 0f64);
    let empty = FxHashMap::default();
    for (op, range) in &multicasts {
        let want: Vec<&Key> = live
            .iter()
            .map(|(k, _)| k)
            .filter(|k| range.contains(k))
            .collect();
        let got = delivered.get(op).unwrap_or(&empty);
        want_total += want.len();
        for k in &want {
            if got.contains_key(*k) {
                got_total += 1;
            }
        }
        let mut max_h = 0;
        for (k, (n, h)) in got {
            if !range.contains(k) {
                fig.stray_deliveries += 1;
            }
            fig.duplicate_deliveries += (*n as usize).saturating_sub(1);
            hop_sum += f64::from(*h);
            hop_n += 1;
            max_h = max_h.max(*h);
        }
        max_sum += f64::from(max_h);
        msgs += sim.counters.multicast_by_op.get(op).copied().unwrap_or(0);
    }
    let m = multicasts.len().max(1) as f64;
    fig.multicast_messages_mean = msgs as f64 / m;
    fig.multicast_hops_mean = hop_sum / hop_n.max(1) as f64;
    fig.multicast_hops_max_mean = max_sum / m;
    fig.delivery_ratio = if want_total == 0 {
        1.0
    } else {
        got_total as f64 / want_total as f64
    };
    fig
}

/// Run the benchmark.
///
/// # Panics
/// If `hosts` is 0.
#[must_use]
pub fn run(opts: AlmBenchOptions) -> AlmBenchReport {
    let opts = &opts;
    assert!(opts.hosts > 0, "bench alm needs at least one host");
    let started = Instant::now();
    let mut sim_opts = SimOptions::new(opts.seed);
    sim_opts.config = bench_config();
    let mut sim = Sim::new(sim_opts);

    // Build: bulk-load host keys and group member keys.
    let rss0 = rss_bytes();
    let mut entries = Vec::with_capacity(opts.hosts + 5 * opts.groups);
    for _ in 0..opts.hosts {
        let h = sim.add_host();
        let r = sim.rng().next_u64();
        entries.push((h, host_key(r)));
    }
    let group_size = 5.min(opts.hosts);
    for g in 0..opts.groups {
        let mut members: Vec<u32> = Vec::new();
        while members.len() < group_size {
            let h = sim.rng().below(opts.hosts as u64) as u32;
            if !members.contains(&h) {
                members.push(h);
            }
        }
        for h in members {
            entries.push((h, group_key(g, h)));
        }
    }
    sim.bulk_load(&entries);
    let build_secs = started.elapsed().as_secs_f64();
    let rss1 = rss_bytes();
    let state: usize = (0..sim.host_count() as u32)
        .filter_map(|h| sim.host(h))
        .map(crate::AlmHost::memory_bytes_estimate)
        .sum();
    let mut report = AlmBenchReport {
        bench: "alm",
        hosts: opts.hosts,
        keys: entries.len(),
        log2_hosts: (opts.hosts as f64).log2(),
        seed: opts.seed,
        churn_pct: opts.churn_pct,
        group_size,
        build_secs,
        rss_bytes_per_host: rss1.saturating_sub(rss0) / opts.hosts as u64,
        state_bytes_per_host: (state / opts.hosts) as u64,
        ..AlmBenchReport::default()
    };
    drop(entries);

    // Joins by the protocol, ten at a time at random places.
    let mut join_msgs = Vec::new();
    let mut join_time = Vec::new();
    let mut remaining = opts.joins;
    while remaining > 0 {
        let batch = remaining.min(10);
        remaining -= batch;
        let before = sim.counters.of(LINK_KINDS);
        let t0 = sim.now();
        for _ in 0..batch {
            let intro = random_host(&mut sim);
            let h = sim.add_host();
            let r = sim.rng().next_u64();
            let _ = sim.insert_key(h, host_key(r), Some(intro));
        }
        sim.run_until_joined(60_000_000);
        join_time.push(sim.now().micros_since(t0) as f64 / 1000.0);
        join_msgs.push((sim.counters.of(LINK_KINDS) - before) as f64 / batch as f64);
    }
    report.joins = opts.joins;
    report.join_messages_mean = join_msgs.iter().sum::<f64>() / join_msgs.len().max(1) as f64;
    report.join_messages_max = join_msgs.iter().copied().fold(0.0, f64::max);
    report.join_ms_mean = join_time.iter().sum::<f64>() / join_time.len().max(1) as f64;

    // Searches and multicasts in the stable network.
    report.stable = measure(&mut sim, opts, 3_000_000);

    // Churn: crash churn_pct% of the hosts while as many join, over 5 s, with loss.
    if opts.churn_pct > 0.0 {
        let churned = ((opts.hosts as f64) * opts.churn_pct / 100.0).round() as usize;
        report.churned = churned;
        let link_before = sim.counters.of(LINK_KINDS);
        sim.set_loss(opts.loss);
        let steps = 10;
        for step in 0..steps {
            for _ in 0..churned / steps + usize::from(step < churned % steps) {
                let victim = random_host(&mut sim);
                sim.crash(victim);
                let intro = random_host(&mut sim);
                let h = sim.add_host();
                let r = sim.rng().next_u64();
                let _ = sim.insert_key(h, host_key(r), Some(intro));
            }
            sim.run_for(500_000);
        }
        // Operations started while repair is going on (30 s to finish, retries included).
        report.during_churn = Some(measure(&mut sim, opts, 30_000_000));
        sim.set_loss(0.0);
        let churn_end = sim.now();
        let mut repaired = None;
        for _ in 0..opts.repair_secs_max.div_ceil(10) {
            sim.run_for(10_000_000);
            let check = sim.check_consistency();
            report.repair_wrong_links.push(match &check {
                Ok(()) => 0,
                Err(e) => e
                    .split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(usize::MAX),
            });
            if sim.joins_pending() == 0 && check.is_ok() {
                repaired = Some(sim.now());
                break;
            }
            report.repair_remaining = check.err();
        }
        report.repair_secs = repaired.map(|t| t.micros_since(churn_end) as f64 / 1e6);
        if repaired.is_some() {
            report.repair_remaining = None;
        }
        report.repair_messages_per_churned =
            Some((sim.counters.of(LINK_KINDS) - link_before) as f64 / churned.max(1) as f64);
        report.after_repair = Some(measure(&mut sim, opts, 5_000_000));
    }

    report.run_secs = started.elapsed().as_secs_f64();
    report.sim_messages = sim.counters.total();
    report.sim_messages_per_sec = report.sim_messages as f64 / report.run_secs.max(1e-9);
    report.messages_by_kind = sim.counters.by_kind.clone();
    report
}
