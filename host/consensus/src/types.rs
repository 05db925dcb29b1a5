//! Identifiers, time, commands and log values shared by every module.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// A host taking part in a virtual peer (the daemon maps libp2p peer ids to it).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct HostId(pub u64);

/// A position in the replicated log. Slot 0 is never used; the first entry is slot 1.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Slot(pub u64);

/// A configuration number: every decided membership change starts a new epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

/// A client session (or another virtual peer calling this one).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ClientId(pub u128);

/// Caller-defined monotone time in microseconds.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time(pub u64);

/// A Paxos ballot. Ordered by epoch, then round, then leader id, so ballots of a later
/// epoch beat every ballot of an earlier one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Ballot {
    pub epoch: Epoch,
    pub round: u64,
    pub leader: HostId,
}

impl Slot {
    pub const FIRST: Slot = Slot(1);
    pub fn next(self) -> Slot {
        Slot(self.0 + 1)
    }
    pub fn prev(self) -> Slot {
        Slot(self.0.saturating_sub(1))
    }
}

impl Time {
    pub fn plus_us(self, us: u64) -> Time {
        Time(self.0.saturating_add(us))
    }
    pub fn since(self, earlier: Time) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
    pub fn as_ms(self) -> u64 {
        self.0 / 1000
    }
}

macro_rules! display_newtype {
    ($t:ty, $prefix:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

/// Host ids show as 16 hex digits, as everywhere else in vp (status, overlay keys).
impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
display_newtype!(Slot, "s");
display_newtype!(Epoch, "e");
display_newtype!(Time, "t");

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{:x}", self.0)
    }
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.r{}.{}", self.epoch, self.round, self.leader)
    }
}

/// Immutable shared bytes: cloning a batch for several replicas does not copy payloads,
/// and taking a `Vec` (an encoded image, a decoded message) does not copy it either.
/// Serialised as a byte string (not an array of integers).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Bytes(bytes::Bytes);

impl Bytes {
    pub fn new(data: impl Into<bytes::Bytes>) -> Bytes {
        Bytes(data.into())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
    /// The shared buffer (no copy).
    pub fn shared(&self) -> &bytes::Bytes {
        &self.0
    }
    /// A part of these bytes, sharing the buffer (no copy).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Bytes {
        Bytes(self.0.slice(range))
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Bytes {
        Bytes(v.into())
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Bytes {
        Bytes(bytes::Bytes::copy_from_slice(v))
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} B)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let v: serde_bytes::ByteBuf = serde_bytes::ByteBuf::deserialize(d)?;
        Ok(Bytes(v.into_vec().into()))
    }
}

/// One client request. `seq` numbers the client's requests; `ack_below` says the client
/// has received every reply for seqs below it, so the replicas may drop those replies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub client: ClientId,
    pub seq: u64,
    pub ack_below: u64,
    pub payload: Bytes,
}

impl Command {
    /// Bytes this command counts against batch and queue limits.
    pub fn cost_bytes(&self) -> usize {
        self.payload.len() + 40
    }
}

/// The leader's stamp on a batch: the only time and randomness the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub time_ms: u64,
    pub entropy: u64,
}

/// The commands decided in one slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub stamp: Stamp,
    pub commands: Vec<Command>,
}

impl Batch {
    pub fn cost_bytes(&self) -> usize {
        16 + self.commands.iter().map(Command::cost_bytes).sum::<usize>()
    }
}

/// A member being copied into the group. It does not vote until promoted; `replaces`
/// names the voter it takes over from when promoted (a replace), if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learner {
    pub host: HostId,
    pub replaces: Option<HostId>,
}

/// A configuration: who votes and who is catching up, valid for one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Membership {
    pub epoch: Epoch,
    pub voters: Vec<HostId>,
    pub learners: Vec<Learner>,
}

impl Membership {
    pub fn is_voter(&self, h: HostId) -> bool {
        self.voters.contains(&h)
    }
    pub fn is_learner(&self, h: HostId) -> bool {
        self.learners.iter().any(|l| l.host == h)
    }
    pub fn is_member(&self, h: HostId) -> bool {
        self.is_voter(h) || self.is_learner(h)
    }
    /// Votes needed for a decision in this configuration.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }
    /// Every host that should receive the leader's traffic (voters and learners).
    pub fn all_hosts(&self) -> impl Iterator<Item = HostId> + '_ {
        self.voters
            .iter()
            .copied()
            .chain(self.learners.iter().map(|l| l.host))
    }
    pub fn voter_index(&self, h: HostId) -> Option<usize> {
        self.voters.iter().position(|&v| v == h)
    }
}

/// A value decided in one slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// Fills a slot that no earlier leader is known to have used.
    Noop,
    /// Client commands with the leader's stamp.
    Batch(Arc<Batch>),
    /// A stop-sign: ends the current epoch at this slot; the next slot belongs to the
    /// epoch (and membership) carried here.
    Reconfigure(Arc<Membership>),
}

impl Value {
    pub fn cost_bytes(&self) -> usize {
        match self {
            Value::Noop => 8,
            Value::Batch(b) => b.cost_bytes(),
            Value::Reconfigure(m) => 16 + 16 * (m.voters.len() + m.learners.len()),
        }
    }
    pub fn is_stop(&self) -> bool {
        matches!(self, Value::Reconfigure(_))
    }
}

/// A membership change requested by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Copy `add` in as a learner, then make it a voter in place of `remove`.
    Replace { remove: HostId, add: HostId },
    /// Copy `host` in as a learner, then make it a voter.
    Add(HostId),
    /// Stop counting `host` (takes effect with the next epoch).
    Remove(HostId),
}
