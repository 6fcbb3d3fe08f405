//! Job ownership among orchestrators sharing one artifact store. A job is run by the
//! orchestrator holding its newest lease: `leases/<job>/<seq>`, a ref to a [`LeaseRecord`]
//! (owner, expiry). Taking a lease is creating the ref of the next sequence number, an atomic
//! create-if-absent in the store (a hard link in a directory, `If-None-Match: *` on S3), so of
//! several orchestrators reaching for the same lease exactly one gets it. Only the holder of
//! sequence `n` rewrites `n` (to renew it); the others may take `n + 1` once `n` has expired.
//! A holder that finds a newer sequence at its renewal has lost the job and stops it.
//!
//! The decisions are pure ([`may_take`], [`newest`]); [`Leases`] does the store's IO.

use crate::artifacts::{ObjectStore, StoreError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a lease ref points to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRecord {
    /// The job.
    pub job: String,
    /// Its sequence number: the newest lease is the owner.
    pub seq: u64,
    /// The orchestrator instance holding it.
    pub owner: String,
    /// Wall-clock expiry, Unix milliseconds; renewed while the job runs.
    pub expires_unix_ms: u64,
    /// Where the holder serves gRPC, so its peers can forward requests about the job (empty
    /// from an orchestrator that did not say).
    #[serde(default)]
    pub url: String,
}

/// The sequence number a lease ref name carries (`leases/<job>/<seq>`).
fn seq_of(name: &str) -> Option<u64> {
    name.rsplit('/').next()?.parse().ok()
}

/// The ref of lease `seq` of `job`; zero-padded so names sort as numbers.
pub fn ref_name(job: &str, seq: u64) -> String {
    format!("leases/{job}/{seq:020}")
}

/// The newest sequence number among lease ref names.
pub fn newest(names: &[String]) -> Option<u64> {
    names.iter().filter_map(|n| seq_of(n)).max()
}

/// The sequence number `me` may create to own the job at `now_ms`, given its newest lease: the
/// first when there is none, the next when the newest has expired or is `me`'s own (an earlier
/// run of this instance), none while another holds it.
pub fn may_take(newest: Option<&LeaseRecord>, me: &str, now_ms: u64) -> Option<u64> {
    match newest {
        None => Some(0),
        Some(r) if r.owner == me || now_ms > r.expires_unix_ms => r.seq.checked_add(1),
        Some(_) => None,
    }
}

/// Wall-clock time in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A lease this orchestrator holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The job.
    pub job: String,
    /// Its sequence number.
    pub seq: u64,
}

/// How a renewal went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, for another term.
    Renewed,
    /// Another orchestrator took the job (it holds sequence `by_seq`).
    Lost {
        /// The newer sequence number.
        by_seq: u64,
    },
}

/// The leases of one orchestrator instance.
pub struct Leases {
    store: std::sync::Arc<dyn ObjectStore>,
    owner: String,
    term: Duration,
    url: String,
}

/// The newest lease of `job` in `store`, whoever holds it (expired or not); `None` if it never
/// had one.
pub async fn holder(store: &dyn ObjectStore, job: &str) -> Result<Option<LeaseRecord>, StoreError> {
    let names = store.list_refs(&format!("leases/{job}")).await?;
    let Some(seq) = newest(&names) else { return Ok(None) };
    let Some(hash) = store.get_ref(&ref_name(job, seq)).await? else { return Ok(None) };
    let bytes = store.get(&hash).await?;
    // An unreadable record cannot be renewed by anyone: it is treated as expired.
    Ok(Some(serde_json::from_slice(&bytes).unwrap_or(LeaseRecord {
        job: job.to_string(),
        seq,
        owner: String::new(),
        expires_unix_ms: 0,
        url: String::new(),
    })))
}

impl Leases {
    /// Leases held as `owner` in `store`, each valid for `term` after its last renewal.
    pub fn new(store: std::sync::Arc<dyn ObjectStore>, owner: String, term: Duration) -> Leases {
        Leases { store, owner, term, url: String::new() }
    }

    /// The same, naming `url` as where this instance serves (for peers forwarding requests).
    pub fn serving_at(self, url: String) -> Leases {
        Leases { url, ..self }
    }

    /// This instance's name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How long a lease lasts without renewal.
    pub fn term(&self) -> Duration {
        self.term
    }

    async fn newest_record(&self, job: &str) -> Result<Option<LeaseRecord>, StoreError> {
        holder(self.store.as_ref(), job).await
    }

    async fn write(&self, job: &str, seq: u64, now_ms: u64) -> Result<String, StoreError> {
        let record = LeaseRecord {
            job: job.to_string(),
            seq,
            owner: self.owner.clone(),
            expires_unix_ms: now_ms.saturating_add(self.term.as_millis() as u64),
            url: self.url.clone(),
        };
        self.store.put(serde_json::to_vec(&record).unwrap_or_default()).await
    }

    /// Takes `job` if no one else holds it now; `None` if another orchestrator does. With
    /// `lapsed_only`, only a job that has had a lease (one without is being started by the
    /// orchestrator that accepted it).
    pub async fn take(&self, job: &str, lapsed_only: bool) -> Result<Option<Held>, StoreError> {
        let now = now_unix_ms();
        let current = self.newest_record(job).await?;
        if lapsed_only && current.is_none() {
            return Ok(None);
        }
        let Some(seq) = may_take(current.as_ref(), &self.owner, now) else { return Ok(None) };
        let hash = self.write(job, seq, now).await?;
        if self.store.create_ref(&ref_name(job, seq), &hash).await? {
            Ok(Some(Held { job: job.to_string(), seq }))
        } else {
            // Another orchestrator created it first.
            Ok(None)
        }
    }

    /// Renews `held` for another term, unless a newer lease exists.
    pub async fn renew(&self, held: &Held) -> Result<Renewal, StoreError> {
        let names = self.store.list_refs(&format!("leases/{}", held.job)).await?;
        if let Some(by_seq) = newest(&names).filter(|&n| n > held.seq) {
            return Ok(Renewal::Lost { by_seq });
        }
        let hash = self.write(&held.job, held.seq, now_unix_ms()).await?;
        self.store.set_ref(&ref_name(&held.job, held.seq), &hash).await?;
        Ok(Renewal::Renewed)
    }

    /// Forgets every lease of a job that ended (its record is written).
    pub async fn release(&self, job: &str) -> Result<(), StoreError> {
        for name in self.store.list_refs(&format!("leases/{job}")).await? {
            self.store.delete_ref(&name).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::MemoryStore;
    use std::sync::Arc;

    fn record(seq: u64, owner: &str, expires: u64) -> LeaseRecord {
        LeaseRecord { job: "j".into(), seq, owner: owner.into(), expires_unix_ms: expires, url: String::new() }
    }

    #[test]
    fn a_lease_is_taken_when_free_expired_or_our_own() {
        assert_eq!(may_take(None, "a", 10), Some(0));
        assert_eq!(may_take(Some(&record(3, "b", 100)), "a", 50), None);
        assert_eq!(may_take(Some(&record(3, "b", 100)), "a", 101), Some(4));
        assert_eq!(may_take(Some(&record(3, "a", 100)), "a", 50), Some(4));
        assert_eq!(may_take(Some(&record(u64::MAX, "b", 0)), "a", 50), None);
        let names = vec![ref_name("j", 2), ref_name("j", 10), "leases/j/garbage".to_string()];
        assert_eq!(newest(&names), Some(10));
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn one_owner_at_a_time_and_the_loser_learns_at_its_renewal() {
        block_on(async {
            let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::default());
            let a = Leases::new(store.clone(), "a".into(), Duration::from_millis(200));
            let b = Leases::new(store.clone(), "b".into(), Duration::from_millis(200));
            let held = a.take("j", false).await.unwrap().expect("free");
            assert_eq!(held.seq, 0);
            assert_eq!(b.take("j", false).await.unwrap(), None, "a holds it");
            assert_eq!(b.take("k", true).await.unwrap(), None, "no lease yet: its owner is starting it");
            assert_eq!(a.renew(&held).await.unwrap(), Renewal::Renewed);
            // a stops renewing; once the term passed, b takes the next sequence.
            tokio::time::sleep(Duration::from_millis(250)).await;
            let taken = b.take("j", true).await.unwrap().expect("expired");
            assert_eq!(taken.seq, 1);
            assert_eq!(a.renew(&held).await.unwrap(), Renewal::Lost { by_seq: 1 });
            b.release("j").await.unwrap();
            assert_eq!(store.list_refs("leases/j").await.unwrap(), Vec::<String>::new());
        });
    }

    #[test]
    fn of_several_creating_one_ref_at_once_exactly_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(crate::artifacts::DirStore::new(dir.path()));
        for round in 0..10 {
            let name = ref_name(&format!("j{round}"), 0);
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let (store, name) = (store.clone(), name.clone());
                    std::thread::spawn(move || {
                        block_on(store.create_ref(&name, &crate::artifacts::sha256_hex(&[i]))).unwrap()
                    })
                })
                .collect();
            let won = threads.into_iter().map(|t| t.join().unwrap()).filter(|w| *w).count();
            assert_eq!(won, 1, "round {round}");
        }
        let memory = MemoryStore::default();
        assert!(block_on(memory.create_ref("leases/j/1", &"a".repeat(64))).unwrap());
        assert!(!block_on(memory.create_ref("leases/j/1", &"b".repeat(64))).unwrap());
    }
}
