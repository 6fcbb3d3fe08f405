//! Checkpoints of a job in the store: every VNode's state as an immutable object, and a manifest
//! listing them written after all of them, so a checkpoint either exists whole or not at all.
//! Reading checks every hash and falls back to the previous complete checkpoint when one is
//! damaged.

use crate::artifacts::{ObjectStore, StoreError};
use dcnr_model::envelope::Envelope;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Manifest format this build writes.
const FORMAT: u32 = 1;

/// One VNode's entry in a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// VNode id.
    pub vnode: u32,
    /// Hash of its state object.
    pub sha256: String,
    /// Size of the state.
    pub bytes: u64,
}

/// The manifest of one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version.
    pub format: u32,
    /// Job id.
    pub job_id: String,
    /// Steps completed when it was taken.
    pub step: u64,
    /// Test-set evaluations done by then (epoch ends passed).
    pub epochs_evaluated: u64,
    /// Hash of the job's resolved envelope.
    pub envelope: String,
    /// Every VNode's state.
    pub vnodes: Vec<Entry>,
}

/// What a resumed job starts from.
#[derive(Debug, Clone)]
pub struct ResumeFrom {
    /// Steps already completed.
    pub step: u64,
    /// Evaluations already done.
    pub epochs_evaluated: u64,
    /// State bytes by VNode id.
    pub states: BTreeMap<u32, Vec<u8>>,
}

/// Reference name of a job's checkpoint at `step` (zero-padded so names sort by step).
pub fn ref_name(job: &str, step: u64) -> String {
    format!("checkpoints/{job}/{step:012}")
}

/// One checkpoint to be written.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Job id.
    pub job: String,
    /// Steps completed.
    pub step: u64,
    /// Evaluations done.
    pub epochs_evaluated: u64,
    /// The job's resolved envelope as JSON.
    pub envelope_json: Vec<u8>,
    /// State bytes by VNode id.
    pub states: Vec<(u32, Vec<u8>)>,
    /// Newest checkpoints to keep.
    pub keep: u32,
}

/// Writes one checkpoint (states, envelope, manifest, then the reference) and drops checkpoints
/// beyond the newest `keep`; returns the manifest hash.
pub async fn write(store: &dyn ObjectStore, s: &Checkpoint) -> Result<String, StoreError> {
    let hashes = futures::future::join_all(s.states.iter().map(|(_, bytes)| store.put(bytes.clone()))).await;
    let mut vnodes = Vec::with_capacity(s.states.len());
    for ((vnode, bytes), hash) in s.states.iter().zip(hashes) {
        vnodes.push(Entry { vnode: *vnode, sha256: hash?, bytes: bytes.len() as u64 });
    }
    let envelope = store.put(s.envelope_json.clone()).await?;
    let manifest = Manifest {
        format: FORMAT,
        job_id: s.job.clone(),
        step: s.step,
        epochs_evaluated: s.epochs_evaluated,
        envelope,
        vnodes,
    };
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    let hash = store.put(bytes).await?;
    store.set_ref(&ref_name(&s.job, s.step), &hash).await?;
    let mut names = store.list_refs(&format!("checkpoints/{}", s.job)).await?;
    names.sort();
    let excess = names.len().saturating_sub(s.keep.max(1) as usize);
    for old in names.into_iter().take(excess) {
        store.delete_ref(&old).await?;
    }
    Ok(hash)
}

/// [`write`] with retries and backoff, for a store that is briefly unavailable.
pub async fn write_with_retry(store: &dyn ObjectStore, s: &Checkpoint) -> Result<String, StoreError> {
    let mut wait = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match write(store, s).await {
            Ok(h) => return Ok(h),
            Err(e) if attempt < 5 => {
                tracing::warn!(job = %s.job, step = s.step, attempt, error = %e, "checkpoint upload failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Why no checkpoint could be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No complete, intact checkpoint exists.
    #[error("job {job} has no complete checkpoint in the store{detail}")]
    NoCheckpoint { job: String, detail: String },
}

async fn load_one(store: &dyn ObjectStore, manifest_hash: &str) -> Result<(Envelope, ResumeFrom), String> {
    let bytes = store.get(manifest_hash).await.map_err(|e| e.to_string())?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| format!("manifest {manifest_hash}: {e}"))?;
    if m.format != FORMAT {
        return Err(format!("manifest format {} is not supported", m.format));
    }
    let env_bytes = store.get(&m.envelope).await.map_err(|e| e.to_string())?;
    let envelope: Envelope = serde_json::from_slice(&env_bytes).map_err(|e| format!("envelope: {e}"))?;
    // The states are independent objects: fetch them all at once.
    let fetched = futures::future::join_all(m.vnodes.iter().map(|e| store.get(&e.sha256))).await;
    let mut states = BTreeMap::new();
    for (e, got) in m.vnodes.iter().zip(fetched) {
        states.insert(e.vnode, got.map_err(|err| format!("vnode {}: {err}", e.vnode))?);
    }
    Ok((envelope, ResumeFrom { step: m.step, epochs_evaluated: m.epochs_evaluated, states }))
}

/// The newest checkpoint of `job` whose every object is intact.
pub async fn load_latest(store: &dyn ObjectStore, job: &str) -> Result<(Envelope, ResumeFrom), LoadError> {
    let mut names = store.list_refs(&format!("checkpoints/{job}")).await?;
    names.sort();
    let mut skipped = Vec::new();
    for name in names.iter().rev() {
        let Some(hash) = store.get_ref(name).await? else { continue };
        match load_one(store, &hash).await {
            Ok(found) => {
                for s in &skipped {
                    tracing::warn!(job, "{s}");
                }
                return Ok(found);
            }
            Err(e) => skipped.push(format!("skipping damaged checkpoint {name}: {e}")),
        }
    }
    let detail = if skipped.is_empty() { String::new() } else { format!(" ({})", skipped.join("; ")) };
    Err(LoadError::NoCheckpoint { job: job.to_string(), detail })
}

/// Reference name recording that `job` is running (its value: the envelope's object hash).
pub fn active_ref(job: &str) -> String {
    format!("active/{job}")
}

/// Records that `job` is running, with its resolved envelope, so a restarted orchestrator can
/// carry it on. The reference is replaced in one atomic write.
pub async fn mark_active(store: &dyn ObjectStore, job: &str, envelope: &Envelope) -> Result<(), StoreError> {
    // An Envelope always serializes; an empty object would only make the job unresumable.
    let bytes = serde_json::to_vec(envelope).unwrap_or_default();
    let hash = store.put(bytes).await?;
    store.set_ref(&active_ref(job), &hash).await
}

/// Forgets that `job` is running (it ended and has a record).
pub async fn clear_active(store: &dyn ObjectStore, job: &str) -> Result<(), StoreError> {
    store.delete_ref(&active_ref(job)).await
}

/// Jobs recorded as running and without a final record: each with its envelope and the latest
/// complete checkpoint to continue from (none: start over, identically, from step 0).
pub async fn load_active(store: &dyn ObjectStore) -> Result<Vec<(String, Envelope, Option<ResumeFrom>)>, StoreError> {
    let mut found = Vec::new();
    for name in store.list_refs("active").await? {
        let Some(job) = name.strip_prefix("active/").map(str::to_string) else { continue };
        if let Some((envelope, from)) = load_active_job(store, &job).await? {
            found.push((job, envelope, from));
        }
    }
    Ok(found)
}

/// One job recorded as running: its envelope and the checkpoint to continue from; `None` when it
/// ended (its stale marker is removed) or its envelope is unreadable (said in the log).
pub async fn load_active_job(
    store: &dyn ObjectStore,
    job: &str,
) -> Result<Option<(Envelope, Option<ResumeFrom>)>, StoreError> {
    let name = active_ref(job);
    if store.get_ref(&format!("jobs/{job}")).await?.is_some() {
        // It ended, but its orchestrator stopped before forgetting it.
        store.delete_ref(&name).await?;
        return Ok(None);
    }
    let Some(hash) = store.get_ref(&name).await? else { return Ok(None) };
    let envelope: Envelope = match store.get(&hash).await {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(%job, error = %e, "the recorded envelope of a running job is unreadable; skipped");
                return Ok(None);
            }
        },
        Err(e) => {
            tracing::error!(%job, error = %e, "the recorded envelope of a running job is missing; skipped");
            return Ok(None);
        }
    };
    match load_latest(store, job).await {
        Ok((env, from)) => Ok(Some((env, Some(from)))),
        Err(LoadError::NoCheckpoint { detail, .. }) => {
            if !detail.is_empty() {
                tracing::warn!(%job, "no usable checkpoint{detail}; starting over");
            }
            Ok(Some((envelope, None)))
        }
        Err(LoadError::Store(e)) => Err(e),
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Objects kept because a record or checkpoint references them.
    pub referenced: usize,
    /// Unreferenced objects deleted.
    pub deleted: usize,
    /// Unreferenced objects kept because they are younger than the grace period (an upload may
    /// not have written its manifest yet).
    pub young: usize,
}

/// Deletes objects no job record or checkpoint manifest references, if older than `grace`.
pub async fn collect_garbage(store: &dyn ObjectStore, grace: Duration) -> Result<GcReport, StoreError> {
    let mut live = std::collections::HashSet::new();
    for name in store.list_refs("jobs").await? {
        let Some(h) = store.get_ref(&name).await? else { continue };
        if let Ok(bytes) = store.get(&h).await
            && let Ok(r) = serde_json::from_slice::<crate::artifacts::JobRecord>(&bytes)
        {
            live.extend(r.artifacts.into_values());
        }
        live.insert(h);
    }
    for name in store.list_refs("checkpoints").await? {
        let Some(h) = store.get_ref(&name).await? else { continue };
        if let Ok(bytes) = store.get(&h).await
            && let Ok(m) = serde_json::from_slice::<Manifest>(&bytes)
        {
            live.insert(m.envelope);
            live.extend(m.vnodes.into_iter().map(|e| e.sha256));
        }
        live.insert(h);
    }
    // The saved trust book, job marks of running jobs and published dataset packs are live too.
    for prefix in ["active", "trust", "datasets"] {
        for name in store.list_refs(prefix).await? {
            if let Some(h) = store.get_ref(&name).await? {
                live.insert(h);
            }
        }
    }
    let mut report = GcReport::default();
    for (hash, age) in store.list_objects().await? {
        if live.contains(&hash) {
            report.referenced += 1;
        } else if age.is_some_and(|a| a >= grace) {
            store.delete_object(&hash).await?;
            report.deleted += 1;
        } else {
            report.young += 1;
        }
    }
    Ok(report)
}
