//! Compiled modules kept on disk, so that a host restarting with its virtual
//! peers (or deploying an app it ran before) does not compile them again.
//!
//! One file per module and engine: `<dir>/<sha256>-<engine tag>.cwasm`, the
//! SHA-256 being of the module as the sandbox rewrote it (what is compiled:
//! a vp-host that rewrites modules differently looks for other files), and
//! the engine tag is a digest of everything Wasmtime says a compiled
//! module depends on (its version, the engine's configuration, the CPU
//! features compiled for: `Engine::precompile_compatibility_hash`); opening
//! the cache deletes other engines' files and leftover temporary ones. A file
//! holds a magic, the SHA-256 of the rest, and the bytes of
//! `Module::serialize`.
//!
//! Loading compiled code runs it, so nothing is loaded that fails its
//! checksum: a file cut short by a crash, flipped bits or a stray write is
//! deleted and the module compiled again. Wasmtime itself refuses code for
//! another version or configuration. Writes go to a temporary file renamed
//! into place and are not synced: a cache file lost in a crash is compiled
//! again, and one half-written is caught by its checksum.
//!
//! The cache is bounded ([`COMPILED_BYTES_MAX`] by default): after a write
//! takes it past its bound, the files used least recently (by modification
//! time, which a read refreshes) are deleted until it is back under it.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use super::ModuleHash;

const MAGIC: &[u8; 8] = b"vpcwasm1";
/// Bytes of compiled modules a host keeps on disk by default (a compiled
/// example app is 1-3 MB: hundreds of apps).
pub const COMPILED_BYTES_MAX: u64 = 512 << 20;
const HEADER_BYTES: usize = MAGIC.len() + 32;

/// The on-disk cache of one sandbox's engine.
#[derive(Debug)]
pub(super) struct CompiledCache {
    dir: PathBuf,
    engine_tag: String,
    bytes_max: u64,
}

/// Feeds what `Hash` writes into SHA-256 (stable across runs and builds,
/// unlike the standard library's hasher).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        // Never called: the digest is taken from the inner state.
        0
    }
}

impl CompiledCache {
    /// The cache in `dir` (created if missing) for `engine`, holding at most
    /// `bytes_max` bytes of files.
    pub(super) fn open(
        dir: &Path,
        engine: &Engine,
        bytes_max: u64,
    ) -> std::io::Result<CompiledCache> {
        std::fs::create_dir_all(dir)?;
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let digest = hasher.0.finalize();
        let engine_tag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        // Files of another engine (an older vp-host, another CPU) can never
        // be loaded by this one, and temporary files are from writes a crash
        // cut short: both go.
        let ours = format!("-{engine_tag}.cwasm");
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = (name.ends_with(".cwasm") && !name.ends_with(&ours))
                || (name.starts_with('.') && name.ends_with(".tmp"));
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let cache = CompiledCache {
            dir: dir.to_path_buf(),
            engine_tag,
            bytes_max,
        };
        // The bound may be lower than the last run's.
        cache.evict();
        Ok(cache)
    }

    /// Delete the least recently used files until the cache holds at most
    /// `bytes_max` bytes.
    fn evict(&self) {
        let ours = format!("-{}.cwasm", self.engine_tag);
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(&ours))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                Some((used, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
        if total <= self.bytes_max {
            return;
        }
        files.sort();
        for (_, len, path) in files {
            if total <= self.bytes_max {
                break;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    total -= len;
                    tracing::debug!(path = %path.display(), bytes = len, "compiled module evicted");
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot evict a compiled module: {e}")
                }
            }
        }
    }

    fn path(&self, hash: &ModuleHash) -> PathBuf {
        self.dir.join(format!("{hash}-{}.cwasm", self.engine_tag))
    }

    /// The module compiled earlier, if its file is there and intact. A file
    /// that is not is removed (and reported), never loaded.
    pub(super) fn get(&self, engine: &Engine, hash: &ModuleHash) -> Option<Module> {
        let path = self.path(hash);
        let bytes = std::fs::read(&path).ok()?;
        let intact = bytes.len() >= HEADER_BYTES
            && &bytes[..MAGIC.len()] == MAGIC
            && Sha256::digest(&bytes[HEADER_BYTES..]).as_slice()
                == &bytes[MAGIC.len()..HEADER_BYTES];
        if !intact {
            tracing::warn!(path = %path.display(), "compiled module file is damaged; removing it and compiling again");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // SAFETY: `Module::deserialize` trusts its input to be what
        // `Module::serialize` produced. These bytes are: the checksum above
        // matches what `put` wrote from `Module::serialize`, in this host's
        // own data directory. Wasmtime checks the version and configuration.
        match unsafe { Module::deserialize(engine, &bytes[HEADER_BYTES..]) } {
            Ok(module) => {
                // Used now: the last to be evicted.
                crate::exec::mark_used(&path);
                Some(module)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "compiled module file not usable ({e:#}); compiling again");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Whether a file for this module is there (intact or not).
    pub(super) fn contains(&self, hash: &ModuleHash) -> bool {
        self.path(hash).exists()
    }

    /// Keep `module` (compiled from the module named `hash`) for next time.
    /// Failing to is reported and otherwise ignored: it costs a compilation.
    pub(super) fn put(&self, hash: &ModuleHash, module: &Module) {
        let path = self.path(hash);
        let result = module
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|code| {
                let mut bytes = Vec::with_capacity(HEADER_BYTES + code.len());
                bytes.extend_from_slice(MAGIC);
                bytes.extend_from_slice(&Sha256::digest(&code));
                bytes.extend_from_slice(&code);
                // Two threads compiling the same module each write their own file.
                let tmp = self
                    .dir
                    .join(format!(".{hash}.{:016x}.tmp", rand::random::<u64>()));
                std::fs::write(&tmp, &bytes)
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(&tmp);
                    })
            });
        match result {
            Ok(()) => self.evict(),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot keep the compiled module: {e}")
            }
        }
    }
}
