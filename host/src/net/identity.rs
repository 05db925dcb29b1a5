//! A host's persistent identity and the private-network key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;

/// File in the data directory holding the host's Ed25519 key (protobuf encoding).
pub const IDENTITY_FILE: &str = "identity.key";

/// Write `bytes` to a new file readable only by its owner, durably.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

/// Read a file that must be private to its owner; tighten it if it is not.
pub fn read_private_file(path: &Path) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "file was readable by others; restricting it to its owner (0600)");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Load the host's identity from `data_dir`, creating it on first start.
pub fn load_or_create_identity(data_dir: &Path) -> Result<Keypair> {
    let path = data_dir.join(IDENTITY_FILE);
    if path.exists() {
        let bytes = read_private_file(&path)?;
        return Keypair::from_protobuf_encoding(&bytes).with_context(|| {
            format!(
                "{} is not a vp-host identity (corrupt? move it away to create a new one)",
                path.display()
            )
        });
    }
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .context("cannot encode the new identity")?;
    write_private_file(&path, &bytes)?;
    tracing::info!(peer_id = %keypair.public().to_peer_id(), path = %path.display(), "created a new host identity");
    Ok(keypair)
}

/// Read a private-network key (the `/key/swarm/psk/1.0.0/` format).
pub fn load_network_key(path: &Path) -> Result<PreSharedKey> {
    let bytes = read_private_file(path)?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{} is not a network key (not text)", path.display()))?;
    PreSharedKey::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a network key ({e}); create one with `vp-host network-key FILE`",
            path.display()
        )
    })
}

/// Create a new random private-network key at `path`.
pub fn create_network_key(path: &Path) -> Result<PreSharedKey> {
    if path.exists() {
        bail!(
            "{} exists already; a network key is never overwritten",
            path.display()
        );
    }
    let key: [u8; 32] = rand::random();
    let psk = PreSharedKey::new(key);
    write_private_file(path, psk.to_string().as_bytes())?;
    Ok(psk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vp-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn identity_persists_and_is_private() {
        let d = dir("persist");
        let a = load_or_create_identity(&d).unwrap();
        let mode = std::fs::metadata(d.join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_identity(&d).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(d.join(IDENTITY_FILE), b"garbage").unwrap();
        let err = load_or_create_identity(&d).unwrap_err();
        assert!(
            format!("{err:#}").contains("is not a vp-host identity"),
            "{err:#}"
        );
    }

    #[test]
    fn network_keys_round_trip_and_are_never_overwritten() {
        let d = dir("psk");
        let path = d.join("net.key");
        let created = create_network_key(&path).unwrap();
        assert_eq!(
            load_network_key(&path).unwrap().fingerprint().to_string(),
            created.fingerprint().to_string()
        );
        assert!(create_network_key(&path).is_err());
        std::fs::write(d.join("bad.key"), "not a key").unwrap();
        assert!(
            format!("{:#}", load_network_key(&d.join("bad.key")).unwrap_err())
                .contains("is not a network key")
        );
    }
}
