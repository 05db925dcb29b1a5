//! The sans-IO Multi-Paxos replica.
//!
//! One [`Replica`] is one host's member of a virtual peer: acceptor, learner and (when
//! elected) leader. It never touches a clock, a socket, a disk or OS randomness; the
//! caller feeds it inputs and drains its outputs. See the type's documentation for the
//! call order, and `docs/consensus.md` for the protocol and its invariants.

use crate::config::{Limits, ReplicaConfig};
use crate::message::{DecidedEntry, Message, MessageError, ReportedEntry};
use crate::record::{
    ImageError, ImageParts, PersistBatch, Record, Recovered, SnapshotFile, SnapshotImage,
};
use crate::rng::Rng;
use crate::session::{Outcome, ReplyError, SessionTable};
use crate::types::{
    Ballot, Batch, Bytes, ClientId, Command, Epoch, HostId, Learner, Membership, MembershipChange,
    Slot, Stamp, Time, Value,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// An entry of the in-memory log.
#[derive(Clone, Debug)]
struct LogEntry {
    /// Ballot in which this replica accepted `value` (default for learned values).
    ballot: Ballot,
    value: Value,
    decided: bool,
}

/// The slots this replica holds, from `start` on (older ones live in the snapshot).
#[derive(Clone, Debug)]
struct Log {
    start: u64,
    entries: VecDeque<Option<LogEntry>>,
    /// Entries below `start` not freed yet (`truncate_below`, `free_some`).
    cut: VecDeque<Option<LogEntry>>,
}

/// Entries of a truncated log freed after each input (a checkpoint's worth,
/// about 10,000 entries, is freed within a few hundred inputs).
const LOG_ENTRIES_FREED_PER_INPUT: usize = 64;
/// Bytes a batch counts for itself (its stamp) against `batch_bytes_max`.
const BATCH_HEADER_BYTES: usize = 16;

impl Log {
    fn new(start: u64) -> Log {
        Log {
            start,
            entries: VecDeque::new(),
            cut: VecDeque::new(),
        }
    }
    fn end(&self) -> u64 {
        self.start + self.entries.len() as u64
    }
    fn get(&self, s: u64) -> Option<&LogEntry> {
        if s < self.start {
            return None;
        }
        self.entries.get((s - self.start) as usize)?.as_ref()
    }
    fn get_mut(&mut self, s: u64) -> Option<&mut LogEntry> {
        if s < self.start {
            return None;
        }
        self.entries.get_mut((s - self.start) as usize)?.as_mut()
    }
    fn set(&mut self, s: u64, e: LogEntry) {
        assert!(
            s >= self.start,
            "log write below start ({s} < {})",
            self.start
        );
        let i = (s - self.start) as usize;
        while self.entries.len() <= i {
            self.entries.push_back(None);
        }
        self.entries[i] = Some(e);
    }
    fn truncate_below(&mut self, s: u64) {
        if s <= self.start {
            return;
        }
        // Cut without freeing: a checkpoint drops thousands of entries (tens
        // of thousands of commands), and freeing them all at once held up the
        // caller for milliseconds. `free_some` frees them a few at a time.
        let n = ((s - self.start) as usize).min(self.entries.len());
        let kept = self.entries.split_off(n);
        let cut = std::mem::replace(&mut self.entries, kept);
        if self.cut.is_empty() {
            self.cut = cut;
        } else {
            self.cut.extend(cut);
        }
        self.start = s;
    }
    /// Free up to `n` entries cut off by `truncate_below`.
    fn free_some(&mut self, n: usize) {
        self.cut.drain(..n.min(self.cut.len()));
    }
    /// Forgets undecided entries above `slot` accepted in an epoch before `epoch`.
    fn drop_stale_above(&mut self, slot: u64, epoch: Epoch) {
        for s in slot + 1..self.end() {
            if let Some(e) = self.get(s)
                && !e.decided
                && e.ballot.epoch < epoch
            {
                self.entries[(s - self.start) as usize] = None;
            }
        }
    }
}

/// Identifies a linearizable read request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReadId(pub u64);

/// How a linearizable read confirms that this replica still leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMode {
    /// A heartbeat round acknowledged by a quorum after the read arrived (no log entry).
    ReadIndex,
    /// The leader's lease (see `Timing::leader_lease_us` for the clock assumption);
    /// falls back to a quorum round when the lease has lapsed.
    Lease,
}

#[derive(Clone, Debug)]
struct PendingRead {
    id: ReadId,
    /// Ready once every slot below this has been handed out by `poll_apply`.
    below: Slot,
    /// Heartbeat round a quorum must acknowledge, or None when confirmed by lease.
    round: Option<u64>,
}

/// Something the caller must apply or act on, in this order.
#[derive(Clone, Debug, PartialEq)]
pub enum Apply {
    /// Replace the application state by `app_state` (as of `slot`; empty at slot 0
    /// means a fresh application).
    Snapshot {
        slot: Slot,
        membership: Arc<Membership>,
        app_state: Bytes,
    },
    /// Apply the `Fresh` commands of a decided batch, in order; answer duplicates from
    /// their outcome. `time_ms` and `entropy` are the only time and randomness the
    /// application may use (`time_ms` never decreases).
    Batch {
        slot: Slot,
        time_ms: u64,
        entropy: u64,
        batch: Arc<Batch>,
        outcomes: Vec<Outcome>,
    },
    /// A slot filled with no value.
    Noop { slot: Slot },
    /// The membership changed at `slot`; the new epoch starts at the next slot.
    Membership {
        slot: Slot,
        membership: Arc<Membership>,
    },
    /// The read may now be served from the application state.
    ReadReady { id: ReadId },
    /// This replica lost leadership before the read was confirmed: retry elsewhere.
    ReadAborted { id: ReadId },
}

/// Why a proposal or membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader { leader: Option<HostId> },
    #[error("proposal queue full (queue_commands_max {commands_max}, queue_bytes_max {bytes_max})")]
    QueueFull {
        commands_max: usize,
        bytes_max: usize,
    },
    #[error("command payload is {got} bytes, limit command_bytes_max = {max}")]
    TooLarge { got: usize, max: usize },
    #[error("a membership change is already in progress")]
    ReconfigurationInProgress,
    #[error("invalid membership change: {0}")]
    InvalidChange(&'static str),
}

/// Why a read was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader { leader: Option<HostId> },
    #[error("too many pending reads (reads_pending_max {max})")]
    TooMany { max: usize },
}

/// Why a checkpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint at {slot} but the last slot handed out by poll_apply is {applied}")]
    NotAtApplyPoint { slot: Slot, applied: Slot },
    #[error("a snapshot at {have} already exists")]
    Stale { have: Slot },
    #[error("snapshot image is {got} bytes, limit snapshot_bytes_max = {max}")]
    TooLarge { got: u64, max: u64 },
}

/// Why recovery failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("snapshot image is out of range: {0}")]
    BadImage(&'static str),
}

/// Recovery replays an accepted or learned value only within this many slots of
/// the decided watermark rebuilt so far (or the live bound, if larger): see
/// [`Replica::recover`]. Generous, so a log written under larger limits still
/// replays; small enough that a corrupt record cannot make the log allocate
/// much (the log holds a place for every slot up to its highest entry).
pub const RECOVERY_SLOTS_AHEAD_MIN: u64 = 1 << 16;

/// The replica's role, for status reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Follower,
    Candidate,
    Leader,
}

/// A serialisable summary for `vp-host status` and logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub id: HostId,
    pub role: Role,
    pub epoch: Epoch,
    pub promised: Ballot,
    pub leader: Option<HostId>,
    pub decided_below: Slot,
    pub applied_below: Slot,
    pub log_start: Slot,
    pub log_end: Slot,
    pub snapshot_slot: Slot,
    pub voters: Vec<HostId>,
    pub learners: Vec<HostId>,
    pub queued_commands: usize,
    pub inflight_slots: usize,
}

#[derive(Clone, Debug)]
struct Report {
    ballot: Ballot,
    value: Value,
    decided: bool,
}

#[derive(Debug)]
struct Candidate {
    ballot: Ballot,
    from: Slot,
    reports: BTreeMap<u64, Report>,
    complete: u64,
    max_log_start: Slot,
    max_log_start_host: Option<HostId>,
    last_sent: Time,
}

#[derive(Clone, Debug, Default)]
struct Peer {
    last_ack: Option<Time>,
    acked_round: u64,
    decided_below: Slot,
}

#[derive(Debug)]
struct Inflight {
    votes: u64,
    sent: Time,
}

#[derive(Debug)]
struct Leading {
    ballot: Ballot,
    since: Time,
    next_slot: u64,
    inflight: BTreeMap<u64, Inflight>,
    repropose: VecDeque<(u64, Value)>,
    queue: VecDeque<Command>,
    queue_bytes: usize,
    pending_reconfig: Option<Membership>,
    stop_pending: bool,
    peers: BTreeMap<HostId, Peer>,
    round: u64,
    round_sent: VecDeque<(u64, Time)>,
    last_heartbeat: Time,
    lease_until: Time,
    read_round_wanted: bool,
    /// Persist tokens of the client batches this leader proposed that may not
    /// be durable yet (`Limits::batches_writing_max`).
    batches_writing: VecDeque<u64>,
}

#[derive(Debug)]
struct SnapIn {
    slot: Slot,
    digest: u64,
    total: u64,
    buf: Vec<u8>,
    last_progress: Time,
}

#[derive(Debug)]
struct SnapOut {
    file: SnapshotFile,
    next_offset: u64,
    acked: u64,
    last_progress: Time,
}

/// One host's Multi-Paxos replica for one virtual peer.
///
/// # Call order
///
/// 1. Create with [`Replica::new`] (first start; `Some(membership)` on the founding
///    members, `None` on a host that will be added later) or [`Replica::recover`] (after
///    a restart, from what the [`crate::storage::Storage`] returned).
/// 2. Feed inputs as they happen: [`handle_message`](Replica::handle_message),
///    [`handle_timeout`](Replica::handle_timeout) (whenever `poll_timeout`'s time has
///    come; early calls are harmless), [`propose`](Replica::propose),
///    [`read`](Replica::read), [`reconfigure`](Replica::reconfigure),
///    [`on_persisted`](Replica::on_persisted). `now` must never go backwards.
/// 3. After every input, drain the outputs, in this order:
///    - [`poll_persist`](Replica::poll_persist) until `None`: make each batch durable
///      (in order; one fsync may cover many batches: group commit) and then call
///      `on_persisted(token)`. Messages that promise or vote on what a batch holds are
///      held back inside the replica until then.
///    - [`poll_send`](Replica::poll_send) until `None`: send each message.
///    - [`poll_apply`](Replica::poll_apply) until `None`: apply in order. While applying
///      a batch, call [`record_reply`](Replica::record_reply) for replies that are known
///      (for this batch or an earlier one). To checkpoint, call
///      [`checkpoint`](Replica::checkpoint) right after applying a slot, before polling
///      the next item.
///    - [`poll_timeout`](Replica::poll_timeout): arm the timer.
pub struct Replica {
    cfg: ReplicaConfig,
    rng: Rng,
    now: Time,

    promised: Ballot,
    log: Log,

    decided_below: u64,
    membership: Arc<Membership>,
    epoch_start: u64,
    max_stamp_ms: u64,

    applied_below: u64,
    applied_membership: Arc<Membership>,
    applied_epoch_start: u64,
    sessions: SessionTable,
    time_ms: u64,
    pending_install: Option<SnapshotImage>,
    snapshot: SnapshotFile,

    snap_in: Option<SnapIn>,
    snap_out: BTreeMap<HostId, SnapOut>,
    catchup_asked: Option<Time>,

    leader_hint: Option<HostId>,
    last_leader_contact: Option<Time>,
    /// The caller said the leader seems gone (`suspect`); cleared when it speaks.
    leader_suspected: bool,
    /// No promise to a new candidate before this time (set on restart: a replica that
    /// forgot when it last heard from the leader must not help end that leader's lease).
    sticky_until: Time,
    jitter_us: u64,
    election_deadline: Time,
    max_round: u64,
    candidate: Option<Candidate>,
    leading: Option<Leading>,
    stash: VecDeque<Command>,

    reads: VecDeque<PendingRead>,
    read_events: VecDeque<Apply>,
    next_read_id: u64,

    out: VecDeque<(HostId, Message)>,
    held: VecDeque<(u64, HostId, Message)>,
    self_inbox: VecDeque<Message>,
    pending_records: Vec<Record>,
    pending_sync: bool,
    pending_snapshot: Option<SnapshotFile>,
    /// `pending_snapshot` is our own checkpoint (`PersistBatch::snapshot_may_lag`).
    pending_snapshot_is_checkpoint: bool,
    pending_compact: Option<Slot>,
    next_token: u64,
    last_sync_token: u64,
    durable_token: u64,
}

fn popcount(x: u64) -> usize {
    x.count_ones() as usize
}

impl Replica {
    /// A replica on its first start. Founding members pass the initial membership (its
    /// epoch is raised to 1 if given as 0); a host that will be added later passes `None`
    /// and waits for a leader to send it a snapshot.
    pub fn new(cfg: ReplicaConfig, initial: Option<Membership>, now: Time) -> Replica {
        let mut membership = initial.unwrap_or_default();
        if !membership.voters.is_empty() && membership.epoch == Epoch(0) {
            membership.epoch = Epoch(1);
        }
        let genesis = SnapshotImage {
            slot: Slot(0),
            membership: membership.clone(),
            epoch_start: Slot(1),
            sessions: SessionTable::default(),
            time_ms: 0,
            app_digest: xxhash_rust::xxh3::xxh3_64(&[]),
            app_state: Bytes::default(),
        };
        let membership = Arc::new(membership);
        let mut rng = Rng::new(cfg.seed ^ cfg.id.0.rotate_left(17));
        let jitter_us = rng.below(cfg.timing.election_jitter_us + 1);
        let election_deadline = now
            .plus_us(cfg.timing.election_timeout_us)
            .plus_us(jitter_us);
        Replica {
            rng,
            now,
            promised: Ballot::default(),
            log: Log::new(1),
            decided_below: 1,
            membership: membership.clone(),
            epoch_start: 1,
            max_stamp_ms: 0,
            applied_below: 1,
            applied_membership: membership,
            applied_epoch_start: 1,
            sessions: SessionTable::default(),
            time_ms: 0,
            pending_install: None,
            snapshot: SnapshotFile::from_image(&genesis),
            snap_in: None,
            snap_out: BTreeMap::new(),
            catchup_asked: None,
            leader_hint: None,
            last_leader_contact: None,
            sticky_until: Time(0),
            leader_suspected: false,
            jitter_us,
            election_deadline,
            max_round: 0,
            candidate: None,
            leading: None,
            stash: VecDeque::new(),
            reads: VecDeque::new(),
            read_events: VecDeque::new(),
            next_read_id: 1,
            out: VecDeque::new(),
            held: VecDeque::new(),
            self_inbox: VecDeque::new(),
            pending_records: Vec::new(),
            pending_sync: false,
            pending_snapshot: None,
            pending_snapshot_is_checkpoint: false,
            pending_compact: None,
            next_token: 1,
            last_sync_token: 0,
            durable_token: 0,
            cfg,
        }
    }

    /// Rebuilds a replica after a restart from its durable state. `initial` is the same
    /// value passed to [`Replica::new`] on the first start. Everything from the snapshot
    /// on is handed out again by `poll_apply` (the application state is not durable).
    pub fn recover(
        cfg: ReplicaConfig,
        initial: Option<Membership>,
        state: Recovered,
        now: Time,
    ) -> Result<Replica, RecoverError> {
        let mut r = Replica::new(cfg, initial, now);
        if let Some(bytes) = state.snapshot {
            let img = SnapshotImage::decode_shared(&bytes)?;
            r.check_image(&img).map_err(RecoverError::BadImage)?;
            let file = SnapshotFile {
                slot: img.slot,
                digest: xxhash_rust::xxh3::xxh3_64(&bytes),
                image: bytes,
            };
            r.install_image(img, file, false);
        }
        // Every Accept or Learn a replica writes lies within `slots_ahead_max` of its
        // decided watermark at that moment (on_accept, on_catchup, flush_proposals),
        // and replay rebuilds that watermark record by record. A record beyond it is
        // corrupt, or belongs to the batch being written when the replica crashed
        // after installing a snapshot and before storing it, in which case nothing
        // in that batch was acknowledged. Either way the log ends there, as it does
        // at a torn frame.
        let ahead = r.slots_ahead_max().max(RECOVERY_SLOTS_AHEAD_MIN);
        for rec in state.records {
            if rec
                .slot()
                .is_some_and(|s| s.0 >= r.decided_below.saturating_add(ahead))
            {
                break;
            }
            match rec {
                Record::Promise { ballot } => r.promised = r.promised.max(ballot),
                Record::Accept {
                    slot,
                    ballot,
                    value,
                } => {
                    if slot.0 >= r.decided_below && r.log.get(slot.0).is_none_or(|e| !e.decided) {
                        r.note_stamp(&value);
                        r.log.set(
                            slot.0,
                            LogEntry {
                                ballot,
                                value,
                                decided: false,
                            },
                        );
                    }
                }
                Record::Learn { slot, value } => {
                    if slot.0 >= r.decided_below {
                        r.note_stamp(&value);
                        r.log.set(
                            slot.0,
                            LogEntry {
                                ballot: Ballot::default(),
                                value,
                                decided: true,
                            },
                        );
                    }
                }
                Record::Decided { below } => {
                    for s in r.decided_below..below.0.min(r.log.end()) {
                        if let Some(e) = r.log.get_mut(s) {
                            e.decided = true;
                        }
                    }
                    r.advance_decided();
                }
            }
        }
        r.advance_decided();
        if r.promised.epoch == r.epoch() {
            r.max_round = r.max_round.max(r.promised.round);
        }
        // We may have acknowledged a leader's heartbeat just before the crash: stay
        // loyal for an election timeout, as if we had just heard from it.
        r.sticky_until = now.plus_us(r.cfg.timing.election_timeout_us);
        // Replay produced no new durable state worth writing back.
        r.pending_records.clear();
        r.pending_sync = false;
        // While it was down the others may have decided more, a new
        // configuration among it, possibly one without this host: ask every
        // other member now rather than wait for a leader's heartbeat or for
        // this replica's own election timeout to find out.
        let others: Vec<HostId> = r
            .membership
            .voters
            .iter()
            .copied()
            .chain(r.membership.learners.iter().map(|l| l.host))
            .filter(|h| *h != r.cfg.id)
            .collect();
        for h in others {
            r.send(
                h,
                Message::CatchUpRequest {
                    from: Slot(r.decided_below),
                    epoch: r.epoch(),
                },
            );
        }
        r.catchup_asked = Some(now);
        Ok(r)
    }

    // ----- small helpers -------------------------------------------------------------

    pub fn id(&self) -> HostId {
        self.cfg.id
    }

    fn limits(&self) -> &Limits {
        &self.cfg.limits
    }

    /// The current epoch (as of the decided prefix).
    pub fn epoch(&self) -> Epoch {
        self.membership.epoch
    }

    /// The membership in force for the next undecided slot.
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    pub fn is_leader(&self) -> bool {
        self.leading.is_some()
    }

    /// Running for election (phase 1), e.g. a leader re-running it in a new epoch.
    pub fn is_candidate(&self) -> bool {
        self.candidate.is_some()
    }

    pub fn leader_hint(&self) -> Option<HostId> {
        if self.leading.is_some() {
            Some(self.cfg.id)
        } else {
            self.leader_hint
        }
    }

    /// Slots below this are decided and known here.
    pub fn decided_below(&self) -> Slot {
        Slot(self.decided_below)
    }

    /// Slots below this have been handed out by `poll_apply`.
    pub fn applied_below(&self) -> Slot {
        Slot(self.applied_below)
    }

    /// The latest snapshot this replica holds (slot 0: the genesis state).
    pub fn snapshot_slot(&self) -> Slot {
        self.snapshot.slot
    }

    /// The replicated session table as of `applied_below`.
    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    /// At the leader: for every other host in the configuration (voters and
    /// learners), how long ago it last acknowledged this leader, in µs (for a
    /// host never heard from, how long this replica has been leading). Empty
    /// when not leading. The caller's failure detector for member replacement.
    pub fn member_silence_us(&self, now: Time) -> Vec<(HostId, u64)> {
        let Some(l) = &self.leading else {
            return Vec::new();
        };
        self.membership
            .all_hosts()
            .filter(|&h| h != self.cfg.id)
            .map(|h| {
                let heard = l.peers.get(&h).and_then(|p| p.last_ack).unwrap_or(l.since);
                (h, now.since(heard))
            })
            .collect()
    }

    pub fn status(&self) -> Status {
        Status {
            id: self.cfg.id,
            role: if self.leading.is_some() {
                Role::Leader
            } else if self.candidate.is_some() {
                Role::Candidate
            } else {
                Role::Follower
            },
            epoch: self.epoch(),
            promised: self.promised,
            leader: self.leader_hint(),
            decided_below: Slot(self.decided_below),
            applied_below: Slot(self.applied_below),
            log_start: Slot(self.log.start),
            log_end: Slot(self.log.end()),
            snapshot_slot: self.snapshot.slot,
            voters: self.membership.voters.clone(),
            learners: self.membership.learners.iter().map(|l| l.host).collect(),
            queued_commands: self.leading.as_ref().map_or(0, |l| l.queue.len()),
            inflight_slots: self.leading.as_ref().map_or(0, |l| l.inflight.len()),
        }
    }

    fn ahead_max(&self) -> u64 {
        self.limits().window_slots_max * 4 + 64
    }

    /// How far beyond the decided watermark this replica ever holds a value.
    fn slots_ahead_max(&self) -> u64 {
        self.ahead_max() + self.limits().catchup_entries_max as u64
    }

    /// The checks an image must pass before it becomes our state.
    fn check_image(&self, img: &SnapshotImage) -> Result<(), &'static str> {
        if img.slot.0 >= u64::MAX / 2 {
            return Err("slot too large");
        }
        if img.epoch_start.0 > img.slot.0 + 1 {
            return Err("epoch starts after the image");
        }
        if img.membership.voters.is_empty() {
            return Err("membership without voters");
        }
        if img.membership.voters.len() > self.cfg.limits.voters_max
            || img.membership.learners.len() > self.cfg.limits.learners_max
        {
            return Err("membership larger than the limits");
        }
        Ok(())
    }

    fn persist(&mut self, r: Record, sync: bool) {
        self.pending_records.push(r);
        if sync {
            self.pending_sync = true;
            self.last_sync_token = self.next_token;
        }
    }

    fn deliver(&mut self, to: HostId, msg: Message) {
        if to == self.cfg.id {
            self.self_inbox.push_back(msg);
        } else {
            self.out.push_back((to, msg));
        }
    }

    /// Sends a message that vouches for state that must be durable first.
    fn send_durable(&mut self, to: HostId, msg: Message) {
        if self.last_sync_token > self.durable_token {
            self.held.push_back((self.last_sync_token, to, msg));
        } else {
            self.deliver(to, msg);
        }
    }

    fn send(&mut self, to: HostId, msg: Message) {
        self.deliver(to, msg);
    }

    fn note_stamp(&mut self, v: &Value) {
        if let Value::Batch(b) = v {
            self.max_stamp_ms = self.max_stamp_ms.max(b.stamp.time_ms);
        }
    }

    fn reset_election_timer(&mut self) {
        self.jitter_us = self.rng.below(self.cfg.timing.election_jitter_us + 1);
        self.election_deadline = self
            .now
            .plus_us(self.cfg.timing.election_timeout_us)
            .plus_us(self.jitter_us);
    }

    /// The ballot to show in a Nack: our promise, raised to our epoch.
    fn nack_ballot(&self) -> Ballot {
        self.promised.max(Ballot {
            epoch: self.epoch(),
            round: 0,
            leader: HostId(0),
        })
    }

    /// True if `ballot` belongs to our epoch. Stale senders get a Nack; a sender from a
    /// later epoch tells us we are behind, so we ask it for what we missed.
    fn epoch_gate(&mut self, from: HostId, ballot: Ballot) -> bool {
        let mine = self.epoch();
        if ballot.epoch < mine {
            let promised = self.nack_ballot();
            self.send(from, Message::Nack { ballot, promised });
            false
        } else if ballot.epoch > mine {
            self.request_catchup(from, false);
            false
        } else {
            true
        }
    }

    fn request_catchup(&mut self, to: HostId, force: bool) {
        if to == self.cfg.id {
            return;
        }
        let due = match self.catchup_asked {
            None => true,
            Some(t) => force || self.now.since(t) >= self.cfg.timing.retry_us,
        };
        if due {
            self.catchup_asked = Some(self.now);
            let msg = Message::CatchUpRequest {
                from: Slot(self.decided_below),
                epoch: self.epoch(),
            };
            self.send(to, msg);
        }
    }

    // ----- inputs --------------------------------------------------------------------

    /// Handles a message from another host. Invalid input is refused with an error and
    /// leaves the replica unchanged.
    pub fn handle_message(
        &mut self,
        now: Time,
        from: HostId,
        msg: Message,
    ) -> Result<(), MessageError> {
        msg.validate(self.limits())?;
        if from == self.cfg.id {
            return Err(MessageError::Malformed("message claims to come from self"));
        }
        self.now = self.now.max(now);
        match msg {
            Message::Prepare { ballot, from: f } => self.on_prepare(from, ballot, f),
            Message::Promise {
                ballot,
                log_start,
                entries,
                next,
                ..
            } => self.on_promise(from, ballot, log_start, entries, next),
            Message::Accept {
                ballot,
                slot,
                value,
                decided_below,
            } => self.on_accept(from, ballot, slot, value, decided_below),
            Message::Accepted { ballot, slot } => self.on_accepted(from, ballot, slot),
            Message::Heartbeat {
                ballot,
                decided_below,
                round,
            } => self.on_heartbeat(from, ballot, decided_below, round),
            Message::HeartbeatAck {
                ballot,
                round,
                decided_below,
            } => self.on_heartbeat_ack(from, ballot, round, decided_below),
            Message::Nack { ballot, promised } => self.on_nack(from, ballot, promised),
            Message::CatchUpRequest { from: f, epoch } => self.on_catchup_request(from, f, epoch),
            Message::CatchUp {
                entries,
                decided_below,
            } => self.on_catchup(from, entries, decided_below),
            Message::SnapshotChunk {
                slot,
                digest,
                total_bytes,
                offset,
                data,
            } => self.on_snapshot_chunk(from, slot, digest, total_bytes, offset, data),
            Message::SnapshotAck {
                slot,
                digest,
                offset,
            } => self.on_snapshot_ack(from, slot, digest, offset),
        }
        self.after_input();
        Ok(())
    }

    /// Unanswered prepares go again after this long: every heartbeat interval
    /// after a suspicion (the other acceptors stop refusing within about one),
    /// else every `retry_us`.
    fn prepare_retry_us(&self) -> u64 {
        let t = &self.cfg.timing;
        if self.leader_suspected {
            t.heartbeat_interval_us.min(t.retry_us)
        } else {
            t.retry_us
        }
    }

    /// How long after hearing from the leader this acceptor refuses other candidates.
    fn sticky_window_us(&self) -> u64 {
        let t = &self.cfg.timing;
        if self.leader_suspected {
            t.leader_lease_us
                .saturating_add(t.leader_lease_us / 2)
                .min(t.election_timeout_us)
        } else {
            t.election_timeout_us
        }
    }

    /// A hint from the caller that `host` seems gone: every connection to it
    /// closed (a process that dies closes its sockets; a machine that dies or a
    /// partition gives no such hint, and the election timeout covers those).
    ///
    /// If `host` is the leader this replica follows, the replica stops waiting
    /// the full election timeout: it refuses other candidates only until the
    /// leader's read lease has surely ended (`leader_lease_us × 3/2` after it last
    /// heard from the leader: safe while no clock runs 1.5 times faster than
    /// another), and the first voter after `host` in id order (wrapping) runs
    /// for election one heartbeat interval after that. A wrong hint costs an election, never safety: the
    /// candidate needs a quorum's promises like any other.
    pub fn suspect(&mut self, now: Time, host: HostId) {
        self.now = self.now.max(now);
        if self.leading.is_none()
            && self.candidate.is_none()
            && self.leader_hint == Some(host)
            && self.membership.is_voter(self.cfg.id)
        {
            self.leader_suspected = true;
            let first = self
                .membership
                .voters
                .iter()
                .filter(|v| **v != host)
                .min_by_key(|v| (v.0 <= host.0, v.0));
            if first == Some(&self.cfg.id) {
                // The other voters may have heard from the leader up to one
                // heartbeat later than this one: wait that much more, so they
                // no longer refuse.
                let at = self
                    .last_leader_contact
                    .map_or(self.now, |t| {
                        t.plus_us(self.sticky_window_us())
                            .plus_us(self.cfg.timing.heartbeat_interval_us)
                    })
                    .max(self.now);
                self.election_deadline = self.election_deadline.min(at);
            }
        }
        self.after_input();
    }

    /// Runs timers: elections, heartbeats, retransmissions, step-down, promotions.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = self.now.max(now);
        let now = self.now;
        let t = self.cfg.timing.clone();
        if self.leading.is_some() {
            self.last_leader_contact = Some(now);
            self.leader_tick();
        } else if let Some(c) = &self.candidate {
            if now >= self.election_deadline {
                self.start_election();
            } else if now.since(c.last_sent) >= self.prepare_retry_us() {
                let ballot = c.ballot;
                let from = c.from;
                let complete = c.complete;
                let voters = self.membership.voters.clone();
                for (i, v) in voters.iter().enumerate() {
                    if *v != self.cfg.id && complete & (1 << i) == 0 {
                        self.send(*v, Message::Prepare { ballot, from });
                    }
                }
                if let Some(c) = &mut self.candidate {
                    c.last_sent = now;
                }
            }
        } else if self.membership.is_voter(self.cfg.id) && now >= self.election_deadline {
            self.start_election();
        }
        // Retry snapshot transfers that stopped making progress.
        let stalled: Vec<HostId> = self
            .snap_out
            .iter()
            .filter(|(_, s)| now.since(s.last_progress) >= t.retry_us)
            .map(|(h, _)| *h)
            .collect();
        for h in stalled {
            if let Some(s) = self.snap_out.get_mut(&h) {
                s.next_offset = s.acked;
                s.last_progress = now;
            }
            self.pump_snapshot(h);
        }
        self.after_input();
    }

    /// Runs for election now instead of waiting for the election timeout (a voter only;
    /// for leadership transfer or tests). Acceptors that still hear from a live leader
    /// will ignore it.
    pub fn campaign(&mut self, now: Time) {
        self.now = self.now.max(now);
        if self.leading.is_none() && self.membership.is_voter(self.cfg.id) {
            self.start_election();
        }
        self.after_input();
    }

    /// Queues a client command at the leader. It goes out in the next slot the pipeline
    /// window allows, batched with whatever else queued meanwhile.
    pub fn propose(&mut self, now: Time, cmd: Command) -> Result<(), ProposeError> {
        self.now = self.now.max(now);
        let limits = self.cfg.limits.clone();
        if cmd.payload.len() > limits.command_bytes_max {
            return Err(ProposeError::TooLarge {
                got: cmd.payload.len(),
                max: limits.command_bytes_max,
            });
        }
        let hint = self.leader_hint;
        let Some(l) = &mut self.leading else {
            return Err(ProposeError::NotLeader { leader: hint });
        };
        if l.queue.len() >= limits.queue_commands_max
            || l.queue_bytes + cmd.cost_bytes() > limits.queue_bytes_max
        {
            return Err(ProposeError::QueueFull {
                commands_max: limits.queue_commands_max,
                bytes_max: limits.queue_bytes_max,
            });
        }
        l.queue_bytes += cmd.cost_bytes();
        l.queue.push_back(cmd);
        self.after_input();
        Ok(())
    }

    /// Starts a linearizable read. `Apply::ReadReady(id)` comes out of `poll_apply` once
    /// the application state reflects every write acknowledged before this call.
    pub fn read(&mut self, now: Time, mode: ReadMode) -> Result<ReadId, ReadError> {
        self.now = self.now.max(now);
        let max = self.limits().reads_pending_max;
        let hint = self.leader_hint;
        let Some(l) = &mut self.leading else {
            return Err(ReadError::NotLeader { leader: hint });
        };
        if self.reads.len() >= max {
            return Err(ReadError::TooMany { max });
        }
        let id = ReadId(self.next_read_id);
        self.next_read_id += 1;
        let round = if mode == ReadMode::Lease && l.lease_until > self.now {
            None
        } else {
            l.read_round_wanted = true;
            Some(l.round + 1)
        };
        self.reads.push_back(PendingRead {
            id,
            below: Slot(l.next_slot),
            round,
        });
        self.after_input();
        Ok(id)
    }

    /// Proposes a membership change (at the leader). An added host first catches up as
    /// a learner; the leader promotes it to voter once it is within
    /// `promote_lag_slots` of the decided log.
    pub fn reconfigure(&mut self, now: Time, change: MembershipChange) -> Result<(), ProposeError> {
        self.now = self.now.max(now);
        let hint = self.leader_hint;
        let limits = self.cfg.limits.clone();
        let Some(l) = &mut self.leading else {
            return Err(ProposeError::NotLeader { leader: hint });
        };
        if l.stop_pending || l.pending_reconfig.is_some() {
            return Err(ProposeError::ReconfigurationInProgress);
        }
        let mut m = (*self.membership).clone();
        m.epoch = Epoch(m.epoch.0 + 1);
        match change {
            MembershipChange::Add(h) => {
                if m.is_member(h) {
                    return Err(ProposeError::InvalidChange("host is already a member"));
                }
                if m.voters.len() + m.learners.len() >= limits.voters_max
                    || m.learners.len() >= limits.learners_max
                {
                    return Err(ProposeError::InvalidChange(
                        "voters_max or learners_max reached",
                    ));
                }
                m.learners.push(Learner {
                    host: h,
                    replaces: None,
                });
            }
            MembershipChange::Replace { remove, add } => {
                if !m.is_voter(remove) {
                    return Err(ProposeError::InvalidChange("host to remove is not a voter"));
                }
                if m.is_member(add) {
                    return Err(ProposeError::InvalidChange(
                        "host to add is already a member",
                    ));
                }
                if m.learners.len() >= limits.learners_max {
                    return Err(ProposeError::InvalidChange("learners_max reached"));
                }
                m.learners.push(Learner {
                    host: add,
                    replaces: Some(remove),
                });
            }
            MembershipChange::Remove(h) => {
                if m.is_voter(h) {
                    if m.voters.len() == 1 {
                        return Err(ProposeError::InvalidChange("cannot remove the last voter"));
                    }
                    m.voters.retain(|v| *v != h);
                    for lr in &mut m.learners {
                        if lr.replaces == Some(h) {
                            lr.replaces = None;
                        }
                    }
                } else if m.is_learner(h) {
                    m.learners.retain(|lr| lr.host != h);
                } else {
                    return Err(ProposeError::InvalidChange("host is not a member"));
                }
            }
        }
        l.pending_reconfig = Some(m);
        self.after_input();
        Ok(())
    }

    /// Records the reply to an applied request, while applying (every replica at the
    /// same point in the log). Returns false if the request is no longer tracked.
    pub fn record_reply(
        &mut self,
        client: ClientId,
        seq: u64,
        reply: Bytes,
    ) -> Result<bool, ReplyError> {
        let limits = self.cfg.limits.clone();
        self.sessions.record_reply(client, seq, reply, &limits)
    }

    /// Takes a checkpoint: `app_state` is the application's state after applying `slot`,
    /// which must be the last slot handed out by `poll_apply`. The log below it (minus
    /// `log_retain_slots`) may then be dropped.
    pub fn checkpoint(&mut self, slot: Slot, app_state: Bytes) -> Result<(), CheckpointError> {
        let room = self.checkpoint_room();
        let mut buf = Vec::with_capacity(room + app_state.len());
        buf.resize(room, 0);
        buf.extend_from_slice(&app_state);
        self.checkpoint_in_place(slot, buf, room)
    }

    /// Bytes to leave in front of the application state handed to
    /// [`Replica::checkpoint_in_place`], valid until the next input.
    pub fn checkpoint_room(&self) -> usize {
        self.image_parts(Slot(0)).room()
    }

    /// [`Replica::checkpoint`] with the application state `buf[room..]`:
    /// the image's head is written into the room in front of it, so a large
    /// state is not copied again (one fresh buffer of its size less to fault
    /// in on the thread that applies).
    pub fn checkpoint_in_place(
        &mut self,
        slot: Slot,
        buf: Vec<u8>,
        room: usize,
    ) -> Result<(), CheckpointError> {
        let applied = Slot(self.applied_below - 1);
        if slot != applied || self.pending_install.is_some() {
            return Err(CheckpointError::NotAtApplyPoint { slot, applied });
        }
        if slot <= self.snapshot.slot {
            return Err(CheckpointError::Stale {
                have: self.snapshot.slot,
            });
        }
        let max = self.limits().snapshot_bytes_max;
        let got = buf.len().saturating_sub(room) as u64;
        if room > buf.len() || got + 4096 > max {
            return Err(CheckpointError::TooLarge { got, max });
        }
        let file = SnapshotFile::in_place(&self.image_parts(slot), buf, room);
        if file.image.len() as u64 > max {
            return Err(CheckpointError::TooLarge {
                got: file.image.len() as u64,
                max,
            });
        }
        self.snapshot = file.clone();
        let compact = (slot.0 + 1)
            .saturating_sub(self.cfg.timing.log_retain_slots)
            .max(self.log.start);
        self.log.truncate_below(compact);
        self.pending_snapshot = Some(file);
        self.pending_snapshot_is_checkpoint = true;
        self.pending_compact = Some(Slot(compact));
        Ok(())
    }

    /// What a checkpoint at `slot` records besides the application state.
    fn image_parts(&self, slot: Slot) -> ImageParts<'_> {
        ImageParts {
            slot,
            membership: &self.applied_membership,
            epoch_start: Slot(self.applied_epoch_start),
            sessions: &self.sessions,
            time_ms: self.time_ms,
        }
    }

    /// The caller made every batch up to `token` durable.
    pub fn on_persisted(&mut self, token: u64) {
        self.durable_token = self.durable_token.max(token);
        while let Some((t, _, _)) = self.held.front() {
            if *t > self.durable_token {
                break;
            }
            if let Some((_, to, msg)) = self.held.pop_front() {
                self.deliver(to, msg);
            }
        }
        self.after_input();
    }

    // ----- outputs -------------------------------------------------------------------

    pub fn poll_send(&mut self) -> Option<(HostId, Message)> {
        self.out.pop_front()
    }

    pub fn poll_persist(&mut self) -> Option<PersistBatch> {
        if self.pending_records.is_empty()
            && self.pending_snapshot.is_none()
            && self.pending_compact.is_none()
        {
            return None;
        }
        let token = self.next_token;
        self.next_token += 1;
        Some(PersistBatch {
            token,
            records: std::mem::take(&mut self.pending_records),
            must_sync: std::mem::take(&mut self.pending_sync) || self.pending_snapshot.is_some(),
            snapshot_may_lag: self.pending_snapshot.is_some()
                && std::mem::take(&mut self.pending_snapshot_is_checkpoint),
            snapshot: self.pending_snapshot.take(),
            compact_below: self.pending_compact.take(),
        })
    }

    pub fn poll_apply(&mut self) -> Option<Apply> {
        if let Some(img) = self.pending_install.take() {
            self.applied_below = img.slot.0 + 1;
            self.applied_membership = Arc::new(img.membership);
            self.applied_epoch_start = img.epoch_start.0;
            self.sessions = img.sessions;
            self.time_ms = self.time_ms.max(img.time_ms);
            return Some(Apply::Snapshot {
                slot: img.slot,
                membership: self.applied_membership.clone(),
                app_state: img.app_state,
            });
        }
        if let Some(ev) = self.read_events.pop_front() {
            return Some(ev);
        }
        if let Some(r) = self.reads.front()
            && r.round.is_none()
            && self.applied_below >= r.below.0
        {
            let id = r.id;
            self.reads.pop_front();
            return Some(Apply::ReadReady { id });
        }
        if self.applied_below >= self.decided_below {
            return None;
        }
        let s = self.applied_below;
        let value = match self.log.get(s) {
            Some(e) if e.decided => e.value.clone(),
            _ => panic!(
                "decided slot {s} missing from the log (start {}, decided below {})",
                self.log.start, self.decided_below
            ),
        };
        self.applied_below += 1;
        Some(match value {
            Value::Noop => Apply::Noop { slot: Slot(s) },
            Value::Batch(batch) => {
                self.time_ms = self.time_ms.max(batch.stamp.time_ms);
                let limits = &self.cfg.limits;
                let outcomes = batch
                    .commands
                    .iter()
                    .map(|c| self.sessions.admit(c, self.time_ms, limits))
                    .collect();
                Apply::Batch {
                    slot: Slot(s),
                    time_ms: self.time_ms,
                    entropy: batch.stamp.entropy,
                    batch,
                    outcomes,
                }
            }
            Value::Reconfigure(m) => {
                self.applied_membership = m.clone();
                self.applied_epoch_start = s + 1;
                Apply::Membership {
                    slot: Slot(s),
                    membership: m,
                }
            }
        })
    }

    /// When the caller should next call `handle_timeout` (None: only on input).
    pub fn poll_timeout(&self) -> Option<Time> {
        let t = &self.cfg.timing;
        let mut next: Option<Time> = None;
        let mut take = |x: Time| {
            next = Some(next.map_or(x, |n: Time| n.min(x)));
        };
        if let Some(l) = &self.leading {
            take(l.last_heartbeat.plus_us(t.heartbeat_interval_us));
            if let Some((_, inf)) = l.inflight.iter().next() {
                take(inf.sent.plus_us(t.retry_us));
            }
        } else if let Some(c) = &self.candidate {
            take(self.election_deadline);
            take(c.last_sent.plus_us(self.prepare_retry_us()));
        } else if self.membership.is_voter(self.cfg.id) {
            take(self.election_deadline);
        }
        if let Some(s) = self.snap_out.values().map(|s| s.last_progress).min() {
            take(s.plus_us(t.retry_us));
        }
        next
    }

    // ----- internal event loop --------------------------------------------------------

    fn after_input(&mut self) {
        self.log.free_some(LOG_ENTRIES_FREED_PER_INPUT);
        loop {
            while let Some(msg) = self.self_inbox.pop_front() {
                self.on_self_message(msg);
            }
            self.flush_proposals();
            self.send_read_round();
            self.update_reads();
            if self.self_inbox.is_empty() {
                break;
            }
        }
    }

    fn on_self_message(&mut self, msg: Message) {
        let me = self.cfg.id;
        match msg {
            Message::Accepted { ballot, slot } => self.on_accepted(me, ballot, slot),
            Message::Promise { ballot, .. } => self.on_self_promise(ballot),
            other => panic!("unexpected self message {}", other.kind()),
        }
    }

    // ----- elections (phase 1) ------------------------------------------------------------

    fn start_election(&mut self) {
        self.step_down();
        if !self.membership.is_voter(self.cfg.id) {
            return;
        }
        let epoch = self.epoch();
        let mut round = self.max_round + 1;
        if self.promised.epoch == epoch {
            round = round.max(self.promised.round + 1);
        }
        self.max_round = round;
        let ballot = Ballot {
            epoch,
            round,
            leader: self.cfg.id,
        };
        self.promised = ballot;
        self.persist(Record::Promise { ballot }, true);
        let from = Slot(self.decided_below);
        self.candidate = Some(Candidate {
            ballot,
            from,
            reports: BTreeMap::new(),
            complete: 0,
            max_log_start: Slot(self.log.start),
            max_log_start_host: None,
            last_sent: self.now,
        });
        self.leader_hint = None;
        self.reset_election_timer();
        let me = self.cfg.id;
        self.send_durable(
            me,
            Message::Promise {
                ballot,
                from,
                log_start: Slot(self.log.start),
                entries: Vec::new(),
                next: None,
            },
        );
        let voters = self.membership.voters.clone();
        for v in voters {
            if v != me {
                self.send(v, Message::Prepare { ballot, from });
            }
        }
    }

    fn on_prepare(&mut self, from: HostId, ballot: Ballot, from_slot: Slot) {
        if !self.epoch_gate(from, ballot) || !self.membership.is_voter(from) {
            return;
        }
        if ballot < self.promised {
            let promised = self.promised;
            self.send(from, Message::Nack { ballot, promised });
            return;
        }
        if ballot > self.promised {
            // Leader stickiness: while we hear from a live leader, refuse to help depose
            // it. This is what makes the read lease safe.
            if let (Some(t), Some(h)) = (self.last_leader_contact, self.leader_hint_or_self())
                && h != from
                && self.now.since(t) < self.sticky_window_us()
            {
                return;
            }
            if self.now < self.sticky_until && self.leader_hint != Some(from) {
                return;
            }
            self.adopt_promise(ballot);
            self.reset_election_timer();
        }
        self.max_round = self.max_round.max(ballot.round);
        let page = self.promise_page(ballot, from_slot);
        self.send_durable(from, page);
    }

    fn leader_hint_or_self(&self) -> Option<HostId> {
        if self.leading.is_some() {
            Some(self.cfg.id)
        } else {
            self.leader_hint
        }
    }

    /// Raises our promise (durably) and gives up any lower leadership or candidacy.
    fn adopt_promise(&mut self, ballot: Ballot) {
        self.promised = ballot;
        self.persist(Record::Promise { ballot }, true);
        if self.leading.as_ref().is_some_and(|l| l.ballot < ballot)
            || self.candidate.as_ref().is_some_and(|c| c.ballot < ballot)
        {
            self.step_down();
        }
    }

    fn promise_page(&self, ballot: Ballot, from_slot: Slot) -> Message {
        let limits = self.limits();
        let start = from_slot.0.max(self.log.start);
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut next = None;
        for s in start..self.log.end() {
            let Some(e) = self.log.get(s) else { continue };
            if !(e.decided || e.ballot.epoch == ballot.epoch) {
                continue;
            }
            if entries.len() >= limits.promise_entries_max
                || (bytes >= limits.catchup_bytes_max && !entries.is_empty())
            {
                next = Some(Slot(s));
                break;
            }
            bytes += e.value.cost_bytes();
            entries.push(ReportedEntry {
                slot: Slot(s),
                ballot: e.ballot,
                value: e.value.clone(),
                decided: e.decided,
            });
        }
        Message::Promise {
            ballot,
            from: from_slot,
            log_start: Slot(self.log.start),
            entries,
            next,
        }
    }

    fn merge_report(c: &mut Candidate, slot: u64, r: Report) {
        match c.reports.get(&slot) {
            Some(old) if old.decided => {}
            Some(old) if !r.decided && old.ballot >= r.ballot => {}
            _ => {
                c.reports.insert(slot, r);
            }
        }
    }

    fn on_self_promise(&mut self, ballot: Ballot) {
        let Some(mut c) = self.candidate.take() else {
            return;
        };
        if c.ballot != ballot {
            self.candidate = Some(c);
            return;
        }
        let start = c.from.0.max(self.log.start);
        for s in start..self.log.end() {
            if let Some(e) = self.log.get(s)
                && (e.decided || e.ballot.epoch == ballot.epoch)
            {
                Self::merge_report(
                    &mut c,
                    s,
                    Report {
                        ballot: e.ballot,
                        value: e.value.clone(),
                        decided: e.decided,
                    },
                );
            }
        }
        if let Some(i) = self.membership.voter_index(self.cfg.id) {
            c.complete |= 1 << i;
        }
        self.candidate = Some(c);
        self.try_finish_candidacy();
    }

    fn on_promise(
        &mut self,
        from: HostId,
        ballot: Ballot,
        log_start: Slot,
        entries: Vec<ReportedEntry>,
        next: Option<Slot>,
    ) {
        let Some(idx) = self.membership.voter_index(from) else {
            return;
        };
        let span_max = self.cfg.limits.promise_entries_max as u64 * 16 + self.slots_ahead_max();
        let Some(c) = &mut self.candidate else { return };
        if c.ballot != ballot {
            return;
        }
        for e in entries {
            Self::merge_report(
                c,
                e.slot.0,
                Report {
                    ballot: e.ballot,
                    value: e.value,
                    decided: e.decided,
                },
            );
        }
        if log_start > c.max_log_start {
            c.max_log_start = log_start;
            c.max_log_start_host = Some(from);
        }
        // Phase 2 starts with a value for every slot from our start to the highest
        // reported one; a report far beyond both our watermark and every reporter's
        // log start would make that range huge.
        let start = self.decided_below.max(c.max_log_start.0);
        let far = c
            .reports
            .keys()
            .next_back()
            .is_some_and(|&s| s >= start.saturating_add(span_max));
        if far || c.reports.len() > self.cfg.limits.promise_entries_max * 16 {
            // We are far behind (or the reporter is hostile): stop collecting, learn
            // the decided slots first, and run again later. Giving up is always safe.
            self.candidate = None;
            self.request_catchup(from, true);
            return;
        }
        match next {
            Some(n) => self.send(from, Message::Prepare { ballot, from: n }),
            None => {
                c.complete |= 1 << idx;
                self.try_finish_candidacy();
            }
        }
    }

    fn try_finish_candidacy(&mut self) {
        let quorum = self.membership.quorum();
        let Some(c) = &self.candidate else { return };
        if popcount(c.complete) < quorum {
            return;
        }
        let Some(c) = self.candidate.take() else {
            return;
        };
        self.become_leader(c);
    }

    /// Phase 1 is complete: choose a value for every open slot and start phase 2.
    fn become_leader(&mut self, c: Candidate) {
        let ballot = c.ballot;
        if c.max_log_start.0 > self.decided_below
            && let Some(h) = c.max_log_start_host
        {
            // Some acceptor already dropped slots we have not learned: they are
            // decided, so we learn them by catch-up instead of re-proposing them.
            self.request_catchup(h, true);
        }
        let rstart = self.decided_below.max(c.max_log_start.0);
        let rend = c
            .reports
            .keys()
            .next_back()
            .copied()
            .map_or(rstart, |m| (m + 1).max(rstart));
        // Highest ballot reported in each suffix, for the stop-sign rule.
        let mut values: Vec<(u64, Value, Ballot, bool)> = Vec::new();
        for s in rstart..rend {
            match c.reports.get(&s) {
                Some(r) => values.push((s, r.value.clone(), r.ballot, r.decided)),
                None => values.push((s, Value::Noop, Ballot::default(), false)),
            }
        }
        let mut suffix_max = vec![Ballot::default(); values.len() + 1];
        for i in (0..values.len()).rev() {
            suffix_max[i] = suffix_max[i + 1].max(values[i].2);
        }
        let mut chosen: VecDeque<(u64, Value)> = VecDeque::new();
        let mut stop_pending = false;
        for (i, (s, v, b, decided)) in values.into_iter().enumerate() {
            if v.is_stop() {
                if !decided && suffix_max[i + 1] > b {
                    // A later leader proposed beyond this stop-sign without seeing it,
                    // so it was never chosen (Stoppable Paxos): fill the slot.
                    chosen.push_back((s, Value::Noop));
                    continue;
                }
                chosen.push_back((s, v));
                stop_pending = true;
                break;
            }
            chosen.push_back((s, v));
        }
        let next_slot = chosen.back().map_or(rstart, |(s, _)| s + 1);
        let mut peers = BTreeMap::new();
        for h in self.membership.all_hosts() {
            if h != self.cfg.id {
                peers.insert(h, Peer::default());
            }
        }
        let queue = std::mem::take(&mut self.stash);
        let queue_bytes = queue.iter().map(Command::cost_bytes).sum();
        self.leading = Some(Leading {
            ballot,
            since: self.now,
            next_slot,
            inflight: BTreeMap::new(),
            repropose: chosen,
            queue,
            queue_bytes,
            pending_reconfig: None,
            stop_pending,
            peers,
            round: 0,
            round_sent: VecDeque::new(),
            last_heartbeat: self.now,
            lease_until: Time(0),
            read_round_wanted: false,
            batches_writing: VecDeque::new(),
        });
        self.leader_hint = Some(self.cfg.id);
        self.last_leader_contact = Some(self.now);
        self.send_heartbeat();
    }

    /// Leaves leadership or candidacy; pending reads fail, queued commands are dropped
    /// (clients retry them).
    fn step_down(&mut self) {
        self.candidate = None;
        if self.leading.take().is_some() {
            self.leader_hint = None;
            self.stash.clear();
            for r in std::mem::take(&mut self.reads) {
                self.read_events.push_back(Apply::ReadAborted { id: r.id });
            }
            self.reset_election_timer();
        }
    }

    fn on_nack(&mut self, from: HostId, ballot: Ballot, promised: Ballot) {
        if promised.epoch > self.epoch() {
            self.request_catchup(from, false);
            return;
        }
        if promised.epoch == self.epoch() {
            self.max_round = self.max_round.max(promised.round);
        }
        let ours = self
            .leading
            .as_ref()
            .map(|l| l.ballot)
            .or(self.candidate.as_ref().map(|c| c.ballot));
        if let Some(b) = ours
            && b == ballot
            && promised > b
        {
            self.step_down();
        }
    }

    // ----- phase 2 ---------------------------------------------------------------------

    fn flush_proposals(&mut self) {
        let limits = self.cfg.limits.clone();
        let window_end = self.decided_below + limits.window_slots_max;
        let decided = self.decided_below;
        if let Some(l) = &mut self.leading {
            // Slots decided meanwhile (learned by catch-up or a snapshot) need no vote.
            while l.repropose.front().is_some_and(|(s, _)| *s < decided) {
                l.repropose.pop_front();
            }
            l.next_slot = l.next_slot.max(decided);
            l.inflight.retain(|s, _| *s >= decided);
        }
        loop {
            let Some(l) = &mut self.leading else { return };
            if let Some((s, _)) = l.repropose.front() {
                if *s >= window_end {
                    return;
                }
                if let Some((s, v)) = l.repropose.pop_front() {
                    self.propose_slot(s, v);
                }
                continue;
            }
            if l.stop_pending || l.next_slot >= window_end {
                return;
            }
            let slot = l.next_slot;
            if let Some(m) = l.pending_reconfig.take() {
                l.stop_pending = true;
                l.next_slot += 1;
                self.propose_slot(slot, Value::Reconfigure(Arc::new(m)));
                return;
            }
            while l
                .batches_writing
                .front()
                .is_some_and(|t| *t <= self.durable_token)
            {
                l.batches_writing.pop_front();
            }
            if l.queue.is_empty() || l.batches_writing.len() >= limits.batches_writing_max.max(1) {
                return;
            }
            // `inflight` holds exactly the proposed slots not yet decided.
            let full = l.queue.len() >= limits.batch_commands_max
                || l.queue_bytes + BATCH_HEADER_BYTES >= limits.batch_bytes_max;
            if !full && l.inflight.len() as u64 >= limits.partial_batch_window_slots.max(1) {
                return;
            }
            let mut commands = Vec::new();
            let mut bytes = BATCH_HEADER_BYTES;
            while let Some(c) = l.queue.front() {
                let cost = c.cost_bytes();
                if !commands.is_empty()
                    && (commands.len() >= limits.batch_commands_max
                        || bytes + cost > limits.batch_bytes_max)
                {
                    break;
                }
                bytes += cost;
                l.queue_bytes -= cost;
                if let Some(c) = l.queue.pop_front() {
                    commands.push(c);
                }
            }
            l.next_slot += 1;
            let time_ms = self.now.as_ms().max(self.max_stamp_ms);
            let stamp = Stamp {
                time_ms,
                entropy: self.rng.next_u64(),
            };
            self.propose_slot(slot, Value::Batch(Arc::new(Batch { stamp, commands })));
            let token = self.last_sync_token;
            if let Some(l) = &mut self.leading {
                l.batches_writing.push_back(token);
            }
        }
    }

    fn propose_slot(&mut self, slot: u64, value: Value) {
        let me = self.cfg.id;
        let Some(l) = &self.leading else { return };
        let ballot = l.ballot;
        let already_decided = self.log.get(slot).is_some_and(|e| e.decided);
        self.note_stamp(&value);
        if !already_decided {
            self.log.set(
                slot,
                LogEntry {
                    ballot,
                    value: value.clone(),
                    decided: false,
                },
            );
            self.persist(
                Record::Accept {
                    slot: Slot(slot),
                    ballot,
                    value: value.clone(),
                },
                true,
            );
        }
        let decided_below = Slot(self.decided_below);
        let now = self.now;
        if let Some(l) = &mut self.leading {
            l.inflight.insert(
                slot,
                Inflight {
                    votes: 0,
                    sent: now,
                },
            );
        }
        let hosts: Vec<HostId> = self.membership.all_hosts().filter(|h| *h != me).collect();
        for h in hosts {
            self.send(
                h,
                Message::Accept {
                    ballot,
                    slot: Slot(slot),
                    value: value.clone(),
                    decided_below,
                },
            );
        }
        let vote = Message::Accepted {
            ballot,
            slot: Slot(slot),
        };
        if already_decided {
            self.deliver(me, vote);
        } else {
            self.send_durable(me, vote);
        }
    }

    fn on_accept(
        &mut self,
        from: HostId,
        ballot: Ballot,
        slot: Slot,
        value: Value,
        decided_below: Slot,
    ) {
        if !self.epoch_gate(from, ballot) {
            return;
        }
        if ballot < self.promised {
            let promised = self.promised;
            self.send(from, Message::Nack { ballot, promised });
            return;
        }
        if ballot > self.promised {
            self.adopt_promise(ballot);
        }
        self.follow(from, ballot);
        let s = slot.0;
        if s < self.epoch_start {
            return;
        }
        if s < self.decided_below || self.log.get(s).is_some_and(|e| e.decided) {
            // Already decided here, hence with this very value: vote without a write.
            self.send(from, Message::Accepted { ballot, slot });
        } else if s >= self.decided_below + self.ahead_max() {
            self.request_catchup(from, false);
        } else {
            self.note_stamp(&value);
            self.log.set(
                s,
                LogEntry {
                    ballot,
                    value: value.clone(),
                    decided: false,
                },
            );
            self.persist(
                Record::Accept {
                    slot,
                    ballot,
                    value,
                },
                true,
            );
            self.send_durable(from, Message::Accepted { ballot, slot });
        }
        self.learn_decided(from, ballot, decided_below);
    }

    /// Notes that `from` leads with `ballot` (which we did not refuse).
    fn follow(&mut self, from: HostId, ballot: Ballot) {
        if self.leading.as_ref().is_some_and(|l| l.ballot < ballot)
            || self.candidate.as_ref().is_some_and(|c| c.ballot < ballot)
        {
            self.step_down();
        }
        if self.leading.is_none() {
            self.candidate = None;
            self.stash.clear();
            self.leader_hint = Some(from);
            self.last_leader_contact = Some(self.now);
            self.leader_suspected = false;
            self.election_deadline = self
                .now
                .plus_us(self.cfg.timing.election_timeout_us)
                .plus_us(self.jitter_us);
        }
    }

    /// The leader of `ballot` says every slot below `below` is decided: entries we
    /// accepted in that ballot are the decided values.
    fn learn_decided(&mut self, from: HostId, ballot: Ballot, below: Slot) {
        let end = below.0.min(self.log.end());
        for s in self.decided_below..end {
            if let Some(e) = self.log.get_mut(s)
                && !e.decided
                && e.ballot == ballot
            {
                e.decided = true;
            }
        }
        self.advance_decided();
        if self.decided_below < below.0 {
            self.request_catchup(from, false);
        }
    }

    fn on_accepted(&mut self, from: HostId, ballot: Ballot, slot: Slot) {
        let quorum = self.membership.quorum();
        let idx = self.membership.voter_index(from);
        let now = self.now;
        let Some(l) = &mut self.leading else { return };
        if l.ballot != ballot {
            return;
        }
        if let Some(p) = l.peers.get_mut(&from) {
            p.last_ack = Some(now);
        }
        let Some(idx) = idx else { return };
        let Some(inf) = l.inflight.get_mut(&slot.0) else {
            return;
        };
        inf.votes |= 1 << idx;
        if popcount(inf.votes) >= quorum {
            l.inflight.remove(&slot.0);
            if let Some(e) = self.log.get_mut(slot.0) {
                e.decided = true;
            }
            self.advance_decided();
        }
    }

    fn advance_decided(&mut self) {
        let before = self.decided_below;
        while let Some(e) = self.log.get(self.decided_below) {
            if !e.decided {
                break;
            }
            let stop = match &e.value {
                Value::Reconfigure(m) => Some(m.clone()),
                _ => None,
            };
            let slot = self.decided_below;
            self.decided_below += 1;
            if let Some(m) = stop {
                self.enter_epoch(slot, m);
            }
        }
        if self.decided_below > before {
            self.persist(
                Record::Decided {
                    below: Slot(self.decided_below),
                },
                false,
            );
            if self.leading.is_some() {
                self.check_promotions();
            }
        }
    }

    /// A stop-sign at `slot` is decided (and so is every slot before it): the epoch ends
    /// here and `m` governs every later slot.
    fn enter_epoch(&mut self, slot: u64, m: Arc<Membership>) {
        let old = self.membership.clone();
        self.membership = m.clone();
        self.epoch_start = slot + 1;
        self.max_round = 0;
        self.log.drop_stale_above(slot, m.epoch);
        self.candidate = None;
        if let Some(l) = self.leading.take() {
            // Tell the old members the stop-sign is decided: there will be no more
            // accepts in the old epoch to carry the watermark.
            let me = self.cfg.id;
            let hosts: Vec<HostId> = old.all_hosts().chain(m.all_hosts()).collect();
            for h in hosts {
                if h != me {
                    self.send(
                        h,
                        Message::Heartbeat {
                            ballot: l.ballot,
                            decided_below: Slot(self.decided_below),
                            round: l.round,
                        },
                    );
                }
            }
            for r in std::mem::take(&mut self.reads) {
                self.read_events.push_back(Apply::ReadAborted { id: r.id });
            }
            self.leader_hint = None;
            if m.is_voter(me) {
                // Carry on leading in the new epoch: run phase 1 with the new voters.
                self.stash = l.queue;
                self.start_election();
                return;
            }
        }
        let left = self.leader_hint.filter(|l| !m.is_voter(*l));
        let contact = self.last_leader_contact;
        self.leader_hint = None;
        self.last_leader_contact = None;
        self.reset_election_timer();
        // The leader is not a voter of the new epoch (it replaced itself: its
        // host is leaving) and stepped down on deciding this. As after
        // `suspect`, the first voter after it in id order runs once its lease
        // has surely ended, rather than after the election timeout. Only a
        // voter of both epochs is picked: one just promoted from learner may
        // not have followed the old leader, so may not know it left.
        if let Some(old_leader) = left
            && m.is_voter(self.cfg.id)
        {
            self.leader_suspected = true;
            let first = m
                .voters
                .iter()
                .filter(|v| old.is_voter(**v))
                .min_by_key(|v| (v.0 <= old_leader.0, v.0));
            if first == Some(&self.cfg.id) {
                let at = contact
                    .map_or(self.now, |t| {
                        t.plus_us(self.sticky_window_us())
                            .plus_us(self.cfg.timing.heartbeat_interval_us)
                    })
                    .max(self.now);
                self.election_deadline = self.election_deadline.min(at);
            }
        }
    }

    // ----- heartbeats, leases, reads ----------------------------------------------------

    fn send_heartbeat(&mut self) {
        let me = self.cfg.id;
        let decided_below = Slot(self.decided_below);
        let now = self.now;
        let Some(l) = &mut self.leading else { return };
        l.round += 1;
        l.read_round_wanted = false;
        l.last_heartbeat = now;
        l.round_sent.push_back((l.round, now));
        while l.round_sent.len() > 64 {
            l.round_sent.pop_front();
        }
        let ballot = l.ballot;
        let round = l.round;
        let hosts: Vec<HostId> = self.membership.all_hosts().filter(|h| *h != me).collect();
        for h in hosts {
            self.send(
                h,
                Message::Heartbeat {
                    ballot,
                    decided_below,
                    round,
                },
            );
        }
        self.update_reads();
    }

    fn send_read_round(&mut self) {
        if self.leading.as_ref().is_some_and(|l| l.read_round_wanted) {
            self.send_heartbeat();
        }
    }

    fn on_heartbeat(&mut self, from: HostId, ballot: Ballot, below: Slot, round: u64) {
        if !self.epoch_gate(from, ballot) {
            return;
        }
        if ballot < self.promised {
            let promised = self.promised;
            self.send(from, Message::Nack { ballot, promised });
            return;
        }
        self.follow(from, ballot);
        self.learn_decided(from, ballot, below);
        let decided_below = Slot(self.decided_below);
        self.send(
            from,
            Message::HeartbeatAck {
                ballot,
                round,
                decided_below,
            },
        );
    }

    fn on_heartbeat_ack(&mut self, from: HostId, ballot: Ballot, round: u64, below: Slot) {
        let now = self.now;
        let Some(l) = &mut self.leading else { return };
        if l.ballot != ballot {
            return;
        }
        if let Some(p) = l.peers.get_mut(&from) {
            p.last_ack = Some(now);
            p.acked_round = p.acked_round.max(round);
            p.decided_below = p.decided_below.max(below);
        }
        if below.0 > self.decided_below {
            // A follower knows more decided slots than we do (we were elected while
            // behind): fetch them, or the window never opens.
            self.request_catchup(from, false);
        }
        self.update_lease();
        self.update_reads();
        self.check_promotions();
    }

    /// The highest heartbeat round a quorum of voters (counting us) acknowledged.
    fn quorum_round(&self) -> u64 {
        let Some(l) = &self.leading else { return 0 };
        let mut rounds: Vec<u64> = self
            .membership
            .voters
            .iter()
            .map(|v| {
                if *v == self.cfg.id {
                    l.round
                } else {
                    l.peers.get(v).map_or(0, |p| p.acked_round)
                }
            })
            .collect();
        rounds.sort_unstable_by(|a, b| b.cmp(a));
        rounds
            .get(self.membership.quorum() - 1)
            .copied()
            .unwrap_or(0)
    }

    fn update_lease(&mut self) {
        let q = self.quorum_round();
        let lease_us = self.cfg.timing.leader_lease_us;
        let Some(l) = &mut self.leading else { return };
        if let Some((_, sent)) = l.round_sent.iter().rev().find(|(r, _)| *r <= q) {
            l.lease_until = l.lease_until.max(sent.plus_us(lease_us));
        }
    }

    fn update_reads(&mut self) {
        if self.reads.is_empty() || self.leading.is_none() {
            return;
        }
        let q = self.quorum_round();
        for r in &mut self.reads {
            if r.round.is_some_and(|need| q >= need) {
                r.round = None;
            }
        }
    }

    fn leader_tick(&mut self) {
        let now = self.now;
        let t = self.cfg.timing.clone();
        let quorum = self.membership.quorum();
        let me = self.cfg.id;
        let Some(l) = &self.leading else { return };
        // Step down if no quorum answered for an election timeout.
        if now.since(l.since) >= t.election_timeout_us {
            let live = 1 + self
                .membership
                .voters
                .iter()
                .filter(|v| **v != me)
                .filter(|v| {
                    l.peers
                        .get(v)
                        .and_then(|p| p.last_ack)
                        .is_some_and(|a| now.since(a) < t.election_timeout_us)
                })
                .count();
            if live < quorum {
                self.step_down();
                return;
            }
        }
        if now.since(l.last_heartbeat) >= t.heartbeat_interval_us {
            self.send_heartbeat();
        }
        // Re-send accepts that have waited too long (lost messages).
        let Some(l) = &mut self.leading else { return };
        let ballot = l.ballot;
        let mut resend: Vec<(u64, u64)> = Vec::new();
        for (s, inf) in l.inflight.iter_mut() {
            if now.since(inf.sent) >= t.retry_us {
                inf.sent = now;
                resend.push((*s, inf.votes));
            }
        }
        let decided_below = Slot(self.decided_below);
        for (s, votes) in resend {
            let Some(e) = self.log.get(s) else { continue };
            let value = e.value.clone();
            let targets: Vec<HostId> = self
                .membership
                .voters
                .iter()
                .enumerate()
                .filter(|(i, v)| **v != me && votes & (1 << i) == 0)
                .map(|(_, v)| *v)
                .collect();
            for h in targets {
                self.send(
                    h,
                    Message::Accept {
                        ballot,
                        slot: Slot(s),
                        value: value.clone(),
                        decided_below,
                    },
                );
            }
        }
        self.check_promotions();
    }

    /// Promotes a learner that has caught up (one change at a time).
    fn check_promotions(&mut self) {
        let lag = self.cfg.timing.promote_lag_slots;
        let decided = self.decided_below;
        let Some(l) = &mut self.leading else { return };
        if l.stop_pending || l.pending_reconfig.is_some() {
            return;
        }
        let ready = self.membership.learners.iter().find(|lr| {
            l.peers
                .get(&lr.host)
                .is_some_and(|p| p.last_ack.is_some() && p.decided_below.0 + lag >= decided)
        });
        if let Some(lr) = ready.copied() {
            let mut m = (*self.membership).clone();
            m.epoch = Epoch(m.epoch.0 + 1);
            m.learners.retain(|x| x.host != lr.host);
            if let Some(old) = lr.replaces {
                m.voters.retain(|v| *v != old);
            }
            m.voters.push(lr.host);
            l.pending_reconfig = Some(m);
        }
    }

    // ----- catch-up ----------------------------------------------------------------------

    fn on_catchup_request(&mut self, from: HostId, from_slot: Slot, epoch: Epoch) {
        if epoch == Epoch(0) || from_slot.0 < self.log.start {
            if self.snapshot.slot.0 > 0 || epoch == Epoch(0) {
                self.start_snapshot_send(from);
            }
            return;
        }
        let limits = self.limits();
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut s = from_slot.0;
        while s < self.decided_below
            && entries.len() < limits.catchup_entries_max
            && (bytes < limits.catchup_bytes_max || entries.is_empty())
        {
            let Some(e) = self.log.get(s) else { break };
            bytes += e.value.cost_bytes();
            entries.push(DecidedEntry {
                slot: Slot(s),
                value: e.value.clone(),
            });
            s += 1;
        }
        if !entries.is_empty() {
            let decided_below = Slot(self.decided_below);
            self.send(
                from,
                Message::CatchUp {
                    entries,
                    decided_below,
                },
            );
        }
    }

    fn on_catchup(&mut self, from: HostId, entries: Vec<DecidedEntry>, their_below: Slot) {
        let bound =
            self.decided_below + self.ahead_max() + self.limits().catchup_entries_max as u64;
        for e in entries {
            let s = e.slot.0;
            if s < self.decided_below || s < self.log.start || s >= bound {
                continue;
            }
            if self.log.get(s).is_some_and(|x| x.decided) {
                continue;
            }
            self.note_stamp(&e.value);
            self.log.set(
                s,
                LogEntry {
                    ballot: Ballot::default(),
                    value: e.value.clone(),
                    decided: true,
                },
            );
            self.persist(
                Record::Learn {
                    slot: e.slot,
                    value: e.value,
                },
                false,
            );
            // A value learned in this epoch may be followed by a stop-sign: handled by
            // advance_decided below.
        }
        let before = self.decided_below;
        self.advance_decided();
        if self.decided_below < their_below.0 {
            let progressed = self.decided_below > before;
            self.request_catchup(from, progressed);
        }
    }

    // ----- snapshots -------------------------------------------------------------------

    fn start_snapshot_send(&mut self, to: HostId) {
        let retry = self.cfg.timing.retry_us;
        let now = self.now;
        if let Some(s) = self.snap_out.get_mut(&to)
            && s.file.slot == self.snapshot.slot
        {
            // The receiver asks again: if nothing moved for a retry interval,
            // a chunk was lost (or arrived out of order and was dropped), so
            // send again from what it acknowledged.
            if now.since(s.last_progress) >= retry {
                s.next_offset = s.acked;
                s.last_progress = now;
                self.pump_snapshot(to);
            }
            return;
        }
        let cap = self.limits().voters_max + self.limits().learners_max;
        if self.snap_out.len() >= cap
            && let Some(oldest) = self
                .snap_out
                .iter()
                .min_by_key(|(_, s)| s.last_progress)
                .map(|(h, _)| *h)
        {
            self.snap_out.remove(&oldest);
        }
        self.snap_out.insert(
            to,
            SnapOut {
                file: self.snapshot.clone(),
                next_offset: 0,
                acked: 0,
                last_progress: self.now,
            },
        );
        self.pump_snapshot(to);
    }

    fn pump_snapshot(&mut self, to: HostId) {
        let chunk = self.limits().snapshot_chunk_bytes_max.max(1) as u64;
        let window = self.limits().snapshot_chunks_in_flight_max.max(1) * chunk;
        let Some(s) = self.snap_out.get_mut(&to) else {
            return;
        };
        let total = s.file.image.len() as u64;
        let mut msgs = Vec::new();
        loop {
            if s.next_offset >= s.acked + window || (s.next_offset >= total && total > 0) {
                break;
            }
            let start = s.next_offset.min(total);
            let end = (start + chunk).min(total);
            msgs.push(Message::SnapshotChunk {
                slot: s.file.slot,
                digest: s.file.digest,
                total_bytes: total,
                offset: start,
                data: s.file.image.slice(start as usize..end as usize),
            });
            s.next_offset = end;
            if end >= total {
                break;
            }
        }
        for m in msgs {
            self.send(to, m);
        }
    }

    fn on_snapshot_ack(&mut self, from: HostId, slot: Slot, digest: u64, offset: u64) {
        let now = self.now;
        let Some(s) = self.snap_out.get_mut(&from) else {
            return;
        };
        if s.file.slot != slot || s.file.digest != digest {
            return;
        }
        let total = s.file.image.len() as u64;
        if offset >= total {
            self.snap_out.remove(&from);
            return;
        }
        if offset < s.acked {
            // The receiver lost what it had (or this ack is old): go back.
            s.next_offset = offset;
        } else {
            s.next_offset = s.next_offset.max(offset);
        }
        s.acked = offset;
        s.last_progress = now;
        self.pump_snapshot(from);
    }

    fn on_snapshot_chunk(
        &mut self,
        from: HostId,
        slot: Slot,
        digest: u64,
        total: u64,
        offset: u64,
        data: Bytes,
    ) {
        let blank = self.epoch() == Epoch(0);
        if slot.0 < self.decided_below && !blank {
            // We already have this state: tell the sender to stop.
            self.send(
                from,
                Message::SnapshotAck {
                    slot,
                    digest,
                    offset: total,
                },
            );
            return;
        }
        let same = self
            .snap_in
            .as_ref()
            .is_some_and(|s| s.slot == slot && s.digest == digest);
        if !same {
            // Switch to another image if it is newer, or if the partial one stalled
            // (its sender may be gone for good).
            let retry = self.cfg.timing.retry_us;
            let now = self.now;
            let switch = self
                .snap_in
                .as_ref()
                .is_none_or(|s| slot >= s.slot || now.since(s.last_progress) >= retry);
            if !switch {
                return;
            }
            // Room for the whole image at once (`total` is within
            // `snapshot_bytes_max`): growing by doubling would copy it again
            // and again.
            self.snap_in = Some(SnapIn {
                slot,
                digest,
                total,
                buf: Vec::with_capacity(total as usize),
                last_progress: now,
            });
        }
        let Some(si) = &mut self.snap_in else { return };
        if si.total != total {
            return;
        }
        if offset == si.buf.len() as u64 && !data.is_empty() {
            si.buf.extend_from_slice(&data);
            si.last_progress = self.now;
        }
        let have = si.buf.len() as u64;
        self.send(
            from,
            Message::SnapshotAck {
                slot,
                digest,
                offset: have,
            },
        );
        if have == total
            && let Some(si) = self.snap_in.take()
        {
            let bytes = Bytes::from(si.buf);
            if xxhash_rust::xxh3::xxh3_64(&bytes) != si.digest {
                return;
            }
            if let Ok(img) = SnapshotImage::decode_shared(&bytes)
                && img.slot == si.slot
                && self.check_image(&img).is_ok()
            {
                let file = SnapshotFile {
                    slot: img.slot,
                    digest: si.digest,
                    image: bytes,
                };
                self.install_image(img, file, true);
            }
        }
    }

    /// Adopts a snapshot image as our state at its slot.
    fn install_image(&mut self, img: SnapshotImage, file: SnapshotFile, persist: bool) {
        let blank = self.epoch() == Epoch(0);
        if img.slot.0 < self.decided_below && !blank {
            return;
        }
        let new_epoch = img.membership.epoch != self.epoch();
        self.log.truncate_below(img.slot.0 + 1);
        self.decided_below = self.decided_below.max(img.slot.0 + 1);
        self.membership = Arc::new(img.membership.clone());
        self.epoch_start = img.epoch_start.0;
        self.time_ms = self.time_ms.max(img.time_ms);
        self.max_stamp_ms = self.max_stamp_ms.max(img.time_ms);
        if new_epoch {
            self.max_round = 0;
            self.log.drop_stale_above(img.slot.0, img.membership.epoch);
            self.step_down();
            self.leader_hint = None;
            self.last_leader_contact = None;
        }
        self.snapshot = file.clone();
        if persist {
            self.pending_snapshot = Some(file);
            self.pending_snapshot_is_checkpoint = false;
            self.pending_compact = Some(Slot(img.slot.0 + 1));
        }
        self.pending_install = Some(img);
        self.advance_decided();
        self.reset_election_timer();
    }
}
