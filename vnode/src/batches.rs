//! Which samples make up each training step (a deterministic function of the root seed) and
//! each evaluation batch, and the [`Feeder`] that turns a batch number into the input tensor a
//! VNode reads: what a PNode does with a `Feed` message, and the simulator with a feed effect.

use crate::host::HostTensor;
use crate::seed::{Purpose, stream};
use crate::vnode::{Inbound, Phase};
use dcnr_model::dataset::Splits;
use dcnr_model::graph::{Source, ValidNode};
use rand::seq::SliceRandom;
use std::ops::Range;
use std::sync::Arc;

/// The sample order of a job: epoch `e` visits the training set in the permutation drawn from
/// stream (root, shuffle, e); step `s` takes the next `batch` samples (the last batch of an epoch
/// may be smaller).
#[derive(Debug, Clone)]
pub struct BatchPlan {
    samples: usize,
    batch: usize,
    root_seed: u64,
    shards: u32,
    cached: Option<(u64, Vec<usize>)>,
}

impl BatchPlan {
    /// A plan over `samples` samples in batches of `batch` (both >= 1).
    pub fn new(samples: usize, batch: usize, root_seed: u64) -> BatchPlan {
        BatchPlan { samples, batch: batch.max(1), root_seed, shards: 1, cached: None }
    }

    /// The plan split among `shards` data-parallel pipelines: step `s` of pipeline `p` takes
    /// the batch an unsharded plan numbers `s·shards + p` within the same epoch, so one epoch's
    /// order is dealt out in turn; the last `batches mod shards` batches of every epoch go unused.
    pub fn sharded(mut self, shards: u32) -> BatchPlan {
        self.shards = shards.max(1);
        self
    }

    fn batches_per_epoch(&self) -> u64 {
        self.samples.div_ceil(self.batch) as u64
    }

    /// Steps in one epoch (of each pipeline, when sharded).
    pub fn steps_per_epoch(&self) -> u64 {
        self.batches_per_epoch() / u64::from(self.shards)
    }

    /// The epoch a step belongs to.
    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch().max(1)
    }

    /// Sample indices of `step` (of pipeline 0, when sharded).
    pub fn indices(&mut self, step: u64) -> Vec<usize> {
        self.shard_indices(step, 0)
    }

    /// Sample indices of step `step` of pipeline `shard`.
    pub fn shard_indices(&mut self, step: u64, shard: u32) -> Vec<usize> {
        let spe = self.steps_per_epoch().max(1);
        let epoch = step / spe;
        let within = ((step % spe) * u64::from(self.shards) + u64::from(shard.min(self.shards - 1))) as usize;
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut order: Vec<usize> = (0..self.samples).collect();
            order.shuffle(&mut stream(self.root_seed, Purpose::Shuffle, epoch));
            self.cached = Some((epoch, order));
        }
        let order = self.cached.as_ref().map(|c| c.1.as_slice()).unwrap_or(&[]);
        let start = within * self.batch;
        order[start.min(order.len())..(start + self.batch).min(order.len())].to_vec()
    }
}

/// The test samples of evaluation batch `batch`: `batch*size .. min((batch+1)*size, samples)`,
/// or `None` when it starts at or past the end (or the arithmetic would overflow).
pub fn eval_range(batch: u64, size: usize, samples: usize) -> Option<Range<usize>> {
    let size = size.max(1);
    let start = usize::try_from(batch).ok()?.checked_mul(size)?;
    (start < samples).then(|| start..start.saturating_add(size).min(samples))
}

/// Why a feed request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// Inference inputs come with the request, never from the job's dataset.
    #[error("vnode {vnode}: inference inputs are sent inline, not fed from the dataset")]
    Inference {
        /// The VNode.
        vnode: u32,
    },
    /// The port exists but is fed by another VNode, or does not exist.
    #[error("vnode {vnode}: input port {port} does not read the job's data")]
    NotData {
        /// The VNode.
        vnode: u32,
        /// The port asked for.
        port: u32,
    },
    /// A training batch is its step; any other number names data of another step.
    #[error("vnode {vnode}: training micro-batch {mb} asked for the data of step {batch}")]
    WrongStep {
        /// The VNode.
        vnode: u32,
        /// Micro-batch of the message.
        mb: u64,
        /// Batch it asked for.
        batch: u64,
    },
    /// No sample of the test set is in this evaluation batch.
    #[error("vnode {vnode}: evaluation batch {batch} is beyond the {samples} test samples (batches of {size})")]
    BeyondTestSet {
        /// The VNode.
        vnode: u32,
        /// Batch asked for.
        batch: u64,
        /// Test samples.
        samples: usize,
        /// Samples per evaluation batch.
        size: usize,
    },
    /// The training set is empty, so no step has samples.
    #[error("vnode {vnode}: the training set is empty")]
    NoTrainingData {
        /// The VNode.
        vnode: u32,
    },
}

/// Builds the data inputs of one VNode from a dataset held locally: the same samples the job's
/// plan names (same seed, same batch size), features as raw u8 pixels `[n, rows*cols]` that the
/// VNode normalises, labels as i32 `[n]`.
#[derive(Debug, Clone)]
pub struct Feeder {
    vnode: u32,
    inputs: Vec<Source>,
    data: Arc<Splits>,
    plan: BatchPlan,
    /// The pipeline whose shard of the data this VNode reads.
    pipeline: u32,
    eval_batch: usize,
}

impl Feeder {
    /// A feeder for `node`, or `None` when it reads neither features nor labels.
    pub fn new(
        node: &ValidNode,
        data: Arc<Splits>,
        batch_size: usize,
        eval_batch_size: usize,
        root_seed: u64,
    ) -> Option<Feeder> {
        if !node.inputs.iter().any(|s| matches!(s, Source::Features | Source::Labels)) {
            return None;
        }
        let pipelines = u32::try_from(node.copies.len()).unwrap_or(u32::MAX).max(1);
        let plan = BatchPlan::new(data.train.len(), batch_size, root_seed).sharded(pipelines);
        Some(Feeder {
            vnode: node.id,
            inputs: node.inputs.clone(),
            data,
            plan,
            pipeline: node.pipeline,
            eval_batch: eval_batch_size.max(1),
        })
    }

    /// The forward message carrying input `port` of micro-batch `mb`, built from `batch`.
    pub fn inbound(&mut self, mb: u64, phase: Phase, port: u32, batch: u64) -> Result<Inbound, FeedError> {
        let tensor = self.input(mb, phase, port, batch)?;
        Ok(Inbound::Forward { mb, phase, port, tensor })
    }

    /// Input `port` of micro-batch `mb`, built from `batch` (see [`Feeder`]).
    pub fn input(&mut self, mb: u64, phase: Phase, port: u32, batch: u64) -> Result<HostTensor, FeedError> {
        let vnode = self.vnode;
        let source = self.inputs.get(port as usize).cloned();
        let labels = match source {
            Some(Source::Features) => false,
            Some(Source::Labels) => true,
            _ => return Err(FeedError::NotData { vnode, port }),
        };
        let samples = self.samples(mb, phase, batch)?;
        let set = match phase {
            Phase::Train => &self.data.train,
            Phase::Eval | Phase::Infer => &self.data.test,
        };
        // The plan and the range only name samples of their set; a miss would be a bug here,
        // reported rather than a panic.
        let missing = || FeedError::NotData { vnode, port };
        Ok(if labels {
            HostTensor::i32(vec![samples.len()], set.labels_of(&samples).ok_or_else(missing)?)
        } else {
            HostTensor::u8(vec![samples.len(), set.features()], set.pixels_of(&samples).ok_or_else(missing)?)
        })
    }

    /// Sample indices of `batch` in the phase's set; training batches must be their micro-batch.
    fn samples(&mut self, mb: u64, phase: Phase, batch: u64) -> Result<Vec<usize>, FeedError> {
        let vnode = self.vnode;
        match phase {
            Phase::Train => {
                if batch != mb {
                    return Err(FeedError::WrongStep { vnode, mb, batch });
                }
                if self.data.train.is_empty() {
                    return Err(FeedError::NoTrainingData { vnode });
                }
                Ok(self.plan.shard_indices(batch, self.pipeline))
            }
            Phase::Infer => Err(FeedError::Inference { vnode }),
            Phase::Eval => {
                let samples = self.data.test.len();
                let size = self.eval_batch;
                let range =
                    eval_range(batch, size, samples).ok_or(FeedError::BeyondTestSet { vnode, batch, samples, size })?;
                Ok(range.collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcnr_model::dataset::ImageSet;

    /// 10 training and 5 test samples of 2 pixels; pixel values name their sample.
    fn data() -> Arc<Splits> {
        let set = |n: u8, base: u8| ImageSet {
            rows: 1,
            cols: 2,
            images: (0..n).flat_map(|i| [base + i, base + i]).collect(),
            labels: (0..n).map(|i| i % 3).collect(),
        };
        Arc::new(Splits { train: set(10, 0), test: set(5, 100), classes: 3 })
    }

    fn graph() -> dcnr_model::ValidGraph {
        let toml = r#"
[model]
name = "t"
seed = 1
[data]
dataset = "x"
feature_size = 2
classes = 3
[training]
batch_size = 3
eval_batch_size = 2
steps = 1
[optimizer]
kind = "sgd"
lr = 0.1
[[node]]
id = "fc"
kind = "linear"
inputs = 2
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
        dcnr_model::ModelGraph::parse_valid(toml).unwrap()
    }

    #[test]
    fn eval_ranges_cover_the_test_set_once() {
        assert_eq!(eval_range(0, 4, 10), Some(0..4));
        assert_eq!(eval_range(2, 4, 10), Some(8..10));
        assert_eq!(eval_range(3, 4, 10), None);
        assert_eq!(eval_range(u64::MAX, 4, 10), None);
        assert_eq!(eval_range(0, 4, 0), None);
    }

    #[test]
    fn feeds_the_plans_samples_as_pixels_and_labels() {
        let g = graph();
        let (fc, loss) = (&g.nodes[0], &g.nodes[1]);
        let mut x = Feeder::new(fc, data(), 3, 2, 7).unwrap();
        let mut y = Feeder::new(loss, data(), 3, 2, 7).unwrap();
        let mut plan = BatchPlan::new(10, 3, 7);
        for step in [0u64, 3, 4, 9] {
            let idx = plan.indices(step);
            let want_x: Vec<u8> = idx.iter().flat_map(|&i| [i as u8, i as u8]).collect();
            let want_y: Vec<i32> = idx.iter().map(|&i| (i % 3) as i32).collect();
            assert_eq!(x.input(step, Phase::Train, 0, step), Ok(HostTensor::u8(vec![idx.len(), 2], want_x)));
            assert_eq!(y.input(step, Phase::Train, 1, step), Ok(HostTensor::i32(vec![idx.len()], want_y)));
        }
        // Evaluation batch 2 of size 2 over 5 test samples is sample 4 alone.
        assert_eq!(x.input(40, Phase::Eval, 0, 2), Ok(HostTensor::u8(vec![1, 2], vec![104, 104])));
        assert_eq!(y.input(40, Phase::Eval, 1, 0), Ok(HostTensor::i32(vec![2], vec![0, 1])));
        let Ok(Inbound::Forward { mb: 5, phase: Phase::Train, port: 0, tensor }) = x.inbound(5, Phase::Train, 0, 5)
        else {
            panic!("not a forward")
        };
        assert_eq!(tensor.shape[1], 2);
    }

    #[test]
    fn refuses_what_it_cannot_feed() {
        let g = graph();
        let mut loss = Feeder::new(&g.nodes[1], data(), 3, 2, 7).unwrap();
        assert_eq!(loss.input(0, Phase::Train, 0, 0), Err(FeedError::NotData { vnode: 1, port: 0 }));
        assert_eq!(loss.input(0, Phase::Train, 9, 0), Err(FeedError::NotData { vnode: 1, port: 9 }));
        assert_eq!(loss.input(4, Phase::Train, 1, 5), Err(FeedError::WrongStep { vnode: 1, mb: 4, batch: 5 }));
        assert_eq!(
            loss.input(0, Phase::Eval, 1, 3),
            Err(FeedError::BeyondTestSet { vnode: 1, batch: 3, samples: 5, size: 2 })
        );
        assert!(loss.input(0, Phase::Eval, 1, u64::MAX).is_err());
        let msg = loss.input(0, Phase::Eval, 1, 3).unwrap_err().to_string();
        assert!(msg.contains("beyond the 5 test samples"), "{msg}");
        // Inference inputs come with the request: the dataset never feeds them.
        assert_eq!(loss.input(0, Phase::Infer, 1, 0), Err(FeedError::Inference { vnode: 1 }));
        let empty = Arc::new(Splits {
            train: ImageSet { rows: 1, cols: 2, images: vec![], labels: vec![] },
            ..(*data()).clone()
        });
        let mut none = Feeder::new(&g.nodes[1], empty, 3, 2, 7).unwrap();
        assert_eq!(none.input(0, Phase::Train, 1, 0), Err(FeedError::NoTrainingData { vnode: 1 }));
    }

    #[test]
    fn a_vnode_fed_by_vnodes_only_has_no_feeder() {
        let mut g = graph();
        g.nodes[1].inputs = vec![Source::Node(0), Source::Node(0)];
        assert!(Feeder::new(&g.nodes[1], data(), 3, 2, 7).is_none());
    }

    #[test]
    fn epochs_are_permutations_and_reproducible() {
        let mut p = BatchPlan::new(10, 3, 5);
        assert_eq!(p.steps_per_epoch(), 4);
        let mut seen: Vec<usize> = (0..4).flat_map(|s| p.indices(s)).collect();
        assert_eq!(p.indices(3).len(), 1);
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let mut q = BatchPlan::new(10, 3, 5);
        assert_eq!(q.indices(5), p.indices(5));
        assert_ne!(
            (0..4).flat_map(|s| q.indices(s)).collect::<Vec<_>>(),
            (4..8).flat_map(|s| q.indices(s)).collect::<Vec<_>>()
        );
    }
}
