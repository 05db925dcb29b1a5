//! One host's membership in one virtual peer, on a thread of its own.
//!
//! The thread owns the consensus replica, its durable log (a `FileStore` in
//! `<data dir>/vps/<vp id>/log`) and the guest. Its loop:
//!
//! 1. wait for an event (a consensus message, a request, a timer);
//! 2. take every other queued event too, and feed them all in;
//! 3. drain the replica: persist what it asks (all pending batches, one
//!    fdatasync: group commit), only then send its messages (nothing promised
//!    or accepted leaves before it is durable), and apply decided entries to
//!    the guest in slot order, answering clients and queueing outbound messages.
//!
//! Applying runs the guest on this thread, so a slow guest delays only its own
//! virtual peer, never the overlay or other virtual peers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};
use vp_consensus::{
    Apply, Bytes, ClientId, Command, FileStore, HostId, Membership, MembershipChange, Outcome,
    ReadId, ReadMode, Replica, ReplicaConfig, Reply as SessionReply, Slot, Storage, Time,
};
use vp_guest_sdk::abi::{self, Effect, Envelope, Input, VpId, WireResult};

use super::directory::Directory;
use super::wire::{Reply, Request, VpWire};
use super::{
    ArmedTimer, HostState, LogInput, MemberTimings, Outbound, Recent, VpConfig, VpStatus,
    address_of, client_of, decode_image, encode_image,
};
use crate::net::Net;
use crate::node::Wire;
use crate::node::overlay::PeerContact;
use crate::sandbox::{Guest, LoadedModule, Sandbox, StateDigest};

/// Events queued for a member thread before the node drops new ones.
pub const MEMBER_QUEUE_MAX: usize = 8192;
/// Requests a leader holds while they are being ordered.
pub const PENDING_REQUESTS_MAX: usize = 100_000;
/// Log bytes applied before a checkpoint is taken regardless of slot count.
pub const CHECKPOINT_LOG_BYTES: u64 = 64 << 20;
/// How often the leader resends outbound messages that have no logged answer.
const OUTBOX_RESEND: Duration = Duration::from_secs(2);
/// A leader proposes a due timer's firing again if it was not logged within this.
const TIMER_REPROPOSE: Duration = Duration::from_secs(1);
/// Timer firings a leader proposes per tick, at most.
const TIMERS_FIRED_PER_TICK: usize = 256;
/// A timer whose handler trapped is armed again this long after (doubling
/// with each trap in a row, up to `TIMER_TRAP_BACKOFF_MAX`).
const TIMER_TRAP_BACKOFF: Duration = Duration::from_secs(1);
const TIMER_TRAP_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A replacement that has not finished in this long is abandoned (and retried).
const REPLACEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// A host deployed as a replacement that has never seen itself in a
/// membership and has heard nothing from the other members for this long
/// leaves: the leader gave it up (it did not catch up within
/// `REPLACEMENT_TIMEOUT`, say because this host was down meanwhile), or
/// the virtual peer was destroyed while it caught up. The leader talks to a
/// learner it still wants at least every heartbeat.
pub const LEARNER_ABANDONED: Duration = Duration::from_secs(30);
/// How often the loop runs its own duties even without events.
const TICK: Duration = Duration::from_millis(20);
/// File in a virtual peer's directory with the contacts of its other members.
pub const CONTACTS_FILE: &str = "contacts.json";
/// How often a member checks whether those contacts changed.
const CONTACTS_EVERY: Duration = Duration::from_secs(1);
/// Durations of each kind kept for `vp-host status` (the most recent).
pub const RECENT_SAMPLES: usize = 1024;
/// Slots a leader times at once (far more than a window holds).
const SLOTS_TIMED_MAX: usize = 4096;

/// The last `RECENT_SAMPLES` durations of one kind, in microseconds.
#[derive(Debug, Default)]
pub struct Samples {
    ring: Vec<u32>,
    next: usize,
}

impl Samples {
    pub fn push(&mut self, took: Duration) {
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        if self.ring.len() < RECENT_SAMPLES {
            self.ring.push(us);
        } else {
            self.ring[self.next] = us;
        }
        self.next = (self.next + 1) % RECENT_SAMPLES;
    }

    pub fn summary(&self) -> Recent {
        let mut sorted = self.ring.clone();
        sorted.sort_unstable();
        let at = |p: f64| {
            let i = ((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1);
            sorted.get(i).map_or(0, |&v| u64::from(v))
        };
        Recent {
            samples: sorted.len() as u32,
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: sorted.last().map_or(0, |&v| u64::from(v)),
        }
    }
}

type SharedSamples = Arc<std::sync::Mutex<Samples>>;

/// What a member times for `vp-host status`.
#[derive(Debug, Default)]
struct Timings {
    /// Written by whichever thread writes the log.
    log_write: SharedSamples,
    commit: Samples,
    request: Samples,
    checkpoint: Samples,
}

impl Timings {
    fn summary(&self) -> MemberTimings {
        MemberTimings {
            log_write: self
                .log_write
                .lock()
                .map(|w| w.summary())
                .unwrap_or_default(),
            commit: self.commit.summary(),
            request: self.request.summary(),
            checkpoint: self.checkpoint.summary(),
        }
    }
}

/// What the node (or the API, through it) asks a member thread.
#[derive(Debug)]
pub enum MemberEvent {
    Paxos {
        from: HostId,
        msg: vp_consensus::Message,
    },
    Request(Request),
    Locate {
        nonce: u64,
        reply_to: PeerContact,
    },
    /// The answer to outbound message `id`, from the callee's leader.
    OutboundReply {
        id: u64,
        result: WireResult,
    },
    /// A host is ready to replace `dead` (deployed as a learner).
    ReplacementReady {
        dead: HostId,
        new: HostId,
    },
    ReplacementFailed {
        dead: HostId,
        why: String,
    },
    /// This member's status; with a cursor, also its guest's log lines after it.
    Status(oneshot::Sender<VpStatus>, StatusAsk),
    Digest(oneshot::Sender<Option<StateDigest>>),
    /// Every connection to this host closed (its process died, or the network
    /// between us did): if it led, a new leader is elected as soon as its lease
    /// has surely ended rather than after the election timeout (`Replica::suspect`).
    PeerDown(HostId),
    /// `host` says this virtual peer was destroyed (it has its tombstone):
    /// believed from a voter of this member's configuration only.
    PeerDestroyed(HostId),
    /// `host` is leaving (`vp-host drain`): a leader replaces it as it would
    /// a dead member, while it still votes (no window with one member fewer).
    Drain(HostId),
    /// The storage thread made everything up to this token durable.
    Persisted(u64),
    /// The storage thread failed (fail-stop).
    StorageFailed(String),
    Stop,
}

/// What a status query wants besides the member's summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatusAsk {
    /// The guest's log lines after this cursor (`vp-host logs`).
    pub log_after: Option<super::LogCursor>,
    /// The state digest even if it must be computed (hashing the guest's
    /// memory on the member thread); without it, only one already known for
    /// the current state. Host-wide listings and metrics go without.
    pub digest: bool,
}

/// What a member thread asks of the node.
#[derive(Debug)]
pub enum MemberOutput {
    /// Insert (true) or remove (false) this host's key under the virtual peer's prefix.
    Key { vp: VpId, insert: bool },
    /// Deliver this virtual peer's outbound message (routed like a client request).
    Outbound(Request),
    /// Find a host to replace `dead` and deploy the virtual peer there as a learner.
    FindReplacement {
        vp: VpId,
        dead: HostId,
        members: Vec<HostId>,
    },
    /// This host is no longer a member; the thread has exited. `voters` are
    /// the members that replaced it (as this copy last knew them): clients on
    /// this host ask them directly rather than through the overlay.
    Removed { vp: VpId, voters: Vec<HostId> },
    /// Storage failed: the member stopped (fail-stop).
    Failed { vp: VpId, why: String },
    /// The virtual peer was destroyed: record it and remove this member.
    Destroyed { vp: VpId },
    /// A host id whose contact is unknown (look it up in the overlay).
    Resolve(HostId),
}

/// The node's handle on a member thread.
pub struct MemberHandle {
    pub config: VpConfig,
    tx: SyncSender<MemberEvent>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for MemberHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberHandle")
            .field("vp", &self.config.vp)
            .finish()
    }
}

impl MemberHandle {
    /// Queue an event; never waits. `false` if the queue is full or the thread is gone.
    pub fn send(&self, event: MemberEvent) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!(vp = %self.config.vp, "member queue full; event dropped");
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// The thread's queue, for those that hand it events without the node
    /// (`node::vps::Members`).
    pub fn sender(&self) -> SyncSender<MemberEvent> {
        self.tx.clone()
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        let _ = self.tx.send(MemberEvent::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a member keeps on disk besides the log: `<vp dir>/member.json`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MemberFile {
    pub config: VpConfig,
    /// The founding membership (None for a member that joined as a learner).
    pub founding: Option<Membership>,
}

impl MemberFile {
    /// Read `<member dir>/member.json`.
    pub fn read(member_dir: &Path) -> anyhow::Result<MemberFile> {
        use anyhow::Context;
        let path = member_dir.join("member.json");
        std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice(&b)?))
            .with_context(|| format!("cannot read {}", path.display()))
    }
}

/// The other members' contacts this copy saved (`CONTACTS_FILE`); none if
/// the file is missing or unreadable.
pub fn saved_contacts(member_dir: &Path) -> Vec<(HostId, PeerContact)> {
    let path = member_dir.join(CONTACTS_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return Vec::new();
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        tracing::warn!("ignoring {}: {e}", path.display());
        Vec::new()
    })
}

/// The guest module a member runs: compiled already, or being compiled on a
/// thread of its own. A learner starts (and receives the snapshot) while its
/// module compiles; the first install waits for the compiler.
pub enum ModuleSource {
    Loaded(Arc<LoadedModule>),
    Compiling(std::thread::JoinHandle<Result<Arc<LoadedModule>, String>>),
    Failed(String),
}

impl From<Arc<LoadedModule>> for ModuleSource {
    fn from(module: Arc<LoadedModule>) -> Self {
        ModuleSource::Loaded(module)
    }
}

impl ModuleSource {
    /// Compile `bytes` on a new thread.
    pub fn compile(sandbox: Arc<crate::sandbox::Sandbox>, bytes: Vec<u8>) -> Result<ModuleSource> {
        let handle = std::thread::Builder::new()
            .name("vp-compile".into())
            .spawn(move || sandbox.load(&bytes).map_err(|e| e.to_string()))
            .context("cannot start a compiler thread")?;
        Ok(ModuleSource::Compiling(handle))
    }

    /// The compiled module, waiting for the compiler if it still runs.
    fn get(&mut self) -> Result<Arc<LoadedModule>, String> {
        let current = std::mem::replace(self, ModuleSource::Failed(String::new()));
        *self = match current {
            ModuleSource::Compiling(handle) => {
                // Waiting for the compiler is expected (a learner installs
                // its first snapshot before the module is ready), not a
                // stall: the watchdog keeps hearing from this thread.
                if !handle.is_finished() {
                    tracing::debug!("waiting for the module to compile");
                }
                while !handle.is_finished() {
                    crate::watchdog::beat(crate::watchdog::Beat::Member);
                    std::thread::sleep(Duration::from_millis(2));
                }
                match handle.join() {
                    Ok(Ok(module)) => ModuleSource::Loaded(module),
                    Ok(Err(e)) => {
                        ModuleSource::Failed(format!("the module does not load here: {e}"))
                    }
                    Err(_) => ModuleSource::Failed("the module compiler panicked".into()),
                }
            }
            done => done,
        };
        match self {
            ModuleSource::Loaded(module) => Ok(module.clone()),
            ModuleSource::Failed(why) => Err(why.clone()),
            ModuleSource::Compiling(_) => Err("the module is still compiling".into()),
        }
    }
}

/// The directory of a virtual peer's state on this host.
pub fn vp_dir(data_dir: &Path, vp: VpId) -> PathBuf {
    data_dir.join("vps").join(vp.to_string())
}

/// Everything a member thread needs from the host.
#[derive(Clone)]
pub struct MemberContext {
    pub me: HostId,
    pub me_contact: PeerContact,
    pub data_dir: PathBuf,
    pub sandbox: Arc<Sandbox>,
    pub net: Net<Wire>,
    pub directory: Directory,
    pub node: mpsc::Sender<MemberOutput>,
}

fn now_us(last: &mut u64) -> Time {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    *last = (*last).max(wall);
    Time(*last)
}

/// Teach the directory and the network how to reach the members this copy
/// knew before it stopped (`CONTACTS_FILE`; missing or unreadable: nothing).
fn load_contacts(ctx: &MemberContext, dir: &Path) {
    for (host, contact) in saved_contacts(dir) {
        if ctx.directory.get(host).is_none() {
            ctx.directory.learn(host, &contact);
        }
        ctx.net.add_addresses(contact.peer, contact.addrs);
    }
}

/// Start (or restart) a member. With `file` given, the virtual peer is new
/// on this host (written to disk first); without, it is recovered from disk.
pub fn start_member(
    ctx: MemberContext,
    module: impl Into<ModuleSource>,
    vp: VpId,
    file: Option<MemberFile>,
) -> Result<MemberHandle> {
    let dir = vp_dir(&ctx.data_dir, vp);
    let file = match file {
        Some(file) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            crate::exec::write_atomically(
                &dir.join("member.json"),
                &serde_json::to_vec_pretty(&file)?,
            )?;
            file
        }
        None => {
            let bytes = std::fs::read(dir.join("member.json"))
                .with_context(|| format!("cannot read {}", dir.join("member.json").display()))?;
            let file = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is corrupt", dir.join("member.json").display()))?;
            load_contacts(&ctx, &dir);
            file
        }
    };
    let module = module.into();
    let mut store = FileStore::open(dir.join("log")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let recovered = store
        .load()
        .map_err(|e| anyhow::anyhow!("cannot load the log of vp {vp}: {e}"))?;
    let mut clock = 0;
    let now = now_us(&mut clock);
    let cfg = ReplicaConfig {
        id: ctx.me,
        seed: rand::random(),
        timing: file.config.timing.clone(),
        limits: VpConfig::consensus_limits(),
    };
    let fresh = recovered.snapshot.is_none() && recovered.records.is_empty();
    // A founding member without a snapshot on disk starts from the implicit
    // empty state at slot 0 (the replica hands out no snapshot for it); a
    // learner, or a member with a snapshot, gets its state from `Apply::Snapshot`.
    let start_fresh_guest = recovered.snapshot.is_none() && file.founding.is_some();
    let replica = if fresh {
        Replica::new(cfg, file.founding.clone(), now)
    } else {
        Replica::recover(cfg, file.founding.clone(), recovered, now)
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let membership = replica.membership().clone();
    let config = file.config.clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(MEMBER_QUEUE_MAX);
    let timings = Timings::default();
    let disk = Disk::start(vp, store, tx.clone(), timings.log_write.clone())?;
    let member = Member {
        cfg: file.config,
        ctx,
        module,
        replica,
        disk,
        guest: None,
        state: HostState::default(),
        clock,
        pending: HashMap::new(),
        slots_started: HashMap::new(),
        timings,
        guest_log: Default::default(),
        applying: 0,
        digest_memo: None,
        reads: HashMap::new(),
        applied: Slot(0),
        last_checkpoint: Slot(0),
        log_bytes_since_checkpoint: 0,
        keyed: false,
        saved_contacts: Vec::new(),
        contacts_checked: Time(0),
        confirmed: fresh,
        membership,
        leading: false,
        leading_since: None,
        outbox_sent: HashMap::new(),
        timers_proposed: HashMap::new(),
        timer_seq_proposed: 0,
        replacing: None,
        replace_checkpointed: None,
        was_member: false,
        heard_at: Time(0),
        grace_until: Time(0),
        down: HashMap::new(),
        learner_since: None,
        replace_failed_at: None,
        locators: Vec::new(),
        held: Vec::new(),
        candidate_since: None,
        announced_leader: None,
        destroyed: false,
        stopped: false,
        last_tick: Time(0),
    };
    let thread = std::thread::Builder::new()
        .name(format!("vp-{vp}"))
        .spawn(move || member.run(rx, start_fresh_guest))
        .context("cannot start the member thread")?;
    Ok(MemberHandle {
        config,
        tx,
        thread: Some(thread),
    })
}

/// A checkpoint compacts the log only if it holds at least this many bytes.
pub const COMPACT_LOG_BYTES_MIN: u64 = 16 << 20;

/// Batches the storage thread may have queued before the member waits.
const STORAGE_QUEUE_MAX: usize = 1024;

/// A member's durable log, written either on the member's own thread or on a
/// storage thread beside it.
///
/// A leader hands its batches to the storage thread so that its own write
/// overlaps the followers' (it goes on forming batches and sending accepts
/// while its disk syncs). A follower has nothing to do while its write syncs
/// (its acknowledgement depends on it), so it writes on its own thread and
/// saves the two hand-offs (and wake-ups) per slot. Writes stay in order: a
/// member writes inline only while the storage thread has nothing of its.
struct Disk {
    shared: Arc<std::sync::Mutex<DiskState>>,
    thread: SyncSender<Vec<vp_consensus::PersistBatch>>,
    /// The last token handed to the storage thread, and the last it reported durable.
    sent: u64,
    durable: u64,
}

/// The `FileStore` and the checkpoint snapshot being written beside it.
struct DiskState {
    store: FileStore,
    lagging: Option<LaggingSnapshot>,
    failed: bool,
    /// Each group commit's duration, for `vp-host status`.
    log_writes: SharedSamples,
}

impl DiskState {
    /// Group commit of `batches`; then, if a lagging snapshot is done, the
    /// compaction behind it.
    fn write(&mut self, batches: &[vp_consensus::PersistBatch]) -> Result<Option<u64>, String> {
        if self.failed {
            return Err("storage failed earlier".into());
        }
        let started = std::time::Instant::now();
        let mut compacted = false;
        let result = commit(
            &mut self.store,
            batches,
            &mut self.lagging,
            COMPACT_LOG_BYTES_MIN,
        )
        .and_then(|token| {
            if self
                .lagging
                .as_ref()
                .is_some_and(|l| l.writer.is_finished())
            {
                compacted = true;
                finish_lagging(&mut self.store, &mut self.lagging)?;
            }
            Ok(token)
        });
        let took = started.elapsed();
        if let Ok(mut w) = self.log_writes.lock() {
            w.push(took);
        }
        if took > Duration::from_millis(5) {
            tracing::debug!(
                batches = batches.len(),
                compacted,
                ms = took.as_secs_f64() * 1e3,
                "slow log write"
            );
        }
        result.map_err(|e| {
            self.failed = true;
            e.to_string()
        })
    }
}

impl Disk {
    fn start(
        vp: VpId,
        store: FileStore,
        member: SyncSender<MemberEvent>,
        log_writes: SharedSamples,
    ) -> Result<Disk> {
        let shared = Arc::new(std::sync::Mutex::new(DiskState {
            store,
            lagging: None,
            failed: false,
            log_writes,
        }));
        let thread = start_storage(vp, shared.clone(), member)?;
        Ok(Disk {
            shared,
            thread,
            sent: 0,
            durable: 0,
        })
    }

    /// The storage thread made `token` durable.
    fn on_persisted(&mut self, token: u64) {
        self.durable = self.durable.max(token);
    }

    /// Whether the storage thread has batches of ours not yet durable.
    fn thread_busy(&self) -> bool {
        self.durable < self.sent
    }

    /// Hand `batches` to the storage thread.
    fn send(&mut self, batches: Vec<vp_consensus::PersistBatch>) -> Result<(), String> {
        let last = batches.last().map(|b| b.token);
        self.thread
            .send(batches)
            .map_err(|_| "the storage thread stopped".to_string())?;
        if let Some(token) = last {
            self.sent = self.sent.max(token);
        }
        Ok(())
    }

    /// Write and sync `batches` on this thread (only when `!thread_busy()`).
    fn write_here(
        &mut self,
        batches: &[vp_consensus::PersistBatch],
    ) -> Result<Option<u64>, String> {
        debug_assert!(!self.thread_busy());
        let token = self
            .shared
            .lock()
            .map_err(|_| "the storage lock is poisoned".to_string())?
            .write(batches)?;
        if let Some(token) = token {
            self.sent = self.sent.max(token);
            self.durable = self.durable.max(token);
        }
        Ok(token)
    }
}

/// The storage thread: group commit (every batch queued meanwhile, one
/// fdatasync), then tell the member the last token is durable.
///
/// A checkpoint's snapshot (`PersistBatch::snapshot_may_lag`) is written by a
/// helper thread while this one goes on appending and acknowledging: a 64 MiB
/// snapshot takes ~150 ms to write, and the votes behind it (a configuration
/// change that replaces a dead member, say) would otherwise wait for it. The
/// log is compacted only once that snapshot is durable; until then the old
/// snapshot and the whole log still recover the same state.
fn start_storage(
    vp: VpId,
    shared: Arc<std::sync::Mutex<DiskState>>,
    member: SyncSender<MemberEvent>,
) -> Result<SyncSender<Vec<vp_consensus::PersistBatch>>> {
    let (tx, rx) =
        std::sync::mpsc::sync_channel::<Vec<vp_consensus::PersistBatch>>(STORAGE_QUEUE_MAX);
    std::thread::Builder::new()
        .name(format!("vp-{vp}-disk"))
        .spawn(move || {
            loop {
                let lagging = shared.lock().map(|d| d.lagging.is_some()).unwrap_or(false);
                let first = if lagging {
                    match rx.recv_timeout(Duration::from_millis(5)) {
                        Ok(batches) => Some(batches),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                } else {
                    match rx.recv() {
                        Ok(batches) => Some(batches),
                        Err(_) => break,
                    }
                };
                let mut batches = first.unwrap_or_default();
                for more in rx.try_iter() {
                    batches.extend(more);
                }
                let Ok(mut disk) = shared.lock() else {
                    let _ = member.send(MemberEvent::StorageFailed("lock poisoned".into()));
                    break;
                };
                match disk.write(&batches) {
                    Ok(Some(token)) => {
                        drop(disk);
                        if member.send(MemberEvent::Persisted(token)).is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        drop(disk);
                        let _ = member.send(MemberEvent::StorageFailed(e));
                        break;
                    }
                }
            }
            // Let a snapshot being written finish (the log is not compacted:
            // recovery reads whichever snapshot is whole, and the whole log).
            if let Some(l) = shared.lock().ok().and_then(|mut d| d.lagging.take()) {
                let _ = l.writer.join();
            }
        })
        .context("cannot start the storage thread")?;
    Ok(tx)
}

/// A checkpoint's snapshot being written beside the log, and the compaction
/// that follows it.
struct LaggingSnapshot {
    writer: std::thread::JoinHandle<Result<(), vp_consensus::StorageError>>,
    compact_below: Option<Slot>,
    /// The log is compacted only if it holds this many bytes (`COMPACT_LOG_BYTES_MIN`).
    compact_min_bytes: u64,
}

/// Wait for the lagging snapshot to be durable, then compact the log.
fn finish_lagging(
    store: &mut FileStore,
    lagging: &mut Option<LaggingSnapshot>,
) -> Result<(), vp_consensus::StorageError> {
    let Some(l) = lagging.take() else {
        return Ok(());
    };
    match l.writer.join() {
        Ok(Ok(())) => match l.compact_below {
            // A compaction rewrites the log and syncs it and its directory (a
            // few milliseconds the member's writes wait for), so a small log
            // is left to a later checkpoint's compaction. Recovery skips
            // records the snapshot already holds.
            Some(below) if store.log_bytes() >= l.compact_min_bytes => store.compact(below),
            _ => Ok(()),
        },
        Ok(Err(e)) => Err(e),
        Err(_) => Err(vp_consensus::StorageError::Io {
            path: PathBuf::from("snapshot"),
            source: std::io::Error::other("the snapshot writer panicked"),
        }),
    }
}

/// Group commit of `batches`, with checkpoints' snapshots written beside the log.
fn commit(
    store: &mut FileStore,
    batches: &[vp_consensus::PersistBatch],
    lagging: &mut Option<LaggingSnapshot>,
    compact_min_bytes: u64,
) -> Result<Option<u64>, vp_consensus::StorageError> {
    for b in batches {
        if b.snapshot.is_some() || b.compact_below.is_some() {
            // Snapshots and compactions stay in order: an earlier snapshot
            // never lands after a later one.
            finish_lagging(store, lagging)?;
        }
        match &b.snapshot {
            Some(snap) if b.snapshot_may_lag => {
                store.append(&b.records)?;
                let write = store.snapshot_writer();
                let snap = snap.clone();
                let writer = std::thread::Builder::new()
                    .name("vp-snapshot".into())
                    .spawn(move || write(&snap))
                    .map_err(|e| vp_consensus::StorageError::Io {
                        path: PathBuf::from("snapshot"),
                        source: e,
                    })?;
                *lagging = Some(LaggingSnapshot {
                    writer,
                    compact_below: b.compact_below,
                    compact_min_bytes,
                });
            }
            _ => store.write_batch(b)?,
        }
    }
    if batches.iter().any(|b| b.must_sync) {
        store.sync()?;
    }
    Ok(batches.last().map(|b| b.token))
}

/// Requests held while this member is a candidate, and for how long into
/// a candidacy (an election after a crash takes tens of milliseconds).
const HELD_REQUESTS_MAX: usize = 4096;
const CANDIDATE_HOLD: Duration = Duration::from_millis(150);
/// Locators remembered, and for how long (`announce_leader`).
const LOCATORS_MAX: usize = 64;
const LOCATOR_TTL: Duration = Duration::from_secs(1);
/// A voter whose connections closed is replaced after this much silence
/// (instead of `replace_after_ms`, if that is longer).
const DOWN_REPLACE_AFTER: Duration = Duration::from_millis(150);
/// After a replacement found no host (none with room, or the one chosen
/// refused), the next attempt waits this long: each attempt samples the
/// overlay (the first one also checkpoints the guest).
const REPLACE_RETRY: Duration = Duration::from_millis(500);
/// Applied slots past the last checkpoint beyond which a replacement takes a
/// fresh checkpoint for the new member.
const REPLACE_FRESH_CHECKPOINT_SLOTS: u64 = 64;

struct Replacement {
    dead: HostId,
    new: Option<HostId>,
    started: Time,
}

struct Member {
    cfg: VpConfig,
    ctx: MemberContext,
    module: ModuleSource,
    replica: Replica,
    /// The durable log (`Disk`: on this thread or the storage thread).
    disk: Disk,
    /// None until the first snapshot is applied (a fresh or recovered start
    /// gets one at once; a learner when the leader's snapshot arrives).
    guest: Option<Guest>,
    state: HostState,
    clock: u64,
    /// Requests this leader proposed, waiting for their reply: who to tell,
    /// and since when.
    pending: HashMap<(ClientId, u64), (PeerContact, std::time::Instant)>,
    /// Leader: when each slot in flight had its accept handed off.
    slots_started: HashMap<u64, std::time::Instant>,
    /// Recent durations `vp-host status` shows.
    timings: Timings,
    /// What the guest logged lately (`vp-host logs`).
    guest_log: super::guest_log::GuestLog,
    /// The slot whose commands are being applied (its log lines' slot).
    applying: u64,
    /// The last state digest and the (applied slot, messages handled) it is of.
    digest_memo: Option<((Slot, u64), StateDigest)>,
    reads: HashMap<ReadId, Request>,
    applied: Slot,
    last_checkpoint: Slot,
    log_bytes_since_checkpoint: u64,
    /// Whether our key is in the overlay under the virtual peer's prefix.
    keyed: bool,
    /// Contacts of the other members as last written to `CONTACTS_FILE`.
    saved_contacts: Vec<(HostId, PeerContact)>,
    contacts_checked: Time,
    /// Whether this copy is known to be current: started fresh, or, for a
    /// copy that rejoined from disk, a leader of its epoch has been heard
    /// (or it leads). Until then it keeps its key out of the overlay, so
    /// clients are not routed to a copy that may have been replaced while
    /// its host was down.
    confirmed: bool,
    membership: Arc<Membership>,
    leading: bool,
    /// When this member last started leading (debug logs of its first requests).
    leading_since: Option<Time>,
    outbox_sent: HashMap<u64, Time>,
    /// Leader: timer firings proposed and not yet logged: id -> (arming, when).
    timers_proposed: HashMap<u64, (u64, Time)>,
    /// Leader: the sequence number of the last timer firing it proposed.
    timer_seq_proposed: u64,
    replacing: Option<Replacement>,
    /// The host the last replacement attempt was for (it checkpointed then).
    replace_checkpointed: Option<HostId>,
    /// Hosts whose connections all closed lately (`PeerDown`), and when.
    down: HashMap<HostId, Time>,
    /// The learner in the configuration, and since when this member saw it.
    learner_since: Option<(HostId, Time)>,
    /// When the last attempt to replace a member found no host (the next
    /// waits `REPLACE_RETRY`).
    replace_failed_at: Option<Time>,
    /// Requests that arrived while this member was a candidate.
    held: Vec<Request>,
    /// Since when this member is a candidate (`holding`).
    candidate_since: Option<Time>,
    /// Hosts that asked who leads lately (`LOCATOR_TTL`), told when it changes.
    locators: Vec<(PeerContact, u64, Time)>,
    announced_leader: Option<HostId>,
    /// This host has appeared in an applied membership.
    was_member: bool,
    /// When a consensus message last arrived (see `LEARNER_ABANDONED`).
    heard_at: Time,
    /// The log's `Destroy` was applied (or a voter said the virtual peer was
    /// destroyed): later entries and requests are answered with an error,
    /// and the node removes this member in a moment.
    destroyed: bool,
    stopped: bool,
    last_tick: Time,
    /// A follower does not campaign before this (see `run`).
    grace_until: Time,
}

impl Member {
    fn vp(&self) -> VpId {
        self.cfg.vp
    }

    fn now(&mut self) -> Time {
        now_us(&mut self.clock)
    }

    fn run(mut self, rx: Receiver<MemberEvent>, start_fresh_guest: bool) {
        let span = tracing::info_span!("vp", vp = %self.vp());
        let _guard = span.enter();
        tracing::info!(voters = ?self.membership.voters, "member started");
        let _watched = crate::watchdog::MemberRunning::new();
        self.was_member = self.membership.is_member(self.ctx.me);
        self.heard_at = self.now();
        if start_fresh_guest {
            self.install(Slot(0), self.membership.clone(), Bytes::default());
        }
        self.key_if_current();
        while !self.stopped {
            let now = self.now();
            let wait = self
                .replica
                .poll_timeout()
                .map(|t| Duration::from_micros(t.0.saturating_sub(now.0)))
                .unwrap_or(TICK)
                .min(TICK);
            match rx.recv_timeout(wait) {
                Ok(event) => {
                    self.on_event(event);
                    for event in rx.try_iter().take(4096) {
                        self.on_event(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            crate::watchdog::beat(crate::watchdog::Beat::Member);
            let now = self.now();
            // After a long apply, a follower gives the leader (busy applying the
            // same entries) one election timeout to speak before campaigning;
            // not a leader whose connections closed (it is gone, not busy: on a
            // loaded machine any drain can exceed a heartbeat, and the grace
            // used to turn a 75 ms failover into 500 ms).
            let leader_down = self
                .replica
                .leader_hint()
                .is_some_and(|l| self.down.contains_key(&l));
            let in_grace = !self.replica.is_leader() && now < self.grace_until && !leader_down;
            if !in_grace && self.replica.poll_timeout().is_some_and(|t| t <= now) {
                self.replica.handle_timeout(now);
            }
            if now.since(self.last_tick) >= TICK.as_micros() as u64 {
                self.last_tick = now;
                self.duties(now);
            }
            if now.since(self.contacts_checked) >= CONTACTS_EVERY.as_micros() as u64 {
                self.contacts_checked = now;
                self.save_contacts();
            }
            self.announce_leader(now);
            if !self.confirmed && self.replica.leader_hint().is_some() {
                tracing::debug!(leader = ?self.replica.leader_hint(), "membership confirmed by a leader");
                self.confirmed = true;
                self.key_if_current();
            }
            if self.replica.is_candidate() {
                self.candidate_since.get_or_insert(now);
            } else {
                self.candidate_since = None;
            }
            if !self.holding(now) {
                // Leading again (they are proposed), or not, or a candidacy
                // that drags on (they are redirected: the client asks the
                // members who leads).
                if !self.held.is_empty() {
                    tracing::debug!(
                        requests = self.held.len(),
                        leading = self.replica.is_leader(),
                        "releasing requests held during the candidacy"
                    );
                }
                for req in std::mem::take(&mut self.held) {
                    self.on_request(now, req);
                }
            }
            if !self.pending.is_empty() && !self.replica.is_leader() {
                // Lost the lead (even to run phase 1 again: the replica drops
                // commands not yet in a slot): tell waiting clients to go
                // elsewhere now rather than time out. They ask the members
                // who leads, and hear it as soon as one knows.
                for ((client, seq), (to, _)) in std::mem::take(&mut self.pending) {
                    self.redirect(&to, client, seq);
                }
            }
            let started = self.now();
            self.drain();
            let took = self.now().since(started);
            if took > self.cfg.timing.heartbeat_interval_us {
                tracing::debug!(ms = took / 1000, "long drain (persist, send, apply)");
                self.grace_until = self.now().plus_us(self.cfg.timing.election_timeout_us);
            }
        }
        tracing::info!("member stopped");
    }

    /// Whether requests wait here: this member is a candidate since less
    /// than `CANDIDATE_HOLD` (a candidate that cannot win, say a restarted
    /// member of an old epoch, would otherwise keep them forever).
    fn holding(&self, now: Time) -> bool {
        self.replica.is_candidate()
            && self
                .candidate_since
                .is_none_or(|t| now.since(t) < CANDIDATE_HOLD.as_micros() as u64)
    }

    /// Tell recent locators about a new leader.
    fn announce_leader(&mut self, now: Time) {
        let hint = self.replica.leader_hint();
        if hint == self.announced_leader {
            return;
        }
        self.announced_leader = hint;
        if hint.is_none() {
            return;
        }
        let fresh = LOCATOR_TTL.as_micros() as u64;
        self.locators.retain(|(_, _, t)| now.since(*t) < fresh);
        for (to, nonce, _) in std::mem::take(&mut self.locators) {
            let msg = self.located(nonce);
            self.send_to_peer(&to, msg);
        }
    }

    fn on_event(&mut self, event: MemberEvent) {
        let now = self.now();
        match event {
            MemberEvent::Paxos { from, msg } => {
                self.heard_at = now;
                if let Err(e) = self.replica.handle_message(now, from, msg) {
                    tracing::debug!(%from, "consensus message refused: {e}");
                }
            }
            MemberEvent::Request(req) => self.on_request(now, req),
            MemberEvent::PeerDown(host) => {
                tracing::debug!(%host, leader = ?self.replica.leader_hint(), "connections to a host closed");
                self.down.insert(host, now);
                self.replica.suspect(now, host);
            }
            MemberEvent::Locate { nonce, reply_to } => {
                // Remember who asked: when the leader changes soon after, they
                // hear of it without asking again (a failover's clients).
                self.locators.retain(|(c, _, _)| c.peer != reply_to.peer);
                if self.locators.len() >= LOCATORS_MAX {
                    self.locators.remove(0);
                }
                self.locators.push((reply_to.clone(), nonce, now));
                let msg = self.located(nonce);
                self.send_to_peer(&reply_to, msg);
            }
            MemberEvent::OutboundReply { id, result } => {
                if self.replica.is_leader() && self.state.outbox.contains_key(&id) {
                    let cmd = Command {
                        client: super::reply_client(self.vp()),
                        seq: id,
                        ack_below: self.state.outbox.keys().next().copied().unwrap_or(id),
                        payload: encode_input(&LogInput::OutboundReply(id, result)),
                    };
                    if let Err(e) = self.replica.propose(now, cmd) {
                        tracing::debug!(id, "cannot log the reply to outbound message: {e}");
                    }
                }
            }
            MemberEvent::ReplacementReady { dead, new } => {
                self.on_replacement_ready(now, dead, new)
            }
            MemberEvent::ReplacementFailed { dead, why } => {
                tracing::warn!(
                    %dead,
                    "no replacement found: {why}; trying again in {} ms",
                    REPLACE_RETRY.as_millis()
                );
                self.replacing = None;
                self.replace_failed_at = Some(now);
            }
            MemberEvent::Status(reply, ask) => {
                let mut status = self.status(ask.digest);
                if let Some(cursor) = ask.log_after {
                    (status.guest_log, status.guest_log_skipped) = self.guest_log.after(cursor);
                    status.guest_log_gap = self.guest_log.gap_after(cursor);
                }
                let _ = reply.send(status);
            }
            MemberEvent::Digest(reply) => {
                let _ = reply.send(self.state_digest());
            }
            MemberEvent::Persisted(token) => {
                self.disk.on_persisted(token);
                self.replica.on_persisted(token);
            }
            MemberEvent::StorageFailed(why) => self.fail(format!("storage failed: {why}")),
            MemberEvent::PeerDestroyed(host) => {
                if self.membership.is_voter(host) && host != self.ctx.me && !self.destroyed {
                    self.on_destroyed("a member says it was destroyed while this host was away");
                } else {
                    tracing::debug!(%host, "ignored a destroyed notice from a host that is not a voter");
                }
            }
            MemberEvent::Drain(host) => self.on_drain(now, host),
            MemberEvent::Stop => self.stopped = true,
        }
    }

    /// The answer to a locate: who leads, and the voters with their contacts.
    fn located(&self, nonce: u64) -> VpWire {
        let voters = self
            .membership
            .voters
            .iter()
            .filter_map(|&v| {
                let contact = if v == self.ctx.me {
                    Some(self.ctx.me_contact.clone())
                } else {
                    self.ctx.directory.get(v)
                };
                contact.map(|c| (v, c))
            })
            .collect();
        VpWire::Located {
            vp: self.vp(),
            nonce,
            member: self.ctx.me,
            leader: self.leader_contact(),
            voters,
        }
    }

    fn leader_contact(&self) -> Option<(HostId, PeerContact)> {
        let leader = if self.replica.is_leader() {
            Some(self.ctx.me)
        } else {
            self.replica.leader_hint()
        }?;
        let contact = if leader == self.ctx.me {
            Some(self.ctx.me_contact.clone())
        } else {
            self.ctx.directory.get(leader)
        };
        contact.map(|c| (leader, c))
    }

    fn on_request(&mut self, now: Time, req: Request) {
        let sender = HostId(crate::node::overlay::host_id_of(&req.reply_to.peer).0);
        self.ctx.directory.learn(sender, &req.reply_to);
        if self.newly_leading(now) || self.holding(now) {
            tracing::debug!(
                client = %req.client, seq = req.seq, from = %sender,
                leader = self.replica.is_leader(), holding = self.holding(now),
                pending = self.pending.contains_key(&(req.client, req.seq)),
                "request early in a leadership"
            );
        }
        if self.destroyed {
            // A destroy's retry is answered as the first was.
            let result = if req.destroy {
                Ok(Vec::new().into())
            } else {
                Err(destroyed_text(self.vp()))
            };
            self.reply(&req.reply_to, req.client, req.seq, result);
            return;
        }
        // A candidate (a leader re-running phase 1 for a new epoch, or a
        // follower running for a lost leader) leads in a moment, or learns
        // who does: hold the request rather than send the client away with
        // no leader to go to.
        if self.holding(now) && self.held.len() < HELD_REQUESTS_MAX {
            self.held.push(req);
            return;
        }
        if !self.replica.is_leader() || self.guest.is_none() {
            self.redirect(&req.reply_to, req.client, req.seq);
            return;
        }
        if req.read && !req.destroy {
            match self.replica.read(now, ReadMode::ReadIndex) {
                Ok(id) => {
                    self.reads.insert(id, req);
                }
                Err(e) => self.reply(
                    &req.reply_to,
                    req.client,
                    req.seq,
                    Err(format!("read refused: {e}")),
                ),
            }
            return;
        }
        // A retry of a request this leader already proposed: its slot will
        // answer it (a leader that stops leading redirects all of `pending`).
        if let Some((to, _)) = self.pending.get_mut(&(req.client, req.seq)) {
            *to = req.reply_to;
            return;
        }
        if self.pending.len() >= PENDING_REQUESTS_MAX {
            self.reply(
                &req.reply_to,
                req.client,
                req.seq,
                Err("virtual peer overloaded; retry later".into()),
            );
            return;
        }
        let input = if req.destroy {
            tracing::info!(client = %req.client, "destroy requested; proposing it");
            LogInput::Destroy
        } else {
            LogInput::Request(req.payload)
        };
        let cmd = Command {
            client: req.client,
            seq: req.seq,
            ack_below: req.ack_below,
            payload: encode_input(&input),
        };
        match self.replica.propose(now, cmd) {
            Ok(()) => {
                self.pending.insert(
                    (req.client, req.seq),
                    (req.reply_to, std::time::Instant::now()),
                );
            }
            Err(vp_consensus::ProposeError::NotLeader { .. }) => {
                self.redirect(&req.reply_to, req.client, req.seq);
            }
            Err(e) => self.reply(
                &req.reply_to,
                req.client,
                req.seq,
                Err(format!("not accepted: {e}")),
            ),
        }
    }

    /// Leading for less than a second (failover diagnostics).
    fn newly_leading(&self, now: Time) -> bool {
        self.leading_since.is_some_and(|t| now.since(t) < 1_000_000)
    }

    fn reply(&self, to: &PeerContact, client: ClientId, seq: u64, result: WireResult) {
        // The clock as last read: a reply follows a turn's reading closely.
        if self.newly_leading(Time(self.clock)) {
            tracing::debug!(%client, seq, to = %to.peer, "reply early in a leadership");
        }
        let msg = VpWire::Reply(Reply {
            vp: self.vp(),
            client,
            seq,
            result,
            leader: self.ctx.me,
        });
        self.send_to_peer(to, msg);
    }

    /// Not the leader (any more): tell the client where to go, if we know.
    fn redirect(&self, to: &PeerContact, client: ClientId, seq: u64) {
        let msg = VpWire::Redirect {
            vp: self.vp(),
            client,
            seq,
            leader: self.leader_contact(),
        };
        self.send_to_peer(to, msg);
    }

    fn send_to_peer(&self, to: &PeerContact, msg: VpWire) {
        self.ctx
            .net
            .add_addresses(to.peer, to.addrs.iter().cloned());
        if to.peer == self.ctx.me_contact.peer {
            // A reply to ourselves (a client on this host): through the node like any frame.
            let _ = self.ctx.net.send_local(Wire::Vp(msg));
            return;
        }
        if let Err(e) = self.ctx.net.send(to.peer, &Wire::Vp(msg)) {
            tracing::debug!(peer = %to.peer, "not sent: {e}");
        }
    }

    /// The virtual peer is destroyed: answer what waits here, and ask the node
    /// to record it and remove this member (after a moment, so the other
    /// members hear the decision from this leader first).
    fn on_destroyed(&mut self, why: &str) {
        tracing::info!(vp = %self.vp(), "virtual peer destroyed ({why}); this member leaves");
        self.destroyed = true;
        self.replacing = None;
        let text = destroyed_text(self.vp());
        for req in std::mem::take(&mut self.held) {
            self.reply(&req.reply_to, req.client, req.seq, Err(text.clone()));
        }
        for (_, req) in std::mem::take(&mut self.reads) {
            self.reply(&req.reply_to, req.client, req.seq, Err(text.clone()));
        }
        if self.keyed {
            self.set_key(false);
        }
        self.tell_node(MemberOutput::Destroyed { vp: self.vp() });
    }

    /// Periodic work: leadership changes, outbox resends, member replacement.
    fn duties(&mut self, now: Time) {
        let leading = self.replica.is_leader();
        if leading != self.leading {
            self.leading = leading;
            self.leading_since = leading.then_some(now);
            if leading {
                tracing::info!(epoch = self.replica.epoch().0, "leading");
                self.outbox_sent.clear();
                self.timers_proposed.clear();
            } else {
                // Requests waiting here are redirected by `run` once this
                // member is not a candidate either (a leader re-running phase
                // 1 for a new epoch keeps them).
                tracing::info!(leader = ?self.replica.leader_hint(), "no longer leading");
                self.replacing = None;
            }
        }
        if !self.was_member
            && !self.destroyed
            && now.since(self.heard_at) > LEARNER_ABANDONED.as_micros() as u64
        {
            tracing::warn!(
                "deployed as a new member, but no member has been in touch for {} s: \
                 the replacement was given up (or the virtual peer destroyed); leaving",
                LEARNER_ABANDONED.as_secs()
            );
            self.tell_node(MemberOutput::Removed {
                vp: self.vp(),
                voters: Vec::new(),
            });
            self.stopped = true;
            return;
        }
        if !leading || self.guest.is_none() || self.destroyed {
            return;
        }
        // Outbound messages without a logged answer: (re)send.
        let due: Vec<u64> = self
            .state
            .outbox
            .keys()
            .filter(|id| {
                self.outbox_sent
                    .get(id)
                    .is_none_or(|t| now.since(*t) >= OUTBOX_RESEND.as_micros() as u64)
            })
            .copied()
            .take(1024)
            .collect();
        for id in due {
            self.send_outbound(now, id);
        }
        self.fire_timers(now);
        self.check_members(now);
    }

    /// Leader: propose the firing of every armed timer whose due time its
    /// clock has reached. The entry's time is stamped at or after now, so the
    /// guest never sees a timer fire early. A proposal that is lost (leader
    /// change, a refusal) is made again after `TIMER_REPROPOSE`; one logged
    /// twice, or after a cancel, does nothing the second time.
    fn fire_timers(&mut self, now: Time) {
        let timers = &self.state.timers;
        self.timers_proposed
            .retain(|id, (armed, _)| timers.get(id).is_some_and(|t| t.armed == *armed));
        if timers.is_empty() {
            return;
        }
        let now_ms = now.as_ms();
        let due: Vec<(u64, u64)> = timers
            .iter()
            .filter(|(id, t)| {
                t.due_ms <= now_ms
                    && self
                        .timers_proposed
                        .get(id)
                        .is_none_or(|&(_, at)| now.since(at) >= TIMER_REPROPOSE.as_micros() as u64)
            })
            .map(|(&id, t)| (id, t.armed))
            .take(TIMERS_FIRED_PER_TICK)
            .collect();
        for (id, armed) in due {
            // Each firing acknowledges all before it, so the session keeps
            // one reply; a proposal numbered below a logged one would be
            // forgotten, hence above both what is logged and what this
            // leader proposed.
            let seq = self.state.timer_fire_seq.max(self.timer_seq_proposed) + 1;
            let cmd = Command {
                client: super::timer_client(self.vp()),
                seq,
                ack_below: seq,
                payload: encode_input(&LogInput::Timer { id, armed }),
            };
            match self.replica.propose(now, cmd) {
                Ok(_) => {
                    self.timer_seq_proposed = seq;
                    self.timers_proposed.insert(id, (armed, now));
                }
                Err(e) => {
                    tracing::debug!(id, "cannot propose a timer's firing yet: {e}");
                    break;
                }
            }
        }
    }

    fn send_outbound(&mut self, now: Time, id: u64) {
        let Some(out) = self.state.outbox.get(&id) else {
            return;
        };
        let ack_below = self
            .state
            .outbox
            .iter()
            .filter(|(_, o)| o.to == out.to)
            .map(|(i, _)| *i)
            .next()
            .unwrap_or(id);
        let req = Request {
            vp: out.to,
            client: super::vp_client(self.vp()),
            seq: id,
            ack_below,
            payload: out.payload.clone(),
            read: false,
            destroy: false,
            reply_to: self.ctx.me_contact.clone(),
        };
        self.outbox_sent.insert(id, now);
        let _ = self.ctx.node.try_send(MemberOutput::Outbound(req));
    }

    /// The leader's failure detector: a voter silent for `replace_after_ms`
    /// is replaced by a host the node finds through the overlay.
    fn check_members(&mut self, now: Time) {
        if let Some(r) = &self.replacing {
            if now.since(r.started) > REPLACEMENT_TIMEOUT.as_micros() as u64 {
                tracing::warn!(dead = %r.dead, "replacement did not finish in time; giving up on this attempt");
                self.replacing = None;
            }
            return;
        }
        if let Some(learner) = self.membership.learners.first().map(|l| l.host) {
            // A learner that never catches up (its host died, or left) would
            // block every later replacement: remove it after a while.
            let since = *self.learner_since.get_or_insert((learner, now));
            if since.0 != learner {
                self.learner_since = Some((learner, now));
            } else if now.since(since.1) > REPLACEMENT_TIMEOUT.as_micros() as u64
                && self.replica.is_leader()
            {
                tracing::warn!(%learner, "the new member did not catch up in time; removing it");
                if let Err(e) = self
                    .replica
                    .reconfigure(now, MembershipChange::Remove(learner))
                {
                    tracing::debug!("cannot remove the learner yet: {e}");
                }
                self.learner_since = Some((learner, now));
            }
            return;
        }
        self.learner_since = None;
        if self
            .replace_failed_at
            .is_some_and(|at| now.since(at) < REPLACE_RETRY.as_micros() as u64)
        {
            return;
        }
        let limit = self.cfg.replace_after_ms * 1000;
        // A member whose connections closed (its process died) and that stayed
        // silent for DOWN_REPLACE_AFTER is not coming back soon.
        let down_limit = limit.min(DOWN_REPLACE_AFTER.as_micros() as u64);
        self.down
            .retain(|_, at| now.since(*at) < 10 * DOWN_REPLACE_AFTER.as_micros() as u64);
        let dead = self
            .replica
            .member_silence_us(now)
            .into_iter()
            .find(|(h, silence)| {
                let limit = if self.down.contains_key(h) {
                    down_limit
                } else {
                    limit
                };
                self.membership.is_voter(*h) && *silence >= limit
            });
        if let Some((dead, silence)) = dead {
            tracing::info!(%dead, silent_ms = silence / 1000, connections_closed = self.down.contains_key(&dead), "member is silent; finding a replacement");
            self.start_replacing(now, dead);
        }
    }

    /// Find a host to take `old`'s place (the node places and deploys it).
    fn start_replacing(&mut self, now: Time, old: HostId) {
        self.replacing = Some(Replacement {
            dead: old,
            new: None,
            started: now,
        });
        let members = self.membership.all_hosts().collect();
        self.tell_node(MemberOutput::FindReplacement {
            vp: self.vp(),
            dead: old,
            members,
        });
        // Checkpoint now, while the node finds a host and deploys the
        // module there: the snapshot the new member receives is ready
        // when that host is. An attempt again for the same host (the last
        // found no host with room) takes one only if the last is stale, as
        // `on_replacement_ready` would: a leaving host with nowhere to go is
        // asked about every second, and a large guest was encoded each time.
        let again = self.replace_checkpointed == Some(old);
        self.replace_checkpointed = Some(old);
        if !again || self.applied.0 > self.last_checkpoint.0 + REPLACE_FRESH_CHECKPOINT_SLOTS {
            self.checkpoint();
        }
    }

    /// A voter's host is leaving: the leader replaces it now (its host asks
    /// again every second until it is no longer a member, so a request that
    /// finds a replacement under way is dropped). On the leaving host's own
    /// member, when it does not lead, the request goes on to the leader.
    fn on_drain(&mut self, now: Time, host: HostId) {
        if !self.replica.is_leader() {
            // This host is the one leaving: tell the leader.
            if host == self.ctx.me
                && let Some((leader, contact)) = self.leader_contact()
                && leader != self.ctx.me
            {
                self.send_to_peer(&contact, VpWire::Drain { vp: self.vp() });
            }
            return;
        }
        if !self.membership.is_voter(host)
            || self.replacing.is_some()
            || !self.membership.learners.is_empty()
            || self.destroyed
            || self.guest.is_none()
        {
            return;
        }
        tracing::info!(%host, "a member's host is leaving (vp-host drain); replacing it");
        self.start_replacing(now, host);
    }

    fn on_replacement_ready(&mut self, now: Time, dead: HostId, new: HostId) {
        let wanted = self
            .replacing
            .as_ref()
            .is_some_and(|r| r.dead == dead && r.new.is_none());
        if !wanted || !self.replica.is_leader() || !self.membership.is_voter(dead) {
            return;
        }
        // The checkpoint taken when the replacement began is what the new member
        // receives (strong migration), then the log after it; a newer one only
        // if much happened meanwhile.
        if self.applied.0 > self.last_checkpoint.0 + REPLACE_FRESH_CHECKPOINT_SLOTS {
            self.checkpoint();
        }
        match self.replica.reconfigure(
            now,
            MembershipChange::Replace {
                remove: dead,
                add: new,
            },
        ) {
            Ok(()) => {
                tracing::info!(%dead, %new, "replacing member: copying state to the new host");
                if let Some(r) = &mut self.replacing {
                    r.new = Some(new);
                }
            }
            Err(e) => {
                tracing::warn!(%dead, %new, "cannot start the replacement: {e}");
                self.replacing = None;
            }
        }
    }

    /// Persist, then send, then apply, until the replica has nothing more.
    fn drain(&mut self) {
        loop {
            let mut progressed = false;
            let mut batches = Vec::new();
            while let Some(batch) = self.replica.poll_persist() {
                batches.push(batch);
            }
            if !batches.is_empty() {
                progressed = true;
                if self.replica.is_leader() {
                    self.note_slots_started(&batches);
                }
                if self.write_inline(&batches) {
                    // What is ready to go leaves before this thread blocks on the disk.
                    while let Some((to, msg)) = self.replica.poll_send() {
                        self.send_paxos(to, msg);
                    }
                    match self.disk.write_here(&batches) {
                        Ok(Some(token)) => self.replica.on_persisted(token),
                        Ok(None) => {}
                        Err(e) => {
                            self.fail(format!("storage failed: {e}"));
                            return;
                        }
                    }
                } else if let Err(e) = self.disk.send(batches) {
                    // The storage thread writes and syncs them; the replica
                    // holds back what depends on them until `Persisted` comes back.
                    self.fail(e);
                    return;
                }
            }
            while let Some((to, msg)) = self.replica.poll_send() {
                progressed = true;
                self.send_paxos(to, msg);
            }
            while let Some(apply) = self.replica.poll_apply() {
                progressed = true;
                self.apply(apply);
                if self.stopped {
                    return;
                }
            }
            if !progressed {
                return;
            }
        }
    }

    /// Fail-stop: the disk (or the guest) no longer matches what this member
    /// would promise; stop, keep the data, let the node know.
    fn fail(&mut self, why: String) {
        tracing::error!("{why}; stopping this member");
        self.tell_node(MemberOutput::Failed { vp: self.vp(), why });
        self.stopped = true;
    }

    /// Hand the node an output it must not miss (a replacement to start, a
    /// failure, a departure, an overlay key): if its queue is full, wait for
    /// room, up to a second (a node that is shutting down drains no more).
    fn tell_node(&self, output: MemberOutput) {
        let mut output = output;
        let give_up = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            match self.ctx.node.try_send(output) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= give_up {
                        tracing::warn!("the node's queue stayed full; an output was dropped");
                        return;
                    }
                    output = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Whether this member writes `batches` on its own thread (`Disk`): a
    /// follower does, unless the storage thread still holds batches of its
    /// or they carry a snapshot received from the leader (a large write,
    /// which the storage thread does while the guest installs it).
    fn write_inline(&self, batches: &[vp_consensus::PersistBatch]) -> bool {
        !self.disk.thread_busy()
            && !self.replica.is_leader()
            && !batches
                .iter()
                .any(|b| b.snapshot.is_some() && !b.snapshot_may_lag)
    }

    fn send_paxos(&self, to: HostId, msg: vp_consensus::Message) {
        let Some(contact) = self.ctx.directory.get(to) else {
            let _ = self.ctx.node.try_send(MemberOutput::Resolve(to));
            return;
        };
        self.ctx
            .net
            .add_addresses(contact.peer, contact.addrs.iter().cloned());
        if let Err(e) = self
            .ctx
            .net
            .send(contact.peer, &Wire::Paxos { vp: self.vp(), msg })
        {
            tracing::trace!(%to, "consensus message not sent: {e}");
        }
    }

    /// Leader: the slots whose accepts these batches carry start now.
    fn note_slots_started(&mut self, batches: &[vp_consensus::PersistBatch]) {
        let now = std::time::Instant::now();
        if self.slots_started.len() > SLOTS_TIMED_MAX {
            // Slots that will never come out (a leadership lost meanwhile).
            self.slots_started.clear();
        }
        for b in batches {
            for r in &b.records {
                if let vp_consensus::Record::Accept { slot, .. } = r {
                    self.slots_started.entry(slot.0).or_insert(now);
                }
            }
        }
    }

    fn apply(&mut self, apply: Apply) {
        let slot = match &apply {
            Apply::Batch { slot, .. } | Apply::Noop { slot } | Apply::Membership { slot, .. } => {
                Some(*slot)
            }
            _ => None,
        };
        if let Some(started) = slot.and_then(|s| self.slots_started.remove(&s.0)) {
            self.timings.commit.push(started.elapsed());
        }
        match apply {
            Apply::Snapshot {
                slot,
                membership,
                app_state,
            } => self.install(slot, membership, app_state),
            Apply::Batch {
                slot,
                time_ms,
                entropy,
                batch,
                outcomes,
            } => {
                self.applying = slot.0;
                for (i, (cmd, outcome)) in batch.commands.iter().zip(outcomes).enumerate() {
                    let entropy = entropy ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    self.apply_command(time_ms, entropy, cmd, outcome);
                }
                self.log_bytes_since_checkpoint += batch.cost_bytes() as u64;
                self.after_slot(slot);
            }
            Apply::Noop { slot } => self.after_slot(slot),
            Apply::Membership { slot, membership } => {
                self.on_membership(membership);
                if !self.stopped {
                    self.after_slot(slot);
                }
            }
            Apply::ReadReady { id } => {
                if let Some(req) = self.reads.remove(&id) {
                    let result = match self.guest.as_mut() {
                        Some(guest) => guest
                            .query(&req.payload)
                            .unwrap_or_else(|e| Err(e.to_string())),
                        None => Err("this member has no state yet; retry".to_string()),
                    };
                    self.reply(&req.reply_to, req.client, req.seq, result);
                }
            }
            Apply::ReadAborted { id } => {
                if let Some(req) = self.reads.remove(&id) {
                    self.redirect(&req.reply_to, req.client, req.seq);
                }
            }
        }
    }

    fn after_slot(&mut self, slot: Slot) {
        self.applied = slot;
        let due = slot.0.saturating_sub(self.last_checkpoint.0) >= self.cfg.checkpoint_every_slots
            || self.log_bytes_since_checkpoint >= CHECKPOINT_LOG_BYTES;
        if due {
            self.checkpoint();
        }
    }

    /// Hand consensus an image of the state as of the last applied slot,
    /// unless nothing was applied since the last one (consensus would refuse
    /// it as stale after the guest was encoded for nothing).
    fn checkpoint(&mut self) {
        let Some(guest) = self.guest.as_mut() else {
            return;
        };
        if self.applied.0 == 0 || self.applied <= self.last_checkpoint {
            return;
        }
        let started = std::time::Instant::now();
        let room = self.replica.checkpoint_room();
        let image = match encode_image(room, &self.state, |out| guest.encode_snapshot_into(out)) {
            Ok(image) => image,
            Err(e) => {
                tracing::error!("cannot encode a checkpoint: {e}");
                return;
            }
        };
        let bytes = image.len() - room;
        let encoded_ms = started.elapsed().as_secs_f64() * 1e3;
        match self.replica.checkpoint_in_place(self.applied, image, room) {
            Ok(()) => {
                self.timings.checkpoint.push(started.elapsed());
                let ms = started.elapsed().as_secs_f64() * 1e3;
                if ms > 20.0 {
                    tracing::info!(slot = self.applied.0, bytes, encoded_ms, ms, "checkpoint");
                } else {
                    tracing::debug!(slot = self.applied.0, bytes, encoded_ms, ms, "checkpoint");
                }
                self.last_checkpoint = self.applied;
                self.log_bytes_since_checkpoint = 0;
            }
            Err(e) => tracing::debug!("checkpoint refused: {e}"),
        }
    }

    /// Replace the application state: a fresh guest (empty image at slot 0)
    /// or the guest and host state of a snapshot.
    fn install(&mut self, slot: Slot, membership: Arc<Membership>, app_state: Bytes) {
        self.guest_log.restart_at(slot.0);
        let started = std::time::Instant::now();
        let result = match self.module.get() {
            Err(why) => Err(why),
            Ok(module) if app_state.is_empty() => {
                self.state = HostState::default();
                Guest::start(&self.ctx.sandbox, module, self.cfg.limits).map_err(|e| e.to_string())
            }
            Ok(module) => match decode_image(&app_state) {
                Ok((state, range)) => {
                    self.state = state;
                    Guest::restore_shared(
                        &self.ctx.sandbox,
                        module,
                        app_state.shared().clone(),
                        range,
                        self.cfg.limits,
                    )
                    .map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("snapshot image is corrupt: {e}")),
            },
        };
        match result {
            Ok(mut guest) => {
                guest.set_label(&self.vp().to_string());
                if slot.0 > 0 {
                    tracing::info!(
                        slot = slot.0,
                        bytes = app_state.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "state installed from snapshot"
                    );
                }
                self.guest = Some(guest);
            }
            Err(e) => {
                // Every replica gets the same image; a guest that cannot start here
                // cannot start anywhere. Stop this member rather than diverge.
                let why = format!("cannot start the guest at slot {}: {e}", slot.0);
                tracing::error!("{why}");
                self.tell_node(MemberOutput::Failed { vp: self.vp(), why });
                self.stopped = true;
                return;
            }
        }
        self.applied = slot;
        self.last_checkpoint = slot;
        self.outbox_sent.clear();
        self.on_membership(membership);
    }

    fn on_membership(&mut self, membership: Arc<Membership>) {
        if membership.epoch == self.membership.epoch && membership.voters == self.membership.voters
        {
            self.membership = membership;
            return;
        }
        tracing::info!(epoch = membership.epoch.0, voters = ?membership.voters, learners = ?membership.learners, "membership");
        // Learn now how to reach members this host has never talked to (a
        // replacement added by the leader): after the next failure any of
        // them may have to run an election, and a lookup then costs time.
        let mut unknown = false;
        for host in membership
            .voters
            .iter()
            .copied()
            .chain(membership.learners.iter().map(|l| l.host))
        {
            if host != self.ctx.me && self.ctx.directory.get(host).is_none() {
                unknown = true;
                let _ = self.ctx.node.try_send(MemberOutput::Resolve(host));
            }
        }
        // The leader that made the change knows them all: its `Located`
        // names every voter with its contact, usually long before an
        // overlay lookup ends (which, on a host that just rejoined the
        // overlay, took seconds: a survivor then could not reach the other
        // survivor to be elected, and the election waited for the timeout).
        if unknown
            && let Some((leader, contact)) = self.leader_contact()
            && leader != self.ctx.me
        {
            let msg = VpWire::Locate {
                vp: self.vp(),
                nonce: rand::random(),
                reply_to: self.ctx.me_contact.clone(),
            };
            self.send_to_peer(&contact, msg);
        }
        if let Some(r) = &self.replacing
            && !membership.is_voter(r.dead)
        {
            tracing::info!(dead = %r.dead, new = ?r.new, "member replaced");
            self.replacing = None;
        }
        self.membership = membership;
        let me = self.ctx.me;
        self.key_if_current();
        if self.membership.is_member(me) {
            self.was_member = true;
        }
        // A learner's first snapshot may predate its own addition: only a host
        // that has seen itself in the membership concludes it was removed.
        if self.was_member && !self.membership.is_member(me) {
            tracing::info!("this host is no longer a member; leaving the virtual peer");
            if self.keyed {
                self.set_key(false);
            }
            self.tell_node(MemberOutput::Removed {
                vp: self.vp(),
                voters: self.membership.voters.clone(),
            });
            self.stopped = true;
        }
    }

    /// Writes how to reach the other members (peer ids and addresses) next
    /// to the log when it changed, so that after a restart this member can
    /// reach them at once instead of first looking each up in the overlay.
    /// A hint, not state: a stale or missing file only costs lookups.
    fn save_contacts(&mut self) {
        let me = self.ctx.me;
        let mut list: Vec<(HostId, PeerContact)> = self
            .membership
            .voters
            .iter()
            .copied()
            .chain(self.membership.learners.iter().map(|l| l.host))
            .filter(|h| *h != me)
            .filter_map(|h| {
                let mut c = self.ctx.directory.get(h)?;
                if c.addrs.is_empty() {
                    c.addrs = self.ctx.net.addresses_of(&c.peer);
                }
                (!c.addrs.is_empty()).then_some((h, c))
            })
            .collect();
        list.sort_by_key(|(h, _)| h.0);
        if list == self.saved_contacts {
            return;
        }
        let path = vp_dir(&self.ctx.data_dir, self.vp()).join(CONTACTS_FILE);
        let written = serde_json::to_vec(&list)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| crate::exec::write_atomically(&path, &bytes));
        match written {
            Ok(()) => self.saved_contacts = list,
            Err(e) => tracing::debug!("cannot save the members' contacts: {e:#}"),
        }
    }

    /// Inserts our key if this host votes and its copy is known current.
    fn key_if_current(&mut self) {
        if self.confirmed && !self.keyed && !self.destroyed && self.membership.is_voter(self.ctx.me)
        {
            self.set_key(true);
        }
    }

    fn set_key(&mut self, insert: bool) {
        self.keyed = insert;
        self.tell_node(MemberOutput::Key {
            vp: self.vp(),
            insert,
        });
    }

    fn apply_command(&mut self, time_ms: u64, entropy: u64, cmd: &Command, outcome: Outcome) {
        match outcome {
            Outcome::Fresh => {}
            Outcome::Refused => {
                // Not applied and not remembered: nothing to record.
                if let Some((to, _)) = self.pending.remove(&(cmd.client, cmd.seq)) {
                    let why = format!(
                        "the virtual peer is serving {} client sessions, all active in the \
                         last {} s; not applied, try again later",
                        VpConfig::consensus_limits().clients_max,
                        VpConfig::consensus_limits().session_retain_ms / 1000
                    );
                    self.reply(&to, cmd.client, cmd.seq, Err(why));
                }
                return;
            }
            Outcome::Duplicate(reply) => {
                // Answered from the session table, never applied twice.
                if let Some((to, since)) = self.pending.remove(&(cmd.client, cmd.seq)) {
                    let result = match reply {
                        SessionReply::Cached(bytes) => abi::codec::decode_result(&bytes)
                            .unwrap_or_else(|e| Err(format!("cached reply unreadable: {e}"))),
                        SessionReply::Pending => {
                            self.pending.insert((cmd.client, cmd.seq), (to, since));
                            return;
                        }
                        SessionReply::Forgotten => {
                            Err("request already handled; its reply is no longer kept".into())
                        }
                    };
                    self.reply(&to, cmd.client, cmd.seq, result);
                }
                return;
            }
        }
        let input = match abi::decode::<LogInput>(&cmd.payload) {
            Ok(input) => input,
            Err(e) => {
                self.record_and_answer(cmd.client, cmd.seq, Err(format!("malformed request: {e}")));
                return;
            }
        };
        if self.destroyed {
            // Entries decided after the destroy: not for the guest.
            let result = match input {
                LogInput::Destroy => Ok(Vec::new().into()),
                _ => Err(destroyed_text(self.vp())),
            };
            self.record_and_answer(cmd.client, cmd.seq, result);
            return;
        }
        let mut fired_timer = None;
        let envelope = match input {
            LogInput::Destroy => {
                self.record_and_answer(cmd.client, cmd.seq, Ok(Vec::new().into()));
                self.on_destroyed("destroy decided");
                return;
            }
            LogInput::Request(payload) => Envelope(
                time_ms,
                entropy,
                Input::Request(address_of(cmd.client), cmd.seq, payload.into()),
            ),
            LogInput::OutboundReply(id, result) => {
                self.record(cmd.client, cmd.seq, &Ok(Vec::new().into()));
                let Some(out) = self.state.outbox.remove(&id) else {
                    return; // already answered
                };
                self.outbox_sent.remove(&id);
                // The guest drops answers to one-way messages, so an error
                // (no answer in OUTBOUND_TIMEOUT; the callee refused it) would
                // go unseen: the hosts say it.
                if let (false, Err(why)) = (out.call, &result) {
                    tracing::warn!(to = %out.to, id, "a one-way message was not delivered: {why}");
                }
                Envelope(time_ms, entropy, Input::CallReply(id, result))
            }
            LogInput::Timer { id, armed } => {
                self.record(cmd.client, cmd.seq, &Ok(Vec::new().into()));
                self.state.timer_fire_seq = self.state.timer_fire_seq.max(cmd.seq);
                if self.state.timers.get(&id).is_none_or(|t| t.armed != armed) {
                    return; // cancelled, moved, or already fired
                }
                fired_timer = self.state.timers.remove(&id).map(|t| (id, t));
                self.timers_proposed.remove(&id);
                Envelope(time_ms, entropy, Input::Timer(id))
            }
        };
        let is_request = matches!(envelope.2, Input::Request(..));
        let Some(guest) = self.guest.as_mut() else {
            tracing::error!("a decided entry arrived before any state was installed");
            return;
        };
        let handled = guest.handle(&envelope);
        for line in guest.take_log() {
            self.guest_log.push(self.applying, time_ms, line);
        }
        match handled {
            Ok(effects) => {
                for effect in effects {
                    self.on_effect(effect);
                }
            }
            Err(e) => {
                if is_request {
                    self.record_and_answer(cmd.client, cmd.seq, Err(e.to_string()));
                } else if let Some((id, timer)) = fired_timer {
                    // The trap undid the guest's side of the firing (its
                    // record of the timer is armed again): arm it again here
                    // too, later, so the two agree and the timer is retried.
                    let backoff = (TIMER_TRAP_BACKOFF.as_millis() as u64)
                        .saturating_mul(1 << timer.traps.min(16))
                        .min(TIMER_TRAP_BACKOFF_MAX.as_millis() as u64);
                    tracing::warn!(
                        id,
                        "guest failed on timer {id}: {e}; firing it again in {backoff} ms"
                    );
                    self.state.timers.insert(
                        id,
                        ArmedTimer {
                            due_ms: time_ms.saturating_add(backoff),
                            traps: timer.traps.saturating_add(1),
                            ..timer
                        },
                    );
                } else {
                    tracing::warn!("guest failed on a call reply: {e}");
                }
            }
        }
    }

    fn on_effect(&mut self, effect: Effect) {
        match effect {
            Effect::Reply(to, id, result) => self.record_and_answer(client_of(to), id, result),
            Effect::Send(to, id, payload) => self.queue_outbound(to, id, payload.into_vec(), false),
            Effect::Call(to, id, payload) => self.queue_outbound(to, id, payload.into_vec(), true),
            Effect::SetTimer(id, due_ms) => {
                let timers = &mut self.state.timers;
                if !timers.contains_key(&id) && timers.len() >= abi::TIMERS_MAX {
                    tracing::warn!(
                        id,
                        "the guest armed more than {} timers; this one is ignored",
                        abi::TIMERS_MAX
                    );
                    return;
                }
                self.state.timers_armed += 1;
                let armed = self.state.timers_armed;
                timers.insert(
                    id,
                    ArmedTimer {
                        due_ms,
                        armed,
                        traps: 0,
                    },
                );
            }
            Effect::CancelTimer(id) => {
                self.state.timers.remove(&id);
            }
        }
    }

    fn queue_outbound(&mut self, to: VpId, id: u64, payload: Vec<u8>, call: bool) {
        self.state.outbox.insert(id, Outbound { to, payload, call });
        if self.replica.is_leader() {
            let now = self.now();
            self.send_outbound(now, id);
        }
    }

    fn record(&mut self, client: ClientId, seq: u64, result: &WireResult) {
        let mut bytes = Vec::new();
        abi::codec::encode_result(result, &mut bytes);
        if let Err(e) = self.replica.record_reply(client, seq, Bytes::from(bytes)) {
            tracing::debug!("reply not cached: {e}");
        }
    }

    fn record_and_answer(&mut self, client: ClientId, seq: u64, result: WireResult) {
        self.record(client, seq, &result);
        if let Some((to, since)) = self.pending.remove(&(client, seq)) {
            self.reply(&to, client, seq, result);
            self.timings.request.push(since.elapsed());
        }
    }

    /// The guest's state digest, computed again only if the state may have
    /// changed since the last one: hashing a large guest's memory holds this
    /// thread (about 20 ms for 64 MiB here), and status is polled.
    fn state_digest(&mut self) -> Option<StateDigest> {
        if let Some(d) = self.known_digest() {
            return Some(d);
        }
        let g = self.guest.as_mut()?;
        let d = g.digest();
        self.digest_memo = Some(((self.applied, g.handled()), d));
        Some(d)
    }

    /// The state digest if the last one computed is of the current state.
    fn known_digest(&self) -> Option<StateDigest> {
        let g = self.guest.as_ref()?;
        // Only applying a slot (or installing one) changes the state.
        let key = (self.applied, g.handled());
        match self.digest_memo {
            Some((k, d)) if k == key => Some(d),
            _ => None,
        }
    }

    fn status(&mut self, compute_digest: bool) -> VpStatus {
        let s = self.replica.status();
        let digest = if compute_digest {
            self.state_digest()
        } else {
            self.known_digest()
        }
        .map(|d| d.to_string());
        let (state_bytes, handled) = match self.guest.as_ref() {
            Some(g) => (g.memory_bytes(), g.handled()),
            None => (0, 0),
        };
        VpStatus {
            vp: self.vp().to_string(),
            host: host_text(self.ctx.me),
            name: self.cfg.name.clone(),
            module: self.cfg.module.to_string(),
            role: format!("{:?}", s.role).to_lowercase(),
            epoch: s.epoch.0,
            leader: s.leader.map(host_text),
            voters: s.voters.iter().copied().map(host_text).collect(),
            learners: s.learners.iter().copied().map(host_text).collect(),
            decided_below: s.decided_below.0,
            applied_below: s.applied_below.0,
            snapshot_slot: s.snapshot_slot.0,
            state_bytes,
            state_digest: digest,
            outbox: self.state.outbox.len(),
            timers: self.state.timers.len(),
            guest_handled: handled,
            replacing: self.replacing.as_ref().map(|r| host_text(r.dead)),
            timings: self.timings.summary(),
            guest_log: Vec::new(),
            guest_log_skipped: 0,
            guest_log_gap: false,
        }
    }
}

/// A host id as the rest of vp shows it: 16 hex digits.
/// The error a destroyed virtual peer answers with.
pub fn destroyed_text(vp: VpId) -> String {
    format!("virtual peer {vp} was destroyed")
}

pub fn host_text(h: HostId) -> String {
    format!("{:016x}", h.0)
}

fn encode_input(input: &LogInput) -> Bytes {
    Bytes::from(abi::encode(input).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vp_consensus::{Ballot, PersistBatch, Record, SnapshotFile, Value};

    fn accept(slot: u64) -> Record {
        Record::Accept {
            slot: Slot(slot),
            ballot: Ballot::default(),
            value: Value::Noop,
        }
    }

    /// A checkpoint's snapshot is written beside the log: the batch is
    /// acknowledged before it is durable, later appends go on meanwhile, and
    /// the log is compacted only once it is; a restart in between recovers
    /// the old snapshot and the whole log.
    #[test]
    fn samples_keep_the_most_recent_and_summarise_them() {
        let mut s = Samples::default();
        assert_eq!(s.summary(), Recent::default());
        for us in 1..=100u64 {
            s.push(Duration::from_micros(us));
        }
        let r = s.summary();
        assert_eq!(
            (r.samples, r.p50_us, r.p99_us, r.max_us),
            (100, 50, 99, 100)
        );
        // Past RECENT_SAMPLES, the oldest go: after 10,000 more of 7 µs the
        // early ones (up to 100 µs) are all gone.
        for _ in 0..10_000 {
            s.push(Duration::from_micros(7));
        }
        let r = s.summary();
        assert_eq!(r.samples as usize, RECENT_SAMPLES);
        assert_eq!((r.p50_us, r.max_us), (7, 7));
    }

    #[test]
    fn a_checkpoint_is_written_beside_the_log_and_compacts_after() {
        let dir = std::env::temp_dir().join(format!("vp-member-lagging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = FileStore::open(&dir).expect("open");
        let mut lagging = None;
        let first = PersistBatch {
            token: 1,
            records: vec![accept(1), accept(2), accept(3)],
            must_sync: true,
            snapshot: None,
            compact_below: None,
            snapshot_may_lag: false,
        };
        assert_eq!(
            commit(&mut store, &[first], &mut lagging, 0).expect("commit"),
            Some(1)
        );
        let snap = SnapshotFile {
            slot: Slot(2),
            digest: 7,
            image: Bytes::from(vec![9u8; 1 << 20]),
        };
        let checkpoint = PersistBatch {
            token: 2,
            records: vec![accept(4)],
            must_sync: true,
            snapshot: Some(snap.clone()),
            compact_below: Some(Slot(3)),
            snapshot_may_lag: true,
        };
        assert_eq!(
            commit(&mut store, &[checkpoint], &mut lagging, 0).expect("commit"),
            Some(2)
        );
        assert!(lagging.is_some(), "the snapshot is being written");
        // Not compacted yet: a restart now sees every record.
        let before = FileStore::open(&dir)
            .and_then(|mut s| s.load())
            .expect("load");
        assert_eq!(before.records.len(), 4);
        finish_lagging(&mut store, &mut lagging).expect("finish");
        assert!(lagging.is_none());
        let after = FileStore::open(&dir)
            .and_then(|mut s| s.load())
            .expect("load");
        assert_eq!(after.snapshot.as_deref(), Some(snap.image.as_slice()));
        assert_eq!(after.records, vec![accept(3), accept(4)]);
        // A log smaller than the compaction threshold is left whole: the
        // snapshot is written, the records stay (recovery skips them).
        let later = PersistBatch {
            token: 3,
            records: vec![accept(5)],
            must_sync: true,
            snapshot: Some(SnapshotFile {
                slot: Slot(4),
                digest: 8,
                image: Bytes::from(vec![8u8; 1 << 10]),
            }),
            compact_below: Some(Slot(5)),
            snapshot_may_lag: true,
        };
        commit(&mut store, &[later], &mut lagging, 1 << 20).expect("commit");
        finish_lagging(&mut store, &mut lagging).expect("finish");
        let kept = FileStore::open(&dir)
            .and_then(|mut s| s.load())
            .expect("load");
        assert_eq!(kept.snapshot.as_deref(), Some(&[8u8; 1 << 10][..]));
        assert_eq!(kept.records, vec![accept(3), accept(4), accept(5)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A snapshot received from another replica is written before its batch
    /// is acknowledged, after any checkpoint still being written.
    #[test]
    fn a_received_snapshot_waits_for_a_lagging_checkpoint() {
        let dir = std::env::temp_dir().join(format!("vp-member-received-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = FileStore::open(&dir).expect("open");
        let mut lagging = None;
        let snapshot = |slot: u64, byte: u8| SnapshotFile {
            slot: Slot(slot),
            digest: slot,
            image: Bytes::from(vec![byte; 1 << 20]),
        };
        let batches = [
            PersistBatch {
                token: 1,
                records: vec![accept(1)],
                must_sync: true,
                snapshot: Some(snapshot(1, 1)),
                compact_below: Some(Slot(1)),
                snapshot_may_lag: true,
            },
            PersistBatch {
                token: 2,
                records: vec![],
                must_sync: true,
                snapshot: Some(snapshot(5, 2)),
                compact_below: Some(Slot(6)),
                snapshot_may_lag: false,
            },
        ];
        assert_eq!(
            commit(&mut store, &batches, &mut lagging, 0).expect("commit"),
            Some(2)
        );
        assert!(
            lagging.is_none(),
            "the earlier checkpoint was finished first"
        );
        let got = FileStore::open(&dir)
            .and_then(|mut s| s.load())
            .expect("load");
        assert_eq!(got.snapshot.as_deref(), Some(&[2u8; 1 << 20][..]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
