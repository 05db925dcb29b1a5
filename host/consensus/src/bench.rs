//! `vp-host bench core`: the Paxos core alone. Three replicas in one thread, messages
//! passed as values (no network, no serialisation), an in-memory store acknowledged at
//! once, a no-op state machine, and C closed-loop proposers with small payloads.

use crate::config::{Limits, ReplicaConfig, Timing};
use crate::replica::{Apply, Replica};
use crate::session::Outcome;
use crate::storage::{MemStore, Storage};
use crate::types::{Bytes, ClientId, Command, Epoch, HostId, Membership, Time};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchOptions {
    /// Concurrent closed-loop proposers (each has one command outstanding).
    pub proposers: usize,
    pub duration: Duration,
    pub payload_bytes: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            proposers: 1,
            duration: Duration::from_secs(3),
            payload_bytes: 16,
        }
    }
}

/// One JSON line for the benchmark dashboard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoreBenchReport {
    pub bench: String,
    pub replicas: usize,
    pub proposers: usize,
    pub payload_bytes: usize,
    pub duration_ms: u64,
    pub commits: u64,
    pub commits_per_sec: f64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub slots: u64,
    pub commands_per_slot: f64,
    pub messages: u64,
}

/// The benchmark's replicas checkpoint every this many slots.
const CHECKPOINT_EVERY_SLOTS: u64 = 4096;

struct Proposer {
    seq: u64,
    started: Instant,
}

fn percentile(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() as f64 - 1.0) * p).round() as usize;
    sorted_ns[i.min(sorted_ns.len() - 1)] as f64 / 1000.0
}

/// Runs the core benchmark.
pub fn core(opts: BenchOptions) -> CoreBenchReport {
    let n = 3usize;
    let ids: Vec<HostId> = (1..=n as u64).map(HostId).collect();
    let membership = Membership {
        epoch: Epoch(1),
        voters: ids.clone(),
        learners: Vec::new(),
    };
    let timing = Timing {
        heartbeat_interval_us: 50_000,
        election_timeout_us: 60_000_000,
        election_jitter_us: 1,
        leader_lease_us: 30_000_000,
        ..Timing::default()
    };
    let limits = Limits {
        window_slots_max: 8,
        queue_commands_max: 1 << 20,
        ..Limits::default()
    };
    let mut replicas: Vec<Replica> = ids
        .iter()
        .map(|&id| {
            Replica::new(
                ReplicaConfig {
                    id,
                    seed: id.0,
                    timing: timing.clone(),
                    limits: limits.clone(),
                },
                Some(membership.clone()),
                Time(0),
            )
        })
        .collect();
    let mut stores: Vec<MemStore> = (0..n).map(|_| MemStore::default()).collect();
    let mut net: VecDeque<(usize, HostId, crate::message::Message)> = VecDeque::new();
    let mut messages = 0u64;

    // Elect replica 0 by running its timer past the election timeout.
    let base = timing.election_timeout_us * 2;
    replicas[0].handle_timeout(Time(base));
    let payload = Bytes::from(vec![7u8; opts.payload_bytes]);
    let start = Instant::now();
    let now_of = |start: &Instant| Time(base + start.elapsed().as_micros() as u64);

    let mut proposers: Vec<Proposer> = (0..opts.proposers)
        .map(|_| Proposer {
            seq: 0,
            started: start,
        })
        .collect();
    let mut latencies: Vec<u64> = Vec::with_capacity(1 << 20);
    let mut commits = 0u64;
    let mut slots = 0u64;
    let mut started = false;
    let mut last_timer = Instant::now();
    let deadline = start + opts.duration;
    let mut iter = 0u64;

    loop {
        iter += 1;
        // Start proposing once replica 0 leads.
        if !started && replicas[0].is_leader() {
            started = true;
            let now = now_of(&start);
            for (i, p) in proposers.iter_mut().enumerate() {
                p.started = Instant::now();
                let cmd = Command {
                    client: ClientId(i as u128 + 1),
                    seq: p.seq,
                    ack_below: p.seq,
                    payload: payload.clone(),
                };
                let _ = replicas[0].propose(now, cmd);
            }
        }
        let mut idle = true;
        for r in 0..n {
            while let Some(b) = replicas[r].poll_persist() {
                idle = false;
                let _ = stores[r].write_batch(&b);
                replicas[r].on_persisted(b.token);
            }
            while let Some((to, m)) = replicas[r].poll_send() {
                idle = false;
                net.push_back((r, to, m));
            }
            while let Some(a) = replicas[r].poll_apply() {
                idle = false;
                // Checkpoint now and then, as the daemon would, so the log and the
                // in-memory store stay bounded (the no-op state machine has no state).
                let applied = replicas[r].applied_below().0 - 1;
                if applied.is_multiple_of(CHECKPOINT_EVERY_SLOTS) {
                    let _ = replicas[r].checkpoint(crate::types::Slot(applied), Bytes::default());
                }
                if r != 0 {
                    continue;
                }
                if let Apply::Batch {
                    batch, outcomes, ..
                } = a
                {
                    slots += 1;
                    let now = now_of(&start);
                    let t = Instant::now();
                    for (c, o) in batch.commands.iter().zip(&outcomes) {
                        if *o != Outcome::Fresh {
                            continue;
                        }
                        let i = (c.client.0 - 1) as usize;
                        let Some(p) = proposers.get_mut(i) else {
                            continue;
                        };
                        if p.seq != c.seq {
                            continue;
                        }
                        commits += 1;
                        latencies.push(t.duration_since(p.started).as_nanos() as u64);
                        p.seq += 1;
                        p.started = t;
                        let cmd = Command {
                            client: c.client,
                            seq: p.seq,
                            ack_below: p.seq,
                            payload: payload.clone(),
                        };
                        let _ = replicas[0].propose(now, cmd);
                    }
                }
            }
        }
        let now = now_of(&start);
        while let Some((from, to, m)) = net.pop_front() {
            idle = false;
            messages += 1;
            let to_i = (to.0 - 1) as usize;
            let _ = replicas[to_i].handle_message(now, ids[from], m);
        }
        if idle || iter.is_multiple_of(64) {
            if Instant::now() >= deadline {
                break;
            }
            if last_timer.elapsed() >= Duration::from_millis(1) {
                last_timer = Instant::now();
                let now = now_of(&start);
                for r in replicas.iter_mut() {
                    if r.poll_timeout().is_some_and(|t| t <= now) {
                        r.handle_timeout(now);
                    }
                }
            }
        }
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    CoreBenchReport {
        bench: "core".into(),
        replicas: n,
        proposers: opts.proposers,
        payload_bytes: opts.payload_bytes,
        duration_ms: elapsed.as_millis() as u64,
        commits,
        commits_per_sec: commits as f64 / elapsed.as_secs_f64(),
        latency_p50_us: percentile(&latencies, 0.50),
        latency_p99_us: percentile(&latencies, 0.99),
        slots,
        commands_per_slot: if slots == 0 {
            0.0
        } else {
            commits as f64 / slots as f64
        },
        messages,
    }
}
