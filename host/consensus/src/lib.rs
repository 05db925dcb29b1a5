//! `vp-consensus`: the Multi-Paxos ordering engine of a vp virtual peer.
//!
//! - [`replica`]: the sans-IO replica (no clock, no I/O, no OS randomness).
//! - [`storage`]: the durable-state trait with file, memory and fault-injecting stores.
//! - [`sim`]: the deterministic simulator and its checkers (`vp-host sim`).
//! - [`bench`]: the in-process core benchmark (`vp-host bench core`).
//!
//! The protocol, every message and record, and the safety argument for
//! reconfiguration are in `docs/consensus.md`.

pub mod bench;
pub mod config;
pub mod lin;
pub mod message;
pub mod record;
pub mod replica;
pub mod rng;
pub mod session;
pub mod sim;
pub mod storage;
pub mod types;

pub use config::{Limits, ReplicaConfig, Timing};
pub use message::{DecidedEntry, Message, MessageError, ReportedEntry};
pub use record::{PersistBatch, Record, Recovered, SnapshotFile, SnapshotImage};
pub use replica::{
    Apply, CheckpointError, ProposeError, RECOVERY_SLOTS_AHEAD_MIN, ReadError, ReadId, ReadMode,
    RecoverError, Replica, Role, Status,
};
pub use session::{Outcome, Reply, ReplyError, SessionTable};
pub use storage::{FaultStore, FileStore, MemStore, Storage, StorageError};
pub use types::{
    Ballot, Batch, Bytes, ClientId, Command, Epoch, HostId, Learner, Membership, MembershipChange,
    Slot, Stamp, Time, Value,
};
