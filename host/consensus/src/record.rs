//! What a replica asks its caller to make durable, and the snapshot image format.

use crate::session::SessionTable;
use crate::types::{Ballot, Bytes, Membership, Slot, Value};
use serde::{Deserialize, Serialize};

/// One durable log record. Replayed in order on recovery; a later record wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// The acceptor promised not to accept any lower ballot. Must be synced.
    Promise { ballot: Ballot },
    /// The acceptor accepted `value` for `slot` in `ballot`. Must be synced.
    Accept {
        slot: Slot,
        ballot: Ballot,
        value: Value,
    },
    /// A decided value learned by catch-up. Need not be synced (it can be learned again).
    Learn { slot: Slot, value: Value },
    /// Every entry this replica holds below `below` is decided. Need not be synced.
    Decided { below: Slot },
}

impl Record {
    /// The slot a record is about, if any (compaction drops records below a snapshot).
    pub fn slot(&self) -> Option<Slot> {
        match self {
            Record::Promise { .. } | Record::Decided { .. } => None,
            Record::Accept { slot, .. } | Record::Learn { slot, .. } => Some(*slot),
        }
    }
}

/// A snapshot ready to store or send: the encoded [`SnapshotImage`] and its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub slot: Slot,
    /// xxh3-64 of `image`; a transfer resumes only into an image with the same digest.
    pub digest: u64,
    pub image: Bytes,
}

impl SnapshotFile {
    pub fn from_image(img: &SnapshotImage) -> SnapshotFile {
        let image = Bytes::from(img.encode());
        SnapshotFile {
            slot: img.slot,
            digest: xxhash_rust::xxh3::xxh3_64(&image),
            image,
        }
    }
}

/// Everything replicated state holds at a slot: the caller's application state plus
/// what the replica itself replicates (membership, sessions, log time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotImage {
    /// The last slot whose effects are included.
    pub slot: Slot,
    /// The membership in force after `slot`.
    pub membership: Membership,
    /// First slot of `membership`'s epoch.
    pub epoch_start: Slot,
    pub sessions: SessionTable,
    /// Log time (ms) after `slot`: time stamps never go back across a snapshot.
    pub time_ms: u64,
    /// Digest of `app_state`, so replicas can compare states at equal slots.
    pub app_digest: u64,
    /// The application's state, opaque to the replica. Empty at slot 0 means "fresh".
    pub app_state: Bytes,
}

/// Why a snapshot image could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("snapshot image does not decode: {0}")]
    Decode(String),
    #[error("snapshot image digest mismatch")]
    Digest,
}

/// The bytes of a [`SnapshotImage`]'s encoding before its application
/// state's bytes, borrowed: postcard writes a struct's fields one after
/// another and a byte string as its length (a varint, as it writes a `u64`)
/// then the bytes, so this followed by the state is the image's encoding.
#[derive(Serialize)]
struct ImageHead<'a> {
    slot: Slot,
    membership: &'a Membership,
    epoch_start: Slot,
    sessions: &'a SessionTable,
    time_ms: u64,
    app_digest: u64,
    app_len: u64,
}

/// The parts of a [`SnapshotImage`] other than its application state, for
/// [`SnapshotFile::in_place`].
pub struct ImageParts<'a> {
    pub slot: Slot,
    pub membership: &'a Membership,
    pub epoch_start: Slot,
    pub sessions: &'a SessionTable,
    pub time_ms: u64,
}

impl ImageParts<'_> {
    fn fields(&self, app_digest: u64, app_len: u64) -> ImageHead<'_> {
        ImageHead {
            slot: self.slot,
            membership: self.membership,
            epoch_start: self.epoch_start,
            sessions: self.sessions,
            time_ms: self.time_ms,
            app_digest,
            app_len,
        }
    }

    fn head(&self, app_digest: u64, app_len: usize) -> Vec<u8> {
        postcard::to_allocvec(&self.fields(app_digest, app_len as u64))
            .expect("encoding a snapshot head into memory cannot fail")
    }

    /// The most bytes the image's encoding puts before the application
    /// state, whatever its slot, times, digest and length (each a varint of
    /// at most 10 bytes): leave this much room in front of a state handed to
    /// [`SnapshotFile::in_place`].
    pub fn room(&self) -> usize {
        let widest = ImageParts {
            slot: Slot(u64::MAX),
            epoch_start: Slot(u64::MAX),
            time_ms: u64::MAX,
            ..*self
        };
        postcard::experimental::serialized_size(&widest.fields(u64::MAX, u64::MAX))
            .expect("sizing a snapshot head cannot fail")
    }
}

impl SnapshotFile {
    /// The snapshot of `parts` with the application state `buf[room..]`,
    /// encoded as [`SnapshotImage::encode`] does but without copying the
    /// state: the head is written into the room in front of it and the
    /// image shares `buf`. Falls back to a copy if the room is too small.
    pub fn in_place(parts: &ImageParts<'_>, mut buf: Vec<u8>, room: usize) -> SnapshotFile {
        let app_digest = xxhash_rust::xxh3::xxh3_64(&buf[room..]);
        let mut head = parts.head(app_digest, buf.len() - room);
        let image = if head.len() <= room {
            let start = room - head.len();
            buf[start..room].copy_from_slice(&head);
            bytes::Bytes::from(buf).slice(start..)
        } else {
            head.extend_from_slice(&buf[room..]);
            bytes::Bytes::from(head)
        };
        SnapshotFile {
            slot: parts.slot,
            digest: xxhash_rust::xxh3::xxh3_64(&image),
            image: Bytes::new(image),
        }
    }
}

impl SnapshotImage {
    pub fn encode(&self) -> Vec<u8> {
        // Into a buffer of the final size: growing one by doubling would copy
        // a large application state several times over.
        let head = self.parts().head(self.app_digest, self.app_state.len());
        let mut out = Vec::with_capacity(head.len() + self.app_state.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(&self.app_state);
        out
    }

    /// Everything but the application state, borrowed.
    pub fn parts(&self) -> ImageParts<'_> {
        ImageParts {
            slot: self.slot,
            membership: &self.membership,
            epoch_start: self.epoch_start,
            sessions: &self.sessions,
            time_ms: self.time_ms,
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<SnapshotImage, ImageError> {
        let img: SnapshotImage =
            postcard::from_bytes(bytes).map_err(|e| ImageError::Decode(e.to_string()))?;
        if xxhash_rust::xxh3::xxh3_64(&img.app_state) != img.app_digest {
            return Err(ImageError::Digest);
        }
        Ok(img)
    }

    /// [`SnapshotImage::decode`] from shared bytes: the application state is
    /// a part of `bytes`, not a copy (tens of MiB for a large guest, each a
    /// fresh allocation to fault in, on the thread installing it).
    pub fn decode_shared(bytes: &Bytes) -> Result<SnapshotImage, ImageError> {
        let r: SnapshotImageRef<'_> = postcard::from_bytes(bytes.as_slice())
            .map_err(|e| ImageError::Decode(e.to_string()))?;
        if xxhash_rust::xxh3::xxh3_64(r.app_state) != r.app_digest {
            return Err(ImageError::Digest);
        }
        // The borrowed state lies within `bytes`: its place there is the
        // distance between the two starts (checked all the same; a copy if not).
        let len = r.app_state.len();
        let app_state = (r.app_state.as_ptr() as usize)
            .checked_sub(bytes.as_slice().as_ptr() as usize)
            .filter(|start| start + len <= bytes.len())
            .map_or_else(
                || Bytes::from(r.app_state),
                |start| bytes.slice(start..start + len),
            );
        Ok(SnapshotImage {
            slot: r.slot,
            membership: r.membership,
            epoch_start: r.epoch_start,
            sessions: r.sessions,
            time_ms: r.time_ms,
            app_digest: r.app_digest,
            app_state,
        })
    }
}

/// `SnapshotImage` with the application state borrowed from the encoded
/// bytes: the same fields in the same order (postcard is positional; a test
/// checks the two decode alike).
#[derive(Deserialize)]
struct SnapshotImageRef<'a> {
    slot: Slot,
    membership: Membership,
    epoch_start: Slot,
    sessions: SessionTable,
    time_ms: u64,
    app_digest: u64,
    #[serde(borrow)]
    app_state: &'a [u8],
}

/// A batch of durable work. The caller makes it durable in this order — append
/// `records`, then (if any) store `snapshot` atomically, then (if any) drop log records
/// about slots below `compact_below` — and then calls `Replica::on_persisted(token)`.
/// Batches must be acknowledged in the order they were polled. If `must_sync` is false,
/// nothing waits on this batch and it may be acknowledged without an fsync.
#[derive(Clone, Debug)]
pub struct PersistBatch {
    pub token: u64,
    pub records: Vec<Record>,
    pub must_sync: bool,
    pub snapshot: Option<SnapshotFile>,
    pub compact_below: Option<Slot>,
    /// The snapshot is a checkpoint of state the log still holds (not one
    /// received from another replica): storage may acknowledge this batch
    /// before the snapshot is durable, and write it meanwhile, provided it
    /// compacts the log only once the snapshot is durable. A large checkpoint
    /// then does not hold up the votes queued behind it.
    pub snapshot_may_lag: bool,
}

/// What storage hands back on restart.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    /// The latest complete snapshot image, if any.
    pub snapshot: Option<Bytes>,
    /// Every intact record, in the order written.
    pub records: Vec<Record>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Epoch, HostId};

    fn image(state: Vec<u8>) -> SnapshotImage {
        SnapshotImage {
            slot: Slot(42),
            membership: Membership {
                epoch: Epoch(3),
                voters: vec![HostId(1), HostId(2), HostId(3)],
                learners: Vec::new(),
            },
            epoch_start: Slot(40),
            sessions: SessionTable::default(),
            time_ms: 1_700_000_000_000,
            app_digest: xxhash_rust::xxh3::xxh3_64(&state),
            app_state: Bytes::from(state),
        }
    }

    #[test]
    fn shared_decoding_reads_the_same_image_without_copying_the_state() {
        let img = image((0..100_000u32).map(|i| (i % 251) as u8).collect());
        let encoded = Bytes::from(img.encode());
        let copied = SnapshotImage::decode(&encoded).unwrap();
        let shared = SnapshotImage::decode_shared(&encoded).unwrap();
        assert_eq!(copied, img);
        assert_eq!(shared, img);
        // The state is a part of the encoded buffer.
        let inside = encoded.as_slice().as_ptr_range();
        assert!(inside.contains(&shared.app_state.as_slice().as_ptr()));
        assert!(!inside.contains(&copied.app_state.as_slice().as_ptr()));
    }

    #[test]
    fn shared_decoding_of_an_empty_state() {
        let img = image(Vec::new());
        let encoded = Bytes::from(img.encode());
        assert_eq!(SnapshotImage::decode_shared(&encoded).unwrap(), img);
    }

    #[test]
    fn shared_decoding_refuses_what_decoding_refuses() {
        let encoded = image(vec![7; 1000]).encode();
        // A flipped byte in the state fails the digest; a cut image fails to decode.
        let mut flipped = encoded.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let cut = encoded[..encoded.len() - 10].to_vec();
        for bad in [flipped, cut] {
            let plain = SnapshotImage::decode(&bad).unwrap_err();
            let shared = SnapshotImage::decode_shared(&Bytes::from(bad)).unwrap_err();
            assert_eq!(plain, shared);
        }
    }

    #[test]
    fn an_image_built_in_place_is_what_decoding_reads_and_shares_the_buffer() {
        // States whose length varint takes 1, 2 and 3 bytes, and a table
        // with sessions in it.
        let mut sessions = SessionTable::default();
        let limits = crate::config::Limits::default();
        for client in 1..=3u64 {
            let cmd = crate::types::Command {
                client: crate::types::ClientId(client.into()),
                seq: 1,
                ack_below: 1,
                payload: Bytes::default(),
            };
            sessions.admit(&cmd, 5, &limits);
        }
        for len in [0usize, 100, 300, 70_000] {
            let mut img = image((0..len).map(|i| (i % 253) as u8).collect());
            img.sessions = sessions.clone();
            let room = img.parts().room();
            let mut buf = vec![0xAA; room];
            buf.extend_from_slice(&img.app_state);
            let within = buf.as_ptr_range();
            let file = SnapshotFile::in_place(&img.parts(), buf, room);
            // the derived encoding, which decoding reads, byte for byte
            let derived = postcard::to_allocvec(&img).unwrap();
            assert_eq!(file.image.as_slice(), &derived[..], "state of {len} bytes");
            assert_eq!(img.encode(), derived);
            assert_eq!(file, SnapshotFile::from_image(&img));
            assert!(within.contains(&file.image.as_slice().as_ptr()));
            assert_eq!(SnapshotImage::decode(&file.image).unwrap(), img);
        }
    }

    #[test]
    fn an_image_without_room_for_its_head_is_copied_whole() {
        let img = image(vec![9; 5_000]);
        let room = img.parts().room() / 2;
        let mut buf = vec![0; room];
        buf.extend_from_slice(&img.app_state);
        let file = SnapshotFile::in_place(&img.parts(), buf, room);
        assert_eq!(file, SnapshotFile::from_image(&img));
    }
}
