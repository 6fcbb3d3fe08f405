//! What the dashboard shows about jobs and PNodes beyond their status: training curves, each
//! VNode's progress and host, PNode throughput. Bounded, in memory, fed by one-line calls.
//!
//! Sources: the gRPC report stream (every VNode report passes [`Telemetry::report`]), the job
//! table (submission and placement), each job's event channel (evaluations, the end), and a
//! watcher task that diffs registry snapshots into `pnode_*` events. [`Tracks`] is plain data
//! with no clock of its own and no IO; [`Telemetry`] is the shared handle around it.

use crate::events::{EventLog, NewEvent, Severity};
use crate::job::{Observation, Observed};
use crate::registry::{Health, ListPNodes, PNodeView, Registry};
use crate::status::JobEvent;
use dcnr_model::ValidGraph;
use dcnr_model::graph::Source;
use dcnr_vnode::Phase;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Training-curve points kept per job; older points are merged pairwise when full, so a long
/// job keeps its whole curve at a coarser resolution.
pub const MAX_TRAIN_POINTS: usize = 1024;
/// Test evaluations kept per job.
pub const MAX_TEST_POINTS: usize = 1024;
/// Jobs tracked; the oldest ended job is forgotten first.
pub const MAX_JOBS: usize = 256;
/// How often windows become curve points and rates are recomputed.
pub const FLUSH_PERIOD: Duration = Duration::from_millis(250);

/// One point of the training curve: the mean over the reports of one flush period.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TrainPoint {
    /// Increasing per job; `?since=` asks for points after one.
    pub seq: u64,
    /// Seconds since the job was submitted.
    pub t: f64,
    /// Steps with a loss report so far (the last micro-batch index plus one).
    pub step: u64,
    /// Mean training loss.
    pub loss: f64,
    /// Training accuracy in [0, 1].
    pub accuracy: f64,
    /// Training samples per second over the period.
    pub samples_per_s: f64,
}

/// One test-set evaluation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TestPoint {
    /// Epochs evaluated so far.
    pub epoch: u32,
    /// Training steps done when it ran.
    pub step: u64,
    /// Seconds since the job was submitted.
    pub t: f64,
    /// Mean test loss.
    pub loss: f64,
    /// Test accuracy in [0, 1].
    pub accuracy: f64,
}

/// A node of a job's model graph, for drawing it.
#[derive(Debug, Clone, Serialize)]
pub struct GraphNode {
    /// VNode id.
    pub id: u32,
    /// Name from the graph file.
    pub name: String,
    /// Kind name (`linear`, `tanh`, ...).
    pub kind: String,
    /// Input sources: VNode ids, or `features` / `labels`.
    pub inputs: Vec<String>,
    /// Trainable parameters.
    pub params: usize,
}

/// One VNode of a job as tracked here.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VNodeTrack {
    /// Endpoint of its PNode (empty until placed).
    pub endpoint: String,
    /// Training micro-batches it completed.
    pub steps: u64,
    /// Why it failed, if it did.
    pub failure: Option<String>,
}

#[derive(Debug, Default)]
struct Window {
    loss_sum: f64,
    reports: u64,
    correct: u64,
    samples: u64,
}

/// Everything tracked about one job.
#[derive(Debug)]
pub struct JobTrack {
    /// Submission time.
    pub submitted: Instant,
    /// Model graph.
    pub graph: Vec<GraphNode>,
    /// Per VNode, by id.
    pub vnodes: Vec<VNodeTrack>,
    /// Training curve (bounded).
    pub train: VecDeque<TrainPoint>,
    /// Test evaluations (bounded).
    pub test: VecDeque<TestPoint>,
    /// Steps with a training loss reported.
    pub loss_steps: u64,
    /// Whether the job ended.
    pub ended: bool,
    window: Window,
    next_seq: u64,
    last_flush: Instant,
}

impl JobTrack {
    fn new(graph: &ValidGraph, now: Instant) -> JobTrack {
        let nodes = graph
            .nodes
            .iter()
            .map(|n| GraphNode {
                id: n.id,
                name: n.name.clone(),
                kind: n.kind.name().to_string(),
                inputs: n
                    .inputs
                    .iter()
                    .map(|s| match s {
                        Source::Node(id) => id.to_string(),
                        Source::Features => "features".to_string(),
                        Source::Labels => "labels".to_string(),
                    })
                    .collect(),
                params: n.param_count(),
            })
            .collect();
        JobTrack {
            submitted: now,
            graph: nodes,
            vnodes: vec![VNodeTrack::default(); graph.nodes.len()],
            train: VecDeque::new(),
            test: VecDeque::new(),
            loss_steps: 0,
            ended: false,
            window: Window::default(),
            next_seq: 1,
            last_flush: now,
        }
    }

    /// Turns the reports since the last flush into a curve point.
    fn flush(&mut self, now: Instant) -> Option<TrainPoint> {
        let w = std::mem::take(&mut self.window);
        let dt = now.duration_since(self.last_flush).as_secs_f64();
        self.last_flush = now;
        if w.reports == 0 {
            return None;
        }
        let p = TrainPoint {
            seq: self.next_seq,
            t: now.duration_since(self.submitted).as_secs_f64(),
            step: self.loss_steps,
            loss: w.loss_sum / w.reports as f64,
            accuracy: w.correct as f64 / w.samples.max(1) as f64,
            samples_per_s: if dt > 0.0 { w.samples as f64 / dt } else { 0.0 },
        };
        self.next_seq += 1;
        if self.train.len() >= MAX_TRAIN_POINTS {
            compact(&mut self.train);
        }
        self.train.push_back(p.clone());
        Some(p)
    }
}

/// Halves a full curve by merging neighbours (the later point's seq, step and time; mean values).
fn compact(points: &mut VecDeque<TrainPoint>) {
    let old: Vec<TrainPoint> = points.drain(..).collect();
    for pair in old.chunks(2) {
        let last = pair[pair.len() - 1].clone();
        let n = pair.len() as f64;
        points.push_back(TrainPoint {
            loss: pair.iter().map(|p| p.loss).sum::<f64>() / n,
            accuracy: pair.iter().map(|p| p.accuracy).sum::<f64>() / n,
            samples_per_s: pair.iter().map(|p| p.samples_per_s).sum::<f64>() / n,
            ..last
        });
    }
}

/// Throughput of one PNode, from the Done reports of the VNodes it hosts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PNodeRate {
    /// VNode training steps completed per second.
    pub vnode_steps_per_s: f64,
    /// Tensor bytes in plus out per second.
    pub bytes_per_s: f64,
    /// VNode training steps completed in all.
    pub vnode_steps: u64,
    #[serde(skip)]
    window: (u64, u64),
}

/// Live pushes for dashboard clients.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Update {
    /// A new training-curve point.
    Train {
        /// Job id.
        job: String,
        /// The point.
        point: TrainPoint,
    },
    /// A new test evaluation.
    Test {
        /// Job id.
        job: String,
        /// The point.
        point: TestPoint,
    },
}

/// All tracked state; plain data, the caller supplies the clock.
#[derive(Debug, Default)]
pub struct Tracks {
    /// Jobs by id.
    pub jobs: BTreeMap<String, JobTrack>,
    /// PNode throughput by PNode id.
    pub pnodes: HashMap<String, PNodeRate>,
    order: VecDeque<String>,
    last_flush: Option<Instant>,
}

impl Tracks {
    /// Starts tracking a job (a resumed job keeps its curves).
    pub fn submitted(&mut self, job: &str, graph: &ValidGraph, now: Instant) {
        if let Some(t) = self.jobs.get_mut(job) {
            t.ended = false;
            return;
        }
        while self.jobs.len() >= MAX_JOBS {
            // Forget the oldest ended job; when none has ended, the oldest job.
            let victim = self.order.iter().position(|id| self.jobs.get(id).is_none_or(|t| t.ended)).unwrap_or(0);
            match self.order.remove(victim) {
                Some(id) => {
                    self.jobs.remove(&id);
                }
                None => break,
            }
        }
        self.jobs.insert(job.to_string(), JobTrack::new(graph, now));
        self.order.push_back(job.to_string());
    }

    /// Records where a job's VNodes run.
    pub fn placed(&mut self, job: &str, locations: &[(u32, String)]) {
        if let Some(t) = self.jobs.get_mut(job) {
            for (v, endpoint) in locations {
                if let Some(vt) = t.vnodes.get_mut(*v as usize) {
                    vt.endpoint = endpoint.clone();
                    vt.failure = None;
                }
            }
        }
    }

    /// Takes in one VNode report.
    pub fn report(&mut self, r: &Observation) {
        let Some(t) = self.jobs.get_mut(&r.job_id) else { return };
        match &r.body {
            Observed::Done { bytes_in, bytes_out, .. } => {
                if let Some(v) = t.vnodes.get_mut(r.vnode as usize) {
                    v.steps = v.steps.max(r.mb + 1);
                }
                let rate = self.pnodes.entry(r.pnode.clone()).or_default();
                rate.window.0 += 1;
                rate.window.1 += bytes_in + bytes_out;
                rate.vnode_steps += 1;
            }
            Observed::Loss { phase: Phase::Train, loss, correct, count } => {
                t.loss_steps = t.loss_steps.max(r.mb + 1);
                t.window.loss_sum += f64::from(*loss);
                t.window.reports += 1;
                t.window.correct += u64::from(*correct);
                t.window.samples += u64::from(*count);
            }
            Observed::Loss { phase: Phase::Eval | Phase::Infer, .. } | Observed::Predictions(_) => {}
            Observed::Failure(msg) | Observed::Rejected { reason: msg, .. } => {
                if let Some(v) = t.vnodes.get_mut(r.vnode as usize) {
                    v.failure = Some(msg.clone());
                }
            }
        }
    }

    /// Records a test evaluation; returns the point.
    pub fn evaluated(
        &mut self,
        job: &str,
        epoch: u32,
        step: u64,
        accuracy: f64,
        loss: f64,
        now: Instant,
    ) -> Option<TestPoint> {
        let t = self.jobs.get_mut(job)?;
        let p = TestPoint { epoch, step, t: now.duration_since(t.submitted).as_secs_f64(), loss, accuracy };
        if t.test.len() >= MAX_TEST_POINTS {
            t.test.pop_front();
        }
        t.test.push_back(p.clone());
        Some(p)
    }

    /// Marks a job ended and turns what is left in its window into a last point.
    pub fn ended(&mut self, job: &str, now: Instant) -> Option<TrainPoint> {
        let t = self.jobs.get_mut(job)?;
        t.ended = true;
        t.flush(now)
    }

    /// Turns every window into curve points and rates.
    pub fn flush(&mut self, now: Instant) -> Vec<Update> {
        let dt = self.last_flush.map(|l| now.duration_since(l).as_secs_f64()).unwrap_or(0.0);
        self.last_flush = Some(now);
        for r in self.pnodes.values_mut() {
            let (steps, bytes) = std::mem::take(&mut r.window);
            if dt > 0.0 {
                r.vnode_steps_per_s = steps as f64 / dt;
                r.bytes_per_s = bytes as f64 / dt;
            }
        }
        self.jobs
            .iter_mut()
            .filter_map(|(id, t)| t.flush(now).map(|point| Update::Train { job: id.clone(), point }))
            .collect()
    }
}

/// The shared handle: tracks behind a lock, the event log, and the live push channel.
#[derive(Clone)]
pub struct Telemetry {
    tracks: Arc<Mutex<Tracks>>,
    events: EventLog,
    updates: broadcast::Sender<Update>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new(EventLog::default())
    }
}

impl Telemetry {
    /// Empty tracks that push their events into `events`.
    pub fn new(events: EventLog) -> Telemetry {
        let (updates, _) = broadcast::channel(4096);
        Telemetry { tracks: Arc::new(Mutex::new(Tracks::default())), events, updates }
    }

    /// The event log.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Live pushes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Update> {
        self.updates.subscribe()
    }

    /// Runs `f` on the tracks under the lock (keep it short: reports wait for it).
    pub fn read<T>(&self, f: impl FnOnce(&Tracks) -> T) -> T {
        f(&self.tracks.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn write<T>(&self, f: impl FnOnce(&mut Tracks) -> T) -> T {
        f(&mut self.tracks.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// One VNode report as it arrives from a PNode.
    pub fn report(&self, r: &Observation) {
        self.write(|t| t.report(r));
        if let Observed::Failure(msg) = &r.body {
            self.events.push(
                NewEvent::new(
                    "vnode_failed",
                    format!("vnode {} of {} failed on {}: {msg}", r.vnode, r.job_id, r.pnode),
                )
                .severity(Severity::Error)
                .job(&r.job_id)
                .pnode(&r.pnode)
                .data(serde_json::json!({ "vnode": r.vnode, "micro_batch": r.mb, "error": msg })),
            );
        }
    }

    /// Where a job's VNodes were placed.
    pub fn placed(&self, job: &str, locations: &[(u32, String)]) {
        self.write(|t| t.placed(job, locations));
        let endpoints: std::collections::BTreeSet<&str> = locations.iter().map(|(_, e)| e.as_str()).collect();
        self.events.push(
            NewEvent::new("job_placed", format!("{job}: {} VNodes on {} pnode(s)", locations.len(), endpoints.len()))
                .job(job)
                .data(serde_json::json!({ "vnodes": locations.len(), "endpoints": endpoints })),
        );
    }

    /// Starts tracking a submitted job and follows its event channel until it ends.
    pub fn follow(&self, job: &str, graph: &ValidGraph, steps: u64, mut rx: broadcast::Receiver<JobEvent>) {
        self.write(|t| t.submitted(job, graph, Instant::now()));
        self.events.push(
            NewEvent::new(
                "job_submitted",
                format!("{job}: {} ({} VNodes, {steps} steps)", graph.spec.model.name, graph.nodes.len()),
            )
            .job(job)
            .data(serde_json::json!({ "model": graph.spec.model.name, "vnodes": graph.nodes.len(), "steps": steps })),
        );
        let (me, job) = (self.clone(), job.to_string());
        tokio::spawn(async move {
            use broadcast::error::RecvError;
            loop {
                match rx.recv().await {
                    Ok(JobEvent::Evaluation { epoch, step, accuracy, loss }) => {
                        let point = me.write(|t| t.evaluated(&job, epoch, step, accuracy, loss, Instant::now()));
                        if let Some(point) = point {
                            let _ = me.updates.send(Update::Test { job: job.clone(), point });
                        }
                        me.events.push(
                            NewEvent::new(
                                "evaluation",
                                format!("{job}: epoch {epoch} test accuracy {:.2}%, loss {loss:.4}", accuracy * 100.0),
                            )
                            .job(&job)
                            .data(serde_json::json!({ "epoch": epoch, "accuracy": accuracy, "loss": loss })),
                        );
                    }
                    Ok(JobEvent::Finished(s)) => {
                        if let Some(point) = me.write(|t| t.ended(&job, Instant::now())) {
                            let _ = me.updates.send(Update::Train { job: job.clone(), point });
                        }
                        let e = match &s.error {
                            Some(err) => NewEvent::new("job_failed", format!("{job} failed: {err}"))
                                .severity(Severity::Error)
                                .data(serde_json::json!({ "steps": s.steps_done, "error": err })),
                            None => {
                                NewEvent::new("job_succeeded", format!("{job} succeeded after {} steps", s.steps_done))
                                    .data(serde_json::json!({ "steps": s.steps_done }))
                            }
                        };
                        me.events.push(e.job(&job));
                        return;
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    /// Flushes windows into points every [`FLUSH_PERIOD`] and turns registry changes into
    /// `pnode_joined`, `pnode_suspect`, `pnode_lost`, `pnode_recovered` and `pnode_left` events.
    pub async fn watch(self, registry: actix::Addr<Registry>) {
        let mut known: HashMap<String, Health> = HashMap::new();
        let mut tick = tokio::time::interval(FLUSH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for u in self.write(|t| t.flush(Instant::now())) {
                let _ = self.updates.send(u);
            }
            let Ok(snap) = registry.send(ListPNodes).await else { return };
            for e in mesh_changes(&known, &snap) {
                self.events.push(e);
            }
            known = snap.into_iter().map(|p| (p.id, p.health)).collect();
        }
    }
}

/// Events for the differences between the health last seen and a new registry snapshot.
pub fn mesh_changes(known: &HashMap<String, Health>, now: &[PNodeView]) -> Vec<NewEvent> {
    let mut out = Vec::new();
    for p in now {
        let data = || {
            serde_json::json!({
                "name": p.name, "endpoint": p.endpoint, "health": p.health, "cores": p.caps.cores,
                "memory_bytes": p.caps.memory_bytes, "determinism_class": p.caps.determinism_class,
                "gpu": p.caps.gpu, "gpu_gflops": p.caps.gpu_gflops,
                "gpu_determinism_class": p.caps.gpu_determinism_class,
            })
        };
        let e = match (known.get(&p.id), p.health) {
            (None, _) => {
                Some(NewEvent::new("pnode_joined", format!("{} ({}) joined with {} cores", p.id, p.name, p.caps.cores)))
            }
            (Some(a), b) if *a == b => None,
            (Some(_), Health::Suspect) => Some(
                NewEvent::new("pnode_suspect", format!("{} ({}) missed heartbeats", p.id, p.name))
                    .severity(Severity::Warning),
            ),
            (Some(_), Health::Lost) => Some(
                NewEvent::new("pnode_lost", format!("{} ({}) stopped heartbeating", p.id, p.name))
                    .severity(Severity::Error),
            ),
            (Some(_), Health::Healthy) => {
                Some(NewEvent::new("pnode_recovered", format!("{} ({}) is heartbeating again", p.id, p.name)))
            }
            (Some(_), Health::Draining) => Some(NewEvent::new(
                "pnode_draining",
                format!("{} ({}) is leaving; its work is being moved", p.id, p.name),
            )),
        };
        out.extend(e.map(|e| e.pnode(&p.id).data(data())));
    }
    for id in known.keys() {
        if !now.iter().any(|p| &p.id == id) {
            out.push(NewEvent::new("pnode_left", format!("{id} left the mesh")).pnode(id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Caps;

    fn graph() -> ValidGraph {
        dcnr_model::ModelGraph::parse_valid(include_str!("../../tests/fixtures/tiny-mlp.toml")).expect("valid fixture")
    }

    fn loss(job: &str, mb: u64, loss: f32, correct: u32) -> Observation {
        Observation {
            generation: 1,
            job_id: job.into(),
            vnode: 3,
            mb,
            pnode: "pn-0001".into(),
            body: Observed::Loss { phase: Phase::Train, loss, correct, count: 10 },
        }
    }

    #[test]
    fn windows_become_points_with_means_accuracy_and_rate() {
        let mut t = Tracks::default();
        let t0 = Instant::now();
        t.submitted("j", &graph(), t0);
        t.flush(t0);
        t.report(&loss("j", 0, 2.0, 1));
        t.report(&loss("j", 1, 1.0, 4));
        t.report(&loss("other", 0, 9.0, 0));
        let ups = t.flush(t0 + Duration::from_millis(500));
        assert_eq!(ups.len(), 1);
        let Update::Train { job, point } = &ups[0] else { panic!("train update expected") };
        assert_eq!(job, "j");
        assert_eq!(point.step, 2);
        assert!((point.loss - 1.5).abs() < 1e-9);
        assert!((point.accuracy - 0.25).abs() < 1e-9);
        assert!((point.samples_per_s - 40.0).abs() < 1e-6);
        assert!(t.flush(t0 + Duration::from_secs(1)).is_empty(), "an empty window makes no point");
    }

    #[test]
    fn curves_stay_bounded_and_keep_their_whole_span() {
        let mut t = Tracks::default();
        let t0 = Instant::now();
        t.submitted("j", &graph(), t0);
        for i in 0..(MAX_TRAIN_POINTS as u64 * 3) {
            t.report(&loss("j", i, 1.0, 5));
            t.flush(t0 + Duration::from_millis(i + 1));
        }
        let train = &t.jobs["j"].train;
        assert!(train.len() <= MAX_TRAIN_POINTS);
        // Each compaction doubles the span of the oldest point; it still sits at the start.
        assert!(train.front().is_some_and(|p| p.step <= 64), "the start of the curve is kept: {:?}", train.front());
        assert_eq!(train.back().map(|p| p.step), Some(MAX_TRAIN_POINTS as u64 * 3));
        assert!(train.iter().zip(train.iter().skip(1)).all(|(a, b)| a.seq < b.seq && a.step < b.step));
    }

    #[test]
    fn done_reports_move_vnode_steps_and_pnode_rates() {
        let mut t = Tracks::default();
        let t0 = Instant::now();
        t.submitted("j", &graph(), t0);
        t.placed("j", &[(0, "http://a".into()), (1, "http://b".into())]);
        t.flush(t0);
        for mb in 0..4 {
            t.report(&Observation {
                generation: 1,
                job_id: "j".into(),
                vnode: 0,
                mb,
                pnode: "pn-0001".into(),
                body: Observed::Done {
                    compute_us: 1,
                    cpu_us: 1,
                    bytes_in: 100,
                    bytes_out: 50,
                    output_sha256: String::new(),
                    round_sha256: None,
                    inputs: Vec::new(),
                },
            });
        }
        t.flush(t0 + Duration::from_secs(2));
        assert_eq!(t.jobs["j"].vnodes[0].steps, 4);
        assert_eq!(t.jobs["j"].vnodes[0].endpoint, "http://a");
        assert_eq!(t.jobs["j"].vnodes[2].endpoint, "");
        let r = &t.pnodes["pn-0001"];
        assert!((r.vnode_steps_per_s - 2.0).abs() < 1e-9);
        assert!((r.bytes_per_s - 300.0).abs() < 1e-9);
    }

    #[test]
    fn the_oldest_ended_job_is_forgotten_first() {
        let mut t = Tracks::default();
        let now = Instant::now();
        for i in 0..MAX_JOBS {
            t.submitted(&format!("j{i}"), &graph(), now);
        }
        t.ended("j5", now);
        t.submitted("new", &graph(), now);
        assert_eq!(t.jobs.len(), MAX_JOBS);
        assert!(!t.jobs.contains_key("j5"));
        assert!(t.jobs.contains_key("j0") && t.jobs.contains_key("new"));
    }

    #[test]
    fn registry_differences_become_events() {
        let view = |id: &str, health| PNodeView {
            public_key: String::new(),
            trusted: false,
            standing: crate::trust::Standing::New,
            reputation: 0.0,
            quarantine_reason: None,
            reach: Default::default(),
            id: id.into(),
            name: "<b>n</b>".into(),
            endpoint: "http://127.0.0.1:1".into(),
            caps: Caps {
                cores: 2,
                memory_bytes: 1,
                arch: "x86_64".into(),
                os: "linux".into(),
                gpu: String::new(),
                determinism_class: "c".into(),
                gpu_gflops: 0,
                gpu_determinism_class: String::new(),
            },
            health,
            hosted_vnodes: 0,
        };
        let kinds = |known: &HashMap<String, Health>, now: &[PNodeView]| -> Vec<String> {
            mesh_changes(known, now).iter().map(|e| e.kind().to_string()).collect()
        };
        let mut known = HashMap::new();
        assert_eq!(kinds(&known, &[view("a", Health::Healthy)]), ["pnode_joined"]);
        known.insert("a".to_string(), Health::Healthy);
        assert!(kinds(&known, &[view("a", Health::Healthy)]).is_empty());
        assert_eq!(kinds(&known, &[view("a", Health::Suspect)]), ["pnode_suspect"]);
        assert_eq!(kinds(&known, &[view("a", Health::Lost)]), ["pnode_lost"]);
        known.insert("a".to_string(), Health::Lost);
        assert_eq!(kinds(&known, &[view("a", Health::Healthy)]), ["pnode_recovered"]);
        assert_eq!(kinds(&known, &[]), ["pnode_left"]);
    }
}
