//! The node's side of virtual peers: member threads, routing requests to a
//! virtual peer's leader (and retrying them with the same session and
//! sequence number), spawning, placement, deployment with module transfer by
//! hash, and member replacement.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use dashmap::DashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use vp_alm::{Key, KeyRange, OpId};
use vp_consensus::{ClientId, HostId, Membership};
use vp_guest_sdk::abi::{VpId, WireResult};

use super::overlay::{PeerContact, host_id_of, host_key, member_key, vp_prefix};
use super::{Node, Wire};
use crate::sandbox::{ModuleHash, Sandbox};
use crate::vp::directory::Directory;
use crate::vp::member::{
    MemberContext, MemberEvent, MemberFile, MemberHandle, MemberOutput, ModuleSource, StatusAsk,
    destroyed_text, saved_contacts, start_member, vp_dir,
};
use crate::vp::modules::{MODULE_UNUSED_KEEP, MODULES_COLLECT_EVERY, ModuleStore, modules_in_use};
use crate::vp::tombstones::{TOMBSTONE_KEEP, TOMBSTONES_MAX, Tombstones};
use crate::vp::wire::{Deploy, MODULE_CHUNK_BYTES, Reply, Request, VpWire};
use crate::vp::{LogCursor, VpConfig, VpStatus, new_session_id};

/// Requests (from the API or from members' outbound messages) in flight.
pub const OUTSTANDING_MAX: usize = 100_000;
/// How long a client request keeps being retried by default.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a client may ask a request to be retried (`timeout_ms`): well
/// inside the time a virtual peer keeps an idle client session
/// (`Limits::session_retain_ms`), so no retry can outlive the session that
/// tells it from a new request.
pub const SEND_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// How long an outbound message of a virtual peer keeps being retried before
/// the caller's guest is told it failed.
pub const OUTBOUND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a deployment (module transfer included) may take.
pub const DEPLOY_TIMEOUT: Duration = Duration::from_secs(60);
/// Virtual peers one host may be a member of.
pub const MEMBERSHIPS_MAX: usize = 1024;

/// A byte count for people: whole MiB as such, anything else in bytes.
fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// The HTTP answer to a `send`: the guest's reply as JSON, or its error; a
/// request that could not be delivered is 503 (retry later).
fn send_answer(
    result: Result<WireResult, String>,
) -> Result<super::api::SendAnswer, crate::api::ApiError> {
    use super::api::SendAnswer;
    match result {
        Ok(Ok(bytes)) => match vp_guest_sdk::abi::decode::<serde_json::Value>(&bytes) {
            Ok(v) => Ok(SendAnswer {
                reply: Some(v),
                error: None,
            }),
            Err(e) => Ok(SendAnswer {
                reply: None,
                error: Some(format!("reply is not JSON-representable: {e}")),
            }),
        },
        Ok(Err(app_error)) => Ok(SendAnswer {
            reply: None,
            error: Some(app_error),
        }),
        Err(failure) => Err(crate::api::ApiError::unavailable(failure)),
    }
}

/// Who waits for a request's reply.
#[derive(Debug)]
pub enum Waiter {
    /// A request from within the host (the demo, a deployment).
    Api(oneshot::Sender<Result<WireResult, String>>),
    /// A `send` through the control API, answered as its HTTP response.
    Http(oneshot::Sender<Result<super::api::SendAnswer, crate::api::ApiError>>),
    /// A virtual peer on this host (its outbound message `seq`).
    Member(VpId),
}

impl Waiter {
    /// Hand the answer to request `seq` to whoever waits for it.
    fn answer(self, members: &Members, seq: u64, result: Result<WireResult, String>) {
        match self {
            Waiter::Api(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Http(tx) => {
                let _ = tx.send(send_answer(result));
            }
            Waiter::Member(caller) => {
                if let Some(m) = members.get(&caller) {
                    let result = result.and_then(|r| r);
                    m.send(MemberEvent::OutboundReply { id: seq, result });
                }
            }
        }
    }
}

#[derive(Debug)]
struct Outstanding {
    req: Request,
    waiter: Waiter,
    attempts: u32,
    next_try: Instant,
    deadline: Instant,
}

/// A host found for placement, and how loaded it is.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub host: HostId,
    pub contact: PeerContact,
    pub memberships: u32,
}

struct Sample {
    want: usize,
    memory_bytes: u64,
    exclude: HashSet<HostId>,
    searches: usize,
    candidates: HashMap<HostId, PeerContact>,
    /// Each answer: the host's memberships, None if it has no room for another.
    loads: HashMap<HostId, Option<u32>>,
    started: Instant,
    /// When the load queries went out.
    asked: Option<Instant>,
    deadline: Instant,
    reply: oneshot::Sender<Vec<Candidate>>,
}

impl Sample {
    /// Whether the overlay searches found enough candidates, or took long
    /// enough, to ask the candidates for their load.
    fn searching_done(&self, now: Instant) -> bool {
        let waited = now.saturating_duration_since(self.started);
        self.searches == 0
            || (self.candidates.len() > self.want && waited >= SAMPLE_ENOUGH_WAIT)
            || waited >= SAMPLE_SEARCH_MAX
    }

    /// A candidate's load: its memberships, None if it has no room. An
    /// answer from a host that is not a candidate (the asking host when it
    /// is excluded) counts for nothing: it once made a sample that excluded
    /// its own host decide one answer early and miss a host with room.
    fn answered(&mut self, host: HostId, load: Option<u32>) {
        if self.candidates.contains_key(&host) {
            self.loads.insert(host, load);
        }
    }

    /// Hosts a candidate named as its overlay neighbours: those that are not
    /// candidates yet (nor excluded) join while the sample has fewer than it
    /// draws (`sample_size`), and are returned to be asked for their load. In
    /// a large network the searches fill the sample and this adds nobody; in
    /// a small one, where random points keep finding the same few hosts, it
    /// walks the overlay to the rest.
    fn named(
        &mut self,
        hosts: impl IntoIterator<Item = (HostId, PeerContact)>,
    ) -> Vec<PeerContact> {
        let mut ask = Vec::new();
        if self.asked.is_none() {
            return ask;
        }
        for (host, contact) in hosts {
            if self.candidates.len() >= sample_size(self.want) {
                break;
            }
            if self.exclude.contains(&host) || self.candidates.contains_key(&host) {
                continue;
            }
            self.candidates.insert(host, contact.clone());
            ask.push(contact);
        }
        ask
    }

    /// Whether the sample can answer: every candidate answered, or enough
    /// with room did and the others had a moment more, or the deadline.
    fn decided(&self, now: Instant) -> bool {
        let Some(asked) = self.asked else {
            return false;
        };
        let all_answered = self.candidates.keys().all(|h| self.loads.contains_key(h));
        let with_room = self.loads.values().filter(|l| l.is_some()).count();
        let enough_answered =
            with_room >= self.want && now.saturating_duration_since(asked) >= SAMPLE_ENOUGH_WAIT;
        all_answered || enough_answered || now >= self.deadline
    }

    /// Answer the candidates that answered with room, the least loaded first (ties
    /// in random order), at most `want`. Only hosts that answered are alive
    /// enough to host a member.
    fn answer(self) {
        tracing::debug!(
            want = self.want,
            candidates = self.candidates.len(),
            answered = self.loads.len(),
            with_room = self.loads.values().filter(|l| l.is_some()).count(),
            waited_ms = self.started.elapsed().as_millis() as u64,
            "placement sample decided"
        );
        let loads = self.loads;
        let mut found: Vec<Candidate> = self
            .candidates
            .into_iter()
            .filter_map(|(host, contact)| {
                loads
                    .get(&host)
                    .copied()
                    .flatten()
                    .map(|memberships| Candidate {
                        host,
                        contact,
                        memberships,
                    })
            })
            .collect();
        found.sort_by_key(|c| (c.memberships, rand::random::<u32>()));
        found.truncate(self.want);
        let _ = self.reply.send(found);
    }
}

/// Hosts a placement sample draws for `want` members: as many searches, and
/// (counting hosts it has heard from and hosts named by the answers) at most
/// that many hosts added besides the searches' finds.
fn sample_size(want: usize) -> usize {
    2 * want + 4
}

/// Overlay neighbours a `Load` answer names (levels 0 and 1, both sides).
const LOAD_NEIGHBOURS_MAX: usize = 4;

/// Placement waits this long for the searches, at most, once it has more
/// candidates than it wants (a search routed through a dead host waits for the
/// overlay's timeout; the others suffice), and as long again for load answers
/// once enough candidates answered (a dead candidate never answers).
const SAMPLE_ENOUGH_WAIT: Duration = Duration::from_millis(100);
/// ... and at most this long for the searches in any case.
const SAMPLE_SEARCH_MAX: Duration = Duration::from_secs(1);
/// Virtual peers whose answering members a host remembers, and members per
/// virtual peer (both cleared when full: the memory is only a shortcut).
const MEMBERS_SEEN_VPS_MAX: usize = 4096;
const MEMBERS_SEEN_PER_VP_MAX: usize = 16;
/// Voters of a `Located` this host takes note of (a virtual peer has at most 7).
const VOTERS_NAMED_MAX: usize = 7;
/// A locate is repeated no more often than this.
const LOCATE_RETRY: Duration = Duration::from_millis(40);
/// Locates at `LOCATE_RETRY` before a request slows down to `LOCATE_RETRY_SLOW`.
const LOCATE_FAST_ATTEMPTS: u32 = 25;
const LOCATE_RETRY_SLOW: Duration = Duration::from_millis(250);
/// How long a closed peer's leader hints are ignored, unless it reconnects.
const GONE_FORGET: Duration = Duration::from_secs(5);
/// How long a member of a destroyed virtual peer stays after applying the
/// destroy: answering with the error, and (the leader) carrying the decision
/// to the other members before it goes.
const DESTROY_LINGER: Duration = Duration::from_secs(1);
/// The most destroyed virtual peers a host remembers hearing of.
const DESTROYED_SEEN_MAX: usize = 4096;
/// The most undone deployments a host remembers (`VpState::undone`).
const UNDONE_MAX: usize = 4096;
/// A placement gives up after this long.
const SAMPLE_DEADLINE: Duration = Duration::from_secs(3);

/// Locates per virtual peer whose nonces a host remembers: a late answer to
/// one of the last few still counts (locates repeat every 40 ms at most, and
/// a member tells a locator of a new leader up to 1 s later).
const LOCATE_NONCES: usize = 32;
/// Locate multicasts remembered (their `MulticastEmpty` reports name the op).
const LOCATE_OPS_MAX: usize = 4096;
/// A virtual peer whose key range has been empty this long, and none of
/// whose members ever answered this host, is reported not found. Longer than
/// a fresh member takes to insert its key, so a send right after a spawn
/// waits for it.
pub const NOT_FOUND_AFTER: Duration = Duration::from_secs(5);

/// What a request for a virtual peer that is nowhere gets.
pub fn not_found_text(vp: VpId) -> String {
    format!(
        "no virtual peer {vp} was found: for {} s no host in the overlay held a key of it \
         (it does not exist, was destroyed, or all its members are down)",
        NOT_FOUND_AFTER.as_secs()
    )
}

/// A leaving host asks its virtual peers' leaders to replace it this often.
const DRAIN_ASK_EVERY: Duration = Duration::from_secs(1);
/// In the data directory while the host is leaving (`vp-host drain`).
const DRAINING_FILE: &str = "draining";

/// Removes and returns the keys of `map` whose instant has come.
fn take_due(map: &mut HashMap<VpId, Instant>, now: Instant) -> Vec<VpId> {
    let due = keys_where(map, |at| *at <= now);
    for vp in &due {
        map.remove(vp);
    }
    due
}

/// The keys of `map` whose value satisfies `pred`.
fn keys_where<K: Copy, V>(map: &HashMap<K, V>, pred: impl Fn(&V) -> bool) -> Vec<K> {
    map.iter()
        .filter(|(_, v)| pred(v))
        .map(|(k, _)| *k)
        .collect()
}

/// What waits for a module being fetched.
enum FetchFor {
    /// A deployment to this host, and whom to answer.
    Deploy(Box<Deploy>, PeerContact),
    /// A member found on disk at start whose module is missing from the
    /// store or corrupt: fetched from the other members it saved contacts of.
    Restart(VpId),
}

/// A module being fetched, one chunk at a time, from `from`.
struct Fetch {
    from: PeerContact,
    /// Other hosts to ask, in turn, when `from` does not have it, sends
    /// bytes that do not match the hash, or is silent for `FETCH_QUIET`.
    others: std::collections::VecDeque<PeerContact>,
    total: u64,
    buf: Vec<u8>,
    waiting: Vec<FetchFor>,
    /// The next chunk is due by then, else the next source is asked (or,
    /// with none, the same again).
    quiet_until: Instant,
    deadline: Instant,
}

/// How long a fetch waits for a chunk before asking again (another source if any).
const FETCH_QUIET: Duration = Duration::from_secs(3);

/// A member whose module could not be fetched at restart (every other
/// member down too, say) tries again this long after.
const RESTART_RETRY: Duration = Duration::from_secs(5);

/// The member threads on this host, by virtual peer. Their queues are also
/// in a concurrent map the network's reader tasks use to hand consensus
/// messages straight to the member (`Net::set_route`), so those never wait
/// behind API requests in the node's own queue.
#[derive(Debug, Default)]
pub struct Members {
    handles: HashMap<VpId, MemberHandle>,
    senders: Arc<DashMap<VpId, SyncSender<MemberEvent>>>,
}

impl std::ops::Deref for Members {
    type Target = HashMap<VpId, MemberHandle>;
    fn deref(&self) -> &Self::Target {
        &self.handles
    }
}

impl Members {
    pub fn insert(&mut self, vp: VpId, handle: MemberHandle) {
        self.senders.insert(vp, handle.sender());
        self.handles.insert(vp, handle);
    }

    pub fn remove(&mut self, vp: &VpId) -> Option<MemberHandle> {
        self.senders.remove(vp);
        self.handles.remove(vp)
    }

    pub fn drain(&mut self) -> impl Iterator<Item = (VpId, MemberHandle)> + '_ {
        self.senders.clear();
        self.handles.drain()
    }

    /// The queues by virtual peer, kept in step with the handles.
    pub fn senders(&self) -> Arc<DashMap<VpId, SyncSender<MemberEvent>>> {
        self.senders.clone()
    }
}

/// Hand a consensus message from `from` to a member thread's queue (from
/// the node or straight from a reader task), learning the sender's contact.
pub fn deliver_paxos(
    directory: &Directory,
    member: &SyncSender<MemberEvent>,
    vp: VpId,
    from: libp2p::PeerId,
    msg: vp_consensus::Message,
) {
    let host = consensus_host(host_id_of(&from));
    if directory.get(host).is_none_or(|c| c.peer != from) {
        directory.learn(
            host,
            &PeerContact {
                peer: from,
                addrs: Vec::new(),
            },
        );
    }
    if let Err(std::sync::mpsc::TrySendError::Full(_)) =
        member.try_send(MemberEvent::Paxos { from: host, msg })
    {
        tracing::warn!(%vp, "member queue full; consensus message dropped");
    }
}

/// A status asked of a virtual peer's leader.
struct StatusQuery {
    vp: VpId,
    reply: oneshot::Sender<Result<VpStatus, String>>,
    deadline: Instant,
    /// Also the guest's log lines after this (`vp-host logs`).
    log_after: Option<LogCursor>,
}

/// Everything the node keeps about virtual peers.
pub struct VpNode {
    pub sandbox: Arc<Sandbox>,
    pub modules: ModuleStore,
    /// Virtual peers destroyed while this host was a member of them.
    tombstones: Tombstones,
    /// Virtual peers other hosts said were destroyed (`VpWire::Destroyed`),
    /// at most `DESTROYED_SEEN_MAX`: asked about again, this host answers
    /// at once instead of locating members that are gone.
    destroyed_seen: HashSet<VpId>,
    /// The nonces of the last `LOCATE_NONCES` locates per virtual peer (a
    /// `Destroyed` answering one is believed), for at most `LOCATE_OPS_MAX`
    /// virtual peers (cleared when full).
    locate_nonces: HashMap<VpId, [u64; LOCATE_NONCES]>,
    /// Virtual peers whose founding deployment the spawning host undid
    /// (`VpWire::Undeploy`) before this host had started a member: one still
    /// fetching or compiling its module is refused when it gets there, not
    /// started as a member nobody will use (it held the host's room for
    /// good). At most `UNDONE_MAX`; a spawn never reuses an id.
    undone: HashSet<(VpId, libp2p::PeerId)>,
    /// The host that sent each founding deployment of a member here: the
    /// only one whose `Undeploy` is obeyed (any other peer could otherwise
    /// stop any member). Pruned to the members running at each insertion,
    /// so it holds at most one entry more than there are members.
    founded_by: HashMap<VpId, libp2p::PeerId>,
    /// Members of destroyed virtual peers, removed at the instant given
    /// (`DESTROY_LINGER` after the destroy was applied).
    destroying: HashMap<VpId, Instant>,
    /// This host is leaving (`vp-host drain`): when it last asked its
    /// virtual peers to replace it.
    pub(super) draining: Option<Instant>,
    /// This host runs more members than its `--memberships-max` (lowered
    /// since they were placed): when it last asked the excess to replace it.
    shedding: Option<Instant>,
    /// Members found on disk whose module could not be fetched yet: tried
    /// again at the instant given (`RESTART_RETRY` apart).
    restart_retry: HashMap<VpId, Instant>,
    pub directory: Directory,
    pub members: Members,
    pub member_tx: mpsc::Sender<MemberOutput>,
    outstanding: HashMap<(VpId, ClientId, u64), Outstanding>,
    leaders: HashMap<VpId, (HostId, PeerContact)>,
    locating: HashMap<VpId, Instant>,
    sessions: Vec<(ClientId, u64)>,
    samples: HashMap<u64, Sample>,
    /// Members that answered locates, per virtual peer (asked directly next time).
    members_seen: HashMap<VpId, HashMap<HostId, libp2p::PeerId>>,
    /// Peers whose connections all closed, and when (see `believable`).
    pub(super) gone: HashMap<libp2p::PeerId, Instant>,
    sample_searches: HashMap<OpId, u64>,
    resolving: HashMap<OpId, HostId>,
    /// Locate multicasts lately sent, by op (at most `LOCATE_OPS_MAX`).
    locate_ops: HashMap<OpId, VpId>,
    /// Virtual peers none of whose members ever answered here, whose key
    /// range the overlay reported empty (`AlmEvent::MulticastEmpty`), and
    /// since when: requests for one still unanswered `NOT_FOUND_AFTER` later
    /// fail with "not found" instead of waiting their whole timeout.
    empty: HashMap<VpId, Instant>,
    deploys: HashMap<u64, (oneshot::Sender<Result<(), String>>, Instant)>,
    fetches: HashMap<ModuleHash, Fetch>,
    status_queries: HashMap<u64, StatusQuery>,
    leader_waiters: HashMap<VpId, Vec<oneshot::Sender<HostId>>>,
    /// Names of virtual peers spawned from this host.
    names: HashMap<String, VpId>,
    /// Names of spawns from this host still under way.
    naming: HashSet<String>,
    next_op: u64,
    /// When unused modules were last deleted (`collect_modules`).
    modules_collected: Option<Instant>,
}

impl VpNode {
    pub fn new(
        sandbox: Arc<Sandbox>,
        modules: ModuleStore,
        tombstones: Tombstones,
        member_tx: mpsc::Sender<MemberOutput>,
    ) -> VpNode {
        VpNode {
            sandbox,
            modules,
            tombstones,
            destroyed_seen: HashSet::new(),
            locate_nonces: HashMap::new(),
            undone: HashSet::new(),
            founded_by: HashMap::new(),
            destroying: HashMap::new(),
            restart_retry: HashMap::new(),
            draining: None,
            shedding: None,
            modules_collected: None,
            directory: Directory::default(),
            members: Members::default(),
            member_tx,
            outstanding: HashMap::new(),
            leaders: HashMap::new(),
            locating: HashMap::new(),
            sessions: Vec::new(),
            samples: HashMap::new(),
            gone: HashMap::new(),
            members_seen: HashMap::new(),
            sample_searches: HashMap::new(),
            resolving: HashMap::new(),
            locate_ops: HashMap::new(),
            empty: HashMap::new(),
            deploys: HashMap::new(),
            fetches: HashMap::new(),
            status_queries: HashMap::new(),
            leader_waiters: HashMap::new(),
            names: HashMap::new(),
            naming: HashSet::new(),
            next_op: 1,
        }
    }

    fn op(&mut self) -> u64 {
        self.next_op += 1;
        self.next_op
    }

    /// Whether `vp` is known here to be destroyed.
    fn destroyed(&self, vp: VpId) -> bool {
        self.tombstones.contains(vp) || self.destroyed_seen.contains(&vp)
    }
}

/// Calls background tasks (spawn, replacement) make into the node.
#[derive(Debug)]
pub enum NodeCall {
    /// Find `want` live hosts through the overlay, least loaded first.
    Sample {
        want: usize,
        exclude: Vec<HostId>,
        /// The guest memory the member needs room for (`VpConfig::limits`).
        memory_bytes: u64,
        reply: oneshot::Sender<Vec<Candidate>>,
    },
    /// Deploy a virtual peer on `to`.
    Deploy {
        to: PeerContact,
        deploy: Box<Deploy>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Send a request to a virtual peer and wait for its reply.
    Send {
        req: Request,
        timeout: Duration,
        reply: oneshot::Sender<Result<WireResult, String>>,
    },
    /// Tell a local member thread something.
    ToMember { vp: VpId, event: MemberEvent },
    /// Wait until some member says who leads `vp`.
    AwaitLeader {
        vp: VpId,
        reply: oneshot::Sender<HostId>,
    },
    /// Forget a deployment (a spawn that failed elsewhere).
    Undeploy { to: PeerContact, vp: VpId },
    /// A spawn from this host that took a name ended: with `vp` when it
    /// succeeded (the name now resolves here), without when it failed (the
    /// name is free again). `recorded` answers once it is done.
    Named {
        name: String,
        vp: Option<VpId>,
        recorded: oneshot::Sender<()>,
    },
    /// Send the status query `op` about `vp` to its (now known) leader.
    QueryStatus { vp: VpId, op: u64 },
    /// A founding member's module finished compiling (off the node task):
    /// start the member and answer the deployment.
    Compiled {
        deploy: Box<Deploy>,
        reply_to: PeerContact,
        module: Result<Arc<crate::sandbox::LoadedModule>, String>,
    },
}

fn undone_text(vp: VpId) -> String {
    format!("the deployment of {vp} was undone by its spawn (it placed again)")
}

fn consensus_host(h: vp_alm::HostId) -> HostId {
    HostId(h.0)
}

impl Node {
    pub(super) fn vp_ctx(&self) -> MemberContext {
        MemberContext {
            me: consensus_host(self.me.host),
            me_contact: self.me.contact.clone(),
            data_dir: self.cfg.data_dir.clone(),
            sandbox: self.vps.sandbox.clone(),
            net: self.net.clone(),
            directory: self.vps.directory.clone(),
            node: self.vps.member_tx.clone(),
        }
    }

    /// Restart every virtual peer this host was a member of before it stopped.
    pub(super) fn recover_members(&mut self) {
        let dir = self.cfg.data_dir.join("vps");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".removed-") {
                // An undeployment the host stopped in the middle of.
                let _ = std::fs::remove_dir_all(entry.path());
                continue;
            }
            let Ok(vp) = name.parse::<VpId>() else {
                continue;
            };
            if self.vps.tombstones.contains(vp) {
                // Destroyed; the host stopped before it deleted the member.
                tracing::info!(%vp, "deleting the member of a destroyed virtual peer");
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::warn!(%vp, "cannot remove {}: {e}", entry.path().display());
                }
                continue;
            }
            self.restart_member(vp);
        }
    }

    /// Restart the member of `vp` from its directory. A module missing from
    /// the store (or corrupt) is fetched from the other members first.
    fn restart_member(&mut self, vp: VpId) {
        if self.vps.members.contains_key(&vp) || self.vps.tombstones.contains(vp) {
            return;
        }
        let dir = vp_dir(&self.cfg.data_dir, vp);
        let file = match MemberFile::read(&dir) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(%vp, "cannot restart this member ({e:#}); leaving it alone");
                return;
            }
        };
        let hash = file.config.module;
        let Some(bytes) = self.vps.modules.get(&hash) else {
            let sources: Vec<PeerContact> =
                saved_contacts(&dir).into_iter().map(|(_, c)| c).collect();
            if sources.is_empty() {
                tracing::error!(%vp, module = %hash.short(), "module missing from the store, and no other member's contact saved to fetch it from; cannot restart");
                return;
            }
            tracing::warn!(%vp, module = %hash.short(), sources = sources.len(), "module missing from the store; fetching it from the other members");
            self.fetch_module(
                hash,
                file.config.module_bytes,
                sources,
                FetchFor::Restart(vp),
            );
            return;
        };
        let started = Instant::now();
        let module = match self.vps.sandbox.load(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%vp, "module no longer loads: {e}");
                return;
            }
        };
        match start_member(self.vp_ctx(), module, vp, None) {
            Ok(handle) => {
                tracing::info!(
                    %vp,
                    module_load_ms = started.elapsed().as_millis() as u64,
                    "rejoined virtual peer from disk"
                );
                self.vps.members.insert(vp, handle);
            }
            Err(e) => tracing::error!(%vp, "cannot restart member: {e:#}"),
        }
    }

    /// Fetch module `hash` (`total` bytes) from the first of `sources` (the
    /// rest in turn if need be) for `waiter`; joins a fetch under way.
    fn fetch_module(
        &mut self,
        hash: ModuleHash,
        total: u64,
        sources: Vec<PeerContact>,
        waiter: FetchFor,
    ) {
        if let Some(fetch) = self.vps.fetches.get_mut(&hash) {
            fetch.waiting.push(waiter);
            for c in sources {
                if c.peer != fetch.from.peer && !fetch.others.iter().any(|o| o.peer == c.peer) {
                    fetch.others.push_back(c);
                }
            }
            return;
        }
        let mut others: std::collections::VecDeque<PeerContact> = sources.into();
        let Some(from) = others.pop_front() else {
            self.fail_fetch(waiter, "no host to fetch the module from".into());
            return;
        };
        tracing::info!(module = %hash.short(), from = %from.peer, "fetching module");
        self.send_vp(&from, VpWire::FetchModule { hash, offset: 0 });
        let now = Instant::now();
        let fetch = Fetch {
            from,
            others,
            total,
            buf: Vec::new(),
            waiting: vec![waiter],
            quiet_until: now + FETCH_QUIET,
            deadline: now + DEPLOY_TIMEOUT,
        };
        self.vps.fetches.insert(hash, fetch);
    }

    /// The fetch's source failed (`why`): ask the next one from the start,
    /// or, with none left, fail what waits.
    fn next_fetch_source(&mut self, hash: ModuleHash, why: String) {
        let Some(fetch) = self.vps.fetches.get_mut(&hash) else {
            return;
        };
        match fetch.others.pop_front() {
            Some(next) => {
                tracing::info!(module = %hash.short(), failed = %fetch.from.peer, next = %next.peer, "{why}; fetching the module from another host");
                fetch.from = next;
                fetch.buf.clear();
                fetch.quiet_until = Instant::now() + FETCH_QUIET;
                let from = fetch.from.clone();
                self.send_vp(&from, VpWire::FetchModule { hash, offset: 0 });
            }
            None => {
                let fetch = self.vps.fetches.remove(&hash).expect("present");
                for waiter in fetch.waiting {
                    self.fail_fetch(waiter, why.clone());
                }
            }
        }
    }

    fn fail_fetch(&mut self, waiter: FetchFor, why: String) {
        match waiter {
            FetchFor::Deploy(deploy, reply_to) => self.ack_deploy(&deploy, &reply_to, Err(why)),
            FetchFor::Restart(vp) => {
                tracing::warn!(%vp, "cannot restart this member yet: its module could not be fetched ({why}); trying again in {} s", RESTART_RETRY.as_secs());
                self.vps
                    .restart_retry
                    .insert(vp, Instant::now() + RESTART_RETRY);
            }
        }
    }

    // ---- frames ----------------------------------------------------------------------

    pub(super) fn on_paxos(&mut self, from: libp2p::PeerId, vp: VpId, msg: vp_consensus::Message) {
        match self.vps.members.senders().get(&vp) {
            Some(member) => deliver_paxos(&self.vps.directory, member.value(), vp, from, msg),
            None if self.vps.tombstones.contains(vp) => {
                // A member that was away when the virtual peer was destroyed.
                tracing::debug!(%vp, %from, "consensus message for a destroyed virtual peer");
                self.send_vp(
                    &PeerContact {
                        peer: from,
                        addrs: Vec::new(),
                    },
                    VpWire::Destroyed { vp, answers: 0 },
                );
            }
            None => {
                tracing::trace!(%vp, %from, "consensus message for a virtual peer this host is not in")
            }
        }
    }

    pub(super) fn on_vp_wire(&mut self, from: libp2p::PeerId, msg: VpWire) {
        match msg {
            VpWire::Locate {
                vp,
                nonce,
                reply_to,
            } => match self.vps.members.get(&vp) {
                Some(m) => {
                    m.send(MemberEvent::Locate { nonce, reply_to });
                }
                None if self.vps.tombstones.contains(vp) => {
                    let answers = u128::from(nonce);
                    self.send_vp(&reply_to, VpWire::Destroyed { vp, answers });
                }
                None => tracing::trace!(%vp, "locate for a virtual peer this host is not in"),
            },
            VpWire::Located {
                vp,
                nonce,
                leader,
                member,
                voters,
            } => {
                if from != self.me.contact.peer && !self.asked(vp, u128::from(nonce)) {
                    tracing::debug!(%vp, %from, "ignored a located answer to no recent locate of this host");
                    return;
                }
                tracing::debug!(%vp, %member, leader = ?leader.as_ref().map(|(h, _)| *h), voters = voters.len(), "located");
                self.remember_member(vp, member, from);
                // The voters it names are asked directly by later locates:
                // after a failover the overlay's route to the members may
                // still pass the dead host.
                for (host, contact) in voters.into_iter().take(VOTERS_NAMED_MAX) {
                    if contact.peer != self.me.contact.peer {
                        self.vps.directory.learn(host, &contact);
                        self.net
                            .add_addresses(contact.peer, contact.addrs.iter().cloned());
                        self.remember_member(vp, host, contact.peer);
                    }
                }
                if let Some((host, contact)) = leader.filter(|(_, c)| self.believable(c)) {
                    self.vps.directory.learn(host, &contact);
                    let known = self.vps.leaders.get(&vp).map(|(h, _)| *h) == Some(host);
                    self.vps.leaders.insert(vp, (host, contact));
                    self.vps.locating.remove(&vp);
                    for waiter in self.vps.leader_waiters.remove(&vp).unwrap_or_default() {
                        let _ = waiter.send(host);
                    }
                    // Every member answers a locate: only news of a leader
                    // sends the waiting requests again.
                    if !known {
                        self.flush_outstanding(vp);
                    }
                }
            }
            VpWire::Request(req) => match self.vps.members.get(&req.vp) {
                Some(m) => {
                    m.send(MemberEvent::Request(req));
                }
                None if self.vps.tombstones.contains(req.vp) => {
                    let (vp, answers) = (req.vp, req.client.0);
                    self.send_vp(&req.reply_to, VpWire::Destroyed { vp, answers });
                }
                None => {
                    let msg = VpWire::Redirect {
                        vp: req.vp,
                        client: req.client,
                        seq: req.seq,
                        leader: None,
                    };
                    self.send_vp(&req.reply_to, msg);
                }
            },
            VpWire::Reply(reply) => self.on_reply(from, reply),
            VpWire::Redirect {
                vp,
                client,
                seq,
                leader,
            } => {
                // Only a host the request went to knows its session.
                if !self.vps.outstanding.contains_key(&(vp, client, seq)) {
                    tracing::debug!(%vp, %from, "ignored a redirect of no request in flight");
                    return;
                }
                // Retry at once at a different leader; after a pause when the
                // redirecting host names itself (it is not ready) or nobody.
                let elsewhere = match leader {
                    Some((host, contact)) if contact.peer != from && self.believable(&contact) => {
                        self.vps.directory.learn(host, &contact);
                        self.vps.leaders.insert(vp, (host, contact));
                        true
                    }
                    _ => {
                        self.vps.leaders.remove(&vp);
                        false
                    }
                };
                if let Some(o) = self.vps.outstanding.get_mut(&(vp, client, seq)) {
                    if o.attempts == 1 || !elsewhere {
                        tracing::debug!(%vp, %from, elsewhere, attempts = o.attempts, "request redirected");
                    }
                    let delay = if elsewhere && o.attempts < 8 { 0 } else { 100 };
                    o.next_try = Instant::now() + Duration::from_millis(delay);
                }
                if !elsewhere {
                    // Ask the members now: they tell this host the new leader
                    // the moment they know it (and the request goes at once),
                    // rather than after the pause.
                    self.locate(vp);
                }
            }
            VpWire::Deploy(deploy) => {
                let reply_to = PeerContact {
                    peer: from,
                    addrs: Vec::new(),
                };
                self.on_deploy(deploy, reply_to);
            }
            VpWire::DeployAck { op, result, .. } => {
                if let Some((reply, _)) = self.vps.deploys.remove(&op) {
                    let _ = reply.send(result);
                }
            }
            VpWire::Undeploy { vp } => {
                if self.vps.members.contains_key(&vp) {
                    if self.vps.founded_by.get(&vp) == Some(&from) {
                        self.undeploy(vp);
                    } else {
                        tracing::warn!(%vp, %from, "ignored an undeploy from a host that did not deploy this member");
                    }
                } else {
                    if self.vps.undone.len() >= UNDONE_MAX {
                        self.vps.undone.clear();
                    }
                    self.vps.undone.insert((vp, from));
                }
            }
            VpWire::Destroyed { vp, answers } => {
                let host = consensus_host(host_id_of(&from));
                if let Some(m) = self.vps.members.get(&vp) {
                    // The member believes it only from one of its voters.
                    m.send(MemberEvent::PeerDestroyed(host));
                    return;
                }
                if !self.asked(vp, answers) {
                    tracing::debug!(%vp, %from, "ignored a destroyed notice that answers no locate or request of this host");
                    return;
                }
                if self.vps.destroyed_seen.len() >= DESTROYED_SEEN_MAX {
                    self.vps.destroyed_seen.clear();
                }
                self.vps.destroyed_seen.insert(vp);
                self.forget_destroyed(vp);
            }
            VpWire::FetchModule { hash, offset } => {
                let msg = match self.vps.modules.get(&hash) {
                    Some(bytes) if (offset as usize) < bytes.len() || bytes.is_empty() => {
                        let start = offset as usize;
                        let end = (start + MODULE_CHUNK_BYTES).min(bytes.len());
                        VpWire::ModuleChunk {
                            hash,
                            offset,
                            total: bytes.len() as u64,
                            bytes: bytes[start..end].to_vec(),
                        }
                    }
                    _ => VpWire::ModuleMissing { hash },
                };
                self.send_vp(
                    &PeerContact {
                        peer: from,
                        addrs: Vec::new(),
                    },
                    msg,
                );
            }
            VpWire::ModuleChunk {
                hash,
                offset,
                total,
                bytes,
            } => self.on_module_chunk(from, hash, offset, total, bytes),
            VpWire::ModuleMissing { hash } => {
                if self
                    .vps
                    .fetches
                    .get(&hash)
                    .is_some_and(|f| f.from.peer == from)
                {
                    let why = format!("module {} is not available from {from}", hash.short());
                    self.next_fetch_source(hash, why);
                }
            }
            VpWire::LoadQuery { op, memory_bytes } => {
                let memberships = self.vps.members.len() as u32;
                let room = self.has_room(memory_bytes);
                let neighbours = self.overlay_neighbours();
                self.send_vp(
                    &PeerContact {
                        peer: from,
                        addrs: Vec::new(),
                    },
                    VpWire::Load {
                        op,
                        memberships,
                        room,
                        neighbours,
                    },
                );
            }
            VpWire::Load {
                op,
                memberships,
                room,
                neighbours,
            } => {
                let gone = &self.vps.gone;
                if let Some(sample) = self.vps.samples.get_mut(&op) {
                    sample.answered(
                        consensus_host(host_id_of(&from)),
                        room.then_some(memberships),
                    );
                    let named = neighbours
                        .into_iter()
                        .take(LOAD_NEIGHBOURS_MAX)
                        .filter(|(_, c)| !gone.contains_key(&c.peer));
                    let ask = sample.named(named);
                    let memory_bytes = sample.memory_bytes;
                    for contact in ask {
                        self.send_vp(&contact, VpWire::LoadQuery { op, memory_bytes });
                    }
                    // Decide as soon as the answers allow, not at the next tick.
                    self.sample_tick(Instant::now());
                }
            }
            VpWire::Drain { vp } => {
                if let Some(m) = self.vps.members.get(&vp) {
                    m.send(MemberEvent::Drain(consensus_host(host_id_of(&from))));
                }
            }
            VpWire::StatusQuery { vp, op, log_after } => {
                let (tx, rx) = oneshot::channel();
                if let Some(tx) = self.local_vp_status(vp, log_after, tx) {
                    let why = if self.vps.tombstones.contains(vp) {
                        destroyed_text(vp)
                    } else {
                        format!("this host is no longer a member of virtual peer {vp}")
                    };
                    let _ = tx.send(Err(why));
                }
                let net = self.net.clone();
                tokio::spawn(async move {
                    let status = match tokio::time::timeout(Duration::from_secs(5), rx).await {
                        Ok(Ok(result)) => result.map(Box::new),
                        _ => Err("the member did not answer".to_string()),
                    };
                    let _ = net.send(from, &Wire::Vp(VpWire::StatusReply { op, status }));
                });
            }
            VpWire::StatusReply { op, status } => {
                if let Some(q) = self.vps.status_queries.remove(&op) {
                    let _ = q.reply.send(status.map(|s| *s));
                }
            }
        }
    }

    pub(super) fn send_vp(&self, to: &PeerContact, msg: VpWire) {
        if to.peer == self.me.contact.peer {
            let _ = self.net.send_local(Wire::Vp(msg));
            return;
        }
        self.net.add_addresses(to.peer, to.addrs.iter().cloned());
        if let Err(e) = self.net.send(to.peer, &Wire::Vp(msg)) {
            tracing::debug!(peer = %to.peer, "not sent: {e}");
        }
    }

    /// An overlay multicast reached one of our keys; virtual-peer traffic
    /// carries a `VpWire` payload.
    pub(super) fn on_vp_delivery(&mut self, origin: &PeerContact, payload: &[u8]) -> bool {
        match vp_guest_sdk::abi::decode::<VpWire>(payload) {
            Ok(msg) => {
                self.on_vp_wire(origin.peer, msg);
                true
            }
            Err(_) => false,
        }
    }

    // ---- member outputs --------------------------------------------------------------

    pub(super) fn on_member_output(&mut self, output: MemberOutput) {
        let now = self.now();
        match output {
            MemberOutput::Key { vp, insert } => {
                let key = member_key(vp, self.me.host);
                let result = if insert {
                    let introducer = self.introducers.first().cloned();
                    self.alm.insert_key(now, key, introducer)
                } else {
                    self.alm.remove_key(now, &key)
                };
                if let Err(e) = result {
                    tracing::warn!(%vp, insert, "overlay key change failed: {e}");
                }
            }
            MemberOutput::Outbound(req) => {
                let key = (req.vp, req.client, req.seq);
                let caller = VpId(req.client.0 as u64);
                match self.vps.outstanding.get_mut(&key) {
                    Some(o) => o.req.ack_below = req.ack_below,
                    None => self.start_request(req, Waiter::Member(caller), OUTBOUND_TIMEOUT),
                }
            }
            MemberOutput::FindReplacement { vp, dead, members } => {
                let Some(handle) = self.vps.members.get(&vp) else {
                    return;
                };
                let config = handle.config.clone();
                self.start_replacement(config, dead, members);
            }
            MemberOutput::Removed { vp, voters } => {
                // A restarted host that learns it was replaced is often the
                // host its clients use next (`vp-host bench failover` uses
                // it): without this it knew no member and its locates went
                // through an overlay it had just rejoined (once 4.4 s).
                let me = self.me.host.0;
                for host in voters.into_iter().filter(|h| h.0 != me) {
                    if let Some(contact) = self.vps.directory.get(host) {
                        self.remember_member(vp, host, contact.peer);
                    }
                }
                if let Some(handle) = self.vps.members.remove(&vp) {
                    let dir = vp_dir(&self.cfg.data_dir, vp);
                    tokio::task::spawn_blocking(move || {
                        handle.stop();
                        if let Err(e) = std::fs::remove_dir_all(&dir) {
                            tracing::warn!(%vp, "cannot remove {}: {e}", dir.display());
                        }
                    });
                }
                // Requests this host's copy was answering (an old copy that
                // restarted and just learned it was replaced) go to the
                // current members now, not at their next retry.
                let me = self.me.contact.peer;
                if self.vps.leaders.get(&vp).is_some_and(|(_, c)| c.peer == me) {
                    self.vps.leaders.remove(&vp);
                }
                self.vps.locating.remove(&vp);
                self.flush_outstanding(vp);
            }
            MemberOutput::Failed { vp, why } => {
                tracing::error!(%vp, "member stopped: {why}");
                if let Some(handle) = self.vps.members.remove(&vp) {
                    tokio::task::spawn_blocking(move || handle.stop());
                }
            }
            MemberOutput::Destroyed { vp } => {
                // The tombstone first: a host stopped after it deletes the
                // member at start instead of restarting it.
                if let Err(e) = self.vps.tombstones.add(vp) {
                    tracing::error!(%vp, "cannot record that the virtual peer was destroyed: {e:#}");
                }
                self.vps
                    .destroying
                    .insert(vp, Instant::now() + DESTROY_LINGER);
                self.forget_destroyed(vp);
            }
            MemberOutput::Resolve(host) => self.resolve(now, host),
        }
    }

    /// `vp` was destroyed: answer what waits here for it (a destroy with
    /// success, anything else with the error), and forget its leader,
    /// members and name.
    fn forget_destroyed(&mut self, vp: VpId) {
        let keys = self.outstanding_for(vp);
        for key in keys {
            let Some(o) = self.vps.outstanding.remove(&key) else {
                continue;
            };
            let client = !matches!(o.waiter, Waiter::Member(_));
            let result = if o.req.destroy {
                Ok(Ok(Vec::new().into()))
            } else {
                Err(destroyed_text(vp))
            };
            o.waiter.answer(&self.vps.members, key.2, result);
            if client {
                self.return_session(key.1, key.2);
            }
        }
        // `members_seen` stays: asked again, they answer `Destroyed` too.
        self.vps.leaders.remove(&vp);
        self.vps.locating.remove(&vp);
        self.vps.leader_waiters.remove(&vp);
        self.fail_status_queries(vp, &destroyed_text(vp));
        self.vps.names.retain(|_, v| *v != vp);
    }

    /// Look up `host`'s contact in the overlay (its host key); the answer
    /// goes to the directory and the network's address book.
    fn resolve(&mut self, now: vp_alm::Time, host: HostId) {
        if self.vps.resolving.values().any(|h| *h == host) {
            return;
        }
        if let Ok(op) = self.alm.search(now, host_key(vp_alm::HostId(host.0))) {
            self.vps.resolving.insert(op, host);
        }
    }

    /// `resolve` the host behind `peer`.
    pub(super) fn resolve_host(&mut self, peer: libp2p::PeerId) {
        let now = self.now();
        self.resolve(now, consensus_host(super::overlay::host_id_of(&peer)));
    }

    /// A search this module started finished (placement or resolving a host).
    pub(super) fn on_vp_search(
        &mut self,
        op: OpId,
        found: Option<&vp_alm::NodeRef<PeerContact>>,
        next: Option<&vp_alm::NodeRef<PeerContact>>,
    ) -> bool {
        if let Some(host) = self.vps.resolving.remove(&op) {
            if let Some(n) = found.filter(|n| n.host.0 == host.0) {
                self.vps.directory.learn(host, &n.contact);
                let peer = n.contact.peer;
                self.net
                    .add_addresses(peer, n.contact.addrs.iter().cloned());
                // Requests whose leader could not be dialed go again now.
                for vp in self.led_by(peer) {
                    self.flush_outstanding(vp);
                }
            }
            return true;
        }
        if let Some(sample_op) = self.vps.sample_searches.remove(&op) {
            if let Some(sample) = self.vps.samples.get_mut(&sample_op) {
                sample.searches -= 1;
                // Both keys around the random point count as drawn: a search
                // ends at the one on the side it arrives from, and all of this
                // host's searches arrive from its own key, so counting only
                // that one left a host at an end of the list almost never drawn.
                for n in found.into_iter().chain(next) {
                    let host = consensus_host(n.host);
                    if !sample.exclude.contains(&host) {
                        sample.candidates.insert(host, n.contact.clone());
                    }
                }
                self.sample_tick(Instant::now());
            }
            return true;
        }
        false
    }

    // ---- requests to virtual peers -----------------------------------------------------

    /// A session for a new API request: (client id, seq), reused when free.
    pub(super) fn take_session(&mut self) -> (ClientId, u64) {
        self.vps
            .sessions
            .pop()
            .unwrap_or_else(|| (new_session_id(), 1))
    }

    fn return_session(&mut self, client: ClientId, seq: u64) {
        if self.vps.sessions.len() < 4096 {
            self.vps.sessions.push((client, seq + 1));
        }
    }

    pub(super) fn start_request(&mut self, req: Request, waiter: Waiter, timeout: Duration) {
        if self.vps.outstanding.len() >= OUTSTANDING_MAX {
            // A member's outbound message is resent from its outbox later.
            if !matches!(waiter, Waiter::Member(_)) {
                let why = "this host has too many requests in flight";
                waiter.answer(&self.vps.members, req.seq, Err(why.into()));
            }
            return;
        }
        let key = (req.vp, req.client, req.seq);
        let now = Instant::now();
        let o = Outstanding {
            req,
            waiter,
            attempts: 0,
            next_try: now,
            deadline: now + timeout,
        };
        self.vps.outstanding.insert(key, o);
        self.try_request(key);
    }

    fn try_request(&mut self, key: (VpId, ClientId, u64)) {
        let vp = key.0;
        let leader = self.vps.leaders.get(&vp).cloned();
        let Some(o) = self.vps.outstanding.get_mut(&key) else {
            return;
        };
        o.attempts += 1;
        // 100, 200, then every 300 ms: a retry is safe and cheap (same session
        // and sequence number; a leader ignores a request it already
        // proposed), and a request lost in a leader change should not wait.
        // Without a known leader, ask the members again soon (an election
        // takes tens of milliseconds), for a second; then less often (a
        // virtual peer nobody answers for: unknown, destroyed, or all its
        // members unreachable).
        let backoff = if leader.is_some() {
            Duration::from_millis(100 * u64::from(o.attempts.min(3)))
        } else if o.attempts <= LOCATE_FAST_ATTEMPTS {
            LOCATE_RETRY
        } else {
            LOCATE_RETRY_SLOW
        };
        o.next_try = Instant::now() + backoff;
        let retry = o.attempts > 1;
        match leader {
            Some((_, contact)) => {
                let req = o.req.clone();
                match self.vps.members.get(&vp) {
                    // The leader is here: straight to its thread (what the
                    // node would do with the request on its own queue).
                    Some(m) if contact.peer == self.me.contact.peer => {
                        m.send(MemberEvent::Request(req));
                    }
                    _ => self.send_vp(&contact, VpWire::Request(req)),
                }
                // No answer last time: the leader may have changed without
                // this host hearing of it; ask the members too.
                if retry {
                    self.locate(vp);
                }
            }
            None => self.locate(vp),
        }
    }

    /// Whether `answers` names a locate for `vp` this host sent lately or a
    /// request for it still in flight (what a `Destroyed` must answer).
    fn asked(&self, vp: VpId, answers: u128) -> bool {
        answers != 0
            && (self
                .vps
                .locate_nonces
                .get(&vp)
                .is_some_and(|n| n.iter().any(|&x| u128::from(x) == answers))
                || self
                    .vps
                    .outstanding
                    .keys()
                    .any(|k| k.0 == vp && k.1.0 == answers))
    }

    /// Ask the virtual peer's members (a multicast over its key prefix) who leads.
    fn locate(&mut self, vp: VpId) {
        let now = Instant::now();
        if self
            .vps
            .locating
            .get(&vp)
            .is_some_and(|t| now.duration_since(*t) < LOCATE_RETRY)
        {
            return;
        }
        self.vps.locating.insert(vp, now);
        let nonce = rand::random::<u64>() | 1;
        if self.vps.locate_nonces.len() >= LOCATE_OPS_MAX {
            self.vps.locate_nonces.clear();
        }
        let nonces = self.vps.locate_nonces.entry(vp).or_default();
        nonces.rotate_right(1);
        nonces[0] = nonce;
        let msg = VpWire::Locate {
            vp,
            nonce,
            reply_to: self.me.contact.clone(),
        };
        let payload = match vp_guest_sdk::abi::encode(&msg) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("cannot encode a locate: {e}");
                return;
            }
        };
        // Members that answered before are asked directly: the overlay may
        // still route through a host that just died until it repairs.
        let known: Vec<PeerContact> = self
            .vps
            .members_seen
            .get(&vp)
            .map(|m| {
                m.values()
                    .filter(|p| !self.vps.gone.contains_key(p))
                    .map(|p| PeerContact {
                        peer: *p,
                        addrs: Vec::new(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        tracing::debug!(%vp, asked_directly = known.len(), "locating the leader (and through the overlay)");
        for contact in known {
            self.send_vp(&contact, msg.clone());
        }
        // A local member answers at once; others through the overlay.
        if let Some(m) = self.vps.members.get(&vp) {
            m.send(MemberEvent::Locate {
                nonce: 0,
                reply_to: self.me.contact.clone(),
            });
        }
        let at = self.now();
        match self.alm.multicast(
            at,
            KeyRange::prefix(&vp_prefix(vp)),
            vp_alm::Bytes::copy_from(&payload),
        ) {
            Ok(op) => {
                if self.vps.locate_ops.len() >= LOCATE_OPS_MAX {
                    self.vps.locate_ops.clear();
                }
                self.vps.locate_ops.insert(op, vp);
            }
            Err(e) => tracing::debug!(%vp, "cannot multicast a locate: {e}"),
        }
    }

    /// (Part of) a multicast's range held no key. For a locate of a virtual
    /// peer no member of which ever answered here, the range is all of it.
    pub(super) fn on_multicast_empty(&mut self, op: OpId) {
        let Some(&vp) = self.vps.locate_ops.get(&op) else {
            return;
        };
        if self.vps.members_seen.contains_key(&vp) || self.vps.members.contains_key(&vp) {
            return;
        }
        if self.vps.empty.len() >= LOCATE_OPS_MAX {
            self.vps.empty.clear();
        }
        self.vps.empty.entry(vp).or_insert_with(Instant::now);
    }

    /// Leaving: once a second, ask each virtual peer this host is a member of
    /// to replace it (through its own member: it leads, or knows who does).
    fn drain_tick(&mut self, now: Instant) {
        if self
            .vps
            .draining
            .is_some_and(|asked| now.duration_since(asked) >= DRAIN_ASK_EVERY)
        {
            self.ask_to_be_replaced(now);
        }
    }

    /// A host restarted with a lower `--memberships-max` than the members it
    /// runs hands the excess over as a leaving host hands over all of them
    /// (the virtual peers with the largest ids first, so each ask picks the
    /// same ones), once a second until it is within its limit.
    fn shed_tick(&mut self, now: Instant) {
        let excess = self
            .vps
            .members
            .len()
            .saturating_sub(self.memberships_max());
        if excess == 0 || self.vps.draining.is_some() {
            self.vps.shedding = None;
            return;
        }
        if self
            .vps
            .shedding
            .is_some_and(|asked| now.duration_since(asked) < DRAIN_ASK_EVERY)
        {
            return;
        }
        if self.vps.shedding.is_none() {
            tracing::info!(
                memberships = self.vps.members.len(),
                memberships_max = self.memberships_max(),
                "more members than --memberships-max: asking {excess} virtual peer(s) to \
                 replace this host"
            );
        }
        self.vps.shedding = Some(now);
        let me = consensus_host(self.me.host);
        let mut members: Vec<_> = self.vps.members.iter().collect();
        members.sort_unstable_by(|a, b| b.0.cmp(a.0));
        for (_, m) in members.into_iter().take(excess) {
            m.send(MemberEvent::Drain(me));
        }
    }

    /// Start leaving (`vp-host drain`) or stop (`vp-host drain --cancel`).
    /// The choice is saved first (`draining` in the data directory), so a
    /// host restarted while leaving goes on leaving.
    fn set_draining(&mut self, leave: bool) -> Result<(), String> {
        let path = self.cfg.data_dir.join(DRAINING_FILE);
        if leave == self.vps.draining.is_some() && leave == path.exists() {
            return Ok(());
        }
        if leave {
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            crate::exec::write_atomically(&path, format!("{since}\n").as_bytes())
                .map_err(|e| format!("cannot save that this host is leaving: {e:#}"))?;
            tracing::info!(
                memberships = self.vps.members.len(),
                "leaving: taking no new member, asking each virtual peer to replace this host"
            );
            self.ask_to_be_replaced(Instant::now());
        } else {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
            }
            crate::exec::sync_dir(&self.cfg.data_dir)
                .map_err(|e| format!("cannot save that this host stays: {e:#}"))?;
            tracing::info!("staying (vp-host drain --cancel): this host takes members again");
            self.vps.draining = None;
        }
        Ok(())
    }

    /// A host restarted while leaving goes on leaving.
    pub(super) fn resume_draining(&mut self) {
        if self.cfg.data_dir.join(DRAINING_FILE).exists() {
            tracing::info!(
                "this host was leaving (vp-host drain) when it stopped: it goes on handing over \
                 its members and takes no new one (vp-host drain --cancel to stay)"
            );
            // (a member not yet in touch with its leader drops the request;
            // it is asked again every `DRAIN_ASK_EVERY`)
            self.ask_to_be_replaced(Instant::now());
        }
    }

    fn ask_to_be_replaced(&mut self, now: Instant) {
        self.vps.draining = Some(now);
        let me = consensus_host(self.me.host);
        for m in self.vps.members.values() {
            m.send(MemberEvent::Drain(me));
        }
    }

    /// Answer every status query waiting for `vp` with `why`.
    fn fail_status_queries(&mut self, vp: VpId, why: &str) {
        for op in keys_where(&self.vps.status_queries, |q| q.vp == vp) {
            if let Some(q) = self.vps.status_queries.remove(&op) {
                let _ = q.reply.send(Err(why.to_string()));
            }
        }
    }

    /// Fail what waits for virtual peers found nowhere for `NOT_FOUND_AFTER`.
    fn fail_not_found(&mut self, now: Instant) {
        let gone = keys_where(&self.vps.empty, |since| {
            now.duration_since(*since) >= NOT_FOUND_AFTER
        });
        for vp in gone {
            self.vps.empty.remove(&vp);
            let keys = self.outstanding_for(vp);
            if keys.is_empty() && !self.vps.status_queries.values().any(|q| q.vp == vp) {
                continue;
            }
            tracing::info!(%vp, "virtual peer not found");
            for key in keys {
                let o = self.vps.outstanding.remove(&key).expect("present");
                o.waiter
                    .answer(&self.vps.members, key.2, Err(not_found_text(vp)));
            }
            self.fail_status_queries(vp, &not_found_text(vp));
            self.vps.leader_waiters.remove(&vp);
            self.vps.locating.remove(&vp);
        }
    }

    /// Remember that `peer` (host `member`) answered for `vp`: later locates
    /// ask it directly. Bounded per virtual peer and in the number of them.
    fn remember_member(&mut self, vp: VpId, member: HostId, peer: libp2p::PeerId) {
        if !self.vps.members_seen.contains_key(&vp)
            && self.vps.members_seen.len() >= MEMBERS_SEEN_VPS_MAX
        {
            self.vps.members_seen.clear();
        }
        self.vps.empty.remove(&vp);
        let seen = self.vps.members_seen.entry(vp).or_default();
        if seen.len() >= MEMBERS_SEEN_PER_VP_MAX && !seen.contains_key(&member) {
            seen.clear();
        }
        seen.insert(member, peer);
    }

    /// Every connection to `peer` closed, or it cannot be dialled: tell the
    /// member threads (a lost leader is replaced by an election at once),
    /// forget it as a leader, and retry what was waiting on it.
    pub(super) fn on_peer_gone(&mut self, peer: libp2p::PeerId) {
        let host = consensus_host(super::overlay::host_id_of(&peer));
        self.vps.gone.insert(peer, Instant::now());
        for m in self.vps.members.values() {
            m.send(MemberEvent::PeerDown(host));
        }
        for vp in self.led_by(peer) {
            self.vps.leaders.remove(&vp);
            self.flush_outstanding(vp);
        }
    }

    /// The virtual peers whose cached leader is `peer`.
    fn led_by(&self, peer: libp2p::PeerId) -> Vec<VpId> {
        self.vps
            .leaders
            .iter()
            .filter(|(_, (_, c))| c.peer == peer)
            .map(|(vp, _)| *vp)
            .collect()
    }

    /// A leader hint naming a host whose connections closed lately is stale
    /// (members keep believing in a dead leader until they elect another).
    fn believable(&mut self, contact: &PeerContact) -> bool {
        match self.vps.gone.get(&contact.peer) {
            Some(t) if t.elapsed() < GONE_FORGET => {
                // It may be back (restarted, and since elected): dial it. A
                // connection clears `gone` and the next locate believes the
                // hint; this host need not have talked to it since. Without
                // this a client's host ignored a restarted host that became
                // leader for up to GONE_FORGET (once 1.5 s after a failover).
                self.net.connect(contact.peer);
                false
            }
            Some(_) => {
                self.vps.gone.remove(&contact.peer);
                true
            }
            None => true,
        }
    }

    /// The requests waiting for `vp`.
    fn outstanding_for(&self, vp: VpId) -> Vec<(VpId, ClientId, u64)> {
        self.vps
            .outstanding
            .keys()
            .filter(|k| k.0 == vp)
            .copied()
            .collect()
    }

    fn flush_outstanding(&mut self, vp: VpId) {
        let keys = self.outstanding_for(vp);
        for key in keys {
            self.try_request(key);
        }
    }

    fn on_reply(&mut self, from: libp2p::PeerId, reply: Reply) {
        // Only an answer to a request in flight is believed (and teaches who
        // leads): the session id is known only to the hosts it went to.
        let Some(o) = self
            .vps
            .outstanding
            .remove(&(reply.vp, reply.client, reply.seq))
        else {
            return;
        };
        let contact = PeerContact {
            peer: from,
            addrs: Vec::new(),
        };
        if from != self.me.contact.peer {
            self.remember_member(reply.vp, reply.leader, from);
        }
        self.vps.leaders.insert(reply.vp, (reply.leader, contact));
        let client = !matches!(o.waiter, Waiter::Member(_));
        o.waiter
            .answer(&self.vps.members, reply.seq, Ok(reply.result));
        if client {
            self.return_session(reply.client, reply.seq);
        }
    }

    /// Retry what is due; fail what is too old; expire other operations.
    pub(super) fn vp_tick(&mut self) {
        let now = Instant::now();
        let due = keys_where(&self.vps.outstanding, |o| o.next_try <= now);
        for key in due {
            let Some(o) = self.vps.outstanding.get(&key) else {
                continue;
            };
            if now >= o.deadline {
                let o = self.vps.outstanding.remove(&key).expect("present");
                let why = format!(
                    "virtual peer {} did not answer in time ({} attempts)",
                    key.0, o.attempts
                );
                o.waiter.answer(&self.vps.members, key.2, Err(why));
                continue;
            }
            if o.attempts >= 2 {
                // The cached leader may be stale: ask the members again.
                self.vps.leaders.remove(&key.0);
            }
            self.try_request(key);
        }
        self.fail_not_found(now);
        self.drain_tick(now);
        self.shed_tick(now);
        self.sample_tick(now);
        if self
            .vps
            .modules_collected
            .is_none_or(|t| now.duration_since(t) >= MODULES_COLLECT_EVERY)
        {
            self.vps.modules_collected = Some(now);
            self.collect_modules();
        }
        self.vps.leader_waiters.retain(|_, w| {
            w.retain(|tx| !tx.is_closed());
            !w.is_empty()
        });
        let awaiting: Vec<VpId> = self.vps.leader_waiters.keys().copied().collect();
        for vp in awaiting {
            self.locate(vp);
        }
        self.vps.deploys.retain(|_, (_, deadline)| *deadline > now);
        self.vps.gone.retain(|_, t| t.elapsed() < GONE_FORGET);
        let expired = keys_where(&self.vps.status_queries, |q| q.deadline <= now);
        for op in expired {
            if let Some(StatusQuery { vp, reply, .. }) = self.vps.status_queries.remove(&op) {
                let _ = reply.send(Err(format!(
                    "no member of virtual peer {vp} answered (it may not exist, or its \
                     members are unreachable)"
                )));
            }
        }
        for vp in take_due(&mut self.vps.destroying, now) {
            self.undeploy(vp);
        }
        for vp in take_due(&mut self.vps.restart_retry, now) {
            self.restart_member(vp);
        }
        let expired = keys_where(&self.vps.fetches, |f| f.deadline <= now);
        for hash in expired {
            if let Some(fetch) = self.vps.fetches.remove(&hash) {
                for waiter in fetch.waiting {
                    self.fail_fetch(waiter, "fetching the module timed out".into());
                }
            }
        }
        // A silent source: the next one, or (the only one) asked again
        // where the transfer stopped.
        let quiet = keys_where(&self.vps.fetches, |f| f.quiet_until <= now);
        for hash in quiet {
            let Some(fetch) = self.vps.fetches.get_mut(&hash) else {
                continue;
            };
            if fetch.others.is_empty() {
                fetch.quiet_until = now + FETCH_QUIET;
                let (from, offset) = (fetch.from.clone(), fetch.buf.len() as u64);
                self.send_vp(&from, VpWire::FetchModule { hash, offset });
            } else {
                let silent = fetch.from.clone();
                fetch.others.push_back(silent.clone());
                let why = format!(
                    "no answer from {} in {} s",
                    silent.peer,
                    FETCH_QUIET.as_secs()
                );
                self.next_fetch_source(hash, why);
            }
        }
    }

    // ---- placement ----------------------------------------------------------------------

    /// Start sampling hosts: searches for random points in the host-key range
    /// (each finds the nearest host key, so hosts are drawn about uniformly),
    /// then a load query to every distinct host found.
    pub(super) fn start_sample(
        &mut self,
        want: usize,
        exclude: Vec<HostId>,
        memory_bytes: u64,
        reply: oneshot::Sender<Vec<Candidate>>,
    ) {
        let op = self.vps.op();
        let now = self.now();
        let mut searches = 0;
        for _ in 0..sample_size(want) {
            let key = Key::new(format!("h/{:016x}", rand::random::<u64>()).into_bytes());
            if let Ok(search) = self.alm.search(now, key) {
                self.vps.sample_searches.insert(search, op);
                searches += 1;
            }
        }
        // This host is a candidate too, and so are hosts it has heard from
        // (a small network's searches keep finding the same few hosts; the
        // load query below tells the live ones).
        let mut candidates = HashMap::new();
        let me = consensus_host(self.me.host);
        if !exclude.contains(&me) {
            candidates.insert(me, self.me.contact.clone());
        }
        let gone = &self.vps.gone;
        for (host, contact) in self.vps.directory.sample(sample_size(want), |h, c| {
            h == me || exclude.contains(&h) || gone.contains_key(&c.peer)
        }) {
            candidates.insert(host, contact);
        }
        let sample = Sample {
            want,
            memory_bytes,
            exclude: exclude.into_iter().collect(),
            searches,
            candidates,
            loads: HashMap::new(),
            started: Instant::now(),
            asked: None,
            deadline: Instant::now() + SAMPLE_DEADLINE,
            reply,
        };
        self.vps.samples.insert(op, sample);
    }

    /// This host's overlay neighbours at levels 0 and 1 (both sides), for a
    /// `Load` answer.
    fn overlay_neighbours(&self) -> Vec<(HostId, PeerContact)> {
        let mut found: Vec<(HostId, PeerContact)> = Vec::new();
        let Some(node) = self.alm.node(&host_key(self.me.host)) else {
            return found;
        };
        for n in node.levels.iter().take(2).flatten().flatten() {
            let host = consensus_host(n.host);
            if n.host != self.me.host && !found.iter().any(|(h, _)| *h == host) {
                found.push((host, n.contact.clone()));
            }
        }
        found.truncate(LOAD_NEIGHBOURS_MAX);
        found
    }

    /// The most virtual peers this host runs a member of.
    pub(super) fn memberships_max(&self) -> usize {
        self.cfg.memberships_max.min(MEMBERSHIPS_MAX)
    }

    /// The guest memory this host's members may grow to, together.
    pub(super) fn guest_memory_committed(&self) -> u64 {
        self.vps
            .members
            .values()
            .map(|m| m.config.limits.memory_bytes_max)
            .sum()
    }

    /// Whether this host takes a member of one more virtual peer, whose
    /// guest may grow to `memory_bytes`; if not, why.
    fn room_for(&self, memory_bytes: u64) -> Result<(), String> {
        if self.vps.draining.is_some() {
            return Err("this host is leaving (vp-host drain)".into());
        }
        if self.vps.members.len() >= self.memberships_max() {
            return Err(format!(
                "this host runs members of {} virtual peers, its limit (--memberships-max {})",
                self.vps.members.len(),
                self.memberships_max()
            ));
        }
        let committed = self.guest_memory_committed();
        if committed.saturating_add(memory_bytes) > self.cfg.guest_memory_max {
            return Err(format!(
                "this host lends {} of guest memory (--guest-memory-max) and has committed {} \
                 to its members; a guest of up to {} more does not fit",
                size_text(self.cfg.guest_memory_max),
                size_text(committed),
                size_text(memory_bytes)
            ));
        }
        Ok(())
    }

    fn has_room(&self, memory_bytes: u64) -> bool {
        self.room_for(memory_bytes).is_ok()
    }

    /// Delete the stored modules no member here runs that were not stored or
    /// used for `MODULE_UNUSED_KEEP` (vp/modules.rs). On this task, so that
    /// no deployment starts between the check and the deletion. A member file
    /// that cannot be read stops it: its module might be the one in use.
    fn collect_modules(&mut self) {
        let forgotten = self.vps.tombstones.collect(TOMBSTONE_KEEP, TOMBSTONES_MAX);
        if forgotten > 0 {
            tracing::info!(
                forgotten,
                "forgot old tombstones of destroyed virtual peers"
            );
        }
        let mut in_use: HashSet<ModuleHash> =
            self.vps.members.values().map(|m| m.config.module).collect();
        match modules_in_use(&self.cfg.data_dir) {
            Ok(on_disk) => in_use.extend(on_disk),
            Err(e) => {
                tracing::warn!("unused modules not deleted: {e:#}");
                return;
            }
        }
        match self.vps.modules.collect(&in_use, MODULE_UNUSED_KEEP) {
            Ok(deleted) if !deleted.is_empty() => {
                let names: Vec<String> = deleted.iter().map(ModuleHash::short).collect();
                tracing::info!(modules = ?names, "deleted modules no member here runs");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("unused modules not deleted: {e:#}"),
        }
    }

    fn sample_tick(&mut self, now: Instant) {
        let me = consensus_host(self.me.host);
        let ops: Vec<u64> = self.vps.samples.keys().copied().collect();
        for op in ops {
            let memory_bytes = self.vps.samples.get(&op).expect("present").memory_bytes;
            let my_load = self
                .has_room(memory_bytes)
                .then_some(self.vps.members.len() as u32);
            let sample = self.vps.samples.get_mut(&op).expect("present");
            if sample.asked.is_none() && sample.searching_done(now) {
                sample.asked = Some(now);
                sample.answered(me, my_load);
                let targets: Vec<PeerContact> = sample
                    .candidates
                    .iter()
                    .filter(|(h, _)| **h != me)
                    .map(|(_, c)| c.clone())
                    .collect();
                for contact in targets {
                    self.send_vp(&contact, VpWire::LoadQuery { op, memory_bytes });
                }
                continue;
            }
            if sample.decided(now) {
                let sample = self.vps.samples.remove(&op).expect("present");
                sample.answer();
            }
        }
        self.vps
            .sample_searches
            .retain(|_, op| self.vps.samples.contains_key(op));
    }

    // ---- deployment ---------------------------------------------------------------------

    pub(super) fn send_deploy(
        &mut self,
        to: PeerContact,
        mut deploy: Deploy,
        reply: oneshot::Sender<Result<(), String>>,
    ) {
        deploy.op = self.vps.op();
        self.vps
            .deploys
            .insert(deploy.op, (reply, Instant::now() + DEPLOY_TIMEOUT));
        self.send_vp(&to, VpWire::Deploy(deploy));
    }

    fn ack_deploy(&self, deploy: &Deploy, reply_to: &PeerContact, result: Result<(), String>) {
        if let Err(e) = &result {
            tracing::warn!(vp = %deploy.config.vp, "deployment refused: {e}");
        }
        self.send_vp(
            reply_to,
            VpWire::DeployAck {
                op: deploy.op,
                vp: deploy.config.vp,
                result,
            },
        );
    }

    fn on_deploy(&mut self, deploy: Deploy, reply_to: PeerContact) {
        let vp = deploy.config.vp;
        if self.vps.members.contains_key(&vp) {
            let me = consensus_host(self.me.host);
            let stale = deploy.founding.is_none() && !deploy.members.iter().any(|(h, _)| *h == me);
            if stale {
                // This host was replaced while it was down and kept its old
                // copy; the leader now wants it back as a new member. The old
                // copy goes first (it would leave on seeing the current
                // membership, taking the new role with it); the leader tries
                // again.
                tracing::info!(%vp, "asked to join again as a new member: removing the old copy first");
                self.undeploy(vp);
                self.ack_deploy(
                    &deploy,
                    &reply_to,
                    Err(
                        "this host held an old copy of the virtual peer; removing it, try again"
                            .into(),
                    ),
                );
            } else {
                self.ack_deploy(&deploy, &reply_to, Ok(()));
            }
            return;
        }
        if self.vps.tombstones.contains(vp) {
            self.ack_deploy(&deploy, &reply_to, Err(destroyed_text(vp)));
            return;
        }
        if self.vps.undone.contains(&(vp, deploy.module_from.peer)) {
            self.ack_deploy(&deploy, &reply_to, Err(undone_text(vp)));
            return;
        }
        if let Err(why) = check_config(&deploy.config) {
            self.ack_deploy(&deploy, &reply_to, Err(why));
            return;
        }
        if let Err(why) = self.room_for(deploy.config.limits.memory_bytes_max) {
            self.ack_deploy(&deploy, &reply_to, Err(why));
            return;
        }
        for (host, contact) in &deploy.members {
            self.vps.directory.learn(*host, contact);
        }
        let hash = deploy.config.module;
        if self.vps.modules.get(&hash).is_some() {
            self.vps.modules.touch(&hash);
            self.deploy_with_module(deploy, reply_to);
            return;
        }
        let (total, from) = (deploy.config.module_bytes, deploy.module_from.clone());
        self.fetch_module(
            hash,
            total,
            vec![from],
            FetchFor::Deploy(Box::new(deploy), reply_to),
        );
    }

    fn on_module_chunk(
        &mut self,
        from: libp2p::PeerId,
        hash: ModuleHash,
        offset: u64,
        total: u64,
        bytes: Vec<u8>,
    ) {
        let Some(fetch) = self.vps.fetches.get_mut(&hash) else {
            return;
        };
        if from != fetch.from.peer
            || offset != fetch.buf.len() as u64
            || total != fetch.total
            || fetch.buf.len() + bytes.len() > total as usize
        {
            return; // stale or inconsistent; `FETCH_QUIET` handles a stuck transfer
        }
        fetch.buf.extend_from_slice(&bytes);
        fetch.quiet_until = Instant::now() + FETCH_QUIET;
        if (fetch.buf.len() as u64) < total {
            let (from, offset) = (fetch.from.clone(), fetch.buf.len() as u64);
            self.send_vp(&from, VpWire::FetchModule { hash, offset });
            return;
        }
        if ModuleHash::of(&fetch.buf) != hash {
            let why = format!("the module {from} sent does not match its hash");
            self.next_fetch_source(hash, why);
            return;
        }
        let fetch = self.vps.fetches.remove(&hash).expect("present");
        if let Err(e) = self.vps.modules.put(&fetch.buf) {
            for waiter in fetch.waiting {
                self.fail_fetch(waiter, format!("cannot store the module: {e:#}"));
            }
            return;
        }
        for waiter in fetch.waiting {
            match waiter {
                FetchFor::Deploy(deploy, reply_to) => self.deploy_with_module(*deploy, reply_to),
                FetchFor::Restart(vp) => self.restart_member(vp),
            }
        }
    }

    fn deploy_with_module(&mut self, deploy: Deploy, reply_to: PeerContact) {
        let Some(bytes) = self.vps.modules.get(&deploy.config.module) else {
            self.ack_deploy(
                &deploy,
                &reply_to,
                Err("module vanished from the store".into()),
            );
            return;
        };
        // A founding member compiles first, so a module that does not load
        // fails the spawn; on a blocking thread, so this host's other virtual
        // peers and its overlay keep running meanwhile (a compile takes
        // hundreds of milliseconds). A learner replaces a member that ran
        // this module: it starts at once and compiles while the snapshot comes.
        if deploy.founding.is_some() {
            let (sandbox, bytes, calls) =
                (self.vps.sandbox.clone(), bytes.to_vec(), self.calls.clone());
            tokio::task::spawn_blocking(move || {
                let module = sandbox.load(&bytes).map_err(|e| e.to_string());
                let _ = calls.blocking_send(NodeCall::Compiled {
                    deploy: Box::new(deploy),
                    reply_to,
                    module,
                });
            });
            return;
        }
        let module = match ModuleSource::compile(self.vps.sandbox.clone(), bytes.to_vec()) {
            Ok(m) => m,
            Err(e) => {
                self.ack_deploy(&deploy, &reply_to, Err(format!("{e:#}")));
                return;
            }
        };
        self.start_deployed(deploy, reply_to, module);
    }

    /// Start the member a deployment asked for and answer the deployer.
    fn start_deployed(&mut self, deploy: Deploy, reply_to: PeerContact, module: ModuleSource) {
        let vp = deploy.config.vp;
        if self.vps.members.contains_key(&vp) {
            // A retry of the same deployment got here first.
            self.ack_deploy(&deploy, &reply_to, Ok(()));
            return;
        }
        // The spawn may have undone it while the module was on its way.
        if self.vps.undone.contains(&(vp, deploy.module_from.peer)) {
            tracing::info!(%vp, "deployment undone by its spawn before it started");
            self.ack_deploy(&deploy, &reply_to, Err(undone_text(vp)));
            return;
        }
        // Checked again: another deployment may have taken the room while
        // this one fetched or compiled its module (`on_deploy` checked first).
        if let Err(why) = self.room_for(deploy.config.limits.memory_bytes_max) {
            self.ack_deploy(&deploy, &reply_to, Err(why));
            return;
        }
        let file = MemberFile {
            config: deploy.config.clone(),
            founding: deploy.founding.clone(),
        };
        match start_member(self.vp_ctx(), module, vp, Some(file)) {
            Ok(handle) => {
                tracing::info!(%vp, learner = deploy.founding.is_none(), "deployed");
                self.vps.members.insert(vp, handle);
                if deploy.founding.is_some() {
                    // (pruned here, at each founding, to the members running)
                    let members = &self.vps.members;
                    self.vps.founded_by.retain(|vp, _| members.contains_key(vp));
                    self.vps.founded_by.insert(vp, deploy.module_from.peer);
                }
                self.ack_deploy(&deploy, &reply_to, Ok(()));
            }
            Err(e) => self.ack_deploy(&deploy, &reply_to, Err(format!("{e:#}"))),
        }
    }

    pub(super) fn undeploy(&mut self, vp: VpId) {
        if let Some(handle) = self.vps.members.remove(&vp) {
            let now = self.now();
            let _ = self.alm.remove_key(now, &member_key(vp, self.me.host));
            // Out of the way at once (a rename), so a new deployment of the
            // same virtual peer starts clean; removed once the thread stopped.
            let dir = vp_dir(&self.cfg.data_dir, vp);
            let trash = dir.with_extension(format!("removed-{:016x}", rand::random::<u64>()));
            let dir = if std::fs::rename(&dir, &trash).is_ok() {
                trash
            } else {
                dir
            };
            tokio::task::spawn_blocking(move || {
                handle.stop();
                let _ = std::fs::remove_dir_all(dir);
            });
            tracing::info!(%vp, "undeployed");
        }
    }

    /// Find a host for a dead member's place and deploy there as a learner; the
    /// member thread then checkpoints and proposes the replacement.
    fn start_replacement(&mut self, config: VpConfig, dead: HostId, members: Vec<HostId>) {
        let (tx, rx) = oneshot::channel();
        let mut exclude = members.clone();
        exclude.push(dead);
        self.start_sample(1, exclude, config.limits.memory_bytes_max, tx);
        let calls = self.calls.clone();
        let vp = config.vp;
        let module_from = self.me.contact.clone();
        let contacts: Vec<(HostId, PeerContact)> = members
            .iter()
            .filter_map(|h| self.vps.directory.get(*h).map(|c| (*h, c)))
            .collect();
        tokio::spawn(async move {
            let result = async {
                let candidate = rx
                    .await
                    .ok()
                    .and_then(|mut c| c.pop())
                    .ok_or("no live host with room for a member found through the overlay")?;
                tracing::info!(%vp, %dead, new = %candidate.host, "replacement chosen");
                let deploy = Deploy {
                    op: 0,
                    config,
                    founding: None,
                    module_from,
                    members: contacts,
                };
                let (dtx, drx) = oneshot::channel();
                calls
                    .send(NodeCall::Deploy {
                        to: candidate.contact,
                        deploy: Box::new(deploy),
                        reply: dtx,
                    })
                    .await
                    .map_err(|_| "node stopped")?;
                drx.await
                    .map_err(|_| "deployment timed out".to_string())?
                    .map_err(|e| format!("deployment failed: {e}"))?;
                Ok::<HostId, String>(candidate.host)
            }
            .await;
            let event = match result {
                Ok(new) => MemberEvent::ReplacementReady { dead, new },
                Err(why) => MemberEvent::ReplacementFailed {
                    dead,
                    why: why.to_string(),
                },
            };
            let _ = calls.send(NodeCall::ToMember { vp, event }).await;
        });
    }

    pub(super) fn on_call(&mut self, call: NodeCall) {
        match call {
            NodeCall::Sample {
                want,
                exclude,
                memory_bytes,
                reply,
            } => self.start_sample(want, exclude, memory_bytes, reply),
            NodeCall::Deploy { to, deploy, reply } => self.send_deploy(to, *deploy, reply),
            NodeCall::Named { name, vp, recorded } => {
                self.vps.naming.remove(&name);
                if let Some(vp) = vp {
                    self.vps.names.insert(name, vp);
                }
                let _ = recorded.send(());
            }
            NodeCall::Send {
                req,
                timeout,
                reply,
            } => self.start_request(req, Waiter::Api(reply), timeout),
            NodeCall::ToMember { vp, event } => {
                if let Some(m) = self.vps.members.get(&vp) {
                    m.send(event);
                }
            }
            NodeCall::AwaitLeader { vp, reply } => {
                self.vps.leader_waiters.entry(vp).or_default().push(reply);
                self.vps.leaders.remove(&vp);
                self.locate(vp);
            }
            NodeCall::Undeploy { to, vp } => self.send_vp(&to, VpWire::Undeploy { vp }),
            NodeCall::QueryStatus { vp, op } => {
                let log_after = self.vps.status_queries.get(&op).and_then(|q| q.log_after);
                if let Some((_, contact)) = self.vps.leaders.get(&vp).cloned() {
                    self.send_vp(&contact, VpWire::StatusQuery { vp, op, log_after });
                }
            }
            NodeCall::Compiled {
                deploy,
                reply_to,
                module,
            } => match module {
                Ok(m) => self.start_deployed(*deploy, reply_to, ModuleSource::Loaded(m)),
                Err(e) => self.ack_deploy(
                    &deploy,
                    &reply_to,
                    Err(format!("the module does not load here: {e}")),
                ),
            },
        }
    }

    /// Status of a virtual peer from the local member, if this host is one.
    /// Gives `reply` back when it is not.
    fn local_vp_status(
        &mut self,
        vp: VpId,
        log_after: Option<LogCursor>,
        reply: oneshot::Sender<Result<VpStatus, String>>,
    ) -> Option<oneshot::Sender<Result<VpStatus, String>>> {
        if let Some(m) = self.vps.members.get(&vp) {
            let (tx, rx) = oneshot::channel();
            let ask = StatusAsk {
                log_after,
                digest: true,
            };
            if m.send(MemberEvent::Status(tx, ask)) {
                tokio::spawn(async move {
                    let _ = reply.send(rx.await.map_err(|_| "the member stopped".to_string()));
                });
                return None;
            }
        }
        Some(reply)
    }

    /// Status of a virtual peer: from the local member, or asked of its leader
    /// (found through the overlay if need be).
    pub(super) fn vp_status(
        &mut self,
        vp: VpId,
        log_after: Option<LogCursor>,
        reply: oneshot::Sender<Result<VpStatus, String>>,
    ) {
        let Some(reply) = self.local_vp_status(vp, log_after, reply) else {
            return;
        };
        if self.vps.destroyed(vp) {
            let _ = reply.send(Err(destroyed_text(vp)));
            return;
        }
        let op = self.vps.op();
        let query = StatusQuery {
            vp,
            reply,
            deadline: Instant::now() + Duration::from_secs(10),
            log_after,
        };
        self.vps.status_queries.insert(op, query);
        // A cached leader whose connections closed lately is not asked (it
        // would not answer, and the query would wait its full 10 s).
        let leader = self
            .vps
            .leaders
            .get(&vp)
            .cloned()
            .filter(|(_, c)| self.believable(c));
        match leader {
            Some((_, contact)) => self.send_vp(&contact, VpWire::StatusQuery { vp, op, log_after }),
            None => {
                let (tx, rx) = oneshot::channel();
                self.vps.leader_waiters.entry(vp).or_default().push(tx);
                self.locate(vp);
                let calls = self.calls.clone();
                tokio::spawn(async move {
                    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), rx).await {
                        let _ = calls.send(NodeCall::QueryStatus { vp, op }).await;
                    }
                });
            }
        }
    }
}

impl Node {
    /// Ask every local member for its status (a state digest only if one is
    /// known for the current state: a listing does not hash every guest).
    pub(super) fn member_statuses(&self) -> Vec<oneshot::Receiver<VpStatus>> {
        let mut out = Vec::new();
        let mut members: Vec<_> = self.vps.members.iter().collect();
        members.sort_by_key(|(vp, _)| **vp);
        for (_, m) in members {
            let (tx, rx) = oneshot::channel();
            if m.send(MemberEvent::Status(tx, StatusAsk::default())) {
                out.push(rx);
            }
        }
        out
    }

    /// The virtual peer called `name` here: a local member's, or one spawned
    /// from this host.
    fn named(&self, name: &str) -> Option<VpId> {
        self.vps
            .members
            .values()
            .find(|m| m.config.name.as_deref() == Some(name))
            .map(|m| m.config.vp)
            .or_else(|| self.vps.names.get(name).copied())
    }

    /// A virtual peer named by id (16 hex digits) or by a name this host knows.
    fn resolve_vp(&self, name: &str) -> Result<VpId, String> {
        if let Some(vp) = self.named(name) {
            return Ok(vp);
        }
        match name.parse::<VpId>() {
            Ok(vp) if name.len() == 16 => Ok(vp),
            _ => Err(format!(
                "`{name}` is neither a virtual peer id (16 hex digits) nor a name this host knows"
            )),
        }
    }

    /// Start one send to a virtual peer (the send route's and a send stream's).
    fn start_send(
        &mut self,
        name: &str,
        req: super::api::SendRequest,
        reply: super::api::SendWaiter,
    ) {
        use crate::api::ApiError;
        let vp = match self.resolve_vp(name) {
            Ok(vp) => vp,
            Err(e) => {
                let _ = reply.send(Err(ApiError::not_found(e)));
                return;
            }
        };
        if self.vps.destroyed(vp) {
            let _ = reply.send(Err(ApiError::not_found(destroyed_text(vp))));
            return;
        }
        let payload = match vp_guest_sdk::abi::encode(&req.msg) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(ApiError::bad_request(format!(
                    "cannot encode the message: {e}"
                ))));
                return;
            }
        };
        let timeout = req.timeout_ms.map_or(SEND_TIMEOUT, Duration::from_millis);
        if timeout > SEND_TIMEOUT_MAX {
            let _ = reply.send(Err(ApiError::bad_request(format!(
                "timeout_ms is at most {} (a request is retried for at most {} s)",
                SEND_TIMEOUT_MAX.as_millis(),
                SEND_TIMEOUT_MAX.as_secs()
            ))));
            return;
        }
        // Taken last: a session taken is given back only with an answer.
        let (client, seq) = if req.read {
            (new_session_id(), 0)
        } else {
            self.take_session()
        };
        let request = Request {
            vp,
            client,
            seq,
            ack_below: seq,
            payload,
            read: req.read,
            destroy: false,
            reply_to: self.me.contact.clone(),
        };
        self.start_request(request, Waiter::Http(reply), timeout);
    }

    /// `vp-host destroy`: the destroy goes through the virtual peer's log
    /// like a message (same session and retries), so every member applies
    /// it at the same point; answered once the leader applied it.
    fn start_destroy(
        &mut self,
        name: &str,
        reply: oneshot::Sender<Result<super::api::DestroyAnswer, crate::api::ApiError>>,
    ) {
        use super::api::DestroyAnswer;
        use crate::api::ApiError;
        let vp = match self.resolve_vp(name) {
            Ok(vp) => vp,
            Err(e) => {
                let _ = reply.send(Err(ApiError::not_found(e)));
                return;
            }
        };
        if self.vps.destroyed(vp) {
            let _ = reply.send(Ok(DestroyAnswer {
                vp: vp.to_string(),
                already: true,
            }));
            return;
        }
        let (client, seq) = self.take_session();
        let request = Request {
            vp,
            client,
            seq,
            ack_below: seq,
            payload: Vec::new(),
            read: false,
            destroy: true,
            reply_to: self.me.contact.clone(),
        };
        let (tx, rx) = oneshot::channel();
        self.start_request(request, Waiter::Api(tx), SEND_TIMEOUT);
        tokio::spawn(async move {
            let answer = match rx.await {
                Ok(Ok(Ok(_))) => Ok(DestroyAnswer {
                    vp: vp.to_string(),
                    already: false,
                }),
                Ok(Ok(Err(why))) => Err(ApiError::unavailable(format!("destroy refused: {why}"))),
                Ok(Err(why)) => Err(ApiError::unavailable(why)),
                Err(_) => Err(ApiError::unavailable(
                    "the host dropped the request (shutting down?)",
                )),
            };
            let _ = reply.send(answer);
        });
    }

    pub(super) fn on_vp_request(&mut self, request: super::api::NodeRequest) {
        use super::api::NodeRequest;
        match request {
            NodeRequest::Spawn(params, module, progress) => self.spawn(params, module, progress),
            NodeRequest::Send(name, req, reply) => self.start_send(&name, req, reply),
            NodeRequest::Destroy(name, reply) => self.start_destroy(&name, reply),
            NodeRequest::SendMany(name, batch) => {
                for (req, reply) in batch {
                    self.start_send(&name, req, reply);
                }
            }
            NodeRequest::Resolve(name, reply) => {
                let _ = reply.send(self.resolve_vp(&name).map(|vp| vp.to_string()));
            }
            NodeRequest::VpList(reply) => {
                let pending = self.member_statuses();
                tokio::spawn(async move {
                    let mut list = Vec::new();
                    for rx in pending {
                        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), rx).await {
                            list.push(s);
                        }
                    }
                    let _ = reply.send(list);
                });
            }
            NodeRequest::Drain { stay, reply } => {
                let answer = self.set_draining(!stay).map(|()| super::api::DrainAnswer {
                    memberships: self.vps.members.len(),
                });
                let _ = reply.send(answer);
            }
            NodeRequest::VpStatus(name, log_after, reply) => match self.resolve_vp(&name) {
                Ok(vp) => self.vp_status(vp, log_after, reply),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            NodeRequest::VpDigest(name, reply) => {
                let vp = match self.resolve_vp(&name) {
                    Ok(vp) => vp,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let Some(m) = self.vps.members.get(&vp) else {
                    let _ = reply.send(Err(format!(
                        "this host is not a member of virtual peer {vp}"
                    )));
                    return;
                };
                let (tx, rx) = oneshot::channel();
                m.send(MemberEvent::Digest(tx));
                tokio::spawn(async move {
                    let answer = match rx.await {
                        Ok(Some(d)) => Ok(d.to_string()),
                        Ok(None) => Err("the member has no state yet".to_string()),
                        Err(_) => Err("the member stopped".to_string()),
                    };
                    let _ = reply.send(answer);
                });
            }
            _ => unreachable!("on_vp_request handles virtual-peer requests only"),
        }
    }

    fn spawn(
        &mut self,
        params: super::api::SpawnParams,
        module: Vec<u8>,
        progress: mpsc::Sender<SpawnEvent>,
    ) {
        let fail = |progress: mpsc::Sender<SpawnEvent>, error: String| {
            tokio::spawn(async move {
                let _ = progress.send(SpawnEvent::Failed { error }).await;
            });
        };
        let defaults = crate::sandbox::GuestLimits::default();
        let limits = crate::sandbox::GuestLimits {
            fuel_per_message: params.fuel_per_message.unwrap_or(defaults.fuel_per_message),
            memory_bytes_max: params.memory_max.unwrap_or(defaults.memory_bytes_max),
            ..defaults
        };
        let mut config = VpConfig {
            vp: VpId(rand::random()),
            name: params.name.clone(),
            // Filled in by the check below, which hashes the module off the
            // node task (with its size limit and compilation).
            module: crate::sandbox::ModuleHash([0; 32]),
            module_bytes: module.len() as u64,
            limits,
            members: params.members.unwrap_or(3),
            timing: VpConfig::default_timing(),
            replace_after_ms: params.replace_after_ms.unwrap_or(500),
            checkpoint_every_slots: params.checkpoint_every_slots.unwrap_or(10_000),
        };
        if let Err(e) = check_config(&config) {
            return fail(progress, e);
        }
        if let Some(name) = config.name.as_deref() {
            if let Some(vp) = self.named(name) {
                return fail(
                    progress,
                    format!("the name is taken here by virtual peer {vp}; pick another"),
                );
            }
            // Held from now until the spawn ends, so two spawns at once
            // cannot both take it.
            if !self.vps.naming.insert(name.to_string()) {
                return fail(
                    progress,
                    "another spawn from this host is taking that name; pick another".into(),
                );
            }
        }
        let calls = self.calls.clone();
        let me = self.me.contact.clone();
        let (sandbox, store) = (self.vps.sandbox.clone(), self.vps.modules.clone());
        tokio::spawn(async move {
            let name = config.name.clone();
            let outcome = async {
                // Refuse a bad module here, with the sandbox's own error,
                // before any host is involved; compiled on a blocking thread,
                // not on the node task (the compiled module is cached for the
                // local member).
                let loaded = tokio::task::spawn_blocking(move || {
                    let loaded = sandbox
                        .load(&module)
                        .map_err(|e| format!("the module was refused: {e}"))?;
                    store
                        .put(&module)
                        .map_err(|e| format!("cannot store the module: {e:#}"))?;
                    Ok::<_, String>(loaded)
                })
                .await
                .unwrap_or_else(|e| Err(format!("the module check failed: {e}")))?;
                config.module = loaded.hash();
                let _ = progress
                    .send(SpawnEvent::Progress {
                        message: format!(
                            "module {} ({} bytes) checked",
                            loaded.hash().short(),
                            loaded.bytes_len()
                        ),
                    })
                    .await;
                spawn_vp(calls.clone(), me, config, progress.clone()).await
            }
            .await;
            // Only a spawn that succeeded takes the name (one that failed
            // leaves it free); the name resolves before `done` is reported.
            if let Some(name) = name {
                let vp = outcome.as_ref().ok().map(|(vp, _, _)| *vp);
                let (recorded, done) = oneshot::channel();
                let _ = calls.send(NodeCall::Named { name, vp, recorded }).await;
                let _ = done.await;
            }
            let event = match outcome {
                Ok((vp, members, leader)) => SpawnEvent::Done {
                    vp: vp.to_string(),
                    members: members.iter().map(ToString::to_string).collect(),
                    leader: leader.to_string(),
                },
                Err(error) => SpawnEvent::Failed { error },
            };
            let _ = progress.send(event).await;
        });
    }
}

/// Refuse configurations a host should not run.
pub(crate) fn check_config(config: &VpConfig) -> Result<(), String> {
    if config.members == 0 || config.members > 7 {
        return Err(format!(
            "{} members; a virtual peer has 1 to 7",
            config.members
        ));
    }
    if let Some(name) = &config.name {
        // Names appear in API paths and on command lines.
        let fits = (1..=64).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
        if !fits {
            return Err(format!(
                "name `{name}`: use 1 to 64 letters, digits, '-' or '_'"
            ));
        }
        if name.len() == 16 && name.parse::<VpId>().is_ok() {
            return Err(format!(
                "name `{name}` would read as a virtual peer id (16 hex digits)"
            ));
        }
    }
    if config.limits.fuel_per_message == 0 {
        return Err("fuel per message is 0".into());
    }
    if config.limits.memory_bytes_max > 4 << 30 {
        return Err("memory limit above 4 GiB (the wasm32 maximum)".into());
    }
    // A member must be able to checkpoint the whole guest (replacement moves
    // it as one snapshot); leave room for the host's part of the image.
    let snapshot_max = VpConfig::consensus_limits().snapshot_bytes_max;
    if config.limits.memory_bytes_max + (16 << 20) > snapshot_max {
        return Err(format!(
            "memory limit of {} MiB: a virtual peer's guest may hold at most {} MiB, the largest snapshot a member takes",
            config.limits.memory_bytes_max >> 20,
            (snapshot_max >> 20) - 16
        ));
    }
    if config.timing.election_timeout_us < 10_000 || config.timing.heartbeat_interval_us == 0 {
        return Err("consensus timers out of range".into());
    }
    Ok(())
}

/// The founding membership of a new virtual peer.
pub fn founding(voters: Vec<HostId>) -> Membership {
    Membership {
        epoch: vp_consensus::Epoch(1),
        voters,
        learners: Vec::new(),
    }
}

/// What a spawn reports while it deploys (one JSON line each on the API).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpawnEvent {
    Progress {
        message: String,
    },
    Done {
        vp: String,
        members: Vec<String>,
        leader: String,
    },
    Failed {
        error: String,
    },
}

/// Deploy a new virtual peer: choose hosts, deploy the module to each, wait
/// for a leader. The module is already in this host's store.
pub async fn spawn_vp(
    calls: mpsc::Sender<NodeCall>,
    me: PeerContact,
    mut config: VpConfig,
    progress: mpsc::Sender<SpawnEvent>,
) -> Result<(VpId, Vec<HostId>, HostId), String> {
    let say = |message: String| {
        let progress = progress.clone();
        async move {
            let _ = progress.send(SpawnEvent::Progress { message }).await;
        }
    };
    let call = |c: NodeCall| {
        let calls = calls.clone();
        async move {
            calls
                .send(c)
                .await
                .map_err(|_| "the host is shutting down".to_string())
        }
    };
    say(format!(
        "placing {} members (least-loaded hosts found through the overlay)",
        config.members
    ))
    .await;
    // Hosts that refused a member (full since they were sampled: another
    // spawn took the room; leaving; gone) are left out of the next round.
    let mut refused: Vec<HostId> = Vec::new();
    let mut round = 1;
    let voters = loop {
        let chosen = place(&call, &say, &config, &refused).await?;
        match deploy_all(&call, &say, &me, &config, &chosen).await {
            Ok(()) => break chosen.iter().map(|c| c.host).collect::<Vec<_>>(),
            Err((hosts, why)) if round < PLACEMENT_ROUNDS && !hosts.is_empty() => {
                round += 1;
                let which = if hosts.len() == 1 { "it" } else { "them" };
                say(format!(
                    "{why}; placing again without {which} (round {round} of {PLACEMENT_ROUNDS})"
                ))
                .await;
                refused.extend(hosts);
                // A fresh id: a copy of this round that missed its undeploy
                // belongs to a virtual peer nobody uses, never to the next.
                config.vp = VpId(rand::random());
            }
            Err((_, why)) => return Err(why),
        }
    };
    let vp = config.vp;
    say("waiting for the members to elect a leader".to_string()).await;
    let (tx, rx) = oneshot::channel();
    call(NodeCall::AwaitLeader { vp, reply: tx }).await?;
    let leader = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .map_err(|_| "no leader was elected within 30 s".to_string())?
        .map_err(|_| "the host is shutting down".to_string())?;
    Ok((vp, voters, leader))
}

/// Placement rounds a spawn tries before it gives up.
const PLACEMENT_ROUNDS: usize = 3;

/// Choose `config.members` hosts with room through the overlay, none of
/// `refused`. Hosts that joined a moment ago may not be found at once, so
/// it samples a few times.
async fn place<C, S>(
    call: &impl Fn(NodeCall) -> C,
    say: &impl Fn(String) -> S,
    config: &VpConfig,
    refused: &[HostId],
) -> Result<Vec<Candidate>, String>
where
    C: std::future::Future<Output = Result<(), String>>,
    S: std::future::Future<Output = ()>,
{
    let mut chosen = Vec::new();
    for attempt in 0..5 {
        let (tx, rx) = oneshot::channel();
        call(NodeCall::Sample {
            want: config.members,
            exclude: refused.to_vec(),
            memory_bytes: config.limits.memory_bytes_max,
            reply: tx,
        })
        .await?;
        chosen = rx.await.map_err(|_| "placement stopped".to_string())?;
        if chosen.len() >= config.members {
            break;
        }
        say(format!(
            "found {} of {} hosts; looking again",
            chosen.len(),
            config.members
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(500 * (attempt + 1))).await;
    }
    if chosen.len() < config.members {
        return Err(format!(
            "found only {} live hosts with room for a member through the overlay (a host \
             takes at most its `--memberships-max`); {} members need {} hosts",
            chosen.len(),
            config.members,
            config.members
        ));
    }
    for c in &chosen {
        say(format!(
            "host {} ({} memberships) chosen",
            c.host, c.memberships
        ))
        .await;
    }
    Ok(chosen)
}

/// Deploy the founding members on `chosen`. If any refuses or does not
/// answer, the others are undeployed and the hosts that failed returned.
async fn deploy_all<C, S>(
    call: &impl Fn(NodeCall) -> C,
    say: &impl Fn(String) -> S,
    me: &PeerContact,
    config: &VpConfig,
    chosen: &[Candidate],
) -> Result<(), (Vec<HostId>, String)>
where
    C: std::future::Future<Output = Result<(), String>>,
    S: std::future::Future<Output = ()>,
{
    let vp = config.vp;
    let membership = founding(chosen.iter().map(|c| c.host).collect());
    let members: Vec<(HostId, PeerContact)> =
        chosen.iter().map(|c| (c.host, c.contact.clone())).collect();
    let mut acks = Vec::new();
    for c in chosen {
        let deploy = Deploy {
            op: 0,
            config: config.clone(),
            founding: Some(membership.clone()),
            module_from: me.clone(),
            members: members.clone(),
        };
        let (tx, rx) = oneshot::channel();
        call(NodeCall::Deploy {
            to: c.contact.clone(),
            deploy: Box::new(deploy),
            reply: tx,
        })
        .await
        .map_err(|e| (Vec::new(), e))?;
        acks.push((c.host, c.contact.clone(), rx));
    }
    let mut failed = Vec::new();
    let mut why = String::new();
    let mut undo = Vec::new();
    for (host, contact, rx) in acks {
        match rx.await {
            Ok(Ok(())) => {
                say(format!("deployed on host {host}")).await;
                undo.push(contact);
            }
            Ok(Err(e)) => {
                why = format!("host {host} refused: {e}");
                failed.push(host);
            }
            Err(_) => {
                why = format!("host {host} did not answer in time");
                failed.push(host);
                // it may have deployed after all
                undo.push(contact);
            }
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    for contact in undo {
        let _ = call(NodeCall::Undeploy { to: contact, vp }).await;
    }
    Err((failed, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(memory_bytes_max: u64) -> VpConfig {
        VpConfig {
            vp: VpId(1),
            name: None,
            module: ModuleHash([0; 32]),
            module_bytes: 1,
            limits: crate::sandbox::GuestLimits {
                memory_bytes_max,
                ..crate::sandbox::GuestLimits::default()
            },
            members: 3,
            timing: VpConfig::default_timing(),
            replace_after_ms: 500,
            checkpoint_every_slots: 1024,
        }
    }

    #[test]
    fn no_retry_outlives_the_session_that_deduplicates_it() {
        let retain = Duration::from_millis(VpConfig::consensus_limits().session_retain_ms);
        for retried_for in [SEND_TIMEOUT, SEND_TIMEOUT_MAX, OUTBOUND_TIMEOUT] {
            assert!(retried_for * 2 <= retain, "{retried_for:?} vs {retain:?}");
        }
    }

    fn sample(want: usize, candidates: &[u64]) -> (Sample, oneshot::Receiver<Vec<Candidate>>) {
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let sample = Sample {
            want,
            memory_bytes: 1 << 20,
            exclude: HashSet::new(),
            searches: 0,
            candidates: candidates
                .iter()
                .map(|h| {
                    let contact = PeerContact {
                        peer: libp2p::PeerId::random(),
                        addrs: Vec::new(),
                    };
                    (HostId(*h), contact)
                })
                .collect(),
            loads: HashMap::new(),
            started: now,
            asked: Some(now),
            deadline: now + SAMPLE_DEADLINE,
            reply,
        };
        (sample, rx)
    }

    /// A spawn placing again without its own host (it refused), or a leader
    /// finding a replacement (its own host is a member), excludes the asking
    /// host: its own load must not count as one of the candidates' answers.
    #[test]
    fn a_sample_excluding_its_own_host_waits_for_every_candidate() {
        let (mut s, mut rx) = sample(2, &[1, 2]);
        let now = s.asked.unwrap();
        s.answered(HostId(9), Some(0)); // the asking host, excluded
        s.answered(HostId(1), Some(0));
        assert!(!s.decided(now), "decided before host 2 answered");
        s.answered(HostId(2), Some(0));
        assert!(s.decided(now));
        s.answer();
        let mut found: Vec<u64> = rx.try_recv().unwrap().iter().map(|c| c.host.0).collect();
        found.sort();
        assert_eq!(found, vec![1, 2]);
    }

    #[test]
    fn a_sample_prefers_the_least_loaded_and_skips_the_full() {
        let (mut s, mut rx) = sample(2, &[1, 2, 3, 4]);
        let asked = s.asked.unwrap();
        s.answered(HostId(1), Some(3));
        s.answered(HostId(2), None);
        s.answered(HostId(3), Some(1));
        // two with room answered: the fourth has a moment more
        assert!(!s.decided(asked));
        assert!(s.decided(asked + SAMPLE_ENOUGH_WAIT));
        s.answered(HostId(4), Some(0));
        s.answer();
        let found: Vec<u64> = rx.try_recv().unwrap().iter().map(|c| c.host.0).collect();
        assert_eq!(found, vec![4, 3]);
    }

    /// In a small network the searches can miss a host; the candidates'
    /// answers name their overlay neighbours, and the sample asks those it
    /// did not have (not excluded ones, not twice, no more than it draws),
    /// and waits for their answers.
    #[test]
    fn a_sample_asks_the_hosts_its_candidates_name() {
        let contact = |_| PeerContact {
            peer: libp2p::PeerId::random(),
            addrs: Vec::new(),
        };
        let (mut s, mut rx) = sample(3, &[1, 2]);
        s.exclude.insert(HostId(7));
        s.answered(HostId(1), Some(0));
        let named = [2, 3, 7, 3].map(|h| (HostId(h), contact(h)));
        let ask = s.named(named.clone());
        assert_eq!(ask.len(), 1, "only host 3 is new and not excluded");
        assert_eq!(ask[0].peer, named[1].1.peer);
        s.answered(HostId(2), Some(1));
        assert!(
            !s.decided(s.asked.unwrap()),
            "host 3 was asked and has not answered"
        );
        s.answered(HostId(3), Some(0));
        assert!(s.decided(s.asked.unwrap()));
        s.answer();
        let mut found: Vec<u64> = rx.try_recv().unwrap().iter().map(|c| c.host.0).collect();
        found.sort();
        assert_eq!(found, vec![1, 2, 3]);

        // A sample that holds as many hosts as it draws adds no more.
        let full: Vec<u64> = (1..=sample_size(1) as u64).collect();
        let (mut s, _rx) = sample(1, &full);
        assert!(s.named([(HostId(99), contact(99))]).is_empty());
    }

    #[test]
    fn a_sample_with_too_few_answers_decides_at_its_deadline() {
        let (mut s, mut rx) = sample(3, &[1, 2, 3]);
        s.answered(HostId(1), Some(0));
        assert!(!s.decided(s.asked.unwrap() + SAMPLE_ENOUGH_WAIT));
        assert!(s.decided(s.deadline));
        s.answer();
        assert_eq!(rx.try_recv().unwrap().len(), 1);
    }

    #[test]
    fn a_guest_larger_than_a_snapshot_is_refused() {
        assert!(check_config(&config(256 << 20)).is_ok());
        let err = check_config(&config(1 << 30)).unwrap_err();
        assert!(err.contains("largest snapshot"), "{err}");
    }
}
