//! Durable storage for a replica: the [`Storage`] trait and three implementations.
//!
//! The replica never calls storage itself; the caller moves each
//! [`PersistBatch`](crate::record::PersistBatch) from `poll_persist` into a store and
//! then acknowledges it with `Replica::on_persisted`.
//!
//! # Atomic write contract
//!
//! - `append` writes whole records. After a crash, `load` returns a prefix of the
//!   records appended (never a torn or corrupt record, never a gap), and every record
//!   appended before the last successful `sync` is in that prefix.
//! - `save_snapshot` is atomic and durable when it returns: `load` returns either the
//!   previous snapshot or the new one, whole.
//! - `compact` is atomic and durable when it returns: `load` returns either the old log
//!   or the log without records about slots below the bound.

use crate::record::{PersistBatch, Record, Recovered, SnapshotFile};
use crate::rng::Rng;
use crate::types::{Bytes, Slot};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A storage failure. The replica's state is then unknown to the disk: the caller must
/// stop this replica and restart it from `load` (fail-stop).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt snapshot file {0}")]
    CorruptSnapshot(PathBuf),
    #[error("record of {0} bytes exceeds record_bytes_max")]
    RecordTooLarge(usize),
    #[error("injected write failure")]
    Injected,
}

/// Durable state of one replica. See the module documentation for the contract.
pub trait Storage {
    fn append(&mut self, records: &[Record]) -> Result<(), StorageError>;
    fn sync(&mut self) -> Result<(), StorageError>;
    fn save_snapshot(&mut self, snap: &SnapshotFile) -> Result<(), StorageError>;
    fn compact(&mut self, below: Slot) -> Result<(), StorageError>;
    fn load(&mut self) -> Result<Recovered, StorageError>;

    /// Writes one batch in the order the contract requires, without syncing.
    fn write_batch(&mut self, b: &PersistBatch) -> Result<(), StorageError> {
        self.append(&b.records)?;
        if let Some(s) = &b.snapshot {
            self.save_snapshot(s)?;
        }
        if let Some(below) = b.compact_below {
            self.compact(below)?;
        }
        Ok(())
    }

    /// Group commit: writes every batch, then one sync if any batch needs it. Returns
    /// the token to pass to `Replica::on_persisted`, if any batch was given.
    fn commit(&mut self, batches: &[PersistBatch]) -> Result<Option<u64>, StorageError> {
        for b in batches {
            self.write_batch(b)?;
        }
        if batches.iter().any(|b| b.must_sync) {
            self.sync()?;
        }
        Ok(batches.last().map(|b| b.token))
    }
}

/// Keeps only what recovery needs: records about slots at or above `below`, and the
/// last promise and decided watermark.
fn compact_records(records: Vec<Record>, below: Slot) -> Vec<Record> {
    let keep = compaction_keeps(records.iter().map(FrameKind::of), below);
    records
        .into_iter()
        .zip(keep)
        .filter_map(|(r, k)| k.then_some(r))
        .collect()
}

/// Which of a log's records (given by kind, in log order) a compaction below
/// `below` keeps: those about slots at or above it, and the last promise and
/// the last decided watermark. The one rule for every store.
fn compaction_keeps(kinds: impl Iterator<Item = FrameKind> + Clone, below: Slot) -> Vec<bool> {
    let last = |kind: FrameKind| kinds.clone().enumerate().filter(|(_, k)| *k == kind).last();
    let last_promise = last(FrameKind::Promise).map(|(i, _)| i);
    let last_decided = last(FrameKind::Decided).map(|(i, _)| i);
    kinds
        .enumerate()
        .map(|(i, kind)| match kind {
            FrameKind::About(slot) => slot >= below,
            FrameKind::Promise => Some(i) == last_promise,
            FrameKind::Decided => Some(i) == last_decided,
        })
        .collect()
}

/// In-memory store: everything is durable at once. For tests and the benchmark.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    pub records: Vec<Record>,
    pub snapshot: Option<Bytes>,
}

impl Storage for MemStore {
    fn append(&mut self, records: &[Record]) -> Result<(), StorageError> {
        self.records.extend_from_slice(records);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }
    fn save_snapshot(&mut self, snap: &SnapshotFile) -> Result<(), StorageError> {
        self.snapshot = Some(snap.image.clone());
        Ok(())
    }
    fn compact(&mut self, below: Slot) -> Result<(), StorageError> {
        self.records = compact_records(std::mem::take(&mut self.records), below);
        Ok(())
    }
    fn load(&mut self) -> Result<Recovered, StorageError> {
        Ok(Recovered {
            snapshot: self.snapshot.clone(),
            records: self.records.clone(),
        })
    }
}

/// A store for the simulator that models a disk with a volatile write cache.
/// `crash` loses unsynced records (keeping a random prefix of them, since a disk may
/// have written some), and `fail_next_write` makes the next write fail.
#[derive(Debug, Clone, Default)]
pub struct FaultStore {
    synced: Vec<Record>,
    unsynced: Vec<Record>,
    snapshot: Option<Bytes>,
    fail_next: bool,
    /// Counters for reports.
    pub syncs: u64,
    pub lost_records: u64,
}

impl FaultStore {
    pub fn new() -> FaultStore {
        FaultStore::default()
    }

    /// Simulates power loss: unsynced records are lost, except a random prefix.
    pub fn crash(&mut self, rng: &mut Rng) {
        let keep = rng.below(self.unsynced.len() as u64 + 1) as usize;
        self.lost_records += (self.unsynced.len() - keep) as u64;
        let kept: Vec<Record> = self.unsynced.drain(..keep).collect();
        self.unsynced.clear();
        self.synced.extend(kept);
        self.fail_next = false;
    }

    /// The next append, sync, snapshot or compaction fails.
    pub fn fail_next_write(&mut self) {
        self.fail_next = true;
    }

    fn check_fail(&mut self) -> Result<(), StorageError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(StorageError::Injected);
        }
        Ok(())
    }
}

impl Storage for FaultStore {
    fn append(&mut self, records: &[Record]) -> Result<(), StorageError> {
        self.check_fail()?;
        self.unsynced.extend_from_slice(records);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), StorageError> {
        self.check_fail()?;
        self.syncs += 1;
        self.synced.append(&mut self.unsynced);
        Ok(())
    }
    fn save_snapshot(&mut self, snap: &SnapshotFile) -> Result<(), StorageError> {
        self.check_fail()?;
        self.snapshot = Some(snap.image.clone());
        Ok(())
    }
    fn compact(&mut self, below: Slot) -> Result<(), StorageError> {
        self.check_fail()?;
        // A real compaction rewrites and syncs the whole log.
        self.synced.append(&mut self.unsynced);
        self.synced = compact_records(std::mem::take(&mut self.synced), below);
        Ok(())
    }
    fn load(&mut self) -> Result<Recovered, StorageError> {
        let mut records = self.synced.clone();
        records.extend(self.unsynced.iter().cloned());
        Ok(Recovered {
            snapshot: self.snapshot.clone(),
            records,
        })
    }
}

const RECORD_BYTES_MAX: usize = 1 << 30;
const SNAPSHOT_MAGIC: &[u8; 8] = b"vpsnap01";

/// The default store: a directory holding an append-only log file (`log`) and the
/// latest snapshot (`snapshot`).
///
/// Log framing: `[len: u32 LE][crc32c(payload): u32 LE][payload: postcard Record]`.
/// The file is extended with zeros [`LOG_PREALLOCATE_BYTES`] at a time ahead of the
/// records, so a sync after an append writes the data only, not the file's size
/// too (half the cost of an `fdatasync` on ext4). A zero frame (length 0, checksum
/// 0, no record) ends the log. Recovery reads frames until the first short,
/// corrupt or zero one, then cuts the file there (a torn tail from a crash, or the
/// unused zeros), so later appends follow the last good record.
/// Snapshot file: `[magic][len: u64 LE][crc32c: u32 LE][image]`, written to
/// `snapshot.tmp`, fsynced, renamed over `snapshot`, and the directory fsynced.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    log: File,
    buf: Vec<u8>,
    /// Where the next record goes: the end of the intact records.
    end: u64,
    /// The log file's length (`end` plus zeros).
    allocated: u64,
    /// Every intact record's frame, in file order: compaction copies the kept
    /// frames as they are instead of reading, decoding and re-encoding the log
    /// (which took tens of milliseconds for a 10,000-slot log, and the
    /// member's writes waited behind it).
    frames: Vec<Frame>,
}

/// Zeros the log file is extended by when records reach its end (each
/// extension is written and synced once: a larger step costs a longer pause).
pub const LOG_PREALLOCATE_BYTES: u64 = 1 << 20;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Appends one log frame holding `rec` to `out` (the log file's format; see [`FileStore`]).
pub fn frame_record(rec: &Record, out: &mut Vec<u8>) -> Result<(), StorageError> {
    let payload = postcard::to_allocvec(rec).expect("encoding a record into memory cannot fail");
    if payload.len() > RECORD_BYTES_MAX {
        return Err(StorageError::RecordTooLarge(payload.len()));
    }
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Parses a log file's frames (see [`FileStore`]); returns the records and the length
/// of the intact prefix. Stops at the first short, corrupt or undecodable frame.
pub fn parse_log(data: &[u8]) -> (Vec<Record>, usize) {
    let (frames, good) = parse_frames(data);
    (frames.into_iter().map(|(r, _)| r).collect(), good)
}

/// What `FileStore::read_log` finds: the intact records with their frames,
/// the intact prefix's length and the file's length.
type LogContents = (Vec<(Record, Frame)>, usize, u64);

/// `parse_log`, with where each record's frame lies.
fn parse_frames(data: &[u8]) -> (Vec<(Record, Frame)>, usize) {
    let mut records = Vec::new();
    let mut pos = 0usize;
    while data.len() - pos >= 8 {
        let len =
            u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        let Some(end) = (pos + 8).checked_add(len) else {
            break;
        };
        // A zero length is the preallocated tail (no record encodes to nothing).
        if len == 0 || len > RECORD_BYTES_MAX || end > data.len() {
            break;
        }
        let payload = &data[pos + 8..end];
        if crc32c::crc32c(payload) != crc {
            break;
        }
        match postcard::from_bytes::<Record>(payload) {
            Ok(r) => {
                let frame = Frame::of(&r, pos as u64, (end - pos) as u64);
                records.push((r, frame));
            }
            Err(_) => break,
        }
        pos = end;
    }
    (records, pos)
}

/// Where one record's frame lies in the log file, and what compaction needs
/// to know of the record (`FileStore::compact` keeps frames without decoding them).
#[derive(Clone, Copy, Debug)]
struct Frame {
    at: u64,
    len: u64,
    kind: FrameKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameKind {
    About(Slot),
    Promise,
    Decided,
}

impl FrameKind {
    fn of(r: &Record) -> FrameKind {
        match r {
            Record::Promise { .. } => FrameKind::Promise,
            Record::Decided { .. } => FrameKind::Decided,
            Record::Accept { slot, .. } | Record::Learn { slot, .. } => FrameKind::About(*slot),
        }
    }
}

impl Frame {
    fn of(r: &Record, at: u64, len: u64) -> Frame {
        Frame {
            at,
            len,
            kind: FrameKind::of(r),
        }
    }
}

/// The snapshot file's contents for `image` (see [`FileStore`]).
pub fn encode_snapshot_file(image: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(image.len() + 20);
    data.extend_from_slice(SNAPSHOT_MAGIC);
    data.extend_from_slice(&(image.len() as u64).to_le_bytes());
    data.extend_from_slice(&crc32c::crc32c(image).to_le_bytes());
    data.extend_from_slice(image);
    data
}

/// The image held by a snapshot file's contents, or `None` if the file is corrupt
/// (bad magic, length or checksum).
pub fn parse_snapshot_file(data: &[u8]) -> Option<&[u8]> {
    if data.len() < 20 || &data[..8] != SNAPSHOT_MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(data[8..16].try_into().ok()?);
    let crc = u32::from_le_bytes(data[16..20].try_into().ok()?);
    let image = &data[20..];
    if image.len() as u64 != len || crc32c::crc32c(image) != crc {
        return None;
    }
    Some(image)
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`. New records go after the
    /// intact ones already in the log.
    pub fn open(dir: impl AsRef<Path>) -> Result<FileStore, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join("log");
        let log = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut store = FileStore {
            dir,
            log,
            buf: Vec::new(),
            end: 0,
            allocated: 0,
            frames: Vec::new(),
        };
        let (records, good, len) = store.read_log()?;
        store.frames = records.into_iter().map(|(_, f)| f).collect();
        store.end = good as u64;
        store.allocated = len;
        if store.end < len {
            store.cut()?;
        }
        Ok(store)
    }

    /// Cut the log after its intact records (dropping a torn tail and unused zeros).
    fn cut(&mut self) -> Result<(), StorageError> {
        let path = self.log_path();
        self.log.set_len(self.end).map_err(io_err(&path))?;
        self.log.sync_all().map_err(io_err(&path))?;
        self.allocated = self.end;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// The log's intact records with their frames, the intact length and the file's length.
    fn read_log(&self) -> Result<LogContents, StorageError> {
        let path = self.log_path();
        let mut data = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(io_err(&path))?;
        let (records, good) = parse_frames(&data);
        Ok((records, good, data.len() as u64))
    }

    fn write_atomically(&self, name: &str, data: &[u8]) -> Result<(), StorageError> {
        write_atomically(&self.dir, name, data)
    }

    /// Bytes of intact records in the log file.
    pub fn log_bytes(&self) -> u64 {
        self.end
    }

    /// A writer of this store's snapshot file that can run on another thread
    /// while this store goes on appending (see `PersistBatch::snapshot_may_lag`;
    /// the caller compacts only after it returned).
    pub fn snapshot_writer(
        &self,
    ) -> impl FnOnce(&SnapshotFile) -> Result<(), StorageError> + Send + use<> {
        let dir = self.dir.clone();
        move |snap| write_atomically(&dir, "snapshot", &encode_snapshot_file(&snap.image))
    }
}

/// Write `data` to `dir/name` through a synced temporary file, a rename and
/// a synced directory: afterwards the file holds the old data or the new, whole.
fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> Result<(), StorageError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(data).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    fsync_dir(dir)
}

impl Storage for FileStore {
    fn append(&mut self, records: &[Record]) -> Result<(), StorageError> {
        self.buf.clear();
        let mut frames = Vec::with_capacity(records.len());
        for r in records {
            let at = self.buf.len();
            frame_record(r, &mut self.buf)?;
            let len = (self.buf.len() - at) as u64;
            frames.push(Frame::of(r, self.end + at as u64, len));
        }
        let path = self.log_path();
        let needed = self.end + self.buf.len() as u64;
        if needed > self.allocated {
            // Zeros up to the next whole step past the new records; the sync
            // that follows makes the new length durable once for many appends.
            let target = needed.div_ceil(LOG_PREALLOCATE_BYTES) * LOG_PREALLOCATE_BYTES;
            let zeros = vec![0u8; (target - self.allocated) as usize];
            self.log
                .write_all_at(&zeros, self.allocated)
                .map_err(io_err(&path))?;
            self.allocated = target;
        }
        self.log
            .write_all_at(&self.buf, self.end)
            .map_err(io_err(&path))?;
        self.end = needed;
        self.frames.extend(frames);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        let path = self.log_path();
        self.log.sync_data().map_err(io_err(&path))
    }

    fn save_snapshot(&mut self, snap: &SnapshotFile) -> Result<(), StorageError> {
        self.write_atomically("snapshot", &encode_snapshot_file(&snap.image))
    }

    fn compact(&mut self, below: Slot) -> Result<(), StorageError> {
        // The frames `compaction_keeps` keeps, copied byte for byte (a frame
        // does not depend on where it lies), contiguous ones in one read.
        let keep = compaction_keeps(self.frames.iter().map(|f| f.kind), below);
        let kept: Vec<Frame> = self
            .frames
            .iter()
            .zip(keep)
            .filter_map(|(f, k)| k.then_some(*f))
            .collect();
        let path = self.log_path();
        let mut data = Vec::with_capacity(kept.iter().map(|f| f.len as usize).sum());
        let mut moved = Vec::with_capacity(kept.len());
        let mut i = 0;
        while i < kept.len() {
            let start = kept[i].at;
            let mut end = start;
            while i < kept.len() && kept[i].at == end {
                moved.push(Frame {
                    at: data.len() as u64 + (kept[i].at - start),
                    ..kept[i]
                });
                end += kept[i].len;
                i += 1;
            }
            let from = data.len();
            data.resize(from + (end - start) as usize, 0);
            self.log
                .read_exact_at(&mut data[from..], start)
                .map_err(io_err(&path))?;
        }
        // The new log comes preallocated (its zeros synced with it), so the
        // next append's sync need not also make a new file length durable.
        let end = data.len() as u64;
        let allocated = end.div_ceil(LOG_PREALLOCATE_BYTES).max(1) * LOG_PREALLOCATE_BYTES;
        data.resize(allocated as usize, 0);
        self.write_atomically("log", &data)?;
        self.log = OpenOptions::new()
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&path))?;
        self.end = end;
        self.allocated = allocated;
        self.frames = moved;
        Ok(())
    }

    fn load(&mut self) -> Result<Recovered, StorageError> {
        let (records, good, len) = self.read_log()?;
        let (records, frames): (Vec<Record>, Vec<Frame>) = records.into_iter().unzip();
        self.frames = frames;
        self.end = good as u64;
        self.allocated = len;
        if self.end < len {
            // A torn or corrupt tail, or unused zeros: cut it off so new records
            // follow intact ones.
            self.cut()?;
        }
        let snap_path = self.dir.join("snapshot");
        let snapshot = match fs::read(&snap_path) {
            Ok(data) => match parse_snapshot_file(&data) {
                Some(image) => Some(Bytes::from(image)),
                None => return Err(StorageError::CorruptSnapshot(snap_path)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(StorageError::Io {
                    path: snap_path,
                    source: e,
                });
            }
        };
        Ok(Recovered { snapshot, records })
    }
}
