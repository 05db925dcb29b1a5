//! Errors at the library boundary.

use thiserror::Error;

use crate::types::{HostId, Key};

/// Why an operation call or an incoming message was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AlmError {
    /// A key is longer than `key_bytes_max`.
    #[error("key of {len} bytes exceeds key_bytes_max = {max}")]
    KeyTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A payload is larger than `payload_bytes_max`.
    #[error("payload of {len} bytes exceeds payload_bytes_max = {max}")]
    PayloadTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Contact information is larger than `contact_bytes_max`.
    #[error("contact of {len} bytes exceeds contact_bytes_max = {max}")]
    ContactTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// This host already holds `keys_per_host_max` keys.
    #[error("host holds keys_per_host_max = {max} keys already")]
    TooManyKeys {
        /// The limit.
        max: usize,
    },
    /// Too many searches/joins in flight.
    #[error("ops_in_flight_max = {max} operations already in flight")]
    TooManyOps {
        /// The limit.
        max: usize,
    },
    /// Too many multicast hand-offs awaiting acknowledgement.
    #[error("forwards_in_flight_max = {max} multicast hand-offs already in flight")]
    TooManyForwards {
        /// The limit.
        max: usize,
    },
    /// The outgoing queue is full: poll_send more often.
    #[error("sends_queued_max = {max} messages already queued")]
    SendQueueFull {
        /// The limit.
        max: usize,
    },
    /// This host already holds the key (or is inserting it).
    #[error("key {0} is already held by this host")]
    KeyHeld(Key),
    /// This host does not hold the key.
    #[error("key {0} is not held by this host")]
    NoSuchKey(Key),
    /// The operation needs a key on this host to start from (or an introducer).
    #[error("this host holds no key yet: insert one first (with an introducer to join a network)")]
    NotJoined,
    /// The multicast range can contain no key.
    #[error("empty key range")]
    EmptyRange,
    /// A message from the network broke a rule.
    #[error("invalid message from {from}: {reason}")]
    InvalidMessage {
        /// The sender.
        from: HostId,
        /// What was wrong.
        reason: String,
    },
}

/// Why an operation that was started failed later.
#[derive(Clone, Debug, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
pub enum OpError {
    /// No reply after `attempts_max` attempts.
    #[error("timed out after all attempts")]
    Timeout,
    /// Another host already holds the key being inserted.
    #[error("the key is already in the network")]
    KeyExists,
    /// The key was removed while the operation was running.
    #[error("the key was removed while the operation was running")]
    Cancelled,
}
