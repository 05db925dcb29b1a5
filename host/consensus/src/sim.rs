//! The deterministic simulator: one seed, one run.
//!
//! It drives N real [`Replica`]s (not a model of them), each with a [`FaultStore`] and
//! a small key-value application, plus simulated clients, over a simulated network.
//! Faults: message loss, duplication, reordering and delay, symmetric and one-way
//! partitions, crashes, restarts that lose unsynced writes, failed disk writes, and
//! membership churn (replace, add, remove). Checkers run as it goes (agreement,
//! deterministic outcomes and states, exactly-once) and at the end (linearizability of
//! the client history, progress after faults stop).
//!
//! Entry points: [`run`] (one seed), [`run_many`] (many), and [`Sim`] for scripted
//! scenario tests. A failure prints the seed and `vp-host sim --seed <N>`.

use crate::config::{Limits, ReplicaConfig, Timing};
use crate::lin::{self, KvInput, KvOp};
use crate::message::Message;
use crate::record::PersistBatch;
use crate::replica::{Apply, ProposeError, ReadError, ReadId, ReadMode, Replica};
use crate::rng::Rng;
use crate::session::{Outcome, Reply};
use crate::storage::{FaultStore, Storage};
use crate::types::{
    Bytes, ClientId, Command, HostId, Membership, MembershipChange, Slot, Time, Value,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Which faults to inject while faults are on (probabilities in parts per million).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    /// Per message: dropped.
    pub loss_ppm: u32,
    /// Per message: delivered twice.
    pub duplicate_ppm: u32,
    /// Per message: delayed up to `long_delay_us_max` (reorders it).
    pub long_delay_ppm: u32,
    /// Per millisecond: a partition starts (half of them one-way).
    pub partition_ppm: u32,
    /// Per millisecond: a host crashes (at most a minority of hosts are down at once).
    pub crash_ppm: u32,
    /// Per millisecond: a host's next disk write fails (the host then stops).
    pub disk_fail_ppm: u32,
    /// Per millisecond: a host freezes (a long GC pause or a stopped VM) for up to
    /// 600 ms, then resumes with its old state and a backlog of input: zombie leaders.
    pub pause_ppm: u32,
    /// Membership changes requested during the run.
    pub churn_events_max: u32,
}

impl Faults {
    /// Every fault on.
    pub fn all() -> Faults {
        Faults {
            loss_ppm: 30_000,
            duplicate_ppm: 20_000,
            long_delay_ppm: 30_000,
            partition_ppm: 1_500,
            crash_ppm: 1_000,
            disk_fail_ppm: 200,
            pause_ppm: 800,
            churn_events_max: 3,
        }
    }

    pub fn none() -> Faults {
        Faults {
            loss_ppm: 0,
            duplicate_ppm: 0,
            long_delay_ppm: 0,
            partition_ppm: 0,
            crash_ppm: 0,
            disk_fail_ppm: 0,
            pause_ppm: 0,
            churn_events_max: 0,
        }
    }
}

/// Options of one simulation run. `SimOptions::new(seed)` is what `vp-host sim` runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimOptions {
    pub seed: u64,
    /// Founding voters.
    pub voters: usize,
    pub clients: usize,
    pub keys: u64,
    /// Simulated time with faults on, in µs.
    pub fault_us: u64,
    /// After faults stop, every client must finish `ops_after_heal` operations within
    /// this much simulated time (the progress checker).
    pub heal_us_max: u64,
    pub ops_after_heal: u64,
    /// Every host checkpoints after each slot that is a multiple of this.
    pub checkpoint_every: u64,
    pub faults: Faults,
}

impl SimOptions {
    pub fn new(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            voters: 3,
            clients: 4,
            keys: 3,
            fault_us: 3_000_000,
            heal_us_max: 10_000_000,
            ops_after_heal: 3,
            checkpoint_every: 16,
            faults: Faults::all(),
        }
    }
}

/// Timers used by simulated replicas (µs of simulated time).
pub fn sim_timing() -> Timing {
    Timing {
        heartbeat_interval_us: 20_000,
        election_timeout_us: 150_000,
        election_jitter_us: 150_000,
        leader_lease_us: 75_000,
        retry_us: 40_000,
        promote_lag_slots: 8,
        log_retain_slots: 8,
    }
}

/// Small limits so paging, chunking and windows are exercised.
pub fn sim_limits() -> Limits {
    Limits {
        batch_commands_max: 4,
        window_slots_max: 4,
        // Partial batches wait behind two undecided slots; full ones pipeline.
        partial_batch_window_slots: 2,
        promise_entries_max: 5,
        catchup_entries_max: 6,
        snapshot_chunk_bytes_max: 64,
        snapshot_chunks_in_flight_max: 3,
        ..Limits::default()
    }
}

/// What a successful run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimReport {
    pub seed: u64,
    pub sim_ms: u64,
    pub slots_decided: u64,
    pub commands_applied: u64,
    pub client_ops: u64,
    pub lin_ops_checked: u64,
    pub messages_sent: u64,
    pub messages_dropped: u64,
    pub crashes: u64,
    pub disk_failures: u64,
    pub partitions: u64,
    pub reconfigurations: u64,
    pub snapshots_installed: u64,
    pub lost_unsynced_records: u64,
    pub max_epoch: u64,
    /// Simulated ms from "faults stop" to every client's work done.
    pub heal_ms: u64,
}

/// A checker fired (or the run could not continue).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimFailure {
    pub seed: u64,
    pub at_ms: u64,
    pub message: String,
}

impl SimFailure {
    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        format!("vp-host sim --seed {}", self.seed)
    }
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulation failed: seed {} at {} ms: {}\nreplay: {}",
            self.seed,
            self.at_ms,
            self.message,
            self.replay_command()
        )
    }
}

impl std::error::Error for SimFailure {}

/// Summary of many seeds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultiReport {
    pub first_seed: u64,
    pub seeds: u64,
    pub passed: u64,
    pub client_ops: u64,
    pub slots_decided: u64,
    pub crashes: u64,
    pub reconfigurations: u64,
    pub snapshots_installed: u64,
    pub max_heal_ms: u64,
}

impl fmt::Display for MultiReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sim: {}/{} seeds passed (seeds {}..{}), {} client ops, {} slots, {} crashes, {} reconfigurations, {} snapshot installs, max heal {} ms",
            self.passed,
            self.seeds,
            self.first_seed,
            self.first_seed + self.seeds,
            self.client_ops,
            self.slots_decided,
            self.crashes,
            self.reconfigurations,
            self.snapshots_installed,
            self.max_heal_ms
        )
    }
}

/// Runs one seed.
pub fn run(opts: SimOptions) -> Result<SimReport, SimFailure> {
    let seed = opts.seed;
    // A panic inside a replica is a broken invariant: report it with the seed.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sim = Sim::new(opts);
        sim.run_random()
    }))
    .unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Err(SimFailure {
            seed,
            at_ms: 0,
            message: format!("panic: {what}"),
        })
    })
}

/// Runs `count` seeds starting at `opts.seed` (each with `opts` otherwise); stops at
/// the first failure.
pub fn run_many(opts: SimOptions, count: u64) -> Result<MultiReport, SimFailure> {
    let mut m = MultiReport {
        first_seed: opts.seed,
        seeds: count,
        ..MultiReport::default()
    };
    for i in 0..count {
        let o = SimOptions {
            seed: opts.seed + i,
            ..opts.clone()
        };
        let r = run(o)?;
        m.passed += 1;
        m.client_ops += r.client_ops;
        m.slots_decided += r.slots_decided;
        m.crashes += r.crashes;
        m.reconfigurations += r.reconfigurations;
        m.snapshots_installed += r.snapshots_installed;
        m.max_heal_ms = m.max_heal_ms.max(r.heal_ms);
    }
    Ok(m)
}

// ----- the key-value application ------------------------------------------------------

/// A key-value operation carried in a command payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCmd {
    Put { key: u64, value: u64 },
    Get { key: u64 },
}

impl KvCmd {
    pub fn encode(&self) -> Bytes {
        let mut v = Vec::with_capacity(17);
        match self {
            KvCmd::Put { key, value } => {
                v.push(1);
                v.extend_from_slice(&key.to_le_bytes());
                v.extend_from_slice(&value.to_le_bytes());
            }
            KvCmd::Get { key } => {
                v.push(2);
                v.extend_from_slice(&key.to_le_bytes());
                v.extend_from_slice(&0u64.to_le_bytes());
            }
        }
        Bytes::from(v)
    }

    pub fn decode(b: &[u8]) -> Option<KvCmd> {
        if b.len() != 17 {
            return None;
        }
        let mut k = [0u8; 8];
        k.copy_from_slice(&b[1..9]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[9..17]);
        let key = u64::from_le_bytes(k);
        match b[0] {
            1 => Some(KvCmd::Put {
                key,
                value: u64::from_le_bytes(v),
            }),
            2 => Some(KvCmd::Get { key }),
            _ => None,
        }
    }
}

/// The replicated application of the simulator. Puts reply at once; gets reply
/// asynchronously, when the next batch is applied (like an async guest), so the
/// session table's "pending" path is exercised. Deferred replies are application state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvApp {
    pub data: BTreeMap<u64, u64>,
    pub deferred: Vec<(ClientId, u64, u64)>,
}

impl KvApp {
    /// Applies a command; the reply is the previous value (put) or current value (get).
    pub fn apply(&mut self, cmd: KvCmd) -> u64 {
        match cmd {
            KvCmd::Put { key, value } => self.data.insert(key, value).unwrap_or(0),
            KvCmd::Get { key } => self.get(key),
        }
    }
    pub fn get(&self, key: u64) -> u64 {
        self.data.get(&key).copied().unwrap_or(0)
    }
    pub fn encode(&self) -> Bytes {
        Bytes::from(
            postcard::to_allocvec(&(&self.data, &self.deferred))
                .expect("encoding into memory cannot fail"),
        )
    }
    pub fn decode(b: &[u8]) -> Option<KvApp> {
        if b.is_empty() {
            return Some(KvApp::default());
        }
        postcard::from_bytes(b)
            .ok()
            .map(|(data, deferred)| KvApp { data, deferred })
    }
    pub fn digest(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&self.encode())
    }
}

fn reply_bytes(v: u64) -> Bytes {
    Bytes::from(v.to_le_bytes().to_vec())
}

fn reply_value(b: &[u8]) -> Option<u64> {
    let a: [u8; 8] = b.try_into().ok()?;
    Some(u64::from_le_bytes(a))
}

// ----- simulated world ------------------------------------------------------------------

#[derive(Clone, Debug)]
enum ReqKind {
    Log { seq: u64, cmd: KvCmd },
    Read { key: u64, mode: ReadMode },
}

#[derive(Clone, Debug)]
enum Event {
    Net {
        from: HostId,
        to: HostId,
        msg: Message,
    },
    ToHost {
        to: HostId,
        client: usize,
        op: u64,
        req: ReqKind,
    },
    ToClient {
        client: usize,
        op: u64,
        answer: Option<u64>,
        hint: Option<HostId>,
    },
    Disk {
        host: HostId,
        incarnation: u64,
        token: u64,
        sync: bool,
    },
}

struct Host {
    replica: Option<Replica>,
    store: FaultStore,
    initial: Option<Membership>,
    incarnation: u64,
    app: KvApp,
    disk_free_at: Time,
    waiting: BTreeMap<(ClientId, u64), (usize, u64)>,
    reads: BTreeMap<ReadId, (usize, u64, u64)>,
    restart_at: Option<Time>,
    /// This host's clock runs at (1 + drift_ppm / 10^6) times simulated time, from
    /// the reading `clock_base` (local) taken at `clock_since` (simulated).
    drift_ppm: i64,
    clock_base: Time,
    clock_since: Time,
    /// Frozen until then: input waits, timers do not run.
    paused_until: Option<Time>,
}

struct ClientOp {
    id: u64,
    req: ReqKind,
    first_call: Time,
    sent_at: Time,
    history: Option<usize>,
}

struct Client {
    id: ClientId,
    next_seq: u64,
    target: HostId,
    op: Option<ClientOp>,
    next_at: Time,
    done: u64,
    done_after_heal: u64,
    next_op_id: u64,
}

#[derive(Default)]
struct Checker {
    decided: BTreeMap<u64, Value>,
    outcomes: BTreeMap<u64, Vec<Outcome>>,
    states: BTreeMap<u64, u64>,
    fresh: HashMap<(ClientId, u64), u64>,
}

const TICK_US: u64 = 1_000;
const CLIENT_RETRY_US: u64 = 300_000;

/// A simulated cluster. [`run`] drives it with random faults; scenario tests drive it
/// step by step with the public methods.
pub struct Sim {
    opts: SimOptions,
    rng: Rng,
    now: Time,
    hosts: BTreeMap<HostId, Host>,
    next_host: u64,
    events: BTreeMap<(u64, u64), Event>,
    event_seq: u64,
    /// Directed links that drop everything, with the time they heal.
    blocked: BTreeMap<(HostId, HostId), Time>,
    clients: Vec<Client>,
    history: Vec<KvOp>,
    acked: Vec<(ClientId, u64)>,
    checker: Checker,
    report: SimReport,
    faults_on: bool,
    healed_at: Option<Time>,
    churn_at: Vec<Time>,
    failure: Option<String>,
    read_log: Vec<(HostId, ReadId, bool)>,
    /// Scripted losses: (from, to, message kind) -> how many more to drop.
    drops: BTreeMap<(HostId, HostId, &'static str), u32>,
    /// When false, hosts never run elections by timer (scenario tests pick leaders).
    pub auto_elect: bool,
}

impl Sim {
    /// Builds the founding hosts (ids 1..=voters) and the clients; faults start on.
    pub fn new(opts: SimOptions) -> Sim {
        let mut rng = Rng::new(opts.seed);
        let voters: Vec<HostId> = (1..=opts.voters as u64).map(HostId).collect();
        let initial = Membership {
            epoch: crate::types::Epoch(1),
            voters: voters.clone(),
            learners: Vec::new(),
        };
        let mut sim = Sim {
            rng: Rng::new(rng.next_u64()),
            now: Time(0),
            hosts: BTreeMap::new(),
            next_host: opts.voters as u64 + 1,
            events: BTreeMap::new(),
            event_seq: 0,
            blocked: BTreeMap::new(),
            clients: Vec::new(),
            history: Vec::new(),
            acked: Vec::new(),
            checker: Checker::default(),
            report: SimReport {
                seed: opts.seed,
                ..SimReport::default()
            },
            faults_on: true,
            healed_at: None,
            churn_at: Vec::new(),
            failure: None,
            read_log: Vec::new(),
            drops: BTreeMap::new(),
            auto_elect: true,
            opts,
        };
        for h in &voters {
            sim.add_host(*h, Some(initial.clone()));
        }
        for i in 0..sim.opts.clients {
            let target = *sim.rng.pick(&voters).unwrap_or(&HostId(1));
            sim.clients.push(Client {
                id: ClientId(1000 + i as u128),
                next_seq: 1,
                target,
                op: None,
                next_at: Time(sim.rng.range(0, 50_000)),
                done: 0,
                done_after_heal: 0,
                next_op_id: 1,
            });
        }
        let churn = if sim.opts.faults.churn_events_max > 0 {
            sim.rng.range(1, sim.opts.faults.churn_events_max as u64)
        } else {
            0
        };
        for _ in 0..churn {
            let t = sim.rng.range(200_000, sim.opts.fault_us.max(200_001));
            sim.churn_at.push(Time(t));
        }
        sim.churn_at.sort();
        sim
    }

    fn cfg(&self, h: HostId, incarnation: u64) -> ReplicaConfig {
        ReplicaConfig {
            id: h,
            seed: self.opts.seed ^ h.0.wrapping_mul(0x9e37_79b9) ^ (incarnation << 40),
            timing: sim_timing(),
            limits: sim_limits(),
        }
    }

    fn add_host(&mut self, h: HostId, initial: Option<Membership>) {
        // Clock rates differ by up to 20% either way: well inside the lease's stated
        // assumption (no clock more than 2x faster than another).
        let drift_ppm = self.rng.range(0, 400_000) as i64 - 200_000;
        let local = self.now;
        let r = Replica::new(self.cfg(h, 0), initial.clone(), local);
        self.hosts.insert(
            h,
            Host {
                replica: Some(r),
                store: FaultStore::new(),
                initial,
                incarnation: 0,
                app: KvApp::default(),
                disk_free_at: self.now,
                waiting: BTreeMap::new(),
                reads: BTreeMap::new(),
                restart_at: None,
                drift_ppm,
                clock_base: local,
                clock_since: self.now,
                paused_until: None,
            },
        );
    }

    /// If host `h` is frozen, until when.
    fn paused(&self, h: HostId) -> Option<Time> {
        self.hosts
            .get(&h)
            .and_then(|x| x.paused_until)
            .filter(|t| *t > self.now)
    }

    /// Freezes host `h` for `us` of simulated time (it keeps its state).
    pub fn pause(&mut self, h: HostId, us: u64) {
        let until = self.now.plus_us(us);
        if let Some(x) = self.hosts.get_mut(&h) {
            x.paused_until = Some(until);
        }
    }

    /// Host `h`'s local clock reading now.
    fn local(&self, h: HostId) -> Time {
        let Some(x) = self.hosts.get(&h) else {
            return self.now;
        };
        let elapsed = self.now.since(x.clock_since) as i64;
        Time(x.clock_base.0 + (elapsed + elapsed * x.drift_ppm / 1_000_000).max(0) as u64)
    }

    /// Host `h`'s clock reading now (what its replica is given).
    pub fn clock(&self, h: HostId) -> Time {
        self.local(h)
    }

    /// Changes how fast host `h`'s clock runs from now on (its reading stays monotone).
    pub fn set_clock_drift(&mut self, h: HostId, drift_ppm: i64) {
        let reading = self.local(h);
        let now = self.now;
        if let Some(x) = self.hosts.get_mut(&h) {
            x.clock_base = reading;
            x.clock_since = now;
            x.drift_ppm = drift_ppm.max(-999_999);
        }
    }

    fn schedule(&mut self, at: Time, e: Event) {
        self.event_seq += 1;
        self.events.insert((at.0, self.event_seq), e);
    }

    fn fail(&mut self, msg: String) {
        if self.failure.is_none() {
            self.failure = Some(msg);
        }
    }

    // ----- public controls for scenario tests --------------------------------------------

    pub fn now(&self) -> Time {
        self.now
    }

    /// Turns random faults on or off (network loss etc.; scripted faults always work).
    pub fn set_faults(&mut self, on: bool) {
        self.faults_on = on;
    }

    pub fn replica(&self, h: HostId) -> Option<&Replica> {
        self.hosts.get(&h).and_then(|x| x.replica.as_ref())
    }

    pub fn app(&self, h: HostId) -> Option<&KvApp> {
        self.hosts.get(&h).map(|x| &x.app)
    }

    pub fn host_ids(&self) -> Vec<HostId> {
        self.hosts.keys().copied().collect()
    }

    /// The up host that currently leads (the one with the highest ballot if several
    /// believe they do).
    pub fn leader(&self) -> Option<HostId> {
        self.hosts
            .iter()
            .filter_map(|(h, x)| x.replica.as_ref().map(|r| (*h, r)))
            .filter(|(_, r)| r.is_leader())
            .max_by_key(|(_, r)| r.status().promised)
            .map(|(h, _)| h)
    }

    /// Cuts the link a→b (one-way) until healed.
    pub fn block(&mut self, a: HostId, b: HostId) {
        self.blocked.insert((a, b), Time(u64::MAX));
    }

    /// Cuts both directions between every host in `side` and every other host.
    pub fn isolate(&mut self, side: &[HostId]) {
        let all = self.host_ids();
        for a in side {
            for b in &all {
                if !side.contains(b) {
                    self.block(*a, *b);
                    self.block(*b, *a);
                }
            }
        }
    }

    /// Drops the next `count` messages of `kind` (see `Message::kind`) sent from `a` to `b`.
    pub fn drop_next(&mut self, a: HostId, b: HostId, kind: &'static str, count: u32) {
        self.drops.insert((a, b, kind), count);
    }

    pub fn heal_network(&mut self) {
        self.blocked.clear();
    }

    /// Crashes a host: it loses its volatile state and its unsynced writes.
    pub fn crash(&mut self, h: HostId) {
        let Some(host) = self.hosts.get_mut(&h) else {
            return;
        };
        if host.replica.is_none() {
            return;
        }
        host.replica = None;
        host.store.crash(&mut self.rng);
        host.incarnation += 1;
        host.app = KvApp::default();
        host.waiting.clear();
        host.reads.clear();
        host.restart_at = None;
        self.report.crashes += 1;
    }

    /// Restarts a crashed host from its store.
    pub fn restart(&mut self, h: HostId) {
        let cfg = {
            let Some(host) = self.hosts.get(&h) else {
                return;
            };
            if host.replica.is_some() {
                return;
            }
            self.cfg(h, host.incarnation)
        };
        let now = self.local(h);
        let global_now = self.now;
        let Some(host) = self.hosts.get_mut(&h) else {
            return;
        };
        host.restart_at = None;
        let rec = match host.store.load() {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("{h}: store load failed: {e}");
                self.fail(msg);
                return;
            }
        };
        match Replica::recover(cfg, host.initial.clone(), rec, now) {
            Ok(r) => {
                host.replica = Some(r);
                host.disk_free_at = global_now;
            }
            Err(e) => {
                let msg = format!("{h}: recovery failed: {e}");
                self.fail(msg);
                return;
            }
        }
        self.pump(h);
    }

    /// Forces host `h` to run for election now.
    pub fn elect(&mut self, h: HostId) {
        let now = self.local(h);
        if let Some(r) = self.hosts.get_mut(&h).and_then(|x| x.replica.as_mut()) {
            r.campaign(now);
        }
        self.pump(h);
    }

    /// Tells host `h` that host `gone` seems gone (`Replica::suspect`), as the
    /// daemon does when every connection to a host closes.
    pub fn suspect(&mut self, h: HostId, gone: HostId) {
        let now = self.local(h);
        if let Some(r) = self.hosts.get_mut(&h).and_then(|x| x.replica.as_mut()) {
            r.suspect(now, gone);
        }
        self.pump(h);
    }

    /// Creates a new, empty host (to be added by a membership change).
    pub fn spawn_host(&mut self) -> HostId {
        let h = HostId(self.next_host);
        self.next_host += 1;
        self.add_host(h, None);
        h
    }

    /// Asks the leader for a membership change.
    pub fn reconfigure(&mut self, change: MembershipChange) -> Result<(), ProposeError> {
        let Some(l) = self.leader() else {
            return Err(ProposeError::NotLeader { leader: None });
        };
        let now = self.local(l);
        let r = self
            .hosts
            .get_mut(&l)
            .and_then(|x| x.replica.as_mut())
            .ok_or(ProposeError::NotLeader { leader: None })?;
        let res = r.reconfigure(now, change);
        self.pump(l);
        res
    }

    /// Proposes a put directly at host `h` (as client `client`), bypassing clients.
    pub fn propose_put(
        &mut self,
        h: HostId,
        client: u128,
        seq: u64,
        key: u64,
        value: u64,
    ) -> Result<(), ProposeError> {
        let now = self.local(h);
        let r = self
            .hosts
            .get_mut(&h)
            .and_then(|x| x.replica.as_mut())
            .ok_or(ProposeError::NotLeader { leader: None })?;
        let res = r.propose(
            now,
            Command {
                client: ClientId(client),
                seq,
                ack_below: 0,
                payload: KvCmd::Put { key, value }.encode(),
            },
        );
        self.pump(h);
        res
    }

    /// Starts a linearizable read directly at host `h`; see [`Sim::read_outcome`].
    pub fn read_at(&mut self, h: HostId, mode: ReadMode) -> Result<ReadId, ReadError> {
        let now = self.local(h);
        let r = self
            .hosts
            .get_mut(&h)
            .and_then(|x| x.replica.as_mut())
            .ok_or(ReadError::NotLeader { leader: None })?;
        let res = r.read(now, mode);
        self.pump(h);
        res
    }

    /// `Some(true)` once host `h` reported the read ready, `Some(false)` if aborted.
    pub fn read_outcome(&self, h: HostId, id: ReadId) -> Option<bool> {
        self.read_log
            .iter()
            .find(|(x, i, _)| *x == h && *i == id)
            .map(|(_, _, ok)| *ok)
    }

    /// Runs the world for `us` of simulated time (clients and, if on, faults included).
    pub fn run_for(&mut self, us: u64) -> Result<(), SimFailure> {
        let end = self.now.0 + us;
        while self.now.0 < end {
            self.tick();
            if let Some(f) = self.failure.take() {
                return Err(self.failure_at(f));
            }
        }
        Ok(())
    }

    /// Stops the simulated clients from starting new operations (or lets them).
    pub fn pause_clients(&mut self, paused: bool) {
        for c in &mut self.clients {
            c.next_at = if paused { Time(u64::MAX) } else { self.now };
        }
    }

    /// Runs the final checkers over what happened so far.
    pub fn check_history(&mut self) -> Result<u64, SimFailure> {
        self.final_checks()?;
        Ok(self.report.lin_ops_checked)
    }

    pub fn report(&self) -> &SimReport {
        &self.report
    }

    fn failure_at(&self, message: String) -> SimFailure {
        SimFailure {
            seed: self.opts.seed,
            at_ms: self.now.0 / 1000,
            message,
        }
    }

    // ----- the random run -------------------------------------------------------------

    fn run_random(&mut self) -> Result<SimReport, SimFailure> {
        let fault_end = self.opts.fault_us;
        let deadline = fault_end + self.opts.heal_us_max;
        loop {
            self.tick();
            if let Some(f) = self.failure.take() {
                return Err(self.failure_at(f));
            }
            if self.healed_at.is_none() && self.now.0 >= fault_end {
                self.heal();
            }
            if let Some(h) = self.healed_at
                && self
                    .clients
                    .iter()
                    .all(|c| c.done_after_heal >= self.opts.ops_after_heal)
            {
                self.report.heal_ms = self.now.since(h) / 1000;
                break;
            }
            if self.now.0 >= deadline {
                let stuck: Vec<String> = self
                    .hosts
                    .iter()
                    .filter_map(|(h, x)| {
                        x.replica.as_ref().map(|r| format!("{h}: {:?}", r.status()))
                    })
                    .collect();
                return Err(self.failure_at(format!(
                    "no progress: clients did not finish {} ops within {} ms after faults stopped; hosts: {}",
                    self.opts.ops_after_heal,
                    self.opts.heal_us_max / 1000,
                    stuck.join("; ")
                )));
            }
        }
        self.final_checks()?;
        self.report.sim_ms = self.now.0 / 1000;
        Ok(self.report.clone())
    }

    /// Faults stop: the network heals and every crashed host restarts.
    fn heal(&mut self) {
        self.faults_on = false;
        self.blocked.clear();
        self.churn_at.clear();
        let down: Vec<HostId> = self
            .hosts
            .iter()
            .filter(|(_, x)| x.replica.is_none())
            .map(|(h, _)| *h)
            .collect();
        for h in down {
            self.restart(h);
        }
        self.healed_at = Some(self.now);
        for c in &mut self.clients {
            c.done_after_heal = 0;
        }
    }

    fn tick(&mut self) {
        self.now = Time(self.now.0 + TICK_US);
        let now = self.now;
        // Events due.
        while let Some((&(t, s), _)) = self.events.first_key_value() {
            if t > now.0 {
                break;
            }
            if let Some(e) = self.events.remove(&(t, s)) {
                self.handle_event(e);
            }
        }
        // Timers.
        let ids = self.host_ids();
        for h in &ids {
            if self.paused(*h).is_some() {
                continue;
            }
            let local = self.local(*h);
            let due = self
                .hosts
                .get(h)
                .and_then(|x| x.replica.as_ref())
                .and_then(|r| r.poll_timeout())
                .is_some_and(|t| t <= local);
            if due && self.auto_elect {
                if let Some(r) = self.hosts.get_mut(h).and_then(|x| x.replica.as_mut()) {
                    r.handle_timeout(local);
                }
                self.pump(*h);
            } else if due {
                // Scenario mode: timers run but elections need `elect`.
                let is_member_follower = self
                    .hosts
                    .get(h)
                    .and_then(|x| x.replica.as_ref())
                    .is_some_and(|r| {
                        !r.is_leader() && r.status().role != crate::replica::Role::Candidate
                    });
                if !is_member_follower {
                    if let Some(r) = self.hosts.get_mut(h).and_then(|x| x.replica.as_mut()) {
                        r.handle_timeout(local);
                    }
                    self.pump(*h);
                }
            }
            // Restarts due.
            if self
                .hosts
                .get(h)
                .and_then(|x| x.restart_at)
                .is_some_and(|t| t <= now)
            {
                self.restart(*h);
            }
        }
        // Partitions that end.
        self.blocked.retain(|_, until| *until > now);
        self.clients_act();
        if self.faults_on {
            self.random_faults();
        }
    }

    fn random_faults(&mut self) {
        let f = self.opts.faults.clone();
        let now = self.now;
        let ids = self.host_ids();
        if self.rng.chance(f.crash_ppm) {
            let up: Vec<HostId> = ids
                .iter()
                .copied()
                .filter(|h| self.hosts.get(h).is_some_and(|x| x.replica.is_some()))
                .collect();
            let down = ids.len() - up.len();
            if (down + 1) * 2 < ids.len().max(self.opts.voters)
                && let Some(&h) = self.rng.pick(&up)
            {
                self.crash(h);
                let back = self.rng.range(20_000, 600_000);
                if let Some(x) = self.hosts.get_mut(&h) {
                    x.restart_at = Some(now.plus_us(back));
                }
            }
        }
        if self.rng.chance(f.pause_ppm)
            && let Some(&h) = self.rng.pick(&ids)
        {
            let us = self.rng.range(50_000, 600_000);
            self.pause(h, us);
        }
        if self.rng.chance(f.disk_fail_ppm)
            && let Some(&h) = self.rng.pick(&ids)
            && let Some(x) = self.hosts.get_mut(&h)
        {
            x.store.fail_next_write();
        }
        if self.rng.chance(f.partition_ppm) && ids.len() >= 2 {
            let until = now.plus_us(self.rng.range(50_000, 1_000_000));
            self.report.partitions += 1;
            if self.rng.chance(500_000) {
                // One-way: a cannot reach b.
                let a = ids[self.rng.below(ids.len() as u64) as usize];
                let b = ids[self.rng.below(ids.len() as u64) as usize];
                if a != b {
                    self.blocked.insert((a, b), until);
                }
            } else {
                let side: Vec<HostId> = ids
                    .iter()
                    .copied()
                    .filter(|_| self.rng.chance(400_000))
                    .collect();
                for a in &side {
                    for b in &ids {
                        if !side.contains(b) {
                            self.blocked.insert((*a, *b), until);
                            self.blocked.insert((*b, *a), until);
                        }
                    }
                }
            }
        }
        if self.churn_at.first().is_some_and(|t| *t <= now) {
            self.churn();
        }
    }

    fn churn(&mut self) {
        let now = self.now;
        let Some(l) = self.leader() else {
            self.churn_at[0] = now.plus_us(100_000);
            return;
        };
        let Some(m) = self.replica(l).map(|r| (**r.membership()).clone()) else {
            return;
        };
        if !m.learners.is_empty() {
            self.churn_at[0] = now.plus_us(200_000);
            return;
        }
        let n = m.voters.len();
        let pick = self.rng.below(3);
        let change = if n < 3 || (pick == 0 && n < 5) {
            MembershipChange::Add(HostId(self.next_host))
        } else if n > 4 || pick == 1 {
            let Some(&victim) = self.rng.pick(&m.voters) else {
                return;
            };
            MembershipChange::Remove(victim)
        } else {
            let Some(&victim) = self.rng.pick(&m.voters) else {
                return;
            };
            MembershipChange::Replace {
                remove: victim,
                add: HostId(self.next_host),
            }
        };
        let local = self.local(l);
        let r = self.hosts.get_mut(&l).and_then(|x| x.replica.as_mut());
        let Some(r) = r else { return };
        match r.reconfigure(local, change) {
            Ok(()) => {
                self.churn_at.remove(0);
                if matches!(
                    change,
                    MembershipChange::Add(_) | MembershipChange::Replace { .. }
                ) {
                    self.spawn_host();
                }
                self.pump(l);
            }
            Err(_) => {
                self.churn_at[0] = now.plus_us(100_000);
            }
        }
    }

    // ----- network ---------------------------------------------------------------------

    fn net_send(&mut self, from: HostId, to: HostId, msg: Message) {
        self.report.messages_sent += 1;
        // Every message crosses the wire format, so encoding and validation see real
        // traffic: a legitimate message that fails to decode is a bug.
        let msg = match Message::decode(&msg.encode(), &sim_limits()) {
            Ok(m) => m,
            Err(e) => {
                self.fail(format!(
                    "{from} sent a {} that does not decode: {e}",
                    msg.kind()
                ));
                return;
            }
        };
        if self.blocked.contains_key(&(from, to)) || !self.hosts.contains_key(&to) {
            self.report.messages_dropped += 1;
            return;
        }
        if let Some(n) = self.drops.get_mut(&(from, to, msg.kind()))
            && *n > 0
        {
            *n -= 1;
            self.report.messages_dropped += 1;
            return;
        }
        let f = self.opts.faults.clone();
        let on = self.faults_on;
        if on && self.rng.chance(f.loss_ppm) {
            self.report.messages_dropped += 1;
            return;
        }
        let copies = if on && self.rng.chance(f.duplicate_ppm) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if on && self.rng.chance(f.long_delay_ppm) {
                self.rng.range(10_000, 120_000)
            } else {
                self.rng.range(200, 3_000)
            };
            let at = self.now.plus_us(delay);
            self.schedule(
                at,
                Event::Net {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
    }

    fn client_link_delay(&mut self) -> Option<u64> {
        if self.faults_on && self.rng.chance(self.opts.faults.loss_ppm) {
            return None;
        }
        Some(self.rng.range(200, 3_000))
    }

    fn handle_event(&mut self, e: Event) {
        let target = match &e {
            Event::Net { to, .. } | Event::ToHost { to, .. } => Some(*to),
            Event::Disk { host, .. } => Some(*host),
            Event::ToClient { .. } => None,
        };
        if let Some(h) = target
            && let Some(until) = self.paused(h)
        {
            self.schedule(until, e);
            return;
        }
        match e {
            Event::Net { from, to, msg } => {
                if self.blocked.contains_key(&(from, to)) {
                    self.report.messages_dropped += 1;
                    return;
                }
                let now = self.local(to);
                let Some(r) = self.hosts.get_mut(&to).and_then(|x| x.replica.as_mut()) else {
                    return;
                };
                if let Err(e) = r.handle_message(now, from, msg) {
                    self.fail(format!("{to} refused a message from {from}: {e}"));
                    return;
                }
                self.pump(to);
            }
            Event::Disk {
                host,
                incarnation,
                token,
                sync,
            } => {
                let Some(x) = self.hosts.get_mut(&host) else {
                    return;
                };
                if x.incarnation != incarnation || x.replica.is_none() {
                    return;
                }
                if sync && x.store.sync().is_err() {
                    self.disk_failed(host);
                    return;
                }
                if let Some(r) = x.replica.as_mut() {
                    r.on_persisted(token);
                }
                self.pump(host);
            }
            Event::ToHost {
                to,
                client,
                op,
                req,
            } => self.host_request(to, client, op, req),
            Event::ToClient {
                client,
                op,
                answer,
                hint,
            } => self.client_answer(client, op, answer, hint),
        }
    }

    fn disk_failed(&mut self, h: HostId) {
        self.report.disk_failures += 1;
        self.crash(h);
        let back = self.rng.range(20_000, 300_000);
        let now = self.now;
        if let Some(x) = self.hosts.get_mut(&h) {
            x.restart_at = Some(now.plus_us(back));
        }
    }

    // ----- hosts -----------------------------------------------------------------------

    /// Drains a host's outputs: persist, send, apply.
    fn pump(&mut self, h: HostId) {
        loop {
            let mut progressed = false;
            // Persist.
            let mut batches: Vec<PersistBatch> = Vec::new();
            if let Some(r) = self.hosts.get_mut(&h).and_then(|x| x.replica.as_mut()) {
                while let Some(b) = r.poll_persist() {
                    batches.push(b);
                }
            }
            for b in batches {
                progressed = true;
                let Some(x) = self.hosts.get_mut(&h) else {
                    return;
                };
                if x.store.write_batch(&b).is_err() {
                    self.disk_failed(h);
                    return;
                }
                let lat = if b.must_sync {
                    self.rng.range(100, 2_000)
                } else {
                    0
                };
                let Some(x) = self.hosts.get_mut(&h) else {
                    return;
                };
                let at = x.disk_free_at.max(self.now).plus_us(lat);
                x.disk_free_at = at;
                let inc = x.incarnation;
                self.schedule(
                    at,
                    Event::Disk {
                        host: h,
                        incarnation: inc,
                        token: b.token,
                        sync: b.must_sync,
                    },
                );
            }
            // Send.
            let mut msgs = Vec::new();
            if let Some(r) = self.hosts.get_mut(&h).and_then(|x| x.replica.as_mut()) {
                while let Some(m) = r.poll_send() {
                    msgs.push(m);
                }
            }
            for (to, m) in msgs {
                progressed = true;
                self.net_send(h, to, m);
            }
            // Apply.
            loop {
                let a = match self.hosts.get_mut(&h).and_then(|x| x.replica.as_mut()) {
                    Some(r) => r.poll_apply(),
                    None => return,
                };
                let Some(a) = a else { break };
                progressed = true;
                self.apply(h, a);
                if self.failure.is_some() {
                    return;
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn apply(&mut self, h: HostId, a: Apply) {
        let now = self.now;
        let every = self.opts.checkpoint_every;
        let mut replies: Vec<(usize, u64, u64)> = Vec::new();
        let Some(x) = self.hosts.get_mut(&h) else {
            return;
        };
        let applied_slot = match a {
            Apply::Snapshot {
                slot, app_state, ..
            } => {
                match KvApp::decode(&app_state) {
                    Some(app) => x.app = app,
                    None => {
                        self.fail(format!("{h}: snapshot at {slot} has a bad app state"));
                        return;
                    }
                }
                if slot.0 > 0 {
                    self.report.snapshots_installed += 1;
                }
                let d = x.app.digest();
                if let Some(prev) = self.checker.states.get(&slot.0)
                    && *prev != d
                {
                    self.fail(format!(
                        "{h}: state after snapshot at {slot} differs from other hosts"
                    ));
                    return;
                }
                self.checker.states.insert(slot.0, d);
                None
            }
            Apply::Noop { slot } => {
                self.check_value(h, slot, &Value::Noop);
                Some(slot)
            }
            Apply::Membership { slot, membership } => {
                self.report.max_epoch = self.report.max_epoch.max(membership.epoch.0);
                self.check_value(h, slot, &Value::Reconfigure(membership));
                Some(slot)
            }
            Apply::Batch {
                slot,
                batch,
                outcomes,
                ..
            } => {
                self.check_value(h, slot, &Value::Batch(batch.clone()));
                if let Some(prev) = self.checker.outcomes.get(&slot.0) {
                    if *prev != outcomes {
                        self.fail(format!(
                            "{h}: session outcomes at {slot} differ: {outcomes:?} vs {prev:?}"
                        ));
                        return;
                    }
                } else {
                    self.checker.outcomes.insert(slot.0, outcomes.clone());
                }
                // Replies the application produced since the last batch are recorded
                // now: the same point in the log on every host.
                let Some(x) = self.hosts.get_mut(&h) else {
                    return;
                };
                for (client, seq, v) in std::mem::take(&mut x.app.deferred) {
                    if let Some(r) = x.replica.as_mut()
                        && let Err(e) = r.record_reply(client, seq, reply_bytes(v))
                    {
                        self.fail(format!("record_reply failed: {e}"));
                        return;
                    }
                    if let Some((ci, op)) = x.waiting.remove(&(client, seq)) {
                        replies.push((ci, op, v));
                    }
                }
                for (c, o) in batch.commands.iter().zip(&outcomes) {
                    let Some(x) = self.hosts.get_mut(&h) else {
                        return;
                    };
                    let answer = match o {
                        Outcome::Fresh => {
                            let Some(cmd) = KvCmd::decode(&c.payload) else {
                                continue;
                            };
                            let v = x.app.apply(cmd);
                            let deferred = matches!(cmd, KvCmd::Get { .. });
                            if deferred {
                                x.app.deferred.push((c.client, c.seq, v));
                            } else if let Some(r) = x.replica.as_mut()
                                && let Err(e) = r.record_reply(c.client, c.seq, reply_bytes(v))
                            {
                                self.fail(format!("record_reply failed: {e}"));
                                return;
                            }
                            match self.checker.fresh.get(&(c.client, c.seq)) {
                                Some(s) if *s != slot.0 => {
                                    self.fail(format!(
                                        "request {} seq {} applied twice: {} and {}",
                                        c.client, c.seq, s, slot
                                    ));
                                    return;
                                }
                                _ => {
                                    self.checker.fresh.insert((c.client, c.seq), slot.0);
                                }
                            }
                            if deferred { None } else { Some(v) }
                        }
                        Outcome::Duplicate(Reply::Cached(b)) => reply_value(b),
                        Outcome::Duplicate(Reply::Pending) => None,
                        // Not applied: the client sends it again later.
                        Outcome::Refused => None,
                        Outcome::Duplicate(Reply::Forgotten) => {
                            let still_waiting = self.clients.iter().any(|cl| {
                                cl.id == c.client
                                    && cl.op.as_ref().is_some_and(|op| {
                                        matches!(op.req, ReqKind::Log { seq, .. } if seq == c.seq)
                                    })
                            });
                            if still_waiting {
                                self.fail(format!(
                                    "request {} seq {} retried but answered Forgotten",
                                    c.client, c.seq
                                ));
                                return;
                            }
                            None
                        }
                    };
                    let Some(x) = self.hosts.get_mut(&h) else {
                        return;
                    };
                    if let Some(v) = answer
                        && let Some((ci, op)) = x.waiting.remove(&(c.client, c.seq))
                    {
                        replies.push((ci, op, v));
                    }
                }
                self.report.commands_applied = self.checker.fresh.len() as u64;
                Some(slot)
            }
            Apply::ReadReady { id } => {
                self.read_log.push((h, id, true));
                if let Some((ci, op, key)) = x.reads.remove(&id) {
                    replies.push((ci, op, x.app.get(key)));
                }
                None
            }
            Apply::ReadAborted { id } => {
                self.read_log.push((h, id, false));
                if let Some((ci, op, _)) = x.reads.remove(&id) {
                    let at = now.plus_us(1_000);
                    self.schedule(
                        at,
                        Event::ToClient {
                            client: ci,
                            op,
                            answer: None,
                            hint: None,
                        },
                    );
                }
                None
            }
        };
        if let Some(slot) = applied_slot {
            let Some(x) = self.hosts.get_mut(&h) else {
                return;
            };
            let d = x.app.digest();
            match self.checker.states.get(&slot.0) {
                Some(prev) if *prev != d => {
                    self.fail(format!(
                        "{h}: application state after {slot} differs from other hosts"
                    ));
                    return;
                }
                _ => {
                    self.checker.states.insert(slot.0, d);
                }
            }
            self.report.slots_decided = self.report.slots_decided.max(slot.0);
            if every > 0 && slot.0.is_multiple_of(every) {
                let state = x.app.encode();
                if let Some(r) = x.replica.as_mut()
                    && let Err(e) = r.checkpoint(slot, state)
                    && !matches!(e, crate::replica::CheckpointError::Stale { .. })
                {
                    self.fail(format!("{h}: checkpoint at {slot} refused: {e}"));
                    return;
                }
            }
        }
        for (ci, op, v) in replies {
            if let Some(d) = self.client_link_delay() {
                let at = now.plus_us(d);
                self.schedule(
                    at,
                    Event::ToClient {
                        client: ci,
                        op,
                        answer: Some(v),
                        hint: None,
                    },
                );
            }
        }
    }

    fn check_value(&mut self, h: HostId, slot: Slot, v: &Value) {
        match self.checker.decided.get(&slot.0) {
            Some(prev) if prev != v => {
                let msg = format!(
                    "agreement violated at {slot}: {h} applied {v:?}, another host applied {prev:?}"
                );
                self.fail(msg);
            }
            Some(_) => {}
            None => {
                self.checker.decided.insert(slot.0, v.clone());
            }
        }
    }

    fn host_request(&mut self, to: HostId, client: usize, op: u64, req: ReqKind) {
        let now = self.local(to);
        let cid = self.clients[client].id;
        let Some(x) = self.hosts.get_mut(&to) else {
            return;
        };
        let Some(r) = x.replica.as_mut() else {
            return;
        };
        let hint = match req {
            ReqKind::Log { seq, cmd } => {
                let c = Command {
                    client: cid,
                    seq,
                    ack_below: seq,
                    payload: cmd.encode(),
                };
                match r.propose(now, c) {
                    Ok(()) => {
                        x.waiting.insert((cid, seq), (client, op));
                        None
                    }
                    Err(ProposeError::NotLeader { leader }) => Some(leader),
                    Err(_) => Some(None),
                }
            }
            ReqKind::Read { key, mode } => match r.read(now, mode) {
                Ok(id) => {
                    x.reads.insert(id, (client, op, key));
                    None
                }
                Err(ReadError::NotLeader { leader }) => Some(leader),
                Err(_) => Some(None),
            },
        };
        if let Some(hint) = hint
            && let Some(d) = self.client_link_delay()
        {
            let at = self.now.plus_us(d);
            self.schedule(
                at,
                Event::ToClient {
                    client,
                    op,
                    answer: None,
                    hint,
                },
            );
        }
        self.pump(to);
    }

    // ----- clients ---------------------------------------------------------------------

    fn clients_act(&mut self) {
        let now = self.now;
        for i in 0..self.clients.len() {
            let c = &self.clients[i];
            if let Some(op) = &c.op {
                if now.since(op.sent_at) >= CLIENT_RETRY_US {
                    let ids = self.host_ids();
                    let t = *self.rng.pick(&ids).unwrap_or(&HostId(1));
                    self.clients[i].target = t;
                    self.send_op(i);
                }
            } else if c.next_at <= now {
                self.start_op(i);
            }
        }
    }

    fn start_op(&mut self, i: usize) {
        let key = self.rng.below(self.opts.keys.max(1));
        let dice = self.rng.below(100);
        let c = &mut self.clients[i];
        let id = c.next_op_id;
        c.next_op_id += 1;
        let (req, input) = if dice < 45 {
            let value = ((i as u64 + 1) << 32) | id;
            let seq = c.next_seq;
            c.next_seq += 1;
            (
                ReqKind::Log {
                    seq,
                    cmd: KvCmd::Put { key, value },
                },
                KvInput::Put(value),
            )
        } else if dice < 60 {
            let seq = c.next_seq;
            c.next_seq += 1;
            (
                ReqKind::Log {
                    seq,
                    cmd: KvCmd::Get { key },
                },
                KvInput::Get,
            )
        } else {
            let mode = if dice < 80 {
                ReadMode::ReadIndex
            } else {
                ReadMode::Lease
            };
            (ReqKind::Read { key, mode }, KvInput::Get)
        };
        let now = self.now;
        self.history.push(KvOp {
            key,
            call: now.0,
            ret: None,
            input,
            output: None,
        });
        let hist = self.history.len() - 1;
        self.clients[i].op = Some(ClientOp {
            id,
            req,
            first_call: now,
            sent_at: now,
            history: Some(hist),
        });
        self.send_op(i);
    }

    fn send_op(&mut self, i: usize) {
        let now = self.now;
        let Some(d) = self.client_link_delay() else {
            if let Some(op) = &mut self.clients[i].op {
                op.sent_at = now;
            }
            return;
        };
        // A third of reads go to any host: a zombie that still believes it leads gets
        // asked too, which is where stale reads would show.
        let is_read = matches!(
            self.clients[i].op.as_ref().map(|o| &o.req),
            Some(ReqKind::Read { .. })
        );
        let stray = if is_read && self.rng.chance(330_000) {
            let ids = self.host_ids();
            self.rng.pick(&ids).copied()
        } else {
            None
        };
        let c = &mut self.clients[i];
        let Some(op) = &mut c.op else { return };
        op.sent_at = now;
        let ev = Event::ToHost {
            to: stray.unwrap_or(c.target),
            client: i,
            op: op.id,
            req: op.req.clone(),
        };
        self.schedule(now.plus_us(d), ev);
    }

    fn client_answer(&mut self, i: usize, op_id: u64, answer: Option<u64>, hint: Option<HostId>) {
        let now = self.now;
        let c = &mut self.clients[i];
        let Some(op) = &c.op else { return };
        if op.id != op_id {
            return;
        }
        match answer {
            Some(v) => {
                let op = c.op.take();
                c.done += 1;
                c.done_after_heal += 1;
                if let Some(op) = op {
                    if let ReqKind::Log { seq, .. } = op.req {
                        self.acked.push((c.id, seq));
                    }
                    if let Some(hi) = op.history {
                        let h = &mut self.history[hi];
                        h.ret = Some(now.0);
                        h.output = Some(v);
                        h.call = op.first_call.0;
                    }
                }
                c.next_at = now.plus_us(self.rng.range(0, 20_000));
                self.report.client_ops += 1;
            }
            None => {
                // Redirect: try the hint, or another host, a little later.
                let target = match hint {
                    Some(h) => h,
                    None => {
                        let ids = self.host_ids();
                        *self.rng.pick(&ids).unwrap_or(&HostId(1))
                    }
                };
                let c = &mut self.clients[i];
                c.target = target;
                if let Some(op) = &mut c.op {
                    // Retry after a short pause rather than at once.
                    op.sent_at = Time(now.0.saturating_sub(CLIENT_RETRY_US) + 5_000);
                }
            }
        }
    }

    // ----- final checks ----------------------------------------------------------------

    fn final_checks(&mut self) -> Result<(), SimFailure> {
        // Every acknowledged log request was applied (at most once is checked as slots
        // are applied, so this makes it exactly once).
        for (cid, seq) in &self.acked {
            if !self.checker.fresh.contains_key(&(*cid, *seq)) {
                return Err(self.failure_at(format!(
                    "acknowledged request {cid} seq {seq} is not in the applied log"
                )));
            }
        }
        match lin::check(&self.history) {
            Ok(n) => self.report.lin_ops_checked = n as u64,
            Err(v) => return Err(self.failure_at(v.to_string())),
        }
        self.report.lost_unsynced_records = self.hosts.values().map(|x| x.store.lost_records).sum();
        self.report.reconfigurations = self.report.max_epoch.saturating_sub(1);
        Ok(())
    }
}
