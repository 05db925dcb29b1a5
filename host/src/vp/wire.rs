//! What hosts say to each other about virtual peers (inside `Wire::Vp`).
//! Consensus messages travel separately, as `Wire::Paxos`.

use serde::{Deserialize, Serialize};
use vp_consensus::{ClientId, HostId, Membership};
use vp_guest_sdk::abi::{VpId, WireResult};

use super::VpConfig;
use crate::node::overlay::PeerContact;
use crate::sandbox::ModuleHash;

/// Bytes of module sent per chunk.
pub const MODULE_CHUNK_BYTES: usize = 1 << 20;

/// A request for a virtual peer: from a client host (`vp-host send`), or from
/// another virtual peer's leader (an outbound send or call).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub vp: VpId,
    pub client: ClientId,
    pub seq: u64,
    pub ack_below: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Answer through the read path (no log entry).
    pub read: bool,
    /// Destroy the virtual peer (`vp-host destroy`; `payload` unused): decided
    /// through the log like a message, so every member applies it at the
    /// same point.
    #[serde(default)]
    pub destroy: bool,
    /// Where to send the reply.
    pub reply_to: PeerContact,
}

/// The answer to a request, from the virtual peer's leader.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub vp: VpId,
    pub client: ClientId,
    pub seq: u64,
    pub result: WireResult,
    pub leader: HostId,
}

/// Become a member of a virtual peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deploy {
    pub op: u64,
    pub config: VpConfig,
    /// The founding membership (spawn), or none: join as a learner and wait
    /// for the leader's snapshot (replacement).
    pub founding: Option<Membership>,
    /// Who has the module, for `FetchModule`.
    pub module_from: PeerContact,
    /// How to reach the other members.
    pub members: Vec<(HostId, PeerContact)>,
}

/// Messages about virtual peers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum VpWire {
    /// Who leads `vp`? Multicast over the virtual peer's key prefix.
    Locate {
        vp: VpId,
        nonce: u64,
        reply_to: PeerContact,
    },
    /// A member's answer to `Locate`, with the voters it knows of: the
    /// asker keeps them and asks them directly next time (a failover's first
    /// locate then does not depend on the overlay's route).
    Located {
        vp: VpId,
        nonce: u64,
        member: HostId,
        leader: Option<(HostId, PeerContact)>,
        voters: Vec<(HostId, PeerContact)>,
    },
    Request(Request),
    Reply(Reply),
    /// Not the leader: retry at `leader` (if known).
    Redirect {
        vp: VpId,
        client: ClientId,
        seq: u64,
        leader: Option<(HostId, PeerContact)>,
    },
    Deploy(Deploy),
    DeployAck {
        op: u64,
        vp: VpId,
        result: Result<(), String>,
    },
    /// Forget a virtual peer this host was deployed to (a spawn that failed elsewhere).
    Undeploy {
        vp: VpId,
    },
    /// `vp` was destroyed (`vp-host destroy`); this host's member left. The
    /// answer to a request, locate or consensus message for it: a client's
    /// host stops retrying, and a member that was down when the virtual peer
    /// was destroyed leaves too.
    Destroyed {
        vp: VpId,
        /// What it answers: a `Locate`'s nonce, or a `Request`'s client id;
        /// 0 for consensus traffic to a former member (whose member checks
        /// that the sender is a voter). A host that runs no member of `vp`
        /// believes the notice only if it answers a locate or request it has
        /// in flight: a stranger knows neither.
        #[serde(default)]
        answers: u128,
    },
    FetchModule {
        hash: ModuleHash,
        offset: u64,
    },
    ModuleChunk {
        hash: ModuleHash,
        offset: u64,
        total: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    ModuleMissing {
        hash: ModuleHash,
    },
    /// How loaded are you, and do you take a member whose guest may grow to
    /// `memory_bytes`? (placement)
    LoadQuery {
        op: u64,
        memory_bytes: u64,
    },
    Load {
        op: u64,
        memberships: u32,
        /// Whether it takes that member (`vp-host join --memberships-max`,
        /// `--guest-memory-max`).
        room: bool,
        /// The sender's overlay neighbours (levels 0 and 1, at most
        /// `LOAD_NEIGHBOURS_MAX`): a sample that has found fewer hosts than
        /// it draws asks them too, so in a small network every host is found.
        #[serde(default)]
        neighbours: Vec<(HostId, PeerContact)>,
    },
    /// The sender's host is leaving (`vp-host drain`): to `vp`'s leader,
    /// which replaces it while it still votes. Asked again every second.
    Drain {
        vp: VpId,
    },
    /// The status of `vp`, asked of its leader by a host that is not a member.
    StatusQuery {
        vp: VpId,
        op: u64,
        /// Also the guest's log lines after this cursor (`vp-host logs`).
        log_after: Option<super::LogCursor>,
    },
    StatusReply {
        op: u64,
        status: Result<Box<super::VpStatus>, String>,
    },
}
