//! Regressions found by the fuzz targets (`host/fuzz`, docs/fuzzing.md): hostile
//! network input and corrupt durable state must cost little and end in an error
//! value, never in a huge allocation, a hang or a panic.

use std::time::{Duration, Instant};
use vp_consensus::{
    Ballot, Bytes, Epoch, HostId, Limits, Membership, Message, RECOVERY_SLOTS_AHEAD_MIN, Record,
    RecoverError, Recovered, Replica, ReplicaConfig, ReportedEntry, SessionTable, Slot,
    SnapshotImage, Time, Timing, Value,
};

fn cfg(id: u64) -> ReplicaConfig {
    ReplicaConfig {
        id: HostId(id),
        seed: id,
        timing: Timing::default(),
        limits: Limits::default(),
    }
}

fn membership() -> Membership {
    Membership {
        epoch: Epoch(1),
        voters: vec![HostId(1), HostId(2), HostId(3)],
        learners: Vec::new(),
    }
}

fn ballot(round: u64, leader: u64) -> Ballot {
    Ballot {
        epoch: Epoch(1),
        round,
        leader: HostId(leader),
    }
}

/// Host 1 as a candidate whose promise record is durable; its ballot.
fn candidate() -> (Replica, Ballot) {
    let mut r = Replica::new(cfg(1), Some(membership()), Time(0));
    r.campaign(Time(1));
    while let Some(b) = r.poll_persist() {
        r.on_persisted(b.token);
    }
    while r.poll_send().is_some() {}
    let ballot = r.status().promised;
    (r, ballot)
}

/// Found while writing the `consensus_message` target (one such input through it
/// took 14 s): one promise reporting a value at a slot far beyond everything else
/// made the new leader build a value for every slot in between (50 million
/// slots: seconds and gigabytes; `u64::MAX`: an overflow).
#[test]
fn a_promise_reporting_a_slot_far_ahead_ends_the_candidacy() {
    for far in [50_000_000, u64::MAX / 2, u64::MAX] {
        let (mut r, promised) = candidate();
        let started = Instant::now();
        r.handle_message(
            Time(2),
            HostId(2),
            Message::Promise {
                ballot: promised,
                from: Slot(1),
                log_start: Slot(1),
                entries: vec![ReportedEntry {
                    slot: Slot(far),
                    ballot: ballot(1, 2),
                    value: Value::Noop,
                    decided: false,
                }],
                next: None,
            },
        )
        .expect("a well-formed message");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(!r.is_leader(), "slot {far}: gave up instead of leading");
        let asks_catchup = std::iter::from_fn(|| r.poll_send())
            .any(|(to, m)| to == HostId(2) && matches!(m, Message::CatchUpRequest { .. }));
        assert!(asks_catchup, "slot {far}: learns what it missed first");
    }
}

/// A report within reach still makes the candidate lead (the guard above is
/// not in the way of the normal case).
#[test]
fn a_promise_reporting_nearby_slots_still_elects() {
    let (mut r, promised) = candidate();
    r.handle_message(
        Time(2),
        HostId(2),
        Message::Promise {
            ballot: promised,
            from: Slot(1),
            log_start: Slot(1),
            entries: vec![ReportedEntry {
                slot: Slot(100),
                ballot: ballot(1, 2),
                value: Value::Noop,
                decided: false,
            }],
            next: None,
        },
    )
    .expect("a well-formed message");
    assert!(r.is_leader());
}

fn accept(slot: u64) -> Record {
    Record::Accept {
        slot: Slot(slot),
        ballot: ballot(1, 2),
        value: Value::Noop,
    }
}

/// Found by the `consensus_storage` replay: a log record (with a valid CRC) for a slot far
/// beyond the decided watermark made recovery allocate a place for every slot
/// up to it (27 million slots: 400 MB; `u64::MAX`: out of memory). Recovery now
/// ends the log at such a record, as at a torn frame.
#[test]
fn recovery_ends_the_log_at_a_record_far_beyond_the_watermark() {
    for far in [27_000_000, u64::MAX] {
        let records = vec![
            Record::Promise {
                ballot: ballot(1, 2),
            },
            accept(1),
            accept(2),
            accept(far),
            accept(3),
        ];
        let r = Replica::recover(
            cfg(1),
            Some(membership()),
            Recovered {
                snapshot: None,
                records,
            },
            Time(0),
        )
        .expect("recovers");
        let status = r.status();
        assert_eq!(status.promised, ballot(1, 2));
        assert_eq!(
            status.log_end,
            Slot(3),
            "slots 1 and 2 replayed, nothing after"
        );
    }
}

/// Records up to the generous recovery bound still replay (a log written under
/// larger limits, or by a leader far ahead of its own watermark).
#[test]
fn recovery_keeps_records_within_reach() {
    let near = RECOVERY_SLOTS_AHEAD_MIN - 1;
    let r = Replica::recover(
        cfg(1),
        Some(membership()),
        Recovered {
            snapshot: None,
            records: vec![accept(1), accept(near)],
        },
        Time(0),
    )
    .expect("recovers");
    assert_eq!(r.status().log_end, Slot(near + 1));
}

fn image(slot: u64, epoch_start: u64, voters: Vec<HostId>) -> Bytes {
    SnapshotImage {
        slot: Slot(slot),
        membership: Membership {
            epoch: Epoch(1),
            voters,
            learners: Vec::new(),
        },
        epoch_start: Slot(epoch_start),
        sessions: SessionTable::default(),
        time_ms: 0,
        app_digest: xxhash_rust::xxh3::xxh3_64(&[]),
        app_state: Bytes::default(),
    }
    .encode()
    .into()
}

/// Seen while fixing the above (same recovery path): a stored snapshot image
/// (valid CRC and digest) was installed without the checks a received image
/// passes; a slot of `u64::MAX` overflowed. Recovery now applies those checks
/// and refuses such an image with an error.
#[test]
fn recovery_refuses_an_out_of_range_snapshot_image() {
    for (bytes, why) in [
        (image(u64::MAX, 1, vec![HostId(1)]), "slot"),
        (image(5, 9, vec![HostId(1)]), "epoch start"),
        (image(5, 1, Vec::new()), "no voters"),
        (
            image(5, 1, (1..=8).map(HostId).collect()),
            "too many voters",
        ),
    ] {
        let err = Replica::recover(
            cfg(1),
            Some(membership()),
            Recovered {
                snapshot: Some(bytes),
                records: Vec::new(),
            },
            Time(0),
        )
        .err();
        assert!(
            matches!(err, Some(RecoverError::BadImage(_))),
            "{why}: {err:?}"
        );
    }
    let ok = Replica::recover(
        cfg(1),
        Some(membership()),
        Recovered {
            snapshot: Some(image(5, 1, vec![HostId(1), HostId(2), HostId(3)])),
            records: Vec::new(),
        },
        Time(0),
    )
    .expect("a sane image recovers");
    assert_eq!(ok.decided_below(), Slot(6));
}
