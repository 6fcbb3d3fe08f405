//! The job envelope: everything that defines a job — context, the model graph and recipe, the
//! placement policy, the seed, and which artifacts to keep — in one canonical document.
//!
//! A bare model graph is accepted wherever an envelope is and becomes an envelope with defaults
//! and an explicit seed taken from the graph's `[model].seed`.

use crate::graph::{GraphError, ModelGraph, OptimizerSpec, TrainingMode, ValidGraph};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Errors in an envelope.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnvelopeError {
    /// Not valid JSON/TOML, or an unknown field (named in the message).
    #[error("job envelope is not valid: {0}")]
    Syntax(String),
    /// Neither or both of `op.model` and `op.model_toml`.
    #[error("op must give the model graph either by path (`model`) or inline (`model_toml`), not {0}")]
    ModelSource(&'static str),
    /// The model's SHA-256 differs from `op.model_sha256`.
    #[error("op.model_sha256 is {expected} but the model graph hashes to {actual}")]
    ModelHash { expected: String, actual: String },
    /// The graph is invalid.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// A field value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The whole envelope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Identity and labels of the run.
    #[serde(default)]
    pub ctx: Ctx,
    /// What to run.
    pub op: Op,
    /// Where and how to run it.
    #[serde(default)]
    pub policy: Policy,
    /// Root seed.
    #[serde(default)]
    pub seed: SeedSpec,
    /// What to keep.
    #[serde(default)]
    pub artifacts: ArtifactsSpec,
    /// When to snapshot VNode state.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
}

/// `[checkpoint]`: snapshots of every VNode's state, for resume and relocation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Snapshot every this many steps (and at the end of training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_steps: Option<u64>,
    /// Snapshot at the first step boundary after this many seconds since the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_s: Option<u64>,
    /// Complete snapshots to keep; older ones are dropped.
    #[serde(default = "three")]
    pub keep: u32,
}

fn three() -> u32 {
    3
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec { every_steps: None, every_s: None, keep: 3 }
    }
}

impl CheckpointSpec {
    /// Whether any snapshot is asked for.
    pub fn enabled(&self) -> bool {
        self.every_steps.is_some() || self.every_s.is_some()
    }
}

/// `[ctx]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Ctx {
    /// Job id; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Groups jobs of one experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Correlates logs across systems.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Longest duration, in seconds, an envelope may ask for (a timeout, a checkpoint interval):
/// one year, far from where adding it to a clock could overflow.
pub const MAX_DURATION_S: u64 = 366 * 24 * 3600;

/// Longest job id.
pub const MAX_JOB_ID: usize = 64;

/// Whether `id` may name a job: 1..=128 ASCII letters, digits, `-`, `_` and `.`, not starting
/// with `.` (ids become store keys and file names, so nothing in one may walk a path).
pub fn check_job_id(id: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if id.is_empty() || id.len() > MAX_JOB_ID || id.starts_with('.') || !id.chars().all(ok_char) {
        let shown: String = id.chars().take(40).collect();
        return Err(format!(
            "job id {shown:?} is not valid: use 1 to {MAX_JOB_ID} letters, digits, '-', '_' or '.', not starting with '.'"
        ));
    }
    Ok(())
}

/// `[op]`: the model graph and the training recipe (overrides of the graph's own settings).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Op {
    /// Path of the model graph, relative to the envelope file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The model graph inline (TOML text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_toml: Option<String>,
    /// Expected SHA-256 of the model graph text; filled in when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
    /// Exact number of steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Epochs (ignored when `steps` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// Samples per step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Micro-batches in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u32>,
    /// Optimizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerSpec>,
    /// Training mode (`exact` or `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TrainingMode>,
    /// Data-parallel pipelines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipelines: Option<u32>,
    /// Steps between the pipelines' averaging rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_every: Option<u64>,
}

/// Kind of PNode the job may use.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// CPU PNodes only.
    Cpu,
    /// PNodes with a GPU only.
    Gpu,
    /// Any PNode.
    #[default]
    Any,
}

/// Redundant-execution policy (see docs/TRUST.md).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    /// No redundancy.
    #[default]
    None,
    /// A fraction of executions re-run elsewhere.
    Spotcheck,
    /// Every execution replicated, quorum decides.
    Full,
}

/// `[policy]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Kind of PNode.
    #[serde(default)]
    pub target: Target,
    /// Wait for at least this many healthy PNodes before placing.
    #[serde(default = "one")]
    pub min_pnodes: u32,
    /// Spread over at most this many PNodes.
    #[serde(default = "sixteen")]
    pub max_pnodes: u32,
    /// Fail the job after this many seconds.
    #[serde(default = "hour")]
    pub timeout_s: u64,
    /// Validation of untrusted work.
    #[serde(default)]
    pub verify: Verify,
    /// Fraction of executions re-executed elsewhere under `spotcheck` (and of earned
    /// identities' executions under `full`); in (0, 1], default 0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spotcheck_fraction: Option<f64>,
    /// Replicas per execution under `full` (n); 2..=9, default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Agreeing replicas needed under `full` (k); n/2 < k <= n, default a strict majority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<u32>,
    /// Steps per verified segment (the unit a replica re-executes); 1..=100000, default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_steps: Option<u64>,
}

impl Policy {
    /// The spot-check fraction in force.
    pub fn spotcheck_fraction(&self) -> f64 {
        self.spotcheck_fraction.unwrap_or(0.1)
    }

    /// Replicas per execution under `full`.
    pub fn replicas(&self) -> u32 {
        self.replicas.unwrap_or(2)
    }

    /// Agreeing replicas needed under `full`.
    pub fn quorum(&self) -> u32 {
        self.quorum.unwrap_or(self.replicas() / 2 + 1)
    }

    /// Steps per verified segment.
    pub fn segment_steps(&self) -> u64 {
        self.segment_steps.unwrap_or(100)
    }

    /// Checks the verification settings against each other.
    fn check_verify(&self) -> Result<(), EnvelopeError> {
        let bad = |m: String| Err(EnvelopeError::Invalid(m));
        if let Some(f) = self.spotcheck_fraction {
            if self.verify == Verify::None {
                return bad("policy.spotcheck_fraction needs verify = \"spotcheck\" or \"full\"".into());
            }
            if !(f > 0.0 && f <= 1.0) {
                return bad(format!("policy.spotcheck_fraction is {f}; it must be in (0, 1]"));
            }
        }
        if (self.replicas.is_some() || self.quorum.is_some()) && self.verify != Verify::Full {
            return bad("policy.replicas and policy.quorum need verify = \"full\"".into());
        }
        if let Some(s) = self.segment_steps {
            if self.verify == Verify::None {
                return bad("policy.segment_steps needs verify = \"spotcheck\" or \"full\"".into());
            }
            if !(1..=100_000).contains(&s) {
                return bad(format!("policy.segment_steps is {s}; it must be between 1 and 100000"));
            }
        }
        let (n, k) = (self.replicas(), self.quorum());
        if !(2..=9).contains(&n) {
            return bad(format!("policy.replicas is {n}; it must be between 2 and 9"));
        }
        if k * 2 <= n || k > n {
            return bad(format!(
                "policy.quorum is {k} of {n} replicas; it must be more than half of them and at most all"
            ));
        }
        Ok(())
    }
}

fn one() -> u32 {
    1
}
fn sixteen() -> u32 {
    16
}
fn hour() -> u64 {
    3600
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            target: Target::Any,
            min_pnodes: 1,
            max_pnodes: 16,
            timeout_s: 3600,
            verify: Verify::None,
            spotcheck_fraction: None,
            replicas: None,
            quorum: None,
            segment_steps: None,
        }
    }
}

/// How the root seed is chosen.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SeedMode {
    /// From the content hash of the op (model hash and recipe).
    #[default]
    Derived,
    /// The given value.
    Explicit,
}

/// `[seed]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SeedSpec {
    /// Derived or explicit.
    #[serde(default)]
    pub mode: SeedMode,
    /// The seed (required for explicit; filled in for derived once resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
}

/// An artifact a job can write.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// Summary and per-VNode parameter hashes.
    Result,
    /// Which PNode ran which VNode, times, bytes, per-step output hashes.
    Executions,
    /// Loss and accuracy curves.
    Metrics,
    /// The resolved envelope.
    Envelope,
    /// What was verified and found: invalid results, mismatches, quarantines.
    Verification,
    /// The trained parameters, as safetensors (docs/MODEL_FORMAT.md); what `export` reads.
    Params,
}

/// `[artifacts]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsSpec {
    /// Write artifacts at all.
    #[serde(default = "yes")]
    pub persist: bool,
    /// Which ones.
    #[serde(default = "all_kinds")]
    pub write: Vec<ArtifactKind>,
}

fn yes() -> bool {
    true
}
fn all_kinds() -> Vec<ArtifactKind> {
    vec![
        ArtifactKind::Result,
        ArtifactKind::Executions,
        ArtifactKind::Metrics,
        ArtifactKind::Envelope,
        ArtifactKind::Verification,
        ArtifactKind::Params,
    ]
}

impl Default for ArtifactsSpec {
    fn default() -> Self {
        ArtifactsSpec { persist: true, write: all_kinds() }
    }
}

/// An envelope whose model is inline, hashed, validated, and whose seed is fixed.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The canonical envelope (model inline, hash and seed value filled in).
    pub envelope: Envelope,
    /// The validated graph with the recipe applied.
    pub graph: ValidGraph,
    /// Root seed.
    pub root_seed: u64,
}

/// Hex SHA-256 of text.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Envelope {
    /// Parses a job file: a JSON or TOML envelope, or a bare model graph (TOML with `[model]`).
    pub fn parse(text: &str) -> Result<Envelope, EnvelopeError> {
        if text.trim_start().starts_with('{') {
            return serde_json::from_str(text).map_err(|e| EnvelopeError::Syntax(e.to_string()));
        }
        let value: toml::Table = toml::from_str(text).map_err(|e| EnvelopeError::Syntax(e.to_string()))?;
        if value.contains_key("model") && !value.contains_key("op") {
            return Envelope::from_graph(text);
        }
        toml::from_str(text).map_err(|e| EnvelopeError::Syntax(e.to_string()))
    }

    /// An envelope around a bare graph: defaults, and the graph's own seed.
    pub fn from_graph(graph_toml: &str) -> Result<Envelope, EnvelopeError> {
        let g = ModelGraph::parse(graph_toml)?;
        Ok(Envelope {
            op: Op { model_toml: Some(graph_toml.to_string()), ..Op::default() },
            seed: SeedSpec { mode: SeedMode::Explicit, value: Some(g.model.seed) },
            ..Envelope::default()
        })
    }

    /// Inlines, hashes, validates and fixes the seed.
    pub fn resolve(mut self) -> Result<Resolved, EnvelopeError> {
        let text = match (&self.op.model, &self.op.model_toml) {
            (None, Some(t)) => t.clone(),
            (Some(_), None) => {
                return Err(EnvelopeError::ModelSource("a path that was not loaded (submit inlines it)"));
            }
            (None, None) => return Err(EnvelopeError::ModelSource("neither")),
            (Some(_), Some(_)) => return Err(EnvelopeError::ModelSource("both")),
        };
        let actual = sha256_hex(&text);
        if let Some(expected) = &self.op.model_sha256
            && !expected.eq_ignore_ascii_case(&actual)
        {
            return Err(EnvelopeError::ModelHash { expected: expected.clone(), actual });
        }
        self.op.model_sha256 = Some(actual);
        let mut spec = ModelGraph::parse(&text)?;
        let op = &self.op;
        if let Some(s) = op.steps {
            spec.training.steps = Some(s);
        } else if let Some(e) = op.epochs {
            spec.training.epochs = e;
            spec.training.steps = None;
        }
        if let Some(b) = op.batch_size {
            spec.training.batch_size = b;
        }
        if let Some(k) = op.in_flight {
            spec.training.in_flight = k;
        }
        if let Some(o) = op.optimizer {
            spec.optimizer = o;
        }
        if let Some(m) = op.mode {
            spec.training.mode = m;
        }
        if let Some(r) = op.pipelines {
            spec.training.pipelines = r;
        }
        if let Some(h) = op.sync_every {
            spec.training.sync_every = h;
        }
        let graph = spec.validate()?;
        let p = &self.policy;
        if p.min_pnodes == 0 || p.max_pnodes == 0 || p.min_pnodes > p.max_pnodes || p.max_pnodes > 4096 {
            return Err(EnvelopeError::Invalid(format!(
                "policy: need 1 <= min_pnodes ({}) <= max_pnodes ({}) <= 4096",
                p.min_pnodes, p.max_pnodes
            )));
        }
        p.check_verify()?;
        let c = &self.checkpoint;
        if c.every_steps == Some(0) || c.every_s == Some(0) || c.keep == 0 {
            return Err(EnvelopeError::Invalid("checkpoint: every_steps, every_s and keep must be at least 1".into()));
        }
        if c.every_s.is_some_and(|s| s > MAX_DURATION_S) {
            return Err(EnvelopeError::Invalid(format!(
                "checkpoint.every_s must be at most {MAX_DURATION_S} (one year)"
            )));
        }
        if p.timeout_s == 0 || p.timeout_s > MAX_DURATION_S {
            return Err(EnvelopeError::Invalid(format!(
                "policy.timeout_s must be between 1 and {MAX_DURATION_S} (one year), got {}",
                p.timeout_s
            )));
        }
        if let Some(id) = &self.ctx.job_id {
            check_job_id(id).map_err(|e| EnvelopeError::Invalid(format!("ctx.job_id: {e}")))?;
        }
        let root_seed = match self.seed.mode {
            SeedMode::Explicit => {
                self.seed.value.ok_or_else(|| EnvelopeError::Invalid("seed.mode = explicit needs seed.value".into()))?
            }
            SeedMode::Derived => self.derived_seed(&graph),
        };
        self.seed.value = Some(root_seed);
        Ok(Resolved { envelope: self, graph, root_seed })
    }

    /// SHA-256 over the model hash and the effective recipe; its first 8 bytes (LE) are the seed.
    fn derived_seed(&self, graph: &ValidGraph) -> u64 {
        let t = &graph.spec.training;
        let recipe = serde_json::json!({
            "model_sha256": self.op.model_sha256,
            "batch_size": t.batch_size,
            "steps": t.steps,
            "epochs": t.epochs,
            "in_flight": t.in_flight,
            "optimizer": graph.spec.optimizer,
        });
        let mut h = Sha256::new();
        h.update(b"dcnr-envelope-seed-v1");
        h.update(recipe.to_string().as_bytes());
        let d = h.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        u64::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRAPH: &str = include_str!("../mnist-mlp.toml");

    #[test]
    fn bare_graph_becomes_an_envelope_with_its_own_seed() {
        let r = Envelope::parse(GRAPH).unwrap().resolve().unwrap();
        assert_eq!(r.root_seed, 42);
        assert_eq!(r.envelope.op.model_sha256.as_deref(), Some(sha256_hex(GRAPH).as_str()));
    }

    #[test]
    fn derived_seed_depends_on_content_only() {
        let env = |steps: u64, job: &str| Envelope {
            ctx: Ctx { job_id: Some(job.into()), ..Ctx::default() },
            op: Op { model_toml: Some(GRAPH.into()), steps: Some(steps), ..Op::default() },
            ..Envelope::default()
        };
        let a = env(10, "a").resolve().unwrap().root_seed;
        assert_eq!(a, env(10, "b").resolve().unwrap().root_seed, "ctx does not change the seed");
        assert_ne!(a, env(11, "a").resolve().unwrap().root_seed);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let e = Envelope::parse("[op]\nmodel_toml = \"x\"\nstepz = 3\n").unwrap_err();
        assert!(e.to_string().contains("stepz"), "{e}");
        let e = Envelope::parse("[op]\nmodel_toml = \"x\"\n[policy]\nverify = \"maybe\"\n").unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
        let mut env = Envelope::from_graph(GRAPH).unwrap();
        env.op.model_sha256 = Some("00".into());
        assert!(matches!(env.resolve(), Err(EnvelopeError::ModelHash { .. })));
        let mut env = Envelope::from_graph(GRAPH).unwrap();
        env.ctx.job_id = Some("../etc".into());
        assert!(matches!(env.resolve(), Err(EnvelopeError::Invalid(_))));
        for bad in ["..", ".hidden", "", "a/b", "x".repeat(65).as_str()] {
            assert!(check_job_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_job_id("job-0001-abc_d.e").is_ok());
        // Durations near u64::MAX would overflow a clock: bounded.
        let mut env = Envelope::from_graph(GRAPH).unwrap();
        env.policy.timeout_s = u64::MAX;
        assert!(matches!(env.resolve(), Err(EnvelopeError::Invalid(e)) if e.contains("timeout_s")));
        let mut env = Envelope::from_graph(GRAPH).unwrap();
        env.checkpoint.every_s = Some(u64::MAX / 2);
        assert!(matches!(env.resolve(), Err(EnvelopeError::Invalid(e)) if e.contains("every_s")));
        // A dataset is a plain name, never a path or an alias of one.
        for bad in ["mnist/.", "../mnist", "mnist/", ""] {
            let text = GRAPH.replace("dataset = \"mnist\"", &format!("dataset = {bad:?}"));
            assert!(Envelope::from_graph(&text).and_then(Envelope::resolve).is_err(), "{bad:?}");
        }
        let mut env = Envelope::from_graph(GRAPH).unwrap();
        env.policy.min_pnodes = 5;
        env.policy.max_pnodes = 2;
        assert!(matches!(env.resolve(), Err(EnvelopeError::Invalid(_))));
    }

    #[test]
    fn verification_settings_are_checked_with_clear_errors() {
        let with = |text: &str| {
            let mut env = Envelope::parse(&format!("[op]\nmodel_toml = {GRAPH:?}\n[policy]\n{text}")).unwrap();
            env.op.model = None;
            env.resolve().map(|r| r.envelope.policy)
        };
        let p = with("verify = \"full\"\nreplicas = 3\n").unwrap();
        assert_eq!((p.replicas(), p.quorum(), p.spotcheck_fraction()), (3, 2, 0.1));
        let p = with("verify = \"spotcheck\"\nspotcheck_fraction = 0.25\n").unwrap();
        assert_eq!(p.spotcheck_fraction(), 0.25);
        let msg = |text: &str| with(text).unwrap_err().to_string();
        assert!(msg("verify = \"spotcheck\"\nspotcheck_fraction = 0.0\n").contains("(0, 1]"));
        assert_eq!(with("verify = \"full\"\nsegment_steps = 25\n").unwrap().segment_steps(), 25);
        assert_eq!(with("verify = \"full\"\n").unwrap().segment_steps(), 100);
        assert!(msg("verify = \"full\"\nsegment_steps = 0\n").contains("between 1 and 100000"));
        assert!(msg("segment_steps = 10\n").contains("needs verify"));
        assert!(msg("verify = \"spotcheck\"\nspotcheck_fraction = 1.5\n").contains("(0, 1]"));
        assert!(msg("spotcheck_fraction = 0.5\n").contains("needs verify"));
        assert!(msg("verify = \"spotcheck\"\nreplicas = 3\n").contains("need verify = \"full\""));
        assert!(msg("verify = \"full\"\nreplicas = 4\nquorum = 2\n").contains("more than half"));
        assert!(msg("verify = \"full\"\nreplicas = 1\n").contains("between 2 and 9"));
        assert!(msg("verify = \"full\"\nquorum = 3\n").contains("at most all"));
    }

    #[test]
    fn resolved_envelope_round_trips_through_json() {
        let r = Envelope::from_graph(GRAPH).unwrap().resolve().unwrap();
        let json = serde_json::to_string(&r.envelope).unwrap();
        let again = Envelope::parse(&json).unwrap().resolve().unwrap();
        assert_eq!(again.root_seed, r.root_seed);
        assert_eq!(again.graph, r.graph);
    }
}
