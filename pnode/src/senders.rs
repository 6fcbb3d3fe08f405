//! Who may send a VNode message: the PNode placed, in the current placement, for the VNode
//! that sent it. The sending VNode follows from the message and the job's graph (a `Forward`
//! comes from the source of its port, a `Backward` or `Sync` names its sender); where that VNode
//! is placed comes from the orchestrator (`Resolve`), cached, and asked again when the cached
//! answer disagrees (a relocation this PNode took no part in).

use crate::orchestrators::Orchestrators;
use dcnr_model::ValidGraph;
use dcnr_model::graph::Source;
use dcnr_vnode::Inbound;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SenderError {
    /// The message names no VNode that feeds its target.
    #[error("a message to vnode {to} of job {job} names no VNode that sends to it")]
    NoSender {
        /// Job.
        job: String,
        /// Target VNode.
        to: u32,
    },
    /// The sending VNode is placed elsewhere.
    #[error("vnode {from} of job {job} is not placed on pnode {peer}")]
    NotPlaced {
        /// Job.
        job: String,
        /// The VNode the message comes from.
        from: u32,
        /// The PNode that sent it.
        peer: String,
    },
    /// The orchestrator sends a VNode nothing but the features of a model it serves.
    #[error("the orchestrator may send vnode {to} of job {job} only inference features of a served model")]
    NotServedInput {
        /// Job.
        job: String,
        /// Target VNode.
        to: u32,
    },
}

/// The VNode that sent `msg` to VNode `to` of `graph`, if the message names a real one.
pub fn sending_vnode(graph: &ValidGraph, to: u32, msg: &Inbound) -> Option<u32> {
    let node = graph.nodes.get(to as usize)?;
    match msg {
        Inbound::Forward { port, .. } => match node.inputs.get(*port as usize)? {
            Source::Node(id) => Some(*id),
            _ => None,
        },
        Inbound::Backward { from, .. } => graph.nodes.get(from.0 as usize).map(|n| n.id),
        Inbound::Sync { from, .. } => graph.nodes.get(*from as usize).map(|n| n.id),
    }
}

/// Least time between two questions about one VNode's placement: a PNode sending messages in
/// the name of VNodes it does not host cannot make this PNode flood the orchestrator.
const RESOLVE_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// A job hosted here: its placement generation, graph, and whether it serves a trained model.
type Hosted = (u32, Arc<ValidGraph>, bool);

/// The graphs of the jobs hosted here and where their VNodes are placed.
pub struct Senders {
    /// Job → what it was allocated with.
    graphs: Mutex<HashMap<String, Hosted>>,
    /// (job, vnode) → (PNode id, when the orchestrator said so).
    placed: Mutex<HashMap<(String, u32), (String, Instant)>>,
    orchestrators: Orchestrators,
}

impl Senders {
    /// Nothing known yet; placements are asked of the orchestrator each job answers to.
    pub fn new(orchestrators: Orchestrators) -> Senders {
        Senders { graphs: Mutex::default(), placed: Mutex::default(), orchestrators }
    }

    /// A job was (re)allocated here in `generation` with `graph`: what was known of its
    /// placement may be stale.
    pub fn allocated(&self, job: &str, generation: u32, graph: Arc<ValidGraph>, serving: bool) {
        self.graphs.lock().unwrap_or_else(|p| p.into_inner()).insert(job.to_string(), (generation, graph, serving));
        self.placed.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.0 != job);
    }

    /// A job's VNodes left this PNode.
    pub fn released(&self, job: &str) {
        self.graphs.lock().unwrap_or_else(|p| p.into_inner()).remove(job);
        self.placed.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.0 != job);
    }

    /// Accepts `msg` of placement `generation` to VNode `to` of `job` from PNode `peer` only if
    /// `peer` hosts the VNode that sent it. A job not hosted here, or a message of another
    /// generation, passes: the router and the VNode drop those as stale.
    pub async fn check(
        &self,
        job: &str,
        generation: u32,
        to: u32,
        msg: &Inbound,
        peer: &str,
    ) -> Result<(), SenderError> {
        let graph = match self.graphs.lock().unwrap_or_else(|p| p.into_inner()).get(job) {
            Some((g, graph, _)) if *g == generation => graph.clone(),
            _ => return Ok(()),
        };
        let from = sending_vnode(&graph, to, msg).ok_or_else(|| SenderError::NoSender { job: job.into(), to })?;
        let key = (job.to_string(), from);
        let not_placed = || SenderError::NotPlaced { job: job.into(), from, peer: peer.into() };
        let cached = self.placed.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        match cached {
            Some((pnode, _)) if pnode == peer => return Ok(()),
            Some((_, at)) if at.elapsed() < RESOLVE_AGAIN_AFTER => return Err(not_placed()),
            _ => {}
        }
        let (_, link) = self.orchestrators.for_job(job).ok_or_else(not_placed)?;
        let (pnode, _) = link.resolve_placement(job, from).await.map_err(|_| not_placed())?;
        let ok = pnode == peer;
        self.placed.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (pnode, Instant::now()));
        if ok { Ok(()) } else { Err(not_placed()) }
    }
}

impl Senders {
    /// Accepts a VNode message from the orchestrator only if it is inference input: a `Forward`
    /// of phase `Infer` into a features port of a VNode of a job allocated here for serving.
    pub fn check_served_input(&self, job: &str, to: u32, msg: &Inbound) -> Result<(), SenderError> {
        let graphs = self.graphs.lock().unwrap_or_else(|p| p.into_inner());
        match graphs.get(job) {
            Some((_, graph, true)) if is_served_input(graph, to, msg) => Ok(()),
            _ => Err(SenderError::NotServedInput { job: job.into(), to }),
        }
    }
}

/// Whether `msg` to VNode `to` is inference input: a `Forward` of phase `Infer` into one of its
/// features ports.
fn is_served_input(graph: &ValidGraph, to: u32, msg: &Inbound) -> bool {
    match msg {
        Inbound::Forward { phase: dcnr_vnode::Phase::Infer, port, .. } => {
            graph.nodes.get(to as usize).and_then(|n| n.inputs.get(*port as usize)) == Some(&Source::Features)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph() -> ValidGraph {
        let toml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-mlp.toml"));
        dcnr_model::ModelGraph::parse_valid(&toml.unwrap()).unwrap()
    }

    #[test]
    fn the_sender_follows_from_the_message_and_the_graph() {
        let g = graph();
        let t = dcnr_vnode::HostTensor::f32(vec![1, 1], vec![0.0]);
        let fwd = |port| Inbound::Forward { mb: 0, phase: dcnr_vnode::Phase::Train, port, tensor: t.clone() };
        assert_eq!(sending_vnode(&g, 1, &fwd(0)), Some(0), "act's input comes from fc1");
        assert_eq!(sending_vnode(&g, 0, &fwd(0)), None, "fc1 reads features: no VNode sends them");
        assert_eq!(sending_vnode(&g, 3, &fwd(1)), None, "labels come from the data");
        assert_eq!(sending_vnode(&g, 1, &fwd(5)), None, "no such port");
        assert_eq!(sending_vnode(&g, 99, &fwd(0)), None, "no such vnode");
        let back = Inbound::Backward { mb: 0, from: (2, 0), tensor: t.clone() };
        assert_eq!(sending_vnode(&g, 1, &back), Some(2));
        let back = Inbound::Backward { mb: 0, from: (42, 0), tensor: t };
        assert_eq!(sending_vnode(&g, 1, &back), None);
    }

    #[test]
    fn the_orchestrator_may_send_only_inference_input_into_features_ports() {
        use dcnr_vnode::Phase;
        let g = graph();
        let t = dcnr_vnode::HostTensor::f32(vec![1, 1], vec![0.0]);
        let fwd = |phase, port| Inbound::Forward { mb: 0, phase, port, tensor: t.clone() };
        assert!(is_served_input(&g, 0, &fwd(Phase::Infer, 0)), "fc1 reads the features");
        assert!(!is_served_input(&g, 0, &fwd(Phase::Train, 0)), "training input");
        assert!(!is_served_input(&g, 0, &fwd(Phase::Eval, 0)), "evaluation input");
        assert!(!is_served_input(&g, 1, &fwd(Phase::Infer, 0)), "act's input comes from fc1, not the orchestrator");
        assert!(!is_served_input(&g, 3, &fwd(Phase::Infer, 1)), "the loss's labels port");
        assert!(!is_served_input(&g, 0, &fwd(Phase::Infer, 7)), "no such port");
        assert!(!is_served_input(&g, 99, &fwd(Phase::Infer, 0)), "no such vnode");
        let back = Inbound::Backward { mb: 0, from: (1, 0), tensor: t.clone() };
        assert!(!is_served_input(&g, 0, &back), "a gradient");
        let sync = Inbound::Sync { mb: 0, from: 0, index: 0, tensor: t };
        assert!(!is_served_input(&g, 0, &sync), "an averaging change");
    }
}
