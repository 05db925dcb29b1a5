//! The deterministic state the fuzz targets feed their input into, shared
//! with the seed recorders (`seeds.rs`) so that a recorded conversation
//! replays exactly into a fresh fixture.

use std::sync::{Arc, OnceLock};

use libp2p::{Multiaddr, PeerId};
use vp_alm::{AlmHost, Event as AlmEvent, HostRef, Time as AlmTime, Transmit};
use vp_consensus::{
    Apply, Bytes as CBytes, ClientId, Command, Epoch, HostId as CHostId, Limits, MemStore,
    Membership, Message, Replica, ReplicaConfig, Slot, Storage, Time as CTime, Timing,
};
use vp_guest_sdk::abi::{Address, Envelope, Input};
use wasm_encoder::{
    CodeSection, ConstExpr, DataSection, EntityType, ExportKind, ExportSection, Function,
    FunctionSection, GlobalSection, GlobalType, ImportSection, MemArg, MemorySection, MemoryType,
    Module, NameMap, NameSection, StartSection, TypeSection, ValType,
};

use crate::node::Wire;
use crate::node::overlay::{PeerContact, host_key, host_ref};
use crate::sandbox::{GuestLimits, LoadedModule, Sandbox};

// ----- the overlay -------------------------------------------------------------------

/// Caller time of the first overlay input, in microseconds.
pub(crate) const ALM_T0: AlmTime = AlmTime(1_000_000);
/// Caller time between two frames delivered to the overlay fixture: enough for
/// its request timeouts and pings to fire within a few dozen frames.
pub(crate) const ALM_STEP_US: u64 = 100_000;
const ALM_SEED: u64 = 0x5eed_a1a1;

/// The libp2p identity of fixture host `i` (0 is the host under test).
pub(crate) fn peer_id(i: u8) -> PeerId {
    libp2p::identity::Keypair::ed25519_from_bytes([i.wrapping_add(1); 32])
        .expect("32 bytes make an ed25519 key")
        .public()
        .to_peer_id()
}

/// The listen address of fixture host `i`.
pub(crate) fn peer_addr(i: u8) -> Multiaddr {
    format!("/ip4/127.0.0.1/tcp/{}", 4000 + u16::from(i))
        .parse()
        .expect("a valid multiaddr")
}

/// The overlay reference of fixture host `i`.
pub(crate) fn peer_ref(i: u8) -> HostRef<PeerContact> {
    host_ref(peer_id(i), &[peer_addr(i)])
}

/// A skip-graph host as the daemon runs it (default configuration, its own
/// host key inserted as the first key of a new network), fed decoded frames.
pub(crate) struct AlmPeer {
    pub(crate) host: AlmHost<PeerContact>,
    pub(crate) now: AlmTime,
    /// Where `Wire::Paxos` goes: a replica of the consensus fixture, made on
    /// the first such message.
    paxos: Option<ConsensusPeer>,
}

impl AlmPeer {
    /// Fixture host `i` (0: the host under test).
    pub(crate) fn new(i: u8) -> AlmPeer {
        let me = peer_ref(i);
        let mut host = AlmHost::new(
            me.host,
            me.contact,
            vp_alm::Config::default(),
            ALM_SEED ^ u64::from(i),
        );
        let introducer = (i != 0).then(|| peer_ref(0));
        host.insert_key(ALM_T0, host_key(me.host), introducer)
            .expect("a fresh host takes its own key");
        AlmPeer {
            host,
            now: ALM_T0,
            paxos: None,
        }
    }

    /// Deliver one decoded frame (the sender is whoever the message names:
    /// the daemon checks that against the authenticated peer before this
    /// point), run due timers, and return what the host sends.
    pub(crate) fn deliver(&mut self, wire: Wire) -> Vec<Transmit<PeerContact>> {
        self.now = self.now.plus_micros(ALM_STEP_US);
        // Every variant goes to the handler that validates it. A variant added to
        // `Wire` is decoded by the `wire` target already; the compiler asks for its
        // handler here.
        match wire {
            Wire::Alm(msg) => {
                let from = msg.from.host;
                let _ = self.host.handle_message(self.now, from, msg);
            }
            Wire::Paxos { vp: _, msg } => {
                // The daemon hands it to the member thread of `vp`, whose
                // replica validates it; the sender is the authenticated peer's
                // host id, here a fixed fellow member.
                let now = CTime(CONSENSUS_T0.0 + (self.now.0 - ALM_T0.0));
                let peer = self
                    .paxos
                    .get_or_insert_with(|| ConsensusPeer::new(CONSENSUS_ME));
                let _ = peer.input(now, CHostId(2), msg);
            }
            Wire::Vp(msg) => {
                // Deployments carry a configuration the host checks before it
                // starts anything; the rest are routed by id to waiters.
                if let crate::vp::wire::VpWire::Deploy(deploy) = &msg {
                    let _ = crate::node::vps::check_config(&deploy.config);
                }
                std::hint::black_box(msg);
            }
        }
        self.pump()
    }

    /// Run due timers; drain events; return the messages to send.
    pub(crate) fn pump(&mut self) -> Vec<Transmit<PeerContact>> {
        self.host.handle_timeout(self.now);
        while let Some(event) = self.host.poll_event() {
            if let AlmEvent::Delivered { payload, .. } = event {
                std::hint::black_box(payload);
            }
        }
        std::iter::from_fn(|| self.host.poll_send()).collect()
    }
}

// ----- consensus ---------------------------------------------------------------------

/// The replica under test.
pub(crate) const CONSENSUS_ME: CHostId = CHostId(1);
/// Caller time of the first consensus input, in microseconds.
pub(crate) const CONSENSUS_T0: CTime = CTime(10_000_000);
/// Unit of the per-frame time step in the consensus inputs, in microseconds.
pub(crate) const CONSENSUS_TICK_US: u64 = 10_000;
/// Application state checkpointed every this many applied slots.
const CHECKPOINT_EVERY: u64 = 8;

/// The founding membership: hosts 1, 2 and 3.
pub(crate) fn consensus_membership() -> Membership {
    Membership {
        epoch: Epoch(1),
        voters: vec![CHostId(1), CHostId(2), CHostId(3)],
        learners: Vec::new(),
    }
}

/// Replica configuration: default limits (as deployed), default timers except
/// a short log tail, so checkpoints compact the log and lagging peers get
/// snapshots within a short recording.
pub(crate) fn consensus_config(id: CHostId) -> ReplicaConfig {
    ReplicaConfig {
        id,
        seed: 0x5eed_c0c0 ^ id.0,
        timing: Timing {
            log_retain_slots: 4,
            ..Timing::default()
        },
        limits: Limits::default(),
    }
}

/// A replica with its store and a tiny application (a digest of what it
/// applied), driven the way the daemon drives it.
pub(crate) struct ConsensusPeer {
    pub(crate) replica: Replica,
    store: MemStore,
    /// The application state: xxh3 of everything applied, as 8 bytes.
    app: u64,
    next_seq: u64,
    applied: u64,
    pub(crate) now: CTime,
}

impl ConsensusPeer {
    /// A founding member on its first start.
    pub(crate) fn new(id: CHostId) -> ConsensusPeer {
        let replica = Replica::new(
            consensus_config(id),
            Some(consensus_membership()),
            CONSENSUS_T0,
        );
        ConsensusPeer::from_replica(replica, CONSENSUS_T0)
    }

    pub(crate) fn from_replica(replica: Replica, now: CTime) -> ConsensusPeer {
        ConsensusPeer {
            replica,
            store: MemStore::default(),
            app: 0,
            next_seq: 0,
            applied: 0,
            now,
        }
    }

    /// Run for election now.
    pub(crate) fn campaign(&mut self) -> Vec<(CHostId, Message)> {
        self.replica.campaign(self.now);
        self.pump(false)
    }

    /// Deliver one message at `now`; return what the replica sends.
    pub(crate) fn input(
        &mut self,
        now: CTime,
        from: CHostId,
        msg: Message,
    ) -> Vec<(CHostId, Message)> {
        self.now = self.now.max(now);
        let _ = self.replica.handle_message(self.now, from, msg);
        self.pump(false)
    }

    /// Advance the clock to `now`, run what is due, and propose a command if
    /// leading (a client's request arriving).
    pub(crate) fn tick(&mut self, now: CTime) -> Vec<(CHostId, Message)> {
        self.now = self.now.max(now);
        self.pump(true)
    }

    /// Timers, a proposal if asked and leading, then every output until quiet.
    pub(crate) fn pump(&mut self, propose: bool) -> Vec<(CHostId, Message)> {
        if self.replica.poll_timeout().is_some_and(|t| t <= self.now) {
            self.replica.handle_timeout(self.now);
        }
        if propose && self.replica.is_leader() {
            let cmd = Command {
                client: ClientId(7),
                seq: self.next_seq,
                ack_below: self.next_seq,
                payload: CBytes::from(self.next_seq.to_le_bytes().to_vec()),
            };
            if self.replica.propose(self.now, cmd).is_ok() {
                self.next_seq += 1;
            }
        }
        let mut sent = Vec::new();
        loop {
            let mut idle = true;
            while let Some(batch) = self.replica.poll_persist() {
                idle = false;
                if self.store.write_batch(&batch).is_ok() {
                    self.replica.on_persisted(batch.token);
                }
            }
            while let Some(out) = self.replica.poll_send() {
                idle = false;
                sent.push(out);
            }
            while let Some(apply) = self.replica.poll_apply() {
                idle = false;
                self.apply(apply);
            }
            if idle {
                break;
            }
        }
        sent
    }

    fn apply(&mut self, apply: Apply) {
        let slot = match apply {
            Apply::Snapshot { app_state, .. } => {
                self.app = app_state
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_le_bytes);
                return;
            }
            Apply::Batch {
                slot,
                batch,
                outcomes,
                ..
            } => {
                for (cmd, outcome) in batch.commands.iter().zip(&outcomes) {
                    if *outcome == vp_consensus::Outcome::Fresh {
                        self.app = xxhash_rust::xxh3::xxh3_64_with_seed(&cmd.payload, self.app);
                        let _ = self.replica.record_reply(
                            cmd.client,
                            cmd.seq,
                            CBytes::from(self.app.to_le_bytes().to_vec()),
                        );
                    }
                }
                slot
            }
            Apply::Noop { slot } | Apply::Membership { slot, .. } => slot,
            Apply::ReadReady { .. } | Apply::ReadAborted { .. } => return,
        };
        self.applied += 1;
        if self.applied.is_multiple_of(CHECKPOINT_EVERY) {
            let _ = self
                .replica
                .checkpoint(slot, CBytes::from(self.app.to_le_bytes().to_vec()));
        }
    }

    /// What the store holds (for the storage seeds).
    pub(crate) fn store(&self) -> &MemStore {
        &self.store
    }
}

/// Answers a candidate or leader the way two healthy followers would: empty
/// promises, votes for every accept, acknowledged heartbeats. Lets a replica
/// recovered from fuzzed storage lead and re-propose what it recovered.
pub(crate) fn cooperate(peer: &mut ConsensusPeer, sent: Vec<(CHostId, Message)>, rounds: usize) {
    let mut queue = sent;
    for _ in 0..rounds {
        let mut next = Vec::new();
        for (to, msg) in queue {
            if to == CONSENSUS_ME {
                continue;
            }
            let answer = match msg {
                Message::Prepare { ballot, from } => Message::Promise {
                    ballot,
                    from,
                    log_start: Slot(1),
                    entries: Vec::new(),
                    next: None,
                },
                Message::Accept { ballot, slot, .. } => Message::Accepted { ballot, slot },
                Message::Heartbeat {
                    ballot,
                    round,
                    decided_below,
                } => Message::HeartbeatAck {
                    ballot,
                    round,
                    decided_below,
                },
                _ => continue,
            };
            let now = peer.now;
            next.extend(peer.input(now, to, answer));
        }
        if next.is_empty() {
            break;
        }
        queue = next;
    }
}

/// Split `[from: u8][dt: u8][len: u16 LE][len bytes]` off the front of a
/// consensus fuzz input (a short last frame keeps what is there).
pub(crate) fn split_consensus_frame(data: &[u8]) -> Option<(u8, u8, &[u8], &[u8])> {
    let (head, rest) = data.split_at_checked(4)?;
    let len = usize::from(u16::from_le_bytes([head[2], head[3]])).min(rest.len());
    let (body, rest) = rest.split_at(len);
    Some((head[0], head[1], body, rest))
}

/// Append a frame in the format [`split_consensus_frame`] reads.
pub(crate) fn push_consensus_frame(out: &mut Vec<u8>, from: u8, dt: u8, body: &[u8]) {
    let len = u16::try_from(body.len()).expect("seed messages are small");
    out.extend_from_slice(&[from, dt]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
}

// ----- guests ------------------------------------------------------------------------

/// Limits of the guests the fuzz targets run: small, so a hostile module or
/// snapshot costs little per input.
pub(crate) const FUZZ_GUEST_LIMITS: GuestLimits = GuestLimits {
    fuel_per_message: 1_000_000,
    memory_bytes_max: 4 * 65536,
    table_elements_max: 1024,
    input_bytes_max: 64 * 1024,
    output_bytes_max: 64 * 1024,
};

/// Variants of the tiny guest module, for the module seeds.
#[derive(Clone, Copy, Default)]
pub(crate) struct TinyGuest {
    /// Export `vp_query` too.
    pub(crate) query: bool,
    /// Name the shadow-stack pointer in a name section.
    pub(crate) names: bool,
    /// A start function that calls the `log` import (during instantiation).
    pub(crate) start_logs: bool,
    /// `vp_handle` grows memory by this many pages per message.
    pub(crate) grow_pages: u8,
}

/// A minimal valid guest: one page of memory, three mutable globals (the
/// shadow-stack pointer, a message counter, a float), `vp_handle` reads its
/// input, bumps the counter and returns no effects; `vp_query` answers `Ok(b"")`.
pub(crate) fn tiny_guest_wasm(opts: TinyGuest) -> Vec<u8> {
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32, ValType::I32], []); // 0: input, output
    types
        .ty()
        .function([ValType::I32, ValType::I32, ValType::I32], []); // 1: log
    types.ty().function([], [ValType::I32]); // 2: abi version, init
    types.ty().function([ValType::I32], [ValType::I32]); // 3: handle, query
    types.ty().function([], []); // 4: start
    let mut imports = ImportSection::new();
    imports.import("vp", "input", EntityType::Function(0));
    imports.import("vp", "output", EntityType::Function(0));
    imports.import("vp", "log", EntityType::Function(1));
    // Functions 3.. : abi_version, init, handle, query, start.
    let mut functions = FunctionSection::new();
    for ty in [2, 2, 3, 3, 4] {
        functions.function(ty);
    }
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 1,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    let mut globals = GlobalSection::new();
    let mutable = |val_type| GlobalType {
        val_type,
        mutable: true,
        shared: false,
    };
    globals.global(mutable(ValType::I32), &ConstExpr::i32_const(60_000));
    globals.global(mutable(ValType::I64), &ConstExpr::i64_const(0));
    globals.global(mutable(ValType::F64), &ConstExpr::f64_const(1.5.into()));
    let mut exports = ExportSection::new();
    exports.export("memory", ExportKind::Memory, 0);
    exports.export("vp_abi_version", ExportKind::Func, 3);
    exports.export("vp_init", ExportKind::Func, 4);
    exports.export("vp_handle", ExportKind::Func, 5);
    if opts.query {
        exports.export("vp_query", ExportKind::Func, 6);
    }
    let mem = |offset| MemArg {
        offset,
        align: 0,
        memory_index: 0,
    };
    let mut code = CodeSection::new();
    let mut f = Function::new([]);
    f.instructions().i32_const(1).end();
    code.function(&f);
    let mut f = Function::new([]);
    f.instructions().i32_const(0).end();
    code.function(&f);
    let mut f = Function::new([]);
    let mut body = f.instructions();
    body.i32_const(4096).local_get(0).call(0);
    body.global_get(1).i64_const(1).i64_add().global_set(1);
    body.i32_const(2048).global_get(1).i64_store(mem(0));
    if opts.grow_pages > 0 {
        body.i32_const(i32::from(opts.grow_pages))
            .memory_grow(0)
            .drop();
    }
    body.i32_const(1024).i32_const(1).call(1).i32_const(0).end();
    code.function(&f);
    let mut f = Function::new([]);
    f.instructions()
        .i32_const(4096)
        .local_get(0)
        .call(0)
        .i32_const(1032)
        .i32_const(5)
        .call(1)
        .i32_const(0)
        .end();
    code.function(&f);
    let mut f = Function::new([]);
    f.instructions()
        .i32_const(3)
        .i32_const(1040)
        .i32_const(5)
        .call(2)
        .end();
    code.function(&f);
    let mut data = DataSection::new();
    // 1024: `[]` (no effects); 1032: `{"Ok": h''}`; 1040: "start".
    data.active(0, &ConstExpr::i32_const(1024), [0x80]);
    data.active(
        0,
        &ConstExpr::i32_const(1032),
        [0xa1, 0x62, b'O', b'k', 0x40],
    );
    data.active(0, &ConstExpr::i32_const(1040), *b"start");

    let mut module = Module::new();
    module
        .section(&types)
        .section(&imports)
        .section(&functions)
        .section(&memories)
        .section(&globals)
        .section(&exports);
    if opts.start_logs {
        module.section(&StartSection { function_index: 7 });
    }
    module.section(&code).section(&data);
    if opts.names {
        let mut names = NameSection::new();
        let mut map = NameMap::new();
        map.append(0, "__stack_pointer");
        map.append(1, "counter");
        names.globals(&map);
        module.section(&names);
    }
    module.finish()
}

/// One sandbox per process with the tiny guest (with a read path) loaded.
pub(crate) fn tiny_guest() -> &'static (Sandbox, Arc<LoadedModule>) {
    static TINY: OnceLock<(Sandbox, Arc<LoadedModule>)> = OnceLock::new();
    TINY.get_or_init(|| {
        let sandbox = Sandbox::new().expect("the sandbox starts");
        let module = sandbox
            .load(&tiny_guest_wasm(TinyGuest {
                query: true,
                names: true,
                ..TinyGuest::default()
            }))
            .expect("the tiny guest loads");
        (sandbox, module)
    })
}

/// The envelope the fuzz targets hand a guest they got running.
pub(crate) fn fuzz_envelope(n: u64) -> Envelope {
    Envelope(
        1_700_000_000_000 + n,
        n,
        Input::Request(Address::Client(9), n, vec![0xf6].into()),
    )
}
