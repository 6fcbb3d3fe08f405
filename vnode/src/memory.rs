//! VNodes wired together in one process with no transport: the harness for order-independence
//! tests, snapshot tests and benchmarks of the math alone.

use crate::{HostTensor, Inbound, Outbound, Phase, VNode, VNodeError};
use dcnr_model::graph::{Source, ValidGraph};
use std::ops::Range;

/// Trains micro-batches `steps` through `nodes` (indexed by VNode id), keeping at most
/// `in_flight` incomplete; `batch(mb, pipeline)` gives features and labels, and `pick(n)`
/// chooses which of the `n` pending messages is delivered next, so callers can shuffle delivery.
/// Returns the training loss of every micro-batch (pipeline 0's), in order.
pub fn train(
    graph: &ValidGraph,
    nodes: &mut [VNode],
    steps: Range<u64>,
    in_flight: u32,
    mut batch: impl FnMut(u64, u32) -> (HostTensor, HostTensor),
    mut pick: impl FnMut(usize) -> usize,
) -> Result<Vec<f32>, VNodeError> {
    let count = (steps.end - steps.start) as usize;
    let mut queue: Vec<(u32, Inbound)> = Vec::new();
    let mut done = vec![0usize; count];
    let mut losses = vec![f32::NAN; count];
    let (mut fed, mut completed) = (steps.start, steps.start);
    loop {
        while fed < steps.end && fed < completed + u64::from(in_flight.max(1)) {
            let inputs: Vec<(HostTensor, HostTensor)> = (0..graph.pipelines()).map(|p| batch(fed, p)).collect();
            for n in &graph.nodes {
                let Some((x, y)) = inputs.get(n.pipeline as usize) else { continue };
                for (port, src) in n.inputs.iter().enumerate() {
                    let tensor = match src {
                        Source::Features => x.clone(),
                        Source::Labels => y.clone(),
                        Source::Node(_) => continue,
                    };
                    queue.push((n.id, Inbound::Forward { mb: fed, phase: Phase::Train, port: port as u32, tensor }));
                }
            }
            fed += 1;
        }
        if queue.is_empty() {
            return Ok(losses);
        }
        let (to, msg) = queue.swap_remove(pick(queue.len()).min(queue.len() - 1));
        let Some(node) = nodes.get_mut(to as usize) else { continue };
        let first_pipeline = graph.nodes.get(to as usize).is_some_and(|n| n.pipeline == 0);
        for out in node.handle(msg)? {
            match out.into_delivery() {
                Ok(delivery) => queue.push(delivery),
                Err(Outbound::Done { mb, .. }) => done[(mb - steps.start) as usize] += 1,
                Err(Outbound::Loss { mb, loss, .. }) if first_pipeline => losses[(mb - steps.start) as usize] = loss,
                Err(_) => {}
            }
        }
        while completed < steps.end && done[(completed - steps.start) as usize] == graph.nodes.len() {
            completed += 1;
        }
    }
}

/// Runs inference micro-batch `mb` of `features` through `nodes` (indexed by VNode id),
/// delivering pending messages in the order `pick` chooses; returns the loss VNode's class
/// probabilities.
pub fn infer(
    graph: &ValidGraph,
    nodes: &mut [VNode],
    mb: u64,
    features: &HostTensor,
    mut pick: impl FnMut(usize) -> usize,
) -> Result<Option<HostTensor>, VNodeError> {
    let mut queue: Vec<(u32, Inbound)> = Vec::new();
    for n in &graph.nodes {
        for (port, src) in n.inputs.iter().enumerate() {
            if *src == Source::Features {
                let tensor = features.clone();
                queue.push((n.id, Inbound::Forward { mb, phase: Phase::Infer, port: port as u32, tensor }));
            }
        }
    }
    let mut answer = None;
    while !queue.is_empty() {
        let (to, msg) = queue.swap_remove(pick(queue.len()).min(queue.len() - 1));
        let Some(node) = nodes.get_mut(to as usize) else { continue };
        for out in node.handle(msg)? {
            match out.into_delivery() {
                Ok(delivery) => queue.push(delivery),
                Err(Outbound::Predictions { probabilities, .. }) => answer = Some(probabilities),
                Err(_) => {}
            }
        }
    }
    Ok(answer)
}
