//! The sans-IO skip-graph host: one per `vp-host` process, holding several keys.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use crate::config::Config;
use crate::error::{AlmError, OpError};
use crate::message::{AckStatus, Body, Message, RejectReason};
use crate::rng::Rng;
use crate::types::{
    Bound, Bytes, Contact, HostId, HostRef, Key, KeyRange, MembershipVector, NodeRef, OpId, Side,
    Time,
};

/// A message for the caller to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit<C> {
    /// Destination host (identity and contact).
    pub to: HostRef<C>,
    /// The message.
    pub msg: Message<C>,
}

/// Something that happened, for the caller (`poll_event`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<C> {
    /// A key finished joining: it is linked at every level.
    Inserted {
        /// The key.
        key: Key,
    },
    /// A key could not join; it is no longer held.
    InsertFailed {
        /// The key.
        key: Key,
        /// Why.
        error: OpError,
    },
    /// A key left (gracefully).
    Removed {
        /// The key.
        key: Key,
    },
    /// A search finished.
    SearchDone {
        /// The operation.
        op: OpId,
        /// The key sought.
        target: Key,
        /// The node holding it, or the nearest one.
        found: NodeRef<C>,
        /// True if `found.key == target`.
        exact: bool,
        /// When not exact: `found`'s level-0 neighbour beyond the target, so
        /// `found` and `next` are the two keys around it (None at either end
        /// of the list).
        next: Option<NodeRef<C>>,
        /// Forwards it took.
        hops: u32,
    },
    /// A search failed.
    SearchFailed {
        /// The operation.
        op: OpId,
        /// The key sought.
        target: Key,
        /// Why.
        error: OpError,
    },
    /// A multicast reached one of this host's keys (exactly once per key).
    Delivered {
        /// The local key in the range.
        key: Key,
        /// The multicast.
        op: OpId,
        /// Its sender.
        origin: HostRef<C>,
        /// The payload.
        payload: Bytes,
        /// Forwards from the sender to this key.
        hops: u32,
    },
    /// (Part of) a multicast started here covered no key.
    MulticastEmpty {
        /// The multicast.
        op: OpId,
    },
    /// A neighbour changed (only with `Config::neighbour_events`).
    NeighbourChanged {
        /// The local key.
        key: Key,
        /// The level.
        level: u8,
        /// The side.
        side: Side,
        /// The new neighbour.
        neighbour: Option<NodeRef<C>>,
    },
    /// A joined key lost every link and no known host could bring it back: rejoin it
    /// through a bootstrap host with [`AlmHost::rejoin`].
    Isolated {
        /// The key.
        key: Key,
    },
    /// A host stopped answering and was declared dead.
    HostDown {
        /// The host.
        host: HostId,
    },
}

/// Counters kept by a host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostStats {
    /// Messages handed to the caller.
    pub sends: u64,
    /// Messages that could not be queued (`sends_queued_max`).
    pub sends_dropped: u64,
    /// Events dropped because the caller did not poll (`events_queued_max`).
    pub events_dropped: u64,
    /// Messages received that failed validation.
    pub invalid_messages: u64,
    /// Hosts declared dead.
    pub hosts_declared_dead: u64,
    /// Multicast hand-offs sent without tracking because `forwards_in_flight_max` was hit.
    pub forwards_untracked: u64,
    /// Multicast ranges given up after `park_attempts_max` retries.
    pub ranges_abandoned: u64,
}

/// A read-only view of one node, for checkers and status pages.
#[derive(Debug)]
pub struct NodeView<'a, C> {
    /// The node.
    pub me: &'a NodeRef<C>,
    /// Neighbours per level: `[left, right]`.
    pub levels: &'a [[Option<NodeRef<C>>; 2]],
    /// True once the join finished.
    pub joined: bool,
}

#[derive(Debug)]
struct Join {
    level: usize,
    search: Option<u64>,
    tried_right: bool,
    /// Searches started so far.
    searches: u32,
}

#[derive(Debug)]
struct Node<C> {
    me: NodeRef<C>,
    levels: Vec<[Option<NodeRef<C>>; 2]>,
    /// In-progress fills: (level, side) -> request id.
    fills: Vec<(usize, Side, u64)>,
    join: Option<Join>,
    next_stabilize: Time,
    /// Nodes learned while a fill ran on that (level, side): offered when it ends.
    hints: Vec<(usize, Side, NodeRef<C>)>,
    /// Level 0 lost a neighbour on these sides (index by `Side::index`): if repair finds
    /// none, probe through other hosts.
    lost0: [bool; 2],
    /// Fills repairing a neighbour lost to a failure: if one finds nobody, look again later.
    repairing: Vec<(usize, Side)>,
}

impl<C: Contact> Node<C> {
    fn nbr(&self, level: usize, side: Side) -> Option<&NodeRef<C>> {
        self.levels
            .get(level)
            .and_then(|p| p[side.index()].as_ref())
    }

    fn fill(&self, level: usize, side: Side) -> Option<u64> {
        self.fills
            .iter()
            .find(|(l, s, _)| *l == level && *s == side)
            .map(|f| f.2)
    }

    fn remove_fill(&mut self, level: usize, side: Side) {
        self.fills.retain(|(l, s, _)| !(*l == level && *s == side));
    }
}

/// How a fill finds its first node.
#[derive(Debug)]
enum FillStart<C> {
    /// Send a link request to this node.
    Node(NodeRef<C>),
    /// The closest known node that shares the level (repair).
    Candidate,
    /// Trust only the levels below: the closest lower-level neighbour sharing the level,
    /// else a walk along the level below (join and stabilisation).
    Walk,
}

#[derive(Debug)]
struct PendingReq<C> {
    key: Key,
    level: usize,
    side: Side,
    /// Where the request went; `None` while waiting to retry.
    target: Option<HostRef<C>>,
    body: Option<Body<C>>,
    deadline: Time,
    attempts: u32,
    redirects: u32,
    /// Waiting `retry_delay_us` before sending again (the target asked us to wait, or
    /// redirected us to a node we believe dead).
    parked: bool,
    /// The node that redirected us to the current target, and that target.
    redirect: Option<(NodeRef<C>, NodeRef<C>)>,
    /// The request is a `Beyond` question (its redirect may come from the other side).
    beyond: bool,
}

#[derive(Debug)]
enum SearchPurpose {
    User,
    Join(Key),
    /// Repair lost level 0 on `Side` of the key, through a host outside our own links;
    /// the number is how many contacts were tried.
    Probe(Key, Side, usize),
}

#[derive(Debug)]
struct PendingSearch<C> {
    target: Key,
    attempt: u32,
    deadline: Time,
    purpose: SearchPurpose,
    /// A host to start from (an introducer, or a node close to the target).
    via: Option<HostRef<C>>,
}

#[derive(Debug)]
struct Forward<C> {
    from_key: Key,
    /// `None` while parked waiting for a repair.
    target: Option<NodeRef<C>>,
    op: OpId,
    origin: HostRef<C>,
    range: KeyRange,
    payload: Bytes,
    hops: u32,
    deadline: Time,
    attempts: u32,
}

#[derive(Debug)]
struct SearchFwd<C> {
    at: Key,
    op: OpId,
    attempt: u32,
    target: Key,
    origin: HostRef<C>,
    hops: u32,
    next: HostId,
    deadline: Time,
    reroutes: u32,
}

#[derive(Debug)]
struct Peer {
    last_heard: Time,
    ping: Option<(u64, u32)>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Tick,
    Req(u64),
    Fwd(u64),
    Search(u64),
    SearchFwd(u64),
    Ping(HostId, u64),
    /// A joined node lost its levels from this one up: look for them again.
    Regrow(Key, usize),
    /// A repair found no neighbour at (level, side): look once more, by a walk.
    Recheck(Key, usize, Side),
}

/// One host's skip-graph state machine. Drive it with `handle_*` and the operation calls;
/// drain `poll_send`, `poll_event` and `poll_timeout` after every call.
#[derive(Debug)]
pub struct AlmHost<C: Contact> {
    config: Config,
    me: HostRef<C>,
    rng: Rng,
    nodes: BTreeMap<Key, Node<C>>,
    next_id: u64,
    reqs: FxHashMap<u64, PendingReq<C>>,
    searches: FxHashMap<u64, PendingSearch<C>>,
    forwards: FxHashMap<u64, Forward<C>>,
    peers: FxHashMap<HostId, Peer>,
    dead: FxHashMap<HostId, Time>,
    delivered: FxHashSet<(OpId, Key)>,
    delivered_order: VecDeque<(Time, OpId, Key)>,
    timers: BinaryHeap<Reverse<(Time, Timer)>>,
    tick_at: Option<Time>,
    outbox: VecDeque<Transmit<C>>,
    loopback: VecDeque<Message<C>>,
    events: VecDeque<Event<C>>,
    stats: HostStats,
    /// Joined nodes that gained a top level: (key, level to explore next).
    grown: Vec<(Key, usize)>,
    /// Forwarded searches awaiting `SearchAck`.
    search_fwds: FxHashMap<u64, SearchFwd<C>>,
    /// Hosts that failed to acknowledge a search recently: routing avoids them until they
    /// speak again (links are not changed for that; the failure detector decides).
    avoid: FxHashMap<HostId, Time>,
    /// Hosts recently seen as neighbours (most recent first): other ways into the network
    /// if our own links are lost.
    recent: VecDeque<HostRef<C>>,
    /// Joined nodes that lost top levels: (key, new height), to look again soon.
    regrow: Vec<(Key, usize)>,
}

fn closer(a: &Key, b: &Key, me: &Key) -> bool {
    // True if `a` lies strictly between `me` and `b` (a and b on the same side of me).
    if b > me {
        a > me && a < b
    } else {
        a < me && a > b
    }
}

fn level_u8(level: usize) -> u8 {
    u8::try_from(level).expect("levels are bounded by level_max <= 64")
}

impl<C: Contact> AlmHost<C> {
    /// A host with identity `host`, reachable at `contact`. `seed` drives membership
    /// vectors and timer jitter.
    ///
    /// # Panics
    /// If `config.level_max` is 0 or above 64.
    #[must_use]
    pub fn new(host: HostId, contact: C, config: Config, seed: u64) -> AlmHost<C> {
        assert!(
            config.level_max > 0 && config.level_max <= 64,
            "level_max must be in 1..=64"
        );
        AlmHost {
            config,
            me: HostRef { host, contact },
            rng: Rng::new(seed ^ host.0.rotate_left(17)),
            nodes: BTreeMap::new(),
            next_id: 1,
            reqs: FxHashMap::default(),
            searches: FxHashMap::default(),
            forwards: FxHashMap::default(),
            peers: FxHashMap::default(),
            dead: FxHashMap::default(),
            delivered: FxHashSet::default(),
            delivered_order: VecDeque::new(),
            timers: BinaryHeap::new(),
            tick_at: None,
            outbox: VecDeque::new(),
            loopback: VecDeque::new(),
            events: VecDeque::new(),
            stats: HostStats::default(),
            grown: Vec::new(),
            search_fwds: FxHashMap::default(),
            avoid: FxHashMap::default(),
            recent: VecDeque::new(),
            regrow: Vec::new(),
        }
    }

    /// This host.
    #[must_use]
    pub fn host_ref(&self) -> &HostRef<C> {
        &self.me
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> &HostStats {
        &self.stats
    }

    /// The keys this host holds (joined or joining).
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.nodes.keys()
    }

    /// A view of one node.
    #[must_use]
    pub fn node(&self, key: &Key) -> Option<NodeView<'_, C>> {
        self.nodes.get(key).map(|n| NodeView {
            me: &n.me,
            levels: &n.levels,
            joined: n.join.is_none(),
        })
    }

    /// Debugging: the (level, side) pairs of `key` with a fill running, and whether each
    /// is parked.
    #[doc(hidden)]
    pub fn debug_fills(&self, key: &Key) -> Vec<(usize, Side, bool, u32)> {
        self.nodes.get(key).map_or_else(Vec::new, |n| {
            n.fills
                .iter()
                .map(|(l, s, id)| {
                    let p = self.reqs.get(id);
                    (
                        *l,
                        *s,
                        p.is_some_and(|p| p.parked),
                        p.map_or(999, |p| p.attempts),
                    )
                })
                .collect()
        })
    }

    /// Debugging: recently seen hosts.
    #[doc(hidden)]
    pub fn debug_recent(&self) -> Vec<HostId> {
        self.recent.iter().map(|r| r.host).collect()
    }

    /// Debugging: each running fill of `key`, described.
    #[doc(hidden)]
    pub fn debug_fill_targets(&self, key: &Key) -> Vec<String> {
        self.nodes.get(key).map_or_else(Vec::new, |n| {
            n.fills
                .iter()
                .map(|(l, s, id)| match self.reqs.get(id) {
                    Some(p) => format!(
                        "{l}{s:?}->{:?} {} r{} a{} b{} park{}",
                        p.target.as_ref().map(|t| t.host.0),
                        p.body.as_ref().map_or("-", Body::kind),
                        p.redirects,
                        p.attempts,
                        p.beyond,
                        p.parked
                    ),
                    None => format!("{l}{s:?} no request"),
                })
                .collect()
        })
    }

    /// Debugging: hosts currently believed dead.
    #[doc(hidden)]
    pub fn debug_dead(&self) -> Vec<HostId> {
        let mut v: Vec<HostId> = self.dead.keys().copied().collect();
        v.sort();
        v
    }

    /// Number of operations (searches, joins) in flight.
    #[must_use]
    pub fn ops_in_flight(&self) -> usize {
        self.searches.len()
    }

    /// Rough bytes of memory held by this host's state (for measurements).
    #[must_use]
    pub fn memory_bytes_estimate(&self) -> usize {
        let ref_size = std::mem::size_of::<Option<NodeRef<C>>>();
        let mut total = std::mem::size_of::<Self>();
        for (k, n) in &self.nodes {
            total += std::mem::size_of::<Node<C>>() + 64 + k.len() + 16;
            total += n.levels.capacity() * 2 * ref_size;
            total += n.fills.capacity() * std::mem::size_of::<(usize, Side, u64)>();
        }
        total += self.peers.capacity() * (std::mem::size_of::<(HostId, Peer)>() + 1);
        total += self.reqs.capacity() * (std::mem::size_of::<(u64, PendingReq<C>)>() + 1);
        total += self.forwards.capacity() * (std::mem::size_of::<(u64, Forward<C>)>() + 1);
        total += self.timers.capacity() * std::mem::size_of::<(Time, Timer)>();
        total += self.delivered.capacity() * (std::mem::size_of::<(OpId, Key)>() + 1);
        total += self.search_fwds.capacity() * (std::mem::size_of::<(u64, SearchFwd<C>)>() + 1);
        total += self.avoid.capacity() * (std::mem::size_of::<(HostId, Time)>() + 1);
        total += self.recent.capacity() * std::mem::size_of::<HostRef<C>>();
        total
    }

    // ------------------------------------------------------------------ outputs

    /// The next message to send.
    pub fn poll_send(&mut self) -> Option<Transmit<C>> {
        self.outbox.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event<C>> {
        self.events.pop_front()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&mut self) -> Option<Time> {
        while let Some(Reverse((at, timer))) = self.timers.peek() {
            if self.timer_live(*at, timer) {
                return Some(*at);
            }
            self.timers.pop();
        }
        None
    }

    fn timer_live(&self, at: Time, timer: &Timer) -> bool {
        match timer {
            Timer::Tick => self.tick_at == Some(at),
            Timer::Req(id) => self.reqs.get(id).is_some_and(|r| r.deadline == at),
            Timer::Fwd(id) => self.forwards.get(id).is_some_and(|f| f.deadline == at),
            Timer::Search(id) => self.searches.get(id).is_some_and(|s| s.deadline == at),
            Timer::SearchFwd(id) => self.search_fwds.get(id).is_some_and(|s| s.deadline == at),
            Timer::Ping(h, nonce) => self
                .peers
                .get(h)
                .is_some_and(|p| p.ping.is_some_and(|(n, _)| n == *nonce)),
            Timer::Regrow(k, level) => self
                .nodes
                .get(k)
                .is_some_and(|n| n.join.is_none() && n.levels.len() == *level),
            Timer::Recheck(k, level, side) => self.nodes.get(k).is_some_and(|n| {
                n.join.is_none() && *level <= n.levels.len() && n.nbr(*level, *side).is_none()
            }),
        }
    }

    fn event(&mut self, e: Event<C>) {
        if self.events.len() >= self.config.events_queued_max {
            self.stats.events_dropped += 1;
        } else {
            self.events.push_back(e);
        }
    }

    fn send(&mut self, to: HostRef<C>, body: Body<C>) {
        let msg = Message {
            from: self.me.clone(),
            body,
        };
        if to.host == self.me.host {
            self.loopback.push_back(msg);
            return;
        }
        if self.outbox.len() >= self.config.sends_queued_max {
            self.stats.sends_dropped += 1;
            return;
        }
        self.stats.sends += 1;
        self.outbox.push_back(Transmit { to, msg });
    }

    fn host_of(r: &NodeRef<C>) -> HostRef<C> {
        HostRef {
            host: r.host,
            contact: r.contact.clone(),
        }
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn is_dead(&self, host: HostId) -> bool {
        self.dead.contains_key(&host)
    }

    fn live(&self, r: &NodeRef<C>) -> bool {
        !self.dead.contains_key(&r.host)
    }

    fn ensure_tick(&mut self, now: Time) {
        if self.tick_at.is_none() {
            let at = now.plus_micros(1 + self.rng.below(self.config.ping_interval_us.max(1)));
            self.tick_at = Some(at);
            self.timers.push(Reverse((at, Timer::Tick)));
        }
    }

    fn check_send_room(&self) -> Result<(), AlmError> {
        if self.outbox.len() >= self.config.sends_queued_max {
            return Err(AlmError::SendQueueFull {
                max: self.config.sends_queued_max,
            });
        }
        Ok(())
    }

    fn check_key(&self, key: &Key) -> Result<(), AlmError> {
        if key.len() > self.config.key_bytes_max {
            return Err(AlmError::KeyTooLong {
                len: key.len(),
                max: self.config.key_bytes_max,
            });
        }
        Ok(())
    }

    // ------------------------------------------------------------------ operations

    /// Insert `key` held by this host. If the host already holds a key, the join starts from
    /// it; otherwise through `introducer`; with neither, the key starts a new network.
    /// Completion is reported as `Event::Inserted` (or `InsertFailed`).
    pub fn insert_key(
        &mut self,
        now: Time,
        key: Key,
        introducer: Option<HostRef<C>>,
    ) -> Result<(), AlmError> {
        self.check_key(&key)?;
        self.check_send_room()?;
        if self.nodes.contains_key(&key) {
            return Err(AlmError::KeyHeld(key));
        }
        if self.nodes.len() >= self.config.keys_per_host_max {
            return Err(AlmError::TooManyKeys {
                max: self.config.keys_per_host_max,
            });
        }
        if let Some(i) = &introducer
            && i.contact.size_bytes() > self.config.contact_bytes_max
        {
            return Err(AlmError::ContactTooLarge {
                len: i.contact.size_bytes(),
                max: self.config.contact_bytes_max,
            });
        }
        let start = self.nodes.keys().next().cloned();
        if (start.is_some() || introducer.is_some())
            && self.searches.len() >= self.config.ops_in_flight_max
        {
            return Err(AlmError::TooManyOps {
                max: self.config.ops_in_flight_max,
            });
        }
        if let Some(i) = &introducer
            && i.host != self.me.host
        {
            // A way (back) into the network if everything else is lost.
            self.note_recent(i);
        }
        let mv = MembershipVector(self.rng.next_u64());
        let jitter = self.rng.below(self.config.stabilize_interval_us.max(1));
        let node = Node {
            me: NodeRef {
                key: key.clone(),
                mv,
                host: self.me.host,
                contact: self.me.contact.clone(),
            },
            levels: Vec::new(),
            fills: Vec::new(),
            join: None,
            next_stabilize: now.plus_micros(self.config.stabilize_interval_us + jitter),
            hints: Vec::new(),
            lost0: [false; 2],
            repairing: Vec::new(),
        };
        self.nodes.insert(key.clone(), node);
        self.ensure_tick(now);
        if start.is_none() && introducer.is_none() {
            self.event(Event::Inserted { key });
            return Ok(());
        }
        let seq = self.new_id();
        if let Some(n) = self.nodes.get_mut(&key) {
            n.join = Some(Join {
                level: 0,
                search: Some(seq),
                tried_right: false,
                searches: 1,
            });
        }
        self.searches.insert(
            seq,
            PendingSearch {
                target: key.clone(),
                attempt: 0,
                deadline: Time::ZERO,
                purpose: SearchPurpose::Join(key.clone()),
                via: introducer,
            },
        );
        self.search_attempt(now, seq);
        self.drain_loopback(now);
        Ok(())
    }

    /// Simulation support: hold `key` as a joined node without any link (the simulator's
    /// bulk loader sets the links). Returns its membership vector.
    #[doc(hidden)]
    pub fn bulk_insert_joined(&mut self, now: Time, key: Key) -> MembershipVector {
        let mv = MembershipVector(self.rng.next_u64());
        let jitter = self.rng.below(self.config.stabilize_interval_us.max(1));
        self.nodes.insert(
            key.clone(),
            Node {
                me: NodeRef {
                    key,
                    mv,
                    host: self.me.host,
                    contact: self.me.contact.clone(),
                },
                levels: Vec::new(),
                fills: Vec::new(),
                join: None,
                next_stabilize: now.plus_micros(self.config.stabilize_interval_us + jitter),
                hints: Vec::new(),
                lost0: [false; 2],
                repairing: Vec::new(),
            },
        );
        self.ensure_tick(now);
        mv
    }

    /// Simulation support: set the neighbour lists of `key` (see `bulk_insert_joined`).
    #[doc(hidden)]
    pub fn bulk_set_links(&mut self, key: &Key, levels: Vec<[Option<NodeRef<C>>; 2]>) {
        if let Some(n) = self.nodes.get_mut(key) {
            n.levels = levels;
        }
    }

    /// Remove `key` gracefully: its neighbours at every level are told to link past it.
    pub fn remove_key(&mut self, now: Time, key: &Key) -> Result<(), AlmError> {
        let Some(node) = self.nodes.remove(key) else {
            return Err(AlmError::NoSuchKey(key.clone()));
        };
        for (level, pair) in node.levels.iter().enumerate() {
            for side in [Side::Left, Side::Right] {
                if let Some(n) = &pair[side.index()] {
                    let replacement = pair[side.opposite().index()].clone();
                    self.send(
                        Self::host_of(n),
                        Body::Leave {
                            to: n.key.clone(),
                            level: level_u8(level),
                            leaving: key.clone(),
                            replacement,
                        },
                    );
                }
            }
        }
        for (_, _, req) in &node.fills {
            self.reqs.remove(req);
        }
        if let Some(j) = &node.join {
            if let Some(s) = j.search {
                self.searches.remove(&s);
            }
            self.event(Event::InsertFailed {
                key: key.clone(),
                error: OpError::Cancelled,
            });
        } else {
            self.event(Event::Removed { key: key.clone() });
        }
        self.drain_loopback(now);
        Ok(())
    }

    /// Leave the network: remove every key.
    pub fn leave(&mut self, now: Time) {
        let keys: Vec<Key> = self.nodes.keys().cloned().collect();
        for k in keys {
            let _ = self.remove_key(now, &k);
        }
    }

    /// Join `key` again through `introducer` (after `Event::Isolated`): the key keeps its
    /// place in the operation of this host, its links are rebuilt.
    pub fn rejoin(&mut self, now: Time, key: &Key, introducer: HostRef<C>) -> Result<(), AlmError> {
        let Some(node) = self.nodes.remove(key) else {
            return Err(AlmError::NoSuchKey(key.clone()));
        };
        for (_, _, req) in &node.fills {
            self.reqs.remove(req);
        }
        self.insert_key(now, key.clone(), Some(introducer))
    }

    /// Search for the node holding `target` (or the nearest one). Reported as
    /// `Event::SearchDone` / `SearchFailed` with the returned id.
    pub fn search(&mut self, now: Time, target: Key) -> Result<OpId, AlmError> {
        self.check_key(&target)?;
        self.check_send_room()?;
        if self.nodes.values().all(|n| n.join.is_some()) {
            return Err(AlmError::NotJoined);
        }
        if self.searches.len() >= self.config.ops_in_flight_max {
            return Err(AlmError::TooManyOps {
                max: self.config.ops_in_flight_max,
            });
        }
        let seq = self.new_id();
        self.searches.insert(
            seq,
            PendingSearch {
                target,
                attempt: 0,
                deadline: Time::ZERO,
                purpose: SearchPurpose::User,
                via: None,
            },
        );
        self.search_attempt(now, seq);
        self.drain_loopback(now);
        Ok(OpId {
            origin: self.me.host,
            seq,
        })
    }

    /// Deliver `payload` to every key in `range`, exactly once each. Deliveries are
    /// reported by the receiving hosts as `Event::Delivered`.
    pub fn multicast(
        &mut self,
        now: Time,
        range: KeyRange,
        payload: Bytes,
    ) -> Result<OpId, AlmError> {
        if payload.len() > self.config.payload_bytes_max {
            return Err(AlmError::PayloadTooLarge {
                len: payload.len(),
                max: self.config.payload_bytes_max,
            });
        }
        if range.size_bytes() > 2 * self.config.key_bytes_max {
            return Err(AlmError::KeyTooLong {
                len: range.size_bytes(),
                max: 2 * self.config.key_bytes_max,
            });
        }
        if range.is_empty_interval() {
            return Err(AlmError::EmptyRange);
        }
        self.check_send_room()?;
        if self.forwards.len() >= self.config.forwards_in_flight_max {
            return Err(AlmError::TooManyForwards {
                max: self.config.forwards_in_flight_max,
            });
        }
        // Start from a joined local key inside the range if there is one, else any.
        let start = self
            .nodes
            .iter()
            .filter(|(_, n)| n.join.is_none())
            .find(|(k, _)| range.contains(k))
            .or_else(|| self.nodes.iter().find(|(_, n)| n.join.is_none()))
            .map(|(k, _)| k.clone());
        let Some(start) = start else {
            return Err(AlmError::NotJoined);
        };
        let op = OpId {
            origin: self.me.host,
            seq: self.new_id(),
        };
        let origin = self.me.clone();
        self.multicast_at(now, &start, op, origin, range, payload, 0);
        self.drain_loopback(now);
        Ok(op)
    }

    /// Tell the core that `host` is unreachable (e.g. the transport failed to dial it).
    pub fn handle_unreachable(&mut self, now: Time, host: HostId) {
        self.declare_dead(now, host);
        self.drain_loopback(now);
    }

    // ------------------------------------------------------------------ inputs

    /// Handle a message from `from`.
    pub fn handle_message(
        &mut self,
        now: Time,
        from: HostId,
        msg: Message<C>,
    ) -> Result<(), AlmError> {
        if msg.from.host != from {
            self.stats.invalid_messages += 1;
            return Err(AlmError::InvalidMessage {
                from,
                reason: format!("claims to be from {}", msg.from.host),
            });
        }
        if from == self.me.host {
            self.stats.invalid_messages += 1;
            return Err(AlmError::InvalidMessage {
                from,
                reason: "claims to be from this host".into(),
            });
        }
        if let Err(reason) = msg.validate(&self.config) {
            self.stats.invalid_messages += 1;
            return Err(AlmError::InvalidMessage { from, reason });
        }
        self.dispatch(now, msg);
        self.drain_loopback(now);
        Ok(())
    }

    /// Handle timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, timer))) = self.timers.pop() else {
                break;
            };
            if !self.timer_live(at, &timer) {
                continue;
            }
            match timer {
                Timer::Tick => self.on_tick(now),
                Timer::Req(id) => self.on_req_timeout(now, id),
                Timer::Fwd(id) => self.on_fwd_timeout(now, id),
                Timer::Search(id) => self.on_search_timeout(now, id),
                Timer::SearchFwd(id) => {
                    if let Some(f) = self.search_fwds.remove(&id) {
                        // The next hop is silent: avoid it, have it pinged, and route on
                        // from here.
                        self.avoid.insert(f.next, now);
                        let contact = self.nodes.values().find_map(|n| {
                            n.levels
                                .iter()
                                .flat_map(|p| p.iter().flatten())
                                .find(|r| r.host == f.next)
                                .map(|r| r.contact.clone())
                        });
                        if let Some(contact) = contact {
                            self.suspect(
                                now,
                                HostRef {
                                    host: f.next,
                                    contact,
                                },
                            );
                        }
                        self.route_search_avoiding(
                            now,
                            &f.at,
                            f.op,
                            f.attempt,
                            f.target,
                            f.origin,
                            f.hops,
                            f.reroutes + 1,
                        );
                    }
                }
                Timer::Ping(host, nonce) => self.on_ping_timeout(now, host, nonce),
                Timer::Recheck(key, level, side) => {
                    self.start_fill(now, &key, level, side, FillStart::Walk);
                }
                Timer::Regrow(key, level) => {
                    self.start_fill(now, &key, level, Side::Left, FillStart::Walk);
                    self.start_fill(now, &key, level, Side::Right, FillStart::Walk);
                }
            }
            self.drain_loopback(now);
        }
    }

    fn drain_loopback(&mut self, now: Time) {
        let mut budget = 100_000u32;
        loop {
            while let Some((key, level)) = self.regrow.pop() {
                let at = now.plus_micros(self.config.retry_delay_us * 8);
                self.timers.push(Reverse((at, Timer::Regrow(key, level))));
            }
            while let Some((key, level)) = self.grown.pop() {
                if self
                    .nodes
                    .get(&key)
                    .is_some_and(|n| n.levels.len() == level)
                {
                    self.start_fill(now, &key, level, Side::Left, FillStart::Walk);
                    self.start_fill(now, &key, level, Side::Right, FillStart::Walk);
                }
            }
            let Some(msg) = self.loopback.pop_front() else {
                break;
            };
            budget -= 1;
            assert!(budget > 0, "loopback message storm on {}", self.me.host);
            self.dispatch(now, msg);
        }
    }

    fn dispatch(&mut self, now: Time, msg: Message<C>) {
        let from = msg.from;
        if from.host != self.me.host {
            // It speaks: it is not dead after all; and it is a way into the network.
            self.dead.remove(&from.host);
            self.avoid.remove(&from.host);
            self.note_recent(&from);
            if let Some(p) = self.peers.get_mut(&from.host) {
                p.last_heard = now;
            }
        }
        match msg.body {
            Body::Ping { nonce } => self.send(from, Body::Pong { nonce }),
            Body::Pong { nonce } => {
                if let Some(p) = self.peers.get_mut(&from.host)
                    && p.ping.is_some_and(|(n, _)| n == nonce)
                {
                    p.ping = None;
                }
            }
            Body::Search {
                op,
                attempt,
                target,
                origin,
                to,
                hops,
                fwd,
            } => {
                if fwd != 0 {
                    self.send(from.clone(), Body::SearchAck { fwd });
                }
                self.on_search(now, &from, to, op, attempt, target, origin, hops);
            }
            Body::SearchAck { fwd } => {
                if self
                    .search_fwds
                    .get(&fwd)
                    .is_some_and(|f| f.next == from.host)
                {
                    self.search_fwds.remove(&fwd);
                }
            }
            Body::SearchReply {
                op,
                attempt,
                found,
                exact,
                next,
                hops,
            } => self.on_search_reply(now, op, attempt, found, exact, next, hops),
            Body::LinkRequest {
                req,
                to,
                level,
                node,
            } => self.on_link_request(now, &from, req, &to, usize::from(level), node),
            Body::Walk {
                req,
                to,
                level,
                side,
                node,
                hops,
            } => self.on_walk(now, &from, req, &to, usize::from(level), side, node, hops),
            Body::LinkAccept {
                req,
                to,
                level,
                by,
                old,
            } => self.on_link_accept(now, req, &to, usize::from(level), by, old),
            Body::LinkRedirect {
                req,
                to,
                level,
                by,
                next,
            } => self.on_link_redirect(now, req, &to, usize::from(level), &by, next),
            Body::LinkReject {
                req,
                to,
                key,
                reason,
            } => self.on_link_reject(now, &from, req, &to, &key, reason),
            Body::WalkEnd { req, to } => self.on_walk_end(now, req, &to),
            Body::Leave {
                to,
                level,
                leaving,
                replacement,
            } => self.on_leave(now, &from, &to, usize::from(level), &leaving, replacement),
            Body::Multicast {
                fwd,
                to,
                op,
                origin,
                range,
                payload,
                hops,
            } => {
                if !self.nodes.contains_key(&to) {
                    self.send(
                        from,
                        Body::MulticastAck {
                            fwd,
                            status: AckStatus::NoSuchKey,
                        },
                    );
                    return;
                }
                self.send(
                    from,
                    Body::MulticastAck {
                        fwd,
                        status: AckStatus::Taken,
                    },
                );
                self.multicast_at(now, &to, op, origin, range, payload, hops);
            }
            Body::MulticastAck { fwd, status } => self.on_multicast_ack(now, &from, fwd, status),
            Body::MulticastEmpty { op } => {
                if op.origin == self.me.host {
                    self.event(Event::MulticastEmpty { op });
                }
            }
            Body::Gone { key } => self.purge(now, |r| r.host == from.host && r.key == key),
            Body::Beyond {
                req,
                to,
                side,
                node,
            } => self.on_beyond(&from, req, &to, side, node),
            Body::Hint { to, level, node } => {
                if !self.nodes.contains_key(&to) {
                    self.send(from, Body::Gone { key: to });
                    return;
                }
                let level = usize::from(level);
                if let Some(side) = Side::of(&node.key, &to) {
                    self.offer(now, &to, level, side, node);
                }
            }
        }
    }

    // ------------------------------------------------------------------ search

    fn search_attempt(&mut self, now: Time, seq: u64) {
        let Some(s) = self.searches.get_mut(&seq) else {
            return;
        };
        let introducer = s.via.clone();
        s.attempt += 1;
        // Attempt k waits 4k request timeouts: later attempts leave time for repairs.
        let deadline = now.plus_micros(self.config.request_timeout_us * 4 * u64::from(s.attempt));
        s.deadline = deadline;
        let attempt = s.attempt;
        let target = s.target.clone();
        let joining = match &s.purpose {
            SearchPurpose::Join(k) | SearchPurpose::Probe(k, _, _) => Some(k.clone()),
            SearchPurpose::User => None,
        };
        self.timers.push(Reverse((deadline, Timer::Search(seq))));
        let op = OpId {
            origin: self.me.host,
            seq,
        };
        // Start from the joined local key nearest the target without passing it.
        let below = self
            .nodes
            .range(..=target.clone())
            .rev()
            .find(|(k, n)| n.join.is_none() && Some(*k) != joining.as_ref())
            .map(|(k, _)| k.clone());
        let start = below.or_else(|| {
            self.nodes
                .range(target.clone()..)
                .find(|(k, n)| n.join.is_none() && Some(*k) != joining.as_ref())
                .map(|(k, _)| k.clone())
        });
        let origin = self.me.clone();
        match (start, introducer) {
            // A remote start is given on purpose (closer to the target) on the first try.
            (_, Some(intro)) if attempt == 1 => self.send(
                intro,
                Body::Search {
                    op,
                    attempt,
                    target,
                    origin,
                    to: None,
                    hops: 0,
                    fwd: 0,
                },
            ),
            (Some(k), _) => self.route_search(now, &k, op, attempt, target, origin, 0),
            (None, Some(intro)) => self.send(
                intro,
                Body::Search {
                    op,
                    attempt,
                    target,
                    origin,
                    to: None,
                    hops: 0,
                    fwd: 0,
                },
            ),
            (None, None) => {
                // Joining with no local key and no introducer: retry needs an introducer we
                // no longer have; let the timeout report the failure.
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_search(
        &mut self,
        now: Time,
        from: &HostRef<C>,
        to: Option<Key>,
        op: OpId,
        attempt: u32,
        target: Key,
        origin: HostRef<C>,
        hops: u32,
    ) {
        let at = match to {
            // A node still joining routes with what it has linked so far.
            Some(k) if self.nodes.contains_key(&k) => Some(k),
            other => {
                if let Some(k) = other {
                    self.send(from.clone(), Body::Gone { key: k });
                }
                // Continue from the joined local key nearest the target.
                let below = self
                    .nodes
                    .range(..=target.clone())
                    .rev()
                    .find(|(_, n)| n.join.is_none())
                    .map(|(k, _)| k.clone());
                below.or_else(|| {
                    self.nodes
                        .range(target.clone()..)
                        .find(|(_, n)| n.join.is_none())
                        .map(|(k, _)| k.clone())
                })
            }
        };
        if let Some(k) = at {
            self.route_search(now, &k, op, attempt, target, origin, hops);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn route_search(
        &mut self,
        now: Time,
        at: &Key,
        op: OpId,
        attempt: u32,
        target: Key,
        origin: HostRef<C>,
        hops: u32,
    ) {
        self.route_search_avoiding(now, at, op, attempt, target, origin, hops, 0);
    }

    /// `route_search`, `reroutes` times already routed around a silent next hop.
    #[allow(clippy::too_many_arguments)]
    fn route_search_avoiding(
        &mut self,
        now: Time,
        at: &Key,
        op: OpId,
        attempt: u32,
        target: Key,
        origin: HostRef<C>,
        hops: u32,
        reroutes: u32,
    ) {
        let Some(node) = self.nodes.get(at) else {
            return;
        };
        let usable = |r: &NodeRef<C>, avoid_silent: bool| {
            // Never route to the searcher's own node for its own key: a joining or
            // repairing node looks for its place, not for itself (stale references to it
            // elsewhere would otherwise lead the search back).
            let own = r.host == origin.host && r.key == target;
            self.live(r) && !own && !(avoid_silent && self.avoid.contains_key(&r.host))
        };
        let pick = |avoid_silent: bool| match Side::of(&target, &node.me.key) {
            None => None,
            Some(side) if hops < self.config.hops_max => (0..node.levels.len())
                .rev()
                .filter_map(|l| node.nbr(l, side))
                .find(|r| {
                    usable(r, avoid_silent)
                        && match side {
                            Side::Right => r.key <= target,
                            Side::Left => r.key >= target,
                        }
                })
                .cloned(),
            Some(_) => None,
        };
        // Prefer hosts that answered; fall back to a silent one rather than answering
        // with a wrong node.
        let next = pick(true).or_else(|| pick(false));
        match next {
            Some(r) => {
                let mut fwd = 0;
                if r.host != self.me.host
                    && reroutes <= self.config.attempts_max
                    && self.search_fwds.len() < self.config.forwards_in_flight_max
                {
                    fwd = self.new_id();
                    let deadline = now.plus_micros(self.config.request_timeout_us);
                    self.search_fwds.insert(
                        fwd,
                        SearchFwd {
                            at: at.clone(),
                            op,
                            attempt,
                            target: target.clone(),
                            origin: origin.clone(),
                            hops,
                            next: r.host,
                            deadline,
                            reroutes,
                        },
                    );
                    self.timers.push(Reverse((deadline, Timer::SearchFwd(fwd))));
                }
                self.send(
                    Self::host_of(&r),
                    Body::Search {
                        op,
                        attempt,
                        target,
                        origin,
                        to: Some(r.key.clone()),
                        hops: hops + 1,
                        fwd,
                    },
                );
            }
            None => {
                let found = node.me.clone();
                let exact = found.key == target;
                let next = Side::of(&target, &found.key)
                    .and_then(|s| node.nbr(0, s))
                    .cloned();
                self.send(
                    origin,
                    Body::SearchReply {
                        op,
                        attempt,
                        found,
                        exact,
                        next,
                        hops,
                    },
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_search_reply(
        &mut self,
        now: Time,
        op: OpId,
        _attempt: u32,
        found: NodeRef<C>,
        exact: bool,
        next: Option<NodeRef<C>>,
        hops: u32,
    ) {
        if op.origin != self.me.host {
            return;
        }
        let Some(s) = self.searches.remove(&op.seq) else {
            return;
        };
        match s.purpose {
            SearchPurpose::User => {
                let exact = exact && found.key == s.target;
                self.event(Event::SearchDone {
                    op,
                    target: s.target,
                    found,
                    exact,
                    next: if exact { None } else { next },
                    hops,
                });
            }
            SearchPurpose::Probe(key, _, _) => {
                if self.nodes.get(&key).is_none_or(|n| n.join.is_some()) {
                    return;
                }
                for n in [Some(found), next].into_iter().flatten() {
                    if let Some(side) = Side::of(&n.key, &key) {
                        self.offer(now, &key, 0, side, n);
                    }
                }
            }
            SearchPurpose::Join(key) => {
                let Some(node) = self.nodes.get_mut(&key) else {
                    return;
                };
                if let Some(j) = &mut node.join {
                    j.search = None;
                }
                if found.key == key {
                    if found.host == self.me.host {
                        // Others have linked us meanwhile: carry on from what we have.
                        self.join_progress(now, &key);
                        return;
                    }
                    self.nodes.remove(&key);
                    self.event(Event::InsertFailed {
                        key,
                        error: OpError::KeyExists,
                    });
                    return;
                }
                let Some(side) = Side::of(&found.key, &key) else {
                    return;
                };
                self.start_fill(now, &key, 0, side, FillStart::Node(found));
            }
        }
    }

    /// Search again for the place of joining `key`, starting at `via` if given. Fails the
    /// join after `attempts_max` searches.
    fn join_research(&mut self, now: Time, key: &Key, via: Option<HostRef<C>>) {
        let seq = self.new_id();
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        let Some(join) = &mut node.join else {
            return;
        };
        if join.searches >= self.config.attempts_max * 4 {
            if let Some(node) = self.nodes.remove(key) {
                for (_, _, r) in node.fills {
                    self.reqs.remove(&r);
                }
            }
            self.event(Event::InsertFailed {
                key: key.clone(),
                error: OpError::Timeout,
            });
            return;
        }
        join.searches += 1;
        join.search = Some(seq);
        join.level = 0;
        self.searches.insert(
            seq,
            PendingSearch {
                target: key.clone(),
                attempt: 0,
                deadline: Time::ZERO,
                purpose: SearchPurpose::Join(key.clone()),
                via,
            },
        );
        self.search_attempt(now, seq);
    }

    fn on_search_timeout(&mut self, now: Time, seq: u64) {
        let Some(s) = self.searches.get(&seq) else {
            return;
        };
        if let SearchPurpose::Probe(key, side, tried) = &s.purpose {
            let (key, side, tried) = (key.clone(), *side, *tried);
            self.searches.remove(&seq);
            self.start_probe(now, &key, side, tried);
            return;
        }
        if s.attempt < self.config.attempts_max {
            let has_start = self.nodes.values().any(|n| n.join.is_none()) || s.via.is_some();
            if has_start {
                self.search_attempt(now, seq);
                return;
            }
        }
        let Some(s) = self.searches.remove(&seq) else {
            return;
        };
        let op = OpId {
            origin: self.me.host,
            seq,
        };
        match s.purpose {
            SearchPurpose::Probe(..) => {}
            SearchPurpose::User => self.event(Event::SearchFailed {
                op,
                target: s.target,
                error: OpError::Timeout,
            }),
            SearchPurpose::Join(key) => {
                if let Some(node) = self.nodes.remove(&key) {
                    for (_, _, r) in node.fills {
                        self.reqs.remove(&r);
                    }
                }
                self.event(Event::InsertFailed {
                    key,
                    error: OpError::Timeout,
                });
            }
        }
    }

    // ------------------------------------------------------------------ linking

    /// The closest live node on `side` of `key` known to share `level` bits with it.
    fn best_candidate(&self, node: &Node<C>, level: usize, side: Side) -> Option<NodeRef<C>> {
        self.best_candidate_below(node, level, side, usize::MAX)
    }

    /// Like `best_candidate`, looking only at neighbours at levels below `below`.
    fn best_candidate_below(
        &self,
        node: &Node<C>,
        level: usize,
        side: Side,
        below: usize,
    ) -> Option<NodeRef<C>> {
        let me = &node.me;
        let mut best: Option<&NodeRef<C>> = None;
        for pair in node.levels.iter().take(below) {
            if let Some(r) = &pair[side.index()]
                && r.key != me.key
                && Side::of(&r.key, &me.key) == Some(side)
                && r.mv.shares_level(me.mv, level)
                && self.live(r)
                && best.is_none_or(|b| closer(&r.key, &b.key, &me.key))
            {
                best = Some(r);
            }
        }
        best.cloned()
    }

    /// Find (or confirm) the neighbour of `key` at `level` on `side`, starting with a link
    /// request to `start` if given. Does nothing if such a fill is already running.
    fn start_fill(&mut self, now: Time, key: &Key, level: usize, side: Side, start: FillStart<C>) {
        let Some(node) = self.nodes.get(key) else {
            return;
        };
        if level >= self.config.level_max || node.fill(level, side).is_some() {
            return;
        }
        let id = self.new_id();
        let node = &self.nodes[key];
        let mut beyond_via: Option<NodeRef<C>> = None;
        let first = match start {
            FillStart::Node(s) => Some(s).filter(|s| self.live(s) && s.key != *key),
            FillStart::Candidate => self.best_candidate(node, level, side),
            FillStart::Walk => self.best_candidate_below(node, level, side, level),
        };
        // Level 0 with no known node on that side: ask the neighbour on the other side
        // whether it knows one beyond us (our side of the list may have split off).
        if first.is_none() && beyond_via.is_none() && level == 0 {
            beyond_via = node
                .nbr(0, side.opposite())
                .filter(|n| self.live(n))
                .cloned();
        }
        let beyond = beyond_via.is_some();
        let (to, body) = if let Some(via) = beyond_via {
            (
                Self::host_of(&via),
                Body::Beyond {
                    req: id,
                    to: via.key.clone(),
                    side,
                    node: node.me.clone(),
                },
            )
        } else if let Some(c) = first {
            (
                Self::host_of(&c),
                Body::LinkRequest {
                    req: id,
                    to: c.key.clone(),
                    level: level_u8(level),
                    node: node.me.clone(),
                },
            )
        } else if let Some(n) = level
            .checked_sub(1)
            .and_then(|l| node.nbr(l, side))
            .filter(|n| self.live(n))
        {
            (
                Self::host_of(n),
                Body::Walk {
                    req: id,
                    to: n.key.clone(),
                    level: level_u8(level - 1),
                    side,
                    node: node.me.clone(),
                    hops: 0,
                },
            )
        } else {
            // Nobody qualifies on that side: the neighbour is none.
            self.fill_resolved(now, key, level, side);
            return;
        };
        let deadline = now.plus_micros(self.config.request_timeout_us);
        self.reqs.insert(
            id,
            PendingReq {
                key: key.clone(),
                level,
                side,
                target: Some(to.clone()),
                body: Some(body.clone()),
                deadline,
                attempts: 1,
                redirects: 0,
                parked: false,
                redirect: None,
                beyond,
            },
        );
        if let Some(n) = self.nodes.get_mut(key) {
            n.fills.push((level, side, id));
        }
        self.timers.push(Reverse((deadline, Timer::Req(id))));
        self.send(to, body);
    }

    fn set_nbr(&mut self, key: &Key, level: usize, side: Side, value: Option<NodeRef<C>>) {
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        if level >= node.levels.len() {
            if value.is_none() {
                return;
            }
            node.levels.resize(level + 1, [None, None]);
            if node.join.is_none() {
                // A new top level: there may be nodes to link with above it too.
                self.grown.push((key.clone(), level + 1));
            }
        }
        let slot = &mut node.levels[level][side.index()];
        if *slot == value {
            return;
        }
        slot.clone_from(&value);
        if let Some(v) = &value
            && v.host != self.me.host
        {
            let h = Self::host_of(v);
            self.note_recent(&h);
        }
        if self.config.neighbour_events {
            self.event(Event::NeighbourChanged {
                key: key.clone(),
                level: level_u8(level),
                side,
                neighbour: value,
            });
        }
    }

    /// `cand` may be a closer neighbour of `key` at (level, side) than the current one: link
    /// to it now, or when the fill running there ends.
    fn offer(&mut self, now: Time, key: &Key, level: usize, side: Side, cand: NodeRef<C>) {
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        let me = &node.me;
        if level >= self.config.level_max
            || Side::of(&cand.key, &me.key) != Some(side)
            || !cand.mv.shares_level(me.mv, level)
            || self.dead.contains_key(&cand.host)
        {
            return;
        }
        if let Some(cur) = node.nbr(level, side)
            && (cur.key == cand.key || closer(&cur.key, &cand.key, &me.key))
            && !self.dead.contains_key(&cur.host)
        {
            // Our neighbour lies between us and `cand`: pass the news on towards `cand`
            // (each hop gets closer to it, so this ends). A hint naming our neighbour itself
            // means someone found it gone: check it.
            if cur.key == cand.key {
                if node.fill(level, side).is_none() {
                    self.start_fill(now, key, level, side, FillStart::Node(cand));
                }
            } else {
                let to = Self::host_of(cur);
                let body = Body::Hint {
                    to: cur.key.clone(),
                    level: level_u8(level),
                    node: cand,
                };
                self.send(to, body);
            }
            return;
        }
        if node.fill(level, side).is_some() {
            let me_key = node.me.key.clone();
            match node
                .hints
                .iter_mut()
                .find(|(l, s, _)| *l == level && *s == side)
            {
                Some(h) => {
                    if closer(&cand.key, &h.2.key, &me_key) {
                        h.2 = cand;
                    }
                }
                None => node.hints.push((level, side, cand)),
            }
            return;
        }
        self.start_fill(now, key, level, side, FillStart::Node(cand));
    }

    /// A fill at (level, side) of `key` is over: advance a join, or trim empty top levels.
    fn fill_resolved(&mut self, now: Time, key: &Key, level: usize, side: Side) {
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        node.remove_fill(level, side);
        if let Some(i) = node
            .hints
            .iter()
            .position(|(l, s, _)| *l == level && *s == side)
        {
            let (_, _, cand) = node.hints.swap_remove(i);
            self.offer(now, key, level, side, cand);
            if self
                .nodes
                .get(key)
                .is_some_and(|n| n.fill(level, side).is_some())
            {
                return;
            }
        }
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        if node.join.as_ref().is_some_and(|j| j.level == level) {
            self.join_progress(now, key);
            return;
        }
        if node.join.is_none() {
            if let Some(i) = node.repairing.iter().position(|r| *r == (level, side)) {
                node.repairing.swap_remove(i);
                if node.nbr(level, side).is_none() {
                    let at = now.plus_micros(self.config.retry_delay_us * 8);
                    self.timers
                        .push(Reverse((at, Timer::Recheck(key.clone(), level, side))));
                }
            }
            self.settle(now, key);
        }
    }

    /// After links of joined node `key` changed: probe for level-0 neighbours lost to
    /// failures that repair could not replace, and drop empty top levels.
    fn settle(&mut self, now: Time, key: &Key) {
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        let mut probes = Vec::new();
        for side in [Side::Left, Side::Right] {
            if node.lost0[side.index()]
                && node.nbr(0, side).is_none()
                && node.fill(0, side).is_none()
            {
                node.lost0[side.index()] = false;
                probes.push(side);
            }
        }
        let empty = (0..node.levels.len()).find(|&l| {
            node.levels[l].iter().all(Option::is_none)
                && node.fill(l, Side::Left).is_none()
                && node.fill(l, Side::Right).is_none()
        });
        if let Some(l) = empty {
            self.trim(key, l);
        }
        for side in probes {
            self.start_probe(now, key, side, 0);
        }
    }

    /// `key` is joined but may have no link at all: join it again through another local
    /// key if one is linked, else tell the caller.
    fn report_isolated(&mut self, now: Time, key: &Key) {
        let isolated = self.nodes.get(key).is_some_and(|n| {
            n.join.is_none()
                && n.levels.iter().all(|p| p.iter().all(Option::is_none))
                && n.fills.is_empty()
        });
        if !isolated {
            return;
        }
        let others = self
            .nodes
            .iter()
            .any(|(k, n)| k != key && n.join.is_none() && !n.levels.is_empty());
        if others {
            self.nodes.remove(key);
            let _ = self.insert_key(now, key.clone(), None);
        } else {
            self.event(Event::Isolated { key: key.clone() });
        }
    }

    fn note_recent(&mut self, h: &HostRef<C>) {
        if self.recent.front().is_some_and(|r| r.host == h.host) {
            return;
        }
        self.recent.retain(|r| r.host != h.host);
        self.recent.push_front(h.clone());
        self.recent.truncate(16);
    }

    /// Search for `key` (skipping itself) from host `via`, to find level 0 on `side`.
    fn start_probe_via(&mut self, now: Time, key: &Key, side: Side, via: HostRef<C>) {
        if self.searches.len() >= self.config.ops_in_flight_max {
            return;
        }
        let seq = self.new_id();
        self.searches.insert(
            seq,
            PendingSearch {
                target: key.clone(),
                attempt: 0,
                deadline: Time::ZERO,
                // Counted as the last contact tried: a timeout does not go on to others.
                purpose: SearchPurpose::Probe(key.clone(), side, usize::MAX - 1),
                via: Some(via),
            },
        );
        self.search_attempt(now, seq);
    }

    /// Search for `key` through the `tried`-th recently seen host (not through our own
    /// links, which may have split off with us), to find level 0 on `side` again.
    fn start_probe(&mut self, now: Time, key: &Key, side: Side, tried: usize) {
        if tried >= 4 || tried >= self.recent.len() {
            self.report_isolated(now, key);
            return;
        }
        let Some(via) = self
            .recent
            .iter()
            .filter(|r| !self.dead.contains_key(&r.host))
            .chain(
                self.recent
                    .iter()
                    .filter(|r| self.dead.contains_key(&r.host)),
            )
            .nth(tried)
            .cloned()
        else {
            return;
        };
        if self.searches.len() >= self.config.ops_in_flight_max {
            return;
        }
        let seq = self.new_id();
        self.searches.insert(
            seq,
            PendingSearch {
                target: key.clone(),
                attempt: 0,
                deadline: Time::ZERO,
                purpose: SearchPurpose::Probe(key.clone(), side, tried + 1),
                via: Some(via),
            },
        );
        self.search_attempt(now, seq);
    }

    /// If `key` is alone at `level` (no neighbour, no fill running), it is alone above too.
    fn trim(&mut self, key: &Key, level: usize) {
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        if level < node.levels.len()
            && node.levels[level].iter().all(Option::is_none)
            && node.fill(level, Side::Left).is_none()
            && node.fill(level, Side::Right).is_none()
        {
            let dropped: Vec<u64> = node
                .fills
                .iter()
                .filter(|(l, _, _)| *l >= level)
                .map(|f| f.2)
                .collect();
            node.fills.retain(|(l, _, _)| *l < level);
            let had = node.levels.len();
            node.levels.truncate(level);
            if node.join.is_none() && had > level && level > 0 {
                self.regrow.push((key.clone(), level));
            }
            for id in dropped {
                self.reqs.remove(&id);
            }
        }
    }

    fn join_progress(&mut self, now: Time, key: &Key) {
        let Some(node) = self.nodes.get_mut(key) else {
            return;
        };
        let Some((level, searching, tried_right)) = node
            .join
            .as_ref()
            .map(|j| (j.level, j.search.is_some(), j.tried_right))
        else {
            return;
        };
        if searching
            || node.fill(level, Side::Left).is_some()
            || node.fill(level, Side::Right).is_some()
        {
            return;
        }
        let left = node.nbr(level, Side::Left).is_some();
        let right = node.nbr(level, Side::Right).is_some();
        if level == 0 && !left && !right {
            // Nothing linked at level 0 although the network is not empty: look again.
            self.join_research(now, key, None);
            return;
        }
        if level > 0 && !left && !tried_right {
            if let Some(j) = &mut node.join {
                j.tried_right = true;
            }
            self.start_fill(now, key, level, Side::Right, FillStart::Walk);
            return;
        }
        if (!left && !right) || level + 1 >= self.config.level_max {
            node.join = None;
            node.levels
                .truncate(if left || right { level + 1 } else { level });
            self.event(Event::Inserted { key: key.clone() });
            self.settle(now, key);
            return;
        }
        if let Some(j) = &mut node.join {
            j.level = level + 1;
            j.tried_right = false;
        }
        self.start_fill(now, key, level + 1, Side::Left, FillStart::Walk);
    }

    fn on_link_request(
        &mut self,
        now: Time,
        from: &HostRef<C>,
        req: u64,
        to: &Key,
        level: usize,
        requester: NodeRef<C>,
    ) {
        let reply_to = Self::host_of(&requester);
        let reject = |reason| Body::LinkReject {
            req,
            to: requester.key.clone(),
            key: to.clone(),
            reason,
        };
        let Some(node) = self.nodes.get(to) else {
            let b = reject(RejectReason::NoSuchKey);
            self.send(reply_to, b);
            return;
        };
        let _ = from;
        let reason = if !requester.mv.shares_level(node.me.mv, level) {
            Some(RejectReason::PrefixMismatch)
        } else if requester.key == node.me.key {
            Some(RejectReason::SameKey)
        } else {
            None
        };
        if let Some(reason) = reason {
            let b = reject(reason);
            self.send(reply_to, b);
            return;
        }
        self.link_decide(now, to, req, level, requester);
    }

    /// `to` decides on a link request at `level` from `requester` (which shares the level).
    fn link_decide(&mut self, _now: Time, to: &Key, req: u64, level: usize, requester: NodeRef<C>) {
        let Some(node) = self.nodes.get(to) else {
            return;
        };
        let me = node.me.clone();
        let Some(side) = Side::of(&requester.key, &me.key) else {
            return;
        };
        let cur = node.nbr(level, side).cloned();
        let accept = match &cur {
            None => true,
            Some(c) => {
                c.key == requester.key || !self.live(c) || closer(&requester.key, &c.key, &me.key)
            }
        };
        let reply_to = Self::host_of(&requester);
        // A joining node does not know its right neighbour at levels it has not finished:
        // an accept would tell the requester "nobody was there". Requests from the right
        // wait; requests from the left are always answered (so waits cannot form a cycle).
        let unsettled = side == Side::Right && node.join.as_ref().is_some_and(|j| j.level <= level);
        if level > node.levels.len() || unsettled {
            // This node is not (yet) linked at the levels below: a half-joined node, or one
            // whose height a stabilisation round has still to raise. Ask to retry later.
            self.send(
                reply_to,
                Body::LinkReject {
                    req,
                    to: requester.key.clone(),
                    key: to.clone(),
                    reason: RejectReason::NotReady,
                },
            );
            return;
        }
        if accept {
            let old = cur.filter(|c| c.key != requester.key);
            self.set_nbr(to, level, side, Some(requester.clone()));
            self.send(
                reply_to,
                Body::LinkAccept {
                    req,
                    to: requester.key.clone(),
                    level: level_u8(level),
                    by: me,
                    old,
                },
            );
        } else if let Some(next) = cur {
            self.send(
                reply_to,
                Body::LinkRedirect {
                    req,
                    to: requester.key.clone(),
                    level: level_u8(level),
                    by: me,
                    next,
                },
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_walk(
        &mut self,
        now: Time,
        from: &HostRef<C>,
        req: u64,
        to: &Key,
        level: usize,
        side: Side,
        requester: NodeRef<C>,
        hops: u32,
    ) {
        let reply_to = Self::host_of(&requester);
        let Some(node) = self.nodes.get(to) else {
            // The node that forwarded the walk holds a stale reference: tell it, and have
            // the requester walk again once that is repaired.
            let reason = if from.host == requester.host {
                RejectReason::NoSuchKey
            } else {
                self.send(from.clone(), Body::Gone { key: to.clone() });
                RejectReason::NotReady
            };
            self.send(
                reply_to,
                Body::LinkReject {
                    req,
                    to: requester.key.clone(),
                    key: to.clone(),
                    reason,
                },
            );
            return;
        };
        if requester.key != node.me.key && requester.mv.shares_level(node.me.mv, level + 1) {
            self.link_decide(now, to, req, level + 1, requester);
            return;
        }
        // Not this one: walk on, past dead neighbours if need be.
        let next = if hops < self.config.hops_max {
            self.best_candidate(node, level, side)
        } else {
            None
        };
        let unsure = next.is_none()
            && (node.join.as_ref().is_some_and(|j| j.level <= level)
                || node.fill(level, side).is_some());
        if unsure {
            self.send(
                reply_to,
                Body::LinkReject {
                    req,
                    to: requester.key.clone(),
                    key: to.clone(),
                    reason: RejectReason::NotReady,
                },
            );
            return;
        }
        match next {
            Some(n) if n.key != requester.key => self.send(
                Self::host_of(&n),
                Body::Walk {
                    req,
                    to: n.key.clone(),
                    level: level_u8(level),
                    side,
                    node: requester,
                    hops: hops + 1,
                },
            ),
            _ => self.send(
                reply_to,
                Body::WalkEnd {
                    req,
                    to: requester.key.clone(),
                },
            ),
        }
    }

    fn on_beyond(
        &mut self,
        from: &HostRef<C>,
        req: u64,
        to: &Key,
        side: Side,
        requester: NodeRef<C>,
    ) {
        let Some(node) = self.nodes.get(to) else {
            self.send(
                from.clone(),
                Body::LinkReject {
                    req,
                    to: requester.key.clone(),
                    key: to.clone(),
                    reason: RejectReason::NoSuchKey,
                },
            );
            return;
        };
        // The closest live node we know strictly beyond the requester on `side`.
        let mut best: Option<&NodeRef<C>> = None;
        for pair in &node.levels {
            for r in pair.iter().flatten() {
                if Side::of(&r.key, &requester.key) == Some(side)
                    && self.live(r)
                    && best.is_none_or(|b| closer(&r.key, &b.key, &requester.key))
                {
                    best = Some(r);
                }
            }
        }
        let reply = match best {
            Some(next) => Body::LinkRedirect {
                req,
                to: requester.key.clone(),
                level: 0,
                by: node.me.clone(),
                next: next.clone(),
            },
            None => Body::WalkEnd {
                req,
                to: requester.key.clone(),
            },
        };
        self.send(Self::host_of(&requester), reply);
    }

    /// The pending request `req` of local node `to`, if it is still current.
    fn take_req(&mut self, req: u64, to: &Key) -> Option<PendingReq<C>> {
        if self.reqs.get(&req).is_some_and(|r| r.key == *to) {
            self.reqs.remove(&req)
        } else {
            None
        }
    }

    fn on_link_accept(
        &mut self,
        now: Time,
        req: u64,
        to: &Key,
        level: usize,
        by: NodeRef<C>,
        old: Option<NodeRef<C>>,
    ) {
        let Some(p) = self.take_req(req, to) else {
            return;
        };
        if p.level != level {
            self.fill_resolved(now, to, p.level, p.side);
            return;
        }
        let Some(node) = self.nodes.get(to) else {
            return;
        };
        let me = node.me.clone();
        let side = p.side;
        if Side::of(&by.key, &me.key) == Some(side) && by.mv.shares_level(me.mv, level) {
            let cur = node.nbr(level, side).cloned();
            let adopt = cur.as_ref().is_none_or(|c| {
                c.key == by.key || !self.live(c) || closer(&by.key, &c.key, &me.key)
            });
            if adopt {
                // The node we drop lies beyond `by`: tell `by` about it.
                if let Some(c) = cur
                    && c.key != by.key
                    && self.live(&c)
                {
                    self.send(
                        Self::host_of(&by),
                        Body::Hint {
                            to: by.key.clone(),
                            level: level_u8(level),
                            node: c,
                        },
                    );
                }
                self.set_nbr(to, level, side, Some(by));
            } else {
                // A closer neighbour is already known: it should link to `by`.
                self.offer(now, to, level, side, by);
            }
            // The accepting node's previous neighbour on our side now lies on our far side.
            if let Some(o) = old {
                self.offer(now, to, level, side.opposite(), o);
            }
        }
        self.fill_resolved(now, to, level, side);
    }

    fn on_link_redirect(
        &mut self,
        now: Time,
        req: u64,
        to: &Key,
        level: usize,
        by: &NodeRef<C>,
        next: NodeRef<C>,
    ) {
        let Some(p) = self.reqs.get(&req).filter(|r| r.key == *to) else {
            return;
        };
        let Some(node) = self.nodes.get(to) else {
            return;
        };
        let me = &node.me;
        let valid = p.level == level
            && Side::of(&next.key, &me.key) == Some(p.side)
            && (p.beyond || closer(&next.key, &by.key, &me.key))
            && next.mv.shares_level(me.mv, level);
        if !valid || p.redirects >= self.config.redirects_max {
            let (l, s) = (p.level, p.side);
            self.reqs.remove(&req);
            self.fill_resolved(now, to, l, s);
            return;
        }
        if !self.live(&next) {
            // The redirecting node has not noticed the death yet: try again later.
            self.park_req(now, req);
            return;
        }
        let joining0 = level == 0 && node.join.as_ref().is_some_and(|j| j.level == 0);
        if joining0 && p.redirects >= 8 {
            // Our search result is stale (many keys joined around it meanwhile): walking
            // the list one node at a time is slow, so search again from where we are.
            let (l, s) = (p.level, p.side);
            self.reqs.remove(&req);
            if let Some(n) = self.nodes.get_mut(to) {
                n.remove_fill(l, s);
            }
            self.join_research(now, to, Some(Self::host_of(&next)));
            return;
        }
        if node.join.is_none() && p.redirects >= 8 {
            // A long redirect chain walks the list one node at a time: far from our place.
            // Let the upper levels take us there instead: at level 0 a search for our own
            // key from `next`, above it a walk on the level below.
            let (l, s) = (p.level, p.side);
            self.reqs.remove(&req);
            if let Some(n) = self.nodes.get_mut(to) {
                n.remove_fill(l, s);
            }
            if l == 0 {
                self.start_probe_via(now, to, s, Self::host_of(&next));
            } else {
                self.start_fill(now, to, l, s, FillStart::Walk);
            }
            return;
        }
        let body = Body::LinkRequest {
            req,
            to: next.key.clone(),
            level: level_u8(level),
            node: me.clone(),
        };
        let deadline = now.plus_micros(self.config.request_timeout_us);
        let dest = Self::host_of(&next);
        if let Some(p) = self.reqs.get_mut(&req) {
            p.beyond = false;
            p.redirect = Some((by.clone(), next.clone()));
            p.redirects += 1;
            p.attempts = 1;
            p.parked = false;
            p.target = Some(dest.clone());
            p.body = Some(body.clone());
            p.deadline = deadline;
        }
        self.timers.push(Reverse((deadline, Timer::Req(req))));
        self.send(dest, body);
    }

    /// Wait `retry_delay_us`, then send the request again.
    fn park_req(&mut self, now: Time, req: u64) {
        let limit = self.config.attempts_max * 16;
        let Some(p) = self.reqs.get_mut(&req) else {
            return;
        };
        p.attempts += 1;
        if p.attempts > limit {
            let (k, l, s) = (p.key.clone(), p.level, p.side);
            self.reqs.remove(&req);
            self.fill_resolved(now, &k, l, s);
            return;
        }
        p.parked = true;
        p.deadline = now.plus_micros(self.config.retry_delay_us);
        let d = p.deadline;
        self.timers.push(Reverse((d, Timer::Req(req))));
    }

    fn on_link_reject(
        &mut self,
        now: Time,
        from: &HostRef<C>,
        req: u64,
        to: &Key,
        key: &Key,
        reason: RejectReason,
    ) {
        let Some(p) = self.take_req(req, to) else {
            return;
        };
        match reason {
            RejectReason::NoSuchKey => {
                // Forget the gone node. If another node sent us to it, have that node check
                // its reference. Then look again after a pause (the fill stays registered,
                // so the purge does not start a second one).
                let host = from.host;
                self.purge(now, |r| r.host == host && r.key == *key);
                let mut p = p;
                if let Some((by, next)) = p.redirect.take()
                    && next.key == *key
                {
                    self.send(
                        Self::host_of(&by),
                        Body::Hint {
                            to: by.key.clone(),
                            level: level_u8(p.level),
                            node: next,
                        },
                    );
                }
                p.target = None;
                p.body = None;
                self.reqs.insert(req, p);
                self.park_req(now, req);
            }
            RejectReason::SameKey => {
                if self.nodes.get(to).is_some_and(|n| n.join.is_some()) {
                    if let Some(node) = self.nodes.remove(to) {
                        for (_, _, r) in node.fills {
                            self.reqs.remove(&r);
                        }
                    }
                    self.event(Event::InsertFailed {
                        key: to.clone(),
                        error: OpError::KeyExists,
                    });
                } else {
                    self.fill_resolved(now, to, p.level, p.side);
                }
            }
            RejectReason::PrefixMismatch => self.fill_resolved(now, to, p.level, p.side),
            RejectReason::NotReady => {
                // Put the request back and retry it later from scratch.
                let id = req;
                self.reqs.insert(id, p);
                self.park_req(now, id);
            }
        }
    }

    fn on_walk_end(&mut self, now: Time, req: u64, to: &Key) {
        if let Some(p) = self.take_req(req, to) {
            let joined = self.nodes.get(to).is_some_and(|n| n.join.is_none());
            if p.beyond && joined {
                // Our neighbour knows nobody beyond us either: ask hosts elsewhere.
                let pick = self.rng.below(self.recent.len().max(1) as u64) as usize;
                self.start_probe(now, to, p.side, pick.min(3));
            }
            self.fill_resolved(now, to, p.level, p.side);
        }
    }

    fn on_req_timeout(&mut self, now: Time, id: u64) {
        let Some(p) = self.reqs.get_mut(&id) else {
            return;
        };
        if p.parked {
            p.parked = false;
            p.deadline = now.plus_micros(self.config.request_timeout_us);
            if let (Some(t), Some(b)) = (p.target.clone(), p.body.clone()) {
                let d = p.deadline;
                self.timers.push(Reverse((d, Timer::Req(id))));
                self.send(t, b);
                return;
            }
        }
        let Some(p) = self.reqs.get_mut(&id) else {
            return;
        };
        match (&p.target, &p.body) {
            (Some(target), Some(body)) if p.attempts < self.config.attempts_max => {
                p.attempts += 1;
                p.deadline = now.plus_micros(self.config.request_timeout_us);
                let (t, b, d) = (target.clone(), body.clone(), p.deadline);
                self.timers.push(Reverse((d, Timer::Req(id))));
                self.send(t, b);
            }
            (Some(target), _) => {
                // No answer: suspect the host (a ping round decides; declaring it dead
                // restarts this fill) and meanwhile try again later.
                let target = target.clone();
                self.suspect(now, target);
                self.park_req(now, id);
            }
            (None, _) => {
                // A parked fill: start over.
                let Some(p) = self.reqs.remove(&id) else {
                    return;
                };
                if let Some(n) = self.nodes.get_mut(&p.key) {
                    n.remove_fill(p.level, p.side);
                }
                let attempts = p.attempts;
                self.start_fill(now, &p.key, p.level, p.side, FillStart::Candidate);
                if let Some(nid) = self.nodes.get(&p.key).and_then(|n| n.fill(p.level, p.side))
                    && let Some(np) = self.reqs.get_mut(&nid)
                {
                    np.attempts = np.attempts.max(attempts);
                }
            }
        }
    }

    fn on_leave(
        &mut self,
        now: Time,
        from: &HostRef<C>,
        to: &Key,
        level: usize,
        leaving: &Key,
        replacement: Option<NodeRef<C>>,
    ) {
        let Some(node) = self.nodes.get(to) else {
            return;
        };
        let Some(side) = Side::of(leaving, to) else {
            return;
        };
        let is_it = node
            .nbr(level, side)
            .is_some_and(|c| c.key == *leaving && c.host == from.host);
        if !is_it {
            return;
        }
        let me = node.me.clone();
        let replacement = replacement.filter(|r| {
            Side::of(&r.key, &me.key) == Some(side)
                && r.mv.shares_level(me.mv, level)
                && r.key != *leaving
                && self.live(r)
        });
        self.set_nbr(to, level, side, replacement);
        if node_is_joined(self.nodes.get(to)) {
            self.trim(to, level);
        }
        let _ = now;
    }

    // ------------------------------------------------------------------ failures

    /// Drop every reference matching `pred` and repair the holes.
    fn purge(&mut self, now: Time, pred: impl Fn(&NodeRef<C>) -> bool) {
        let mut holes = Vec::new();
        for (k, node) in &mut self.nodes {
            for (l, pair) in node.levels.iter_mut().enumerate() {
                for side in [Side::Left, Side::Right] {
                    if pair[side.index()].as_ref().is_some_and(&pred) {
                        pair[side.index()] = None;
                        holes.push((k.clone(), l, side));
                        if l == 0 {
                            node.lost0[side.index()] = true;
                        }
                    }
                }
            }
        }
        for (k, l, side) in holes {
            if self.config.neighbour_events {
                self.event(Event::NeighbourChanged {
                    key: k.clone(),
                    level: level_u8(l),
                    side,
                    neighbour: None,
                });
            }
            if let Some(n) = self.nodes.get_mut(&k)
                && n.join.is_none()
                && l > 0
                && !n.repairing.contains(&(l, side))
            {
                n.repairing.push((l, side));
            }
            if self
                .nodes
                .get(&k)
                .is_some_and(|n| n.fill(l, side).is_none())
            {
                self.start_fill(now, &k, l, side, FillStart::Candidate);
            }
        }
    }

    fn declare_dead(&mut self, now: Time, host: HostId) {
        if host == self.me.host || self.is_dead(host) {
            return;
        }
        self.dead.insert(host, now);
        self.peers.remove(&host);
        self.stats.hosts_declared_dead += 1;
        self.event(Event::HostDown { host });
        // Requests waiting on that host start over.
        let stuck: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.target.as_ref().is_some_and(|t| t.host == host))
            .map(|(id, _)| *id)
            .collect();
        let mut restart = Vec::new();
        for id in stuck {
            if let Some(p) = self.reqs.remove(&id) {
                if let Some(n) = self.nodes.get_mut(&p.key) {
                    n.remove_fill(p.level, p.side);
                }
                restart.push((p.key, p.level, p.side));
            }
        }
        self.purge(now, |r| r.host == host);
        for (k, l, s) in restart {
            self.start_fill(now, &k, l, s, FillStart::Candidate);
        }
        // Multicast hand-offs to it are routed around it.
        let fwds: Vec<u64> = self
            .forwards
            .iter()
            .filter(|(_, f)| f.target.as_ref().is_some_and(|t| t.host == host))
            .map(|(id, _)| *id)
            .collect();
        for id in fwds {
            self.reroute(now, id);
        }
    }

    fn on_tick(&mut self, now: Time) {
        self.tick_at = None;
        if self.nodes.is_empty() {
            return;
        }
        let next = now.plus_micros(self.config.ping_interval_us.max(1));
        self.tick_at = Some(next);
        self.timers.push(Reverse((next, Timer::Tick)));

        // Failure detector: ping neighbour hosts not heard from lately.
        let mut hosts: Vec<HostRef<C>> = Vec::new();
        let mut seen = FxHashSet::default();
        for node in self.nodes.values() {
            for pair in &node.levels {
                for r in pair.iter().flatten() {
                    if r.host != self.me.host && seen.insert(r.host) {
                        hosts.push(Self::host_of(r));
                    }
                }
            }
        }
        self.peers
            .retain(|h, p| seen.contains(h) || p.ping.is_some());
        for h in hosts {
            if self.is_dead(h.host) {
                continue;
            }
            if !self.peers.contains_key(&h.host) {
                if self.peers.len() < self.config.peers_max {
                    self.peers.insert(
                        h.host,
                        Peer {
                            last_heard: now,
                            ping: None,
                        },
                    );
                }
                continue;
            }
            let p = &self.peers[&h.host];
            if p.ping.is_none() && now.micros_since(p.last_heard) >= self.config.ping_interval_us {
                self.send_ping(now, h, 1);
            }
        }

        // Stabilisation: re-offer ourselves to each right neighbour.
        if self.config.stabilize_interval_us > 0 {
            let due: Vec<Key> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.join.is_none() && n.next_stabilize <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for k in due {
                let jitter = self.rng.below(self.config.stabilize_interval_us / 4 + 1);
                let (lefts, right0, height) = {
                    let Some(n) = self.nodes.get_mut(&k) else {
                        continue;
                    };
                    n.next_stabilize = now.plus_micros(self.config.stabilize_interval_us + jitter);
                    let lefts: Vec<(usize, NodeRef<C>)> = n
                        .levels
                        .iter()
                        .enumerate()
                        .filter_map(|(l, p)| p[0].clone().map(|r| (l, r)))
                        .collect();
                    (lefts, n.nbr(0, Side::Right).cloned(), n.levels.len())
                };
                // Every level: offer ourselves to the left neighbour (it redirects us to a
                // closer node if it knows one; a gone one answers so). Level 0: the same
                // to the right. Level l >= 1: find the right neighbour again from level
                // l - 1, up to one level above the top (to find a missed one).
                // An end of level 0 may be a real end, or a split: ask another host.
                let ends: Vec<Side> = [Side::Left, Side::Right]
                    .into_iter()
                    .filter(|s| {
                        self.nodes
                            .get(&k)
                            .is_some_and(|n| n.nbr(0, *s).is_none() && n.fill(0, *s).is_none())
                    })
                    .collect();
                let isolated = ends.len() == 2;
                for side in ends {
                    if isolated {
                        let pick = self.rng.below(self.recent.len().max(1) as u64) as usize;
                        self.start_probe(now, &k, side, pick.min(3));
                    } else {
                        self.start_fill(now, &k, 0, side, FillStart::Candidate);
                    }
                }
                for (l, r) in lefts {
                    self.start_fill(now, &k, l, Side::Left, FillStart::Node(r));
                }
                let Some(r) = right0 else {
                    continue;
                };
                self.start_fill(now, &k, 0, Side::Right, FillStart::Node(r));
                for l in 1..=height.min(self.config.level_max - 1) {
                    self.start_fill(now, &k, l, Side::Right, FillStart::Walk);
                }
            }
        }

        // Forget old deliveries and old deaths.
        while let Some((t, _, _)) = self.delivered_order.front() {
            if now.micros_since(*t) < self.config.dedup_ttl_us {
                break;
            }
            if let Some((_, op, key)) = self.delivered_order.pop_front() {
                self.delivered.remove(&(op, key));
            }
        }
        let memory = self.config.dead_memory_us;
        self.dead.retain(|_, t| now.micros_since(*t) < memory);
        let avoid_for = self.config.ping_interval_us * 2;
        self.avoid.retain(|_, t| now.micros_since(*t) < avoid_for);
    }

    /// Requests to `host` go unanswered: ping it (unless a ping is out already).
    fn suspect(&mut self, now: Time, host: HostRef<C>) {
        if self.is_dead(host.host) || host.host == self.me.host {
            return;
        }
        if !self.peers.contains_key(&host.host) {
            if self.peers.len() >= self.config.peers_max {
                return;
            }
            self.peers.insert(
                host.host,
                Peer {
                    last_heard: Time::ZERO,
                    ping: None,
                },
            );
        }
        if self.peers.get(&host.host).is_some_and(|p| p.ping.is_none()) {
            self.send_ping(now, host, 1);
        }
    }

    fn send_ping(&mut self, now: Time, to: HostRef<C>, attempt: u32) {
        let nonce = self.rng.next_u64();
        if let Some(p) = self.peers.get_mut(&to.host) {
            p.ping = Some((nonce, attempt));
        }
        let at = now.plus_micros(self.config.ping_timeout_us);
        self.timers.push(Reverse((at, Timer::Ping(to.host, nonce))));
        self.send(to, Body::Ping { nonce });
    }

    fn on_ping_timeout(&mut self, now: Time, host: HostId, _nonce: u64) {
        let Some(p) = self.peers.get(&host) else {
            return;
        };
        let attempt = p.ping.map_or(0, |(_, a)| a);
        if attempt < self.config.ping_attempts_max {
            // Find the contact again from the neighbour tables.
            let contact = self
                .nodes
                .values()
                .find_map(|n| {
                    n.levels
                        .iter()
                        .flat_map(|p| p.iter().flatten())
                        .find(|r| r.host == host)
                        .map(|r| r.contact.clone())
                })
                .or_else(|| {
                    let mut f = self.forwards.values().filter_map(|f| f.target.as_ref());
                    f.find(|t| t.host == host).map(|t| t.contact.clone())
                })
                .or_else(|| {
                    self.reqs
                        .values()
                        .filter_map(|r| r.target.as_ref())
                        .find(|t| t.host == host)
                        .map(|t| t.contact.clone())
                });
            if let Some(contact) = contact {
                self.send_ping(now, HostRef { host, contact }, attempt + 1);
                return;
            }
            self.peers.remove(&host);
            return;
        }
        self.declare_dead(now, host);
    }

    // ------------------------------------------------------------------ multicast

    /// Node `at` handles a multicast over `range`: deliver and spread if `at` is in the
    /// range, else route towards it.
    #[allow(clippy::too_many_arguments)]
    fn multicast_at(
        &mut self,
        now: Time,
        at: &Key,
        op: OpId,
        origin: HostRef<C>,
        range: KeyRange,
        payload: Bytes,
        hops: u32,
    ) {
        let Some(node) = self.nodes.get(at) else {
            return;
        };
        let me = node.me.key.clone();
        if range.contains(&me) {
            if self.delivered.insert((op, me.clone())) {
                self.delivered_order.push_back((now, op, me.clone()));
                if self.delivered_order.len() > self.config.dedup_entries_max
                    && let Some((_, o, k)) = self.delivered_order.pop_front()
                {
                    self.delivered.remove(&(o, k));
                }
                self.event(Event::Delivered {
                    key: me.clone(),
                    op,
                    origin: origin.clone(),
                    payload: payload.clone(),
                    hops,
                });
            }
            let right = KeyRange {
                lo: Bound::Excluded(me.clone()),
                hi: range.hi.clone(),
            };
            self.spread(now, at, Side::Right, right, op, &origin, &payload, hops);
            let left = KeyRange {
                lo: range.lo.clone(),
                hi: Bound::Excluded(me),
            };
            self.spread(now, at, Side::Left, left, op, &origin, &payload, hops);
        } else {
            self.route_multicast(now, at, op, origin, range, payload, hops);
        }
    }

    /// Split `part` (all on `side` of node `at`) among `at`'s neighbours on that side, top
    /// level first: each gets the sub-range from its own key to the end of what is left.
    #[allow(clippy::too_many_arguments)]
    fn spread(
        &mut self,
        now: Time,
        at: &Key,
        side: Side,
        mut part: KeyRange,
        op: OpId,
        origin: &HostRef<C>,
        payload: &Bytes,
        hops: u32,
    ) {
        if part.is_empty_interval() {
            return;
        }
        let Some(node) = self.nodes.get(at) else {
            return;
        };
        let mut handoffs = Vec::new();
        for l in (0..node.levels.len()).rev() {
            let Some(r) = node.nbr(l, side) else {
                continue;
            };
            if !self.live(r) || !part.contains(&r.key) {
                continue;
            }
            let sub = match side {
                Side::Right => {
                    let sub = KeyRange {
                        lo: Bound::Included(r.key.clone()),
                        hi: part.hi.clone(),
                    };
                    part.hi = Bound::Excluded(r.key.clone());
                    sub
                }
                Side::Left => {
                    let sub = KeyRange {
                        lo: part.lo.clone(),
                        hi: Bound::Included(r.key.clone()),
                    };
                    part.lo = Bound::Excluded(r.key.clone());
                    sub
                }
            };
            handoffs.push((r.clone(), sub));
        }
        // What is left lies between `at` and its level-0 neighbour: empty unless that
        // neighbour is unknown (being repaired) or dead.
        let unsure = match node.nbr(0, side) {
            Some(n) => !self.live(n),
            None => node.fill(0, side).is_some(),
        };
        for (r, sub) in handoffs {
            self.handoff(now, at, r, op, origin.clone(), sub, payload.clone(), hops);
        }
        if unsure && !part.is_empty_interval() {
            self.park(now, at, op, origin.clone(), part, payload.clone(), hops, 0);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn route_multicast(
        &mut self,
        now: Time,
        at: &Key,
        op: OpId,
        origin: HostRef<C>,
        range: KeyRange,
        payload: Bytes,
        hops: u32,
    ) {
        let Some(node) = self.nodes.get(at) else {
            return;
        };
        let side = if range.above_lo(&node.me.key) {
            Side::Left
        } else {
            Side::Right
        };
        let next = if hops < self.config.hops_max {
            (0..node.levels.len())
                .rev()
                .filter_map(|l| node.nbr(l, side))
                .find(|r| {
                    self.live(r)
                        && match side {
                            Side::Right => range.below_hi(&r.key),
                            Side::Left => range.above_lo(&r.key),
                        }
                })
                .cloned()
        } else {
            None
        };
        if let Some(r) = next {
            self.handoff(now, at, r, op, origin, range, payload, hops);
            return;
        }
        let unsure = match node.nbr(0, side) {
            Some(n) => !self.live(n),
            None => node.fill(0, side).is_some(),
        };
        if unsure && hops < self.config.hops_max {
            self.park(now, at, op, origin, range, payload, hops, 0);
        } else {
            self.send(origin, Body::MulticastEmpty { op });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handoff(
        &mut self,
        now: Time,
        from_key: &Key,
        target: NodeRef<C>,
        op: OpId,
        origin: HostRef<C>,
        range: KeyRange,
        payload: Bytes,
        hops: u32,
    ) {
        let fwd = self.new_id();
        let body = Body::Multicast {
            fwd,
            to: target.key.clone(),
            op,
            origin: origin.clone(),
            range: range.clone(),
            payload: payload.clone(),
            hops: hops + 1,
        };
        let dest = Self::host_of(&target);
        if self.forwards.len() >= self.config.forwards_in_flight_max {
            self.stats.forwards_untracked += 1;
            self.send(dest, body);
            return;
        }
        let deadline = now.plus_micros(self.config.request_timeout_us);
        self.forwards.insert(
            fwd,
            Forward {
                from_key: from_key.clone(),
                target: Some(target),
                op,
                origin,
                range,
                payload,
                hops,
                deadline,
                attempts: 1,
            },
        );
        self.timers.push(Reverse((deadline, Timer::Fwd(fwd))));
        self.send(dest, body);
    }

    /// Keep `range` and try it again from `at` after `retry_delay_us`.
    #[allow(clippy::too_many_arguments)]
    fn park(
        &mut self,
        now: Time,
        at: &Key,
        op: OpId,
        origin: HostRef<C>,
        range: KeyRange,
        payload: Bytes,
        hops: u32,
        attempts: u32,
    ) {
        if attempts >= self.config.attempts_max * 8
            || self.forwards.len() >= self.config.forwards_in_flight_max
        {
            self.stats.ranges_abandoned += 1;
            return;
        }
        let fwd = self.new_id();
        // Back off: a repair may need a failure-detection round first.
        let delay = self.config.retry_delay_us << attempts.min(5);
        let deadline = now.plus_micros(delay);
        self.forwards.insert(
            fwd,
            Forward {
                from_key: at.clone(),
                target: None,
                op,
                origin,
                range,
                payload,
                hops,
                deadline,
                attempts: attempts + 1,
            },
        );
        self.timers.push(Reverse((deadline, Timer::Fwd(fwd))));
    }

    /// Give the range of hand-off `fwd` another route from where it was.
    fn reroute(&mut self, now: Time, fwd: u64) {
        let Some(f) = self.forwards.remove(&fwd) else {
            return;
        };
        let at = if self.nodes.contains_key(&f.from_key) {
            Some(f.from_key.clone())
        } else {
            self.nodes
                .iter()
                .find(|(_, n)| n.join.is_none())
                .map(|(k, _)| k.clone())
        };
        let Some(at) = at else {
            self.stats.ranges_abandoned += 1;
            return;
        };
        if f.target.is_none() {
            // A parked range: try again, counting the attempt.
            let Some(node) = self.nodes.get(&at) else {
                return;
            };
            let me = node.me.key.clone();
            if f.range.contains(&me) {
                self.multicast_at(now, &at, f.op, f.origin, f.range, f.payload, f.hops);
                return;
            }
            let side = if f.range.above_lo(&me) {
                Side::Left
            } else {
                Side::Right
            };
            let ready = node.nbr(0, side).is_some_and(|n| self.live(n))
                || (node.nbr(0, side).is_none() && node.fill(0, side).is_none());
            if ready {
                self.route_multicast(now, &at, f.op, f.origin, f.range, f.payload, f.hops);
            } else {
                self.park(
                    now, &at, f.op, f.origin, f.range, f.payload, f.hops, f.attempts,
                );
            }
            return;
        }
        self.multicast_at(now, &at, f.op, f.origin, f.range, f.payload, f.hops);
    }

    fn on_fwd_timeout(&mut self, now: Time, fwd: u64) {
        let Some(f) = self.forwards.get_mut(&fwd) else {
            return;
        };
        match &f.target {
            None => self.reroute(now, fwd),
            Some(t) if f.attempts < self.config.attempts_max * 4 => {
                if f.attempts >= self.config.attempts_max {
                    // Declaring the host dead (after pings) reroutes this hand-off.
                    let h = Self::host_of(t);
                    self.suspect(now, h);
                }
                let Some(f) = self.forwards.get_mut(&fwd) else {
                    return;
                };
                let Some(t) = &f.target else {
                    return;
                };
                f.attempts += 1;
                f.deadline = now.plus_micros(self.config.request_timeout_us);
                let body = Body::Multicast {
                    fwd,
                    to: t.key.clone(),
                    op: f.op,
                    origin: f.origin.clone(),
                    range: f.range.clone(),
                    payload: f.payload.clone(),
                    hops: f.hops + 1,
                };
                let (dest, d) = (Self::host_of(t), f.deadline);
                self.timers.push(Reverse((d, Timer::Fwd(fwd))));
                self.send(dest, body);
            }
            Some(_) => self.reroute(now, fwd),
        }
    }

    fn on_multicast_ack(&mut self, now: Time, from: &HostRef<C>, fwd: u64, status: AckStatus) {
        let Some(f) = self.forwards.get(&fwd) else {
            return;
        };
        if f.target.as_ref().is_none_or(|t| t.host != from.host) {
            return;
        }
        match status {
            AckStatus::Taken => {
                self.forwards.remove(&fwd);
            }
            AckStatus::NoSuchKey => {
                let key = f.target.as_ref().map(|t| t.key.clone());
                let host = from.host;
                if let Some(key) = key {
                    self.purge(now, |r| r.host == host && r.key == key);
                }
                self.reroute(now, fwd);
            }
            AckStatus::Busy => {
                if let Some(f) = self.forwards.get_mut(&fwd) {
                    f.deadline = now.plus_micros(self.config.retry_delay_us);
                    let d = f.deadline;
                    self.timers.push(Reverse((d, Timer::Fwd(fwd))));
                }
            }
        }
    }
}

fn node_is_joined<C>(n: Option<&Node<C>>) -> bool {
    n.is_some_and(|n| n.join.is_none())
}
