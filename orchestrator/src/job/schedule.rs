//! The feed window and the drained points: how far the job may feed micro-batches now, and what
//! it does once every fed micro-batch has completed (a snapshot, an evaluation, an answer to the
//! parent job, or nothing). Pure: it reads a [`Position`] and returns numbers and decisions.

use std::time::Duration;

/// Micro-batches of data sent ahead of the in-flight window (as far as VNodes accept them).
pub const PREFETCH: u64 = dcnr_vnode::FEED_AHEAD;

/// Where a job stands, as the schedule needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Steps completed by every VNode.
    pub completed: u64,
    /// Micro-batches fed so far.
    pub fed: u64,
    /// Steps the job runs in all.
    pub steps: u64,
    /// Steps of one epoch.
    pub steps_per_epoch: u64,
    /// Test-set evaluations done (one per finished epoch).
    pub epochs_evaluated: u64,
    /// Micro-batches in flight.
    pub in_flight: u64,
    /// The checkpoint policy, when the job has a store to write checkpoints to.
    pub checkpoints: Option<CheckpointPolicy>,
    /// Step of the last persisted checkpoint (or the one resumed from).
    pub last_checkpoint: Option<u64>,
    /// Time since the last persisted checkpoint.
    pub since_checkpoint: Duration,
    /// Steps per verified segment (verified jobs only).
    pub segment_steps: Option<u64>,
    /// Step of the latest in-memory snapshot.
    pub recovery_step: u64,
    /// Too many segments await their replicas: stand at the next taken boundary.
    pub replicas_backlogged: bool,
    /// A PNode of the job is leaving, or a timed recovery snapshot is due.
    pub snapshot_wanted: bool,
    /// The job is a replica (it evaluates nothing and answers its parent at the end).
    pub replica: bool,
}

/// When persisted checkpoints are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Every this many steps.
    pub every_steps: Option<u64>,
    /// At the first drained point this long after the last one.
    pub every: Option<Duration>,
}

/// What to do at a drained point (every fed micro-batch completed, nothing more may be fed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Not drained yet, or standing still: wait for reports.
    Wait,
    /// Take a snapshot of every VNode (`persist`: also write it to the store as a checkpoint).
    Snapshot {
        /// Write it to the store.
        persist: bool,
    },
    /// A replica finished its steps: answer the parent.
    AnswerParent,
    /// An epoch ended: evaluate on the test set.
    Evaluate,
    /// An epoch ended on a replica: count it without evaluating, then go on.
    SkipEvaluation,
    /// A drained point for a snapshot only: go on feeding.
    Continue,
}

impl Position {
    /// Whether the job stands at a segment boundary until its replicas catch up.
    pub fn waiting_for_replicas(&self) -> bool {
        self.replicas_backlogged && self.completed == self.recovery_step
    }

    /// The highest micro-batch index (exclusive) that may be fed before the next drained point.
    pub fn limit(&self) -> u64 {
        let spe = self.steps_per_epoch;
        let mut limit = self.steps.min((self.epochs_evaluated + 1).saturating_mul(spe));
        if let Some(c) = &self.checkpoints {
            if let Some(n) = c.every_steps.filter(|n| *n > 0) {
                // Stop at the boundary just reached until its snapshot is taken.
                let boundary = self.completed / n * n;
                let taken = boundary == 0 || self.last_checkpoint.is_some_and(|l| l >= boundary);
                limit = limit.min(if taken { boundary + n } else { boundary });
            }
            if c.every.is_some_and(|e| self.since_checkpoint >= e) && self.last_checkpoint != Some(self.completed) {
                // Feed nothing more until the pipeline has drained for the snapshot.
                limit = limit.min(self.fed);
            }
        }
        if let Some(n) = self.segment_steps.filter(|n| *n > 0) {
            // Stop at each segment boundary until its snapshot is taken, and at a taken one
            // while too many segments await their replicas.
            let boundary = self.completed / n * n;
            let taken = self.recovery_step >= boundary;
            limit = limit.min(if taken { boundary + n } else { boundary });
            if self.waiting_for_replicas() {
                limit = limit.min(self.completed);
            }
        }
        // A leaving PNode or a due recovery snapshot needs a drained pipeline first.
        if self.snapshot_wanted {
            limit = limit.min(self.fed);
        }
        limit
    }

    /// Micro-batches `fed..feed_to()` may be sent now. Data may arrive up to [`PREFETCH`] steps
    /// early: VNodes hold it until the update order lets them run, so feeding never sits on a
    /// step's critical path.
    pub fn feed_to(&self) -> u64 {
        self.limit().min(self.completed + self.in_flight + PREFETCH).max(self.fed)
    }

    /// Whether the drained point `step` is where a persisted checkpoint is due.
    pub fn checkpoint_due(&self, step: u64) -> bool {
        let Some(c) = &self.checkpoints else { return false };
        if self.last_checkpoint == Some(step) || step == 0 {
            return false;
        }
        let by_steps = c.every_steps.is_some_and(|n| n > 0 && step.is_multiple_of(n));
        let by_time = c.every.is_some_and(|e| self.since_checkpoint >= e);
        by_steps || by_time || step == self.steps
    }

    /// What to do now that feeding has gone as far as it may.
    pub fn next(&self) -> Next {
        if self.completed < self.limit() {
            return Next::Wait;
        }
        if self.checkpoint_due(self.completed) {
            return Next::Snapshot { persist: true };
        }
        if self.snapshot_wanted {
            return Next::Snapshot { persist: false };
        }
        if self.replica && self.completed >= self.steps {
            return Next::AnswerParent;
        }
        if self.segment_steps.is_some() && self.waiting_for_replicas() {
            return Next::Wait;
        }
        let epoch_end = self.completed.is_multiple_of(self.steps_per_epoch.max(1)) || self.completed >= self.steps;
        match (epoch_end, self.replica) {
            (false, _) => Next::Continue,
            (true, true) => Next::SkipEvaluation,
            (true, false) => Next::Evaluate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(completed: u64, fed: u64) -> Position {
        Position {
            completed,
            fed,
            steps: 100,
            steps_per_epoch: 40,
            epochs_evaluated: completed / 40,
            in_flight: 4,
            checkpoints: None,
            last_checkpoint: None,
            since_checkpoint: Duration::ZERO,
            segment_steps: None,
            recovery_step: 0,
            replicas_backlogged: false,
            snapshot_wanted: false,
            replica: false,
        }
    }

    #[test]
    fn feeds_in_flight_plus_prefetch_up_to_the_epoch_end() {
        assert_eq!(at(0, 0).feed_to(), (4 + PREFETCH).min(40));
        assert_eq!(at(10, 14).feed_to(), (10 + 4 + PREFETCH).min(40));
        assert_eq!(at(37, 39).feed_to(), 40);
        assert_eq!(at(37, 39).next(), Next::Wait);
        assert_eq!(at(40, 40).limit(), 80);
    }

    #[test]
    fn an_epoch_end_evaluates_and_the_last_step_too() {
        let mut p = at(40, 40);
        p.epochs_evaluated = 0;
        assert_eq!(p.next(), Next::Evaluate);
        p.replica = true;
        assert_eq!(p.next(), Next::SkipEvaluation);
        let mut last = at(100, 100);
        last.epochs_evaluated = 2;
        assert_eq!(last.next(), Next::Evaluate);
        last.replica = true;
        assert_eq!(last.next(), Next::AnswerParent);
    }

    #[test]
    fn checkpoints_stop_feeding_at_their_boundary_until_taken() {
        let mut p = at(20, 25);
        p.checkpoints = Some(CheckpointPolicy { every_steps: Some(25), every: None });
        assert_eq!(p.limit(), 25);
        p.completed = 25;
        assert_eq!(p.limit(), 25);
        assert_eq!(p.next(), Next::Snapshot { persist: true });
        p.last_checkpoint = Some(25);
        assert_eq!(p.limit(), 40);
        assert_eq!(p.next(), Next::Wait);
    }

    #[test]
    fn a_timed_checkpoint_drains_the_pipeline_first() {
        let mut p = at(12, 16);
        p.checkpoints = Some(CheckpointPolicy { every_steps: None, every: Some(Duration::from_secs(5)) });
        p.since_checkpoint = Duration::from_secs(6);
        assert_eq!(p.limit(), 16);
        assert_eq!(p.next(), Next::Wait);
        p.completed = 16;
        assert_eq!(p.next(), Next::Snapshot { persist: true });
    }

    #[test]
    fn segments_stop_at_boundaries_and_wait_for_a_backlog() {
        let mut p = at(10, 10);
        p.segment_steps = Some(10);
        // The core wants the segment's snapshot here (see `JobCore::snapshot_wanted`).
        p.snapshot_wanted = true;
        assert_eq!(p.next(), Next::Snapshot { persist: false });
        p.snapshot_wanted = false;
        p.recovery_step = 10;
        assert_eq!(p.limit(), 20);
        p.replicas_backlogged = true;
        assert!(p.waiting_for_replicas());
        assert_eq!(p.limit(), 10);
        assert_eq!(p.next(), Next::Wait);
    }

    #[test]
    fn a_wanted_snapshot_drains_then_snapshots() {
        let mut p = at(7, 9);
        p.snapshot_wanted = true;
        assert_eq!(p.feed_to(), 9);
        assert_eq!(p.next(), Next::Wait);
        p.completed = 9;
        assert_eq!(p.next(), Next::Snapshot { persist: false });
    }
}
