//! Guest snapshots: the whole state of a guest between two messages.
//!
//! A guest's state is its linear memory plus its mutable globals (tables are
//! static: the loader refuses modules that change them). A snapshot records
//! both, with the module hash and ABI version it belongs to. The encoded form
//! (`docs/abi.md`, "Snapshot format") is checksummed and skips all-zero pages.

use std::fmt;

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use super::ModuleHash;
use super::module::GlobalKind;

/// Wasm page size.
pub const PAGE_BYTES: usize = 65536;
/// First bytes of an encoded snapshot. `\r\n` catches text-mode mangling.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"vpsnap\r\n";
/// Version of the encoded layout.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

const HEADER_BYTES: usize = 8 + 4 + 4 + 32 + 8 + 4;
const GLOBAL_BYTES: usize = 17;
const CHECKSUM_BYTES: usize = 8;
/// Most mutable globals a snapshot may carry.
pub const SNAPSHOT_GLOBALS_MAX: usize = 65536;

/// The value of one mutable global, by bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalValue {
    I32(i32),
    I64(i64),
    F32(u32),
    F64(u64),
    V128(u128),
}

impl GlobalValue {
    /// The value's type.
    pub fn kind(&self) -> GlobalKind {
        match self {
            GlobalValue::I32(_) => GlobalKind::I32,
            GlobalValue::I64(_) => GlobalKind::I64,
            GlobalValue::F32(_) => GlobalKind::F32,
            GlobalValue::F64(_) => GlobalKind::F64,
            GlobalValue::V128(_) => GlobalKind::V128,
        }
    }

    fn bits(&self) -> u128 {
        match *self {
            GlobalValue::I32(v) => u128::from(v as u32),
            GlobalValue::I64(v) => u128::from(v as u64),
            GlobalValue::F32(v) => u128::from(v),
            GlobalValue::F64(v) => u128::from(v),
            GlobalValue::V128(v) => v,
        }
    }

    fn from_tag(tag: u8, bits: u128) -> Option<Self> {
        Some(match tag {
            0 => GlobalValue::I32(bits as u32 as i32),
            1 => GlobalValue::I64(bits as u64 as i64),
            2 => GlobalValue::F32(bits as u32),
            3 => GlobalValue::F64(bits as u64),
            4 => GlobalValue::V128(bits),
            _ => return None,
        })
    }
}

/// Why an encoded snapshot was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a vp snapshot (bad magic bytes)")]
    BadMagic,
    #[error("snapshot format version {0}; this host reads version {SNAPSHOT_FORMAT_VERSION}")]
    UnsupportedVersion(u32),
    #[error("snapshot is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("snapshot checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("snapshot is malformed: {0}")]
    Malformed(&'static str),
    #[error("snapshot holds {bytes} bytes of memory; the limit is {max}")]
    TooLarge { bytes: u64, max: u64 },
    #[error("snapshot was taken from module {snapshot}, not {module}")]
    ModuleMismatch { snapshot: String, module: String },
    #[error("snapshot is for guest ABI version {snapshot}; the module uses {module}")]
    AbiMismatch { snapshot: u32, module: u32 },
    #[error("snapshot globals do not match the module's: {0}")]
    GlobalsMismatch(String),
    #[error(
        "snapshot memory ({snapshot} bytes) is smaller than the module's minimum ({module} bytes)"
    )]
    MemoryTooSmall { snapshot: u64, module: u64 },
}

/// A guest's state between messages, decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub module_hash: ModuleHash,
    pub abi_version: u32,
    /// Linear memory, whole (a multiple of [`PAGE_BYTES`]).
    pub memory: Vec<u8>,
    /// Mutable globals in index order.
    pub globals: Vec<GlobalValue>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("module_hash", &self.module_hash)
            .field("abi_version", &self.abi_version)
            .field("memory_bytes", &self.memory.len())
            .field("globals", &self.globals)
            .finish()
    }
}

/// A 128-bit digest of a guest's state (memory and globals): equal states have
/// equal digests, so replicas compare states cheaply.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct StateDigest(pub u128);

impl fmt::Display for StateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for StateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateDigest({self})")
    }
}

/// Digest of memory and globals.
pub fn state_digest(memory: &[u8], globals: &[GlobalValue]) -> StateDigest {
    let mut hasher = Xxh3::new();
    hasher.update(&(memory.len() as u64).to_le_bytes());
    hasher.update(memory);
    for g in globals {
        hasher.update(&[g.kind().tag()]);
        hasher.update(&g.bits().to_le_bytes());
    }
    StateDigest(hasher.digest128())
}

/// Whether a page is all zeros: OR-folds 256-byte blocks (vectorised), stopping
/// at the first block that is not zero.
fn page_is_zero(page: &[u8]) -> bool {
    page.chunks(256).all(|block| {
        let words = block.chunks_exact(16);
        let tail_zero = words.remainder().iter().all(|&b| b == 0);
        tail_zero
            && words.fold(0u128, |acc, w| {
                acc | u128::from_le_bytes(w.try_into().expect("16 bytes"))
            }) == 0
    })
}

/// Append the encoding of a guest state (the format of
/// [`Snapshot::encode_into`]) to `out`, straight from its parts, e.g. from a
/// live instance's memory, without an intermediate copy.
pub fn encode_state(
    module_hash: ModuleHash,
    abi_version: u32,
    memory: &[u8],
    globals: &[GlobalValue],
    out: &mut Vec<u8>,
) {
    assert!(
        memory.len().is_multiple_of(PAGE_BYTES),
        "snapshot memory is whole pages"
    );
    let start = out.len();
    let pages = memory.len() / PAGE_BYTES;
    let present: Vec<bool> = memory
        .chunks_exact(PAGE_BYTES)
        .map(|p| !page_is_zero(p))
        .collect();
    let stored = present.iter().filter(|&&p| p).count();
    out.reserve(
        HEADER_BYTES
            + GLOBAL_BYTES * globals.len()
            + pages.div_ceil(8)
            + stored * PAGE_BYTES
            + CHECKSUM_BYTES,
    );
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&abi_version.to_le_bytes());
    out.extend_from_slice(&module_hash.0);
    out.extend_from_slice(&(memory.len() as u64).to_le_bytes());
    out.extend_from_slice(&(globals.len() as u32).to_le_bytes());
    for g in globals {
        out.push(g.kind().tag());
        out.extend_from_slice(&g.bits().to_le_bytes());
    }
    let mut bitmap = vec![0u8; pages.div_ceil(8)];
    for (i, _) in present.iter().enumerate().filter(|(_, p)| **p) {
        bitmap[i / 8] |= 1 << (i % 8);
    }
    out.extend_from_slice(&bitmap);
    for (page, _) in memory
        .chunks_exact(PAGE_BYTES)
        .zip(&present)
        .filter(|(_, p)| **p)
    {
        out.extend_from_slice(page);
    }
    let checksum = xxh3_64(&out[start..]);
    out.extend_from_slice(&checksum.to_le_bytes());
}

impl Snapshot {
    /// Digest of the state this snapshot holds.
    pub fn digest(&self) -> StateDigest {
        state_digest(&self.memory, &self.globals)
    }

    /// Encode into `out` (cleared first).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        encode_state(
            self.module_hash,
            self.abi_version,
            &self.memory,
            &self.globals,
            out,
        );
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Decode and verify an encoded snapshot. `memory_bytes_max` bounds what a
    /// (possibly hostile) file can make this host allocate.
    pub fn decode(bytes: &[u8], memory_bytes_max: u64) -> Result<Snapshot, SnapshotError> {
        let view = SnapshotView::parse(bytes, memory_bytes_max)?;
        let mut memory = vec![0u8; view.memory_bytes];
        view.copy_memory_into(&mut memory);
        Ok(Snapshot {
            module_hash: view.module_hash,
            abi_version: view.abi_version,
            memory,
            globals: view.globals,
        })
    }
}

/// A verified encoded snapshot, read in place: restoring from it copies each
/// stored page once, straight into the guest's memory.
#[derive(Debug)]
pub struct SnapshotView<'a> {
    pub module_hash: ModuleHash,
    pub abi_version: u32,
    /// Size of linear memory, bytes.
    pub memory_bytes: usize,
    pub globals: Vec<GlobalValue>,
    bitmap: &'a [u8],
    pages: &'a [u8],
}

impl<'a> SnapshotView<'a> {
    /// Verify an encoded snapshot (magic, version, checksum, shape) without
    /// copying its pages. `memory_bytes_max` bounds what it may claim.
    pub fn parse(
        bytes: &'a [u8],
        memory_bytes_max: u64,
    ) -> Result<SnapshotView<'a>, SnapshotError> {
        if bytes.len() >= 8 && bytes[..8] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if bytes.len() < HEADER_BYTES + CHECKSUM_BYTES {
            return Err(SnapshotError::Truncated(bytes.len()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
        if xxh3_64(body).to_le_bytes() != checksum {
            // A short file fails here too; say which when we can tell.
            return Err(explain_checksum_failure(body));
        }
        let abi_version = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes"));
        let module_hash = ModuleHash(body[16..48].try_into().expect("32 bytes"));
        let memory_bytes = u64::from_le_bytes(body[48..56].try_into().expect("8 bytes"));
        let global_count = u32::from_le_bytes(body[56..60].try_into().expect("4 bytes")) as usize;
        if !memory_bytes.is_multiple_of(PAGE_BYTES as u64) {
            return Err(SnapshotError::Malformed(
                "memory size is not a whole number of pages",
            ));
        }
        if memory_bytes > memory_bytes_max || usize::try_from(memory_bytes).is_err() {
            return Err(SnapshotError::TooLarge {
                bytes: memory_bytes,
                max: memory_bytes_max,
            });
        }
        if global_count > SNAPSHOT_GLOBALS_MAX {
            return Err(SnapshotError::Malformed("too many globals"));
        }
        let pages = memory_bytes as usize / PAGE_BYTES;
        let mut at = HEADER_BYTES;
        let globals_end = at + global_count * GLOBAL_BYTES;
        let bitmap_end = globals_end + pages.div_ceil(8);
        if body.len() < bitmap_end {
            return Err(SnapshotError::Malformed("shorter than its header says"));
        }
        let mut globals = Vec::with_capacity(global_count);
        while at < globals_end {
            let bits = u128::from_le_bytes(
                body[at + 1..at + GLOBAL_BYTES]
                    .try_into()
                    .expect("16 bytes"),
            );
            globals.push(
                GlobalValue::from_tag(body[at], bits)
                    .ok_or(SnapshotError::Malformed("unknown global type"))?,
            );
            at += GLOBAL_BYTES;
        }
        let bitmap = &body[globals_end..bitmap_end];
        let stored: usize = (0..pages)
            .filter(|&i| bitmap[i / 8] & (1 << (i % 8)) != 0)
            .count();
        if body.len() != bitmap_end + stored * PAGE_BYTES {
            return Err(SnapshotError::Malformed(
                "page count does not match the page map",
            ));
        }
        Ok(SnapshotView {
            module_hash,
            abi_version,
            memory_bytes: memory_bytes as usize,
            globals,
            bitmap,
            pages: &body[bitmap_end..],
        })
    }

    /// Write the snapshot's memory into `dst` (exactly `memory_bytes` long):
    /// stored pages are copied, the others zeroed.
    pub fn copy_memory_into(&self, dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.memory_bytes,
            "destination is the snapshot's memory size"
        );
        let mut src = 0;
        for (i, page) in dst.chunks_exact_mut(PAGE_BYTES).enumerate() {
            if self.bitmap[i / 8] & (1 << (i % 8)) != 0 {
                page.copy_from_slice(&self.pages[src..src + PAGE_BYTES]);
                src += PAGE_BYTES;
            } else {
                page.fill(0);
            }
        }
    }
}

fn explain_checksum_failure(body: &[u8]) -> SnapshotError {
    let header_says = || -> Option<usize> {
        let memory_bytes = u64::from_le_bytes(body.get(48..56)?.try_into().ok()?);
        let globals = u32::from_le_bytes(body.get(56..60)?.try_into().ok()?) as usize;
        let pages = usize::try_from(memory_bytes / PAGE_BYTES as u64).ok()?;
        let minimum = HEADER_BYTES
            .checked_add(globals.checked_mul(GLOBAL_BYTES)?)?
            .checked_add(pages.div_ceil(8))?;
        Some(minimum)
    };
    match header_says() {
        Some(minimum) if body.len() < minimum => {
            SnapshotError::Truncated(body.len() + CHECKSUM_BYTES)
        }
        _ => SnapshotError::Checksum,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut memory = vec![0u8; 4 * PAGE_BYTES];
        memory[10] = 1;
        memory[3 * PAGE_BYTES + 5] = 9;
        Snapshot {
            module_hash: ModuleHash([7; 32]),
            abi_version: 1,
            memory,
            globals: vec![
                GlobalValue::I32(65536),
                GlobalValue::F64(1.5f64.to_bits()),
                GlobalValue::V128(u128::MAX),
            ],
        }
    }

    #[test]
    fn round_trips_and_skips_zero_pages() {
        let snap = sample();
        let bytes = snap.encode();
        assert!(
            bytes.len() < 2 * PAGE_BYTES + 200,
            "zero pages are not stored: {} bytes",
            bytes.len()
        );
        let back = Snapshot::decode(&bytes, u64::MAX).unwrap();
        assert_eq!(back, snap);
        assert_eq!(back.digest(), snap.digest());
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let bytes = sample().encode();
        // flip one bit at a spread of positions: header, globals, bitmap, pages, checksum
        for at in (0..bytes.len())
            .step_by(997)
            .chain([0, 9, 20, 50, 60, 70, bytes.len() - 1])
        {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(
                Snapshot::decode(&bad, u64::MAX).is_err(),
                "corruption at byte {at} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_and_garbage_give_clear_errors() {
        let bytes = sample().encode();
        assert_eq!(
            Snapshot::decode(&bytes[..30], u64::MAX),
            Err(SnapshotError::Truncated(30))
        );
        assert!(matches!(
            Snapshot::decode(&bytes[..bytes.len() - 100], u64::MAX),
            Err(SnapshotError::Checksum)
        ));
        assert!(matches!(
            Snapshot::decode(&bytes[..70], u64::MAX),
            Err(SnapshotError::Truncated(_))
        ));
        assert_eq!(
            Snapshot::decode(
                b"garbage garbage garbage garbage garbage garbage garbage garbage",
                1
            ),
            Err(SnapshotError::BadMagic)
        );
        assert_eq!(
            Snapshot::decode(&bytes, PAGE_BYTES as u64),
            Err(SnapshotError::TooLarge {
                bytes: 4 * PAGE_BYTES as u64,
                max: PAGE_BYTES as u64
            })
        );
    }

    #[test]
    fn digest_sees_every_part_of_the_state() {
        let a = sample();
        let mut b = a.clone();
        b.memory[3 * PAGE_BYTES + 6] = 1;
        assert_ne!(a.digest(), b.digest());
        let mut c = a.clone();
        c.globals[0] = GlobalValue::I32(65520);
        assert_ne!(a.digest(), c.digest());
        let mut d = a.clone();
        d.memory.extend_from_slice(&[0; PAGE_BYTES]);
        assert_ne!(a.digest(), d.digest());
    }
}
