//! Which samples make up each training step: a deterministic function of the root seed.

use crate::seed::{Purpose, stream};
use rand::seq::SliceRandom;

/// The sample order of a job: epoch `e` visits the training set in the permutation drawn from
/// stream (root, shuffle, e); step `s` takes the next `batch` samples (the last batch of an epoch
/// may be smaller).
#[derive(Debug, Clone)]
pub struct BatchPlan {
    samples: usize,
    batch: usize,
    root_seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl BatchPlan {
    /// A plan over `samples` samples in batches of `batch` (both >= 1).
    pub fn new(samples: usize, batch: usize, root_seed: u64) -> BatchPlan {
        BatchPlan { samples, batch: batch.max(1), root_seed, cached: None }
    }

    /// Steps in one epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.samples.div_ceil(self.batch) as u64
    }

    /// The epoch a step belongs to.
    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch().max(1)
    }

    /// Sample indices of `step`.
    pub fn indices(&mut self, step: u64) -> Vec<usize> {
        let spe = self.steps_per_epoch().max(1);
        let (epoch, within) = (step / spe, (step % spe) as usize);
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

#[cfg(test)]
mod tests {
    use super::*;

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
