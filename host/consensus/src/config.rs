//! Replica configuration: identity, seed, timers and every named limit.

use crate::types::HostId;
use serde::{Deserialize, Serialize};

/// Every bound the replica enforces. Hitting one yields an error value, never a panic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes of commands in one slot's batch.
    pub batch_bytes_max: usize,
    /// Commands in one slot's batch.
    pub batch_commands_max: usize,
    /// Payload bytes of one command.
    pub command_bytes_max: usize,
    /// Commands waiting at the leader for a slot.
    pub queue_commands_max: usize,
    /// Bytes waiting at the leader for a slot.
    pub queue_bytes_max: usize,
    /// Pipeline window: slots proposed but not yet decided.
    pub window_slots_max: u64,
    /// A batch that is not full (fewer than `batch_commands_max` commands and
    /// `batch_bytes_max` bytes queued) is proposed only while fewer slots than
    /// this are undecided; full batches go out up to `window_slots_max`. At 1,
    /// a leader under moderate load keeps one slot in flight and everything
    /// that queues meanwhile joins the next one: fewer, larger slots, so fewer
    /// disk syncs and messages per command. It pipelines once the queue fills
    /// whole batches. The default (`window_slots_max`) never holds a batch back.
    #[serde(default = "window_slots_default")]
    pub partial_batch_window_slots: u64,
    /// Client batches the leader proposed that are not yet durable on its own
    /// disk. Beyond it, commands queue and join the next batch: batches grow
    /// with the load (one per disk write), an idle leader proposes at once.
    pub batches_writing_max: usize,
    /// Entries in one promise page.
    pub promise_entries_max: usize,
    /// Entries in one catch-up message.
    pub catchup_entries_max: usize,
    /// Value bytes in one catch-up message or promise page (one entry may exceed it).
    pub catchup_bytes_max: usize,
    /// Bytes of one snapshot chunk.
    pub snapshot_chunk_bytes_max: usize,
    /// Chunks sent ahead of the receiver's acknowledgement.
    pub snapshot_chunks_in_flight_max: u64,
    /// Bytes of a whole snapshot image (application state plus session table).
    pub snapshot_bytes_max: u64,
    /// Voters in a configuration.
    pub voters_max: usize,
    /// Learners in a configuration.
    pub learners_max: usize,
    /// Client sessions kept in the replicated session table.
    pub clients_max: usize,
    /// Log time (ms) a session is kept after its latest command however full
    /// the table is: while it could still be retried, a request's session is
    /// never evicted (that would let the retry apply it twice). A new client
    /// that finds the table full of such sessions is refused, not admitted.
    /// Must exceed the longest time any client retries one request (the host
    /// retries for at most 60 s).
    pub session_retain_ms: u64,
    /// Client ids with any of these bits set are the replicated application's
    /// own clients (a few per instance: e.g. the host's timers coming due and
    /// the answers to the application's calls, which it deduplicates itself).
    /// They are admitted even when the table is full; they may be evicted
    /// like any idle session. 0: none.
    #[serde(default)]
    pub own_client_bits: u128,
    /// Requests per client whose reply (or pending status) is remembered.
    pub replies_per_client_max: usize,
    /// Bytes of one remembered reply.
    pub reply_bytes_max: usize,
    /// Linearizable reads waiting at the leader.
    pub reads_pending_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            batch_bytes_max: 1 << 20,
            batch_commands_max: 4096,
            command_bytes_max: 1 << 20,
            queue_commands_max: 100_000,
            queue_bytes_max: 64 << 20,
            window_slots_max: WINDOW_SLOTS_DEFAULT,
            partial_batch_window_slots: WINDOW_SLOTS_DEFAULT,
            batches_writing_max: 2,
            promise_entries_max: 256,
            catchup_entries_max: 256,
            catchup_bytes_max: 4 << 20,
            snapshot_chunk_bytes_max: 1 << 20,
            snapshot_chunks_in_flight_max: 4,
            snapshot_bytes_max: 512 << 20,
            voters_max: 7,
            learners_max: 4,
            clients_max: 4096,
            session_retain_ms: 10 * 60 * 1000,
            own_client_bits: 0,
            replies_per_client_max: 64,
            reply_bytes_max: 1 << 20,
            reads_pending_max: 10_000,
        }
    }
}

/// The default pipeline window, and the default partial-batch window (which
/// then never holds a batch back).
const WINDOW_SLOTS_DEFAULT: u64 = 32;

fn window_slots_default() -> u64 {
    WINDOW_SLOTS_DEFAULT
}

impl Limits {
    /// The largest encoded message a replica will decode.
    pub fn message_bytes_max(&self) -> u64 {
        let biggest = (self.catchup_bytes_max + self.batch_bytes_max)
            .max(self.snapshot_chunk_bytes_max)
            .max(self.batch_bytes_max);
        biggest as u64 * 2 + 4096
    }
}

/// Timers, in microseconds of the caller's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    /// The leader sends a heartbeat to every member this often.
    pub heartbeat_interval_us: u64,
    /// A follower that heard nothing from a leader for this long (plus jitter) runs
    /// for election; a leader that heard from no quorum for this long steps down.
    pub election_timeout_us: u64,
    /// Random extra wait added to the election timeout, from the replica's seed.
    pub election_jitter_us: u64,
    /// Read lease. Acceptors refuse a new leader for `election_timeout_us` after hearing
    /// from the current one; the leader trusts its lease for `leader_lease_us` from the
    /// moment it SENT the heartbeat a quorum acknowledged. Safe while no clock runs more
    /// than `election_timeout_us / leader_lease_us` times faster than another. After
    /// `Replica::suspect` (the caller saw the leader's connections close) acceptors wait
    /// only `leader_lease_us × 3/2` instead: then the bound is 1.5 (see `suspect`).
    pub leader_lease_us: u64,
    /// Retry interval for catch-up requests, unanswered prepares and snapshot chunks.
    pub retry_us: u64,
    /// A learner within this many slots of the leader's decided watermark is promoted.
    pub promote_lag_slots: u64,
    /// Slots kept in the log below a checkpoint, so slightly lagging peers catch up
    /// from the log instead of a snapshot.
    pub log_retain_slots: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_interval_us: 100_000,
            election_timeout_us: 1_000_000,
            election_jitter_us: 500_000,
            leader_lease_us: 500_000,
            retry_us: 200_000,
            promote_lag_slots: 64,
            log_retain_slots: 1024,
        }
    }
}

/// Everything a replica is created with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaConfig {
    pub id: HostId,
    /// Feeds election jitter and the leader's entropy stamps. Use a different seed per
    /// host (e.g. hash of host id and a per-start nonce).
    pub seed: u64,
    pub timing: Timing,
    pub limits: Limits,
}

impl ReplicaConfig {
    pub fn new(id: HostId, seed: u64) -> ReplicaConfig {
        ReplicaConfig {
            id,
            seed,
            timing: Timing::default(),
            limits: Limits::default(),
        }
    }
}
