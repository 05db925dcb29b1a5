//! The replica driven by hand: durability before votes, batching, errors, hostile
//! input, snapshot transfer (resumable, 64 MiB), and recovery.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use vp_consensus::{
    Apply, Bytes, ClientId, Command, Epoch, HostId, Limits, MemStore, Membership, Message,
    MessageError, ProposeError, Replica, ReplicaConfig, ReportedEntry, Slot, Storage, Time, Timing,
    Value,
};

struct Net {
    reps: BTreeMap<HostId, Replica>,
    stores: BTreeMap<HostId, MemStore>,
    queue: VecDeque<(HostId, HostId, Message)>,
    applied: BTreeMap<HostId, Vec<Apply>>,
    now: Time,
}

fn cfg(id: u64, limits: &Limits) -> ReplicaConfig {
    ReplicaConfig {
        id: HostId(id),
        seed: id,
        timing: Timing::default(),
        limits: limits.clone(),
    }
}

fn membership(n: u64) -> Membership {
    Membership {
        epoch: Epoch(1),
        voters: (1..=n).map(HostId).collect(),
        learners: Vec::new(),
    }
}

impl Net {
    fn new(n: u64, limits: Limits) -> Net {
        let mut reps = BTreeMap::new();
        let mut stores = BTreeMap::new();
        for i in 1..=n {
            reps.insert(
                HostId(i),
                Replica::new(cfg(i, &limits), Some(membership(n)), Time(0)),
            );
            stores.insert(HostId(i), MemStore::default());
        }
        Net {
            reps,
            stores,
            queue: VecDeque::new(),
            applied: BTreeMap::new(),
            now: Time(0),
        }
    }

    /// Persists (acknowledging at once), collects sends and applies of every replica.
    fn drain(&mut self) {
        for (h, r) in self.reps.iter_mut() {
            loop {
                let mut any = false;
                while let Some(b) = r.poll_persist() {
                    any = true;
                    self.stores
                        .entry(*h)
                        .or_default()
                        .write_batch(&b)
                        .expect("mem");
                    r.on_persisted(b.token);
                }
                while let Some((to, m)) = r.poll_send() {
                    any = true;
                    self.queue.push_back((*h, to, m));
                }
                while let Some(a) = r.poll_apply() {
                    any = true;
                    self.applied.entry(*h).or_default().push(a);
                }
                if !any {
                    break;
                }
            }
        }
    }

    /// Delivers everything until the network is quiet.
    fn settle(&mut self) {
        self.drain();
        while let Some((from, to, m)) = self.queue.pop_front() {
            if let Some(r) = self.reps.get_mut(&to) {
                r.handle_message(self.now, from, m).expect("valid message");
            }
            self.drain();
        }
    }

    fn elect(&mut self, h: u64) {
        self.now = Time(self.now.0 + 10_000_000);
        let now = self.now;
        self.reps
            .get_mut(&HostId(h))
            .expect("host")
            .handle_timeout(now);
        self.settle();
        assert!(self.reps[&HostId(h)].is_leader());
    }

    /// One heartbeat round: followers learn the leader's latest decisions.
    fn heartbeat(&mut self) {
        self.now = Time(self.now.0 + Timing::default().heartbeat_interval_us);
        let now = self.now;
        for r in self.reps.values_mut() {
            r.handle_timeout(now);
        }
        self.settle();
    }

    fn put(&mut self, h: u64, client: u128, seq: u64) -> Result<(), ProposeError> {
        let now = self.now;
        self.reps.get_mut(&HostId(h)).expect("host").propose(
            now,
            Command {
                client: ClientId(client),
                seq,
                ack_below: 0,
                payload: Bytes::from(vec![seq as u8; 8]),
            },
        )
    }

    fn batch_sizes(&self, h: u64) -> Vec<usize> {
        self.applied
            .get(&HostId(h))
            .map(|v| {
                v.iter()
                    .filter_map(|a| match a {
                        Apply::Batch { batch, .. } => Some(batch.commands.len()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn promises_and_votes_wait_for_durability() {
    let mut r2 = Replica::new(cfg(2, &Limits::default()), Some(membership(3)), Time(0));
    let ballot = vp_consensus::Ballot {
        epoch: Epoch(1),
        round: 1,
        leader: HostId(1),
    };
    r2.handle_message(
        Time(5),
        HostId(1),
        Message::Prepare {
            ballot,
            from: Slot(1),
        },
    )
    .expect("valid");
    assert!(
        r2.poll_send().is_none(),
        "no promise before the promise is durable"
    );
    let b = r2.poll_persist().expect("a batch");
    assert!(b.must_sync);
    r2.on_persisted(b.token);
    assert!(matches!(
        r2.poll_send(),
        Some((HostId(1), Message::Promise { .. }))
    ));

    let value = Value::Noop;
    r2.handle_message(
        Time(6),
        HostId(1),
        Message::Accept {
            ballot,
            slot: Slot(1),
            value,
            decided_below: Slot(1),
        },
    )
    .expect("valid");
    assert!(
        r2.poll_send().is_none(),
        "no vote before the accept is durable"
    );
    let b = r2.poll_persist().expect("a batch");
    r2.on_persisted(b.token);
    assert!(matches!(
        r2.poll_send(),
        Some((HostId(1), Message::Accepted { slot: Slot(1), .. }))
    ));
}

#[test]
fn commands_queued_while_the_leader_writes_go_out_in_one_batch() {
    for (writing, sizes) in [(1, vec![1, 9]), (2, vec![1, 1, 8])] {
        let limits = Limits {
            batches_writing_max: writing,
            ..Limits::default()
        };
        let mut net = Net::new(3, limits);
        net.elect(1);
        // Nothing is persisted or delivered while the ten commands arrive: the
        // first `writing` go out at once in slots of their own (no waiting when
        // idle); the others wait for a write to finish and share one slot.
        for seq in 0..10 {
            net.put(1, 7, seq).expect("leader");
        }
        net.settle();
        net.heartbeat();
        assert_eq!(net.batch_sizes(1), sizes);
        assert_eq!(net.batch_sizes(2), sizes);
    }
}

#[test]
fn a_partial_batch_waits_for_the_slot_in_flight_and_full_ones_pipeline() {
    // (partial_batch_window_slots, batch sizes the followers apply)
    for (window, sizes) in [(32, vec![1; 11]), (1, vec![1, 4, 4, 2])] {
        let limits = Limits {
            partial_batch_window_slots: window,
            batch_commands_max: 4,
            batches_writing_max: 100,
            ..Limits::default()
        };
        let mut net = Net::new(3, limits);
        net.elect(1);
        net.put(1, 7, 0).expect("leader");
        // The leader's write completes, its accepts are not delivered: slot 1
        // stays undecided while ten more commands arrive one by one.
        net.drain();
        for seq in 1..=10 {
            net.put(1, 7, seq).expect("leader");
            net.drain();
        }
        // With a window of 1, commands wait until four fill a batch, which
        // goes out at once; the last two wait for every slot to be decided.
        net.settle();
        net.heartbeat();
        assert_eq!(net.batch_sizes(1), sizes, "window {window}");
        assert_eq!(net.batch_sizes(2), sizes, "window {window}");
        assert_eq!(net.batch_sizes(3), sizes, "window {window}");
    }
}

#[test]
fn proposals_are_refused_with_clear_errors() {
    let limits = Limits {
        window_slots_max: 1,
        queue_commands_max: 2,
        command_bytes_max: 16,
        ..Limits::default()
    };
    let mut net = Net::new(3, limits);
    net.elect(1);
    assert_eq!(
        net.put(2, 1, 0),
        Err(ProposeError::NotLeader {
            leader: Some(HostId(1))
        })
    );
    let big = Command {
        client: ClientId(1),
        seq: 0,
        ack_below: 0,
        payload: Bytes::from(vec![0u8; 17]),
    };
    assert!(matches!(
        net.reps
            .get_mut(&HostId(1))
            .expect("h1")
            .propose(Time(0), big),
        Err(ProposeError::TooLarge { got: 17, max: 16 })
    ));
    net.put(1, 1, 0).expect("in flight");
    net.put(1, 1, 1).expect("queued");
    net.put(1, 1, 2).expect("queued");
    assert!(matches!(
        net.put(1, 1, 3),
        Err(ProposeError::QueueFull { .. })
    ));
}

#[test]
fn hostile_messages_are_refused_without_panic() {
    let limits = Limits::default();
    let mut r = Replica::new(cfg(2, &limits), Some(membership(3)), Time(0));
    let before = r.status();
    let ballot = vp_consensus::Ballot::default();
    let too_many = Message::Promise {
        ballot,
        from: Slot(1),
        log_start: Slot(1),
        entries: (0..limits.promise_entries_max as u64 + 1)
            .map(|i| ReportedEntry {
                slot: Slot(i + 1),
                ballot,
                value: Value::Noop,
                decided: false,
            })
            .collect(),
        next: None,
    };
    assert!(matches!(
        r.handle_message(Time(1), HostId(1), too_many),
        Err(MessageError::TooMany { .. })
    ));
    let past_end = Message::SnapshotChunk {
        slot: Slot(3),
        digest: 0,
        total_bytes: 4,
        offset: 2,
        data: Bytes::from(vec![0u8; 3]),
    };
    assert!(matches!(
        r.handle_message(Time(1), HostId(1), past_end),
        Err(MessageError::Malformed(_))
    ));
    let huge = Message::SnapshotChunk {
        slot: Slot(3),
        digest: 0,
        total_bytes: u64::MAX,
        offset: 0,
        data: Bytes::default(),
    };
    assert!(matches!(
        r.handle_message(Time(1), HostId(1), huge),
        Err(MessageError::TooLarge { .. })
    ));
    let batch = vp_consensus::Batch {
        stamp: Default::default(),
        commands: vec![
            Command {
                client: ClientId(1),
                seq: 0,
                ack_below: 0,
                payload: Bytes::default(),
            };
            limits.batch_commands_max + 1
        ],
    };
    let accept = Message::Accept {
        ballot,
        slot: Slot(1),
        value: Value::Batch(Arc::new(batch)),
        decided_below: Slot(1),
    };
    assert!(r.handle_message(Time(1), HostId(1), accept).is_err());
    assert!(
        r.handle_message(
            Time(1),
            HostId(2),
            Message::Prepare {
                ballot,
                from: Slot(1)
            }
        )
        .is_err()
    );
    for junk in [
        &b""[..],
        &[0xff; 64][..],
        &[3, 200, 200, 200, 200, 200, 200, 1][..],
    ] {
        assert!(Message::decode(junk, &limits).is_err());
    }
    assert_eq!(
        r.status(),
        before,
        "refused input leaves the replica unchanged"
    );
    assert!(r.poll_send().is_none() && r.poll_persist().is_none());
}

#[test]
fn messages_round_trip_through_cbor_and_postcard() {
    let m = Message::SnapshotChunk {
        slot: Slot(9),
        digest: 77,
        total_bytes: 1000,
        offset: 0,
        data: Bytes::from(vec![1u8; 1000]),
    };
    let mut cbor = Vec::new();
    ciborium::into_writer(&m, &mut cbor).expect("cbor");
    assert!(
        cbor.len() < 1100,
        "bytes travel as a byte string ({} B)",
        cbor.len()
    );
    let back: Message = ciborium::from_reader(&cbor[..]).expect("decode");
    assert_eq!(back, m);
    let pc = m.encode();
    assert_eq!(Message::decode(&pc, &Limits::default()).expect("decode"), m);
}

/// Three replicas apply the same log and checkpoint at the same slot with the same
/// state, so their snapshot images are byte-identical.
fn cluster_with_snapshot(limits: Limits, app_state: &Bytes) -> (Net, Slot) {
    let mut net = Net::new(3, limits);
    net.elect(1);
    for seq in 0..5 {
        net.put(1, 9, seq).expect("leader");
        net.settle();
    }
    net.heartbeat();
    for h in 1..=3 {
        let r = net.reps.get_mut(&HostId(h)).expect("host");
        let slot = Slot(r.applied_below().0 - 1);
        r.checkpoint(slot, app_state.clone()).expect("checkpoint");
    }
    net.settle();
    let slot = net.reps[&HostId(1)].snapshot_slot();
    (net, slot)
}

#[test]
fn snapshot_transfer_resumes_from_another_sender() {
    let limits = Limits {
        snapshot_chunk_bytes_max: 1000,
        snapshot_chunks_in_flight_max: 2,
        ..Limits::default()
    };
    let state = Bytes::from((0..10_000u32).map(|i| i as u8).collect::<Vec<u8>>());
    let (mut net, slot) = cluster_with_snapshot(limits.clone(), &state);
    let mut joiner = Replica::new(cfg(4, &limits), None, Time(0));
    let ask = Message::CatchUpRequest {
        from: Slot(1),
        epoch: Epoch(0),
    };

    // Host 1 starts sending; the joiner gets two chunks, then host 1 goes away.
    let r1 = net.reps.get_mut(&HostId(1)).expect("h1");
    r1.handle_message(Time(1), HostId(4), ask.clone())
        .expect("valid");
    let mut got = 0;
    while let Some((_, m)) = r1.poll_send() {
        if got < 2 {
            joiner.handle_message(Time(2), HostId(1), m).expect("valid");
            got += 1;
        }
    }
    while joiner.poll_send().is_some() {}

    // Host 2 holds the same image: the transfer continues from byte 2000.
    let r2 = net.reps.get_mut(&HostId(2)).expect("h2");
    r2.handle_message(Time(3), HostId(4), ask).expect("valid");
    let mut offsets_after_first_ack = Vec::new();
    let mut acked = false;
    let mut sent_bytes = 0u64;
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 100, "transfer must finish");
        let mut to_joiner = Vec::new();
        while let Some((to, m)) = r2.poll_send() {
            if to == HostId(4) {
                to_joiner.push(m);
            }
        }
        if to_joiner.is_empty() {
            break;
        }
        for m in to_joiner {
            if let Message::SnapshotChunk { offset, data, .. } = &m {
                sent_bytes += data.len() as u64;
                if acked {
                    offsets_after_first_ack.push(*offset);
                }
            }
            joiner.handle_message(Time(4), HostId(2), m).expect("valid");
        }
        while let Some((_, m)) = joiner.poll_send() {
            if matches!(m, Message::SnapshotAck { .. }) {
                acked = true;
                r2.handle_message(Time(5), HostId(4), m).expect("valid");
            }
        }
    }
    assert!(
        offsets_after_first_ack.iter().all(|o| *o >= 2000),
        "{offsets_after_first_ack:?}"
    );
    match joiner.poll_apply() {
        Some(Apply::Snapshot {
            slot: s, app_state, ..
        }) => {
            assert_eq!(s, slot);
            assert_eq!(app_state, state);
        }
        other => panic!("expected a snapshot install, got {other:?}"),
    }
    assert!(
        sent_bytes < 10_000 + 2 * 1000,
        "host 2 did not resend from zero: {sent_bytes}"
    );
}

#[test]
fn a_64_mib_snapshot_travels_in_bounded_chunks() {
    let limits = Limits::default();
    let state = Bytes::from(vec![0x5au8; 64 << 20]);
    let (mut net, slot) = cluster_with_snapshot(limits.clone(), &state);
    let mut joiner = Replica::new(cfg(4, &limits), None, Time(0));
    let r1 = net.reps.get_mut(&HostId(1)).expect("h1");
    r1.handle_message(
        Time(1),
        HostId(4),
        Message::CatchUpRequest {
            from: Slot(1),
            epoch: Epoch(0),
        },
    )
    .expect("valid");
    let mut chunks = 0;
    let mut in_flight_max = 0;
    loop {
        let mut batch = Vec::new();
        while let Some((to, m)) = r1.poll_send() {
            if to == HostId(4) {
                batch.push(m);
            }
        }
        if batch.is_empty() {
            break;
        }
        in_flight_max = in_flight_max.max(batch.len());
        for m in batch {
            if let Message::SnapshotChunk { data, .. } = &m {
                assert!(data.len() <= limits.snapshot_chunk_bytes_max);
                chunks += 1;
            }
            joiner.handle_message(Time(2), HostId(1), m).expect("valid");
        }
        while let Some((_, m)) = joiner.poll_send() {
            r1.handle_message(Time(3), HostId(4), m).expect("valid");
        }
    }
    assert!(chunks >= 64);
    assert!(in_flight_max as u64 <= limits.snapshot_chunks_in_flight_max);
    match joiner.poll_apply() {
        Some(Apply::Snapshot {
            slot: s, app_state, ..
        }) => {
            assert_eq!(s, slot);
            assert_eq!(app_state.len(), 64 << 20);
            assert!(app_state == state);
        }
        other => panic!("expected a snapshot install, got {other:?}"),
    }
    assert_eq!(joiner.decided_below(), Slot(slot.0 + 1));
}

#[test]
fn a_restarted_replica_replays_its_durable_log() {
    let mut net = Net::new(3, Limits::default());
    net.elect(1);
    for seq in 0..4 {
        net.put(1, 5, seq).expect("leader");
        net.settle();
    }
    let before = net.reps[&HostId(2)].status();
    let applied_before = net.batch_sizes(2);
    // Crash host 2 and rebuild it from its store.
    let store = net.stores.get_mut(&HostId(2)).expect("store");
    let rec = store.load().expect("load");
    let mut r = Replica::recover(
        cfg(2, &Limits::default()),
        Some(membership(3)),
        rec,
        Time(0),
    )
    .expect("recover");
    assert_eq!(r.status().promised, before.promised);
    assert_eq!(r.decided_below(), before.decided_below);
    let mut replayed = Vec::new();
    while let Some(a) = r.poll_apply() {
        if let Apply::Batch { batch, .. } = a {
            replayed.push(batch.commands.len());
        }
    }
    assert_eq!(replayed, applied_before);
}

#[test]
fn a_restarted_replica_asks_the_others_for_what_it_missed() {
    let mut net = Net::new(3, Limits::default());
    net.elect(1);
    net.put(1, 5, 0).expect("leader");
    net.settle();
    // Host 3 crashes; the others decide more without it.
    net.reps.remove(&HostId(3));
    for seq in 1..4 {
        net.put(1, 5, seq).expect("leader");
        net.settle();
    }
    let leader_below = net.reps[&HostId(1)].decided_below();
    let rec = net
        .stores
        .get_mut(&HostId(3))
        .expect("store")
        .load()
        .expect("load");
    let mut r = Replica::recover(
        cfg(3, &Limits::default()),
        Some(membership(3)),
        rec,
        net.now,
    )
    .expect("recover");
    assert!(r.decided_below() < leader_below);
    let mut asked = Vec::new();
    while let Some((to, m)) = r.poll_send() {
        assert!(matches!(m, Message::CatchUpRequest { .. }), "{m:?}");
        asked.push(to);
        net.queue.push_back((HostId(3), to, m));
    }
    assert_eq!(asked, vec![HostId(1), HostId(2)]);
    // No timer runs: the answers alone bring it up to date.
    net.reps.insert(HostId(3), r);
    net.settle();
    assert_eq!(net.reps[&HostId(3)].decided_below(), leader_below);
}

#[test]
fn log_time_never_goes_backwards_and_duplicates_are_not_applied() {
    let mut net = Net::new(3, Limits::default());
    net.elect(1);
    net.put(1, 5, 0).expect("leader");
    net.put(1, 5, 0).expect("a retry of the same request");
    net.settle();
    net.now = Time(net.now.0 + 5_000_000);
    net.put(1, 5, 1).expect("leader");
    net.settle();
    net.heartbeat();
    let mut last = 0;
    let mut fresh = 0;
    for a in &net.applied[&HostId(3)] {
        if let Apply::Batch {
            time_ms, outcomes, ..
        } = a
        {
            assert!(*time_ms >= last);
            last = *time_ms;
            fresh += outcomes
                .iter()
                .filter(|o| **o == vp_consensus::Outcome::Fresh)
                .count();
        }
    }
    assert_eq!(fresh, 2, "the retry was answered, not applied");
}

/// Candidate h1 of a 3-voter group; `report` is what h2 says it accepted. Returns the
/// `Accept`s h1 sends (slot, value) once it leads, after also being asked to propose.
fn recover_with_report(report: Vec<ReportedEntry>) -> Vec<(u64, Value)> {
    let limits = Limits::default();
    let mut r1 = Replica::new(cfg(1, &limits), Some(membership(3)), Time(0));
    r1.handle_timeout(Time(10_000_000));
    let b = r1.poll_persist().expect("promise record");
    r1.on_persisted(b.token);
    let ballot = r1.status().promised;
    while r1.poll_send().is_some() {}
    r1.handle_message(
        Time(10_000_001),
        HostId(2),
        Message::Promise {
            ballot,
            from: Slot(1),
            log_start: Slot(1),
            entries: report,
            next: None,
        },
    )
    .expect("valid");
    assert!(r1.is_leader());
    // A client command arrives too: it must never go above a kept stop-sign.
    let _ = r1.propose(
        Time(10_000_002),
        Command {
            client: ClientId(1),
            seq: 0,
            ack_below: 0,
            payload: Bytes::from(vec![1]),
        },
    );
    let mut accepts = Vec::new();
    while let Some((to, m)) = r1.poll_send() {
        if let Message::Accept { slot, value, .. } = m
            && to == HostId(2)
        {
            accepts.push((slot.0, value));
        }
    }
    accepts
}

fn ballot(round: u64, leader: u64) -> vp_consensus::Ballot {
    vp_consensus::Ballot {
        epoch: Epoch(1),
        round,
        leader: HostId(leader),
    }
}

fn stop_sign() -> Value {
    let mut m = membership(3);
    m.epoch = Epoch(2);
    m.voters.pop();
    Value::Reconfigure(Arc::new(m))
}

fn some_batch() -> Value {
    Value::Batch(Arc::new(vp_consensus::Batch {
        stamp: Default::default(),
        commands: vec![Command {
            client: ClientId(9),
            seq: 0,
            ack_below: 0,
            payload: Bytes::from(vec![9]),
        }],
    }))
}

#[test]
fn stop_sign_overtaken_by_a_higher_ballot_above_it_becomes_a_noop() {
    // Slot 1 holds a stop-sign from ballot r0.h2, but a later leader (r0.h3) proposed
    // slot 2 without having seen it: the stop-sign was never chosen.
    let accepts = recover_with_report(vec![
        ReportedEntry {
            slot: Slot(1),
            ballot: ballot(0, 2),
            value: stop_sign(),
            decided: false,
        },
        ReportedEntry {
            slot: Slot(2),
            ballot: ballot(0, 3),
            value: some_batch(),
            decided: false,
        },
    ]);
    assert_eq!(accepts[0], (1, Value::Noop));
    assert_eq!(accepts[1], (2, some_batch()));
    assert_eq!(
        accepts.len(),
        3,
        "the new command follows in slot 3: {accepts:?}"
    );
}

#[test]
fn stop_sign_with_only_older_values_above_it_ends_the_epoch() {
    // The stop-sign (r0.h3) is newer than the value above it (r0.h2): nothing above it
    // can have been chosen, so the leader keeps it and proposes nothing above it.
    let accepts = recover_with_report(vec![
        ReportedEntry {
            slot: Slot(1),
            ballot: ballot(0, 3),
            value: stop_sign(),
            decided: false,
        },
        ReportedEntry {
            slot: Slot(2),
            ballot: ballot(0, 2),
            value: some_batch(),
            decided: false,
        },
    ]);
    assert_eq!(accepts, vec![(1, stop_sign())]);
}

#[test]
fn a_gap_below_reported_values_is_filled_with_a_noop() {
    let accepts = recover_with_report(vec![ReportedEntry {
        slot: Slot(3),
        ballot: ballot(0, 2),
        value: some_batch(),
        decided: false,
    }]);
    assert_eq!(accepts[0], (1, Value::Noop));
    assert_eq!(accepts[1], (2, Value::Noop));
    assert_eq!(accepts[2], (3, some_batch()));
}

#[test]
fn file_store_survives_a_restart_of_the_whole_group() {
    let dir = std::env::temp_dir().join(format!("vp-consensus-{}-group", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let limits = Limits::default();
    let mut net = Net::new(3, limits.clone());
    let mut files: BTreeMap<HostId, vp_consensus::FileStore> = (1..=3)
        .map(|i| {
            (
                HostId(i),
                vp_consensus::FileStore::open(dir.join(i.to_string())).expect("open"),
            )
        })
        .collect();
    // Drive the group by hand, committing every replica's batches to its file store
    // (group commit: one fsync for all batches drained at once).
    let mut step = |net: &mut Net| {
        for (h, r) in net.reps.iter_mut() {
            let mut batches = Vec::new();
            while let Some(b) = r.poll_persist() {
                batches.push(b);
            }
            if let Some(t) = files
                .get_mut(h)
                .expect("store")
                .commit(&batches)
                .expect("commit")
            {
                r.on_persisted(t);
            }
            while let Some((to, m)) = r.poll_send() {
                net.queue.push_back((*h, to, m));
            }
            while r.poll_apply().is_some() {}
        }
        let mut n = 0;
        while let Some((from, to, m)) = net.queue.pop_front() {
            n += 1;
            net.reps
                .get_mut(&to)
                .expect("host")
                .handle_message(net.now, from, m)
                .expect("valid");
        }
        n
    };
    net.now = Time(10_000_000);
    net.reps
        .get_mut(&HostId(1))
        .expect("h1")
        .handle_timeout(Time(10_000_000));
    while step(&mut net) > 0 {}
    for seq in 0..20 {
        net.put(1, 3, seq).expect("leader");
    }
    while step(&mut net) > 0 {}
    let before: Vec<_> = net
        .reps
        .values()
        .map(|r| (r.status().promised, r.decided_below()))
        .collect();
    drop(net);
    for i in 1..=3u64 {
        let mut s = vp_consensus::FileStore::open(dir.join(i.to_string())).expect("reopen");
        let r = Replica::recover(
            cfg(i, &limits),
            Some(membership(3)),
            s.load().expect("load"),
            Time(0),
        )
        .expect("recover");
        let (promised, decided) = before[(i - 1) as usize];
        assert_eq!(r.status().promised, promised);
        // The leader's decided watermark is durable only as far as records reached
        // disk; followers learn the last decisions lazily, so allow them to be behind.
        assert!(
            r.decided_below() <= decided,
            "{i}: {:?} vs {decided:?}",
            r.decided_below()
        );
        if i == 1 {
            assert_eq!(
                r.decided_below(),
                decided,
                "the leader's own decisions are on disk"
            );
            // Slot 0 is the election's; the first two commands went out alone
            // and the other 18 queued behind their writes into one batch.
            assert_eq!(decided, Slot(4));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_snapshot_images_are_dropped_without_panic() {
    let limits = Limits::default();
    let mut joiner = Replica::new(cfg(4, &limits), None, Time(0));
    let send = |r: &mut Replica, image: Vec<u8>, slot: u64| {
        let digest = xxhash_rust::xxh3::xxh3_64(&image);
        r.handle_message(
            Time(1),
            HostId(1),
            Message::SnapshotChunk {
                slot: Slot(slot),
                digest,
                total_bytes: image.len() as u64,
                offset: 0,
                data: Bytes::from(image),
            },
        )
    };
    // Bytes that are not an image at all.
    send(&mut joiner, vec![0xff; 100], 5).expect("valid framing");
    // A well-formed image claiming an absurd slot.
    let img = vp_consensus::SnapshotImage {
        slot: Slot(u64::MAX - 1),
        membership: membership(3),
        epoch_start: Slot(1),
        sessions: Default::default(),
        time_ms: 0,
        app_digest: xxhash_rust::xxh3::xxh3_64(&[]),
        app_state: Bytes::default(),
    };
    send(&mut joiner, img.encode(), u64::MAX - 1).expect("valid framing");
    // A digest that does not match the bytes.
    joiner
        .handle_message(
            Time(2),
            HostId(1),
            Message::SnapshotChunk {
                slot: Slot(9),
                digest: 1,
                total_bytes: 3,
                offset: 0,
                data: Bytes::from(vec![1, 2, 3]),
            },
        )
        .expect("valid framing");
    assert!(joiner.poll_apply().is_none(), "nothing installed");
    assert_eq!(joiner.epoch(), Epoch(0));
}

#[test]
fn an_acceptor_never_accepts_below_its_promise() {
    let mut r2 = Replica::new(cfg(2, &Limits::default()), Some(membership(3)), Time(0));
    let (low, high) = (ballot(1, 1), ballot(2, 3));
    r2.handle_message(
        Time(1),
        HostId(3),
        Message::Prepare {
            ballot: high,
            from: Slot(1),
        },
    )
    .expect("valid");
    let b = r2.poll_persist().expect("promise");
    r2.on_persisted(b.token);
    while r2.poll_send().is_some() {}
    // A zombie leader of a lower ballot tries to get a value accepted.
    r2.handle_message(
        Time(2),
        HostId(1),
        Message::Accept {
            ballot: low,
            slot: Slot(1),
            value: some_batch(),
            decided_below: Slot(1),
        },
    )
    .expect("valid");
    assert!(r2.poll_persist().is_none(), "nothing written");
    let sent: Vec<_> = std::iter::from_fn(|| r2.poll_send()).collect();
    assert_eq!(
        sent,
        vec![(
            HostId(1),
            Message::Nack {
                ballot: low,
                promised: high
            }
        )]
    );
}
