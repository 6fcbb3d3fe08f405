//! Jobs this orchestrator does not hold, answered from the store it shares with its peers: a
//! job that ended on any of them has a record there, and a running one a lease naming its owner.

use crate::artifacts::{JobRecord, ObjectStore, StoreError};
use crate::status::{JobState, JobStatus};
use crate::summary::JobSummary;

/// What the shared store says of a job this orchestrator does not hold.
#[derive(Debug, Clone)]
pub enum Elsewhere {
    /// It ended (on whichever orchestrator): its status from its record.
    Ended(Box<JobStatus>),
    /// It is running, owned by the named orchestrator instance (empty if no lease names one).
    Running {
        /// The instance holding its lease.
        owner: String,
        /// Where that instance serves gRPC (empty if its lease does not say).
        url: String,
    },
}

/// Looks `job` up in `store`; `None` if the store knows no such job.
pub async fn find(store: &dyn ObjectStore, job: &str) -> Result<Option<Elsewhere>, StoreError> {
    if let Some(hash) = store.get_ref(&format!("jobs/{job}")).await? {
        let record: Option<JobRecord> = serde_json::from_slice(&store.get(&hash).await?).ok();
        let Some(record) = record else { return Ok(None) };
        let summary = match record.artifacts.get("result.json") {
            Some(h) => serde_json::from_slice::<serde_json::Value>(&store.get(h).await?)
                .ok()
                .and_then(|v| serde_json::from_value::<JobSummary>(v["summary"].clone()).ok()),
            None => None,
        };
        return Ok(Some(Elsewhere::Ended(Box::new(ended_status(record, summary)))));
    }
    if store.get_ref(&crate::checkpoints::active_ref(job)).await?.is_some() {
        let (owner, url) = crate::lease::holder(store, job).await?.map(|l| (l.owner, l.url)).unwrap_or_default();
        return Ok(Some(Elsewhere::Running { owner, url }));
    }
    Ok(None)
}

/// Jobs the store marks as running (`active/<job>`), at most `limit`, in id order.
pub async fn running(store: &dyn ObjectStore, limit: usize) -> Result<Vec<String>, StoreError> {
    let mut ids: Vec<String> = store
        .list_refs("active")
        .await?
        .into_iter()
        .filter_map(|n| n.strip_prefix("active/").map(str::to_string))
        .collect();
    ids.sort();
    ids.truncate(limit);
    Ok(ids)
}

/// The status of an ended job from its record and, when readable, its summary.
fn ended_status(record: JobRecord, summary: Option<JobSummary>) -> JobStatus {
    let state = if record.status == "succeeded" { JobState::Succeeded } else { JobState::Failed };
    let steps = summary.as_ref().map_or(0, |s| s.steps);
    JobStatus {
        job_id: record.job_id,
        state,
        model: summary.as_ref().map(|s| s.model.clone()).unwrap_or_default(),
        steps_done: steps,
        steps_total: steps,
        last_loss: summary.as_ref().and_then(|s| s.train_loss).map(|l| l as f32),
        samples_per_s: summary.as_ref().map_or(0.0, |s| s.samples_per_s),
        error: record.error,
        summary,
        recoveries: Vec::new(),
        pipelines: 1,
        rounds: 0,
        members: Vec::new(),
        generation: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::{MemoryStore, write_record};
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn ended_and_running_jobs_are_found_and_unknown_ones_are_not() {
        let store = MemoryStore::default();
        assert!(find(&store, "job-1").await.unwrap().is_none());
        let record = JobRecord {
            job_id: "job-1".into(),
            status: "failed".into(),
            error_code: Some("no_capacity".into()),
            error: Some("no pnodes".into()),
            artifacts: BTreeMap::new(),
        };
        let result = serde_json::json!({ "summary": null, "error_code": "no_capacity" });
        write_record(&store, record, vec![("result.json", serde_json::to_vec(&result).unwrap())]).await.unwrap();
        match find(&store, "job-1").await.unwrap() {
            Some(Elsewhere::Ended(s)) => {
                assert_eq!((s.state, s.error.as_deref()), (JobState::Failed, Some("no pnodes")));
            }
            other => panic!("{other:?}"),
        }
        let hash = store.put(b"{}".to_vec()).await.unwrap();
        store.set_ref(&crate::checkpoints::active_ref("job-2"), &hash).await.unwrap();
        match find(&store, "job-2").await.unwrap() {
            Some(Elsewhere::Running { owner, url }) => assert_eq!((owner.as_str(), url.as_str()), ("", "")),
            other => panic!("{other:?}"),
        }
    }
}
