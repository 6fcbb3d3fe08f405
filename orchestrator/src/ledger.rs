//! The trust book's persistence: every identity's reputation, saved in the artifact store under
//! the ref `trust/book` (a content-addressed JSON object), so a quarantine outlives an
//! orchestrator restart and a cheater cannot wash its identity by waiting for one.

use crate::artifacts::{ObjectStore, StoreError};
use crate::trust::Reputation;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The ref naming the newest saved book.
pub const REF: &str = "trust/book";

/// Format version of the saved book.
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Saved {
    format: u32,
    identities: BTreeMap<String, Reputation>,
}

/// Why a saved book could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The object is not a trust book of this format.
    #[error("the saved trust book is unreadable: {0}")]
    Corrupt(String),
    /// The book could not be encoded.
    #[error("cannot encode the trust book: {0}")]
    Encode(String),
}

/// Saves `identities` and points the ref at them.
pub async fn save(store: &dyn ObjectStore, identities: &BTreeMap<String, Reputation>) -> Result<String, LedgerError> {
    let bytes = serde_json::to_vec(&Saved { format: FORMAT, identities: identities.clone() })
        .map_err(|e| LedgerError::Encode(e.to_string()))?;
    let hash = store.put(bytes).await?;
    store.set_ref(REF, &hash).await?;
    Ok(hash)
}

/// The saved book, or an empty one when none was ever saved. A book that exists but cannot be
/// read is an error, never silently replaced: that would pardon every quarantined identity.
pub async fn load(store: &dyn ObjectStore) -> Result<BTreeMap<String, Reputation>, LedgerError> {
    let Some(hash) = store.get_ref(REF).await? else { return Ok(BTreeMap::new()) };
    let bytes = store.get(&hash).await?;
    let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| LedgerError::Corrupt(e.to_string()))?;
    if saved.format != FORMAT {
        return Err(LedgerError::Corrupt(format!("format {} (this build reads {FORMAT})", saved.format)));
    }
    Ok(saved.identities)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::DirStore;

    #[tokio::test(flavor = "current_thread")]
    async fn a_book_round_trips_and_a_corrupt_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path());
        assert!(load(&store).await.unwrap().is_empty());
        let mut ids = BTreeMap::new();
        ids.insert("pn-1".to_string(), Reputation { quarantined: Some("3 strikes".into()), ..Reputation::default() });
        save(&store, &ids).await.unwrap();
        assert_eq!(load(&store).await.unwrap(), ids);
        let bad = store.put(b"{\"format\": 1}".to_vec()).await.unwrap();
        store.set_ref(REF, &bad).await.unwrap();
        assert!(matches!(load(&store).await, Err(LedgerError::Corrupt(_))));
    }
}
