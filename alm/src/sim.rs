//! A deterministic simulator: many [`AlmHost`]s in one process, one event queue, one seed.
//!
//! Messages get a random latency and may be lost or duplicated; hosts crash (their state
//! vanishes) and new ones join. Everything random comes from the seed, so a seed reproduces
//! a run exactly. [`Sim::check_consistency`] compares every node's neighbour lists with the
//! skip graph that the live keys and membership vectors define.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::config::Config;
use crate::error::AlmError;
use crate::host::{AlmHost, Event};
use crate::message::{Body, Message};
use crate::rng::Rng;
use crate::types::{Bytes, HostId, HostRef, Key, KeyRange, NodeRef, OpId, Side, Time};

/// A simulated host: contact information is the host's index.
pub type SimHost = AlmHost<u32>;

/// Simulation parameters.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Seed of everything random.
    pub seed: u64,
    /// Shortest one-way latency.
    pub latency_min_us: u64,
    /// Longest one-way latency.
    pub latency_max_us: u64,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Configuration of every host.
    pub config: Config,
}

impl SimOptions {
    /// Defaults with `seed`: 1..20 ms latency, no loss.
    #[must_use]
    pub fn new(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            latency_min_us: 1_000,
            latency_max_us: 20_000,
            loss: 0.0,
            duplicate: 0.0,
            config: Config::default(),
        }
    }
}

enum Item {
    Deliver { to: u32, msg: Message<u32> },
    Timer { host: u32 },
}

struct Entry {
    at: Time,
    seq: u64,
    item: Item,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Entry) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Entry) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Message counters.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Messages sent, by kind.
    pub by_kind: BTreeMap<&'static str, u64>,
    /// Messages lost by the network.
    pub lost: u64,
    /// Messages addressed to crashed hosts.
    pub to_dead: u64,
    /// `Multicast` hand-offs per multicast.
    pub multicast_by_op: FxHashMap<OpId, u64>,
}

impl Counters {
    /// All messages sent.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }

    /// Messages sent of the given kinds.
    #[must_use]
    pub fn of(&self, kinds: &[&str]) -> u64 {
        kinds
            .iter()
            .map(|k| self.by_kind.get(k).copied().unwrap_or(0))
            .sum()
    }
}

/// Message kinds that belong to joining and repairing (not liveness, not operations).
pub const LINK_KINDS: &[&str] = &[
    "search",
    "search_reply",
    "link_request",
    "walk",
    "link_accept",
    "link_redirect",
    "link_reject",
    "walk_end",
    "leave",
    "gone",
];

/// The simulator.
pub struct Sim {
    opts: SimOptions,
    now: Time,
    rng: Rng,
    hosts: Vec<Option<SimHost>>,
    timer_at: Vec<Option<Time>>,
    queue: BinaryHeap<Reverse<Entry>>,
    seq: u64,
    /// Events from every host, in order: (host index, event).
    pub events: Vec<(u32, Event<u32>)>,
    /// Message counters.
    pub counters: Counters,
    joining: FxHashSet<(u32, Key)>,
    /// Messages processed so far.
    pub steps: u64,
    /// Keys reported isolated, to rejoin through a random live host.
    rejoins: Vec<(u32, Key)>,
    /// Debugging: print every message sent by these hosts to stderr.
    pub trace: Vec<u32>,
    /// Debugging: hosts from this index on count as new in `debug_wrong_links`.
    pub debug_new_from: u64,
}

impl Sim {
    /// An empty simulation.
    #[must_use]
    pub fn new(opts: SimOptions) -> Sim {
        let rng = Rng::new(opts.seed ^ 0x005e_ed0f_a1a1);
        Sim {
            opts,
            now: Time::ZERO,
            rng,
            hosts: Vec::new(),
            timer_at: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            events: Vec::new(),
            counters: Counters::default(),
            joining: FxHashSet::default(),
            steps: 0,
            trace: Vec::new(),
            rejoins: Vec::new(),
            debug_new_from: u64::MAX,
        }
    }

    /// Current simulated time.
    #[must_use]
    pub fn now(&self) -> Time {
        self.now
    }

    /// The options.
    #[must_use]
    pub fn options(&self) -> &SimOptions {
        &self.opts
    }

    /// Change the message loss probability from now on.
    pub fn set_loss(&mut self, loss: f64) {
        self.opts.loss = loss;
    }

    /// The simulation's own random generator (for test scenarios).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Add a host (not yet holding any key); returns its index.
    pub fn add_host(&mut self) -> u32 {
        let idx = u32::try_from(self.hosts.len()).expect("fewer than 2^32 hosts");
        let seed = self.rng.next_u64();
        self.hosts.push(Some(AlmHost::new(
            HostId(u64::from(idx)),
            idx,
            self.opts.config.clone(),
            seed,
        )));
        self.timer_at.push(None);
        idx
    }

    /// Number of hosts ever added.
    #[must_use]
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    /// A host, if it has not crashed.
    #[must_use]
    pub fn host(&self, h: u32) -> Option<&SimHost> {
        self.hosts.get(h as usize).and_then(Option::as_ref)
    }

    /// True if host `h` exists and has not crashed.
    #[must_use]
    pub fn alive(&self, h: u32) -> bool {
        self.host(h).is_some()
    }

    /// Indices of live hosts.
    #[must_use]
    pub fn live_hosts(&self) -> Vec<u32> {
        (0..self.hosts.len())
            .filter(|&i| self.hosts[i].is_some())
            .map(|i| i as u32)
            .collect()
    }

    /// Crash host `h`: its state is gone, messages to it are lost.
    pub fn crash(&mut self, h: u32) {
        if let Some(slot) = self.hosts.get_mut(h as usize) {
            *slot = None;
        }
        self.joining.retain(|(x, _)| *x != h);
    }

    fn host_ref(h: u32) -> HostRef<u32> {
        HostRef {
            host: HostId(u64::from(h)),
            contact: h,
        }
    }

    fn with_host<T>(
        &mut self,
        h: u32,
        f: impl FnOnce(&mut SimHost, Time) -> Result<T, AlmError>,
    ) -> Result<T, AlmError> {
        let now = self.now;
        let host = self
            .hosts
            .get_mut(h as usize)
            .and_then(Option::as_mut)
            .ok_or(AlmError::NotJoined)?;
        let r = f(host, now);
        self.flush(h);
        r
    }

    /// Insert `key` at host `h`, joining through `introducer` (a host index).
    pub fn insert_key(
        &mut self,
        h: u32,
        key: Key,
        introducer: Option<u32>,
    ) -> Result<(), AlmError> {
        self.joining.insert((h, key.clone()));
        let r = self.with_host(h, |host, now| {
            host.insert_key(now, key.clone(), introducer.map(Self::host_ref))
        });
        if r.is_err() {
            self.joining.remove(&(h, key));
        }
        r
    }

    /// Remove `key` from host `h` gracefully.
    pub fn remove_key(&mut self, h: u32, key: &Key) -> Result<(), AlmError> {
        self.with_host(h, |host, now| host.remove_key(now, key))
    }

    /// Search for `key` from host `h`.
    pub fn search(&mut self, h: u32, key: Key) -> Result<OpId, AlmError> {
        self.with_host(h, |host, now| host.search(now, key))
    }

    /// Multicast `payload` over `range` from host `h`.
    pub fn multicast(&mut self, h: u32, range: KeyRange, payload: Bytes) -> Result<OpId, AlmError> {
        self.with_host(h, |host, now| host.multicast(now, range, payload))
    }

    /// Keys still joining (inserted, not yet `Inserted`/`InsertFailed`).
    #[must_use]
    pub fn joins_pending(&self) -> usize {
        self.joining.len()
    }

    fn flush(&mut self, h: u32) {
        let Some(host) = self.hosts.get_mut(h as usize).and_then(Option::as_mut) else {
            return;
        };
        while let Some(t) = host.poll_send() {
            if self.trace.contains(&h) {
                eprintln!("[{}] {h} -> {}: {:?}", self.now, t.to.contact, t.msg.body);
            }
            let kind = t.msg.body.kind();
            *self.counters.by_kind.entry(kind).or_insert(0) += 1;
            if let Body::Multicast { op, .. } = &t.msg.body {
                *self.counters.multicast_by_op.entry(*op).or_insert(0) += 1;
            }
            if self.rng.chance(self.opts.loss) {
                self.counters.lost += 1;
                continue;
            }
            let copies = if self.rng.chance(self.opts.duplicate) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let span = self
                    .opts
                    .latency_max_us
                    .saturating_sub(self.opts.latency_min_us);
                let at = self
                    .now
                    .plus_micros(self.opts.latency_min_us + self.rng.below(span + 1));
                self.seq += 1;
                self.queue.push(Reverse(Entry {
                    at,
                    seq: self.seq,
                    item: Item::Deliver {
                        to: t.to.contact,
                        msg: t.msg.clone(),
                    },
                }));
            }
        }
        while let Some(e) = host.poll_event() {
            match &e {
                Event::Inserted { key } | Event::InsertFailed { key, .. } => {
                    self.joining.remove(&(h, key.clone()));
                }
                // What the daemon does: rejoin through a bootstrap host.
                Event::Isolated { key } => self.rejoins.push((h, key.clone())),
                _ => {}
            }
            self.events.push((h, e));
        }
        if let Some(t) = host.poll_timeout() {
            let t = t.max(self.now);
            if self.timer_at[h as usize].is_none_or(|cur| t < cur) {
                self.timer_at[h as usize] = Some(t);
                self.seq += 1;
                self.queue.push(Reverse(Entry {
                    at: t,
                    seq: self.seq,
                    item: Item::Timer { host: h },
                }));
            }
        }
    }

    fn step(&mut self, e: Entry) {
        self.now = e.at;
        self.steps += 1;
        while let Some((h, key)) = self.rejoins.pop() {
            let live: Vec<u32> = self
                .live_hosts()
                .into_iter()
                .filter(|&x| x != h && self.host(x).is_some_and(|y| y.keys().next().is_some()))
                .collect();
            if live.is_empty() {
                continue;
            }
            let intro = live[self.rng.below(live.len() as u64) as usize];
            self.joining.insert((h, key.clone()));
            let r = self.with_host(h, |host, now| host.rejoin(now, &key, Self::host_ref(intro)));
            if r.is_err() {
                self.joining.remove(&(h, key));
            }
        }
        match e.item {
            Item::Deliver { to, msg } => {
                let from = msg.from.host;
                let now = self.now;
                match self.hosts.get_mut(to as usize).and_then(Option::as_mut) {
                    Some(host) => {
                        // Messages from honest simulated hosts always validate.
                        host.handle_message(now, from, msg)
                            .expect("simulated hosts send valid messages");
                        self.flush(to);
                    }
                    None => self.counters.to_dead += 1,
                }
            }
            Item::Timer { host } => {
                if self.timer_at[host as usize] != Some(e.at) {
                    return;
                }
                self.timer_at[host as usize] = None;
                let now = self.now;
                if let Some(hst) = self.hosts.get_mut(host as usize).and_then(Option::as_mut) {
                    hst.handle_timeout(now);
                    self.flush(host);
                }
            }
        }
    }

    /// Run until simulated time `until`.
    pub fn run_until(&mut self, until: Time) {
        while let Some(Reverse(top)) = self.queue.peek() {
            if top.at > until {
                break;
            }
            let Some(Reverse(e)) = self.queue.pop() else {
                break;
            };
            self.step(e);
        }
        if until > self.now {
            self.now = until;
        }
    }

    /// Run for `micros` of simulated time.
    pub fn run_for(&mut self, micros: u64) {
        let until = self.now.plus_micros(micros);
        self.run_until(until);
    }

    /// Run until every pending join finished or `max_micros` passed; true if all finished.
    pub fn run_until_joined(&mut self, max_micros: u64) -> bool {
        let end = self.now.plus_micros(max_micros);
        while !self.joining.is_empty() && self.now < end {
            self.run_for(50_000);
        }
        self.joining.is_empty()
    }

    /// Every live key with its host, sorted by key.
    #[must_use]
    pub fn live_keys(&self) -> Vec<(Key, u32)> {
        let mut v: Vec<(Key, u32)> = Vec::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if let Some(h) = h {
                for k in h.keys() {
                    v.push((k.clone(), i as u32));
                }
            }
        }
        v.sort();
        v
    }

    /// Install `entries` (host, key) directly as a consistent skip graph, as if every key
    /// had joined one after the other. For building large networks fast; the result is
    /// what [`Sim::check_consistency`] demands of protocol-built graphs.
    pub fn bulk_load(&mut self, entries: &[(u32, Key)]) {
        let now = self.now;
        let mut nodes: Vec<NodeRef<u32>> = Vec::with_capacity(entries.len());
        for (h, key) in entries {
            let host = self.hosts[*h as usize]
                .as_mut()
                .expect("bulk_load onto a live host");
            let mv = host.bulk_insert_joined(now, key.clone());
            nodes.push(NodeRef {
                key: key.clone(),
                mv,
                host: HostId(u64::from(*h)),
                contact: *h,
            });
        }
        // Include keys already present.
        let mut all: Vec<NodeRef<u32>> = Vec::new();
        for (k, h) in self.live_keys() {
            let host = self.hosts[h as usize].as_ref().expect("live");
            if let Some(v) = host.node(&k) {
                all.push(v.me.clone());
            }
        }
        drop(nodes);
        let graph = ideal_graph(&all, self.opts.config.level_max);
        for (i, n) in all.iter().enumerate() {
            let host = self.hosts[n.host.0 as usize].as_mut().expect("live");
            host.bulk_set_links(&n.key, graph.links(i, &all));
        }
        for h in 0..self.hosts.len() as u32 {
            self.flush(h);
        }
    }

    /// Debugging: wrong links by level and kind ("missing", "extra", "other").
    #[doc(hidden)]
    pub fn debug_wrong_links(&self) -> BTreeMap<(usize, &'static str), usize> {
        let mut out = BTreeMap::new();
        let mut all: Vec<NodeRef<u32>> = Vec::new();
        let mut views = Vec::new();
        for (k, h) in self.live_keys() {
            let host = self.hosts[h as usize].as_ref().expect("live");
            let v = host.node(&k).expect("listed key");
            all.push(v.me.clone());
            views.push(v);
        }
        let graph = ideal_graph(&all, self.opts.config.level_max);
        for (i, v) in views.iter().enumerate() {
            let want = graph.links(i, &all);
            for l in 0..v.levels.len().max(want.len()) {
                let got = v.levels.get(l).cloned().unwrap_or([None, None]);
                let exp = want.get(l).cloned().unwrap_or([None, None]);
                for s in 0..2 {
                    let kind = match (&got[s], &exp[s]) {
                        (None, None) => continue,
                        (Some(g), Some(e)) if g.key == e.key => continue,
                        (None, Some(_)) => "missing",
                        (Some(_), None) => "extra",
                        (Some(g), Some(e)) => {
                            if (g.key < e.key) == (s == 1) {
                                "too_close"
                            } else {
                                "too_far"
                            }
                        }
                    };
                    let kind = if all[i].host.0 >= self.debug_new_from {
                        match kind {
                            "missing" => "missing_new",
                            "too_far" => "too_far_new",
                            k => k,
                        }
                    } else {
                        kind
                    };
                    *out.entry((l.min(99), kind)).or_insert(0) += 1;
                }
            }
        }
        out
    }

    /// Compare every joined node's lists with the ideal skip graph of the live keys.
    /// Fails if any key is still joining.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut all: Vec<NodeRef<u32>> = Vec::new();
        let mut views = Vec::new();
        for (k, h) in self.live_keys() {
            let host = self.hosts[h as usize].as_ref().expect("live");
            let v = host.node(&k).expect("listed key");
            if !v.joined {
                return Err(format!("key {k} on host {h} is still joining"));
            }
            all.push(v.me.clone());
            views.push(v);
        }
        for w in all.windows(2) {
            if w[0].key == w[1].key {
                return Err(format!("key {} held twice", w[0].key));
            }
        }
        let graph = ideal_graph(&all, self.opts.config.level_max);
        // Report the lowest level at which anything is wrong (higher levels are built on
        // the lower ones), and how many lists are wrong in all.
        let mut worst: Option<(usize, String)> = None;
        let mut wrong = 0usize;
        let name = |r: &Option<NodeRef<u32>>| r.as_ref().map(|r| (r.key.clone(), r.host.0));
        for (i, v) in views.iter().enumerate() {
            let want = graph.links(i, &all);
            let levels = v.levels.len().max(want.len());
            for l in 0..levels {
                let got = v.levels.get(l).cloned().unwrap_or([None, None]);
                let exp = want.get(l).cloned().unwrap_or([None, None]);
                for side in [Side::Left, Side::Right] {
                    let (g, e) = (&got[side.index()], &exp[side.index()]);
                    let mut err = None;
                    if name(g) != name(e) {
                        err = Some(format!(
                            "key {} (host {}) level {l} {side:?}: has {:?}, expected {:?}",
                            all[i].key,
                            all[i].host.0,
                            name(g),
                            name(e)
                        ));
                    } else if let Some(g) = g
                        && Side::of(&g.key, &all[i].key) != Some(side)
                    {
                        err = Some(format!("key {} level {l}: list not sorted", all[i].key));
                    }
                    if let Some(err) = err {
                        wrong += 1;
                        if worst.as_ref().is_none_or(|(wl, _)| l < *wl) {
                            worst = Some((l, err));
                        }
                    }
                }
            }
            if worst.is_none() && v.levels.len() != want.len() {
                worst = Some((
                    want.len(),
                    format!(
                        "key {} (host {}): {} levels, expected {}",
                        all[i].key,
                        all[i].host.0,
                        v.levels.len(),
                        want.len()
                    ),
                ));
                wrong += 1;
            }
        }
        match worst {
            None => Ok(()),
            Some((_, e)) => Err(format!("{wrong} wrong links; lowest: {e}")),
        }
    }
}

/// The skip graph defined by a sorted set of nodes: per node, per level, neighbour indices.
struct IdealGraph {
    /// links[i] = per level [left, right] indices.
    links: Vec<Vec<[Option<u32>; 2]>>,
}

impl IdealGraph {
    fn links(&self, i: usize, all: &[NodeRef<u32>]) -> Vec<[Option<NodeRef<u32>>; 2]> {
        self.links[i]
            .iter()
            .map(|p| {
                [
                    p[0].map(|j| all[j as usize].clone()),
                    p[1].map(|j| all[j as usize].clone()),
                ]
            })
            .collect()
    }
}

/// `all` must be sorted by key.
fn ideal_graph(all: &[NodeRef<u32>], level_max: usize) -> IdealGraph {
    let n = all.len();
    let mut links: Vec<Vec<[Option<u32>; 2]>> = vec![Vec::new(); n];
    let mut active: Vec<u32> = (0..n as u32).collect();
    for level in 0..level_max {
        if active.is_empty() {
            break;
        }
        let mask = if level == 0 {
            0
        } else {
            u64::MAX >> (64 - level)
        };
        let mut last: FxHashMap<u64, u32> = FxHashMap::default();
        let mut pairs: Vec<[Option<u32>; 2]> = vec![[None, None]; active.len()];
        let mut pos: FxHashMap<u32, usize> = FxHashMap::default();
        for (ai, &i) in active.iter().enumerate() {
            pos.insert(i, ai);
            let p = all[i as usize].mv.0 & mask;
            if let Some(&j) = last.get(&p) {
                pairs[ai][0] = Some(j);
                let aj = pos[&j];
                pairs[aj][1] = Some(i);
            }
            last.insert(p, i);
        }
        let mut next = Vec::new();
        for (ai, &i) in active.iter().enumerate() {
            if pairs[ai][0].is_some() || pairs[ai][1].is_some() {
                links[i as usize].push(pairs[ai]);
                next.push(i);
            }
        }
        active = next;
    }
    IdealGraph { links }
}
