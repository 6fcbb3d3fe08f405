//! Redundant execution. A job with a verify policy is cut into segments between snapshots
//! (every `policy.segment_steps` steps). A segment drawn for checking (every segment a stranger
//! ran under `full`, a seeded fraction otherwise) is executed again by replica jobs on PNodes the
//! job did not use for it, from the same starting state, and the executions are compared by
//! hash: every VNode's output at every step and every VNode's end state. Honest executions agree
//! bit for bit (docs/DETERMINISM.md).
//!
//! The job does not wait for its replicas: it trains on, and when its own execution loses the
//! vote it rolls back to the segment's start (state built only from accepted or unchecked
//! segments) and goes on without the PNode to blame. A dissenting execution names one culprit:
//! the PNode of the first VNode, in causal order, whose output departs from the accepted
//! execution (everything it consumed agreed). Two executions that disagree with no quorum get an
//! arbiter: another replica placed away from both suspects.

use super::core::{Effect, JobCore, States, StatesFor};
use super::{JobKind, JobSpec, ReplicaOf};
use crate::checkpoints::ResumeFrom;
use crate::events::{NewEvent, Severity};
use crate::registry::PNodeView;
use crate::trust::Standing;
use crate::verify::{
    self, Departure, ExecutionDigest, Mismatch, Quorum, QuorumRule, SegmentVerdict, Settings, Spotcheck, Wiring,
};
use dcnr_model::envelope::Verify;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Segments awaiting their replicas before the job stops at the next boundary.
const MAX_PENDING: usize = 4;

/// How long a replica waits for PNodes it may use before its segment goes unchecked.
const REPLICA_PLACEMENT_TIMEOUT: Duration = Duration::from_secs(10);

impl Share {
    /// The share of a job's own execution under `settings`, and that of each of its replicas.
    fn for_policy(settings: &Settings) -> (Share, Share) {
        match settings.mode {
            Verify::None => (Share::All, Share::All),
            Verify::Spotcheck => (Share::AllButOne, Share::All),
            Verify::Full => (Share::OneIn(settings.quorum.n), Share::OneIn(settings.quorum.n)),
        }
    }
}

/// A replica's answer: what it computed, or why it could not.
#[derive(Debug)]
pub struct ReplicaDone {
    /// The job it answers.
    pub parent: String,
    /// The replica job's own id.
    pub replica: String,
    /// The segment.
    pub segment: u64,
    /// The replica's label.
    pub label: String,
    /// Its execution, or why there is none.
    pub result: Result<ExecutionDigest, String>,
    /// What its own checks found (results refused, identities quarantined).
    pub found: verify::VerificationRecord,
}

/// How many of the suitable PNodes one execution may take, so that replicas find PNodes the
/// job's own execution does not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// All of them.
    All,
    /// One in `n` (n executions side by side), at least one.
    OneIn(usize),
    /// All but one, when there are two or more.
    AllButOne,
}

impl Share {
    /// PNodes one execution may take of `suitable`.
    pub fn of(self, suitable: usize) -> usize {
        match self {
            Share::All => suitable.max(1),
            Share::OneIn(n) => (suitable / n.max(1)).max(1),
            Share::AllButOne => suitable.saturating_sub(1).max(1),
        }
    }
}

/// One segment being checked.
struct Segment {
    /// State at its start (`None`: the job's initial state).
    start: Option<ResumeFrom>,
    start_step: u64,
    end: u64,
    rule: QuorumRule,
    /// The job's execution first, then each replica's, in the order they answered.
    digests: Vec<ExecutionDigest>,
    /// Replicas started so far.
    started: usize,
    /// PNodes at the point where executions first disagree; arbiters avoid them.
    suspects: BTreeSet<String>,
    /// The job id of the replica running now (one at a time per segment).
    running: Option<String>,
}

/// A job's redundant-execution bookkeeping.
pub struct Replication {
    settings: Settings,
    sampler: Spotcheck,
    segment_steps: Option<u64>,
    /// How many PNodes this execution may take.
    share: Share,
    /// How many each of its replicas may take.
    replica_share: Share,
    /// Every PNode the job has been placed on, as of its placement (standing, class).
    pub(super) placed: BTreeMap<String, PNodeView>,
    segments: BTreeMap<u64, Segment>,
    next_id: u64,
    /// Per PNode, the start of the earliest unchecked segment of this job it took part in: a
    /// PNode caught cheating later may have cheated there too, so the job goes back that far.
    taint: BTreeMap<String, (u64, Option<ResumeFrom>)>,
}

/// Where a rollback goes: a step and the snapshot at it (`None`: the job's initial state).
pub(super) type RollbackTo = (u64, Option<ResumeFrom>);

impl Replication {
    /// Bookkeeping for `spec` (replicas and unverified jobs keep none).
    pub(super) fn new(spec: &JobSpec) -> Replication {
        let policy = &spec.envelope.policy;
        let settings = Settings::from_policy(policy);
        let verified = matches!(spec.kind, JobKind::Primary) && settings.mode != Verify::None;
        let (own, replica_share) = Share::for_policy(&settings);
        let share = match &spec.kind {
            JobKind::Primary => own,
            JobKind::Replica(of) => of.share,
        };
        Replication {
            settings,
            share,
            replica_share,
            sampler: Spotcheck::new(spec.root_seed),
            segment_steps: verified.then(|| policy.segment_steps()),
            placed: BTreeMap::new(),
            segments: BTreeMap::new(),
            next_id: 0,
            taint: BTreeMap::new(),
        }
    }

    /// Steps per segment, for a job whose segments are checked.
    pub(super) fn segment_steps(&self) -> Option<u64> {
        self.segment_steps
    }

    /// How many PNodes the job's own execution may take.
    pub(super) fn share(&self) -> Share {
        self.share
    }

    /// Whether enough segments await replicas that the job should wait for them.
    pub(super) fn backlogged(&self) -> bool {
        self.segments.len() >= MAX_PENDING
    }

    /// Whether some segment still awaits its replicas.
    pub(super) fn pending(&self) -> usize {
        self.segments.len()
    }

    /// Whether some segment ending at or before `step` still awaits its verdict.
    pub(super) fn unsettled_through(&self, step: u64) -> bool {
        self.segments.values().any(|s| s.end <= step)
    }

    /// Drops the segments a rollback to `step` discards (they will be executed again);
    /// answers the replicas to cancel.
    pub(super) fn forget_after(&mut self, step: u64) -> Vec<String> {
        let cancel = self.segments.values().filter(|s| s.end > step).filter_map(|s| s.running.clone()).collect();
        self.segments.retain(|_, s| s.end <= step);
        self.taint.retain(|_, t| t.0 < step);
        cancel
    }

    /// Forgets every segment (the job has ended); answers the replicas to cancel.
    pub(super) fn cancel_all(&mut self) -> Vec<String> {
        std::mem::take(&mut self.segments).into_values().filter_map(|s| s.running).collect()
    }

    /// Remembers that the PNodes of `job` (an execution starting from `start`) ran unchecked.
    fn taint(&mut self, job: &ExecutionDigest, start: &Option<ResumeFrom>) {
        for p in job.pnodes() {
            self.taint.entry(p).or_insert_with(|| (job.start, start.clone()));
        }
    }

    /// The earliest of `base` and the unchecked work of `culprits`: where the job must go back
    /// to so that nothing they computed remains.
    pub(super) fn rollback_for(&self, culprits: &[String], base: Option<RollbackTo>) -> Option<RollbackTo> {
        let mut target = base;
        for c in culprits {
            if let Some(t) = self.taint.get(c)
                && target.as_ref().is_none_or(|x| t.0 < x.0)
            {
                target = Some(t.clone());
            }
        }
        target
    }
}

impl JobCore {
    /// What this execution computed in steps `start..end`, ending in `states`.
    fn digest(&self, label: &str, start: u64, end: u64, states: &BTreeMap<u32, Vec<u8>>) -> ExecutionDigest {
        let a = start.saturating_sub(self.first_step) as usize;
        let b = end.saturating_sub(self.first_step) as usize;
        ExecutionDigest {
            label: label.to_string(),
            job_id: self.spec.job_id.clone(),
            start,
            inputs: self.step_inputs.range((start, 0)..(end, 0)).map(|(k, v)| (*k, v.clone())).collect(),
            outputs: self
                .executions
                .iter()
                .map(|(v, e)| (*v, e.output_sha256.get(a..b).map(<[String]>::to_vec).unwrap_or_default()))
                .collect(),
            states: states.iter().map(|(v, bytes)| (*v, Sha256::digest(bytes).into())).collect(),
            ran_on: self
                .executions
                .iter()
                .map(|(v, e)| (*v, verify::placements_within(&e.placements, start, end)))
                .collect(),
        }
    }

    /// A snapshot was taken: the steps since `previous` form a segment, checked if drawn.
    pub(super) fn close_segment(&mut self, previous: Option<ResumeFrom>) {
        if self.replication.segment_steps.is_none() {
            return;
        }
        let Some(end) = self.rollback_point.as_ref() else { return };
        let start_step = previous.as_ref().map_or(self.first_step, |p| p.step);
        if end.step <= start_step {
            return;
        }
        let job = self.digest("job", start_step, end.step, &end.states);
        let end_step = end.step;
        // What the segment consumed is in its digest now; nothing earlier is compared again.
        self.step_inputs = self.step_inputs.split_off(&(end_step, 0));
        let standings: Vec<Standing> =
            job.pnodes().iter().map(|p| self.replication.placed.get(p).map_or(Standing::New, |v| v.standing)).collect();
        let r = &mut self.replication;
        let replicas = r.settings.segment_replicas(&standings, &r.sampler, start_step);
        if replicas == 0 {
            self.verification.segments_unchecked += 1;
            self.replication.taint(&job, &previous);
            return;
        }
        let id = r.next_id;
        r.next_id += 1;
        let rule = r.settings.segment_quorum(replicas);
        r.segments.insert(
            id,
            Segment {
                start: previous,
                start_step,
                end: end_step,
                rule,
                digests: vec![job],
                started: 0,
                suspects: BTreeSet::new(),
                running: None,
            },
        );
        self.start_replica(id);
    }

    /// Starts the next replica of segment `id`: away from every PNode of the executions so far
    /// while the first `n` run, away from the suspects when it arbitrates.
    fn start_replica(&mut self, id: u64) {
        let remaining = (self.started() + self.spec.timeout).saturating_sub(self.now());
        let Some(seg) = self.replication.segments.get_mut(&id) else { return };
        seg.started += 1;
        let arbiter = seg.digests.len() >= seg.rule.n;
        let exclude: BTreeSet<String> =
            if arbiter { seg.suspects.clone() } else { seg.digests.iter().flat_map(|d| d.pnodes()).collect() };
        let label = format!("replica {}", seg.started);
        let classes: BTreeSet<String> = seg.digests[0]
            .pnodes()
            .iter()
            .filter_map(|p| self.replication.placed.get(p))
            .map(|v| v.caps.class_for(self.spec.envelope.policy.target).to_string())
            .collect();
        // A job spread over several classes has no single class to match; its replicas go anywhere.
        let class = if classes.len() == 1 { classes.into_iter().next() } else { None };
        let mut spec = self.spec.clone();
        // The segment id keeps ids unique when a rolled-back range is checked again while an
        // older replica of it still runs.
        spec.job_id = format!("{}~{}-{}s{}r{}", self.spec.job_id, seg.start_step, seg.end, id, seg.started);
        spec.steps = seg.end;
        spec.resume = seg.start.clone();
        spec.persist = false;
        spec.recovery_every = Duration::ZERO;
        spec.min_pnodes = 1;
        spec.placement_timeout = REPLICA_PLACEMENT_TIMEOUT;
        spec.timeout = remaining;
        spec.kind = JobKind::Replica(ReplicaOf {
            parent: self.spec.job_id.clone(),
            segment: id,
            label: label.clone(),
            exclude: exclude.clone(),
            share: self.replication.replica_share,
            class,
        });
        seg.running = Some(spec.job_id.clone());
        let (start_step, end) = (seg.start_step, seg.end);
        if arbiter {
            self.verification.arbiters += 1;
        }
        let text = format!(
            "{} steps {}..{} on other pnodes{}",
            if arbiter { "arbiter re-executes" } else { "replica re-executes" },
            start_step,
            end,
            if exclude.is_empty() { String::new() } else { format!(" (not {})", join(&exclude)) }
        );
        self.log(text);
        self.emit(Effect::StartReplica(Box::new(spec)));
    }

    /// A replica answered.
    pub(super) fn replica_done(&mut self, msg: ReplicaDone) {
        let found = msg.found;
        self.verification.results_checked += found.results_checked;
        self.verification.invalid_results.extend(found.invalid_results.iter().cloned());
        self.verification.quarantines.extend(found.quarantines);
        // A PNode a replica caught may have cheated in this job's unchecked segments as well.
        let caught: Vec<String> = found.invalid_results.into_iter().map(|r| r.pnode).collect();
        if let Some(to) = self.replication.rollback_for(&caught, None) {
            self.roll_back(Some(to), format!("verification: a replica caught {}", caught.join(", ")), caught);
        }
        let Some(seg) = self.replication.segments.get_mut(&msg.segment) else {
            // Its segment was rolled back meanwhile.
            return;
        };
        seg.running = None;
        match msg.result {
            Ok(d) => {
                seg.digests.push(d);
                self.judge(msg.segment);
            }
            Err(why) => {
                let (a, b, arbitrating) = (seg.start_step, seg.end, seg.digests.len() >= seg.rule.n);
                self.log(format!("{} of steps {a}..{b} did not finish: {why}", msg.label));
                if arbitrating {
                    // An arbiter failed: the dispute stands.
                    return self.unresolved(msg.segment);
                }
                // Unchecked after all: remembered like a segment the draw passed over.
                if let Some(seg) = self.replication.segments.get(&msg.segment) {
                    let (job, start) = (seg.digests[0].clone(), seg.start.clone());
                    self.replication.taint(&job, &start);
                }
                self.settle(msg.segment, Verdict::NotRun);
                self.collect_if_verified();
            }
        }
    }

    /// Counts the votes of segment `id` and acts on the verdict.
    fn judge(&mut self, id: u64) {
        let Some(seg) = self.replication.segments.get_mut(&id) else { return };
        let votes: Vec<(String, [u8; 32])> = seg.digests.iter().map(|d| (d.label.clone(), d.fingerprint())).collect();
        match verify::evaluate(&seg.rule, &votes) {
            Quorum::Pending { .. } => self.start_replica(id),
            Quorum::NeedArbiter { .. } => {
                let wiring = Wiring::of(&self.spec.graph);
                let first = &seg.digests[0];
                for other in &seg.digests[1..] {
                    if let Some(d) = verify::first_divergence(first, other, &wiring) {
                        seg.suspects.extend(first.pnode_at(d.vnode, d.step).map(str::to_string));
                        seg.suspects.extend(other.pnode_at(d.vnode, d.step).map(str::to_string));
                    }
                }
                self.start_replica(id);
            }
            Quorum::Accepted { hash, agree, dissent } => self.accepted(id, hash, &agree, &dissent),
            Quorum::Unresolved { .. } => self.unresolved(id),
        }
    }

    /// A quorum agreed: the dissenters' culprits are struck, the agreeing PNodes earn trust, and
    /// the job rolls back if its own execution dissented.
    fn accepted(&mut self, id: u64, hash: [u8; 32], agree: &[String], dissent: &[String]) {
        let Some(seg) = self.replication.segments.get(&id) else { return };
        let Some(accepted) = seg.digests.iter().find(|d| d.fingerprint() == hash).cloned() else { return };
        let steps = seg.end - seg.start_step;
        self.verification.executions_compared += steps * self.spec.graph.nodes.len() as u64 * seg.digests.len() as u64;
        let mut culprits: Vec<(String, String)> = Vec::new();
        let wiring = Wiring::of(&self.spec.graph);
        for d in seg.digests.iter().filter(|d| dissent.contains(&d.label)) {
            let Some(div) = verify::first_divergence(&accepted, d, &wiring) else { continue };
            let Some(pnode) = d.pnode_at(div.vnode, div.step) else { continue };
            let what = match div.what {
                Departure::Output => "output".to_string(),
                Departure::EndState => "end state".to_string(),
                Departure::Sent { to } => format!("tensor it signed for vnode {to}"),
                Departure::Evidence => "unproven account of its input".to_string(),
            };
            let reason = format!(
                "{} disagreed with the quorum ({}) at vnode {} step {}: {what} {} instead of {}",
                d.label,
                agree.join(", "),
                div.vnode,
                div.step,
                short(&div.got),
                short(&div.expected)
            );
            self.verification.mismatches.push(Mismatch {
                vnode: div.vnode,
                step: div.step,
                pnode: pnode.to_string(),
                expected_sha256: div.expected.clone(),
                got_sha256: div.got.clone(),
                what: div.what.name().to_string(),
            });
            culprits.push((pnode.to_string(), reason));
        }
        let honest: BTreeSet<String> = seg
            .digests
            .iter()
            .filter(|d| agree.contains(&d.label))
            .flat_map(|d| d.pnodes())
            .filter(|p| !culprits.iter().any(|c| &c.0 == p))
            .collect();
        let job_lost = dissent.iter().any(|l| l == "job");
        let base = job_lost.then(|| (seg.start_step, seg.start.clone()));
        for p in honest {
            self.credit(p);
        }
        self.settle(id, if job_lost { Verdict::JobRejected } else { Verdict::Accepted });
        for (pnode, reason) in culprits.iter().cloned() {
            self.emit(Effect::Event(
                NewEvent::new("verification_mismatch", format!("{}: {reason}", self.spec.job_id))
                    .severity(Severity::Warning)
                    .job(&self.spec.job_id)
                    .pnode(&pnode),
            ));
            self.strike(pnode, reason);
        }
        let bad: Vec<String> = culprits.into_iter().map(|c| c.0).collect();
        match self.replication.rollback_for(&bad, base) {
            Some(to) => {
                let why = if job_lost {
                    format!("this job's execution lost the vote; culprit(s) {}", bad.join(", "))
                } else {
                    format!("{} cheated and took part in unchecked steps of this job", bad.join(", "))
                };
                self.roll_back(Some(to), format!("verification: {why}"), bad);
            }
            None => {
                self.excluded.extend(bad);
                self.collect_if_verified();
            }
        }
    }

    /// Every allowed replica answered and none reached a quorum, or an arbiter could not run:
    /// nobody is struck, and the job redoes the segment away from its suspects.
    fn unresolved(&mut self, id: u64) {
        let Some(seg) = self.replication.segments.get(&id) else { return };
        let job = &seg.digests[0];
        let bad: Vec<String> = seg.suspects.iter().filter(|p| job.pnodes().contains(*p)).cloned().collect();
        let to = (seg.start_step, seg.start.clone());
        let (a, b) = (seg.start_step, seg.end);
        self.settle(id, Verdict::Unresolved);
        self.roll_back(Some(to), format!("verification: steps {a}..{b} reached no quorum; redoing them"), bad);
    }

    /// Records segment `id`'s verdict and forgets it.
    fn settle(&mut self, id: u64, verdict: Verdict) {
        let Some(seg) = self.replication.segments.remove(&id) else { return };
        if verdict == Verdict::NotRun {
            self.verification.segments_unchecked += 1;
        } else {
            self.verification.segments_checked += 1;
        }
        self.verification.segments.push(SegmentVerdict {
            start: seg.start_step,
            end: seg.end,
            executions: seg
                .digests
                .iter()
                .map(|d| (d.label.clone(), d.pnodes().into_iter().collect(), hex::encode(d.fingerprint())))
                .collect(),
            verdict: verdict.name().to_string(),
        });
        if !matches!(verdict, Verdict::JobRejected | Verdict::Unresolved) {
            self.log(format!(
                "steps {}..{}: {} ({} executions)",
                seg.start_step,
                seg.end,
                verdict.name(),
                seg.digests.len()
            ));
        }
    }

    /// A replica reached its last step: it fetches its states to answer its parent.
    pub(super) fn answer_parent(&mut self) {
        self.fetch_states(StatesFor::AnswerParent);
    }

    /// A replica sends its parent what it computed, then ends.
    pub(super) fn answer_parent_with(&mut self, states: States) {
        let states: BTreeMap<u32, Vec<u8>> = states.into_iter().collect();
        let label = match &self.spec.kind {
            JobKind::Replica(of) => of.label.clone(),
            JobKind::Primary => return,
        };
        let digest = self.digest(&label, self.first_step, self.completed, &states);
        self.tell_parent(Ok(digest));
        self.finish(None);
    }

    /// A replica's answer to its job, with what its own checks found; nothing for a job.
    pub(super) fn tell_parent(&mut self, result: Result<ExecutionDigest, String>) {
        if let JobKind::Replica(of) = &self.spec.kind {
            let found = self.verification.clone();
            let done = ReplicaDone {
                parent: of.parent.clone(),
                replica: self.spec.job_id.clone(),
                segment: of.segment,
                label: of.label.clone(),
                result,
                found,
            };
            self.emit(Effect::AnswerParent(done));
        }
    }

    /// The final parameters of a verified job: from its last snapshot, whose every segment was
    /// accepted, rather than asked again of PNodes that could answer anything.
    pub(super) fn verified_params(&self) -> Option<Result<Vec<Vec<Vec<f32>>>, String>> {
        self.replication.segment_steps?;
        let last = self.rollback_point.as_ref().filter(|r| r.step == self.completed)?;
        Some(
            last.states
                .iter()
                .map(|(v, bytes)| params_of_state(bytes).map_err(|e| format!("vnode {v}: {e}")))
                .collect(),
        )
    }
}

/// What became of a checked segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A quorum agreed with the job's execution (or with a replica's, the job keeping its own).
    Accepted,
    /// The job's own execution lost the vote: the job goes back to the segment's start.
    JobRejected,
    /// No quorum: the segment is redone away from its suspects.
    Unresolved,
    /// No replica could run: the segment counts as unchecked.
    NotRun,
}

impl Verdict {
    /// The name `verification.json` records.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::JobRejected => "job_rejected",
            Verdict::Unresolved => "unresolved",
            Verdict::NotRun => "not_run",
        }
    }
}

/// The parameters in a VNode's state bytes: each parameter at its newest version.
fn params_of_state(bytes: &[u8]) -> Result<Vec<Vec<f32>>, dcnr_vnode::checkpoint::StateError> {
    use dcnr_vnode::checkpoint::{TensorRole, decode};
    let (header, data) = decode(bytes)?;
    let mut newest: BTreeMap<usize, (u64, Vec<f32>)> = BTreeMap::new();
    for (entry, values) in header.tensors.iter().zip(data) {
        if entry.role != TensorRole::Param {
            continue;
        }
        let version = entry.version.unwrap_or(0);
        if newest.get(&entry.index).is_none_or(|(v, _)| *v <= version) {
            newest.insert(entry.index, (version, values));
        }
    }
    Ok(newest.into_values().map(|(_, v)| v).collect())
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}
