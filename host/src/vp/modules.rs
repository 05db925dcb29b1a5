//! The module store: every module this host runs or serves, named by hash,
//! under `<data dir>/modules/<sha256>.wasm`.
//!
//! A module no member on this host runs is deleted once it has not been
//! stored or used for [`MODULE_UNUSED_KEEP`] (`ModuleStore::collect`, which
//! the node runs at start and every [`MODULES_COLLECT_EVERY`]): a host that
//! spawned an app serves it to the first members for the deployment's few
//! seconds, and later members fetch it from a member, so the store stays as
//! large as what this host runs, not as everything it ever ran.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};

use vp_guest_sdk::abi::VpId;

use super::member::MemberFile;
use crate::sandbox::{MODULE_BYTES_MAX, ModuleHash};

/// How long a module that no member here runs is kept after it was last
/// stored or deployed from this store.
pub const MODULE_UNUSED_KEEP: Duration = Duration::from_secs(3600);
/// How often the node deletes modules no member here runs.
pub const MODULES_COLLECT_EVERY: Duration = Duration::from_secs(600);

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
        if self.get(&hash).is_some() {
            self.touch(&hash);
        } else {
            // Missing, or corrupt (replaced whole).
            crate::exec::write_atomically(&self.path(&hash), bytes)?;
        }
        Ok(hash)
    }

    /// Mark a stored module used now (a deployment starts a member with it):
    /// `collect` keeps it for another `MODULE_UNUSED_KEEP`.
    pub fn touch(&self, hash: &ModuleHash) {
        crate::exec::mark_used(&self.path(hash));
    }

    /// Delete the modules not in `in_use` that were last stored or used more
    /// than `unused_for` ago; returns the hashes deleted. Temporary files of
    /// stores that old are deleted too; other files that are not modules
    /// (`<sha256>.wasm`) are left alone.
    pub fn collect(
        &self,
        in_use: &HashSet<ModuleHash>,
        unused_for: Duration,
    ) -> Result<Vec<ModuleHash>> {
        let before = SystemTime::now()
            .checked_sub(unused_for)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut deleted = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let used = entry.metadata().and_then(|m| m.modified());
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A store a crash cut short (`write_atomically` names each
                // write's file uniquely, so nothing writes over it later).
                if used.is_ok_and(|t| t < before) {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            }
            let Some(hash) = name
                .strip_suffix(".wasm")
                .and_then(|h| h.parse::<ModuleHash>().ok())
            else {
                continue;
            };
            if in_use.contains(&hash) {
                continue;
            }
            if used.is_ok_and(|t| t < before) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => deleted.push(hash),
                    Err(e) => {
                        tracing::warn!(path = %entry.path().display(), "cannot delete an unused module: {e}")
                    }
                }
            }
        }
        Ok(deleted)
    }
}

/// The modules the members in `<data dir>/vps` run, read from their member
/// files; an error if one cannot be read (then nothing should be deleted).
pub fn modules_in_use(data_dir: &Path) -> Result<HashSet<ModuleHash>> {
    let dir = data_dir.join("vps");
    let mut in_use = HashSet::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(in_use),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".removed-") || name.parse::<VpId>().is_err() {
            continue;
        }
        in_use.insert(MemberFile::read(&entry.path())?.config.module);
    }
    Ok(in_use)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vp::VpConfig;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("vp-modules-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn age(store: &ModuleStore, hash: &ModuleHash, by: Duration) {
        std::fs::File::options()
            .append(true)
            .open(store.path(hash))
            .unwrap()
            .set_modified(SystemTime::now() - by)
            .unwrap();
    }

    fn member_file(data_dir: &Path, vp: VpId, module: ModuleHash) {
        let dir = data_dir.join("vps").join(vp.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let config = VpConfig {
            vp,
            name: None,
            module,
            module_bytes: 1,
            limits: crate::sandbox::GuestLimits::default(),
            members: 3,
            timing: VpConfig::default_timing(),
            replace_after_ms: 500,
            checkpoint_every_slots: 10_000,
        };
        let file = MemberFile {
            config,
            founding: None,
        };
        std::fs::write(dir.join("member.json"), serde_json::to_vec(&file).unwrap()).unwrap();
    }

    #[test]
    fn only_modules_unused_for_long_enough_are_deleted() {
        let dir = Dir::new("collect");
        let store = ModuleStore::open(&dir.0).unwrap();
        let [run, old, fresh, stored_again] =
            [b"run".as_slice(), b"old", b"fresh", b"again"].map(|b| store.put(b).unwrap());
        let hour = Duration::from_secs(3600);
        for h in [&run, &old, &stored_again] {
            age(&store, h, 2 * hour);
        }
        // Stored again (a second spawn of the same app): its time starts over.
        store.put(b"again").unwrap();
        // Something else in the directory is not the store's to delete.
        let stray = dir.0.join("modules").join("notes.wasm");
        std::fs::write(&stray, b"x").unwrap();
        // A store a crash cut short, long ago; and one under way.
        let [cut, writing] =
            [".a.wasm.1.tmp", ".b.wasm.2.tmp"].map(|n| dir.0.join("modules").join(n));
        for path in [&cut, &writing] {
            std::fs::write(path, b"x").unwrap();
        }
        std::fs::File::options()
            .append(true)
            .open(&cut)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * hour)
            .unwrap();

        let in_use = HashSet::from([run]);
        assert_eq!(store.collect(&in_use, hour).unwrap(), vec![old]);
        assert!(store.get(&run).is_some(), "in use, however old");
        assert!(store.get(&old).is_none());
        assert!(store.get(&fresh).is_some(), "stored within the hour");
        assert!(store.get(&stored_again).is_some());
        assert!(stray.exists());
        assert!(!cut.exists() && writing.exists());

        // Deploying from the store marks the module used.
        age(&store, &fresh, 2 * hour);
        store.touch(&fresh);
        assert!(store.collect(&in_use, hour).unwrap().is_empty());
        age(&store, &fresh, 2 * hour);
        assert_eq!(store.collect(&in_use, hour).unwrap(), vec![fresh]);
    }

    #[test]
    fn modules_in_use_are_read_from_the_member_files() {
        let dir = Dir::new("in-use");
        assert!(
            modules_in_use(&dir.0).unwrap().is_empty(),
            "no vps directory yet"
        );
        let (a, b) = (ModuleHash::of(b"a"), ModuleHash::of(b"b"));
        member_file(&dir.0, VpId(1), a);
        member_file(&dir.0, VpId(2), b);
        member_file(&dir.0, VpId(3), a);
        // An undeployment cut short does not count.
        let removed = dir.0.join("vps").join("0000000000000004.removed-1");
        std::fs::create_dir_all(&removed).unwrap();
        assert_eq!(modules_in_use(&dir.0).unwrap(), HashSet::from([a, b]));

        // A member file that cannot be read: nothing is known to be unused.
        std::fs::write(
            dir.0
                .join("vps")
                .join(VpId(2).to_string())
                .join("member.json"),
            b"{not json",
        )
        .unwrap();
        let e = modules_in_use(&dir.0).unwrap_err();
        assert!(format!("{e:#}").contains("member.json"), "{e:#}");
    }

    #[test]
    fn module_hashes_parse_from_what_they_display() {
        let h = ModuleHash::of(b"x");
        assert_eq!(h.to_string().parse::<ModuleHash>().unwrap(), h);
        for bad in [
            "",
            "ab",
            &format!("+{}", &h.to_string()[1..]),
            &"g".repeat(64),
        ] {
            assert!(bad.parse::<ModuleHash>().is_err(), "{bad:?}");
        }
    }
}
