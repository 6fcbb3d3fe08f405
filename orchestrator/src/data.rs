//! Datasets loaded once per orchestrator process and shared by its jobs, and the packs it
//! publishes to PNodes: a job's PNodes fetch its dataset's pack (`FetchDataset`) and build
//! every micro-batch themselves, so the orchestrator only sends batch numbers.

use crate::artifacts::{ObjectStore, StoreError};
use dcnr_model::dataset::{self, DatasetError, ImageSet, PackError};
use dcnr_model::graph::Normalize;
use dcnr_vnode::HostTensor;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

pub use dcnr_model::dataset::Splits;

/// The normalised features `[n, width]` and labels of samples `idx` of `set`.
pub fn batch(set: &ImageSet, idx: &[usize], norm: Normalize) -> (HostTensor, Vec<i32>) {
    let x = set.gather_features(idx, norm.mean, norm.std);
    (HostTensor::f32(vec![idx.len(), set.features()], x), set.gather_labels(idx))
}

/// Why a dataset cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// It cannot be loaded.
    #[error(transparent)]
    Load(#[from] DatasetError),
    /// It cannot be packed.
    #[error("dataset {name}: {source}")]
    Pack { name: String, source: PackError },
}

/// A dataset's pack: the bytes PNodes fetch, their address, and the split sizes jobs plan with.
#[derive(Debug)]
pub struct Packed {
    /// Hex SHA-256 of `bytes`.
    pub sha256: String,
    /// The pack (`dcnr_model::dataset::encode_pack`).
    pub bytes: Vec<u8>,
    /// Training samples.
    pub train: usize,
    /// Test samples.
    pub test: usize,
}

/// Loads datasets by name on first use and keeps them, with the packs built from them.
#[derive(Clone, Default)]
pub struct DataCache {
    explicit: Option<PathBuf>,
    loaded: Arc<Mutex<HashMap<String, Arc<Splits>>>>,
    /// Packs by dataset name.
    packs: Arc<Mutex<HashMap<String, Arc<Packed>>>>,
    /// Packs published for a job, by address: the only ones `FetchDataset` serves.
    published: Arc<Mutex<HashMap<String, Arc<Packed>>>>,
}

impl DataCache {
    /// A cache that looks in `explicit` (or DCNR_DATA, or the default search list).
    pub fn new(explicit: Option<PathBuf>) -> DataCache {
        DataCache { explicit, ..DataCache::default() }
    }

    /// Both splits of dataset `name` (`mnist`, `fashion-mnist`).
    pub fn get(&self, name: &str) -> Result<Arc<Splits>, DatasetError> {
        if let Some(s) = self.loaded.lock().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(s);
        }
        let dir = dataset::locate(name, self.explicit.as_deref())?;
        let splits = Arc::new(dataset::load_splits(&dir)?);
        if let Ok(mut m) = self.loaded.lock() {
            m.insert(name.to_string(), splits.clone());
        }
        Ok(splits)
    }

    /// The pack of dataset `name` (built on first use), published so PNodes may fetch it.
    /// Building hashes the whole pack: call it off any thread that must stay responsive.
    pub fn publish(&self, name: &str) -> Result<Arc<Packed>, DataError> {
        // Held while building, so jobs starting together build a dataset's pack once.
        let mut packs = self.packs.lock().unwrap_or_else(PoisonError::into_inner);
        let known = packs.get(name).cloned();
        let packed = match known {
            Some(p) => p,
            None => {
                let splits = self.get(name)?;
                let bytes =
                    dataset::encode_pack(&splits).map_err(|source| DataError::Pack { name: name.into(), source })?;
                let packed = Arc::new(Packed {
                    sha256: dataset::pack_address(&bytes),
                    bytes,
                    train: splits.train.len(),
                    test: splits.test.len(),
                });
                packs.insert(name.into(), packed.clone());
                packed
            }
        };
        drop(packs);
        self.published.lock().unwrap_or_else(PoisonError::into_inner).insert(packed.sha256.clone(), packed.clone());
        Ok(packed)
    }

    /// A published pack by its address.
    pub fn published(&self, sha256: &str) -> Option<Arc<Packed>> {
        self.published.lock().unwrap_or_else(PoisonError::into_inner).get(sha256).cloned()
    }
}

/// Reference under which a pack is recorded in the artifact store (its object is the pack's
/// own hash, so the reference names what the object is and keeps it from garbage collection).
pub fn store_ref(sha256: &str) -> String {
    format!("datasets/{sha256}")
}

/// Puts a pack into the store unless its reference is already there; true if it was written.
pub async fn store_pack(store: &dyn ObjectStore, packed: &Packed) -> Result<bool, StoreError> {
    let name = store_ref(&packed.sha256);
    if store.get_ref(&name).await?.as_deref() == Some(packed.sha256.as_str()) {
        return Ok(false);
    }
    let hash = store.put(packed.bytes.clone()).await?;
    // The reference is written last, so it never names a pack that is not stored.
    store.set_ref(&name, &hash).await?;
    Ok(true)
}

/// Bytes per `DatasetChunk`.
pub const CHUNK_BYTES: usize = 1 << 20;

impl Packed {
    /// How many chunks the pack is sent in.
    pub fn chunk_count(&self) -> usize {
        self.bytes.len().div_ceil(CHUNK_BYTES)
    }

    /// Chunk `i` as `(offset, bytes)`; `None` past the last.
    pub fn chunk(&self, i: usize) -> Option<(u64, &[u8])> {
        let start = i.checked_mul(CHUNK_BYTES)?;
        let part = self.bytes.get(start..self.bytes.len().min(start.saturating_add(CHUNK_BYTES)))?;
        (!part.is_empty()).then_some((start as u64, part))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::MemoryStore;

    fn tiny() -> Packed {
        let bytes = vec![7u8; 2 * CHUNK_BYTES + 5];
        Packed { sha256: dataset::pack_address(&bytes), bytes, train: 1, test: 1 }
    }

    #[test]
    fn packs_are_stored_once_under_their_address() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let store = MemoryStore::default();
            let p = tiny();
            assert!(store_pack(&store, &p).await.unwrap());
            assert!(!store_pack(&store, &p).await.unwrap(), "present: not written again");
            assert_eq!(store.get_ref(&store_ref(&p.sha256)).await.unwrap(), Some(p.sha256.clone()));
            assert_eq!(store.get(&p.sha256).await.unwrap(), p.bytes);
        });
    }

    #[test]
    fn chunks_cover_the_pack_in_order() {
        let p = tiny();
        let parts: Vec<(u64, usize)> =
            (0..p.chunk_count()).filter_map(|i| p.chunk(i)).map(|(o, c)| (o, c.len())).collect();
        let m = CHUNK_BYTES as u64;
        assert_eq!(parts, vec![(0, CHUNK_BYTES), (m, CHUNK_BYTES), (2 * m, 5)]);
        assert_eq!(p.chunk(3), None);
        assert_eq!(p.chunk(usize::MAX), None);
    }

    #[test]
    fn only_published_packs_are_served() {
        let cache = DataCache::new(None);
        assert!(cache.published(&"0".repeat(64)).is_none());
        let packed = cache.publish("mnist").unwrap();
        assert_eq!(packed.sha256, dataset::pack_address(&packed.bytes));
        assert_eq!((packed.train, packed.test), (60_000, 10_000));
        assert!(Arc::ptr_eq(&cache.published(&packed.sha256).unwrap(), &packed));
        assert!(Arc::ptr_eq(&cache.publish("mnist").unwrap(), &packed), "built once");
    }
}
