//! The trust book's persistence: every identity's reputation, saved in the artifact store (a
//! content-addressed JSON object), so a quarantine outlives an orchestrator restart and a
//! cheater cannot wash its identity by waiting for one. Each orchestrator sharing the store
//! writes its own book, `trust/books/<instance>`, and reads everyone's, joined record by record
//! (`trust::Reputation::join`): a quarantine anywhere holds everywhere, and no orchestrator
//! ever overwrites another's book.

use crate::artifacts::{ObjectStore, StoreError};
use crate::trust::Reputation;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The ref of the book one orchestrator wrote before books were kept per instance; still read.
pub const REF: &str = "trust/book";

/// The ref of the book `instance` writes (its name hashed: any instance name is a valid ref).
pub fn book_ref(instance: &str) -> String {
    let hash = crate::artifacts::sha256_hex(instance.as_bytes());
    format!("trust/books/{}", &hash[..16])
}

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

/// Saves `identities` as `instance`'s book.
pub async fn save(
    store: &dyn ObjectStore,
    instance: &str,
    identities: &BTreeMap<String, Reputation>,
) -> Result<String, LedgerError> {
    let bytes = serde_json::to_vec(&Saved { format: FORMAT, identities: identities.clone() })
        .map_err(|e| LedgerError::Encode(e.to_string()))?;
    let hash = store.put(bytes).await?;
    store.set_ref(&book_ref(instance), &hash).await?;
    Ok(hash)
}

/// Every saved book joined, or an empty one when none was ever saved. A book that exists but
/// cannot be read is an error, never silently skipped: that would pardon its quarantines.
pub async fn load(store: &dyn ObjectStore) -> Result<BTreeMap<String, Reputation>, LedgerError> {
    let mut names = store.list_refs("trust/books").await?;
    names.push(REF.to_string());
    let mut book = crate::trust::TrustBook::new(Default::default());
    for name in names {
        let Some(hash) = store.get_ref(&name).await? else { continue };
        let bytes = store.get(&hash).await?;
        let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| LedgerError::Corrupt(e.to_string()))?;
        if saved.format != FORMAT {
            return Err(LedgerError::Corrupt(format!("format {} (this build reads {FORMAT})", saved.format)));
        }
        book.absorb(&saved.identities);
    }
    Ok(book.reputations().clone())
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
        save(&store, "a", &ids).await.unwrap();
        assert_eq!(load(&store).await.unwrap(), ids);
        // Another orchestrator's book joins in; neither overwrites the other.
        let mut theirs = BTreeMap::new();
        theirs.insert("pn-2".to_string(), Reputation { quarantined: Some("lied".into()), ..Reputation::default() });
        theirs.insert("pn-1".to_string(), Reputation { valid: 7, ..Reputation::default() });
        save(&store, "b", &theirs).await.unwrap();
        let both = load(&store).await.unwrap();
        assert!(both["pn-1"].quarantined.is_some() && both["pn-1"].valid == 7);
        assert!(both["pn-2"].quarantined.is_some());
        let bad = store.put(b"{\"format\": 1}".to_vec()).await.unwrap();
        store.set_ref(REF, &bad).await.unwrap();
        assert!(matches!(load(&store).await, Err(LedgerError::Corrupt(_))));
    }
}
