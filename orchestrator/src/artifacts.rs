//! The artifact store: immutable objects keyed by the SHA-256 of their bytes, plus named
//! references (`jobs/<job_id>` → the hash of that job's record).
//!
//! One trait with two implementations, chosen by URL ([`open_store`]): a local directory
//! (`file:///path` or a plain path) and any S3-compatible service (`s3://bucket/prefix`, through
//! rust-s3, path-style). Every read is hash-checked; local writes go to a temporary file renamed
//! into place and S3 PUTs are atomic, so a crash never leaves a half-written object under a
//! valid name.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
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
    /// The S3 service refused or could not be reached.
    #[error("S3 store {location}: {detail}")]
    S3 { location: String, detail: String },
    /// The store URL is not understood.
    #[error("store URL `{0}` is not understood (use a directory, file:///path or s3://bucket/prefix)")]
    BadUrl(String),
}

/// Content-addressed storage of job artifacts.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync {
    /// Stores bytes; returns their hex SHA-256.
    async fn put(&self, bytes: Vec<u8>) -> Result<String, StoreError>;
    /// Reads and verifies an object.
    async fn get(&self, hash: &str) -> Result<Vec<u8>, StoreError>;
    /// Points reference `name` at `hash`.
    async fn set_ref(&self, name: &str, hash: &str) -> Result<(), StoreError>;
    /// Reads a reference.
    async fn get_ref(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Creates ref `name` → `hash` only if it does not exist, atomically: of several callers
    /// exactly one gets `true` (leases are taken this way).
    async fn create_ref(&self, name: &str, hash: &str) -> Result<bool, StoreError>;
    /// Names of references under `prefix/`, at any depth.
    async fn list_refs(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Every object's hash and age (None when the store cannot tell).
    async fn list_objects(&self) -> Result<Vec<(String, Option<std::time::Duration>)>, StoreError>;
    /// Deletes an object; only garbage collection calls this.
    async fn delete_object(&self, hash: &str) -> Result<(), StoreError>;
    /// Removes a reference (objects stay; they are immutable and may be shared).
    async fn delete_ref(&self, name: &str) -> Result<(), StoreError>;
    /// Where the store lives, for messages.
    fn location(&self) -> String;
}

/// Checks that a store can be written and read back, so a misconfigured store is reported when
/// the orchestrator starts rather than when the first job ends.
pub async fn probe(store: &dyn ObjectStore) -> Result<(), StoreError> {
    let hash = store.put(b"dcnr store probe\n".to_vec()).await?;
    store.get(&hash).await.map(|_| ())
}

/// Opens the store a URL names: a directory path, `file:///path`, or `s3://bucket[/prefix]`
/// (endpoint from `endpoint`, region from AWS_REGION, credentials from AWS_ACCESS_KEY_ID and
/// AWS_SECRET_ACCESS_KEY).
pub fn open_store(url: &str, endpoint: Option<&str>) -> Result<std::sync::Arc<dyn ObjectStore>, StoreError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::BadUrl(url.to_string()));
        }
        return Ok(std::sync::Arc::new(S3Store::new(bucket, prefix, endpoint)?));
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.is_empty() || url.contains("://") && !url.starts_with("file://") {
        return Err(StoreError::BadUrl(url.to_string()));
    }
    Ok(std::sync::Arc::new(DirStore::new(path)))
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn check_hash(hash: &str) -> Result<(), StoreError> {
    if valid_hash(hash) { Ok(()) } else { Err(StoreError::BadKey(hash.to_string())) }
}

fn check_ref(name: &str) -> Result<(), StoreError> {
    if valid_ref(name) { Ok(()) } else { Err(StoreError::BadKey(name.to_string())) }
}

/// The bytes of object `hash`, if they really hash to it.
fn verified(hash: &str, bytes: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    let actual = sha256_hex(&bytes);
    if actual == hash { Ok(bytes) } else { Err(StoreError::Corrupt { hash: hash.to_string(), actual }) }
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

#[async_trait::async_trait]
impl ObjectStore for DirStore {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, StoreError> {
        let hash = sha256_hex(&bytes);
        let path = self.object_path(&hash);
        if !path.exists() {
            self.write_atomic(&path, &bytes)?;
        }
        Ok(hash)
    }

    async fn get(&self, hash: &str) -> Result<Vec<u8>, StoreError> {
        check_hash(hash)?;
        let path = self.object_path(hash);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::Missing(hash.to_string())),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        verified(hash, bytes)
    }

    async fn set_ref(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        check_ref(name)?;
        self.write_atomic(&self.root.join("refs").join(name), hash.as_bytes())
    }

    async fn create_ref(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        check_ref(name)?;
        let path = self.root.join("refs").join(name);
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(Self::io(dir))?;
        std::io::Write::write_all(&mut tmp, hash.as_bytes()).map_err(Self::io(dir))?;
        tmp.as_file().sync_all().map_err(Self::io(dir))?;
        // A hard link fails if the name exists: creation with its content, in one step.
        match std::fs::hard_link(tmp.path(), &path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    async fn get_ref(&self, name: &str) -> Result<Option<String>, StoreError> {
        check_ref(name)?;
        let path = self.root.join("refs").join(name);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    async fn list_refs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let base = self.root.join("refs");
        let mut names = Vec::new();
        let mut dirs = vec![base.join(prefix)];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::Io { path: dir, source: e }),
            };
            for e in entries.filter_map(Result::ok) {
                let path = e.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if let Some(name) = path.strip_prefix(&base).ok().and_then(|p| p.to_str())
                    && valid_ref(name)
                {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    async fn list_objects(&self) -> Result<Vec<(String, Option<std::time::Duration>)>, StoreError> {
        let mut out = Vec::new();
        let root = self.root.join("objects");
        let shards = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(StoreError::Io { path: root, source: e }),
        };
        for shard in shards.filter_map(Result::ok) {
            let Ok(files) = std::fs::read_dir(shard.path()) else { continue };
            for f in files.filter_map(Result::ok) {
                let name = f.file_name().to_string_lossy().to_string();
                if valid_hash(&name) {
                    let age = f.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
                    out.push((name, age));
                }
            }
        }
        Ok(out)
    }

    async fn delete_object(&self, hash: &str) -> Result<(), StoreError> {
        check_hash(hash)?;
        let path = self.object_path(hash);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    async fn delete_ref(&self, name: &str) -> Result<(), StoreError> {
        check_ref(name)?;
        let path = self.root.join("refs").join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// A store in an S3 bucket: `<prefix>/objects/<hash>` and `<prefix>/refs/<name>`.
pub struct S3Store {
    bucket: Box<s3::Bucket>,
    prefix: String,
    location: String,
}

impl S3Store {
    /// A store in `bucket` under `prefix`, path-style (works with MinIO and other local servers).
    pub fn new(bucket: &str, prefix: &str, endpoint: Option<&str>) -> Result<S3Store, StoreError> {
        let location = format!("s3://{bucket}/{prefix}");
        let err = |detail: String| StoreError::S3 { location: location.clone(), detail };
        let region_name = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
        let region = match endpoint {
            Some(e) => s3::Region::Custom { region: region_name, endpoint: e.trim_end_matches('/').to_string() },
            None => region_name.parse().map_err(|e| err(format!("bad AWS_REGION: {e}")))?,
        };
        let credentials = s3::creds::Credentials::from_env()
            .or_else(|_| s3::creds::Credentials::anonymous())
            .map_err(|e| err(format!("no credentials: {e}")))?;
        let bucket = s3::Bucket::new(bucket, region, credentials).map_err(|e| err(e.to_string()))?.with_path_style();
        Ok(S3Store { bucket, prefix: prefix.trim_matches('/').to_string(), location })
    }

    fn key(&self, rest: &str) -> String {
        if self.prefix.is_empty() { rest.to_string() } else { format!("{}/{rest}", self.prefix) }
    }

    fn err(&self, e: s3::error::S3Error) -> StoreError {
        StoreError::S3 { location: self.location.clone(), detail: e.to_string() }
    }

    async fn read(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.bucket.get_object(key).await {
            Ok(r) => Ok(Some(r.bytes().to_vec())),
            Err(s3::error::S3Error::HttpFailWithBody(404, _)) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, StoreError> {
        let hash = sha256_hex(&bytes);
        self.bucket.put_object(self.key(&format!("objects/{hash}")), &bytes).await.map_err(|e| self.err(e))?;
        Ok(hash)
    }

    async fn get(&self, hash: &str) -> Result<Vec<u8>, StoreError> {
        check_hash(hash)?;
        let bytes = self
            .read(&self.key(&format!("objects/{hash}")))
            .await?
            .ok_or_else(|| StoreError::Missing(hash.to_string()))?;
        verified(hash, bytes)
    }

    async fn set_ref(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        check_ref(name)?;
        self.bucket.put_object(self.key(&format!("refs/{name}")), hash.as_bytes()).await.map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn create_ref(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        check_ref(name)?;
        // S3's conditional write: the PUT fails with 412 when the key exists.
        let put = self
            .bucket
            .put_object_builder(self.key(&format!("refs/{name}")), hash.as_bytes())
            .with_header("If-None-Match", "*")
            .map_err(|e| self.err(e))?;
        match put.execute().await {
            Ok(r) if r.status_code() == 412 => Ok(false),
            Ok(r) if (200..300).contains(&r.status_code()) => Ok(true),
            Ok(r) => {
                Err(StoreError::S3 { location: self.location.clone(), detail: format!("status {}", r.status_code()) })
            }
            Err(s3::error::S3Error::HttpFailWithBody(412, _)) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn get_ref(&self, name: &str) -> Result<Option<String>, StoreError> {
        check_ref(name)?;
        let bytes = self.read(&self.key(&format!("refs/{name}"))).await?;
        Ok(bytes.map(|b| String::from_utf8_lossy(&b).trim().to_string()))
    }

    async fn list_refs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let base = self.key("refs/");
        let pages = self.bucket.list(format!("{base}{prefix}/"), None).await.map_err(|e| self.err(e))?;
        let mut names: Vec<String> = pages
            .iter()
            .flat_map(|p| p.contents.iter())
            .filter_map(|o| o.key.strip_prefix(&base).map(str::to_string))
            .filter(|n| valid_ref(n))
            .collect();
        names.sort();
        Ok(names)
    }

    async fn list_objects(&self) -> Result<Vec<(String, Option<std::time::Duration>)>, StoreError> {
        let base = self.key("objects/");
        let pages = self.bucket.list(base.clone(), None).await.map_err(|e| self.err(e))?;
        let now = std::time::SystemTime::now();
        Ok(pages
            .iter()
            .flat_map(|p| p.contents.iter())
            .filter_map(|o| {
                let hash = o.key.strip_prefix(&base)?.to_string();
                let age = humantime::parse_rfc3339_weak(&o.last_modified).ok().and_then(|t| now.duration_since(t).ok());
                valid_hash(&hash).then_some((hash, age))
            })
            .collect())
    }

    async fn delete_object(&self, hash: &str) -> Result<(), StoreError> {
        check_hash(hash)?;
        match self.bucket.delete_object(self.key(&format!("objects/{hash}"))).await {
            Ok(_) | Err(s3::error::S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn delete_ref(&self, name: &str) -> Result<(), StoreError> {
        check_ref(name)?;
        match self.bucket.delete_object(self.key(&format!("refs/{name}"))).await {
            Ok(_) | Err(s3::error::S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

/// A store in memory: what the simulator writes checkpoints to, and what it damages.
#[derive(Default)]
pub struct MemoryStore {
    inner: std::sync::Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    objects: BTreeMap<String, Vec<u8>>,
    refs: BTreeMap<String, String>,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every object's hash.
    pub fn hashes(&self) -> BTreeSet<String> {
        self.lock().objects.keys().cloned().collect()
    }

    /// Flips the first byte of object `hash`, as a failing disk would.
    pub fn damage(&self, hash: &str) {
        if let Some(b) = self.lock().objects.get_mut(hash).and_then(|o| o.first_mut()) {
            *b ^= 0xff;
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for MemoryStore {
    async fn put(&self, bytes: Vec<u8>) -> Result<String, StoreError> {
        let hash = sha256_hex(&bytes);
        self.lock().objects.entry(hash.clone()).or_insert(bytes);
        Ok(hash)
    }

    async fn get(&self, hash: &str) -> Result<Vec<u8>, StoreError> {
        check_hash(hash)?;
        let bytes = self.lock().objects.get(hash).cloned().ok_or_else(|| StoreError::Missing(hash.to_string()))?;
        verified(hash, bytes)
    }

    async fn set_ref(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        check_ref(name)?;
        self.lock().refs.insert(name.to_string(), hash.to_string());
        Ok(())
    }

    async fn get_ref(&self, name: &str) -> Result<Option<String>, StoreError> {
        check_ref(name)?;
        Ok(self.lock().refs.get(name).cloned())
    }

    async fn create_ref(&self, name: &str, hash: &str) -> Result<bool, StoreError> {
        check_ref(name)?;
        match self.lock().refs.entry(name.to_string()) {
            std::collections::btree_map::Entry::Occupied(_) => Ok(false),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(hash.to_string());
                Ok(true)
            }
        }
    }

    async fn list_refs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let under = format!("{prefix}/");
        Ok(self.lock().refs.keys().filter(|k| k.starts_with(&under)).cloned().collect())
    }

    async fn list_objects(&self) -> Result<Vec<(String, Option<std::time::Duration>)>, StoreError> {
        Ok(self.lock().objects.keys().map(|h| (h.clone(), None)).collect())
    }

    async fn delete_object(&self, hash: &str) -> Result<(), StoreError> {
        self.lock().objects.remove(hash);
        Ok(())
    }

    async fn delete_ref(&self, name: &str) -> Result<(), StoreError> {
        self.lock().refs.remove(name);
        Ok(())
    }

    fn location(&self) -> String {
        "memory".into()
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
pub async fn write_record(
    store: &dyn ObjectStore,
    mut record: JobRecord,
    artifacts: Vec<(&str, Vec<u8>)>,
) -> Result<String, StoreError> {
    for (name, bytes) in artifacts {
        record.artifacts.insert(name.to_string(), store.put(bytes).await?);
    }
    let bytes = serde_json::to_vec_pretty(&record)
        .map_err(|e| StoreError::Io { path: PathBuf::from("record.json"), source: std::io::Error::other(e) })?;
    let hash = store.put(bytes).await?;
    // The reference is written last, so it never points at a record whose parts are missing.
    store.set_ref(&format!("jobs/{}", record.job_id), &hash).await?;
    Ok(hash)
}

/// Finds a job's record by job id, by the hash of its record, or by the hash of its result.
pub async fn find_record(store: &dyn ObjectStore, key: &str) -> Result<(String, JobRecord), StoreError> {
    async fn parse(store: &dyn ObjectStore, hash: &str) -> Result<JobRecord, StoreError> {
        let bytes = store.get(hash).await?;
        serde_json::from_slice(&bytes).map_err(|_| StoreError::Missing(format!("{hash} (not a job record)")))
    }
    if valid_ref(&format!("jobs/{key}"))
        && let Some(h) = store.get_ref(&format!("jobs/{key}")).await?
    {
        return Ok((h.clone(), parse(store, &h).await?));
    }
    if valid_hash(key) {
        if let Ok(r) = parse(store, key).await {
            return Ok((key.to_string(), r));
        }
        for name in store.list_refs("jobs").await? {
            if let Some(h) = store.get_ref(&name).await?
                && let Ok(r) = parse(store, &h).await
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

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn objects_are_content_addressed_and_checked() {
        block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DirStore::new(dir.path());
            let h = s.put(b"hello".to_vec()).await.unwrap();
            assert_eq!(h, sha256_hex(b"hello"));
            assert_eq!(s.get(&h).await.unwrap(), b"hello");
            std::fs::write(dir.path().join("objects").join(&h[..2]).join(&h), b"hellO").unwrap();
            assert!(matches!(s.get(&h).await, Err(StoreError::Corrupt { .. })));
            assert!(matches!(s.get("zz").await, Err(StoreError::BadKey(_))));
            assert!(matches!(s.set_ref("../x", &h).await, Err(StoreError::BadKey(_))));
        });
    }

    #[test]
    fn records_are_found_by_job_id_record_hash_or_result_hash() {
        block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let s = DirStore::new(dir.path());
            let rec = JobRecord {
                job_id: "j1".into(),
                status: "succeeded".into(),
                error_code: None,
                error: None,
                artifacts: BTreeMap::new(),
            };
            let h = write_record(&s, rec, vec![("result.json", b"{\"a\":1}".to_vec())]).await.unwrap();
            let result = sha256_hex(b"{\"a\":1}");
            assert_eq!(find_record(&s, "j1").await.unwrap().0, h);
            assert_eq!(find_record(&s, &h).await.unwrap().0, h);
            assert_eq!(find_record(&s, &result).await.unwrap().0, h);
            assert!(find_record(&s, "nope").await.is_err());
        });
    }

    #[test]
    fn store_urls() {
        assert!(open_store("dcnr-artifacts", None).is_ok());
        assert!(open_store("file:///tmp/x", None).is_ok());
        assert!(matches!(open_store("ftp://x", None), Err(StoreError::BadUrl(_))));
        assert!(matches!(open_store("s3://", None), Err(StoreError::BadUrl(_))));
    }
}
