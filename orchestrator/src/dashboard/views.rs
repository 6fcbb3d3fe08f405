//! The JSON shapes of the dashboard API, built from plain values (job statuses, registry views,
//! tracks). Pure functions: no actors, no IO, so they are tested directly.

use crate::registry::{Caps, Health, PNodeView};
use crate::status::{JobState, JobStatus};
use crate::summary::JobSummary;
use crate::telemetry::{GraphNode, JobTrack, TestPoint, Tracks, TrainPoint};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};

/// A row of the jobs list.
#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    /// Job id.
    pub job_id: String,
    /// `pending`, `running`, `succeeded` or `failed`.
    pub state: JobState,
    /// Model name.
    pub model: String,
    /// Steps completed.
    pub steps_done: u64,
    /// Steps planned.
    pub steps_total: u64,
    /// steps_done / steps_total, in [0, 1].
    pub progress: f64,
    /// Recent mean training loss.
    pub last_loss: Option<f32>,
    /// Recent training throughput.
    pub samples_per_s: f64,
    /// Latest test accuracy.
    pub test_accuracy: Option<f64>,
    /// VNodes in the graph.
    pub vnodes: usize,
    /// PNodes it runs on.
    pub pnodes: usize,
    /// Data-parallel pipelines.
    pub pipelines: u32,
    /// Averaging rounds closed so far.
    pub rounds: u64,
    /// The PNodes hosting each pipeline's VNodes, by pipeline.
    pub members: Vec<Vec<String>>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A VNode of a job: what it is, where it runs, how far it got, and whether it is well.
#[derive(Debug, Clone, Serialize)]
pub struct VNodeRow {
    /// VNode id.
    pub vnode: u32,
    /// Name from the graph.
    pub name: String,
    /// Kind name.
    pub kind: String,
    /// Input sources (VNode ids, `features`, `labels`).
    pub inputs: Vec<String>,
    /// Trainable parameters.
    pub params: usize,
    /// Hosting PNode's id (none until placed).
    pub pnode: Option<String>,
    /// Hosting PNode's name.
    pub pnode_name: Option<String>,
    /// Hosting PNode's endpoint.
    pub endpoint: Option<String>,
    /// Training micro-batches it completed.
    pub step: u64,
    /// `unplaced`, `healthy`, `suspect`, `lost`, `failed`, `finished` or `unknown`.
    pub health: &'static str,
    /// Why it failed.
    pub failure: Option<String>,
}

/// One job in full.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    /// The list row.
    pub job: JobRow,
    /// Final summary once ended.
    pub summary: Option<JobSummary>,
    /// VNodes in id order (the model graph with placement).
    pub vnodes: Vec<VNodeRow>,
    /// Training curve points after `since`.
    pub train: Vec<TrainPoint>,
    /// Test evaluations.
    pub test: Vec<TestPoint>,
}

/// A VNode hosted by a PNode.
#[derive(Debug, Clone, Serialize)]
pub struct HostedVNode {
    /// Job id.
    pub job: String,
    /// VNode id.
    pub vnode: u32,
    /// VNode name.
    pub name: String,
}

/// A row of the mesh view.
#[derive(Debug, Clone, Serialize)]
pub struct PNodeRow {
    /// PNode id.
    pub id: String,
    /// Operator-chosen name.
    pub name: String,
    /// gRPC endpoint.
    pub endpoint: String,
    /// Capabilities.
    pub caps: Caps,
    /// Heartbeat health.
    pub health: Health,
    /// Reached directly or through a relay, and the relay it offers.
    pub reach: crate::registry::Reach,
    /// Whether it can be reached now (directly, or listening at its relay).
    pub reachable: bool,
    /// Trust state; none until replica verification exists.
    pub trust: Option<String>,
    /// VNodes it reported hosting.
    pub hosted_vnodes: u32,
    /// VNodes of running jobs placed on it.
    pub vnodes: Vec<HostedVNode>,
    /// VNode training steps per second.
    pub vnode_steps_per_s: f64,
    /// Tensor bytes per second.
    pub bytes_per_s: f64,
    /// VNode training steps completed in all.
    pub vnode_steps: u64,
}

/// Registry views by endpoint; when a PNode re-registered, the newest id wins.
fn by_endpoint(pnodes: &[PNodeView]) -> HashMap<&str, &PNodeView> {
    let mut m: HashMap<&str, &PNodeView> = HashMap::new();
    for p in pnodes {
        match m.get(p.endpoint.as_str()) {
            Some(q) if q.id > p.id => {}
            _ => {
                m.insert(p.endpoint.as_str(), p);
            }
        }
    }
    m
}

/// The list row of a job.
pub fn job_row(s: &JobStatus, track: Option<&JobTrack>) -> JobRow {
    let (vnodes, pnodes, test) = match track {
        Some(t) => {
            let placed: BTreeSet<&str> =
                t.vnodes.iter().map(|v| v.endpoint.as_str()).filter(|e| !e.is_empty()).collect();
            (t.vnodes.len(), placed.len(), t.test.back().map(|p| p.accuracy))
        }
        None => (0, 0, None),
    };
    JobRow {
        job_id: s.job_id.clone(),
        state: s.state,
        model: s.model.clone(),
        steps_done: s.steps_done,
        steps_total: s.steps_total,
        progress: if s.steps_total > 0 { (s.steps_done as f64 / s.steps_total as f64).min(1.0) } else { 0.0 },
        last_loss: s.last_loss.filter(|l| l.is_finite()),
        samples_per_s: if s.state == JobState::Running { s.samples_per_s } else { 0.0 },
        test_accuracy: test.or_else(|| s.summary.as_ref().and_then(|x| x.test_accuracy)),
        vnodes,
        pnodes,
        pipelines: s.pipelines,
        rounds: s.rounds,
        members: s.members.clone(),
        error: s.error.clone(),
    }
}

/// Every job's row, newest first.
pub fn job_rows(jobs: &[JobStatus], tracks: &Tracks) -> Vec<JobRow> {
    let mut rows: Vec<JobRow> = jobs.iter().map(|s| job_row(s, tracks.jobs.get(&s.job_id))).collect();
    rows.reverse();
    rows
}

/// One job in full, with training points after `since` (0: all).
pub fn job_detail(s: &JobStatus, track: Option<&JobTrack>, pnodes: &[PNodeView], since: u64) -> JobDetail {
    let hosts = by_endpoint(pnodes);
    let vnodes = track
        .map(|t| {
            t.graph
                .iter()
                .zip(&t.vnodes)
                .map(|(g, v): (&GraphNode, _)| {
                    let host = (!v.endpoint.is_empty()).then(|| hosts.get(v.endpoint.as_str()).copied()).flatten();
                    let health = if v.failure.is_some() {
                        "failed"
                    } else if v.endpoint.is_empty() {
                        "unplaced"
                    } else if s.state.is_final() {
                        "finished"
                    } else {
                        host.map(|h| h.health.name()).unwrap_or("unknown")
                    };
                    VNodeRow {
                        vnode: g.id,
                        name: g.name.clone(),
                        kind: g.kind.clone(),
                        inputs: g.inputs.clone(),
                        params: g.params,
                        pnode: host.map(|h| h.id.clone()),
                        pnode_name: host.map(|h| h.name.clone()),
                        endpoint: (!v.endpoint.is_empty()).then(|| v.endpoint.clone()),
                        step: v.steps,
                        health,
                        failure: v.failure.clone(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    JobDetail {
        job: job_row(s, track),
        summary: s.summary.clone(),
        vnodes,
        train: track.map(|t| t.train.iter().filter(|p| p.seq > since).cloned().collect()).unwrap_or_default(),
        test: track.map(|t| t.test.iter().cloned().collect()).unwrap_or_default(),
    }
}

/// The mesh view: every PNode with throughput and the VNodes of unfinished jobs it hosts.
pub fn pnode_rows(pnodes: &[PNodeView], tracks: &Tracks) -> Vec<PNodeRow> {
    let hosts = by_endpoint(pnodes);
    let mut hosted: HashMap<&str, Vec<HostedVNode>> = HashMap::new();
    for (job, t) in tracks.jobs.iter().filter(|(_, t)| !t.ended) {
        for (g, v) in t.graph.iter().zip(&t.vnodes) {
            if let Some(h) = hosts.get(v.endpoint.as_str()) {
                hosted.entry(h.id.as_str()).or_default().push(HostedVNode {
                    job: job.clone(),
                    vnode: g.id,
                    name: g.name.clone(),
                });
            }
        }
    }
    pnodes
        .iter()
        .map(|p| {
            let rate = tracks.pnodes.get(&p.id).cloned().unwrap_or_default();
            PNodeRow {
                id: p.id.clone(),
                name: p.name.clone(),
                endpoint: p.endpoint.clone(),
                caps: p.caps.clone(),
                health: p.health,
                reach: p.reach.clone(),
                reachable: p.reach.reachable(),
                trust: None,
                hosted_vnodes: p.hosted_vnodes,
                vnodes: hosted.remove(p.id.as_str()).unwrap_or_default(),
                vnode_steps_per_s: rate.vnode_steps_per_s,
                bytes_per_s: rate.bytes_per_s,
                vnode_steps: rate.vnode_steps,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Observation, Observed};
    use std::time::Instant;

    fn view(id: &str, endpoint: &str, health: Health) -> PNodeView {
        PNodeView {
            public_key: String::new(),
            trusted: false,
            standing: crate::trust::Standing::New,
            reputation: 0.0,
            quarantine_reason: None,
            reach: Default::default(),
            id: id.into(),
            name: format!("name-{id}"),
            endpoint: endpoint.into(),
            caps: Caps {
                cores: 2,
                memory_bytes: 1 << 30,
                arch: "x86_64".into(),
                os: "linux".into(),
                gpu: String::new(),
                determinism_class: "flex".into(),
                gpu_gflops: 0,
                gpu_determinism_class: String::new(),
            },
            health,
            hosted_vnodes: 2,
        }
    }

    fn status(state: JobState) -> JobStatus {
        JobStatus {
            recoveries: Vec::new(),
            pipelines: 1,
            rounds: 0,
            members: Vec::new(),
            generation: 0,
            job_id: "j".into(),
            state,
            model: "tiny".into(),
            steps_done: 5,
            steps_total: 20,
            last_loss: Some(f32::NAN),
            samples_per_s: 50.0,
            error: None,
            summary: None,
        }
    }

    fn tracks() -> Tracks {
        let graph = dcnr_model::ModelGraph::parse_valid(include_str!("../../../tests/fixtures/tiny-mlp.toml"))
            .expect("valid fixture");
        let mut t = Tracks::default();
        t.submitted("j", &graph, Instant::now());
        t.placed(
            "j",
            &[(0, "http://a".into()), (1, "http://a".into()), (2, "http://b".into()), (3, "http://b".into())],
        );
        t.report(&Observation {
            generation: 1,
            job_id: "j".into(),
            vnode: 2,
            mb: 0,
            pnode: "pn-2".into(),
            body: Observed::Failure("bad input".into()),
        });
        t
    }

    #[test]
    fn a_job_row_names_its_pipelines_rounds_and_members() {
        let mut s = status(JobState::Running);
        s.pipelines = 2;
        s.rounds = 7;
        s.members = vec![vec!["pn-1".into()], vec!["pn-2".into(), "pn-3".into()]];
        let row = serde_json::to_value(job_row(&s, None)).expect("json");
        assert_eq!(row["pipelines"], 2);
        assert_eq!(row["rounds"], 7);
        assert_eq!(row["members"], serde_json::json!([["pn-1"], ["pn-2", "pn-3"]]));
    }

    #[test]
    fn vnodes_show_their_pnode_and_health() {
        let t = tracks();
        let pnodes = [view("pn-1", "http://a", Health::Healthy), view("pn-2", "http://b", Health::Suspect)];
        let d = job_detail(&status(JobState::Running), t.jobs.get("j"), &pnodes, 0);
        assert_eq!(d.vnodes.len(), 4);
        assert_eq!(d.vnodes[0].pnode.as_deref(), Some("pn-1"));
        assert_eq!(d.vnodes[0].health, "healthy");
        assert_eq!(d.vnodes[2].health, "failed");
        assert_eq!(d.vnodes[3].health, "suspect");
        assert_eq!(d.vnodes[0].inputs, ["features"]);
        assert_eq!(d.vnodes[3].inputs, ["2", "labels"]);
        assert_eq!(d.job.pnodes, 2);
        assert_eq!(d.job.progress, 0.25);
        assert_eq!(d.job.last_loss, None, "a NaN loss is no loss");
        let done = job_detail(&status(JobState::Succeeded), t.jobs.get("j"), &pnodes, 0);
        assert_eq!(done.vnodes[0].health, "finished");
        assert_eq!(done.job.samples_per_s, 0.0);
    }

    #[test]
    fn pnodes_list_the_vnodes_they_host_and_the_newest_registration_wins() {
        let t = tracks();
        let pnodes = [
            view("pn-1", "http://a", Health::Lost),
            view("pn-3", "http://a", Health::Healthy),
            view("pn-2", "http://b", Health::Healthy),
        ];
        let rows = pnode_rows(&pnodes, &t);
        assert!(rows[0].vnodes.is_empty());
        assert_eq!(rows[1].vnodes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["fc1", "act1"]);
        assert_eq!(rows[2].vnodes.len(), 2);
        assert_eq!(rows[2].trust, None);
    }
}
