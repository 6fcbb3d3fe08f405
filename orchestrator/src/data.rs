//! Datasets loaded once per orchestrator process and shared by its jobs.

use dcnr_model::dataset::{self, DatasetError, ImageSet, Split};
use dcnr_model::graph::Normalize;
use dcnr_vnode::HostTensor;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Train and test split of one dataset.
#[derive(Debug)]
pub struct Splits {
    /// Training samples.
    pub train: ImageSet,
    /// Test samples.
    pub test: ImageSet,
}

/// The normalised features `[n, width]` and labels of samples `idx` of `set`.
pub fn batch(set: &ImageSet, idx: &[usize], norm: Normalize) -> (HostTensor, Vec<i32>) {
    let x = set.gather_features(idx, norm.mean, norm.std);
    (HostTensor::f32(vec![idx.len(), set.features()], x), set.gather_labels(idx))
}

/// Loads datasets by name on first use and keeps them.
#[derive(Clone, Default)]
pub struct DataCache {
    explicit: Option<PathBuf>,
    loaded: Arc<Mutex<HashMap<String, Arc<Splits>>>>,
}

impl DataCache {
    /// A cache that looks in `explicit` (or DCNR_DATA, or the default search list).
    pub fn new(explicit: Option<PathBuf>) -> DataCache {
        DataCache { explicit, loaded: Arc::default() }
    }

    /// Both splits of dataset `name` (`mnist`, `fashion-mnist`).
    pub fn get(&self, name: &str) -> Result<Arc<Splits>, DatasetError> {
        if let Some(s) = self.loaded.lock().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(s);
        }
        let dir = dataset::locate(name, self.explicit.as_deref())?;
        let splits = Arc::new(Splits {
            train: dataset::load_split(&dir, Split::Train)?,
            test: dataset::load_split(&dir, Split::Test)?,
        });
        if let Ok(mut m) = self.loaded.lock() {
            m.insert(name.to_string(), splits.clone());
        }
        Ok(splits)
    }
}
