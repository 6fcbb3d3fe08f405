//! The deterministic mesh simulator: the real job core ([`crate::job::core::JobCore`]), the
//! registry's health and trust rules, placement and verification, and the real VNode state
//! machines, wired in memory with a simulated clock and a seeded network (delays, reordering
//! across links, dropped and duplicated messages, partitions) and seeded faults (PNodes that
//! crash, hang, slow down, leave, join or cheat). One thread, no IO, no wall clock: a seed
//! replays exactly, so a failing seed is a one-line reproduction.
//!
//! Each seed draws a scenario and checks invariants on it: the job ends (within a simulated-time
//! bound) with the parameters of the fault-free run, or fails with a record naming why; no
//! honest PNode is ever struck; every (VNode, step) update counts exactly once (the per-step
//! output hashes of every VNode equal the fault-free run's); a report of another generation
//! never changes the job's progress.

use crate::artifacts::MemoryStore;
use crate::data::Splits;
use crate::job::core::{CollectError, DataSizes, Effect, Input, JobCore, PNodeFailure, VNodeAt};
use crate::job::{JobKind, JobSpec, Observation, Observed};
use crate::registry::{Beat, Caps, HealthPolicy, PNodeTable, Registration};
use crate::trust::{Outcome, Transition, TrustBook, TrustPolicy};
use dcnr_model::TrainingMode;
use dcnr_model::dataset::ImageSet;
use dcnr_model::envelope::{Envelope, Verify};
use dcnr_vnode::batches::Feeder;
use dcnr_vnode::fault::{FaultKind, FaultSpec, Injector};
use dcnr_vnode::{HostData, Inbound, Outbound, VNode, VNodeSpec};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

/// The model every scenario trains: small enough for thousands of runs a minute, deep enough
/// that every placement cuts it across PNodes.
const GRAPH: &str = r#"
[model]
name = "sim"
seed = 11
[data]
dataset = "sim"
feature_size = 6
classes = 3
[training]
batch_size = 4
epochs = 2
eval_batch_size = 8
[optimizer]
kind = "adam"
lr = 0.01
[[node]]
id = "fc1"
kind = "linear"
inputs = 6
outputs = 8
[[node]]
id = "act1"
kind = "tanh"
[[node]]
id = "fc2"
kind = "linear"
inputs = 8
outputs = 8
[[node]]
id = "act2"
kind = "relu"
[[node]]
id = "fc3"
kind = "linear"
inputs = 8
outputs = 3
[[node]]
id = "loss"
kind = "softmax_cross_entropy"
[[edge]]
from = "image"
to = "fc1"
[[edge]]
from = "fc1"
to = "act1"
[[edge]]
from = "act1"
to = "fc2"
[[edge]]
from = "fc2"
to = "act2"
[[edge]]
from = "act2"
to = "fc3"
[[edge]]
from = "fc3"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

/// Training and test samples of the simulated data set.
const TRAIN: usize = 48;
const TEST: usize = 16;

/// Simulated time after which a job that has not ended counts as hung.
const TIME_BOUND: Duration = Duration::from_secs(300);

/// Heartbeats and their timeout, as the registry's defaults.
const HEARTBEAT: Duration = Duration::from_millis(200);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// The core's timer.
const TICK: Duration = Duration::from_millis(100);

/// Simulated compute time of one VNode message.
const COMPUTE: Duration = Duration::from_micros(500);

/// RPC deadlines, as the job's exchanges use them.
const RPC_DEADLINE: Duration = Duration::from_secs(5);
const PROBE_DEADLINE: Duration = Duration::from_secs(1);
const RELEASE_DEADLINE: Duration = Duration::from_millis(500);

/// What `orchestrator simulate` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// How many seeds (scenarios) to run.
    #[arg(long, env = "DCNR_SIM_SEEDS", default_value_t = 200)]
    pub seeds: u64,
    /// The first seed; seeds run are `seed..seed + seeds`.
    #[arg(long, env = "DCNR_SIM_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Print every scenario and its outcome.
    #[arg(long)]
    pub verbose: bool,
}

/// What a run of the simulator found.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// Seeds run.
    pub seeds: u64,
    /// The first seed.
    pub first_seed: u64,
    /// How many scenarios had each kind of fault.
    pub scenarios: BTreeMap<String, u64>,
    /// How many scenarios trained in each mode (`exact`, `local`).
    pub modes: BTreeMap<String, u64>,
    /// How the jobs ended (`succeeded`, or `failed:<code>`).
    pub outcomes: BTreeMap<String, u64>,
    /// Every invariant broken, with its seed and reproduction.
    pub violations: Vec<Violation>,
    /// Training steps completed in all scenarios (recomputed ones included).
    pub simulated_steps: u64,
    /// Simulated seconds in all scenarios.
    pub simulated_s: f64,
    /// Wall seconds the run took.
    pub wall_s: f64,
    /// Simulated training steps per wall second.
    pub simulated_steps_per_s: f64,
}

/// One broken invariant.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    /// The seed that broke it.
    pub seed: u64,
    /// What was broken.
    pub what: String,
    /// The command that replays it.
    pub repro: String,
}

/// A fault a scenario injects.
#[derive(Debug, Clone, PartialEq)]
enum Fault {
    /// The PNode's process dies.
    Crash { pnode: usize, at: Duration },
    /// The PNode stops (SIGSTOP): nothing is lost, everything waits.
    Hang { pnode: usize, at: Duration, lasts: Duration },
    /// The PNode is cut off: what is sent to or from it is lost.
    Partition { pnode: usize, at: Duration, lasts: Duration },
    /// The PNode computes this many times slower.
    Slow { pnode: usize, factor: u32 },
    /// The PNode leaves (SIGTERM): it drains, then exits.
    Leave { pnode: usize, at: Duration },
    /// A new PNode joins.
    Join { at: Duration },
    /// The PNode lies about what it computed.
    Cheat { pnode: usize, kind: FaultKind },
    /// The orchestrator dies and comes back `down` later over the same store; with `damage`,
    /// the newest checkpoint in the store is damaged meanwhile.
    Restart { at: Duration, down: Duration, damage: bool },
}

impl Fault {
    fn name(&self) -> &'static str {
        match self {
            Fault::Crash { .. } => "crash",
            Fault::Hang { .. } => "hang",
            Fault::Partition { .. } => "partition",
            Fault::Slow { .. } => "slow",
            Fault::Leave { .. } => "leave",
            Fault::Join { .. } => "join",
            Fault::Cheat { .. } => "cheat",
            Fault::Restart { damage: false, .. } => "restart",
            Fault::Restart { damage: true, .. } => "restart_damaged",
        }
    }
}

/// A drawn scenario.
#[derive(Debug, Clone)]
struct Scenario {
    pnodes: usize,
    in_flight: u32,
    /// Exact or local training.
    mode: TrainingMode,
    /// Data-parallel pipelines.
    pipelines: u32,
    verify: Verify,
    /// One-way delay: base and jitter.
    delay: Duration,
    jitter: Duration,
    /// Chance that one VNode-to-VNode message is lost.
    drop_rate: f64,
    /// Chance that a report reaches the orchestrator twice.
    dup_rate: f64,
    faults: Vec<Fault>,
}

impl Scenario {
    /// The scenario of `seed`.
    fn draw(seed: u64) -> Scenario {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_5eed);
        let verify = match rng.random_range(0..10) {
            0..=5 => Verify::None,
            6..=7 => Verify::Spotcheck,
            _ => Verify::Full,
        };
        let pnodes = match verify {
            Verify::Full => rng.random_range(6..=8),
            _ => rng.random_range(2..=6),
        };
        let in_flight = [1, 2, 4][rng.random_range(0..3)];
        let delay = Duration::from_millis(rng.random_range(1..=30));
        let jitter = Duration::from_millis(rng.random_range(0..=20));
        let drop_rate = if rng.random_range(0..4) == 0 { 0.002 } else { 0.0 };
        let dup_rate = if rng.random_range(0..3) == 0 { 0.02 } else { 0.0 };
        let mut faults = Vec::new();
        let mut cheaters = 0;
        for _ in 0..rng.random_range(0..=3) {
            let pnode = rng.random_range(0..pnodes);
            let at = Duration::from_millis(rng.random_range(50..3000));
            let lasts = Duration::from_millis(rng.random_range(300..4000));
            let fault = match rng.random_range(0..8) {
                0 => Fault::Crash { pnode, at },
                1 => Fault::Hang { pnode, at, lasts },
                2 => Fault::Partition { pnode, at, lasts },
                3 => Fault::Slow { pnode, factor: rng.random_range(3..=20) },
                4 => Fault::Leave { pnode, at },
                5 => Fault::Join { at },
                6 => Fault::Restart { at, down: lasts, damage: rng.random_bool(0.5) },
                _ => {
                    // Results that look plausible are caught only by replicas: full verification.
                    // Without it, only what the cheap checks catch (NaN) may be sent.
                    let kinds: &[FaultKind] = if verify == Verify::Full {
                        &[FaultKind::Corrupt, FaultKind::SignFlip, FaultKind::Scale, FaultKind::Nan, FaultKind::Lazy]
                    } else {
                        &[FaultKind::Nan]
                    };
                    // One cheater at most, so that a quorum of honest PNodes always exists.
                    if cheaters > 0 {
                        continue;
                    }
                    cheaters += 1;
                    Fault::Cheat { pnode, kind: kinds[rng.random_range(0..kinds.len())] }
                }
            };
            faults.push(fault);
        }
        // Drawn from a stream of its own, so adding the mode left every other draw of a seed as
        // it was.
        let mut modes = ChaCha8Rng::seed_from_u64(seed ^ 0x10ca_1000);
        let mode = if modes.random_range(0..3) == 0 { TrainingMode::Local } else { TrainingMode::Exact };
        // Likewise the pipelines: one scenario in three runs two copies that average.
        let mut copies = ChaCha8Rng::seed_from_u64(seed ^ 0xd1_10c0);
        let pipelines = if copies.random_range(0..3) == 0 { 2 } else { 1 };
        Scenario { pnodes, in_flight, mode, pipelines, verify, delay, jitter, drop_rate, dup_rate, faults }
    }

    /// The same mesh with no fault and a quiet network: what every run must equal.
    fn fault_free(&self) -> Scenario {
        Scenario { pnodes: 3, verify: Verify::None, drop_rate: 0.0, dup_rate: 0.0, faults: Vec::new(), ..self.clone() }
    }
}

/// A job as the simulator left it.
#[derive(Debug, Clone, PartialEq)]
struct Ending {
    /// `succeeded`, or `failed:<code>`, or `hung`.
    outcome: String,
    /// The step the job's last run started from (after a restart, its checkpoint's).
    first_step: u64,
    params_sha256: Option<String>,
    /// Per VNode, the output hash of every step that counts.
    outputs: BTreeMap<u32, Vec<String>>,
    steps: u64,
    simulated: Duration,
}

/// Runs `args.seeds` scenarios and reports what they found.
pub fn run(args: &SimArgs) -> Result<SimReport, String> {
    let started = Instant::now();
    let base = Base::new()?;
    let mut reference: BTreeMap<(&str, u32, u32), Ending> = BTreeMap::new();
    let mut report = SimReport {
        seeds: args.seeds,
        first_seed: args.seed,
        scenarios: BTreeMap::new(),
        modes: BTreeMap::new(),
        outcomes: BTreeMap::new(),
        violations: Vec::new(),
        simulated_steps: 0,
        simulated_s: 0.0,
        wall_s: 0.0,
        simulated_steps_per_s: 0.0,
    };
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let scenario = Scenario::draw(seed);
        let key = (scenario.mode.name(), scenario.in_flight, scenario.pipelines);
        if let std::collections::btree_map::Entry::Vacant(slot) = reference.entry(key) {
            let (end, _) = World::new(&base, scenario.fault_free(), 0).run();
            if end.outcome != "succeeded" {
                return Err(format!(
                    "the fault-free run ({} mode, in_flight {}) did not succeed: {}",
                    key.0, scenario.in_flight, end.outcome
                ));
            }
            slot.insert(end);
        }
        let Some(expected) = reference.get(&key) else { continue };
        *report.modes.entry(scenario.mode.name().to_string()).or_default() += 1;
        if scenario.pipelines > 1 {
            *report.modes.entry(format!("{} pipelines", scenario.pipelines)).or_default() += 1;
        }
        let faults: BTreeSet<&str> = scenario.faults.iter().map(Fault::name).collect();
        for f in &faults {
            *report.scenarios.entry((*f).to_string()).or_default() += 1;
        }
        if faults.is_empty() {
            *report.scenarios.entry("none".into()).or_default() += 1;
        }
        let (end, broken) = World::new(&base, scenario.clone(), seed).run();
        if args.verbose {
            eprintln!(
                "seed {seed}: {scenario:?} -> {} after {:.1}s simulated",
                end.outcome,
                end.simulated.as_secs_f64()
            );
        }
        let mut what = broken;
        match end.outcome.as_str() {
            "succeeded" => {
                if end.params_sha256 != expected.params_sha256 {
                    what.push(format!(
                        "params {} differ from the fault-free run's {}",
                        end.params_sha256.as_deref().unwrap_or("-"),
                        expected.params_sha256.as_deref().unwrap_or("-")
                    ));
                }
                let from = end.first_step as usize;
                let tail: BTreeMap<u32, Vec<String>> =
                    expected.outputs.iter().map(|(v, o)| (*v, o.get(from..).unwrap_or_default().to_vec())).collect();
                if end.outputs != tail {
                    what.push("the accepted (VNode, step) outputs differ from the fault-free run's".into());
                }
            }
            "hung" => what.push(format!("the job did not end within {TIME_BOUND:?} of simulated time")),
            _ => {}
        }
        *report.outcomes.entry(end.outcome.clone()).or_default() += 1;
        report.simulated_steps += end.steps;
        report.simulated_s += end.simulated.as_secs_f64();
        for w in what {
            report.violations.push(Violation {
                seed,
                what: w,
                repro: format!("orchestrator simulate --seed {seed} --seeds 1 --verbose"),
            });
        }
    }
    report.wall_s = started.elapsed().as_secs_f64();
    report.simulated_steps_per_s = report.simulated_steps as f64 / report.wall_s.max(1e-9);
    Ok(report)
}

/// The simulator's job on a quiet mesh with `in_flight`, and the sizes of its data sets: a
/// fixture for tests of the job core.
pub fn sample_job(in_flight: u32) -> Result<(JobSpec, DataSizes), String> {
    let base = Base::new()?;
    let scenario = Scenario { in_flight, pipelines: 1, ..Scenario::draw(0).fault_free() };
    let sizes = DataSizes { train: base.data.train.len(), test: base.data.test.len() };
    Ok((base.spec(&scenario), sizes))
}

/// What every scenario shares: the graph, the envelope and the data.
struct Base {
    envelope: Envelope,
    graph: dcnr_model::ValidGraph,
    /// The same job in local mode.
    local: (Envelope, dcnr_model::ValidGraph),
    root_seed: u64,
    data: std::sync::Arc<Splits>,
}

impl Base {
    fn new() -> Result<Base, String> {
        let envelope = Envelope::from_graph(GRAPH).map_err(|e| e.to_string())?;
        let resolved = envelope.clone().resolve().map_err(|e| e.to_string())?;
        let mut local = envelope.clone();
        local.op.mode = Some(TrainingMode::Local);
        let local = local.resolve().map_err(|e| e.to_string())?;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut set = |n: usize| ImageSet {
            rows: 2,
            cols: 3,
            images: (0..n * 6).map(|_| rng.random_range(0..=255u8)).collect(),
            labels: (0..n).map(|_| rng.random_range(0..3u8)).collect(),
        };
        let data = std::sync::Arc::new(Splits { train: set(TRAIN), test: set(TEST), classes: 3 });
        Ok(Base {
            envelope: resolved.envelope,
            graph: resolved.graph,
            local: (local.envelope, local.graph),
            root_seed: resolved.root_seed,
            data,
        })
    }

    fn spec(&self, scenario: &Scenario) -> JobSpec {
        let (envelope, graph) = match scenario.mode {
            TrainingMode::Exact => (&self.envelope, &self.graph),
            TrainingMode::Local => (&self.local.0, &self.local.1),
        };
        let (mut envelope, graph) = if scenario.pipelines > 1 {
            let mut e = envelope.clone();
            e.op.pipelines = Some(scenario.pipelines);
            e.op.sync_every = Some(5);
            // The base envelopes resolved; the same with two pipelines of this tiny graph does too.
            match e.resolve() {
                Ok(r) => (r.envelope, r.graph),
                Err(_) => (envelope.clone(), graph.clone()),
            }
        } else {
            (envelope.clone(), graph.clone())
        };
        envelope.policy.verify = scenario.verify;
        envelope.policy.segment_steps = (scenario.verify != Verify::None).then_some(6);
        envelope.checkpoint.every_steps = Some(8);
        let steps = dcnr_vnode::rounds::RoundPlan::new(&graph, TRAIN).steps();
        JobSpec {
            job_id: "sim".into(),
            graph,
            steps,
            in_flight: scenario.in_flight,
            root_seed: self.root_seed,
            max_pnodes: 16,
            step_deadline: Duration::from_secs(30),
            recovery_every: Duration::from_secs(1),
            placement_timeout: Duration::from_secs(10),
            min_pnodes: 1,
            timeout: Duration::from_secs(240),
            envelope,
            persist: true,
            resume: None,
            kind: JobKind::Primary,
            first_generation: 1,
        }
    }
}

/// One PNode of the simulated mesh.
struct SimPNode {
    id: String,
    endpoint: String,
    alive: bool,
    /// Stopped until then: messages wait, heartbeats stop.
    hung_until: Duration,
    /// Cut off until then: messages are lost, heartbeats stop.
    cut_until: Duration,
    slow: u32,
    cheat: Option<Injector>,
    leaving: bool,
    busy_until: Duration,
    /// (job, vnode) -> (generation, state machine).
    hosted: BTreeMap<(String, u32), (u32, VNode)>,
}

impl SimPNode {
    fn responsive(&self, now: Duration) -> bool {
        self.alive && now >= self.hung_until && now >= self.cut_until
    }
}

/// What every simulated PNode offers (one determinism class: honest executions agree).
pub(crate) fn sim_caps() -> Caps {
    Caps {
        cores: 2,
        memory_bytes: 1 << 32,
        arch: "x86_64".into(),
        os: "linux".into(),
        gpu: String::new(),
        determinism_class: "sim".into(),
        gpu_gflops: 0,
        gpu_determinism_class: String::new(),
    }
}

/// What a simulated PNode registers with.
fn registration(id: &str, endpoint: &str) -> Registration {
    Registration {
        id: id.to_string(),
        public_key: String::new(),
        trusted: false,
        name: id.to_string(),
        endpoint: endpoint.to_string(),
        caps: sim_caps(),
        reach: Default::default(),
    }
}

#[derive(Debug)]
enum Event {
    /// An input for a job's core, sent while the orchestrator ran as `epoch`.
    Input(u32, String, Input),
    /// The orchestrator starts again and resumes its job from the store.
    OrchestratorUp,
    /// A VNode message reaches a PNode.
    Deliver { pnode: String, job: String, generation: u32, vnode: u32, msg: Inbound },
    /// A PNode's heartbeat is due.
    Heartbeat(String),
    /// Every job's timer.
    Tick,
    /// A fault strikes.
    Fault(Fault),
}

/// The simulated mesh: one scenario, run to its end.
struct World<'a> {
    base: &'a Base,
    scenario: Scenario,
    rng: ChaCha8Rng,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: BTreeMap<u64, Event>,
    registry: PNodeTable,
    pnodes: BTreeMap<String, SimPNode>,
    /// Endpoint -> PNode id.
    by_endpoint: BTreeMap<String, String>,
    jobs: BTreeMap<String, JobCore>,
    /// (job, vnode) -> PNode id, as the job table routes VNode traffic.
    locations: BTreeMap<(String, u32), String>,
    /// Per link (from, to), the time of its last delivery: a link delivers in order.
    links: BTreeMap<(String, String), Duration>,
    cheaters: BTreeSet<String>,
    broken: Vec<String>,
    ending: Option<Ending>,
    /// Training steps completed by the job, recomputed ones included.
    steps: u64,
    /// Whether the orchestrator runs.
    up: bool,
    /// Which run of the orchestrator this is (a restart starts the next).
    epoch: u32,
    /// The store the orchestrator keeps checkpoints in; it outlives the orchestrator.
    store: MemoryStore,
    /// The objects the newest checkpoint wrote.
    newest_checkpoint: BTreeSet<String>,
    /// The step the running job started from (a resumed one: its checkpoint's).
    first_step: u64,
}

impl<'a> World<'a> {
    fn new(base: &'a Base, scenario: Scenario, seed: u64) -> World<'a> {
        let mut w = World {
            base,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            registry: PNodeTable::new(
                HealthPolicy { interval: HEARTBEAT, timeout: HEARTBEAT_TIMEOUT },
                TrustBook::new(TrustPolicy::default()),
            ),
            pnodes: BTreeMap::new(),
            by_endpoint: BTreeMap::new(),
            jobs: BTreeMap::new(),
            locations: BTreeMap::new(),
            links: BTreeMap::new(),
            cheaters: BTreeSet::new(),
            broken: Vec::new(),
            ending: None,
            steps: 0,
            up: true,
            epoch: 0,
            store: MemoryStore::default(),
            newest_checkpoint: BTreeSet::new(),
            first_step: 0,
            scenario,
        };
        for _ in 0..w.scenario.pnodes {
            w.join();
        }
        for f in w.scenario.faults.clone() {
            match f {
                Fault::Slow { pnode, factor } => {
                    if let Some(p) = w.nth(pnode) {
                        p.slow = factor;
                    }
                }
                Fault::Cheat { pnode, kind } => {
                    let spec = FaultSpec { kind, rate: 1.0 };
                    if let Some(p) = w.nth(pnode) {
                        p.cheat = Some(Injector::new(spec, seed, Duration::ZERO));
                        let id = p.id.clone();
                        w.cheaters.insert(id);
                    }
                }
                Fault::Crash { at, .. }
                | Fault::Hang { at, .. }
                | Fault::Partition { at, .. }
                | Fault::Leave { at, .. }
                | Fault::Join { at }
                | Fault::Restart { at, .. } => w.at(at, Event::Fault(f)),
            }
        }
        w
    }

    fn nth(&mut self, i: usize) -> Option<&mut SimPNode> {
        self.pnodes.values_mut().nth(i)
    }

    fn join(&mut self) {
        let n = self.pnodes.len();
        let id = format!("pnode-{n:02}");
        let p = SimPNode {
            endpoint: format!("http://sim-{n}:7000"),
            id: id.clone(),
            alive: true,
            hung_until: Duration::ZERO,
            cut_until: Duration::ZERO,
            slow: 1,
            cheat: None,
            leaving: false,
            busy_until: Duration::ZERO,
            hosted: BTreeMap::new(),
        };
        let _ = self.registry.register(registration(&id, &p.endpoint), self.now);
        self.by_endpoint.insert(p.endpoint.clone(), id.clone());
        self.pnodes.insert(id.clone(), p);
        self.at(self.now + HEARTBEAT, Event::Heartbeat(id));
    }

    /// Sends `input` to `job`'s core, to arrive at `t` (lost if the orchestrator dies first).
    fn send_to_job(&mut self, t: Duration, job: impl Into<String>, input: Input) {
        self.at(t, Event::Input(self.epoch, job.into(), input));
    }

    /// The orchestrator is back: it resumes the job from its newest intact checkpoint.
    fn orchestrator_up(&mut self) {
        self.up = true;
        let from =
            futures::executor::block_on(crate::checkpoints::load_latest(&self.store, "sim")).ok().map(|(_, f)| f);
        let mut spec = self.base.spec(&self.scenario);
        self.first_step = from.as_ref().map_or(0, |f| f.step);
        spec.resume = from;
        // As `job::first_generation_now` does with the wall clock: tenths of a second.
        spec.first_generation = u32::try_from(self.now.as_millis() / 100).unwrap_or(u32::MAX).max(1);
        let sizes = DataSizes { train: self.base.data.train.len(), test: self.base.data.test.len() };
        self.jobs.insert(spec.job_id.clone(), JobCore::new(spec, sizes, self.now));
        self.send_to_job(self.now, "sim", Input::Start);
    }

    fn at(&mut self, t: Duration, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq)));
        self.events.insert(self.seq, e);
    }

    /// One-way delay of a message, drawn.
    fn delay(&mut self) -> Duration {
        let j = self.scenario.jitter.as_micros() as u64;
        self.scenario.delay + Duration::from_micros(if j == 0 { 0 } else { self.rng.random_range(0..=j) })
    }

    /// When a message sent now on link `from -> to` arrives (links keep order).
    fn arrival(&mut self, from: &str, to: &str, extra: Duration) -> Duration {
        let d = if from == to { Duration::ZERO } else { self.delay() };
        let key = (from.to_string(), to.to_string());
        let t = (self.now + extra + d).max(self.links.get(&key).copied().unwrap_or_default());
        self.links.insert(key, t);
        t
    }

    fn run(mut self) -> (Ending, Vec<String>) {
        let spec = self.base.spec(&self.scenario);
        let sizes = DataSizes { train: self.base.data.train.len(), test: self.base.data.test.len() };
        self.jobs.insert(spec.job_id.clone(), JobCore::new(spec, sizes, Duration::ZERO));
        self.send_to_job(Duration::ZERO, "sim", Input::Start);
        self.at(TICK, Event::Tick);
        while let Some(Reverse((t, seq))) = self.queue.pop() {
            if t > TIME_BOUND {
                break;
            }
            self.now = t;
            let Some(e) = self.events.remove(&seq) else { continue };
            self.handle(e);
            if self.ending.is_some() {
                break;
            }
        }
        let ending = self.ending.take().unwrap_or(Ending {
            outcome: "hung".into(),
            first_step: self.first_step,
            params_sha256: None,
            outputs: BTreeMap::new(),
            steps: self.steps,
            simulated: self.now,
        });
        (ending, self.broken)
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::Input(epoch, job, input) => {
                // What was sent to an orchestrator that died since is lost with it.
                if epoch == self.epoch && self.up {
                    self.input(&job, input);
                }
            }
            Event::OrchestratorUp => self.orchestrator_up(),
            Event::Deliver { pnode, job, generation, vnode, msg } => self.deliver(&pnode, &job, generation, vnode, msg),
            Event::Heartbeat(id) => self.heartbeat(&id),
            Event::Tick => {
                let ids: Vec<String> = self.jobs.keys().cloned().collect();
                for id in ids {
                    self.input(&id, Input::Tick);
                }
                self.at(self.now + TICK, Event::Tick);
            }
            Event::Fault(f) => self.fault(f),
        }
    }

    fn fault(&mut self, f: Fault) {
        let now = self.now;
        match f {
            Fault::Crash { pnode, .. } => {
                if let Some(p) = self.nth(pnode) {
                    p.alive = false;
                    p.hosted.clear();
                }
            }
            Fault::Hang { pnode, lasts, .. } => {
                if let Some(p) = self.nth(pnode) {
                    p.hung_until = now + lasts;
                }
            }
            Fault::Partition { pnode, lasts, .. } => {
                if let Some(p) = self.nth(pnode) {
                    p.cut_until = now + lasts;
                }
            }
            Fault::Leave { pnode, .. } => {
                let Some(p) = self.nth(pnode) else { return };
                if !p.alive || p.leaving {
                    return;
                }
                p.leaving = true;
                let id = p.id.clone();
                self.registry.drain(&id);
                let jobs: Vec<String> = self.jobs.keys().cloned().collect();
                for j in jobs {
                    let t = self.now + self.scenario.delay;
                    self.send_to_job(t, j, Input::Evacuate(id.clone()));
                }
                self.exit_if_drained(&id);
            }
            Fault::Join { .. } => self.join(),
            Fault::Restart { down, damage, .. } => {
                if !self.up {
                    // Already down: it comes back as planned.
                    return;
                }
                if damage {
                    for h in std::mem::take(&mut self.newest_checkpoint) {
                        self.store.damage(&h);
                    }
                }
                self.up = false;
                self.epoch += 1;
                self.jobs.clear();
                // The trust book is in the store; everything else the orchestrator knew is gone.
                let trust = self.registry.trust().clone();
                self.registry =
                    PNodeTable::new(HealthPolicy { interval: HEARTBEAT, timeout: HEARTBEAT_TIMEOUT }, trust);
                self.locations.clear();
                self.at(now + down, Event::OrchestratorUp);
            }
            Fault::Slow { .. } | Fault::Cheat { .. } => {}
        }
    }

    /// A leaving PNode exits once it hosts nothing (the registry then hears nothing more).
    fn exit_if_drained(&mut self, id: &str) {
        if let Some(p) = self.pnodes.get_mut(id)
            && p.leaving
            && p.hosted.is_empty()
        {
            p.alive = false;
        }
    }

    fn heartbeat(&mut self, id: &str) {
        let now = self.now;
        let Some(p) = self.pnodes.get(id) else { return };
        if !p.alive {
            return;
        }
        // While the orchestrator is down, heartbeats fail and the PNode keeps what it hosts.
        if self.up && p.responsive(now) && self.registry.heartbeat(id, 0, false, now) != Beat::Alive {
            // Declared lost meanwhile: it registers anew with a clean slate.
            let (endpoint, leaving) = (p.endpoint.clone(), p.leaving);
            if let Some(p) = self.pnodes.get_mut(id) {
                p.hosted.clear();
            }
            if !leaving {
                let _ = self.registry.register(registration(id, &endpoint), now);
            }
        }
        self.at(now + HEARTBEAT, Event::Heartbeat(id.to_string()));
    }

    /// The PNode at `endpoint`, by id.
    fn pnode_at(&self, endpoint: &str) -> Option<String> {
        self.by_endpoint.get(endpoint).cloned()
    }

    /// When an RPC to `pnode` answers, and whether it succeeds: a dead PNode refuses at once,
    /// a stopped or cut-off one times out at `deadline`.
    fn rpc(&mut self, pnode: &str, deadline: Duration) -> (Duration, bool) {
        let now = self.now;
        let rtt = self.delay() + self.delay();
        match self.pnodes.get(pnode) {
            Some(p) if p.responsive(now) => (now + rtt, true),
            Some(p) if p.alive => (now + deadline, false),
            _ => (now + rtt, false),
        }
    }

    fn input(&mut self, job: &str, input: Input) {
        let Some(core) = self.jobs.get_mut(job) else { return };
        let stale = match &input {
            Input::Observation(o) => (o.generation != core.generation()).then_some(core.completed()),
            _ => None,
        };
        core.step(input, self.now);
        if let Some(before) = stale
            && core.completed() != before
        {
            self.broken.push(format!("a report of an older generation changed job {job}'s progress"));
        }
        let effects = core.take_effects();
        for e in effects {
            self.effect(job, e);
        }
    }

    fn effect(&mut self, job: &str, e: Effect) {
        let now = self.now;
        match e {
            Effect::ListPNodes { generation } => {
                let view = self.registry.list(now);
                self.send_to_job(now, job, Input::View { view, generation });
            }
            Effect::Release { endpoints, generation } => {
                let mut done = now;
                for ep in endpoints {
                    let Some(id) = self.pnode_at(&ep) else { continue };
                    let (t, ok) = self.rpc(&id, RELEASE_DEADLINE);
                    done = done.max(t);
                    if ok {
                        self.release(&id, job);
                    }
                }
                self.send_to_job(done, job, Input::Released { generation });
            }
            Effect::Allocate { generation, allocations } => {
                let mut done = now;
                let mut result = Ok(());
                let spec = self.jobs.get(job).map(|c| c.spec().clone());
                let Some(spec) = spec else { return };
                for a in allocations {
                    let (t, ok) = self.rpc(&a.pnode, RPC_DEADLINE);
                    done = done.max(t);
                    if !ok {
                        if result.is_ok() {
                            result = Err(PNodeFailure { pnode: a.pnode.clone(), why: "unreachable".into() });
                        }
                        continue;
                    }
                    for (vnode, state) in a.vnodes {
                        let Some(node) = spec.graph.nodes.get(vnode as usize).cloned() else { continue };
                        let vspec = VNodeSpec {
                            node,
                            optimizer: spec.graph.spec.optimizer,
                            recipe: spec.graph.spec.training.recipe(),
                            root_seed: spec.root_seed,
                            in_flight: spec.in_flight,
                            averaging: dcnr_vnode::rounds::Averaging::of(&spec.graph, TRAIN),
                            compute: Default::default(),
                        };
                        let v = if state.is_empty() { Ok(VNode::new(vspec)) } else { VNode::restore(vspec, &state) };
                        let v = v.map(|v| v.with_normalize(spec.graph.spec.data.normalize));
                        match v {
                            Ok(v) => {
                                if let Some(p) = self.pnodes.get_mut(&a.pnode) {
                                    p.hosted.insert((job.to_string(), vnode), (generation, v));
                                }
                            }
                            Err(e) => {
                                if result.is_ok() {
                                    result = Err(PNodeFailure { pnode: a.pnode.clone(), why: e.to_string() });
                                }
                            }
                        }
                    }
                }
                self.send_to_job(done, job, Input::Allocated { generation, result });
            }
            Effect::Placed { locations } => {
                self.locations.retain(|k, _| k.0 != job);
                for (v, ep) in locations {
                    if let Some(id) = self.pnode_at(&ep) {
                        self.locations.insert((job.to_string(), v), id);
                    }
                }
            }
            Effect::Feed { generation, mb, phase, batch, targets } => {
                // What a PNode does with a feed request: build the input from the data it holds.
                let Some(spec) = self.jobs.get(job).map(|c| c.spec().clone()) else { return };
                let training = &spec.graph.spec.training;
                for t in targets {
                    let Some(node) = spec.graph.nodes.get(t.at.vnode as usize) else { continue };
                    let data = self.base.data.clone();
                    let feeder = Feeder::new(node, data, training.batch_size, training.eval_batch_size, spec.root_seed);
                    let Some(Ok(msg)) = feeder.map(|mut f| f.inbound(mb, phase, t.port, batch)) else { continue };
                    let arrive = self.arrival("orchestrator", &t.at.pnode, Duration::ZERO);
                    let ev = Event::Deliver {
                        pnode: t.at.pnode.clone(),
                        job: job.into(),
                        generation,
                        vnode: t.at.vnode,
                        msg,
                    };
                    self.at(arrive, ev);
                }
            }
            Effect::DropLinks => {}
            Effect::FetchStates { generation, targets } => {
                let (t, result) = self.gather(job, &targets, |v| v.snapshot().map_err(|e| e.to_string()));
                let result = result.map(|s| targets.iter().map(|t| t.vnode).zip(s).collect());
                self.send_to_job(t, job, Input::StatesFetched { generation, result });
            }
            Effect::FetchParams { generation, targets } => {
                let (t, result) = self.gather(job, &targets, |v| {
                    let ps = v.params();
                    Ok(ps
                        .into_iter()
                        .filter_map(|t| match t.data {
                            HostData::F32(v) => Some(v),
                            _ => None,
                        })
                        .collect::<Vec<_>>())
                });
                let result = result.map_err(CollectError::Unreachable);
                self.send_to_job(t, job, Input::ParamsFetched { generation, result });
            }
            Effect::Probe { generation, pnodes } => {
                let mut done = now;
                let mut answers = Vec::new();
                for (id, _) in pnodes {
                    let (t, ok) = self.rpc(&id, PROBE_DEADLINE);
                    done = done.max(t);
                    answers.push((id, if ok { Ok(Vec::new()) } else { Err("no answer".to_string()) }));
                }
                self.send_to_job(done, job, Input::ProbeAnswered { generation, answers });
            }
            Effect::MarkLost(id) => {
                self.registry.mark_lost(&id);
            }
            Effect::Credit(id) => {
                self.registry.record_outcome(&id, &Outcome::Valid);
            }
            Effect::Strike { pnode, reason, at_step } => {
                if !self.cheaters.contains(&pnode) {
                    self.broken.push(format!("honest {pnode} was struck: {reason}"));
                }
                let transition = self.registry.record_outcome(&pnode, &Outcome::Invalid(reason));
                if matches!(transition, Transition::Quarantined(_)) && !self.cheaters.contains(&pnode) {
                    self.broken.push(format!("honest {pnode} was quarantined"));
                }
                self.send_to_job(now, job, Input::StrikeRecorded { pnode, at_step, transition });
            }
            Effect::Checkpoint(snapshot) => {
                let before = self.store.hashes();
                if futures::executor::block_on(crate::checkpoints::write(&self.store, &snapshot)).is_ok() {
                    self.newest_checkpoint = self.store.hashes().difference(&before).cloned().collect();
                }
            }
            Effect::StartReplica(spec) => {
                let id = spec.job_id.clone();
                let sizes = DataSizes { train: self.base.data.train.len(), test: self.base.data.test.len() };
                self.jobs.insert(id.clone(), JobCore::new(*spec, sizes, now));
                self.send_to_job(now, id, Input::Start);
            }
            Effect::CancelReplica(id) => self.send_to_job(now, id, Input::Cancel),
            Effect::AnswerParent(done) => {
                let parent = done.parent.clone();
                self.send_to_job(now, parent, Input::ReplicaDone(Box::new(done)));
            }
            Effect::Log(_) | Effect::Failed { .. } | Effect::Event(_) | Effect::Watchers(_) | Effect::Status(_) => {}
            Effect::Finish { status, release, .. } => {
                for ep in release {
                    if let Some(id) = self.pnode_at(&ep) {
                        self.release(&id, job);
                    }
                }
                let core = self.jobs.remove(job);
                if job == "sim" {
                    let summary = status.summary;
                    let outcome = match (&summary, core.as_ref().and_then(JobCore::error_code)) {
                        (Some(s), None) if s.status == "succeeded" => "succeeded".to_string(),
                        (_, Some(code)) => format!("failed:{code}"),
                        _ => {
                            self.broken.push("the job failed without naming why".into());
                            "failed:unknown".into()
                        }
                    };
                    self.ending = Some(Ending {
                        outcome,
                        first_step: self.first_step,
                        params_sha256: summary.and_then(|s| s.params_sha256),
                        outputs: core.map(|c| c.output_hashes()).unwrap_or_default(),
                        steps: self.steps,
                        simulated: now,
                    });
                }
            }
        }
    }

    /// Asks each target's PNode for `f` of its VNode; the answer time and the results in order,
    /// or the first PNode that failed.
    fn gather<T>(
        &mut self,
        job: &str,
        targets: &[VNodeAt],
        f: impl Fn(&VNode) -> Result<T, String>,
    ) -> (Duration, Result<Vec<T>, PNodeFailure>) {
        let mut done = self.now;
        let mut out = Vec::new();
        let mut failure = None;
        for t in targets {
            let (at, ok) = self.rpc(&t.pnode, RPC_DEADLINE);
            done = done.max(at);
            let got = if ok {
                self.pnodes
                    .get(&t.pnode)
                    .and_then(|p| p.hosted.get(&(job.to_string(), t.vnode)))
                    .ok_or_else(|| format!("vnode {} is not hosted", t.vnode))
                    .and_then(|(_, v)| f(v))
            } else {
                Err("unreachable".to_string())
            };
            match got {
                Ok(v) => out.push(v),
                Err(why) => {
                    failure.get_or_insert(PNodeFailure { pnode: t.pnode.clone(), why });
                }
            }
        }
        (done, failure.map_or(Ok(out), Err))
    }

    fn release(&mut self, pnode: &str, job: &str) {
        if let Some(p) = self.pnodes.get_mut(pnode) {
            p.hosted.retain(|k, _| k.0 != job);
        }
        self.exit_if_drained(pnode);
    }

    /// A VNode message reaches `pnode`.
    fn deliver(&mut self, pnode: &str, job: &str, generation: u32, vnode: u32, msg: Inbound) {
        let now = self.now;
        let Some(p) = self.pnodes.get_mut(pnode) else { return };
        if !p.alive || now < p.cut_until {
            return;
        }
        if now < p.hung_until {
            let t = p.hung_until;
            return self.at(t, Event::Deliver { pnode: pnode.into(), job: job.into(), generation, vnode, msg });
        }
        let Some((g, v)) = p.hosted.get_mut(&(job.to_string(), vnode)) else { return };
        if *g != generation {
            return;
        }
        let start = now.max(p.busy_until);
        let done = start + COMPUTE * p.slow;
        p.busy_until = done;
        let mut reports = Vec::new();
        let mut sends = Vec::new();
        match v.receive(msg) {
            Err(r) => {
                let from_vnode = match r.from {
                    dcnr_vnode::sanity::Sender::VNode(v) => Some(v),
                    dcnr_vnode::sanity::Sender::Data => None,
                };
                reports.push((r.mb, Observed::Rejected { from_vnode, reason: r.to_string() }));
            }
            Ok(handled) => match handled {
                Ok(outs) => {
                    for out in outs {
                        let out = match &p.cheat {
                            Some(inj) => inj.apply(job, vnode, out),
                            None => out,
                        };
                        let out = match out.into_delivery() {
                            Ok(delivery) => {
                                sends.push(delivery);
                                continue;
                            }
                            Err(report) => report,
                        };
                        match out {
                            Outbound::Forward { .. }
                            | Outbound::Backward { .. }
                            | Outbound::Sync { .. }
                            | Outbound::Predictions { .. } => {}
                            Outbound::Done {
                                mb,
                                compute_us,
                                cpu_us,
                                bytes_in,
                                bytes_out,
                                output_sha256,
                                round_sha256,
                            } => {
                                reports.push((
                                    mb,
                                    Observed::Done {
                                        compute_us,
                                        cpu_us,
                                        bytes_in,
                                        bytes_out,
                                        output_sha256: hex::encode(output_sha256),
                                        round_sha256: round_sha256.map(hex::encode),
                                        // The simulation moves tensors without sealing them.
                                        inputs: Vec::new(),
                                    },
                                ));
                            }
                            Outbound::Loss { mb, phase, loss, correct, count } => {
                                reports.push((mb, Observed::Loss { phase, loss, correct, count }));
                            }
                        }
                    }
                }
                Err(e) if e.is_stale() => {}
                Err(e) => reports.push((0, Observed::Failure(e.to_string()))),
            },
        }
        for (to, msg) in sends {
            let Some(dest) = self.locations.get(&(job.to_string(), to)).cloned() else { continue };
            if self.rng.random_bool(self.scenario.drop_rate) {
                continue;
            }
            let t = self.arrival(pnode, &dest, done.saturating_sub(now));
            self.at(t, Event::Deliver { pnode: dest, job: job.into(), generation, vnode: to, msg });
        }
        for (mb, body) in reports {
            if job == "sim" && matches!(body, Observed::Done { .. }) && vnode == 0 {
                self.steps += 1;
            }
            let o = Observation { job_id: job.into(), vnode, mb, pnode: pnode.into(), generation, body };
            let copies = if self.rng.random_bool(self.scenario.dup_rate) { 2 } else { 1 };
            for _ in 0..copies {
                let t = self.arrival(pnode, "orchestrator", done.saturating_sub(now));
                self.send_to_job(t, job, Input::Observation(o.clone()));
            }
        }
    }
}

/// Prints a report for people.
pub fn print(r: &SimReport) {
    println!(
        "simulated {} seed(s) from {}: {} violation(s); {} steps in {:.0} simulated s, {:.1} wall s ({:.0} steps/s)",
        r.seeds,
        r.first_seed,
        r.violations.len(),
        r.simulated_steps,
        r.simulated_s,
        r.wall_s,
        r.simulated_steps_per_s
    );
    println!("scenarios: {:?}", r.scenarios);
    println!("modes: {:?}", r.modes);
    println!("outcomes: {:?}", r.outcomes);
    for v in &r.violations {
        println!("seed {}: {} (replay: {})", v.seed, v.what, v.repro);
    }
}
