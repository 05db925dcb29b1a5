//! Seed inputs: real encodings, made by the current encoders. Conversations
//! are recorded from small in-process networks whose host under test is the
//! very fixture the target feeds, so a recorded seed drives it through real
//! protocol states (joins, elections, catch-up, snapshot transfer).
//!
//! `tests/fuzz_replay.rs` runs these next to the committed corpus, and writes
//! them to `host/fuzz/corpus/<target>/seed-*` on request.

use std::collections::VecDeque;
use std::sync::Arc;

use vp_alm::{
    AckStatus, Body, Bound, Bytes, Key, KeyRange, MembershipVector, Message as AlmMessage, NodeRef,
    OpId, RejectReason, Side,
};
use vp_consensus::storage::{encode_snapshot_file, frame_record};
use vp_consensus::{
    Ballot, Batch, ClientId, Command, DecidedEntry, Epoch, HostId as CHostId, Learner, Membership,
    Message, ReportedEntry, SessionTable, Slot, SnapshotImage, Stamp, Time as CTime, Value,
};
use vp_guest_sdk::abi::{self, Address, Effect, Envelope, Input, VpId, codec};

use super::fixtures::{
    AlmPeer, CONSENSUS_ME, CONSENSUS_T0, CONSENSUS_TICK_US, ConsensusPeer, FUZZ_GUEST_LIMITS,
    TinyGuest, fuzz_envelope, peer_ref, push_consensus_frame, tiny_guest, tiny_guest_wasm,
};
use crate::net::frame::encode_frame;
use crate::node::Wire;
use crate::node::overlay::{PeerContact, host_key, vp_prefix};
use crate::sandbox::{GlobalValue, Guest, PAGE_BYTES, encode_state};

/// Named seed inputs for the target called `target` (none for an unknown name).
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "wire" => wire_seeds(),
        "consensus_message" => consensus_message_seeds(),
        "consensus_storage" => consensus_storage_seeds(),
        "abi" => abi_seeds(),
        "guest_snapshot" => guest_snapshot_seeds(),
        "guest_module" => guest_module_seeds(),
        "local_input" => local_input_seeds(),
        _ => Vec::new(),
    }
}

fn named(name: impl Into<String>, bytes: Vec<u8>) -> (String, Vec<u8>) {
    (name.into(), bytes)
}

// ----- wire --------------------------------------------------------------------------

fn frame(msg: AlmMessage<PeerContact>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&Wire::Alm(msg), &mut out).expect("seed frames encode");
    out
}

/// Host 0 (the fixture) starts a network; hosts 1 and 2 join through it, then
/// host 1 searches and multicasts, and host 2 leaves. Returns every frame host
/// 0 received, in order, and host 0 at the end.
fn record_overlay(frames_max: usize) -> (Vec<Vec<u8>>, AlmPeer) {
    let mut peers: Vec<AlmPeer> = (0..3).map(AlmPeer::new).collect();
    let index = |host| (0..3u8).find(|&i| peer_ref(i).host == host);
    let mut queue: VecDeque<_> = VecDeque::new();
    for p in &mut peers[1..] {
        queue.extend(p.pump());
    }
    let mut recorded = Vec::new();
    let mut round = 0;
    while recorded.len() < frames_max && round < 400 {
        round += 1;
        if round == 40 {
            let now = peers[1].now;
            let _ = peers[1].host.search(now, host_key(peer_ref(2).host));
            let _ =
                peers[1]
                    .host
                    .multicast(now, KeyRange::prefix(b"h/"), Bytes::copy_from(b"hello"));
        }
        if round == 80 {
            let now = peers[2].now;
            let _ = peers[2].host.remove_key(now, &host_key(peer_ref(2).host));
        }
        let Some(t) = queue.pop_front() else {
            // Quiet: let timers run (pings, stabilisation).
            for p in &mut peers[1..] {
                p.now = p.now.plus_micros(super::fixtures::ALM_STEP_US);
                queue.extend(p.pump());
            }
            continue;
        };
        let Some(i) = index(t.to.host) else { continue };
        if i == 0 {
            let bytes = frame(t.msg);
            let wire: Wire =
                crate::net::frame::decode_frame_body(&bytes[4..]).expect("seed frames decode");
            recorded.push(bytes);
            queue.extend(peers[0].deliver(wire));
        } else {
            queue.extend(peers[usize::from(i)].deliver(Wire::Alm(t.msg)));
        }
    }
    (recorded, peers.swap_remove(0))
}

/// One message of every kind from host 1 to host 0's key.
fn overlay_bodies() -> Vec<(&'static str, Body<PeerContact>)> {
    let me = peer_ref(0);
    let b = peer_ref(1);
    let to = host_key(me.host);
    let node = NodeRef {
        key: host_key(b.host),
        mv: MembershipVector(0x0123_4567_89ab_cdef),
        host: b.host,
        contact: b.contact.clone(),
    };
    let op = OpId {
        origin: b.host,
        seq: 1,
    };
    vec![
        ("ping", Body::Ping { nonce: 1 }),
        ("pong", Body::Pong { nonce: 1 }),
        (
            "search",
            Body::Search {
                op,
                attempt: 0,
                target: Key::new(&b"h/ff"[..]),
                origin: b.clone(),
                to: Some(to.clone()),
                hops: 1,
                fwd: 3,
            },
        ),
        ("search_ack", Body::SearchAck { fwd: 1 }),
        (
            "search_reply",
            Body::SearchReply {
                op: OpId {
                    origin: me.host,
                    seq: 1,
                },
                attempt: 0,
                found: node.clone(),
                exact: false,
                next: Some(node.clone()),
                hops: 2,
            },
        ),
        (
            "link_request",
            Body::LinkRequest {
                req: 1,
                to: to.clone(),
                level: 0,
                node: node.clone(),
            },
        ),
        (
            "walk",
            Body::Walk {
                req: 2,
                to: to.clone(),
                level: 0,
                side: Side::Right,
                node: node.clone(),
                hops: 0,
            },
        ),
        (
            "link_accept",
            Body::LinkAccept {
                req: 1,
                to: to.clone(),
                level: 0,
                by: node.clone(),
                old: None,
            },
        ),
        (
            "link_redirect",
            Body::LinkRedirect {
                req: 1,
                to: to.clone(),
                level: 1,
                by: node.clone(),
                next: node.clone(),
            },
        ),
        (
            "link_reject",
            Body::LinkReject {
                req: 1,
                to: to.clone(),
                key: host_key(b.host),
                reason: RejectReason::NotReady,
            },
        ),
        (
            "walk_end",
            Body::WalkEnd {
                req: 2,
                to: to.clone(),
            },
        ),
        (
            "beyond",
            Body::Beyond {
                req: 3,
                to: to.clone(),
                side: Side::Left,
                node: node.clone(),
            },
        ),
        (
            "hint",
            Body::Hint {
                to: to.clone(),
                level: 0,
                node: node.clone(),
            },
        ),
        (
            "leave",
            Body::Leave {
                to: to.clone(),
                level: 0,
                leaving: host_key(b.host),
                replacement: Some(node.clone()),
            },
        ),
        (
            "multicast",
            Body::Multicast {
                fwd: 4,
                to: to.clone(),
                op,
                origin: b.clone(),
                range: KeyRange {
                    lo: Bound::Included(Key::new(vp_prefix(VpId(1)))),
                    hi: Bound::Unbounded,
                },
                payload: Bytes::copy_from(b"payload"),
                hops: 0,
            },
        ),
        (
            "multicast_ack",
            Body::MulticastAck {
                fwd: 1,
                status: AckStatus::Taken,
            },
        ),
        ("multicast_empty", Body::MulticastEmpty { op }),
        ("gone", Body::Gone { key: to }),
    ]
}

fn wire_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let (recorded, _) = record_overlay(96);
    out.push(named("join-conversation", recorded.concat()));
    out.push(named(
        "join-first-frames",
        recorded.iter().take(6).flatten().copied().collect(),
    ));
    let from = peer_ref(1);
    for (kind, body) in overlay_bodies() {
        out.push(named(
            format!("body-{kind}"),
            frame(AlmMessage {
                from: from.clone(),
                body,
            }),
        ));
    }
    for (kind, wire) in vp_frames() {
        let mut bytes = Vec::new();
        encode_frame(&wire, &mut bytes).expect("seed frames encode");
        out.push(named(format!("vp-{kind}"), bytes));
    }
    out
}

/// One frame of each virtual-peer message kind, and consensus messages as
/// members send them to each other.
fn vp_frames() -> Vec<(&'static str, Wire)> {
    use crate::sandbox::{GuestLimits, ModuleHash};
    use crate::vp::VpConfig;
    use crate::vp::wire::{Deploy, Reply, Request, VpWire};
    let vp = VpId(0x5eed);
    let contact = peer_ref(1).contact;
    let hash = ModuleHash([7; 32]);
    let config = VpConfig {
        vp,
        name: Some("counter".into()),
        module: hash,
        module_bytes: 4096,
        limits: GuestLimits::default(),
        members: 3,
        timing: VpConfig::default_timing(),
        replace_after_ms: 500,
        checkpoint_every_slots: 1024,
    };
    let client = ClientId(42);
    let mut out = vec![
        (
            "locate",
            VpWire::Locate {
                vp,
                nonce: 1,
                reply_to: contact.clone(),
            },
        ),
        (
            "located",
            VpWire::Located {
                vp,
                nonce: 1,
                member: CHostId(2),
                leader: Some((CHostId(1), contact.clone())),
                voters: vec![(CHostId(1), contact.clone())],
            },
        ),
        (
            "request",
            VpWire::Request(Request {
                vp,
                client,
                seq: 1,
                ack_below: 1,
                payload: br#"{"add":1}"#.to_vec(),
                read: false,
                destroy: false,
                reply_to: contact.clone(),
            }),
        ),
        (
            "reply",
            VpWire::Reply(Reply {
                vp,
                client,
                seq: 1,
                result: Ok(serde_bytes::ByteBuf::from(vec![1])),
                leader: CHostId(1),
            }),
        ),
        (
            "redirect",
            VpWire::Redirect {
                vp,
                client,
                seq: 1,
                leader: None,
            },
        ),
        (
            "deploy",
            VpWire::Deploy(Deploy {
                op: 3,
                config,
                founding: Some(super::fixtures::consensus_membership()),
                module_from: contact.clone(),
                members: vec![(CHostId(2), contact.clone())],
            }),
        ),
        (
            "deploy-ack",
            VpWire::DeployAck {
                op: 3,
                vp,
                result: Err("no".into()),
            },
        ),
        ("undeploy", VpWire::Undeploy { vp }),
        (
            "destroyed",
            VpWire::Destroyed {
                vp,
                answers: 0x5eed,
            },
        ),
        ("fetch-module", VpWire::FetchModule { hash, offset: 0 }),
        (
            "module-chunk",
            VpWire::ModuleChunk {
                hash,
                offset: 0,
                total: 3,
                bytes: vec![0, 97, 115],
            },
        ),
        ("module-missing", VpWire::ModuleMissing { hash }),
        (
            "load-query",
            VpWire::LoadQuery {
                op: 4,
                memory_bytes: 256 << 20,
            },
        ),
        (
            "load",
            VpWire::Load {
                op: 4,
                memberships: 2,
                room: true,
                neighbours: vec![(CHostId(1), contact.clone())],
            },
        ),
        ("drain", VpWire::Drain { vp }),
        (
            "status-query",
            VpWire::StatusQuery {
                vp,
                op: 5,
                log_after: None,
            },
        ),
        (
            "logs-query",
            VpWire::StatusQuery {
                vp,
                op: 6,
                log_after: Some((17, 2)),
            },
        ),
        (
            "status-reply",
            VpWire::StatusReply {
                op: 5,
                status: Err("not a member".into()),
            },
        ),
    ]
    .into_iter()
    .map(|(k, m)| (k, Wire::Vp(m)))
    .collect::<Vec<_>>();
    for (kind, msg) in consensus_kinds() {
        out.push((kind, Wire::Paxos { vp, msg }));
    }
    out
}

// ----- consensus ---------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Scenario {
    /// Replica 1 runs for election at once and leads.
    OneLeads,
    /// Replica 2 leads; replica 1 follows.
    TwoLeads,
    /// Replica 2 leads while replica 1 is cut off; when it returns, the log it
    /// missed is compacted away, so it gets a snapshot.
    OneLagsBehind,
}

struct Recording {
    /// The consensus_message input.
    input: Vec<u8>,
    /// The peers at the end (1, 2, 3).
    peers: Vec<ConsensusPeer>,
}

fn encode_consensus(msg: &Message, cbor: bool) -> Vec<u8> {
    if cbor {
        abi::encode(msg).expect("seed messages encode")
    } else {
        msg.encode()
    }
}

fn record_consensus(scenario: Scenario, cbor: bool, rounds: u32) -> Recording {
    let mut peers: Vec<ConsensusPeer> = (1..=3).map(|i| ConsensusPeer::new(CHostId(i))).collect();
    let campaign_one = matches!(scenario, Scenario::OneLeads);
    let mut input = vec![u8::from(cbor) | if campaign_one { 2 } else { 0 }];
    let mut queue: Vec<(CHostId, CHostId, Message)> = Vec::new();
    let leader = if campaign_one { 0 } else { 1 };
    let sent = peers[leader].campaign();
    queue.extend(
        sent.into_iter()
            .map(|(to, m)| (CHostId(leader as u64 + 1), to, m)),
    );
    let cut_off_until = match scenario {
        Scenario::OneLagsBehind => rounds / 2,
        _ => 0,
    };
    let mut now = CONSENSUS_T0;
    let mut one_at = CONSENSUS_T0;
    for round in 0..rounds {
        now = now.plus_us(CONSENSUS_TICK_US);
        let cut = round < cut_off_until;
        let mut next = Vec::new();
        let mut one_heard = false;
        for (from, to, msg) in std::mem::take(&mut queue) {
            if cut && (from == CONSENSUS_ME || to == CONSENSUS_ME) {
                continue;
            }
            let i = (to.0 - 1) as usize;
            if to == CONSENSUS_ME {
                let dt = ((now.0 - one_at.0) / CONSENSUS_TICK_US) as u8;
                one_at = CTime(one_at.0 + u64::from(dt) * CONSENSUS_TICK_US);
                let body = encode_consensus(&msg, cbor);
                push_consensus_frame(&mut input, from.0 as u8, dt, &body);
                one_heard = true;
            }
            let sent = peers[i].input(if to == CONSENSUS_ME { one_at } else { now }, from, msg);
            next.extend(sent.into_iter().map(|(t, m)| (to, t, m)));
        }
        for (i, p) in peers.iter_mut().enumerate() {
            let id = CHostId(i as u64 + 1);
            if id == CONSENSUS_ME {
                if cut || one_heard || round % 5 != 0 {
                    continue;
                }
                // An empty frame: nothing decodes, the replica's clock advances.
                let dt = ((now.0 - one_at.0) / CONSENSUS_TICK_US) as u8;
                one_at = CTime(one_at.0 + u64::from(dt) * CONSENSUS_TICK_US);
                push_consensus_frame(&mut input, 0, dt, &[]);
                next.extend(p.tick(one_at).into_iter().map(|(t, m)| (id, t, m)));
            } else {
                next.extend(p.tick(now).into_iter().map(|(t, m)| (id, t, m)));
            }
        }
        queue = next;
    }
    Recording { input, peers }
}

/// One message of every kind from replica 2.
fn consensus_kinds() -> Vec<(&'static str, Message)> {
    let ballot = Ballot {
        epoch: Epoch(1),
        round: 1,
        leader: CHostId(2),
    };
    let batch = Value::Batch(Arc::new(Batch {
        stamp: Stamp {
            time_ms: 1_700_000_000_000,
            entropy: 7,
        },
        commands: vec![Command {
            client: ClientId(5),
            seq: 0,
            ack_below: 0,
            payload: vec![1, 2, 3].into(),
        }],
    }));
    let reconfigure = Value::Reconfigure(Arc::new(Membership {
        epoch: Epoch(2),
        voters: vec![CHostId(1), CHostId(2), CHostId(4)],
        learners: vec![Learner {
            host: CHostId(5),
            replaces: Some(CHostId(3)),
        }],
    }));
    let image = SnapshotImage {
        slot: Slot(3),
        membership: super::fixtures::consensus_membership(),
        epoch_start: Slot(1),
        sessions: SessionTable::default(),
        time_ms: 5,
        app_digest: xxhash_rust::xxh3::xxh3_64(b"state"),
        app_state: b"state".to_vec().into(),
    }
    .encode();
    vec![
        (
            "prepare",
            Message::Prepare {
                ballot,
                from: Slot(1),
            },
        ),
        (
            "promise",
            Message::Promise {
                ballot,
                from: Slot(1),
                log_start: Slot(1),
                entries: vec![ReportedEntry {
                    slot: Slot(1),
                    ballot,
                    value: batch.clone(),
                    decided: true,
                }],
                next: Some(Slot(2)),
            },
        ),
        (
            "accept",
            Message::Accept {
                ballot,
                slot: Slot(1),
                value: batch.clone(),
                decided_below: Slot(1),
            },
        ),
        (
            "accept-reconfigure",
            Message::Accept {
                ballot,
                slot: Slot(2),
                value: reconfigure,
                decided_below: Slot(2),
            },
        ),
        (
            "accepted",
            Message::Accepted {
                ballot,
                slot: Slot(1),
            },
        ),
        (
            "heartbeat",
            Message::Heartbeat {
                ballot,
                decided_below: Slot(2),
                round: 1,
            },
        ),
        (
            "heartbeat_ack",
            Message::HeartbeatAck {
                ballot,
                round: 1,
                decided_below: Slot(1),
            },
        ),
        (
            "nack",
            Message::Nack {
                ballot,
                promised: ballot,
            },
        ),
        (
            "catchup_request",
            Message::CatchUpRequest {
                from: Slot(1),
                epoch: Epoch(1),
            },
        ),
        (
            "catchup",
            Message::CatchUp {
                entries: vec![
                    DecidedEntry {
                        slot: Slot(1),
                        value: batch,
                    },
                    DecidedEntry {
                        slot: Slot(2),
                        value: Value::Noop,
                    },
                ],
                decided_below: Slot(3),
            },
        ),
        (
            "snapshot_chunk",
            Message::SnapshotChunk {
                slot: Slot(3),
                digest: xxhash_rust::xxh3::xxh3_64(&image),
                total_bytes: image.len() as u64,
                offset: 0,
                data: image.into(),
            },
        ),
        (
            "snapshot_ack",
            Message::SnapshotAck {
                slot: Slot(3),
                digest: 1,
                offset: 0,
            },
        ),
    ]
}

fn consensus_message_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for cbor in [false, true] {
        let codec = if cbor { "cbor" } else { "postcard" };
        for (name, scenario) in [
            ("one-leads", Scenario::OneLeads),
            ("two-leads", Scenario::TwoLeads),
            ("one-lags-behind", Scenario::OneLagsBehind),
        ] {
            let rec = record_consensus(scenario, cbor, 60);
            out.push(named(format!("{name}-{codec}"), rec.input));
        }
        for (kind, msg) in consensus_kinds() {
            let mut input = vec![u8::from(cbor)];
            push_consensus_frame(&mut input, 2, 1, &encode_consensus(&msg, cbor));
            out.push(named(format!("kind-{kind}-{codec}"), input));
        }
    }
    out
}

/// `[flags][log_len][log][snapshot]` from a peer's store.
fn storage_input(flags: u8, peer: &ConsensusPeer, cut: usize, bare_image: bool) -> Vec<u8> {
    let store = peer.store();
    let mut log = Vec::new();
    for r in &store.records {
        frame_record(r, &mut log).expect("seed records frame");
    }
    log.truncate(log.len().saturating_sub(cut));
    let snapshot = match &store.snapshot {
        Some(image) if bare_image => image.to_vec(),
        Some(image) => encode_snapshot_file(image),
        None => Vec::new(),
    };
    let mut out = vec![flags];
    out.extend_from_slice(&(log.len() as u32).to_le_bytes());
    out.extend_from_slice(&log);
    out.extend_from_slice(&snapshot);
    out
}

fn consensus_storage_seeds() -> Vec<(String, Vec<u8>)> {
    let lead = record_consensus(Scenario::OneLeads, false, 60);
    let follow = record_consensus(Scenario::TwoLeads, false, 60);
    let lag = record_consensus(Scenario::OneLagsBehind, false, 60);
    vec![
        named("leader", storage_input(0, &lead.peers[0], 0, false)),
        named(
            "leader-torn-tail",
            storage_input(0, &lead.peers[0], 5, false),
        ),
        named(
            "leader-fix-crcs",
            storage_input(1, &lead.peers[0], 0, false),
        ),
        named("follower", storage_input(0, &follow.peers[0], 0, false)),
        named(
            "follower-bare-image",
            storage_input(6, &follow.peers[0], 0, true),
        ),
        named("lagging", storage_input(0, &lag.peers[0], 0, false)),
        named("other-leader", storage_input(0, &lag.peers[1], 0, false)),
        named(
            "other-leader-bare-image",
            storage_input(7, &lag.peers[1], 0, true),
        ),
    ]
}

// ----- abi ---------------------------------------------------------------------------

fn abi_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let envelopes = [
        Envelope(
            1_700_000_000_000,
            42,
            Input::Request(Address::Client(7), 3, vec![0xf6].into()),
        ),
        Envelope(
            u64::MAX,
            0,
            Input::Request(Address::Client(u128::MAX), u64::MAX, vec![7; 40].into()),
        ),
        Envelope(
            1,
            2,
            Input::Request(Address::Vp(VpId(9)), 24, Vec::new().into()),
        ),
        Envelope(
            3,
            4,
            Input::CallReply(5, Ok(vec![0xa1, 0x61, b'a', 1].into())),
        ),
        Envelope(3, 4, Input::CallReply(6, Err("no such key".into()))),
    ];
    for (i, env) in envelopes.iter().enumerate() {
        let mut bytes = Vec::new();
        codec::encode_envelope(env, &mut bytes);
        out.push(named(format!("envelope-{i}"), bytes));
    }
    let effects = vec![
        Effect::Reply(Address::Client(1 << 100), 3, Ok(vec![1, 2, 3].into())),
        Effect::Reply(Address::Vp(VpId(9)), u64::MAX, Err("no".into())),
        Effect::Send(VpId(u64::MAX), 1, vec![0; 30].into()),
        Effect::Call(VpId(0), 24, vec![].into()),
    ];
    let mut bytes = Vec::new();
    codec::encode_effects(&effects, &mut bytes);
    out.push(named("effects", bytes));
    let mut bytes = Vec::new();
    codec::encode_effects(&[], &mut bytes);
    out.push(named("effects-none", bytes));
    for (name, result) in [
        ("result-ok", Ok(vec![0xf5].into())),
        ("result-err", Err("bad request".to_string())),
    ] {
        let mut bytes = Vec::new();
        codec::encode_result(&result, &mut bytes);
        out.push(named(name, bytes));
    }
    let json = serde_json::json!({"put": {"key": "a", "value": [1, "x", null, 2.5, -3, true]}});
    out.push(named("json", abi::encode(&json).expect("JSON encodes")));
    out
}

// ----- guests ------------------------------------------------------------------------

fn guest_snapshot_seeds() -> Vec<(String, Vec<u8>)> {
    let (sandbox, module) = tiny_guest();
    let mut guest = Guest::start(sandbox, module.clone(), FUZZ_GUEST_LIMITS).expect("tiny guest");
    let mut out = Vec::new();
    for handled in 0..3u64 {
        if handled > 0 {
            guest
                .handle(&fuzz_envelope(handled))
                .expect("tiny guest handles");
        }
        if handled == 1 {
            continue;
        }
        let mut bytes = Vec::new();
        guest.encode_snapshot_into(&mut bytes);
        // Flag 0 for the first (checksum as stored), 1 (checksum fixed) after.
        let flags = u8::from(handled > 0);
        let mut input = vec![flags];
        input.extend_from_slice(&bytes);
        out.push(named(format!("tiny-after-{handled}-flags-{flags}"), input));
    }
    // Two pages, the second one stored; the globals of the tiny guest.
    let mut memory = vec![0u8; 2 * PAGE_BYTES];
    memory[PAGE_BYTES + 3] = 1;
    memory[17] = 2;
    let globals = [
        GlobalValue::I32(60_000),
        GlobalValue::I64(5),
        GlobalValue::F64(1.5f64.to_bits()),
    ];
    let mut bytes = vec![1];
    let mut snap = Vec::new();
    encode_state(
        module.hash(),
        abi::ABI_VERSION,
        &memory,
        &globals,
        &mut snap,
    );
    bytes.extend_from_slice(&snap);
    out.push(named("two-pages", bytes));
    // Every global type (memory all zero: no page stored).
    let mut snap = Vec::new();
    encode_state(
        module.hash(),
        abi::ABI_VERSION,
        &[0; PAGE_BYTES],
        &[
            GlobalValue::I32(-1),
            GlobalValue::I64(i64::MIN),
            GlobalValue::F32(0x7fc0_0000),
            GlobalValue::F64(0),
            GlobalValue::V128(u128::MAX),
        ],
        &mut snap,
    );
    let mut bytes = vec![1];
    bytes.extend_from_slice(&snap);
    out.push(named("all-global-kinds", bytes));
    out
}

fn guest_module_seeds() -> Vec<(String, Vec<u8>)> {
    [
        ("tiny", TinyGuest::default()),
        (
            "tiny-query-names",
            TinyGuest {
                query: true,
                names: true,
                ..TinyGuest::default()
            },
        ),
        (
            "tiny-grows",
            TinyGuest {
                grow_pages: 1,
                ..TinyGuest::default()
            },
        ),
        (
            "tiny-start-logs",
            TinyGuest {
                start_logs: true,
                ..TinyGuest::default()
            },
        ),
    ]
    .into_iter()
    .map(|(name, opts)| named(name, tiny_guest_wasm(opts)))
    .collect()
}

// ----- local input -------------------------------------------------------------------

fn local_input_seeds() -> Vec<(String, Vec<u8>)> {
    let with = |kind: u8, bytes: &[u8]| {
        let mut v = vec![kind];
        v.extend_from_slice(bytes);
        v
    };
    let lines = concat!(
        "{\"add\": 2}\n",
        "\"get\"\n",
        "\n",
        "  \r\n",
        "{\"$reply\": {\"call\": 1, \"ok\": {\"n\": [1, 2.5, null]}}}\n",
        "{\"$reply\": {\"call\": 2, \"error\": \"no\"}}\r\n",
        "not json\n",
        "[1, \"x\", true]"
    );
    let identity = libp2p::identity::Keypair::ed25519_from_bytes([7; 32])
        .expect("32 bytes")
        .to_protobuf_encoding()
        .expect("an ed25519 key encodes");
    let psk = libp2p::pnet::PreSharedKey::new([0x5a; 32]).to_string();
    vec![
        named("exec-lines", with(0, lines.as_bytes())),
        named("exec-lines-tagged", with(4, lines.as_bytes())),
        named("identity", with(1, &identity)),
        named("network-key", with(2, psk.as_bytes())),
        named(
            "api-key",
            with(3, br#"{"key": "v/0000000000000001/00000000000000ff"}"#),
        ),
        named(
            "api-multicast-prefix",
            with(3, br#"{"prefix": "h/", "payload": "hello"}"#),
        ),
        named(
            "api-multicast-range",
            with(3, br#"{"lo": "a", "hi": "z", "payload": ""}"#),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::decode_frame_body;
    use crate::sandbox::{GuestError, LoadError};

    fn wire_kinds(stream: &[u8]) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        let mut rest = stream;
        while rest.len() >= 4 {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let wire: Wire = decode_frame_body(&rest[4..4 + len]).expect("seed frame decodes");
            let kind = match wire {
                Wire::Alm(msg) => msg.body.kind(),
                Wire::Paxos { .. } => "paxos",
                Wire::Vp(_) => "vp",
            };
            kinds.push(kind);
            rest = &rest[4 + len..];
        }
        kinds
    }

    fn consensus_kinds_in(input: &[u8]) -> Vec<(u8, &'static str)> {
        let cbor = input[0] & 1 != 0;
        let mut rest = &input[1..];
        let mut kinds = Vec::new();
        while let Some((from, _, body, tail)) = super::super::fixtures::split_consensus_frame(rest)
        {
            rest = tail;
            if body.is_empty() {
                continue;
            }
            let msg: Message = if cbor {
                abi::decode(body).unwrap()
            } else {
                Message::decode(body, &vp_consensus::Limits::default()).unwrap()
            };
            kinds.push((from, msg.kind()));
        }
        kinds
    }

    #[test]
    fn the_overlay_seed_is_a_real_conversation_and_replays_exactly() {
        let (recorded, host0) = record_overlay(96);
        let kinds = wire_kinds(&recorded.concat());
        for kind in [
            "search",
            "link_request",
            "walk",
            "multicast",
            "leave",
            "ping",
        ] {
            assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
        }
        // The target's host goes through the same states as the recorded one.
        let replayed = super::super::wire_stream(&recorded.concat());
        assert_eq!(
            format!("{:?}", replayed.host.stats()),
            format!("{:?}", host0.host.stats())
        );
        let me = host_key(peer_ref(0).host);
        let levels = |p: &AlmPeer| format!("{:?}", p.host.node(&me).map(|v| v.levels.to_vec()));
        assert_eq!(levels(&replayed), levels(&host0));
        assert!(replayed.host.stats().sends > 10);
    }

    #[test]
    fn the_consensus_seeds_replay_into_the_recorded_states() {
        for (scenario, kinds) in [
            (
                Scenario::OneLeads,
                &["promise", "accepted", "heartbeat_ack"][..],
            ),
            (Scenario::TwoLeads, &["prepare", "accept", "heartbeat"][..]),
            (Scenario::OneLagsBehind, &["accept", "snapshot_chunk"][..]),
        ] {
            for cbor in [false, true] {
                let rec = record_consensus(scenario, cbor, 60);
                let seen: Vec<&str> = consensus_kinds_in(&rec.input).iter().map(|k| k.1).collect();
                for kind in kinds {
                    assert!(seen.contains(kind), "no {kind} in {seen:?}");
                }
                let replayed = super::super::consensus_message_peer(&rec.input).unwrap();
                assert_eq!(replayed.replica.status(), rec.peers[0].replica.status());
                assert!(replayed.replica.decided_below() > Slot(10));
            }
        }
    }

    #[test]
    fn the_storage_seeds_recover() {
        for (name, input) in consensus_storage_seeds() {
            let log_len = u32::from_le_bytes(input[1..5].try_into().unwrap()) as usize;
            let (records, _) = vp_consensus::storage::parse_log(&input[5..5 + log_len]);
            assert!(!records.is_empty(), "{name}: no records");
        }
    }

    #[test]
    fn the_guest_seeds_load_and_restore() {
        let (sandbox, module) = tiny_guest();
        for (name, input) in guest_snapshot_seeds() {
            if name == "all-global-kinds" {
                continue; // does not fit the tiny guest, on purpose
            }
            Guest::restore_encoded(
                sandbox,
                module.clone(),
                input[1..].to_vec(),
                FUZZ_GUEST_LIMITS,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for (name, wasm) in guest_module_seeds() {
            match sandbox.load(&wasm) {
                Err(LoadError::Start(GuestError::Abi(_))) if name == "tiny-start-logs" => {}
                other => {
                    other.unwrap_or_else(|e| panic!("{name}: {e}"));
                }
            }
        }
    }
}
