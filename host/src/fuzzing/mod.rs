//! Fuzzing entry points: one function per decoder of bytes that come from
//! outside the process, shared by the cargo-fuzz targets (`host/fuzz`) and
//! their bounded replay in `cargo test` (`tests/fuzz_replay.rs`). See
//! `docs/fuzzing.md`.
//!
//! Every function takes arbitrary bytes and must return normally. A panic, a
//! hang, or an allocation out of proportion to the input is a bug in the code
//! under test; an `assert!` here states a property of that code (e.g. what
//! decodes also re-encodes) and failing it is a bug too.
//!
//! Each target decodes the bytes the way the host does and then feeds what
//! decoded into the real consumer (the skip-graph host, a Paxos replica, the
//! sandbox), because validation happens there too.

mod fixtures;
mod seeds;

pub use seeds::seeds;

use vp_consensus::storage::{encode_snapshot_file, parse_log, parse_snapshot_file};
use vp_consensus::{
    Bytes as CBytes, HostId as CHostId, Limits, Message, Recovered, Replica, SnapshotImage,
    Time as CTime,
};
use vp_guest_sdk::abi::{self, Effect, Envelope, WireResult, codec};

use crate::net::frame::{decode_frame_body, encode_frame, read_frame};
use crate::node::Wire;
use crate::sandbox::{Guest, PAGE_BYTES, Sandbox, Snapshot, SnapshotView};
use fixtures::{
    AlmPeer, CONSENSUS_ME, CONSENSUS_T0, CONSENSUS_TICK_US, ConsensusPeer, FUZZ_GUEST_LIMITS,
    consensus_config, consensus_membership, cooperate, fuzz_envelope, split_consensus_frame,
    tiny_guest,
};

/// One fuzz target.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Its name: the cargo-fuzz target and its corpus directory.
    pub name: &'static str,
    /// The entry point.
    pub run: fn(&[u8]),
    /// Longest input worth trying (libFuzzer's `-max_len`).
    pub max_len: usize,
}

/// Every target.
pub const TARGETS: [Target; 7] = [
    Target {
        name: "wire",
        run: wire,
        max_len: 64 * 1024,
    },
    Target {
        name: "consensus_message",
        run: consensus_message,
        max_len: 64 * 1024,
    },
    Target {
        name: "consensus_storage",
        run: consensus_storage,
        max_len: 64 * 1024,
    },
    Target {
        name: "abi",
        run: abi,
        max_len: 16 * 1024,
    },
    Target {
        name: "guest_snapshot",
        run: guest_snapshot,
        max_len: 5 * PAGE_BYTES,
    },
    Target {
        name: "guest_module",
        run: guest_module,
        max_len: MODULE_INPUT_BYTES_MAX,
    },
    Target {
        name: "local_input",
        run: local_input,
        max_len: 16 * 1024,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}

/// Largest module the `guest_module` target compiles: keeps one input's cost
/// (a Cranelift compile) bounded.
pub const MODULE_INPUT_BYTES_MAX: usize = 16 * 1024;

/// Network frames (`/vp/wire/2`): the input is the byte stream a peer sends.
///
/// Decodes it as one frame body and as a stream of length-prefixed frames
/// (`read_frame`, as the daemon's stream reader does). Every decoded [`Wire`]
/// must re-encode, and is delivered to a real skip-graph host (the daemon's
/// configuration, holding its own key), which validates and acts on it; its
/// timers run as the frames arrive.
pub fn wire(data: &[u8]) {
    let _ = decode_frame_body::<Wire>(data);
    wire_stream(data);
}

/// The stream part of [`wire`]; returns the host it fed.
fn wire_stream(data: &[u8]) -> AlmPeer {
    let mut peer = AlmPeer::new(0);
    futures::executor::block_on(async {
        let mut stream = futures::io::Cursor::new(data);
        let mut buf = Vec::new();
        while let Ok(Some(wire)) = read_frame::<Wire>(&mut stream, &mut buf).await {
            // What the daemon decoded it must be able to encode again.
            let mut again = Vec::new();
            encode_frame(&wire, &mut again).expect("a decoded frame re-encodes");
            decode_frame_body::<Wire>(&again[4..]).expect("a re-encoded frame decodes");
            peer.deliver(wire);
        }
    });
    peer
}

/// Consensus messages between the replicas of a virtual peer.
///
/// Input: `[mode]` then frames `[from: u8][dt: u8][len: u16 LE][message]`.
/// Mode bit 0 picks the codec (0: postcard, as `Message::decode`; 1: CBOR, as
/// a `Wire` frame would carry it), bit 1 makes the replica run for election
/// first. Each message goes to replica 1 of the membership {1, 2, 3} (default
/// limits) from host `from`, `dt` × 10 ms after the previous one; the replica
/// persists, applies, checkpoints and proposes as the daemon would.
pub fn consensus_message(data: &[u8]) {
    consensus_message_peer(data);
}

/// [`consensus_message`]; returns the replica it fed.
fn consensus_message_peer(data: &[u8]) -> Option<ConsensusPeer> {
    let (&mode, mut rest) = data.split_first()?;
    let limits = Limits::default();
    let cbor = mode & 1 != 0;
    decode_consensus(rest, cbor, &limits);
    let mut peer = ConsensusPeer::new(CONSENSUS_ME);
    if mode & 2 != 0 {
        peer.campaign();
    }
    let mut now = CONSENSUS_T0;
    while let Some((from, dt, body, tail)) = split_consensus_frame(rest) {
        rest = tail;
        now = now.plus_us(u64::from(dt) * CONSENSUS_TICK_US);
        match decode_consensus(body, cbor, &limits) {
            Some(msg) => peer.input(now, CHostId(u64::from(from)), msg),
            None => peer.tick(now),
        };
    }
    Some(peer)
}

fn decode_consensus(bytes: &[u8], cbor: bool, limits: &Limits) -> Option<Message> {
    let msg = if cbor {
        abi::decode::<Message>(bytes).ok()?
    } else {
        let msg = Message::decode(bytes, limits).ok()?;
        assert_eq!(
            Message::decode(&msg.encode(), limits).as_ref(),
            Ok(&msg),
            "a decoded message re-encodes to itself"
        );
        msg
    };
    Some(msg)
}

/// A replica's durable state after a crash: its log file and snapshot file.
///
/// Input: `[flags][log_len: u32 LE][log file][snapshot file]`. Flag bit 0
/// recomputes each log frame's CRC (so mutations reach the record decoder),
/// bit 1 treats the snapshot part as a bare image and frames it (magic,
/// length, CRC), bit 2 then also fixes the image's application digest. The
/// files are parsed as `FileStore::load` does and the replica recovers from
/// them (`Replica::recover`); if it does, it runs for election with two
/// cooperative peers, so it re-proposes and applies what it recovered.
pub fn consensus_storage(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (log_len, rest) = match rest.split_first_chunk::<4>() {
        Some((len, rest)) => (u32::from_le_bytes(*len) as usize, rest),
        None => (0, rest),
    };
    let (log, snapshot) = rest.split_at(log_len.min(rest.len()));
    let mut log = log.to_vec();
    if flags & 1 != 0 {
        fix_log_crcs(&mut log);
    }
    let snapshot_file = if flags & 2 != 0 {
        let mut image = snapshot.to_vec();
        if flags & 4 != 0 {
            fix_image_digest(&mut image);
        }
        encode_snapshot_file(&image)
    } else {
        snapshot.to_vec()
    };

    let (records, good) = parse_log(&log);
    assert!(good <= log.len(), "the intact prefix lies inside the log");
    let snapshot = parse_snapshot_file(&snapshot_file).map(CBytes::from);
    if let Some(image) = &snapshot
        && let Ok(img) = SnapshotImage::decode(image)
    {
        assert_eq!(
            SnapshotImage::decode(&img.encode()).as_ref(),
            Ok(&img),
            "a decoded image re-encodes to itself"
        );
    }
    let state = Recovered { snapshot, records };
    let Ok(replica) = Replica::recover(
        consensus_config(CONSENSUS_ME),
        Some(consensus_membership()),
        state,
        CONSENSUS_T0,
    ) else {
        return;
    };
    let mut peer = ConsensusPeer::from_replica(replica, CONSENSUS_T0);
    peer.pump(false);
    // Past the loyalty period a recovered replica observes, then lead.
    let later = CTime(CONSENSUS_T0.0 + 3_000_000);
    peer.tick(later);
    let sent = peer.campaign();
    cooperate(&mut peer, sent, 8);
    let sent = peer.tick(CTime(later.0 + 200_000));
    cooperate(&mut peer, sent, 8);
}

/// Recompute the CRC of every log frame whose length fits.
fn fix_log_crcs(log: &mut [u8]) {
    let mut pos = 0;
    while let Some(head) = log.get(pos..pos + 8) {
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let Some(end) = (pos + 8).checked_add(len).filter(|&e| e <= log.len()) else {
            return;
        };
        let crc = crc32c::crc32c(&log[pos + 8..end]);
        log[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

/// If `image` decodes as a snapshot image, make its digest match its state.
fn fix_image_digest(image: &mut Vec<u8>) {
    if let Ok(mut img) = postcard::from_bytes::<SnapshotImage>(image) {
        img.app_digest = xxhash_rust::xxh3::xxh3_64(&img.app_state);
        *image = img.encode();
    }
}

/// The guest ABI codec: envelopes (read by the guest SDK), effects and results
/// (read by the host from guest memory), and the generic CBOR decoder.
///
/// The hand-written codec and the serde definition must agree on whatever both
/// accept, and what the codec decodes must re-encode to an equal value.
pub fn abi(data: &[u8]) {
    let env = codec::decode_envelope(data);
    let effects = codec::decode_effects(data);
    let result = codec::decode_result(data);
    agree(&env, &abi::decode::<Envelope>(data));
    agree(&effects, &abi::decode::<Vec<Effect>>(data));
    agree(&result, &abi::decode::<WireResult>(data));
    if let Ok(env) = env {
        let mut out = Vec::new();
        codec::encode_envelope(&env, &mut out);
        assert_eq!(codec::decode_envelope(&out), Ok(env), "envelope round trip");
    }
    if let Ok(effects) = effects {
        let mut out = Vec::new();
        codec::encode_effects(&effects, &mut out);
        assert_eq!(
            codec::decode_effects(&out),
            Ok(effects),
            "effects round trip"
        );
    }
    if let Ok(result) = result {
        let mut out = Vec::new();
        codec::encode_result(&result, &mut out);
        assert_eq!(codec::decode_result(&out), Ok(result), "result round trip");
    }
    // Replies and messages as `vp-host exec` shows them, and as apps decode them.
    if let Ok(json) = abi::decode::<serde_json::Value>(data) {
        let _ = abi::encode(&json);
    }
}

fn agree<T: PartialEq + std::fmt::Debug>(fast: &Result<T, String>, serde: &Result<T, String>) {
    if let (Ok(a), Ok(b)) = (fast, serde) {
        assert_eq!(a, b, "the codec and the serde definition disagree");
    }
}

/// Encoded guest snapshots (files given to `vp-host exec`, state transfer).
///
/// Input: `[flags][snapshot]`; flag bit 0 recomputes the trailing checksum so
/// mutations reach the parser. Parses with a small memory limit, decodes,
/// and restores into the tiny guest (whose module hash the seeds carry): a
/// restored guest must hold exactly the decoded state, and handle a message.
pub fn guest_snapshot(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if flags & 1 != 0 && bytes.len() >= 8 {
        let body = bytes.len() - 8;
        let sum = xxhash_rust::xxh3::xxh3_64(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum.to_le_bytes());
    }
    let max = FUZZ_GUEST_LIMITS.memory_bytes_max;
    if let Ok(view) = SnapshotView::parse(&bytes, max) {
        let mut memory = vec![0u8; view.memory_bytes];
        view.copy_memory_into(&mut memory);
    }
    let decoded = Snapshot::decode(&bytes, max);
    if let Ok(snap) = &decoded {
        assert_eq!(
            Snapshot::decode(&snap.encode(), max).as_ref(),
            Ok(snap),
            "a decoded snapshot re-encodes to itself"
        );
    }
    let (sandbox, module) = tiny_guest();
    if let Ok(mut guest) = Guest::restore_encoded(sandbox, module.clone(), bytes, FUZZ_GUEST_LIMITS)
    {
        let snap = decoded
            .as_ref()
            .expect("a snapshot that restores also decodes");
        assert_eq!(
            &guest.snapshot(),
            snap,
            "a restored guest holds the snapshot"
        );
        let _ = guest.handle(&fuzz_envelope(1));
        let _ = guest.query(b"\xf6");
    }
    if let Ok(snap) = decoded
        && let Ok(mut guest) = Guest::restore(sandbox, module.clone(), snap, FUZZ_GUEST_LIMITS)
    {
        let _ = guest.handle(&fuzz_envelope(2));
    }
}

/// Guest modules (apps deployed to the host): the loader's rewrite, then a
/// full load (compile, import/export checks, ABI version in a throwaway
/// instance) and, if it loads, a guest started under small limits that
/// handles a message, answers a read and round-trips a snapshot.
///
/// Inputs above [`MODULE_INPUT_BYTES_MAX`] are skipped (bounded compile cost).
pub fn guest_module(data: &[u8]) {
    if data.len() > MODULE_INPUT_BYTES_MAX {
        return;
    }
    if let Ok(rewritten) = crate::sandbox::module::rewrite(data)
        && wasmparser::Validator::new().validate_all(data).is_ok()
    {
        assert!(
            wasmparser::Validator::new()
                .validate_all(&rewritten.bytes)
                .is_ok(),
            "the rewrite keeps a valid module valid"
        );
    }
    let Ok(sandbox) = Sandbox::new() else {
        return;
    };
    let Ok(module) = sandbox.load(data) else {
        return;
    };
    let Ok(mut guest) = Guest::start(&sandbox, module.clone(), FUZZ_GUEST_LIMITS) else {
        return;
    };
    let _ = guest.handle(&fuzz_envelope(1));
    let _ = guest.query(b"\xf6");
    let snap = guest.snapshot();
    if let Ok(mut again) = Guest::restore(&sandbox, module, snap.clone(), FUZZ_GUEST_LIMITS) {
        assert_eq!(
            again.snapshot(),
            snap,
            "a restored guest holds the snapshot"
        );
    }
}

/// What a host reads from its own files, its control API and `vp-host exec`'s
/// standard input (outside the process, if not from the network).
///
/// Input: `[kind][bytes]`. `kind % 4`: 0, `exec`'s standard input (JSON lines,
/// through `exec::run` into the tiny guest; bit 2 of `kind` asks for tagged
/// replies); 1, the identity file (a libp2p protobuf keypair); 2, a network key
/// file; 3, a control API request body (search, multicast and key requests,
/// each applied to a skip-graph host as the node applies it).
pub fn local_input(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            let (sandbox, module) = tiny_guest();
            let options = crate::exec::ExecOptions {
                limits: FUZZ_GUEST_LIMITS,
                time_ms: 1_700_000_000_000,
                seed: 1,
                tagged: kind & 4 != 0,
            };
            if let Ok(mut guest) = Guest::start(sandbox, module.clone(), FUZZ_GUEST_LIMITS) {
                let _ =
                    crate::exec::run(&mut guest, rest, std::io::sink(), std::io::sink(), &options);
            }
        }
        1 => {
            if let Ok(keypair) = libp2p::identity::Keypair::from_protobuf_encoding(rest) {
                let _ = keypair.public().to_peer_id();
                let again = keypair
                    .to_protobuf_encoding()
                    .expect("a decoded identity encodes");
                assert!(
                    libp2p::identity::Keypair::from_protobuf_encoding(&again).is_ok(),
                    "a re-encoded identity decodes"
                );
            }
        }
        2 => {
            if let Ok(text) = std::str::from_utf8(rest)
                && let Ok(psk) = text.parse::<libp2p::pnet::PreSharedKey>()
            {
                assert_eq!(
                    psk.to_string().parse::<libp2p::pnet::PreSharedKey>().ok(),
                    Some(psk),
                    "a network key round-trips"
                );
            }
        }
        _ => api_body(rest),
    }
}

fn api_body(body: &[u8]) {
    use crate::node::api::{KeyRequest, MulticastRequest, SearchRequest};
    use vp_alm::{Bytes, Key};
    let mut peer = AlmPeer::new(0);
    let now = peer.now;
    if let Ok(req) = serde_json::from_slice::<SearchRequest>(body) {
        let _ = peer.host.search(now, Key::new(req.key.into_bytes()));
    }
    if let Ok(req) = serde_json::from_slice::<MulticastRequest>(body)
        && let Ok(range) = req.range()
    {
        let _ = peer
            .host
            .multicast(now, range, Bytes::copy_from(req.payload.as_bytes()));
    }
    if let Ok(req) = serde_json::from_slice::<KeyRequest>(body) {
        let key = Key::new(req.key.into_bytes());
        let _ = peer.host.insert_key(now, key.clone(), None);
        let _ = peer.host.remove_key(now, &key);
    }
    peer.pump();
}
