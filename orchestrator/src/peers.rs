//! Asking a peer orchestrator (one sharing the store) about a job it owns: the gRPC service and
//! the dashboard forward what they cannot answer to the owner its lease names.
//!
//! A forwarded request carries [`FORWARDED`]; the owner answers it from what it holds and never
//! forwards it again, so two orchestrators that each think the other owns a job cannot bounce a
//! request between them. The owner accepts reads from a peer orchestrator's certificate (the
//! forwarder has already checked its own caller).

use crate::artifacts::ObjectStore;
use crate::elsewhere::Elsewhere;
use crate::status::{JobState, JobStatus};
use dcnr_proto::v1::{self, orchestrator_client::OrchestratorClient};
use std::collections::BTreeSet;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Metadata key marking a request one orchestrator forwarded to another.
const FORWARDED: &str = "dcnr-forwarded";

/// Most jobs running on peers that one listing looks up.
const MAX_LISTED_ELSEWHERE: usize = 64;

/// Longest a forwarded unary request may take, and a connection to a peer.
const FORWARD_DEADLINE: Duration = Duration::from_secs(3);

/// Whether a request was forwarded by a peer (and so must not be forwarded again).
pub fn is_forwarded(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata.contains_key(FORWARDED)
}

/// `msg` as a request marked forwarded.
fn forwarded_request<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    req
}

/// A client of the peer at `url`, which must prove to be an orchestrator of this mesh.
async fn client(url: &str, deadline: Option<Duration>) -> Result<OrchestratorClient<Channel>, Status> {
    let unavailable = |e: String| Status::unavailable(format!("the orchestrator at {url}: {e}"));
    let endpoint = dcnr_proto::transport::endpoint(url, deadline, &dcnr_proto::tls::Expect::Orchestrator)
        .map_err(|e| unavailable(e.to_string()))?;
    let channel = tokio::time::timeout(FORWARD_DEADLINE, endpoint.connect())
        .await
        .map_err(|_| unavailable(format!("no connection within {FORWARD_DEADLINE:?}")))?
        .map_err(|e| unavailable(e.to_string()))?;
    Ok(OrchestratorClient::new(channel).max_decoding_message_size(dcnr_proto::limits::MAX_MESSAGE_BYTES))
}

/// The live status of `job` from its owner at `url`.
pub async fn get_job(url: &str, job: &str) -> Result<v1::JobStatus, Status> {
    let mut c = client(url, Some(FORWARD_DEADLINE)).await?;
    Ok(c.get_job(forwarded_request(v1::GetJobRequest { job_id: job.to_string() })).await?.into_inner())
}

/// The event stream of `job` from its owner at `url`.
pub async fn watch_job(url: &str, job: &str) -> Result<tonic::Response<tonic::Streaming<v1::JobEvent>>, Status> {
    let mut c = client(url, None).await?;
    c.watch_job(forwarded_request(v1::WatchJobRequest { job_id: job.to_string() })).await
}

/// The live status of every job the store marks as running that is not in `here` (at most
/// [`MAX_LISTED_ELSEWHERE`], asked of their owners at once); a job whose owner does not answer
/// is left out.
pub async fn running_elsewhere(store: &dyn ObjectStore, here: &BTreeSet<String>) -> Vec<v1::JobStatus> {
    let ids = crate::elsewhere::running(store, MAX_LISTED_ELSEWHERE).await.unwrap_or_default();
    let lookups = ids.into_iter().filter(|id| !here.contains(id)).map(|id| async move {
        match crate::elsewhere::find(store, &id).await {
            Ok(Some(Elsewhere::Running { url, .. })) if !url.is_empty() => get_job(&url, &id).await.ok(),
            _ => None,
        }
    });
    futures::future::join_all(lookups).await.into_iter().flatten().collect()
}

/// A peer's answer as this orchestrator's own status type (unknown states read as pending; an
/// unreadable summary as none).
pub fn status_from_wire(s: v1::JobStatus) -> JobStatus {
    let state = match v1::JobState::try_from(s.state).unwrap_or(v1::JobState::Pending) {
        v1::JobState::Running => JobState::Running,
        v1::JobState::Succeeded => JobState::Succeeded,
        v1::JobState::Failed => JobState::Failed,
        v1::JobState::Recovering => JobState::Recovering,
        _ => JobState::Pending,
    };
    JobStatus {
        job_id: s.job_id,
        state,
        model: s.model,
        steps_done: s.steps_done,
        steps_total: s.steps_total,
        last_loss: Some(s.last_loss).filter(|l| l.is_finite()),
        samples_per_s: s.samples_per_s,
        error: Some(s.error).filter(|e| !e.is_empty()),
        summary: serde_json::from_str(&s.summary_json).ok(),
        recoveries: Vec::new(),
        pipelines: s.pipelines.max(1),
        rounds: s.rounds,
        members: s.members.into_iter().map(|m| m.pnodes).collect(),
        generation: s.generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_survives_the_round_trip_through_the_wire() {
        let s = JobStatus {
            job_id: "job-7".into(),
            state: JobState::Running,
            model: "tiny".into(),
            steps_done: 5,
            steps_total: 9,
            last_loss: Some(0.5),
            samples_per_s: 12.0,
            error: None,
            summary: None,
            recoveries: Vec::new(),
            pipelines: 2,
            rounds: 3,
            members: vec![vec!["pn-a".into()], vec!["pn-b".into()]],
            generation: 4,
        };
        let back = status_from_wire(crate::service::status_to_wire(&s));
        assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&s).unwrap());
        let mut garbled = crate::service::status_to_wire(&s);
        garbled.state = 99;
        garbled.last_loss = f32::NAN;
        let back = status_from_wire(garbled);
        assert_eq!((back.state, back.last_loss), (JobState::Pending, None));
    }
}
