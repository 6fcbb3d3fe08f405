//! This PNode's identity: an ed25519 key pair created on first start and kept in the data
//! directory, so the PNode keeps its id (and its reputation) across restarts.
//!
//! The key file is `pnode.key` (a version line, then the 32-byte secret in hex), created with
//! mode 0600 in a directory of mode 0700. A key file that cannot be parsed, or that others may
//! read, is an error and is never replaced: replacing it would silently drop the identity.
//! `pnode.lock` is held while the PNode runs, so two PNodes never share one identity.

use ed25519_dalek::SigningKey;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// First line of the key file.
const HEADER: &str = "dcnr-pnode-key-v1";

/// Name of the key file in the data directory.
pub const KEY_FILE: &str = "pnode.key";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key file exists but is not a key this build can read.
    #[error(
        "the key file {path} is corrupt ({detail}); it is not replaced automatically: restore it from a backup, or \
         delete it to start over under a new identity (with no reputation)"
    )]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Others may read the secret key.
    #[error("the key file {path} has permissions {mode:o}; it must be readable by its owner only (chmod 600)")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// Another running PNode holds this data directory.
    #[error("the data directory {0} is in use by another pnode; give each pnode its own --data-dir")]
    InUse(PathBuf),
    /// The OS could not supply randomness for a new key.
    #[error("cannot draw a random key: {0}")]
    Entropy(String),
}

/// The key pair, and the lock on its data directory (released when dropped).
pub struct NodeKey {
    signing: SigningKey,
    path: Option<PathBuf>,
    _lock: Option<File>,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "NodeKey({})", self.pnode_id())
    }
}

impl NodeKey {
    /// The signing key.
    pub fn signing(&self) -> &SigningKey {
        &self.signing
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The PNode id this key gives (the orchestrator derives the same).
    pub fn pnode_id(&self) -> String {
        dcnr_proto::identity::pnode_id(&self.public())
    }

    /// The key in PKCS#8 DER: the TLS key of this PNode's certificate.
    pub fn pkcs8(&self) -> Result<Vec<u8>, IdentityError> {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        Ok(self
            .signing
            .to_pkcs8_der()
            .map_err(|e| IdentityError::Entropy(format!("cannot encode the key: {e}")))?
            .as_bytes()
            .to_vec())
    }

    /// Where the key is kept; `None` for an ephemeral key.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A key that lives in memory only (no `--data-dir`): a new identity at every start.
    pub fn ephemeral() -> Result<NodeKey, IdentityError> {
        Ok(NodeKey { signing: SigningKey::from_bytes(&fresh_secret()?), path: None, _lock: None })
    }

    /// Loads the key from `dir`, creating the directory and the key on first start.
    pub fn load_or_create(dir: &Path) -> Result<NodeKey, IdentityError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { what, path, source }
        };
        fs::create_dir_all(dir).map_err(io("cannot create the data directory", dir))?;
        restrict(dir, 0o700).map_err(io("cannot set permissions of", dir))?;
        let lock_path = dir.join("pnode.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(IdentityError::InUse(dir.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => return Err(io("cannot lock", &lock_path)(e)),
        }
        let path = dir.join(KEY_FILE);
        let secret = match fs::read_to_string(&path) {
            Ok(text) => {
                check_permissions(&path)?;
                parse(&text).map_err(|detail| IdentityError::Corrupt { path: path.clone(), detail })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = fresh_secret()?;
                write_new(&path, &secret)?;
                tracing::info!(path = %path.display(), "created a new pnode identity");
                secret
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(IdentityError::Corrupt { path, detail: "not UTF-8 text".into() });
            }
            Err(e) => return Err(io("cannot read", &path)(e)),
        };
        Ok(NodeKey { signing: SigningKey::from_bytes(&secret), path: Some(path), _lock: Some(lock) })
    }
}

fn fresh_secret() -> Result<[u8; 32], IdentityError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| IdentityError::Entropy(e.to_string()))?;
    Ok(secret)
}

fn parse(text: &str) -> Result<[u8; 32], String> {
    let mut lines = text.lines();
    match lines.next() {
        Some(HEADER) => {}
        Some(other) => return Err(format!("first line is {:?}, expected {HEADER:?}", truncate(other))),
        None => return Err("the file is empty".into()),
    }
    let hex_secret = lines.next().ok_or("no key line")?.trim();
    let bytes = hex::decode(hex_secret).map_err(|e| format!("key line is not hex: {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| format!("key has {} bytes, expected 32", b.len()))
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Writes the key to a temporary file with mode 0600, syncs it, and renames it into place, so a
/// crash never leaves a half-written key behind.
fn write_new(path: &Path, secret: &[u8; 32]) -> Result<(), IdentityError> {
    let tmp = path.with_extension("key.tmp");
    let io = |what, p: &Path| {
        let p = p.to_path_buf();
        move |source| IdentityError::Io { what, path: p, source }
    };
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io("cannot create", &tmp))?;
    restrict(&tmp, 0o600).map_err(io("cannot set permissions of", &tmp))?;
    writeln!(f, "{HEADER}\n{}", hex::encode(secret)).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("cannot move the new key to", path))
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn restrict(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn check_permissions(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = fs::metadata(path)
        .map_err(|source| IdentityError::Io { what: "cannot stat", path: path.to_path_buf(), source })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions { path: path.to_path_buf(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_: &Path) -> Result<(), IdentityError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_kept_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        let id = {
            let k = NodeKey::load_or_create(&data).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = fs::metadata(data.join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600);
            }
            assert!(matches!(NodeKey::load_or_create(&data), Err(IdentityError::InUse(_))), "second user refused");
            k.pnode_id()
        };
        assert_eq!(NodeKey::load_or_create(&data).unwrap().pnode_id(), id);
        assert_ne!(NodeKey::ephemeral().unwrap().pnode_id(), id);
    }

    #[test]
    fn a_corrupt_or_exposed_key_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::write(&path, "dcnr-pnode-key-v1\nnot hex\n").unwrap();
        restrict(&path, 0o600).unwrap();
        let err = NodeKey::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }) && err.to_string().contains("not replaced"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "dcnr-pnode-key-v1\nnot hex\n");
        fs::write(&path, format!("{HEADER}\n{}\n", hex::encode([3u8; 16]))).unwrap();
        assert!(NodeKey::load_or_create(dir.path()).unwrap_err().to_string().contains("16 bytes"));
        #[cfg(unix)]
        {
            fs::write(&path, format!("{HEADER}\n{}\n", hex::encode([3u8; 32]))).unwrap();
            restrict(&path, 0o644).unwrap();
            assert!(matches!(NodeKey::load_or_create(dir.path()), Err(IdentityError::Permissions { mode: 0o644, .. })));
        }
    }
}
