//! Tombstones of destroyed virtual peers: `<data dir>/destroyed/<vp id>`,
//! one empty file each, written (and synced) before the member's state is
//! deleted.
//!
//! A host answers a request, locate or consensus message for a virtual peer
//! it holds a tombstone of with `VpWire::Destroyed`: a client's host stops
//! retrying at once, and a member that was down while its virtual peer was
//! destroyed learns it from the first voter it asks, and leaves too. A
//! member directory found beside a tombstone at start (the host stopped
//! between the two) is deleted instead of restarted.
//!
//! Kept for [`TOMBSTONE_KEEP`] and at most [`TOMBSTONES_MAX`] of them (the
//! oldest go first): a member away for longer than that is a copy of a
//! virtual peer nobody answers for, and stays until its host's owner removes
//! it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use vp_guest_sdk::abi::VpId;

/// How long a host remembers that a virtual peer was destroyed.
pub const TOMBSTONE_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most tombstones a host keeps.
pub const TOMBSTONES_MAX: usize = 4096;

/// The destroyed virtual peers this host was a member of, and since when.
#[derive(Debug)]
pub struct Tombstones {
    dir: PathBuf,
    known: HashMap<VpId, SystemTime>,
}

impl Tombstones {
    /// Open (create) `<data_dir>/destroyed` and read what it holds. Files
    /// not named by a virtual peer id are left alone.
    pub fn open(data_dir: &Path) -> Result<Tombstones> {
        let dir = data_dir.join("destroyed");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut known = HashMap::new();
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(vp) = name.parse::<VpId>() else {
                continue;
            };
            if name.len() != 16 {
                continue;
            }
            let at = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| SystemTime::now());
            known.insert(vp, at);
        }
        Ok(Tombstones { dir, known })
    }

    pub fn contains(&self, vp: VpId) -> bool {
        self.known.contains_key(&vp)
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Record that `vp` was destroyed; durable when this returns.
    pub fn add(&mut self, vp: VpId) -> Result<()> {
        if self.known.contains_key(&vp) {
            return Ok(());
        }
        crate::exec::write_atomically(&self.dir.join(vp.to_string()), b"")?;
        self.known.insert(vp, SystemTime::now());
        self.collect(TOMBSTONE_KEEP, TOMBSTONES_MAX);
        Ok(())
    }

    /// Forget tombstones older than `keep`, then the oldest beyond `max`.
    /// Returns how many were removed.
    pub fn collect(&mut self, keep: Duration, max: usize) -> usize {
        let now = SystemTime::now();
        let mut by_age: Vec<(SystemTime, VpId)> =
            self.known.iter().map(|(vp, at)| (*at, *vp)).collect();
        by_age.sort();
        let excess = by_age.len().saturating_sub(max);
        let mut removed = 0;
        for (i, (at, vp)) in by_age.into_iter().enumerate() {
            let old = now.duration_since(at).is_ok_and(|age| age > keep);
            if i >= excess && !old {
                continue;
            }
            let path = self.dir.join(vp.to_string());
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("cannot remove {}: {e}", path.display());
                    continue;
                }
            }
            self.known.remove(&vp);
            removed += 1;
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_survive_a_restart_and_keep_to_their_bounds() {
        let root = std::env::temp_dir().join(format!("vp-tombstones-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = Path::new(&root);
        let mut t = Tombstones::open(dir).unwrap();
        assert!(t.is_empty());
        for i in 1..=5u64 {
            t.add(VpId(i)).unwrap();
        }
        // A stray file is not a tombstone and is left alone.
        std::fs::write(dir.join("destroyed").join("notes.txt"), b"x").unwrap();
        let mut t = Tombstones::open(dir).unwrap();
        assert_eq!(t.len(), 5);
        assert!(t.contains(VpId(3)) && !t.contains(VpId(6)));
        // Make VpId(1) and VpId(2) the oldest; at most 3 kept: they go.
        let old = SystemTime::now() - Duration::from_secs(3600);
        for i in [1u64, 2] {
            let f = std::fs::File::options()
                .write(true)
                .open(dir.join("destroyed").join(VpId(i).to_string()))
                .unwrap();
            f.set_modified(old).unwrap();
        }
        let mut t2 = Tombstones::open(dir).unwrap();
        assert_eq!(t2.collect(TOMBSTONE_KEEP, 3), 2);
        assert!(!t2.contains(VpId(1)) && !t2.contains(VpId(2)) && t2.contains(VpId(5)));
        // Older than `keep`: gone whatever the count.
        let ancient = SystemTime::now() - TOMBSTONE_KEEP - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(dir.join("destroyed").join(VpId(3).to_string()))
            .unwrap()
            .set_modified(ancient)
            .unwrap();
        let mut t3 = Tombstones::open(dir).unwrap();
        assert_eq!(t3.collect(TOMBSTONE_KEEP, 100), 1);
        assert!(!t3.contains(VpId(3)) && t3.contains(VpId(4)));
        assert_eq!(t3.collect(Duration::ZERO, 100), 2);
        assert!(Tombstones::open(dir).unwrap().is_empty());
        assert!(dir.join("destroyed").join("notes.txt").exists());
        // The first handle's view is stale but harmless: removing again is fine.
        assert_eq!(t.collect(Duration::ZERO, 100), 5);
        assert!(t.is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
