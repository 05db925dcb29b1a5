//! The module store: every module this host runs or serves, named by hash,
//! under `<data dir>/modules/<sha256>.wasm`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::sandbox::{MODULE_BYTES_MAX, ModuleHash};

/// Content-addressed module files.
#[derive(Clone, Debug)]
pub struct ModuleStore {
    dir: PathBuf,
}

impl ModuleStore {
    /// Open (create) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<ModuleStore> {
        let dir = data_dir.join("modules");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(ModuleStore { dir })
    }

    fn path(&self, hash: &ModuleHash) -> PathBuf {
        self.dir.join(format!("{hash}.wasm"))
    }

    /// The module's bytes, if stored (and intact).
    pub fn get(&self, hash: &ModuleHash) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.path(hash)).ok()?;
        if ModuleHash::of(&bytes) != *hash {
            tracing::warn!(%hash, "stored module is corrupt; ignoring it");
            return None;
        }
        Some(bytes)
    }

    /// Store a module; returns its hash.
    pub fn put(&self, bytes: &[u8]) -> Result<ModuleHash> {
        if bytes.len() > MODULE_BYTES_MAX {
            bail!(
                "module is {} bytes; at most {MODULE_BYTES_MAX}",
                bytes.len()
            );
        }
        let hash = ModuleHash::of(bytes);
        let path = self.path(&hash);
        if !path.exists() {
            crate::exec::write_atomically(&path, bytes)?;
        }
        Ok(hash)
    }
}
