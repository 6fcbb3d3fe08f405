//! The orchestrator's Prometheus metrics: counters bumped as reports and events pass, and
//! gauges set from the job table and the registry when `/metrics` is scraped.

use crate::job::{Observation, Observed};
use crate::registry::{Health, PNodeView};
use crate::status::{JobState, JobStatus};
use crate::telemetry::PNodeRate;
use dcnr_mesh::exposition::{encode, register, register_link_bytes};
use dcnr_vnode::Phase;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use std::collections::HashMap;
use std::sync::LazyLock;

/// What the orchestrator counts.
pub struct OrchestratorMetrics {
    registry: Registry,
    reports: IntCounterVec,
    train_steps: IntCounter,
    tensor_bytes: IntCounterVec,
    events: IntCounterVec,
    jobs: IntGaugeVec,
    job_steps_done: IntGaugeVec,
    job_steps_planned: IntGaugeVec,
    job_samples_per_s: GaugeVec,
    job_loss: GaugeVec,
    pnodes: IntGaugeVec,
    pnode_vnodes: IntGaugeVec,
    pnode_steps_per_s: GaugeVec,
    pnode_bytes_per_s: GaugeVec,
    data_bytes: IntCounterVec,
    refused: IntCounterVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

macro_rules! metric {
    ($r:expr, $ty:ty, $name:expr, $help:expr, $labels:expr) => {{
        let m = <$ty>::new(opts($name, $help), $labels).unwrap_or_else(|e| unreachable!("metric {}: {e}", $name));
        register(&$r, Box::new(m.clone()));
        m
    }};
}

/// This process's orchestrator metrics.
pub static ORCHESTRATOR: LazyLock<OrchestratorMetrics> = LazyLock::new(|| {
    let r = Registry::new();
    register_link_bytes(&r);
    let train_steps = IntCounter::with_opts(opts(
        "dcnr_train_steps_total",
        "Training micro-batches whose loss reached the orchestrator, over all jobs.",
    ))
    .unwrap_or_else(|e| unreachable!("metric dcnr_train_steps_total: {e}"));
    register(&r, Box::new(train_steps.clone()));
    OrchestratorMetrics {
        reports: metric!(r, IntCounterVec, "dcnr_reports_total", "VNode reports received, by kind.", &["kind"]),
        train_steps,
        refused: metric!(
            r,
            IntCounterVec,
            "dcnr_rpc_refused_total",
            "Calls refused for want of a credential or permission, by RPC and gRPC code.",
            &["rpc", "code"]
        ),
        tensor_bytes: metric!(
            r,
            IntCounterVec,
            "dcnr_tensor_bytes_total",
            "Tensor bytes VNodes received and sent, as they reported them.",
            &["direction"]
        ),
        events: metric!(r, IntCounterVec, "dcnr_events_total", "Mesh events logged, by kind.", &["kind"]),
        jobs: metric!(r, IntGaugeVec, "dcnr_jobs", "Jobs by state.", &["state"]),
        job_steps_done: metric!(r, IntGaugeVec, "dcnr_job_steps_done", "Steps a job completed.", &["job"]),
        job_steps_planned: metric!(r, IntGaugeVec, "dcnr_job_steps_planned", "Steps a job will run.", &["job"]),
        job_samples_per_s: metric!(
            r,
            GaugeVec,
            "dcnr_job_samples_per_second",
            "Recent training throughput of a running job.",
            &["job"]
        ),
        job_loss: metric!(r, GaugeVec, "dcnr_job_train_loss", "Recent mean training loss of a job.", &["job"]),
        pnodes: metric!(r, IntGaugeVec, "dcnr_pnodes", "PNodes by health.", &["health"]),
        pnode_vnodes: metric!(r, IntGaugeVec, "dcnr_pnode_vnodes", "VNodes a PNode reported hosting.", &["pnode"]),
        pnode_steps_per_s: metric!(
            r,
            GaugeVec,
            "dcnr_pnode_vnode_steps_per_second",
            "VNode training steps a PNode completes per second.",
            &["pnode"]
        ),
        pnode_bytes_per_s: metric!(
            r,
            GaugeVec,
            "dcnr_pnode_tensor_bytes_per_second",
            "Tensor bytes through a PNode's VNodes per second.",
            &["pnode"]
        ),
        data_bytes: metric!(
            r,
            IntCounterVec,
            "dcnr_data_bytes_sent_total",
            "Bytes of job data sent to PNodes: feed requests, and dataset pack chunks.",
            &["kind"]
        ),
        registry: r,
    }
});

impl OrchestratorMetrics {
    /// Counts one VNode report.
    pub fn report(&self, r: &Observation) {
        let kind = match &r.body {
            Observed::Done { bytes_in, bytes_out, .. } => {
                self.tensor_bytes.with_label_values(&["in"]).inc_by(*bytes_in);
                self.tensor_bytes.with_label_values(&["out"]).inc_by(*bytes_out);
                "done"
            }
            Observed::Loss { phase: Phase::Train, .. } => {
                self.train_steps.inc();
                "loss"
            }
            Observed::Loss { phase: Phase::Eval | Phase::Infer, .. } => "eval_loss",
            Observed::Predictions(_) => "predictions",
            Observed::Failure(_) => "failure",
            Observed::Rejected { .. } => "rejected",
        };
        self.reports.with_label_values(&[kind]).inc();
    }

    /// Counts a refused call.
    pub fn refused(&self, rpc: &str, code: tonic::Code) {
        self.refused.with_label_values(&[rpc, &format!("{code:?}")]).inc();
    }

    /// Training micro-batches whose loss reached this process so far, over all jobs.
    pub fn train_steps(&self) -> u64 {
        self.train_steps.get()
    }

    /// Counts the encoded bytes of one feed request sent to a PNode.
    pub fn feed_sent(&self, bytes: usize) {
        self.data_bytes.with_label_values(&["feed"]).inc_by(bytes as u64);
    }

    /// Counts the bytes of one dataset pack chunk sent to a PNode.
    pub fn pack_sent(&self, bytes: usize) {
        self.data_bytes.with_label_values(&["pack"]).inc_by(bytes as u64);
    }

    /// Counts one logged event.
    pub fn event(&self, kind: &str) {
        self.events.with_label_values(&[kind]).inc();
    }

    /// Sets the gauges from the current jobs and PNodes and renders everything.
    pub fn render(&self, jobs: &[JobStatus], pnodes: &[PNodeView], rates: &HashMap<String, PNodeRate>) -> String {
        for g in [&self.job_steps_done, &self.job_steps_planned, &self.pnode_vnodes] {
            g.reset();
        }
        for g in [&self.job_samples_per_s, &self.job_loss, &self.pnode_steps_per_s, &self.pnode_bytes_per_s] {
            g.reset();
        }
        for (state, name) in [
            (JobState::Pending, "pending"),
            (JobState::Running, "running"),
            (JobState::Succeeded, "succeeded"),
            (JobState::Failed, "failed"),
        ] {
            self.jobs.with_label_values(&[name]).set(jobs.iter().filter(|j| j.state == state).count() as i64);
        }
        for j in jobs {
            let id = [j.job_id.as_str()];
            self.job_steps_done.with_label_values(&id).set(j.steps_done as i64);
            self.job_steps_planned.with_label_values(&id).set(j.steps_total as i64);
            if j.state == JobState::Running {
                self.job_samples_per_s.with_label_values(&id).set(j.samples_per_s);
            }
            if let Some(l) = j.last_loss.filter(|l| l.is_finite()) {
                self.job_loss.with_label_values(&id).set(f64::from(l));
            }
        }
        for h in [Health::Healthy, Health::Suspect, Health::Lost] {
            self.pnodes.with_label_values(&[h.name()]).set(pnodes.iter().filter(|p| p.health == h).count() as i64);
        }
        for p in pnodes {
            let id = [p.id.as_str()];
            self.pnode_vnodes.with_label_values(&id).set(i64::from(p.hosted_vnodes));
            let rate = rates.get(&p.id).cloned().unwrap_or_default();
            self.pnode_steps_per_s.with_label_values(&id).set(rate.vnode_steps_per_s);
            self.pnode_bytes_per_s.with_label_values(&id).set(rate.bytes_per_s);
        }
        encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_jobs_by_state_and_counts_reports() {
        let status = |id: &str, state| JobStatus {
            recoveries: Vec::new(),
            pipelines: 1,
            rounds: 0,
            members: Vec::new(),
            generation: 0,
            job_id: id.into(),
            state,
            model: "m".into(),
            steps_done: 7,
            steps_total: 10,
            last_loss: Some(0.5),
            samples_per_s: 100.0,
            error: None,
            summary: None,
        };
        ORCHESTRATOR.report(&Observation {
            generation: 1,
            job_id: "a".into(),
            vnode: 0,
            mb: 0,
            pnode: "p".into(),
            body: Observed::Loss { phase: Phase::Train, loss: 1.0, correct: 1, count: 2 },
        });
        let text = ORCHESTRATOR.render(
            &[status("a", JobState::Running), status("b", JobState::Succeeded), status("c", JobState::Succeeded)],
            &[],
            &HashMap::new(),
        );
        for line in [
            "dcnr_jobs{state=\"succeeded\"} 2",
            "dcnr_jobs{state=\"running\"} 1",
            "dcnr_job_steps_done{job=\"a\"} 7",
            "dcnr_job_samples_per_second{job=\"a\"} 100",
            "dcnr_pnodes{health=\"lost\"} 0",
            "dcnr_reports_total{kind=\"loss\"}",
            "dcnr_link_bytes_sent_total",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("dcnr_job_samples_per_second{job=\"b\"}"), "only running jobs have a throughput");
    }
}
