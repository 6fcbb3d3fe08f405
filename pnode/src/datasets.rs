//! The dataset packs this PNode's VNodes read: fetched once from the orchestrator, checked
//! against their address and announced size, cached as `<data-dir>/datasets/<sha256>` (or kept
//! in memory only when the PNode has no data directory), and shared decoded (one `Arc`) between
//! the jobs that use the same pack.
//!
//! A cached file is checked again whenever it is loaded; a corrupt one is deleted and fetched
//! anew. Files are written to a temporary name, synced, then renamed, so a crash never leaves a
//! half-written pack under a valid name.

use crate::membership::{FetchError, OrchestratorLink};
use crate::metrics::PNODE;
use dcnr_model::dataset::{PackError, Splits, decode_pack, pack_address};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

/// Directory under `--data-dir` that holds cached packs.
pub const CACHE_DIR: &str = "datasets";

/// Why a dataset pack could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The address is not a hex SHA-256.
    #[error("`{0}` is not a dataset address (64 lowercase hex digits)")]
    BadAddress(String),
    /// The pack is larger than this PNode accepts, or empty.
    #[error("dataset pack {sha256} is {bytes} bytes; this pnode accepts 1 to {limit} (--max-dataset-mib)")]
    Size {
        /// The pack's address.
        sha256: String,
        /// Its announced size.
        bytes: u64,
        /// This PNode's limit.
        limit: u64,
    },
    /// The orchestrator could not deliver it.
    #[error("cannot fetch dataset pack {sha256} from the orchestrator: {source}")]
    Fetch {
        /// The pack's address.
        sha256: String,
        /// What went wrong.
        source: FetchError,
    },
    /// The bytes are not the pack the address names.
    #[error("dataset pack {sha256}: its bytes hash to {actual}")]
    Mismatch {
        /// The pack's address.
        sha256: String,
        /// What they hash to.
        actual: String,
    },
    /// The bytes hash right but are not a valid pack.
    #[error("dataset pack {sha256}: {source}")]
    Invalid {
        /// The pack's address.
        sha256: String,
        /// What is wrong.
        source: PackError,
    },
    /// The cache directory cannot be written.
    #[error("dataset cache {}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The checking thread was lost (a bug, reported rather than hidden).
    #[error("checking dataset pack {0} failed: {1}")]
    Task(String, String),
}

/// The packs this PNode has, and where it caches them.
pub struct Datasets {
    dir: Option<PathBuf>,
    limit: u64,
    state: tokio::sync::Mutex<Held>,
}

/// Decoded packs: every one still used by a job, plus the latest, kept for the next job.
#[derive(Default)]
struct Held {
    in_use: HashMap<String, Weak<Splits>>,
    latest: Option<(String, Arc<Splits>)>,
}

impl Datasets {
    /// Packs cached under `data_dir/datasets` (memory only without a data dir), at most `limit`
    /// bytes each.
    pub fn new(data_dir: Option<&Path>, limit: u64) -> Datasets {
        Datasets { dir: data_dir.map(|d| d.join(CACHE_DIR)), limit, state: tokio::sync::Mutex::new(Held::default()) }
    }

    /// The decoded pack `sha256` of `bytes` bytes: already held, cached on disk, or fetched
    /// through `link` (the orchestrator of the job that needs it). Concurrent calls wait for
    /// each other, so a pack is fetched once.
    pub async fn obtain(&self, sha256: &str, bytes: u64, link: &OrchestratorLink) -> Result<Arc<Splits>, DatasetError> {
        if !valid_address(sha256) {
            return Err(DatasetError::BadAddress(sha256.chars().take(80).collect()));
        }
        if bytes == 0 || bytes > self.limit {
            return Err(DatasetError::Size { sha256: sha256.into(), bytes, limit: self.limit });
        }
        let mut held = self.state.lock().await;
        held.in_use.retain(|_, w| w.strong_count() > 0);
        if let Some(s) = held.in_use.get(sha256).and_then(Weak::upgrade) {
            PNODE.dataset_loads.with_label_values(&["memory"]).inc();
            held.latest = Some((sha256.to_string(), s.clone()));
            return Ok(s);
        }
        let splits = match self.cached(sha256, bytes).await? {
            Some(s) => s,
            None => self.fetch(sha256, bytes, link).await?,
        };
        let splits = Arc::new(splits);
        held.in_use.insert(sha256.to_string(), Arc::downgrade(&splits));
        held.latest = Some((sha256.to_string(), splits.clone()));
        Ok(splits)
    }

    /// The cached pack, if there is a valid one; a corrupt one is deleted.
    async fn cached(&self, sha256: &str, bytes: u64) -> Result<Option<Splits>, DatasetError> {
        let Some(dir) = &self.dir else { return Ok(None) };
        let path = dir.join(sha256);
        let (sha, p) = (sha256.to_string(), path.clone());
        let read = tokio::task::spawn_blocking(move || -> Result<Option<Splits>, DatasetError> {
            match std::fs::read(&p) {
                Ok(data) => check_pack(&sha, bytes, &data).map(Some),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(DatasetError::Io { path: p, source }),
            }
        })
        .await
        .map_err(|e| DatasetError::Task(sha256.into(), e.to_string()))?;
        match read {
            Ok(Some(s)) => {
                PNODE.dataset_loads.with_label_values(&["disk"]).inc();
                Ok(Some(s))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                PNODE.dataset_cache_corrupt.inc();
                tracing::warn!(path = %path.display(), error = %e, "cached dataset pack is unusable; fetching it again");
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(DatasetError::Io { path, source }),
                }
            }
        }
    }

    /// Fetches, checks and (with a data dir) caches the pack.
    async fn fetch(&self, sha256: &str, bytes: u64, link: &OrchestratorLink) -> Result<Splits, DatasetError> {
        tracing::info!(%sha256, bytes, "fetching a dataset pack from the orchestrator");
        let data = link
            .fetch_dataset(sha256, bytes)
            .await
            .map_err(|source| DatasetError::Fetch { sha256: sha256.into(), source })?;
        PNODE.dataset_loads.with_label_values(&["orchestrator"]).inc();
        PNODE.dataset_bytes_fetched.inc_by(bytes);
        let (sha, dir) = (sha256.to_string(), self.dir.clone());
        tokio::task::spawn_blocking(move || {
            let splits = check_pack(&sha, bytes, &data)?;
            if let Some(dir) = dir {
                write_atomic(&dir, &sha, &data)?;
            }
            Ok(splits)
        })
        .await
        .map_err(|e| DatasetError::Task(sha256.into(), e.to_string()))?
    }
}

/// Whether `s` is a hex SHA-256 as the orchestrator writes them (so it is also a safe file name).
fn valid_address(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `data` as the pack `sha256` of `bytes` bytes, decoded, or why not.
fn check_pack(sha256: &str, bytes: u64, data: &[u8]) -> Result<Splits, DatasetError> {
    let actual = pack_address(data);
    if data.len() as u64 != bytes || actual != sha256 {
        return Err(DatasetError::Mismatch {
            sha256: sha256.into(),
            actual: format!("{actual} ({} bytes)", data.len()),
        });
    }
    decode_pack(data).map_err(|source| DatasetError::Invalid { sha256: sha256.into(), source })
}

/// Writes `dir/name` through a synced temporary file and a rename.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<(), DatasetError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatasetError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".{name}.partial"));
    let done = dir.join(name);
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &done).map_err(io(&done))?;
    // The rename itself is durable only once the directory is synced.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcnr_model::dataset::{ImageSet, encode_pack};

    fn pack() -> Vec<u8> {
        let set = ImageSet { rows: 1, cols: 2, images: vec![1, 2, 3, 4], labels: vec![0, 1] };
        encode_pack(&Splits { train: set.clone(), test: set, classes: 2 }).unwrap()
    }

    #[test]
    fn packs_are_checked_against_address_and_size() {
        let data = pack();
        let sha = pack_address(&data);
        assert_eq!(check_pack(&sha, data.len() as u64, &data).unwrap().train.len(), 2);
        assert!(matches!(check_pack(&sha, data.len() as u64 + 1, &data), Err(DatasetError::Mismatch { .. })));
        let mut bad = data.clone();
        bad[50] ^= 1;
        assert!(matches!(check_pack(&sha, data.len() as u64, &bad), Err(DatasetError::Mismatch { .. })));
        // Right hash, wrong format: refused by the decoder.
        let junk = b"not a pack".to_vec();
        let err = check_pack(&pack_address(&junk), junk.len() as u64, &junk).unwrap_err();
        assert!(matches!(err, DatasetError::Invalid { .. }), "{err}");
    }

    #[test]
    fn addresses_are_hex_sha256_only() {
        assert!(valid_address(&"0a".repeat(32)));
        assert!(!valid_address(&"0A".repeat(32)));
        assert!(!valid_address("../../etc/passwd"));
        assert!(!valid_address(&"0".repeat(63)));
    }

    #[test]
    fn cache_files_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("datasets");
        write_atomic(&sub, "x", b"abc").unwrap();
        assert_eq!(std::fs::read(sub.join("x")).unwrap(), b"abc");
        assert!(!sub.join(".x.partial").exists());
        write_atomic(&sub, "x", b"abcd").unwrap();
        assert_eq!(std::fs::read(sub.join("x")).unwrap(), b"abcd");
    }
}
