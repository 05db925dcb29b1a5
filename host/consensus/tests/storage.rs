//! Storage: the file store's framing, torn-tail recovery, atomic snapshots and
//! compaction; group commit; the fault-injecting store's crash model.

use std::path::PathBuf;
use vp_consensus::rng::Rng;
use vp_consensus::storage::{frame_record, parse_log};
use vp_consensus::{
    Ballot, Bytes, Epoch, FaultStore, FileStore, HostId, MemStore, PersistBatch, Record, Slot,
    SnapshotFile, Storage, StorageError, Value,
};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vp-consensus-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn ballot(round: u64) -> Ballot {
    Ballot {
        epoch: Epoch(1),
        round,
        leader: HostId(1),
    }
}

fn accept(slot: u64) -> Record {
    Record::Accept {
        slot: Slot(slot),
        ballot: ballot(1),
        value: Value::Noop,
    }
}

#[test]
fn file_store_round_trips_records() {
    let dir = temp_dir("roundtrip");
    let mut s = FileStore::open(&dir).expect("open");
    let recs = vec![Record::Promise { ballot: ballot(3) }, accept(1), accept(2)];
    s.append(&recs).expect("append");
    s.sync().expect("sync");
    drop(s);
    let mut s = FileStore::open(&dir).expect("reopen");
    let got = s.load().expect("load");
    assert_eq!(got.records, recs);
    assert!(got.snapshot.is_none());
}

#[test]
fn the_log_is_preallocated_and_its_zero_tail_is_not_a_record() {
    let dir = temp_dir("prealloc");
    let mut s = FileStore::open(&dir).expect("open");
    s.append(&[accept(1), accept(2)]).expect("append");
    s.sync().expect("sync");
    let log = dir.join("log");
    let len = std::fs::metadata(&log).expect("meta").len();
    assert_eq!(len, vp_consensus::storage::LOG_PREALLOCATE_BYTES);
    let data = std::fs::read(&log).expect("read");
    let (records, end) = parse_log(&data);
    assert_eq!(records, vec![accept(1), accept(2)]);
    assert!(data[end..].iter().all(|b| *b == 0));
    // Appends fill the zeros; the file grows in whole steps, less than one
    // step ahead of the records.
    let big = Record::Accept {
        slot: Slot(3),
        ballot: ballot(1),
        value: Value::Batch(std::sync::Arc::new(vp_consensus::Batch {
            stamp: Default::default(),
            commands: vec![vp_consensus::Command {
                client: vp_consensus::ClientId(1),
                seq: 1,
                ack_below: 0,
                payload: Bytes::from(vec![7u8; 5 << 20]),
            }],
        })),
    };
    s.append(std::slice::from_ref(&big)).expect("append");
    s.append(&[accept(4)]).expect("append");
    s.sync().expect("sync");
    let len = std::fs::metadata(&log).expect("meta").len();
    let data = std::fs::read(&log).expect("read");
    let (_, end) = parse_log(&data);
    let step = vp_consensus::storage::LOG_PREALLOCATE_BYTES;
    assert!(
        len.is_multiple_of(step) && len >= end as u64 && len - (end as u64) < step,
        "{len} bytes for {end} bytes of records"
    );
    drop(s);
    let mut s = FileStore::open(&dir).expect("reopen");
    let got = s.load().expect("load").records;
    assert_eq!(got, vec![accept(1), accept(2), big, accept(4)]);
}

#[test]
fn recovery_stops_cleanly_at_a_torn_tail_and_appends_after_it() {
    let dir = temp_dir("torn");
    let mut s = FileStore::open(&dir).expect("open");
    s.append(&[accept(1), accept(2), accept(3)])
        .expect("append");
    s.sync().expect("sync");
    drop(s);
    // A crash mid-write leaves half a frame where the zeros began.
    let log = dir.join("log");
    let mut data = std::fs::read(&log).expect("read");
    let (_, whole) = parse_log(&data);
    data[whole..whole + 7].copy_from_slice(&[40, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&log, &data).expect("write");

    let mut s = FileStore::open(&dir).expect("reopen");
    assert_eq!(s.load().expect("load").records.len(), 3);
    assert_eq!(
        std::fs::metadata(&log).expect("meta").len() as usize,
        whole,
        "torn tail and zeros cut off"
    );
    s.append(&[accept(4)]).expect("append");
    s.sync().expect("sync");
    let got = s.load().expect("load").records;
    assert_eq!(got, vec![accept(1), accept(2), accept(3), accept(4)]);
}

#[test]
fn recovery_stops_at_a_corrupt_record() {
    let dir = temp_dir("corrupt");
    let mut s = FileStore::open(&dir).expect("open");
    s.append(&[accept(1)]).expect("append");
    let mut frame = Vec::new();
    frame_record(&accept(1), &mut frame).expect("frame");
    let first = frame.len();
    s.append(&[accept(2), accept(3)]).expect("append");
    s.sync().expect("sync");
    drop(s);
    let log = dir.join("log");
    let mut data = std::fs::read(&log).expect("read");
    data[first + 9] ^= 0xff; // inside the second record's payload
    std::fs::write(&log, &data).expect("write");
    let mut s = FileStore::open(&dir).expect("reopen");
    assert_eq!(s.load().expect("load").records, vec![accept(1)]);
}

#[test]
fn snapshots_are_atomic_and_checked() {
    let dir = temp_dir("snap");
    let mut s = FileStore::open(&dir).expect("open");
    let snap = SnapshotFile {
        slot: Slot(9),
        digest: 1,
        image: Bytes::from(vec![5u8; 10_000]),
    };
    s.save_snapshot(&snap).expect("save");
    // A crash while writing the next one leaves only a temp file: ignored.
    std::fs::write(dir.join("snapshot.tmp"), b"half").expect("write");
    assert_eq!(s.load().expect("load").snapshot, Some(snap.image.clone()));
    // A damaged snapshot is an error, not a silent empty state.
    let p = dir.join("snapshot");
    let mut data = std::fs::read(&p).expect("read");
    let n = data.len();
    data[n - 1] ^= 1;
    std::fs::write(&p, &data).expect("write");
    assert!(matches!(s.load(), Err(StorageError::CorruptSnapshot(_))));
}

#[test]
fn compaction_drops_old_slots_but_keeps_the_promise() {
    let dir = temp_dir("compact");
    let mut s = FileStore::open(&dir).expect("open");
    s.append(&[
        Record::Promise { ballot: ballot(1) },
        accept(1),
        accept(2),
        Record::Promise { ballot: ballot(2) },
        accept(3),
    ])
    .expect("append");
    s.compact(Slot(3)).expect("compact");
    s.append(&[accept(4)]).expect("append after compaction");
    let got = s.load().expect("load").records;
    assert_eq!(
        got,
        vec![Record::Promise { ballot: ballot(2) }, accept(3), accept(4)]
    );
    let mut m = MemStore::default();
    m.append(&[Record::Promise { ballot: ballot(1) }, accept(1), accept(5)])
        .expect("append");
    m.compact(Slot(2)).expect("compact");
    assert_eq!(
        m.records,
        vec![Record::Promise { ballot: ballot(1) }, accept(5)]
    );
}

/// The file store compacts by copying the frames it keeps (an index kept as
/// it appends, rebuilt when it opens). Whatever the mix of records (slots out
/// of order, several promises and watermarks, compactions between appends, a
/// reopen in between), it must keep exactly what the in-memory store keeps.
#[test]
fn file_store_compaction_keeps_what_the_memory_store_keeps() {
    for seed in 1..=20u64 {
        let dir = temp_dir(&format!("compact-model-{seed}"));
        let mut rng = Rng::new(seed);
        let mut file = FileStore::open(&dir).expect("open");
        let mut mem = MemStore::default();
        let mut top = 0u64;
        for round in 0..12 {
            let records: Vec<Record> = (0..rng.range(1, 40))
                .map(|_| match rng.range(0, 10) {
                    0 => Record::Promise {
                        ballot: ballot(rng.range(1, 100)),
                    },
                    1 => Record::Decided {
                        below: Slot(rng.range(0, top + 1)),
                    },
                    2 => Record::Learn {
                        slot: Slot(rng.range(0, top + 1)),
                        value: Value::Noop,
                    },
                    _ => {
                        top += 1;
                        accept(top.saturating_sub(rng.range(0, 3)))
                    }
                })
                .collect();
            file.append(&records).expect("append");
            mem.append(&records).expect("append");
            if rng.range(0, 3) == 0 {
                let below = Slot(rng.range(0, top + 2));
                file.compact(below).expect("compact");
                mem.compact(below).expect("compact");
            }
            if round == 6 {
                file.sync().expect("sync");
                drop(file);
                file = FileStore::open(&dir).expect("reopen");
                let got = file.load().expect("load").records;
                assert_eq!(got, mem.records, "seed {seed}: after reopening");
            }
        }
        file.sync().expect("sync");
        assert_eq!(
            file.load().expect("load").records,
            mem.records,
            "seed {seed}"
        );
        drop(file);
        let mut reopened = FileStore::open(&dir).expect("reopen");
        assert_eq!(
            reopened.load().expect("load").records,
            mem.records,
            "seed {seed}: after the last reopen"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn group_commit_syncs_once_for_many_batches() {
    let mut s = FaultStore::new();
    let batches: Vec<PersistBatch> = (1..=5)
        .map(|t| PersistBatch {
            token: t,
            records: vec![accept(t)],
            must_sync: true,
            snapshot: None,
            compact_below: None,
            snapshot_may_lag: false,
        })
        .collect();
    assert_eq!(s.commit(&batches).expect("commit"), Some(5));
    assert_eq!(s.syncs, 1);
    assert_eq!(s.load().expect("load").records.len(), 5);
}

#[test]
fn fault_store_crash_loses_unsynced_writes_only() {
    let mut rng = Rng::new(3);
    let mut lost_any = false;
    for _ in 0..20 {
        let mut s = FaultStore::new();
        s.append(&[accept(1), accept(2)]).expect("append");
        s.sync().expect("sync");
        s.append(&[accept(3), accept(4), accept(5)])
            .expect("append");
        s.crash(&mut rng);
        let got = s.load().expect("load").records;
        assert!(got.len() >= 2 && got.len() <= 5);
        assert_eq!(
            got[..],
            [accept(1), accept(2), accept(3), accept(4), accept(5)][..got.len()]
        );
        lost_any |= got.len() < 5;
    }
    assert!(lost_any);
    let mut s = FaultStore::new();
    s.fail_next_write();
    assert!(matches!(
        s.append(&[accept(1)]),
        Err(StorageError::Injected)
    ));
    assert!(s.append(&[accept(1)]).is_ok());
}
