//! What a replica asks its caller to make durable, and the snapshot image format.

use crate::session::SessionTable;
use crate::types::{Ballot, Bytes, Membership, Slot, Value};
use serde::{Deserialize, Serialize};

/// One durable log record. Replayed in order on recovery; a later record wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// The acceptor promised not to accept any lower ballot. Must be synced.
    Promise { ballot: Ballot },
    /// The acceptor accepted `value` for `slot` in `ballot`. Must be synced.
    Accept {
        slot: Slot,
        ballot: Ballot,
        value: Value,
    },
    /// A decided value learned by catch-up. Need not be synced (it can be learned again).
    Learn { slot: Slot, value: Value },
    /// Every entry this replica holds below `below` is decided. Need not be synced.
    Decided { below: Slot },
}

impl Record {
    /// The slot a record is about, if any (compaction drops records below a snapshot).
    pub fn slot(&self) -> Option<Slot> {
        match self {
            Record::Promise { .. } | Record::Decided { .. } => None,
            Record::Accept { slot, .. } | Record::Learn { slot, .. } => Some(*slot),
        }
    }
}

/// A snapshot ready to store or send: the encoded [`SnapshotImage`] and its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub slot: Slot,
    /// xxh3-64 of `image`; a transfer resumes only into an image with the same digest.
    pub digest: u64,
    pub image: Bytes,
}

impl SnapshotFile {
    pub fn from_image(img: &SnapshotImage) -> SnapshotFile {
        let image = Bytes::from(img.encode());
        SnapshotFile {
            slot: img.slot,
            digest: xxhash_rust::xxh3::xxh3_64(&image),
            image,
        }
    }
}

/// Everything replicated state holds at a slot: the caller's application state plus
/// what the replica itself replicates (membership, sessions, log time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotImage {
    /// The last slot whose effects are included.
    pub slot: Slot,
    /// The membership in force after `slot`.
    pub membership: Membership,
    /// First slot of `membership`'s epoch.
    pub epoch_start: Slot,
    pub sessions: SessionTable,
    /// Log time (ms) after `slot`: time stamps never go back across a snapshot.
    pub time_ms: u64,
    /// Digest of `app_state`, so replicas can compare states at equal slots.
    pub app_digest: u64,
    /// The application's state, opaque to the replica. Empty at slot 0 means "fresh".
    pub app_state: Bytes,
}

/// Why a snapshot image could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("snapshot image does not decode: {0}")]
    Decode(String),
    #[error("snapshot image digest mismatch")]
    Digest,
}

impl SnapshotImage {
    pub fn encode(&self) -> Vec<u8> {
        // Into a buffer of the final size: growing one by doubling would copy
        // a large application state several times over.
        let head = postcard::to_allocvec(&self.clone_without_state())
            .expect("encoding a snapshot into memory cannot fail")
            .len();
        let capacity = head + 10 + self.app_state.len();
        postcard::to_extend(self, Vec::with_capacity(capacity))
            .expect("encoding a snapshot into memory cannot fail")
    }

    /// Everything but the application state (which is shared, not copied).
    fn clone_without_state(&self) -> SnapshotImage {
        SnapshotImage {
            slot: self.slot,
            membership: self.membership.clone(),
            epoch_start: self.epoch_start,
            sessions: self.sessions.clone(),
            time_ms: self.time_ms,
            app_digest: self.app_digest,
            app_state: Bytes::default(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<SnapshotImage, ImageError> {
        let img: SnapshotImage =
            postcard::from_bytes(bytes).map_err(|e| ImageError::Decode(e.to_string()))?;
        if xxhash_rust::xxh3::xxh3_64(&img.app_state) != img.app_digest {
            return Err(ImageError::Digest);
        }
        Ok(img)
    }
}

/// A batch of durable work. The caller makes it durable in this order — append
/// `records`, then (if any) store `snapshot` atomically, then (if any) drop log records
/// about slots below `compact_below` — and then calls `Replica::on_persisted(token)`.
/// Batches must be acknowledged in the order they were polled. If `must_sync` is false,
/// nothing waits on this batch and it may be acknowledged without an fsync.
#[derive(Clone, Debug)]
pub struct PersistBatch {
    pub token: u64,
    pub records: Vec<Record>,
    pub must_sync: bool,
    pub snapshot: Option<SnapshotFile>,
    pub compact_below: Option<Slot>,
    /// The snapshot is a checkpoint of state the log still holds (not one
    /// received from another replica): storage may acknowledge this batch
    /// before the snapshot is durable, and write it meanwhile, provided it
    /// compacts the log only once the snapshot is durable. A large checkpoint
    /// then does not hold up the votes queued behind it.
    pub snapshot_may_lag: bool,
}

/// What storage hands back on restart.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    /// The latest complete snapshot image, if any.
    pub snapshot: Option<Bytes>,
    /// Every intact record, in the order written.
    pub records: Vec<Record>,
}
