//! The daemon (`vp-host join`): one task, the node, owns the skip-graph host
//! (and, later, this host's virtual-peer replicas). Everything reaches it as
//! a message on a bounded channel: network events, API requests, results of
//! background work; it answers by queueing network frames (never waiting on
//! the network) and replying on oneshot channels.

pub mod api;
pub mod metrics;
pub mod overlay;
mod stream;
pub mod vps;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use vp_alm::{AlmHost, Event as AlmEvent, HostId, HostRef, Key, OpId, Time};

use crate::net::{Net, NetConfig, NetEvent};
use api::{
    DeliveryRecord, HostStatus, KeyStatus, MulticastAnswer, NeighbourStatus, NodeRequest,
    OverlayStatus, SearchAnswer,
};
use overlay::{PeerContact, host_id_of, host_key, host_ref, key_text};

/// Deliveries kept for `GET /v1/overlay/deliveries`.
pub const DELIVERIES_KEPT_MAX: usize = 4096;
/// Requests from the API queued for the node.
pub const API_QUEUE_MAX: usize = 1024;
/// How long a graceful leave waits for its messages to go out.
pub const LEAVE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Events of one queue the node handles in one turn of its loop before it
/// looks at the others (and at its timers) again.
pub const TURN_EVENTS_MAX: usize = 64;

/// Everything hosts say to each other on `/vp/wire/2`.
#[derive(Debug, Serialize, Deserialize)]
pub enum Wire {
    /// A skip-graph message.
    Alm(vp_alm::Message<PeerContact>),
    /// About virtual peers: requests, replies, deployment, modules.
    Vp(crate::vp::wire::VpWire),
    /// A consensus message between members of virtual peer `vp`.
    Paxos {
        vp: vp_guest_sdk::VpId,
        msg: vp_consensus::Message,
    },
}

/// How to run a host.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub api: SocketAddr,
    pub psk: Option<PreSharedKey>,
    pub alm: vp_alm::Config,
    pub net: NetConfig,
    /// Virtual peers this host runs a member of, at most (`vp-host join
    /// --memberships-max`; at most `vps::MEMBERSHIPS_MAX`). 0: none, the host
    /// only routes overlay traffic and serves its API.
    pub memberships_max: usize,
    /// Bytes of guest memory this host lends, at most: the sum of its
    /// members' `--memory-max` (what each guest may grow to), including a
    /// new member's (`vp-host join --guest-memory-max`).
    pub guest_memory_max: u64,
}

/// Caller time for the cores: microseconds since the Unix epoch, never going
/// backwards even if the wall clock does.
#[derive(Debug, Default)]
struct Clock {
    last: u64,
}

impl Clock {
    fn now_us(&mut self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.last = self.last.max(wall);
        self.last
    }
}

/// Handle `first`, then what is already queued on `rx` behind it (at most
/// `TURN_EVENTS_MAX` in all).
fn take_queued<T>(first: T, rx: &mut mpsc::Receiver<T>, mut handle: impl FnMut(T)) {
    handle(first);
    for _ in 1..TURN_EVENTS_MAX {
        match rx.try_recv() {
            Ok(next) => handle(next),
            Err(_) => break,
        }
    }
}

/// Results of background work, reported back to the node.
enum Internal {
    Bootstrapped(Result<HostRef<PeerContact>, String>),
}

struct Node {
    cfg: NodeConfig,
    net: Net<Wire>,
    me: HostRef<PeerContact>,
    alm: AlmHost<PeerContact>,
    clock: Clock,
    internal: mpsc::Sender<Internal>,
    introducers: Vec<HostRef<PeerContact>>,
    bootstrapping: bool,
    searches: HashMap<OpId, oneshot::Sender<Result<SearchAnswer, String>>>,
    inserts: HashMap<Key, Vec<oneshot::Sender<Result<(), String>>>>,
    deliveries: VecDeque<DeliveryRecord>,
    vps: vps::VpNode,
    /// For background tasks (spawn, replacement) to call back into the node.
    calls: mpsc::Sender<vps::NodeCall>,
}

fn neighbour(n: &vp_alm::NodeRef<PeerContact>) -> NeighbourStatus {
    NeighbourStatus {
        key: key_text(&n.key),
        host_id: format!("{:016x}", n.host.0),
        peer_id: n.contact.peer.to_string(),
    }
}

/// Run a host until `shutdown` resolves; then leave the overlay gracefully.
pub async fn run(cfg: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
    let keypair = crate::net::identity::load_or_create_identity(&cfg.data_dir)?;
    let net_config = NetConfig {
        listen: cfg.listen.clone(),
        psk: cfg.psk,
        ..cfg.net.clone()
    };
    let (net, mut events) = Net::<Wire>::start(keypair, net_config).await?;
    let local = net.local_peer_id();

    // Our contact carries the addresses we actually listen on: wait for the
    // first, then take whatever else comes right after (one per interface
    // for 0.0.0.0, one per transport).
    let mut addrs = Vec::new();
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(NetEvent::ListenAddr(addr))) => {
                if addrs.is_empty() {
                    deadline = tokio::time::Instant::now() + Duration::from_millis(300);
                }
                addrs.push(addr);
            }
            Ok(Some(_)) => {}
            Ok(None) => anyhow::bail!("the network stopped while starting"),
            Err(_) => break,
        }
    }
    if addrs.is_empty() {
        anyhow::bail!("not listening on any address (check --listen)");
    }
    let me = host_ref(local, &addrs);
    let seed = rand::random();
    let sandbox = std::sync::Arc::new(crate::sandbox::Sandbox::with_compiled_cache(
        &cfg.data_dir.join("modules").join("compiled"),
        crate::sandbox::COMPILED_BYTES_MAX,
    )?);
    let modules = crate::vp::modules::ModuleStore::open(&cfg.data_dir)?;
    let tombstones = crate::vp::tombstones::Tombstones::open(&cfg.data_dir)?;
    let (member_tx, mut member_rx) = mpsc::channel(4096);
    let (calls, mut call_rx) = mpsc::channel(1024);
    let mut node = Node {
        vps: vps::VpNode::new(sandbox, modules, tombstones, member_tx),
        calls,
        alm: AlmHost::new(me.host, me.contact.clone(), cfg.alm.clone(), seed),
        me,
        net,
        clock: Clock::default(),
        internal: mpsc::channel(64).0,
        introducers: Vec::new(),
        bootstrapping: false,
        searches: HashMap::new(),
        inserts: HashMap::new(),
        deliveries: VecDeque::new(),
        cfg,
    };
    let (internal_tx, mut internal_rx) = mpsc::channel(64);
    node.internal = internal_tx;
    let (senders, directory) = (node.vps.members.senders(), node.vps.directory.clone());
    node.net
        .set_route(std::sync::Arc::new(move |from, msg| match msg {
            Wire::Paxos { vp, msg } => match senders.get(&vp) {
                Some(member) => {
                    vps::deliver_paxos(&directory, member.value(), vp, from, msg);
                    None
                }
                // Not (yet) a member: the node's queue keeps it in order behind
                // the deployment that may be on its way.
                None => Some(Wire::Paxos { vp, msg }),
            },
            other => Some(other),
        }));
    let (api_tx, mut api_rx) = mpsc::channel(API_QUEUE_MAX);
    crate::api::serve(node.cfg.api, &node.cfg.data_dir, api::router(api_tx)).await?;
    tracing::info!(peer_id = %local, host_id = %node.me.host, addrs = ?addrs, "host started");
    node.join_overlay();
    node.recover_members();
    node.resume_draining();
    crate::watchdog::start();

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // One timer for the overlay's next deadline, moved rather than made anew
    // at every turn (a turn per message under load).
    let overlay_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(overlay_timer);
    // The overlay time the timer is set for (None: not set).
    let mut overlay_due: Option<u64> = None;
    loop {
        node.pump();
        let next = node.alm.poll_timeout().map(|t| t.0);
        if next != overlay_due {
            if let Some(at) = next {
                let wait = at.saturating_sub(node.clock.now_us());
                overlay_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + Duration::from_micros(wait));
            }
            overlay_due = next;
        }
        tokio::select! {
            event = events.recv() => match event {
                // Whatever else arrived meanwhile, in the same turn.
                Some(event) => take_queued(event, &mut events, |e| node.on_net_event(e)),
                None => anyhow::bail!("the network stopped"),
            },
            Some(request) = api_rx.recv() => {
                take_queued(request, &mut api_rx, |r| node.on_request(r));
            }
            Some(internal) = internal_rx.recv() => node.on_internal(internal),
            Some(output) = member_rx.recv() => {
                take_queued(output, &mut member_rx, |o| node.on_member_output(o));
            }
            Some(call) = call_rx.recv() => node.on_call(call),
            _ = tick.tick() => {
                crate::watchdog::beat(crate::watchdog::Beat::Node);
                node.vp_tick();
            }
            () = &mut overlay_timer, if overlay_due.is_some() => {
                overlay_due = None;
                let now = node.now();
                node.alm.handle_timeout(now);
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("stopping virtual-peer members and leaving the overlay");
    let members: Vec<_> = node.vps.members.drain().map(|(_, h)| h).collect();
    tokio::task::spawn_blocking(move || members.into_iter().for_each(|h| h.stop()))
        .await
        .ok();
    let now = node.now();
    node.alm.leave(now);
    node.pump();
    node.net.flush(LEAVE_FLUSH_TIMEOUT).await;
    Ok(())
}

impl Node {
    fn now(&mut self) -> Time {
        Time(self.clock.now_us())
    }

    /// Insert this host's key: as the first host, or through a bootstrap host.
    fn join_overlay(&mut self) {
        if self.cfg.bootstrap.is_empty() {
            let now = self.now();
            match self.alm.insert_key(now, host_key(self.me.host), None) {
                Ok(()) => tracing::info!("started a new overlay (no --bootstrap given)"),
                Err(e) => tracing::error!("cannot insert this host's key: {e}"),
            }
            return;
        }
        self.bootstrap(Duration::ZERO);
    }

    /// Dial the bootstrap hosts in the background (after `delay`), one after
    /// another until one answers; report the first that does.
    fn bootstrap(&mut self, delay: Duration) {
        if self.bootstrapping {
            return;
        }
        self.bootstrapping = true;
        let net = self.net.clone();
        let addrs = self.cfg.bootstrap.clone();
        let internal = self.internal.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut errors = Vec::new();
            for addr in addrs {
                match net.dial(addr.clone()).await {
                    Ok(peer) if peer == net.local_peer_id() => {
                        errors.push(format!("{addr} is this host"))
                    }
                    Ok(peer) => {
                        let introducer = host_ref(peer, std::slice::from_ref(&addr));
                        let _ = internal.send(Internal::Bootstrapped(Ok(introducer))).await;
                        return;
                    }
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            let _ = internal
                .send(Internal::Bootstrapped(Err(errors.join("; "))))
                .await;
        });
    }

    fn on_internal(&mut self, internal: Internal) {
        match internal {
            Internal::Bootstrapped(result) => {
                self.bootstrapping = false;
                match result {
                    Ok(introducer) => {
                        self.net.add_addresses(
                            introducer.contact.peer,
                            introducer.contact.addrs.clone(),
                        );
                        if !self.introducers.contains(&introducer) {
                            self.introducers.push(introducer.clone());
                        }
                        let now = self.now();
                        let key = host_key(self.me.host);
                        let result = if self.alm.node(&key).is_some() {
                            self.alm.rejoin(now, &key, introducer.clone())
                        } else {
                            self.alm.insert_key(now, key, Some(introducer.clone()))
                        };
                        match result {
                            Ok(()) => {
                                tracing::info!(via = %introducer.contact.peer, "joining the overlay")
                            }
                            Err(e) => tracing::error!("cannot join the overlay: {e}"),
                        }
                    }
                    Err(why) => {
                        tracing::warn!("no bootstrap host answered ({why}); retrying in 5 s");
                        self.bootstrap(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    fn on_net_event(&mut self, event: NetEvent<Wire>) {
        // A peer that speaks is alive (a restarted host keeps its peer id):
        // its leader hints count again.
        if let NetEvent::Message { from, .. } = &event
            && !self.vps.gone.is_empty()
        {
            self.vps.gone.remove(from);
        }
        match event {
            NetEvent::Message {
                from,
                msg: Wire::Alm(msg),
            } => {
                self.net
                    .add_addresses(msg.from.contact.peer, msg.from.contact.addrs.clone());
                if msg.from.contact.peer != from {
                    tracing::warn!(%from, "overlay message names another peer as its sender; dropped");
                    return;
                }
                self.vps
                    .directory
                    .learn(vp_consensus::HostId(msg.from.host.0), &msg.from.contact);
                let now = self.now();
                if let Err(e) = self.alm.handle_message(now, host_id_of(&from), msg) {
                    tracing::debug!(%from, "overlay message refused: {e}");
                }
            }
            NetEvent::Message {
                from,
                msg: Wire::Paxos { vp, msg },
            } => self.on_paxos(from, vp, msg),
            NetEvent::Message {
                from,
                msg: Wire::Vp(msg),
            } => self.on_vp_wire(from, msg),
            NetEvent::Identified {
                peer, listen_addrs, ..
            } => self.net.add_addresses(peer, listen_addrs),
            NetEvent::Connected { peer, .. } => {
                self.vps.gone.remove(&peer);
            }
            NetEvent::Disconnected { peer, broken } => {
                if broken {
                    // The overlay stops routing through it now, not after its
                    // own failure detector or a failed dial (a restarted host
                    // rejoining through a neighbour killed a moment before
                    // took 1-5 s; a host that is alive after all is taken
                    // back when it next speaks).
                    let now = self.now();
                    self.alm.handle_unreachable(now, host_id_of(&peer));
                }
                self.on_peer_gone(peer);
            }
            NetEvent::ListenAddr(_) => {}
            NetEvent::Unreachable { peer } if !self.net.knows_addresses(&peer) => {
                // Not known to be dead, only not known where: a host that
                // heard of a new leader by its peer id alone used to declare
                // it dead here and ignore it as leader for seconds. Ask the
                // overlay for its contact instead.
                tracing::debug!(%peer, "no address known for a peer; looking it up");
                self.resolve_host(peer);
            }
            NetEvent::Unreachable { peer } => {
                let now = self.now();
                self.alm.handle_unreachable(now, host_id_of(&peer));
                self.on_peer_gone(peer);
            }
        }
    }

    /// Move what the core produced: messages to the network, events to their
    /// waiters.
    fn pump(&mut self) {
        while let Some(t) = self.alm.poll_send() {
            let peer = t.to.contact.peer;
            self.net
                .add_addresses(peer, t.to.contact.addrs.iter().cloned());
            if let Err(e) = self.net.send(peer, &Wire::Alm(t.msg)) {
                tracing::debug!(%peer, "overlay message not sent: {e}");
            }
        }
        while let Some(event) = self.alm.poll_event() {
            self.on_alm_event(event);
        }
    }

    fn on_alm_event(&mut self, event: AlmEvent<PeerContact>) {
        match event {
            AlmEvent::Inserted { key } => {
                tracing::info!(key = %key_text(&key), "key joined the overlay");
                for waiter in self.inserts.remove(&key).unwrap_or_default() {
                    let _ = waiter.send(Ok(()));
                }
            }
            AlmEvent::InsertFailed { key, error } => {
                tracing::warn!(key = %key_text(&key), "key could not join: {error}");
                for waiter in self.inserts.remove(&key).unwrap_or_default() {
                    let _ = waiter.send(Err(error.to_string()));
                }
                if key == host_key(self.me.host) && !self.cfg.bootstrap.is_empty() {
                    self.bootstrap(Duration::from_secs(2));
                }
            }
            AlmEvent::Removed { key } => {
                tracing::debug!(key = %key_text(&key), "key left the overlay")
            }
            AlmEvent::SearchDone {
                op,
                found,
                exact,
                hops,
                next,
                ..
            } => {
                if self.on_vp_search(op, Some(&found), next.as_ref()) {
                    return;
                }
                if let Some(waiter) = self.searches.remove(&op) {
                    let _ = waiter.send(Ok(SearchAnswer {
                        found: neighbour(&found),
                        exact,
                        hops,
                    }));
                }
            }
            AlmEvent::SearchFailed { op, error, .. } => {
                if self.on_vp_search(op, None, None) {
                    return;
                }
                if let Some(waiter) = self.searches.remove(&op) {
                    let _ = waiter.send(Err(error.to_string()));
                }
            }
            AlmEvent::Delivered {
                key,
                op,
                origin,
                payload,
                hops,
            } => {
                if key
                    .as_slice()
                    .starts_with(overlay::VP_KEY_PREFIX.as_bytes())
                    && self.on_vp_delivery(&origin.contact, payload.as_slice())
                {
                    return;
                }
                if self.deliveries.len() == DELIVERIES_KEPT_MAX {
                    self.deliveries.pop_front();
                }
                self.deliveries.push_back(DeliveryRecord {
                    op: op.to_string(),
                    key: key_text(&key),
                    origin_host_id: format!("{:016x}", origin.host.0),
                    payload: String::from_utf8_lossy(payload.as_slice()).into_owned(),
                    hops,
                });
            }
            AlmEvent::MulticastEmpty { op } => self.on_multicast_empty(op),
            AlmEvent::NeighbourChanged { .. } => {}
            AlmEvent::Isolated { key } => {
                tracing::warn!(key = %key_text(&key), "key lost every link; rejoining through a bootstrap host");
                if self.cfg.bootstrap.is_empty() && self.introducers.is_empty() {
                    tracing::warn!(
                        "no bootstrap host to rejoin through (started without --bootstrap)"
                    );
                } else {
                    self.bootstrap(Duration::ZERO);
                }
            }
            AlmEvent::HostDown { host } => tracing::info!(%host, "host declared dead"),
        }
    }

    fn on_request(&mut self, request: NodeRequest) {
        let now = self.now();
        match request {
            NodeRequest::Status(reply) => {
                let net = self.net.clone();
                let overlay = self.overlay_status();
                let data_dir = self.cfg.data_dir.display().to_string();
                let host_id = format!("{:016x}", self.me.host.0);
                let member_status = self.member_statuses();
                let memberships_max = self.memberships_max();
                let draining = self.vps.draining.is_some();
                let guest_memory = (self.guest_memory_committed(), self.cfg.guest_memory_max);
                tokio::spawn(async move {
                    let mut virtual_peers = Vec::new();
                    for rx in member_status {
                        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), rx).await {
                            virtual_peers.push(s);
                        }
                    }
                    if let Ok(s) = net.status().await {
                        let _ = reply.send(HostStatus {
                            peer_id: s.peer_id,
                            host_id,
                            version: env!("CARGO_PKG_VERSION").to_string(),
                            data_dir,
                            listen_addrs: s.listen_addrs,
                            connected_peers: s.connected_peers,
                            counters: s.counters,
                            private_network: s.private_network,
                            overlay,
                            virtual_peers,
                            memberships_max,
                            draining,
                            guest_memory_committed: guest_memory.0,
                            guest_memory_max: guest_memory.1,
                        });
                    }
                });
            }
            NodeRequest::Spawn(..)
            | NodeRequest::Send(..)
            | NodeRequest::Destroy(..)
            | NodeRequest::SendMany(..)
            | NodeRequest::Resolve(..)
            | NodeRequest::VpList(..)
            | NodeRequest::VpStatus(..)
            | NodeRequest::VpDigest(..)
            | NodeRequest::Drain { .. } => self.on_vp_request(request),
            NodeRequest::Search(req, reply) => {
                match self.alm.search(now, Key::new(req.key.into_bytes())) {
                    Ok(op) => {
                        self.searches.insert(op, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            NodeRequest::Multicast(req, reply) => {
                let range = match req.range() {
                    Ok(range) => range,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let result = self
                    .alm
                    .multicast(now, range, vp_alm::Bytes::copy_from(req.payload.as_bytes()))
                    .map(|op| MulticastAnswer { op: op.to_string() })
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            NodeRequest::Deliveries(reply) => {
                let _ = reply.send(self.deliveries.iter().cloned().collect());
            }
            NodeRequest::InsertKey(req, reply) => {
                let key = Key::new(req.key.into_bytes());
                let introducer = self.introducers.first().cloned();
                match self.alm.insert_key(now, key.clone(), introducer) {
                    Ok(()) => self.inserts.entry(key).or_default().push(reply),
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            NodeRequest::RemoveKey(req, reply) => {
                let key = Key::new(req.key.into_bytes());
                let _ = reply.send(self.alm.remove_key(now, &key).map_err(|e| e.to_string()));
            }
        }
    }

    fn overlay_status(&self) -> OverlayStatus {
        let mut keys: Vec<KeyStatus> = self
            .alm
            .keys()
            .filter_map(|k| self.alm.node(k))
            .map(|view| KeyStatus {
                key: key_text(&view.me.key),
                joined: view.joined,
                membership_vector: format!("{:016x}", view.me.mv.0),
                levels: view
                    .levels
                    .iter()
                    .map(|[l, r]| [l.as_ref().map(neighbour), r.as_ref().map(neighbour)])
                    .collect(),
            })
            .collect();
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        let own = key_text(&host_key(self.me.host));
        OverlayStatus {
            joined: keys.iter().any(|k| k.key == own && k.joined),
            keys,
            ops_in_flight: self.alm.ops_in_flight(),
            stats: serde_json::to_value(self.alm.stats()).unwrap_or_default(),
        }
    }
}

/// This host's id in the overlay and in consensus, from its peer id.
pub fn host_id(peer: &PeerId) -> HostId {
    host_id_of(peer)
}
