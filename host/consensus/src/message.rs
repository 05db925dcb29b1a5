//! Wire messages between replicas, and their validation.
//!
//! Every message decoded from the network may be hostile: [`Message::validate`] checks
//! every count and size against the replica's [`Limits`] before the replica looks at it.

use crate::config::Limits;
use crate::types::{Ballot, Bytes, Epoch, Slot, Value};
use serde::{Deserialize, Serialize};

/// One accepted (or decided) value reported in a [`Message::Promise`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedEntry {
    pub slot: Slot,
    /// The ballot in which the reporting acceptor accepted `value`.
    pub ballot: Ballot,
    pub value: Value,
    /// The reporter knows this value is decided.
    pub decided: bool,
}

/// A decided value sent during catch-up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecidedEntry {
    pub slot: Slot,
    pub value: Value,
}

/// Messages exchanged between replicas of one virtual peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Phase 1a: a candidate asks for a promise for every slot at or above `from`.
    Prepare { ballot: Ballot, from: Slot },
    /// Phase 1b: the acceptor promised `ballot` (durably) and reports what it accepted at
    /// or above `from`, one bounded page at a time; `next` asks the candidate to
    /// re-send `Prepare` from that slot for the following page. `log_start` is the first
    /// slot the acceptor still holds (below it, only its snapshot).
    Promise {
        ballot: Ballot,
        from: Slot,
        log_start: Slot,
        entries: Vec<ReportedEntry>,
        next: Option<Slot>,
    },
    /// Phase 2a: accept `value` in `slot`. Carries the leader's decided watermark: every
    /// slot below `decided_below` is decided.
    Accept {
        ballot: Ballot,
        slot: Slot,
        value: Value,
        decided_below: Slot,
    },
    /// Phase 2b: the acceptor accepted (durably) the leader's value for `slot`. No payload.
    Accepted { ballot: Ballot, slot: Slot },
    /// Leader liveness, decided watermark, and read-index confirmation rounds.
    Heartbeat {
        ballot: Ballot,
        decided_below: Slot,
        round: u64,
    },
    /// Reply to a heartbeat; reports the follower's own decided watermark.
    HeartbeatAck {
        ballot: Ballot,
        round: u64,
        decided_below: Slot,
    },
    /// The receiver refused `ballot` because it promised `promised` (possibly of a later
    /// epoch, which tells the sender it is stale).
    Nack { ballot: Ballot, promised: Ballot },
    /// Ask for decided values from `from` on (or a snapshot if they are gone).
    CatchUpRequest { from: Slot, epoch: Epoch },
    /// Decided values, contiguous from the first entry's slot.
    CatchUp {
        entries: Vec<DecidedEntry>,
        decided_below: Slot,
    },
    /// One piece of a snapshot image. `(slot, digest)` identifies the image, so a
    /// transfer interrupted by a leader change resumes where it stopped.
    SnapshotChunk {
        slot: Slot,
        digest: u64,
        total_bytes: u64,
        offset: u64,
        data: Bytes,
    },
    /// The receiver holds the image's first `offset` bytes.
    SnapshotAck {
        slot: Slot,
        digest: u64,
        offset: u64,
    },
}

/// Why a message from the network was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("{what} has {got} items, limit {max}")]
    TooMany {
        what: &'static str,
        got: usize,
        max: usize,
    },
    #[error("{what} is {got} bytes, limit {max}")]
    TooLarge {
        what: &'static str,
        got: u64,
        max: u64,
    },
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("message from a host that is not a member")]
    NotMember,
    #[error("cannot decode message: {0}")]
    Decode(String),
}

fn check_count(what: &'static str, got: usize, max: usize) -> Result<(), MessageError> {
    if got > max {
        return Err(MessageError::TooMany { what, got, max });
    }
    Ok(())
}

fn check_bytes(what: &'static str, got: u64, max: u64) -> Result<(), MessageError> {
    if got > max {
        return Err(MessageError::TooLarge { what, got, max });
    }
    Ok(())
}

/// Checks one value against the limits.
pub fn validate_value(v: &Value, limits: &Limits) -> Result<(), MessageError> {
    match v {
        Value::Noop => Ok(()),
        Value::Batch(b) => {
            check_count("batch", b.commands.len(), limits.batch_commands_max)?;
            for c in &b.commands {
                check_bytes(
                    "command payload",
                    c.payload.len() as u64,
                    limits.command_bytes_max as u64,
                )?;
            }
            check_bytes(
                "batch",
                b.cost_bytes() as u64,
                limits.batch_bytes_max as u64 + 64,
            )
        }
        Value::Reconfigure(m) => {
            check_count("voters", m.voters.len(), limits.voters_max)?;
            check_count("learners", m.learners.len(), limits.learners_max)?;
            if m.voters.is_empty() {
                return Err(MessageError::Malformed("membership without voters"));
            }
            Ok(())
        }
    }
}

impl Message {
    /// Checks every count and size in the message. Call on anything from the network.
    pub fn validate(&self, limits: &Limits) -> Result<(), MessageError> {
        match self {
            Message::Promise { entries, .. } => {
                check_count("promise entries", entries.len(), limits.promise_entries_max)?;
                let mut bytes = 0u64;
                let mut last: Option<Slot> = None;
                for e in entries {
                    validate_value(&e.value, limits)?;
                    bytes += e.value.cost_bytes() as u64;
                    if last.is_some_and(|l| e.slot <= l) {
                        return Err(MessageError::Malformed("promise entries not ascending"));
                    }
                    last = Some(e.slot);
                }
                check_bytes(
                    "promise",
                    bytes,
                    (limits.catchup_bytes_max + limits.batch_bytes_max) as u64,
                )
            }
            Message::Accept { value, .. } => validate_value(value, limits),
            Message::CatchUp { entries, .. } => {
                check_count(
                    "catch-up entries",
                    entries.len(),
                    limits.catchup_entries_max,
                )?;
                let mut bytes = 0u64;
                for (i, e) in entries.iter().enumerate() {
                    validate_value(&e.value, limits)?;
                    bytes += e.value.cost_bytes() as u64;
                    if i > 0 && e.slot.0 != entries[i - 1].slot.0 + 1 {
                        return Err(MessageError::Malformed("catch-up entries not contiguous"));
                    }
                }
                check_bytes(
                    "catch-up",
                    bytes,
                    (limits.catchup_bytes_max + limits.batch_bytes_max) as u64,
                )
            }
            Message::SnapshotChunk {
                total_bytes,
                offset,
                data,
                ..
            } => {
                check_bytes(
                    "snapshot chunk",
                    data.len() as u64,
                    limits.snapshot_chunk_bytes_max as u64,
                )?;
                check_bytes("snapshot", *total_bytes, limits.snapshot_bytes_max)?;
                if offset.saturating_add(data.len() as u64) > *total_bytes {
                    return Err(MessageError::Malformed("snapshot chunk past the end"));
                }
                Ok(())
            }
            Message::Prepare { .. }
            | Message::Accepted { .. }
            | Message::Heartbeat { .. }
            | Message::HeartbeatAck { .. }
            | Message::Nack { .. }
            | Message::CatchUpRequest { .. }
            | Message::SnapshotAck { .. } => Ok(()),
        }
    }

    /// Compact binary encoding (postcard) used by storage and the tests; the daemon may
    /// use CBOR instead, since every type here is serde.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding a message into memory cannot fail")
    }

    /// Decodes and validates bytes from the network.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Message, MessageError> {
        if bytes.len() as u64 > limits.message_bytes_max() {
            return Err(MessageError::TooLarge {
                what: "message",
                got: bytes.len() as u64,
                max: limits.message_bytes_max(),
            });
        }
        let m: Message =
            postcard::from_bytes(bytes).map_err(|e| MessageError::Decode(e.to_string()))?;
        m.validate(limits)?;
        Ok(m)
    }

    /// A short name for logs and statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Prepare { .. } => "prepare",
            Message::Promise { .. } => "promise",
            Message::Accept { .. } => "accept",
            Message::Accepted { .. } => "accepted",
            Message::Heartbeat { .. } => "heartbeat",
            Message::HeartbeatAck { .. } => "heartbeat_ack",
            Message::Nack { .. } => "nack",
            Message::CatchUpRequest { .. } => "catchup_request",
            Message::CatchUp { .. } => "catchup",
            Message::SnapshotChunk { .. } => "snapshot_chunk",
            Message::SnapshotAck { .. } => "snapshot_ack",
        }
    }
}
