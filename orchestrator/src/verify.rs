//! Verification decisions, as plain functions (no IO): which (VNode, step) executions are
//! re-executed under `spotcheck`, how many replicas an execution needs under `full`, how a
//! quorum of output hashes is judged, and the per-job verification record (`verification.json`).
//!
//! Honest replicas in one determinism class agree bit for bit (docs/DETERMINISM.md), so results
//! are compared by SHA-256 of their canonical bytes, never by tolerance.

use crate::trust::Standing;
use dcnr_model::envelope::{Policy, Verify};
use dcnr_model::graph::{Source, ValidGraph};
use dcnr_proto::seal::{self, Route};
use dcnr_proto::{identity, v1};
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Fraction of the usual check rate applied to reliable and trusted identities.
pub const EARNED_FACTOR: f64 = 0.25;

/// k of n: accept a result when at least `k` distinct replicas agree and no other result has as
/// many; ask for arbiter replicas (up to `max_replicas` in all) when the first `n` disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumRule {
    /// Agreeing replicas needed.
    pub k: usize,
    /// Replicas started at first.
    pub n: usize,
    /// Most replicas, arbiters included.
    pub max_replicas: usize,
}

impl QuorumRule {
    /// Strict majority of `n` (k = n/2 + 1), with up to two arbiters.
    pub fn majority(n: usize) -> QuorumRule {
        QuorumRule { k: n / 2 + 1, n, max_replicas: n + 2 }
    }

    /// A checked rule: 2 <= n, n/2 < k <= n (two disjoint quorums of the first n are impossible).
    pub fn new(k: usize, n: usize) -> Result<QuorumRule, String> {
        if n < 2 || k * 2 <= n || k > n {
            return Err(format!("quorum {k} of {n} replicas: need n >= 2 and n/2 < k <= n"));
        }
        Ok(QuorumRule { k, n, max_replicas: n + 2 })
    }
}

/// The verification settings of one job, from its envelope's policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// none | spotcheck | full.
    pub mode: Verify,
    /// Spot-check rate for new identities (and for earned ones under `full`).
    pub fraction: f64,
    /// Quorum for `full`.
    pub quorum: QuorumRule,
}

impl Settings {
    /// Settings of a validated policy.
    pub fn from_policy(p: &Policy) -> Settings {
        let n = p.replicas() as usize;
        Settings {
            mode: p.verify,
            fraction: p.spotcheck_fraction(),
            quorum: QuorumRule { k: p.quorum() as usize, n, max_replicas: n + 2 },
        }
    }

    /// Probability that an execution by an identity of `standing` is re-executed elsewhere.
    pub fn check_rate(&self, standing: Standing) -> f64 {
        let earned = matches!(standing, Standing::Reliable | Standing::Trusted);
        match (self.mode, earned) {
            (Verify::None, _) => 0.0,
            (_, _) if standing == Standing::Quarantined => 1.0,
            (Verify::Spotcheck, false) => self.fraction,
            (Verify::Spotcheck, true) => self.fraction * EARNED_FACTOR,
            // Full replication is for strangers; earned identities are spot-checked.
            (Verify::Full, false) => 1.0,
            (Verify::Full, true) => self.fraction,
        }
    }

    /// Replicas an execution by an identity of `standing` starts with (1 = no redundancy
    /// beyond spot checks).
    pub fn replicas(&self, standing: Standing) -> usize {
        match (self.mode, standing) {
            (Verify::Full, Standing::New | Standing::Quarantined) => self.quorum.n,
            _ => 1,
        }
    }
}

/// Picks spot-checked executions: a pure function of the job seed, the VNode, the step and
/// the rate, so a replay checks the same executions and a PNode cannot know in advance.
#[derive(Debug, Clone, Copy)]
pub struct Spotcheck {
    root_seed: u64,
}

impl Spotcheck {
    /// The sampler of a job.
    pub fn new(root_seed: u64) -> Spotcheck {
        Spotcheck { root_seed }
    }

    /// A uniform draw in [0, 1) for (vnode, step).
    pub fn draw(&self, vnode: u32, step: u64) -> f64 {
        let mut h = Sha256::new();
        h.update(b"dcnr-spotcheck-v1\0");
        h.update(self.root_seed.to_le_bytes());
        h.update(vnode.to_le_bytes());
        h.update(step.to_le_bytes());
        let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
        (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether execution (vnode, step) is checked at `rate`.
    pub fn selected(&self, vnode: u32, step: u64, rate: f64) -> bool {
        rate > 0.0 && self.draw(vnode, step) < rate
    }
}

/// The verdict on a set of replica hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quorum {
    /// `hash` won; `dissent` are the PNodes whose results are discarded (and downscored).
    Accepted {
        /// The accepted output hash.
        hash: [u8; 32],
        /// PNodes that returned it.
        agree: Vec<String>,
        /// PNodes that returned something else.
        dissent: Vec<String>,
    },
    /// Fewer than `n` replicas have answered.
    Pending {
        /// Answers still expected.
        missing: usize,
    },
    /// The first replicas disagree; start this many more on distinct PNodes.
    NeedArbiter {
        /// Extra replicas to start.
        more: usize,
    },
    /// Every allowed replica answered and none reached a quorum: recompute on trusted PNodes
    /// or fail the step.
    Unresolved {
        /// Distinct results seen, with their PNodes.
        results: Vec<([u8; 32], Vec<String>)>,
    },
}

/// Judges replica votes (pnode, output hash). A PNode counts once (its first vote), so one
/// identity cannot outvote others by answering twice.
pub fn evaluate(rule: &QuorumRule, votes: &[(String, [u8; 32])]) -> Quorum {
    let mut seen = std::collections::BTreeSet::new();
    let mut tally: BTreeMap<[u8; 32], Vec<String>> = BTreeMap::new();
    for (pnode, hash) in votes {
        if seen.insert(pnode.clone()) {
            tally.entry(*hash).or_default().push(pnode.clone());
        }
    }
    let counted = seen.len();
    let mut ranked: Vec<(&[u8; 32], &Vec<String>)> = tally.iter().collect();
    // Most votes first; ties by hash so the verdict never depends on arrival order.
    ranked.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    let best = ranked.first().map_or(0, |r| r.1.len());
    let runner_up = ranked.get(1).map_or(0, |r| r.1.len());
    if best >= rule.k
        && best > runner_up
        && let Some((hash, agree)) = ranked.first()
    {
        let dissent = ranked[1..].iter().flat_map(|r| r.1.iter().cloned()).collect();
        return Quorum::Accepted { hash: **hash, agree: (*agree).clone(), dissent };
    }
    if counted < rule.n {
        return Quorum::Pending { missing: rule.n - counted };
    }
    if counted < rule.max_replicas {
        let needed = rule.k.saturating_sub(best).max(1);
        return Quorum::NeedArbiter { more: needed.min(rule.max_replicas - counted) };
    }
    Quorum::Unresolved { results: tally.into_iter().collect() }
}

/// The machine a PNode's endpoint is on, when it tells: `None` for loopback and `localhost`
/// (every PNode of a local mesh shares them) and for what cannot be parsed. Replicas of an
/// execution avoid the hosts it ran on, so one machine cannot vote twice under two identities.
pub fn host_of(endpoint: &str) -> Option<String> {
    let host = endpoint_host(endpoint)?;
    if host.is_empty() || host.eq_ignore_ascii_case("localhost") {
        return None;
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>()
        && (ip.is_loopback() || ip.is_unspecified())
    {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

/// The host part of an endpoint URL as written, loopback and `localhost` included: cheap enough
/// to compare every PNode's with the hosts [`host_of`] gave (which are never loopback).
pub fn endpoint_host(endpoint: &str) -> Option<&str> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let authority = rest.split('/').next()?;
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next(),
        None => Some(authority.rsplit_once(':').map_or(authority, |(h, _)| h)),
    }
}

/// The VNode key under which whole segments are drawn for spot checks (no VNode has it).
pub const SEGMENT_KEY: u32 = u32::MAX;

impl Settings {
    /// Replicas to start for the segment beginning at `start` whose executions ran on PNodes of
    /// the given standings: 0 leaves it unchecked. Strangers under `full` get `n - 1` (so `n`
    /// executions with the job's own); everything else is drawn at its check rate.
    pub fn segment_replicas(&self, standings: &[Standing], sampler: &Spotcheck, start: u64) -> usize {
        let worst = if standings.iter().all(|s| matches!(s, Standing::Reliable | Standing::Trusted)) {
            Standing::Reliable
        } else {
            Standing::New
        };
        let n = self.replicas(worst);
        if n > 1 {
            return n - 1;
        }
        usize::from(sampler.selected(SEGMENT_KEY, start, self.check_rate(worst)))
    }

    /// The quorum a segment checked with `replicas` replicas (plus the job's own execution) needs:
    /// the policy's under `full` replication, both executions agreeing for a spot check.
    pub fn segment_quorum(&self, replicas: usize) -> QuorumRule {
        if replicas + 1 == self.quorum.n && self.mode == Verify::Full {
            self.quorum
        } else {
            QuorumRule::majority(replicas + 1)
        }
    }
}

/// One tensor a VNode consumed in a training step, as its receiver reported it: the evidence
/// that says who sent what (docs/TRUST.md, "Blame").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepInput {
    /// How it entered the VNode.
    pub route: Route,
    /// Its hash ([`dcnr_proto::seal::tensor_sha256`]).
    pub tensor_sha256: [u8; 32],
    /// The sender's public key and signature; `None` for a delivery between VNodes of one PNode.
    pub seal: Option<([u8; 32], [u8; 64])>,
    /// Placement generation of the report it came with, part of what the seal signs.
    pub generation: u32,
}

/// What blame needs of the graph: the causal order and which VNode feeds each input port.
#[derive(Debug, Clone, Default)]
pub struct Wiring {
    /// VNodes in topological order.
    pub topo: Vec<u32>,
    /// (VNode, port) → the VNode whose output feeds it.
    pub producers: BTreeMap<(u32, u32), u32>,
}

impl Wiring {
    /// The wiring of a validated graph.
    pub fn of(graph: &ValidGraph) -> Wiring {
        let producers = graph
            .nodes
            .iter()
            .flat_map(|n| {
                n.inputs.iter().enumerate().filter_map(move |(port, s)| match s {
                    Source::Node(u) => Some(((n.id, port as u32), *u)),
                    _ => None,
                })
            })
            .collect();
        Wiring { topo: graph.topo.clone(), producers }
    }

    /// The VNode that sends what arrives at `vnode` by `route`.
    fn sender(&self, vnode: u32, route: Route) -> Option<u32> {
        match route {
            Route::Forward { port } => self.producers.get(&(vnode, port)).copied(),
            Route::Backward { from_vnode, .. } => Some(from_vnode),
        }
    }
}

/// What one execution of a segment produced, for comparison with other executions of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionDigest {
    /// Which execution: "job" for the job's own, "replica N" for the others.
    pub label: String,
    /// The job id its PNodes knew it by (a replica's own), part of what seals sign.
    pub job_id: String,
    /// First step of the segment.
    pub start: u64,
    /// Per VNode: the output hash (hex) it reported for each step of the segment, in order.
    pub outputs: BTreeMap<u32, Vec<String>>,
    /// Per (step, VNode): the activations and gradients it consumed, in route order (sealed
    /// jobs; empty otherwise).
    pub inputs: BTreeMap<(u64, u32), Vec<StepInput>>,
    /// Per VNode: SHA-256 of its state bytes at the segment's end.
    pub states: BTreeMap<u32, [u8; 32]>,
    /// Per VNode: (first step, PNode) of each placement it had, so a step names who ran it.
    pub ran_on: BTreeMap<u32, Vec<(u64, String)>>,
}

impl ExecutionDigest {
    /// One hash over everything compared: equal fingerprints are equal executions. The hashes
    /// of the tensors each VNode consumed count too, so the accepted execution's account of
    /// what was sent is itself agreed by a quorum; who signed them does not.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"dcnr-execution-v1\0");
        h.update(self.start.to_le_bytes());
        for (v, hashes) in &self.outputs {
            h.update(v.to_le_bytes());
            h.update((hashes.len() as u64).to_le_bytes());
            for x in hashes {
                h.update(x.as_bytes());
            }
        }
        for (v, s) in &self.states {
            h.update(v.to_le_bytes());
            h.update(s);
        }
        for ((step, v), inputs) in &self.inputs {
            h.update(step.to_le_bytes());
            h.update(v.to_le_bytes());
            h.update((inputs.len() as u64).to_le_bytes());
            for i in inputs {
                let (kind, a, b) = i.route.parts();
                h.update([kind]);
                h.update(a.to_le_bytes());
                h.update(b.to_le_bytes());
                h.update(i.tensor_sha256);
            }
        }
        h.finalize().into()
    }

    /// The PNode that ran `vnode` at `step`.
    pub fn pnode_at(&self, vnode: u32, step: u64) -> Option<&str> {
        self.ran_on.get(&vnode)?.iter().rev().find(|(first, _)| *first <= step).map(|(_, p)| p.as_str())
    }

    /// Every PNode that ran part of the segment (`ran_on` holds only the segment's placements).
    pub fn pnodes(&self) -> std::collections::BTreeSet<String> {
        self.ran_on.values().flatten().map(|(_, p)| p.clone()).collect()
    }

    /// Whether `input`, consumed by `vnode` at `step`, is proven to come from `sender`'s PNode:
    /// sealed by that PNode for this very context, or passed between two VNodes of one PNode
    /// (whose word about it is its own).
    fn proves(&self, input: &StepInput, vnode: u32, step: u64, sender: u32) -> bool {
        let Some(signer) = self.pnode_at(sender, step) else { return false };
        let Some((key, signature)) = &input.seal else { return self.pnode_at(vnode, step) == Some(signer) };
        if identity::pnode_id(key) != signer {
            return false;
        }
        let ctx = seal::Context {
            job: &self.job_id,
            generation: input.generation,
            to_vnode: vnode,
            micro_batch: step,
            route: input.route,
        };
        let wire = v1::Seal {
            tensor_sha256: input.tensor_sha256.to_vec(),
            public_key: key.to_vec(),
            signature: signature.to_vec(),
        };
        seal::verify(&wire, &ctx).is_ok()
    }
}

/// The placements of `all` (first step, PNode) that ran some step of `start..end`.
pub fn placements_within(all: &[(u64, String)], start: u64, end: u64) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = Vec::new();
    for (first, p) in all {
        if *first >= end {
            break;
        }
        if *first <= start {
            out.clear();
        }
        out.push((*first, p.clone()));
    }
    out
}

/// What departed from the accepted execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// The VNode's output hash.
    Output,
    /// A tensor the VNode sent to `to`, proven by its seal, while it reported the agreed output.
    Sent {
        /// The receiving VNode.
        to: u32,
    },
    /// The VNode's account of what it consumed, which it cannot prove came from its sender.
    Evidence,
    /// The VNode's end state (every output agreed).
    EndState,
}

impl Departure {
    /// Its name in reports: output, sent, evidence or end state.
    pub fn name(self) -> &'static str {
        match self {
            Departure::Output => "output",
            Departure::Sent { .. } => "sent",
            Departure::Evidence => "evidence",
            Departure::EndState => "end state",
        }
    }
}

/// Where an execution first departs from an accepted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The VNode whose PNode is to blame.
    pub vnode: u32,
    /// The step; the segment's last step when only the end states differ.
    pub step: u64,
    /// What departed.
    pub what: Departure,
    /// The accepted hash (hex).
    pub expected: String,
    /// The other execution's hash (hex; "missing" when it reported none).
    pub got: String,
}

fn hex_or_missing(h: Option<&[u8; 32]>) -> String {
    h.map(hex::encode).unwrap_or_else(|| "missing".into())
}

/// The first difference of `other` from `accepted` in what `vnode` consumed at `step` (its
/// activations, or its gradients with `backward`), and who is to blame for it: the sender when
/// the other execution proves it sent that tensor, the receiver otherwise.
fn input_divergence(
    accepted: &ExecutionDigest,
    other: &ExecutionDigest,
    wiring: &Wiring,
    vnode: u32,
    step: u64,
    backward: bool,
) -> Option<Divergence> {
    let pick = |d: &ExecutionDigest| -> BTreeMap<Route, StepInput> {
        d.inputs
            .get(&(step, vnode))
            .into_iter()
            .flatten()
            .filter(|i| matches!(i.route, Route::Backward { .. }) == backward)
            .map(|i| (i.route, i.clone()))
            .collect()
    };
    let (want, got) = (pick(accepted), pick(other));
    let routes: std::collections::BTreeSet<Route> = want.keys().chain(got.keys()).copied().collect();
    routes.into_iter().find_map(|route| {
        let (w, g) = (want.get(&route), got.get(&route));
        if w.map(|i| i.tensor_sha256) == g.map(|i| i.tensor_sha256) {
            return None;
        }
        let expected = hex_or_missing(w.map(|i| &i.tensor_sha256));
        let received = hex_or_missing(g.map(|i| &i.tensor_sha256));
        let sender = wiring.sender(vnode, route);
        let proven = match (g, sender) {
            (Some(g), Some(s)) if w.is_some() => other.proves(g, vnode, step, s).then_some(s),
            _ => None,
        };
        Some(match proven {
            Some(s) => Divergence { vnode: s, step, what: Departure::Sent { to: vnode }, expected, got: received },
            None => Divergence { vnode, step, what: Departure::Evidence, expected, got: received },
        })
    })
}

/// The first difference of `other` from `accepted`, in causal order: step by step, each step's
/// VNodes in topological order (what a VNode consumed, then its output), then the gradients
/// each consumed in reverse order, then the end states. The VNode named is the one to blame:
/// everything it consumed agreed with the accepted execution, or (a tensor it sent) its own
/// seal shows it sent something else while it reported the agreed output.
pub fn first_divergence(accepted: &ExecutionDigest, other: &ExecutionDigest, wiring: &Wiring) -> Option<Divergence> {
    let steps = accepted.outputs.values().map(Vec::len).max().unwrap_or(0);
    for i in 0..steps {
        let step = accepted.start + i as u64;
        for v in &wiring.topo {
            if let Some(d) = input_divergence(accepted, other, wiring, *v, step, false) {
                return Some(d);
            }
            let want = accepted.outputs.get(v).and_then(|h| h.get(i));
            let got = other.outputs.get(v).and_then(|h| h.get(i));
            if want != got {
                return Some(Divergence {
                    vnode: *v,
                    step,
                    what: Departure::Output,
                    expected: want.cloned().unwrap_or_else(|| "missing".into()),
                    got: got.cloned().unwrap_or_else(|| "missing".into()),
                });
            }
        }
        for v in wiring.topo.iter().rev() {
            if let Some(d) = input_divergence(accepted, other, wiring, *v, step, true) {
                return Some(d);
            }
        }
    }
    let last = accepted.start + steps.saturating_sub(1) as u64;
    wiring.topo.iter().find_map(|v| {
        let (want, got) = (accepted.states.get(v), other.states.get(v));
        (want != got).then(|| Divergence {
            vnode: *v,
            step: last,
            what: Departure::EndState,
            expected: hex_or_missing(want),
            got: hex_or_missing(got),
        })
    })
}

/// How one segment's check ended, for the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentVerdict {
    /// First step.
    pub start: u64,
    /// One past the last step.
    pub end: u64,
    /// Each execution: label, the PNodes it ran on, and its fingerprint (hex).
    pub executions: Vec<(String, Vec<String>, String)>,
    /// accepted | job_rejected | unresolved | not_run.
    pub verdict: String,
}

/// One result that disagreed with the accepted one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    /// VNode.
    pub vnode: u32,
    /// Training step.
    pub step: u64,
    /// The dissenting PNode.
    pub pnode: String,
    /// Hex of the accepted hash.
    pub expected_sha256: String,
    /// Hex of the dissenting hash.
    pub got_sha256: String,
    /// What departed: output, sent (a tensor it signed, see docs/TRUST.md), evidence or end
    /// state.
    #[serde(default)]
    pub what: String,
}

/// A result refused by the cheap checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvalidResult {
    /// The PNode that produced it.
    pub pnode: String,
    /// The VNode whose result it was.
    pub vnode: Option<u32>,
    /// Micro-batch or step.
    pub step: Option<u64>,
    /// What was wrong, naming the sender.
    pub reason: String,
}

/// An identity quarantined during the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineEvent {
    /// The PNode.
    pub pnode: String,
    /// Steps completed when it happened.
    pub at_step: u64,
    /// Why.
    pub reason: String,
}

/// `verification.json`: what was checked in one job and what was found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerificationRecord {
    /// Job id.
    pub job_id: String,
    /// none | spotcheck | full.
    pub policy: String,
    /// Spot-check rate for new identities.
    pub spotcheck_fraction: f64,
    /// Quorum (k of n) under `full`.
    pub quorum: Option<(usize, usize)>,
    /// Tensors and results that passed through the cheap checks at the orchestrator and PNodes
    /// (all of them, whatever the policy); this counts the ones the orchestrator saw.
    pub results_checked: u64,
    /// Executions re-executed or replicated and compared by hash.
    pub executions_compared: u64,
    /// Results refused by the cheap checks.
    pub invalid_results: Vec<InvalidResult>,
    /// Replica disagreements.
    pub mismatches: Vec<Mismatch>,
    /// Identities quarantined while the job ran.
    pub quarantines: Vec<QuarantineEvent>,
    /// Segments re-executed and compared.
    pub segments_checked: u64,
    /// Segments accepted without re-execution (not drawn by the spot check).
    pub segments_unchecked: u64,
    /// Extra replicas started to settle a disagreement.
    pub arbiters: u64,
    /// Every checked segment.
    pub segments: Vec<SegmentVerdict>,
}

impl VerificationRecord {
    /// An empty record for a job with `settings`.
    pub fn new(job_id: &str, settings: &Settings) -> VerificationRecord {
        let mode = match settings.mode {
            Verify::None => "none",
            Verify::Spotcheck => "spotcheck",
            Verify::Full => "full",
        };
        VerificationRecord {
            job_id: job_id.to_string(),
            policy: mode.into(),
            spotcheck_fraction: settings.fraction,
            quorum: (settings.mode == Verify::Full).then_some((settings.quorum.k, settings.quorum.n)),
            ..VerificationRecord::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(p: &str, h: u8) -> (String, [u8; 32]) {
        (p.to_string(), [h; 32])
    }

    #[test]
    fn majority_of_two_needs_both_then_an_arbiter() {
        let r = QuorumRule::majority(2);
        assert_eq!(r.k, 2);
        assert_eq!(evaluate(&r, &[v("a", 1)]), Quorum::Pending { missing: 1 });
        assert_eq!(evaluate(&r, &[v("a", 1), v("b", 2)]), Quorum::NeedArbiter { more: 1 });
        let q = evaluate(&r, &[v("a", 1), v("b", 2), v("c", 1)]);
        assert_eq!(
            q,
            Quorum::Accepted { hash: [1; 32], agree: vec!["a".into(), "c".into()], dissent: vec!["b".into()] }
        );
        let q = evaluate(&r, &[v("a", 1), v("b", 2), v("c", 3), v("d", 4)]);
        assert!(matches!(q, Quorum::Unresolved { results } if results.len() == 4));
    }

    #[test]
    fn one_identity_votes_once() {
        let r = QuorumRule::majority(3);
        let q = evaluate(&r, &[v("a", 1), v("a", 1), v("b", 2)]);
        assert_eq!(q, Quorum::Pending { missing: 1 });
    }

    #[test]
    fn rules_are_checked() {
        assert!(QuorumRule::new(1, 2).is_err());
        assert!(QuorumRule::new(3, 2).is_err());
        assert!(QuorumRule::new(1, 1).is_err());
        assert_eq!(QuorumRule::new(2, 3).unwrap().k, 2);
    }

    #[test]
    fn rates_follow_policy_and_standing() {
        let s = |mode| Settings { mode, fraction: 0.1, quorum: QuorumRule::majority(2) };
        assert_eq!(s(Verify::None).check_rate(Standing::New), 0.0);
        assert_eq!(s(Verify::Spotcheck).check_rate(Standing::New), 0.1);
        assert!((s(Verify::Spotcheck).check_rate(Standing::Trusted) - 0.025).abs() < 1e-12);
        assert_eq!(s(Verify::Full).check_rate(Standing::New), 1.0);
        assert_eq!(s(Verify::Full).replicas(Standing::New), 2);
        assert_eq!(s(Verify::Full).replicas(Standing::Reliable), 1);
        assert_eq!(s(Verify::Spotcheck).replicas(Standing::New), 1);
    }

    #[test]
    fn spotchecks_are_deterministic_and_near_the_rate() {
        let a = Spotcheck::new(42);
        let picks: Vec<bool> = (0..4000).map(|s| a.selected(3, s, 0.1)).collect();
        assert_eq!(picks, (0..4000).map(|s| Spotcheck::new(42).selected(3, s, 0.1)).collect::<Vec<_>>());
        let n = picks.iter().filter(|p| **p).count();
        assert!((320..480).contains(&n), "{n} of 4000 at 10%");
        assert_ne!(picks, (0..4000).map(|s| Spotcheck::new(43).selected(3, s, 0.1)).collect::<Vec<_>>());
        assert!(!(0..1000).any(|s| a.selected(0, s, 0.0)));
        assert!((0..1000).all(|s| a.selected(0, s, 1.0)));
    }

    #[test]
    fn report_serialises() {
        let mut r = VerificationRecord::new(
            "j",
            &Settings { mode: Verify::Full, fraction: 0.1, quorum: QuorumRule::majority(3) },
        );
        r.quarantines.push(QuarantineEvent { pnode: "pn-x".into(), at_step: 4, reason: "NaN".into() });
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"quorum\":[2,3]") && json.contains("pn-x"), "{json}");
        assert_eq!(serde_json::from_str::<VerificationRecord>(&json).unwrap(), r);
    }

    fn digest(label: &str, outputs: &[(u32, &[&str])], ran_on: &[(u32, &[(u64, &str)])]) -> ExecutionDigest {
        ExecutionDigest {
            label: label.into(),
            job_id: format!("j-{label}"),
            start: 10,
            inputs: BTreeMap::new(),
            outputs: outputs.iter().map(|(v, h)| (*v, h.iter().map(|x| x.to_string()).collect())).collect(),
            states: outputs.iter().map(|(v, _)| (*v, [*v as u8; 32])).collect(),
            ran_on: ran_on.iter().map(|(v, ps)| (*v, ps.iter().map(|(f, p)| (*f, p.to_string())).collect())).collect(),
        }
    }

    #[test]
    fn blame_goes_to_the_first_divergence_in_causal_order() {
        let where_ = [(0u32, &[(0u64, "a")][..]), (1, &[(0, "b"), (11, "c")][..]), (2, &[(0, "b")][..])];
        let good = digest("job", &[(0, &["x0", "x1"]), (1, &["y0", "y1"]), (2, &["z0", "z1"])], &where_);
        // Step 10 agrees; at step 11 vnode 1 departs first (vnode 2, downstream, follows).
        let bad = digest("replica 1", &[(0, &["x0", "x1"]), (1, &["y0", "Y1"]), (2, &["z0", "Z1"])], &where_);
        let topo = Wiring { topo: vec![0, 1, 2], ..Wiring::default() };
        let d = first_divergence(&good, &bad, &topo).unwrap();
        assert_eq!((d.vnode, d.step, d.what, d.got.as_str()), (1, 11, Departure::Output, "Y1"));
        assert_eq!(bad.pnode_at(d.vnode, d.step), Some("c"), "vnode 1 moved to c at step 11");
        assert_eq!(bad.pnode_at(1, 10), Some("b"));
        assert_eq!(first_divergence(&good, &good.clone(), &topo), None);
        assert_eq!(good.fingerprint(), good.clone().fingerprint());
        assert_ne!(good.fingerprint(), bad.fingerprint());
        // Same outputs, another end state: blamed on that VNode at the last step.
        let mut lazy = good.clone();
        lazy.states.insert(2, [9; 32]);
        let d = first_divergence(&good, &lazy, &topo).unwrap();
        assert_eq!((d.vnode, d.step, d.what), (2, 11, Departure::EndState));
        assert_ne!(good.fingerprint(), lazy.fingerprint());
        // A missing output is a divergence too.
        let short = digest("replica 2", &[(0, &["x0"]), (1, &["y0", "y1"]), (2, &["z0", "z1"])], &where_);
        assert_eq!(first_divergence(&good, &short, &topo).map(|d| (d.vnode, d.got)), Some((0, "missing".into())));
        assert_eq!(good.pnodes().into_iter().collect::<Vec<_>>(), vec!["a", "b", "c"]);
    }

    /// Two VNodes (0 feeds 1's port 0) on PNodes of keys 1 and 2 (`local`: both on key 1's),
    /// one step at 10; vnode 0 reports output "x" and 1 "y", and 1 says it consumed `sent`
    /// (sealed by `signer` unless local).
    fn sealed(label: &str, sent: [u8; 32], signer: u8, generation: u32, local: bool) -> ExecutionDigest {
        use ed25519_dalek::SigningKey;
        let id = |k: u8| identity::pnode_id(&SigningKey::from_bytes(&[k; 32]).verifying_key().to_bytes());
        let (p0, p1) = (id(1), if local { id(1) } else { id(2) });
        let mut d = digest(label, &[(0, &["x"]), (1, &["y"])], &[(0, &[(0, &p0)]), (1, &[(0, &p1)])]);
        let route = Route::Forward { port: 0 };
        let ctx = seal::Context { job: &d.job_id, generation, to_vnode: 1, micro_batch: 10, route };
        let s = seal::sign(&SigningKey::from_bytes(&[signer; 32]), &ctx, sent);
        let seal =
            (!local).then(|| (s.public_key.as_slice().try_into().unwrap(), s.signature.as_slice().try_into().unwrap()));
        d.inputs.insert((10, 1), vec![StepInput { route, tensor_sha256: sent, seal, generation: 1 }]);
        d
    }

    #[test]
    fn a_sender_is_blamed_for_a_tensor_it_signed_and_a_receiver_cannot_frame_it() {
        let wiring = Wiring { topo: vec![0, 1], producers: [((1, 0), 0)].into_iter().collect() };
        let good = sealed("job", [1; 32], 1, 1, false);
        assert_eq!(first_divergence(&good, &sealed("replica 1", [1; 32], 1, 1, false), &wiring), None);
        // Vnode 0's PNode reports the agreed output but signed noise for vnode 1.
        let bad = sealed("replica 1", [2; 32], 1, 1, false);
        assert_ne!(good.fingerprint(), bad.fingerprint(), "what was consumed is part of the vote");
        let d = first_divergence(&good, &bad, &wiring).unwrap();
        assert_eq!((d.vnode, d.step, d.what), (0, 10, Departure::Sent { to: 1 }));
        assert_eq!(d.what.name(), "sent");
        // A receiver's own signature, or a seal of another generation, proves nothing: the
        // receiver is blamed for an account of its input it cannot back.
        for forged in [sealed("replica 1", [2; 32], 2, 1, false), sealed("replica 1", [2; 32], 1, 2, false)] {
            let d = first_divergence(&good, &forged, &wiring).unwrap();
            assert_eq!((d.vnode, d.what), (1, Departure::Evidence));
        }
        // Between two VNodes of one PNode there is no seal; that PNode is to blame either way.
        let d = first_divergence(&good, &sealed("replica 1", [2; 32], 1, 1, true), &wiring).unwrap();
        assert_eq!((d.vnode, d.what), (0, Departure::Sent { to: 1 }));
        // An input left out of the account is the receiver's doing too.
        let mut silent = bad.clone();
        silent.inputs.clear();
        let d = first_divergence(&good, &silent, &wiring).unwrap();
        assert_eq!((d.vnode, d.what, d.got.as_str()), (1, Departure::Evidence, "missing"));
    }

    #[test]
    fn hosts_are_known_unless_local() {
        assert_eq!(host_of("http://10.0.0.5:7071"), Some("10.0.0.5".into()));
        assert_eq!(host_of("http://Node-7.example.org:7071/"), Some("node-7.example.org".into()));
        assert_eq!(host_of("http://[2001:db8::1]:7071"), Some("2001:db8::1".into()));
        assert_eq!(host_of("http://127.0.0.1:7071"), None);
        assert_eq!(host_of("http://127.0.0.42:7071"), None);
        assert_eq!(host_of("http://[::1]:7071"), None);
        assert_eq!(host_of("http://localhost:7071"), None);
        assert_eq!(host_of(""), None);
    }

    #[test]
    fn placements_within_keep_what_ran_in_the_segment() {
        let all = [(0, "a".to_string()), (50, "b".to_string()), (120, "c".to_string())];
        let names = |v: Vec<(u64, String)>| v.into_iter().map(|x| x.1).collect::<Vec<_>>();
        assert_eq!(names(placements_within(&all, 100, 150)), vec!["b", "c"]);
        assert_eq!(names(placements_within(&all, 50, 100)), vec!["b"]);
        assert_eq!(names(placements_within(&all, 0, 50)), vec!["a"]);
    }

    #[test]
    fn segments_are_replicated_by_policy_and_standing() {
        let sampler = Spotcheck::new(7);
        let full = Settings { mode: Verify::Full, fraction: 0.1, quorum: QuorumRule::majority(3) };
        assert_eq!(full.segment_replicas(&[Standing::Trusted, Standing::New], &sampler, 0), 2);
        assert_eq!(full.segment_quorum(2), QuorumRule::majority(3));
        let spot = Settings { mode: Verify::Spotcheck, fraction: 0.1, quorum: QuorumRule::majority(2) };
        let drawn = (0..1000u64).filter(|s| spot.segment_replicas(&[Standing::New], &sampler, s * 100) == 1).count();
        assert!((60..140).contains(&drawn), "{drawn} of 1000 segments at 10%");
        let earned =
            (0..1000u64).filter(|s| spot.segment_replicas(&[Standing::Reliable], &sampler, s * 100) == 1).count();
        assert!(earned < drawn / 2, "earned identities are checked less: {earned} vs {drawn}");
        assert_eq!(spot.segment_quorum(1), QuorumRule::majority(2));
        let none = Settings { mode: Verify::None, fraction: 0.1, quorum: QuorumRule::majority(2) };
        assert!((0..100).all(|s| none.segment_replicas(&[Standing::New], &sampler, s) == 0));
    }

    proptest! {
        #[test]
        fn an_accepted_result_has_a_strict_quorum_and_dissent_is_everyone_else(
            n in 2usize..6, hashes in proptest::collection::vec(0u8..3, 0..8),
        ) {
            let rule = QuorumRule::majority(n);
            let votes: Vec<_> = hashes.iter().enumerate().map(|(i, h)| (format!("p{i}"), [*h; 32])).collect();
            match evaluate(&rule, &votes) {
                Quorum::Accepted { hash, agree, dissent } => {
                    prop_assert!(agree.len() >= rule.k);
                    prop_assert_eq!(agree.len() + dissent.len(), votes.len());
                    for (p, h) in &votes {
                        prop_assert_eq!(agree.contains(p), *h == hash);
                    }
                    let mut other = BTreeMap::new();
                    for (_, h) in votes.iter().filter(|(_, h)| *h != hash) { *other.entry(*h).or_insert(0) += 1; }
                    prop_assert!(other.values().all(|c| *c < agree.len()));
                }
                Quorum::Pending { missing } => prop_assert_eq!(missing + votes.len(), n),
                Quorum::NeedArbiter { more } => {
                    prop_assert!(more >= 1 && votes.len() + more <= rule.max_replicas);
                }
                Quorum::Unresolved { .. } => prop_assert!(votes.len() >= rule.max_replicas),
            }
        }
    }
}
