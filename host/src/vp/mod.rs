//! Virtual peers: what a member host keeps and runs for each virtual peer it
//! belongs to, and what hosts say to each other about virtual peers.
//!
//! - [`member`]: the member thread (consensus replica + guest + durable log);
//! - [`wire`]: the messages between hosts;
//! - [`modules`]: the content-addressed module store;
//! - [`directory`]: host id to contact, shared by the node and member threads.
//!
//! docs/architecture.md follows one message and one member replacement
//! through these pieces.

pub mod directory;
pub mod guest_log;
pub mod member;
pub mod modules;
pub mod tombstones;
pub mod wire;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vp_consensus::ClientId;
use vp_guest_sdk::abi::{Address, VpId, WireResult};

use crate::sandbox::{GuestLimits, ModuleHash};

/// Client ids with this bit set stand for another virtual peer calling this one.
const VP_CLIENT_TAG: u128 = 1 << 127;
/// Client ids with these bits stand for the replies to this virtual peer's own
/// outbound messages, fed back into its log.
const REPLY_CLIENT_TAG: u128 = 3 << 126;

/// The consensus client id under which virtual peer `vp` calls others.
pub fn vp_client(vp: VpId) -> ClientId {
    ClientId(VP_CLIENT_TAG | u128::from(vp.0))
}

/// The consensus client id under which `vp` logs replies to its outbound messages.
pub fn reply_client(vp: VpId) -> ClientId {
    ClientId(REPLY_CLIENT_TAG | u128::from(vp.0))
}

/// Client ids with these bits stand for this virtual peer's own timers coming
/// due, fed into its log.
const TIMER_CLIENT_TAG: u128 = 1 << 126;
/// The bit the virtual peer's own clients (`reply_client`, `timer_client`)
/// have and no other client has: the session table always admits them.
const OWN_CLIENT_BIT: u128 = 1 << 126;

/// The consensus client id under which `vp` logs its timers coming due.
pub fn timer_client(vp: VpId) -> ClientId {
    ClientId(TIMER_CLIENT_TAG | u128::from(vp.0))
}

/// A fresh random client session id (never one of the tagged forms).
pub fn new_session_id() -> ClientId {
    ClientId(rand::random::<u128>() >> 2)
}

/// Who a client id is, as the guest sees it.
pub fn address_of(client: ClientId) -> Address {
    if client.0 & (3 << 126) == VP_CLIENT_TAG {
        Address::Vp(VpId(client.0 as u64))
    } else {
        Address::Client(client.0)
    }
}

/// The client id of an address, for the session table.
pub fn client_of(address: Address) -> ClientId {
    match address {
        Address::Client(c) => ClientId(c),
        Address::Vp(vp) => vp_client(vp),
    }
}

/// Everything fixed about a virtual peer at spawn; every member holds a copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpConfig {
    pub vp: VpId,
    pub name: Option<String>,
    pub module: ModuleHash,
    pub module_bytes: u64,
    /// The guest's limits: the same on every member, so traps happen alike.
    pub limits: GuestLimits,
    /// Members the virtual peer keeps (voters).
    pub members: usize,
    pub timing: vp_consensus::Timing,
    /// The leader replaces a member it has not heard from for this long.
    pub replace_after_ms: u64,
    /// A member checkpoints (guest snapshot + state) after this many slots.
    pub checkpoint_every_slots: u64,
}

impl VpConfig {
    /// The consensus limits every member uses: frames stay under the network's
    /// frame limit (docs/host.md).
    pub fn consensus_limits() -> vp_consensus::Limits {
        vp_consensus::Limits {
            batch_bytes_max: 1 << 20,
            command_bytes_max: 1 << 20,
            catchup_bytes_max: 1 << 20,
            snapshot_chunk_bytes_max: 1 << 20,
            snapshot_chunks_in_flight_max: 8,
            reply_bytes_max: 1 << 20,
            // One slot in flight unless batches fill (docs/consensus.md,
            // "Batching"): on a loaded machine each slot's syncs and wake-ups
            // cost more than the round it saves.
            partial_batch_window_slots: 1,
            // Timer firings and the answers to the guest's calls are never
            // refused for a full session table (the member deduplicates them
            // against `HostState`).
            own_client_bits: OWN_CLIENT_BIT,
            ..vp_consensus::Limits::default()
        }
    }

    /// Timers for hosts on a LAN or loopback. A leader whose process dies
    /// closes its connections; the survivors then elect a new one 70 ms after
    /// its last word (`Replica::suspect`: lease 30 ms × 3/2, plus one heartbeat
    /// interval of 25 ms). Without that hint (a machine or network failure)
    /// they wait the election timeout, 400 to 600 ms: generous, because a
    /// member thread that checkpoints a large guest is busy for a few hundred
    /// milliseconds on a loaded machine and must not be deposed for it.
    pub fn default_timing() -> vp_consensus::Timing {
        vp_consensus::Timing {
            heartbeat_interval_us: 25_000,
            election_timeout_us: 400_000,
            election_jitter_us: 200_000,
            leader_lease_us: 30_000,
            retry_us: 100_000,
            promote_lag_slots: 64,
            log_retain_slots: 256,
        }
    }
}

/// What the log carries for a virtual peer (the payload of a consensus command).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LogInput {
    /// A request for the guest; the sender is the command's client.
    #[serde(rename = "req")]
    Request(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The answer to this virtual peer's outbound message `id`.
    #[serde(rename = "rep")]
    OutboundReply(u64, WireResult),
    /// Destroy the virtual peer: every member answers later entries with an
    /// error, stops, and deletes its state (`vp-host destroy`).
    #[serde(rename = "destroy")]
    Destroy,
    /// Timer `id`, armed as the `armed`-th `set_timer` of this virtual peer
    /// (`HostState::timers`), is due. A firing for an arming since
    /// cancelled or moved does nothing.
    #[serde(rename = "timer")]
    Timer { id: u64, armed: u64 },
}

/// A message this virtual peer's guest sent and no answer has been logged for
/// yet. Part of the replicated state: a new leader sends them again, and the
/// receiver's session table makes the retries harmless.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbound {
    pub to: VpId,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// A call (the reply resumes the guest) or a one-way send.
    pub call: bool,
}

/// A timer the guest armed and that has not fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmedTimer {
    /// When it is due: ms since the epoch, on the ordered clock.
    pub due_ms: u64,
    /// Which arming this is (`HostState::timers_armed` when it was set): a
    /// firing names it, so one ordered before a cancel or a move is ignored.
    pub armed: u64,
    /// Times in a row its handler trapped (each arms it again, later).
    #[serde(default)]
    pub traps: u32,
}

/// The replicated state the host keeps next to the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    pub outbox: BTreeMap<u64, Outbound>,
    /// The guest's armed timers by id (at most `abi::TIMERS_MAX`).
    #[serde(default)]
    pub timers: BTreeMap<u64, ArmedTimer>,
    /// `set_timer` effects applied so far.
    #[serde(default)]
    pub timers_armed: u64,
    /// The highest sequence number of a timer firing logged so far (the
    /// firings' session in the session table acknowledges all below it).
    #[serde(default)]
    pub timer_fire_seq: u64,
}

/// Layout of the application state handed to consensus checkpoints:
/// `u32 length (LE) || CBOR(HostState) || guest snapshot` (docs/abi.md format).
///
/// The image starts after `room` zero bytes (for the consensus snapshot's
/// head, `Replica::checkpoint_in_place`; 0 for none).
pub fn encode_image(
    room: usize,
    state: &HostState,
    encode_guest: impl FnOnce(&mut Vec<u8>),
) -> Result<Vec<u8>, String> {
    let host = vp_guest_sdk::abi::encode(state)?;
    let mut out = Vec::with_capacity(room + 4 + host.len());
    out.resize(room, 0);
    out.extend_from_slice(&(host.len() as u32).to_le_bytes());
    out.extend_from_slice(&host);
    encode_guest(&mut out);
    Ok(out)
}

/// Split an image into the host state and the byte range of the guest snapshot.
pub fn decode_image(image: &[u8]) -> Result<(HostState, std::ops::Range<usize>), String> {
    let len = image.get(..4).ok_or("image shorter than its header")?;
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let host = image
        .get(4..4 + len)
        .ok_or("image shorter than its host state")?;
    let state = vp_guest_sdk::abi::decode(host)?;
    Ok((state, 4 + len..image.len()))
}

/// A virtual peer as `vp-host status <vp>` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpStatus {
    pub vp: String,
    /// The member host that reported this status.
    pub host: String,
    pub name: Option<String>,
    pub module: String,
    pub role: String,
    pub epoch: u64,
    pub leader: Option<String>,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    pub decided_below: u64,
    pub applied_below: u64,
    pub snapshot_slot: u64,
    pub state_bytes: usize,
    pub state_digest: Option<String>,
    pub outbox: usize,
    /// Timers the guest has armed.
    #[serde(default)]
    pub timers: usize,
    pub guest_handled: u64,
    pub replacing: Option<String>,
    /// Recent durations measured by the reporting member.
    #[serde(default)]
    pub timings: MemberTimings,
    /// Lines the guest logged, oldest first: only when asked for
    /// (`vp-host logs`), at most 200 (`GuestLog::after` says which).
    #[serde(default)]
    pub guest_log: Vec<GuestLogEntry>,
    /// Kept lines before `guest_log` that it leaves out (asked from the start,
    /// it holds the latest 200).
    #[serde(default)]
    pub guest_log_skipped: u64,
    /// Lines after the cursor asked for may be missing from this member's
    /// record (`GuestLog::gap_after`).
    #[serde(default)]
    pub guest_log_gap: bool,
}

/// Where a guest's log line stands: the slot whose messages wrote it, and
/// its number among that slot's lines (from 1). Every member logs the same
/// lines at the same positions, so a reader can move to another member.
pub type LogCursor = (u64, u32);

/// A line a guest logged while handling a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLogEntry {
    pub slot: u64,
    pub n: u32,
    /// The message's ordered time (what `ctx.now_ms()` said), ms since the epoch.
    pub time_ms: u64,
    /// trace, debug, info, warn or error.
    pub level: String,
    pub text: String,
}

impl GuestLogEntry {
    pub fn cursor(&self) -> LogCursor {
        (self.slot, self.n)
    }
}

/// Recent durations of the steps of ordering a message, as one member
/// measured them (each over its last `member::RECENT_SAMPLES`): what tells a
/// slow disk from a slow network or a busy machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberTimings {
    /// One group commit on this member's log: the write, and its fdatasync
    /// when the batch holds a promise or an accept (nearly always).
    pub log_write: Recent,
    /// Leader only: a slot, from its accept handed to the disk and the
    /// network to its coming out decided (a majority has it durably), in order.
    pub commit: Recent,
    /// Leader only: a request, from proposed to answered (ordering, applying).
    pub request: Recent,
    /// A checkpoint: the member thread encoding the guest and handing the
    /// image to consensus. The virtual peer waits on this member meanwhile,
    /// so it grows with the guest's state (tens of ms for 64 MiB).
    #[serde(default)]
    pub checkpoint: Recent,
}

/// A summary of recent durations of one kind (zeros when there were none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recent {
    pub samples: u32,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl VpStatus {
    /// Back at full strength: `n` voters, none of them in `excluded`, a
    /// leader, and no learner still copying state.
    pub fn is_whole(&self, n: usize, excluded: &[String]) -> bool {
        self.voters.len() == n
            && self.learners.is_empty()
            && self.leader.is_some()
            && !self.voters.iter().any(|v| excluded.contains(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_tell_vps_from_clients() {
        let vp = VpId(0xdead_beef);
        assert_eq!(address_of(vp_client(vp)), Address::Vp(vp));
        assert_eq!(client_of(Address::Vp(vp)), vp_client(vp));
        for _ in 0..100 {
            let c = new_session_id();
            assert!(matches!(address_of(c), Address::Client(_)));
            assert_ne!(c, reply_client(vp));
            assert_ne!(c, timer_client(vp));
        }
        assert_ne!(timer_client(vp), reply_client(vp));
        // only the virtual peer's own clients bypass a full session table
        assert_ne!(timer_client(vp).0 & OWN_CLIENT_BIT, 0);
        assert_ne!(reply_client(vp).0 & OWN_CLIENT_BIT, 0);
        assert_eq!(vp_client(vp).0 & OWN_CLIENT_BIT, 0);
        assert_eq!(new_session_id().0 & OWN_CLIENT_BIT, 0);
        assert_ne!(timer_client(vp), vp_client(vp));
        assert!(matches!(address_of(reply_client(vp)), Address::Client(_)));
    }

    #[test]
    fn images_round_trip_and_reject_garbage() {
        let mut state = HostState::default();
        state.outbox.insert(
            3,
            Outbound {
                to: VpId(1),
                payload: vec![1, 2],
                call: true,
            },
        );
        state.timers.insert(
            7,
            ArmedTimer {
                due_ms: 1_700_000_000_000,
                armed: 2,
                traps: 1,
            },
        );
        state.timers_armed = 2;
        state.timer_fire_seq = 1;
        let image = encode_image(0, &state, |out| out.extend_from_slice(b"guest")).unwrap();
        let (back, range) = decode_image(&image).unwrap();
        assert_eq!(back, state);
        assert_eq!(&image[range], b"guest");
        assert!(decode_image(&image[..3]).is_err());
        assert!(decode_image(&[200, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn images_from_before_timers_still_decode() {
        // The host state as written before timers existed: only the outbox.
        #[derive(Serialize)]
        struct Old {
            outbox: BTreeMap<u64, Outbound>,
        }
        let old = vp_guest_sdk::abi::encode(&Old {
            outbox: BTreeMap::new(),
        })
        .unwrap();
        let mut image = (old.len() as u32).to_le_bytes().to_vec();
        image.extend_from_slice(&old);
        let (state, _) = decode_image(&image).unwrap();
        assert_eq!(state, HostState::default());
    }
}
