//! The decisions of serving one model, with no IO: where its VNodes go, which micro-batches go
//! out when, what a report completes, and when a placement has failed and is replaced. The
//! actor (`serve::ServeActor`) carries the effects out and feeds their results back.
//!
//! A request is cut into micro-batches of at most `max_rows` rows and never shares one with
//! another request: the kernels' results for a row can depend on the rows beside it (a
//! one-row product takes another path than a many-row one), and a client's answer must not
//! depend on who else asked at the time. Requests are batched in time instead: up to
//! `in_flight` micro-batches of any requests are in the pipeline at once, each VNode working on
//! one while the next waits at its input.

use crate::job::Observation;
use crate::job::Observed;
use crate::job::core::{Allocation, FeedTarget, PNodeFailure, VNodeAt};
use crate::placement::{self, Eligibility, Offer};
use crate::registry::{Health, PNodeView};
use dcnr_model::ValidGraph;
use dcnr_model::envelope::Target;
use dcnr_model::graph::Source;
use dcnr_vnode::{HostData, HostTensor};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Serving settings.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Most rows in one micro-batch.
    pub max_rows: usize,
    /// Micro-batches in the pipeline at once.
    pub in_flight: usize,
    /// Requests waiting or running at once; more are refused.
    pub max_requests: usize,
    /// A micro-batch unanswered this long means its placement has failed.
    pub deadline: Duration,
    /// How long to wait for PNodes to place on before failing the waiting requests.
    pub placement_timeout: Duration,
    /// Unused this long, the VNodes are released and serving stops.
    pub idle: Duration,
}

impl Default for ServeLimits {
    fn default() -> ServeLimits {
        ServeLimits {
            max_rows: 1000,
            in_flight: 8,
            max_requests: 256,
            deadline: Duration::from_secs(20),
            placement_timeout: Duration::from_secs(30),
            idle: Duration::from_secs(600),
        }
    }
}

/// What happened.
#[derive(Debug)]
pub enum Input {
    /// A client's request `id` (inputs already checked against the graph).
    Request { id: u64, inputs: HostTensor },
    /// The registry's PNodes, as asked for by [`Effect::ListPNodes`].
    View(Vec<PNodeView>),
    /// The allocation of `generation` finished.
    Allocated { generation: u32, result: Result<(), PNodeFailure> },
    /// A report from one of the VNodes.
    Report(Observation),
    /// Micro-batch input could not be sent to `pnode` in `generation`.
    SendFailed { generation: u32, pnode: String, why: String },
    /// A PNode is leaving.
    Evacuate(String),
    /// Time passes.
    Tick,
}

/// What to do.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// Ask the registry for its PNodes (answer with [`Input::View`]).
    ListPNodes,
    /// Allocate these VNodes (answer with [`Input::Allocated`]).
    Allocate { generation: u32, allocations: Vec<Allocation> },
    /// The VNodes' locations now, for the PNodes' `Resolve`.
    Placed { locations: Vec<(u32, String)> },
    /// Release whatever the PNodes at these endpoints host for serving.
    Release { endpoints: BTreeSet<String> },
    /// Send micro-batch `mb`'s `inputs` to every features port.
    Send { generation: u32, mb: u64, targets: Vec<FeedTarget>, inputs: HostTensor },
    /// Answer request `id`.
    Answer { id: u64, result: Result<Answered, String> },
    /// A line for the log.
    Log(String),
    /// Nothing was asked for a while: release everything and stop.
    Stop,
}

/// A request's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    /// f32 [rows, classes].
    pub probabilities: HostTensor,
    /// The placement generation that computed the last of its micro-batches.
    pub generation: u32,
}

#[derive(Debug)]
struct Piece {
    request: u64,
    index: usize,
    rows: usize,
    inputs: HostTensor,
    /// When it was sent in the current generation (`None`: queued).
    sent: Option<Duration>,
}

#[derive(Debug)]
struct Pending {
    parts: Vec<Option<Vec<f32>>>,
    rows: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for the registry's view to place on, since this time.
    Placing(Duration),
    /// Waiting for the allocation.
    Allocating,
    /// Serving.
    Ready,
    /// Nothing asked: no VNodes are placed.
    Idle,
}

/// Serving one model.
pub struct ServeCore {
    graph: ValidGraph,
    states: BTreeMap<u32, Vec<u8>>,
    limits: ServeLimits,
    stage: Stage,
    generation: u32,
    placement: BTreeMap<u32, PNodeView>,
    allocating: BTreeMap<u32, PNodeView>,
    excluded: BTreeSet<String>,
    queue: VecDeque<u64>,
    pieces: BTreeMap<u64, Piece>,
    requests: BTreeMap<u64, Pending>,
    next_mb: u64,
    now: Duration,
    last_used: Duration,
    effects: Vec<Effect>,
}

impl ServeCore {
    /// Serving `graph` (one pipeline, exact mode) with each VNode restored from `states`,
    /// placements numbered from `first_generation`.
    pub fn new(
        graph: ValidGraph,
        states: Vec<(u32, Vec<u8>)>,
        limits: ServeLimits,
        first_generation: u32,
        now: Duration,
    ) -> ServeCore {
        ServeCore {
            graph,
            states: states.into_iter().collect(),
            limits,
            stage: Stage::Idle,
            generation: first_generation,
            placement: BTreeMap::new(),
            allocating: BTreeMap::new(),
            excluded: BTreeSet::new(),
            queue: VecDeque::new(),
            pieces: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_mb: 0,
            now,
            last_used: now,
            effects: Vec::new(),
        }
    }

    /// The effects decided so far, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The placement generation now.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Takes one input at time `now`.
    pub fn step(&mut self, input: Input, now: Duration) {
        self.now = self.now.max(now);
        match input {
            Input::Request { id, inputs } => self.on_request(id, inputs),
            Input::View(view) => self.on_view(view),
            Input::Allocated { generation, result } => self.on_allocated(generation, result),
            Input::Report(r) => self.on_report(r),
            Input::SendFailed { generation, pnode, why } => {
                if generation == self.generation && self.stage == Stage::Ready {
                    self.replace(format!("sending to {pnode} failed: {why}"), Some(pnode));
                }
            }
            Input::Evacuate(pnode) => {
                if self.placement.values().any(|p| p.id == pnode) {
                    self.replace(format!("pnode {pnode} is leaving"), Some(pnode));
                }
            }
            Input::Tick => self.on_tick(),
        }
        self.pump();
    }

    fn on_request(&mut self, id: u64, inputs: HostTensor) {
        self.last_used = self.now;
        if self.requests.len() >= self.limits.max_requests {
            let why = format!("{} requests are already waiting; try again later", self.requests.len());
            return self.effects.push(Effect::Answer { id, result: Err(why) });
        }
        let rows = inputs.rows();
        let width = inputs.shape.get(1).copied().unwrap_or(0);
        let chunk = self.limits.max_rows.max(1);
        let parts: Vec<HostTensor> = (0..rows)
            .step_by(chunk)
            .map(|start| {
                let n = chunk.min(rows - start);
                let range = start * width..(start + n) * width;
                match &inputs.data {
                    HostData::U8(v) => HostTensor::u8(vec![n, width], v[range].to_vec()),
                    HostData::F32(v) => HostTensor::f32(vec![n, width], v[range].to_vec()),
                    // Checked by the caller: only pixels or features get here.
                    _ => HostTensor::f32(vec![0, width], Vec::new()),
                }
            })
            .collect();
        self.requests.insert(id, Pending { parts: vec![None; parts.len()], rows });
        for (index, part) in parts.into_iter().enumerate() {
            let mb = self.next_mb;
            self.next_mb += 1;
            self.pieces.insert(mb, Piece { request: id, index, rows: part.rows(), inputs: part, sent: None });
            self.queue.push_back(mb);
        }
        if self.stage == Stage::Idle {
            self.begin_placement();
        }
    }

    fn begin_placement(&mut self) {
        self.stage = Stage::Placing(self.now);
        self.effects.push(Effect::ListPNodes);
    }

    fn on_view(&mut self, view: Vec<PNodeView>) {
        match self.stage {
            Stage::Placing(since) => self.try_place(view, since),
            Stage::Ready => {
                let lost: Vec<&PNodeView> = self
                    .placement
                    .values()
                    .filter(|p| view.iter().find(|v| v.id == p.id).is_none_or(|v| v.health != Health::Healthy))
                    .collect();
                if let Some(p) = lost.first() {
                    let id = p.id.clone();
                    self.replace(format!("pnode {id} is no longer healthy"), Some(id.clone()));
                }
            }
            Stage::Allocating | Stage::Idle => {}
        }
    }

    fn try_place(&mut self, view: Vec<PNodeView>, since: Duration) {
        let rules = Eligibility { exclude: self.excluded.clone(), ..Eligibility::default() };
        let healthy: Vec<PNodeView> = view.into_iter().filter(|p| placement::eligible(p, &rules)).collect();
        // Served models compute on CPUs: their VNodes answer one request at a time.
        let offers: Vec<Offer> = healthy.iter().map(|p| Offer::of(p, Target::Cpu)).collect();
        let demands = placement::demands(&self.graph, 0, 1);
        let why = match placement::place(&demands, &offers, offers.len().max(1)) {
            Ok(assignment) => return self.allocate(&healthy, assignment),
            Err(e) => e.to_string(),
        };
        if self.now.saturating_sub(since) >= self.limits.placement_timeout {
            // Forgive the PNodes excluded so far: the next request tries them again.
            self.excluded.clear();
            self.fail_all(format!("the model could not be placed: {why}"));
            self.stage = Stage::Idle;
        }
    }

    fn allocate(&mut self, healthy: &[PNodeView], assignment: Vec<(u32, String)>) {
        let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (v, p) in &assignment {
            groups.entry(p.clone()).or_default().push(*v);
        }
        let endpoint = |id: &str| healthy.iter().find(|p| p.id == id).map(|p| p.endpoint.clone()).unwrap_or_default();
        let allocations = groups
            .into_iter()
            .map(|(pnode, vnodes)| Allocation {
                endpoint: endpoint(&pnode),
                on_gpu: false,
                vnodes: vnodes.into_iter().map(|v| (v, self.states.get(&v).cloned().unwrap_or_default())).collect(),
                pnode,
            })
            .collect();
        self.allocating = assignment
            .into_iter()
            .filter_map(|(v, p)| healthy.iter().find(|h| h.id == p).map(|h| (v, h.clone())))
            .collect();
        self.stage = Stage::Allocating;
        self.effects.push(Effect::Allocate { generation: self.generation, allocations });
    }

    fn on_allocated(&mut self, generation: u32, result: Result<(), PNodeFailure>) {
        if generation != self.generation || self.stage != Stage::Allocating {
            return;
        }
        match result {
            Ok(()) => {
                self.placement = std::mem::take(&mut self.allocating);
                let locations: Vec<(u32, String)> =
                    self.placement.iter().map(|(v, p)| (*v, p.endpoint.clone())).collect();
                let hosts: BTreeSet<&str> = self.placement.values().map(|p| p.id.as_str()).collect();
                self.effects.push(Effect::Log(format!(
                    "serving on {} pnode(s), generation {}",
                    hosts.len(),
                    self.generation
                )));
                self.effects.push(Effect::Placed { locations });
                self.stage = Stage::Ready;
            }
            Err(f) => {
                self.placement = std::mem::take(&mut self.allocating);
                self.replace(format!("allocation failed: {}", f.why), Some(f.pnode));
            }
        }
    }

    /// The placement of this generation has failed: release it, put every unanswered
    /// micro-batch back in the queue, and place again without `culprit`.
    fn replace(&mut self, why: String, culprit: Option<String>) {
        self.effects.push(Effect::Log(format!("replacing the placement of generation {}: {why}", self.generation)));
        let endpoints: BTreeSet<String> = self.placement.values().map(|p| p.endpoint.clone()).collect();
        if !endpoints.is_empty() {
            self.effects.push(Effect::Release { endpoints });
        }
        if let Some(c) = culprit {
            self.excluded.insert(c);
        }
        self.placement.clear();
        self.generation = self.generation.wrapping_add(1);
        let mut resend: Vec<u64> = self.pieces.iter().filter(|(_, p)| p.sent.is_some()).map(|(mb, _)| *mb).collect();
        resend.sort_unstable();
        for mb in resend.into_iter().rev() {
            if let Some(p) = self.pieces.get_mut(&mb) {
                p.sent = None;
            }
            self.queue.push_front(mb);
        }
        self.begin_placement();
    }

    fn on_report(&mut self, r: Observation) {
        if r.generation != self.generation || self.stage != Stage::Ready {
            return;
        }
        // Only the PNode this placement put the VNode on speaks for it.
        if self.placement.get(&r.vnode).is_none_or(|p| p.id != r.pnode) {
            return;
        }
        match r.body {
            Observed::Predictions(probabilities) => self.on_predictions(r.vnode, r.mb, probabilities, &r.pnode),
            Observed::Rejected { from_vnode: None, reason } => {
                // The inputs themselves were refused: no placement computes them.
                if let Some(request) = self.pieces.get(&r.mb).map(|p| p.request) {
                    self.fail_request(request, format!("the inputs were refused: {reason}"));
                }
            }
            Observed::Rejected { reason, .. } | Observed::Failure(reason) => {
                let pnode = r.pnode.clone();
                self.replace(format!("vnode {} on {pnode}: {reason}", r.vnode), Some(pnode));
            }
            Observed::Done { .. } | Observed::Loss { .. } => {}
        }
    }

    fn on_predictions(&mut self, vnode: u32, mb: u64, probabilities: HostTensor, pnode: &str) {
        let is_loss = self.graph.nodes.get(vnode as usize).is_some_and(|n| n.consumers.is_empty());
        let Some(piece) = self.pieces.get(&mb).filter(|p| p.sent.is_some()) else { return };
        let classes = self.graph.spec.data.classes;
        let valid = is_loss
            && probabilities.shape == [piece.rows, classes]
            && probabilities.as_f32().is_some_and(|v| {
                v.len() == piece.rows * classes && v.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x))
            });
        if !valid {
            let pnode = pnode.to_string();
            return self.replace(format!("vnode {vnode} on {pnode} sent malformed predictions"), Some(pnode));
        }
        let Some(piece) = self.pieces.remove(&mb) else { return };
        let HostData::F32(values) = probabilities.data else { return };
        let Some(pending) = self.requests.get_mut(&piece.request) else { return };
        if let Some(slot) = pending.parts.get_mut(piece.index) {
            *slot = Some(values);
        }
        if pending.parts.iter().all(Option::is_some) {
            let rows = pending.rows;
            let Some(done) = self.requests.remove(&piece.request) else { return };
            let values: Vec<f32> = done.parts.into_iter().flatten().flatten().collect();
            let answered =
                Answered { probabilities: HostTensor::f32(vec![rows, classes], values), generation: self.generation };
            self.effects.push(Effect::Answer { id: piece.request, result: Ok(answered) });
        }
    }

    fn fail_request(&mut self, id: u64, why: String) {
        if self.requests.remove(&id).is_none() {
            return;
        }
        self.pieces.retain(|_, p| p.request != id);
        self.queue.retain(|mb| self.pieces.contains_key(mb));
        self.effects.push(Effect::Answer { id, result: Err(why) });
    }

    fn fail_all(&mut self, why: String) {
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        for id in ids {
            self.fail_request(id, why.clone());
        }
    }

    fn on_tick(&mut self) {
        match self.stage {
            Stage::Placing(_) | Stage::Ready => self.effects.push(Effect::ListPNodes),
            Stage::Idle if self.requests.is_empty() && self.now.saturating_sub(self.last_used) >= self.limits.idle => {
                self.effects.push(Effect::Stop)
            }
            Stage::Allocating | Stage::Idle => {}
        }
        if self.stage == Stage::Ready {
            let late = self
                .pieces
                .values()
                .filter_map(|p| p.sent)
                .any(|at| self.now.saturating_sub(at) > self.limits.deadline);
            if late {
                return self.replace(format!("a micro-batch went unanswered for {:?}", self.limits.deadline), None);
            }
            if self.requests.is_empty() && self.now.saturating_sub(self.last_used) >= self.limits.idle {
                let endpoints: BTreeSet<String> = self.placement.values().map(|p| p.endpoint.clone()).collect();
                self.effects.push(Effect::Log("idle: releasing the served model's VNodes".into()));
                self.effects.push(Effect::Release { endpoints });
                self.placement.clear();
                self.stage = Stage::Idle;
                self.effects.push(Effect::Stop);
            }
        }
    }

    /// Sends queued micro-batches while the pipeline has room.
    fn pump(&mut self) {
        if self.stage != Stage::Ready {
            return;
        }
        let targets = self.targets();
        let mut running = self.pieces.values().filter(|p| p.sent.is_some()).count();
        while running < self.limits.in_flight {
            let Some(mb) = self.queue.pop_front() else { break };
            let Some(piece) = self.pieces.get_mut(&mb) else { continue };
            piece.sent = Some(self.now);
            running += 1;
            self.effects.push(Effect::Send {
                generation: self.generation,
                mb,
                targets: targets.clone(),
                inputs: piece.inputs.clone(),
            });
        }
    }

    /// Every port that reads features, where its VNode is placed now.
    fn targets(&self) -> Vec<FeedTarget> {
        self.graph
            .nodes
            .iter()
            .flat_map(|n| {
                n.inputs.iter().enumerate().filter(|(_, s)| **s == Source::Features).map(move |(port, _)| (n.id, port))
            })
            .filter_map(|(vnode, port)| {
                self.placement.get(&vnode).map(|p| FeedTarget {
                    at: VNodeAt { vnode, pnode: p.id.clone(), endpoint: p.endpoint.clone() },
                    port: port as u32,
                    labels: false,
                })
            })
            .collect()
    }

    /// Whether requests are waiting or running.
    pub fn busy(&self) -> bool {
        !self.requests.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRAPH: &str = r#"
[model]
name = "t"
[data]
dataset = "mnist"
feature_size = 4
classes = 3
[training]
batch_size = 2
[optimizer]
kind = "sgd"
lr = 0.1
[[node]]
id = "fc"
kind = "linear"
inputs = 4
outputs = 3
[[node]]
id = "loss"
kind = "softmax_cross_entropy"
[[edge]]
from = "image"
to = "fc"
[[edge]]
from = "fc"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

    use crate::registry::test_view as pnode;

    fn limits() -> ServeLimits {
        ServeLimits { max_rows: 3, in_flight: 2, ..ServeLimits::default() }
    }

    fn core() -> ServeCore {
        let graph = dcnr_model::graph::ModelGraph::parse_valid(GRAPH).unwrap();
        ServeCore::new(graph, vec![(0, vec![1]), (1, vec![2])], limits(), 7, Duration::ZERO)
    }

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn rows(n: usize) -> HostTensor {
        HostTensor::u8(vec![n, 4], (0..n * 4).map(|i| i as u8).collect())
    }

    /// Places `c` on `pnodes` and acknowledges the allocation; returns the effects after it.
    fn place(c: &mut ServeCore, pnodes: &[PNodeView], t: Duration) -> Vec<Effect> {
        c.step(Input::View(pnodes.to_vec()), t);
        let effects = c.take_effects();
        let Some(Effect::Allocate { generation, allocations }) = effects.last() else { panic!("{effects:?}") };
        // Every VNode goes with its trained state.
        let states: Vec<&Vec<u8>> = allocations.iter().flat_map(|a| a.vnodes.iter().map(|(_, s)| s)).collect();
        assert!(states.iter().all(|s| !s.is_empty()));
        let generation = *generation;
        c.step(Input::Allocated { generation, result: Ok(()) }, t);
        c.take_effects()
    }

    fn predictions(c: &ServeCore, pnode: &str, mb: u64, n: usize) -> Input {
        let values = (0..n).flat_map(|_| [0.25f32, 0.5, 0.25]).collect();
        Input::Report(Observation {
            job_id: "j.serve".into(),
            vnode: 1,
            mb,
            pnode: pnode.into(),
            generation: c.generation(),
            body: Observed::Predictions(HostTensor::f32(vec![n, 3], values)),
        })
    }

    fn sends(effects: &[Effect]) -> Vec<(u64, usize)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send { mb, inputs, targets, .. } => {
                    assert_eq!(targets.len(), 1, "one features port");
                    Some((*mb, inputs.rows()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_request_is_cut_into_its_own_micro_batches_and_answered_whole() {
        let mut c = core();
        c.step(Input::Request { id: 1, inputs: rows(7) }, at(0));
        assert_eq!(c.take_effects(), vec![Effect::ListPNodes]);
        let effects = place(&mut c, &[pnode(0, Health::Healthy)], at(1));
        assert!(matches!(&effects[1], Effect::Placed { locations } if locations.len() == 2));
        // 7 rows in pieces of 3: two in flight, the third waits for room.
        assert_eq!(sends(&effects), vec![(0, 3), (1, 3)]);
        c.step(Input::Request { id: 2, inputs: rows(1) }, at(2));
        assert!(sends(&c.take_effects()).is_empty());
        c.step(predictions(&c, "p0", 1, 3), at(3));
        assert_eq!(sends(&c.take_effects()), vec![(2, 1)]);
        c.step(predictions(&c, "p0", 0, 3), at(4));
        assert_eq!(sends(&c.take_effects()), vec![(3, 1)]);
        c.step(predictions(&c, "p0", 2, 1), at(5));
        let effects = c.take_effects();
        let Some(Effect::Answer { id: 1, result: Ok(a) }) = effects.first() else { panic!("{effects:?}") };
        assert_eq!(a.probabilities.shape, vec![7, 3]);
        c.step(predictions(&c, "p0", 3, 1), at(6));
        assert!(matches!(c.take_effects().as_slice(), [Effect::Answer { id: 2, result: Ok(_) }]));
        assert!(!c.busy());
    }

    #[test]
    fn a_lost_pnode_is_replaced_and_unanswered_work_resent_in_a_new_generation() {
        let mut c = core();
        c.step(Input::Request { id: 1, inputs: rows(2) }, at(0));
        c.take_effects();
        place(&mut c, &[pnode(0, Health::Healthy)], at(1));
        let first = c.generation();
        c.step(Input::Tick, at(300));
        assert_eq!(c.take_effects(), vec![Effect::ListPNodes]);
        c.step(Input::View(vec![pnode(0, Health::Lost), pnode(1, Health::Healthy)]), at(301));
        let effects = c.take_effects();
        assert!(
            effects.iter().any(|e| matches!(e, Effect::Release { endpoints } if endpoints.contains("http://h0:1")))
        );
        assert!(effects.contains(&Effect::ListPNodes));
        assert_eq!(c.generation(), first + 1);
        // A late answer of the old generation counts for nothing.
        let mut old = predictions(&c, "p0", 0, 2);
        if let Input::Report(r) = &mut old {
            r.generation = first;
        }
        c.step(old, at(302));
        assert!(c.take_effects().is_empty());
        // The lost PNode is not used again; the work is sent again to the new one.
        let effects = place(&mut c, &[pnode(0, Health::Healthy), pnode(1, Health::Healthy)], at(303));
        let Some(Effect::Placed { locations }) = effects.get(1) else { panic!("{effects:?}") };
        assert!(locations.iter().all(|(_, e)| e == "http://h1:1"));
        assert_eq!(sends(&effects), vec![(0, 2)]);
        // Only the PNode placed for the loss speaks for it.
        c.step(predictions(&c, "p0", 0, 2), at(304));
        assert!(c.take_effects().is_empty());
        c.step(predictions(&c, "p1", 0, 2), at(305));
        assert!(
            matches!(c.take_effects().as_slice(), [Effect::Answer { id: 1, result: Ok(a) }] if a.generation == first + 1)
        );
    }

    #[test]
    fn malformed_predictions_a_failure_or_silence_replace_the_placement() {
        let mut c = core();
        c.step(Input::Request { id: 1, inputs: rows(2) }, at(0));
        c.take_effects();
        let all: Vec<PNodeView> = (0..4).map(|i| pnode(i, Health::Healthy)).collect();
        // The PNode the loss VNode (1) is placed on, from the placement's locations.
        let loss_host = |effects: &[Effect]| -> String {
            let Some(Effect::Placed { locations }) = effects.get(1) else { panic!("{effects:?}") };
            let endpoint = &locations.iter().find(|(v, _)| *v == 1).unwrap().1;
            all.iter().find(|p| &p.endpoint == endpoint).unwrap().id.clone()
        };
        let host = loss_host(&place(&mut c, &all, at(1)));
        let g = c.generation();
        // Wrong row count.
        c.step(predictions(&c, &host, 0, 1), at(2));
        assert!(c.take_effects().iter().any(|e| matches!(e, Effect::Log(l) if l.contains("malformed"))));
        assert_eq!(c.generation(), g + 1);
        let next = loss_host(&place(&mut c, &all, at(3)));
        assert_ne!(next, host, "the PNode that sent malformed predictions is not used again");
        let report = Input::Report(Observation {
            job_id: "j.serve".into(),
            vnode: 1,
            mb: 0,
            pnode: next,
            generation: c.generation(),
            body: Observed::Failure("out of memory".into()),
        });
        c.step(report, at(4));
        assert_eq!(c.generation(), g + 2);
        place(&mut c, &all, at(5));
        c.step(Input::Tick, at(5) + limits().deadline + at(1));
        assert!(c.take_effects().iter().any(|e| matches!(e, Effect::Log(l) if l.contains("unanswered"))));
        assert_eq!(c.generation(), g + 3);
    }

    #[test]
    fn without_capacity_requests_fail_after_the_placement_timeout_and_too_many_are_refused() {
        let mut c = core();
        c.step(Input::Request { id: 1, inputs: rows(1) }, at(0));
        c.take_effects();
        c.step(Input::View(vec![pnode(0, Health::Lost)]), at(10));
        assert!(c.take_effects().is_empty(), "waits for capacity");
        c.step(Input::View(vec![]), limits().placement_timeout + at(1));
        let effects = c.take_effects();
        assert!(
            matches!(effects.as_slice(), [Effect::Answer { id: 1, result: Err(why) }] if why.contains("could not be placed")),
            "{effects:?}"
        );
        let mut c = ServeCore::new(
            dcnr_model::graph::ModelGraph::parse_valid(GRAPH).unwrap(),
            vec![],
            ServeLimits { max_requests: 1, ..limits() },
            1,
            Duration::ZERO,
        );
        c.step(Input::Request { id: 1, inputs: rows(1) }, at(0));
        c.step(Input::Request { id: 2, inputs: rows(1) }, at(0));
        assert!(c.take_effects().iter().any(|e| matches!(e, Effect::Answer { id: 2, result: Err(_) })));
    }

    #[test]
    fn idle_serving_releases_its_vnodes_and_stops() {
        let mut c = core();
        c.step(Input::Request { id: 1, inputs: rows(1) }, at(0));
        c.take_effects();
        place(&mut c, &[pnode(0, Health::Healthy)], at(1));
        c.step(predictions(&c, "p0", 0, 1), at(2));
        c.take_effects();
        c.step(Input::Tick, limits().idle + at(3));
        let effects = c.take_effects();
        assert!(effects.iter().any(|e| matches!(e, Effect::Release { .. })), "{effects:?}");
        assert!(effects.contains(&Effect::Stop));
    }
}
