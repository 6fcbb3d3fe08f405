//! The artifact store: immutable objects keyed by the SHA-256 of their bytes, plus named
//! references (`jobs/<job_id>` → the hash of that job's record).
//!
//! One trait, so an S3 implementation can stand beside the local directory one; every read is
//! hash-checked, and every write goes to a temporary file renamed into place, so a crash never
//! leaves a half-written object under a valid name.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Filesystem error.
    #[error("artifact store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// An object's bytes do not hash to its key.
    #[error("artifact {hash} is corrupt: its bytes hash to {actual}")]
    Corrupt { hash: String, actual: String },
    /// No such object or reference.
    #[error("no artifact or record named {0}")]
    Missing(String),
    /// A key that is not a hex SHA-256 or a reference name with odd characters.
    #[error("`{0}` is not a valid artifact key")]
    BadKey(String),
}

/// Content-addressed storage of job artifacts.
pub trait ObjectStore: Send + Sync {
    /// Stores bytes; returns their hex SHA-256.
    fn put(&self, bytes: &[u8]) -> Result<String, StoreError>;
    /// Reads and verifies an object.
    fn get(&self, hash: &str) -> Result<Vec<u8>, StoreError>;
    /// Points reference `name` at `hash`.
    fn set_ref(&self, name: &str, hash: &str) -> Result<(), StoreError>;
    /// Reads a reference.
    fn get_ref(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Names of references under `prefix/`.
    fn list_refs(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Where the store lives, for messages.
    fn location(&self) -> String;
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn valid_ref(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
}

/// A store in a local directory: `objects/<2 hex>/<hash>` and `refs/<name>`.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> DirStore {
        DirStore { root: root.into() }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io { path: path.to_path_buf(), source }
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(Self::io(dir))?;
        tmp.write_all(bytes).map_err(Self::io(path))?;
        tmp.as_file().sync_all().map_err(Self::io(path))?;
        tmp.persist(path).map_err(|e| StoreError::Io { path: path.to_path_buf(), source: e.error })?;
        Ok(())
    }

    fn object_path(&self, hash: &str) -> PathBuf {
        self.root.join("objects").join(&hash[..2]).join(hash)
    }
}

impl ObjectStore for DirStore {
    fn put(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let hash = sha256_hex(bytes);
        let path = self.object_path(&hash);
        if !path.exists() {
            self.write_atomic(&path, bytes)?;
        }
        Ok(hash)
    }

    fn get(&self, hash: &str) -> Result<Vec<u8>, StoreError> {
        if !valid_hash(hash) {
            return Err(StoreError::BadKey(hash.to_string()));
        }
        let path = self.object_path(hash);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::Missing(hash.to_string())),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let actual = sha256_hex(&bytes);
        if actual != hash {
            return Err(StoreError::Corrupt { hash: hash.to_string(), actual });
        }
        Ok(bytes)
    }

    fn set_ref(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        if !valid_ref(name) {
            return Err(StoreError::BadKey(name.to_string()));
        }
        self.write_atomic(&self.root.join("refs").join(name), hash.as_bytes())
    }

    fn get_ref(&self, name: &str) -> Result<Option<String>, StoreError> {
        if !valid_ref(name) {
            return Err(StoreError::BadKey(name.to_string()));
        }
        let path = self.root.join("refs").join(name);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn list_refs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("refs").join(prefix);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::Io { path: dir, source: e }),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(|n| format!("{prefix}/{n}")))
            .filter(|n| valid_ref(n))
            .collect();
        names.sort();
        Ok(names)
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// The record of one job: its outcome and the hashes of its artifacts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    /// Job id.
    pub job_id: String,
    /// `succeeded` or `failed`.
    pub status: String,
    /// Machine-readable failure class.
    pub error_code: Option<String>,
    /// Human-readable failure.
    pub error: Option<String>,
    /// Artifact name (`result.json`, ...) to object hash.
    pub artifacts: BTreeMap<String, String>,
}

/// Writes artifacts and the record; returns the record's hash.
pub fn write_record(
    store: &dyn ObjectStore,
    mut record: JobRecord,
    artifacts: &[(&str, Vec<u8>)],
) -> Result<String, StoreError> {
    for (name, bytes) in artifacts {
        record.artifacts.insert((*name).to_string(), store.put(bytes)?);
    }
    let bytes = serde_json::to_vec_pretty(&record)
        .map_err(|e| StoreError::Io { path: PathBuf::from("record.json"), source: std::io::Error::other(e) })?;
    let hash = store.put(&bytes)?;
    store.set_ref(&format!("jobs/{}", record.job_id), &hash)?;
    Ok(hash)
}

/// Finds a job's record by job id, by the hash of its record, or by the hash of its result.
pub fn find_record(store: &dyn ObjectStore, key: &str) -> Result<(String, JobRecord), StoreError> {
    let parse = |hash: &str| -> Result<JobRecord, StoreError> {
        let bytes = store.get(hash)?;
        serde_json::from_slice(&bytes).map_err(|_| StoreError::Missing(format!("{hash} (not a job record)")))
    };
    if valid_ref(&format!("jobs/{key}"))
        && let Some(h) = store.get_ref(&format!("jobs/{key}"))?
    {
        return Ok((h.clone(), parse(&h)?));
    }
    if valid_hash(key) {
        if let Ok(r) = parse(key) {
            return Ok((key.to_string(), r));
        }
        for name in store.list_refs("jobs")? {
            if let Some(h) = store.get_ref(&name)?
                && let Ok(r) = parse(&h)
                && r.artifacts.get("result.json").map(String::as_str) == Some(key)
            {
                return Ok((h, r));
            }
        }
    }
    Err(StoreError::Missing(key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_content_addressed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::new(dir.path());
        let h = s.put(b"hello").unwrap();
        assert_eq!(h, sha256_hex(b"hello"));
        assert_eq!(s.get(&h).unwrap(), b"hello");
        std::fs::write(dir.path().join("objects").join(&h[..2]).join(&h), b"hellO").unwrap();
        assert!(matches!(s.get(&h), Err(StoreError::Corrupt { .. })));
        assert!(matches!(s.get("zz"), Err(StoreError::BadKey(_))));
        assert!(matches!(s.set_ref("../x", &h), Err(StoreError::BadKey(_))));
    }

    #[test]
    fn records_are_found_by_job_id_record_hash_or_result_hash() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::new(dir.path());
        let rec = JobRecord {
            job_id: "j1".into(),
            status: "succeeded".into(),
            error_code: None,
            error: None,
            artifacts: BTreeMap::new(),
        };
        let h = write_record(&s, rec, &[("result.json", b"{\"a\":1}".to_vec())]).unwrap();
        let result = sha256_hex(b"{\"a\":1}");
        assert_eq!(find_record(&s, "j1").unwrap().0, h);
        assert_eq!(find_record(&s, &h).unwrap().0, h);
        assert_eq!(find_record(&s, &result).unwrap().0, h);
        assert!(find_record(&s, "nope").is_err());
    }
}
