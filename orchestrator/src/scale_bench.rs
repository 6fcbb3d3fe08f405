//! `bench-scale`: the control plane at volunteer scale, in memory: no network, no actors.
//!
//! `--pnodes` simulated PNodes (cores 2-32, 4-64 GiB, three determinism classes, a few with a
//! GPU) register in a [`PNodeTable`] and heartbeat at the orchestrator's default interval on a
//! simulated clock; a few stay silent (and are lost), drain, or get quarantined. Then `--jobs`
//! jobs totalling `--vnodes` VNodes (deep MLPs of three widths and varying depth; one in ten a
//! replica that must keep off its parent's PNodes and machines and stay in its class; one in
//! twenty targeting GPUs) are placed one after the other through the job actor's path: the
//! demands of the graph, [`placement::eligible`] over the table ([`PNodeTable::candidates`]),
//! and [`placement::place`]; each job reserves the memory it takes, so later jobs see what is
//! left. Reported: placement time, the share of one core heartbeats cost, and the table's
//! memory.

use crate::bench::percentile;
use crate::client::ClientError;
use crate::placement::{self, Eligibility};
use crate::registry::{Beat, Caps, HealthPolicy, PNodeTable, Registration};
use crate::server::{DEFAULT_HEARTBEAT_MS, DEFAULT_HEARTBEAT_TIMEOUT_MS, DEFAULT_MAX_PNODES};
use crate::trust::{Outcome, TrustBook, TrustPolicy};
use dcnr_model::envelope::Target;
use dcnr_model::{ModelGraph, ValidGraph};
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A job's placement and the class it asked for, as the next job of the same shape reuses them.
type PreviousJob = (Vec<(u32, String)>, Option<String>);

/// Flags of `bench-scale`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleBenchArgs {
    /// PNodes in the simulated mesh.
    #[arg(long, default_value_t = 10_000)]
    pub pnodes: usize,
    /// VNodes over all jobs.
    #[arg(long, default_value_t = 100_000)]
    pub vnodes: usize,
    /// Jobs (their sizes vary around vnodes / jobs).
    #[arg(long, default_value_t = 1_000)]
    pub jobs: usize,
    /// Heartbeat rounds timed (every live PNode beats once per round).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Most PNodes one job spreads over (as `serve --max-pnodes`).
    #[arg(long, default_value_t = DEFAULT_MAX_PNODES)]
    pub max_pnodes: usize,
    /// Seed of the simulated mesh.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleBenchReport {
    /// PNodes registered.
    pub pnodes: usize,
    /// Of them healthy and not quarantined when jobs were placed.
    pub pnodes_placeable: usize,
    /// Jobs asked for.
    pub jobs: usize,
    /// VNodes asked for, over all jobs.
    pub vnodes: usize,
    /// Jobs placed.
    pub jobs_placed: usize,
    /// VNodes placed.
    pub vnodes_placed: usize,
    /// Why jobs were not placed (the first few).
    pub failures: Vec<String>,
    /// PNodes that got at least one VNode.
    pub pnodes_used: usize,
    /// Most VNodes placed on one PNode.
    pub most_vnodes_on_one_pnode: u32,
    /// Placing every job: CPU time of the placing thread, in seconds (goal <= 1 s for 100k
    /// VNodes over 10k PNodes). The benchmark is single-threaded, so on an idle core this is
    /// the wall time.
    pub placement_cpu_s: f64,
    /// The same in wall time, which on a busy machine includes other processes' time slices.
    pub placement_wall_s: f64,
    /// Median wall time to place one job, in milliseconds.
    pub placement_job_p50_ms: f64,
    /// 99th percentile, in milliseconds (preemptions included).
    pub placement_job_p99_ms: f64,
    /// Slowest job, in milliseconds.
    pub placement_job_max_ms: f64,
    /// Heartbeat period of every PNode (the orchestrator's default), in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Heartbeats timed.
    pub heartbeats: u64,
    /// CPU time of one heartbeat through the table, in nanoseconds (gRPC decoding and the
    /// actor's mailbox not included).
    pub heartbeat_ns: f64,
    /// Share of one core the table spends on heartbeats of every PNode at the interval (goal <= 0.1).
    pub heartbeat_core_share: f64,
    /// Bytes the table holds for all PNodes, trust book included.
    pub registry_bytes: u64,
    /// The same per PNode.
    pub registry_bytes_per_pnode: f64,
    /// How `registry_bytes` was obtained: "counting allocator" (bytes requested while the table
    /// was built, allocator overhead excluded) or "estimate from sizes" (where the allocator is
    /// not installed, e.g. in unit tests).
    pub registry_bytes_method: String,
    /// The estimate from sizes (`PNodeTable::footprint`), for comparison.
    pub registry_bytes_estimate: u64,
    /// Placement within 1 s of CPU time.
    pub placement_goal_met: bool,
    /// Heartbeats within 10% of a core.
    pub heartbeat_goal_met: bool,
}

/// Determinism classes of the simulated mesh, with their weights in percent.
const CLASSES: [(&str, u64); 3] = [
    ("gemm-0.19+flex-0.22/x86_64/avx2+fma", 60),
    ("gemm-0.19+flex-0.22/x86_64/avx2+fma+avx512f", 25),
    ("gemm-0.19+flex-0.22/aarch64/", 15),
];
const CORES: [u32; 8] = [2, 4, 6, 8, 12, 16, 24, 32];
const MEMORY_GIB: [u64; 5] = [4, 8, 16, 32, 64];
/// Layer widths of the jobs' MLPs: small, medium, large.
const WIDTHS: [usize; 3] = [64, 256, 1024];
const BATCH: usize = 64;
const GIB: u64 = 1 << 30;

/// One simulated PNode, fixed before the table is built so the table's memory is measured alone.
struct Plan {
    cores: u32,
    memory_bytes: u64,
    class: &'static str,
    gpu: bool,
    /// Shares a machine with the PNode before it (a volunteer running two).
    same_host: bool,
    /// Never heartbeats after registering: lost by placement time.
    silent: bool,
    draining: bool,
    quarantined: bool,
}

fn plan(n: usize, seed: u64) -> Vec<Plan> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pick = |m: u64| rng.next_u64() % m;
    (0..n)
        .map(|i| {
            let mut c = pick(100);
            let class = CLASSES
                .iter()
                .find(|(_, w)| {
                    let hit = c < *w;
                    c = c.saturating_sub(*w);
                    hit
                })
                .map_or(CLASSES[0].0, |(name, _)| *name);
            Plan {
                cores: CORES[pick(CORES.len() as u64) as usize],
                memory_bytes: MEMORY_GIB[pick(MEMORY_GIB.len() as u64) as usize] * GIB,
                class,
                gpu: pick(100) < 5,
                same_host: i > 0 && pick(100) < 2,
                silent: pick(100) < 2,
                draining: pick(100) < 1,
                quarantined: pick(100) < 1,
            }
        })
        .collect()
}

fn pnode_id(i: usize) -> String {
    // The shape of real ids (`dcnr_proto::identity::pnode_id`): lookups compare strings like these.
    format!("pn-{}", &hex::encode(Sha256::digest((i as u64).to_le_bytes()))[..16])
}

fn registration(i: usize, host: usize, p: &Plan) -> Registration {
    let key = hex::encode(Sha256::digest((i as u64 ^ 0x5eed).to_le_bytes()));
    Registration {
        id: pnode_id(i),
        public_key: key,
        trusted: false,
        name: format!("volunteer-{i}"),
        endpoint: format!("http://10.{}.{}.{}:7071", (host >> 16) & 0xff, (host >> 8) & 0xff, host & 0xff),
        caps: Caps {
            cores: p.cores,
            memory_bytes: p.memory_bytes,
            arch: if p.class.contains("aarch64") { "aarch64" } else { "x86_64" }.into(),
            os: "linux".into(),
            gpu: if p.gpu { "NVIDIA GeForce RTX 3060".into() } else { String::new() },
            determinism_class: p.class.into(),
            gpu_gflops: if p.gpu { 12_000 } else { 0 },
            gpu_determinism_class: String::new(),
        },
        reach: Default::default(),
    }
}

/// A deep MLP of `n` VNodes and layer width `w`: 784 -> w, then alternating tanh and w -> w,
/// w -> 10, loss.
fn wide_mlp(n: usize, w: usize) -> Result<ValidGraph, ClientError> {
    if n < 4 {
        return Err(ClientError::Invalid(format!("a job needs at least 4 VNodes, not {n}")));
    }
    let mut t = format!(
        "[model]\nname = \"mlp-{n}x{w}\"\nseed = 1\n\n[data]\ndataset = \"mnist\"\nfeature_size = 784\nclasses = 10\n\n\
         [training]\nbatch_size = {BATCH}\nsteps = 1000\n\n[optimizer]\nkind = \"adam\"\nlr = 0.001\n\n\
         [[node]]\nid = \"n0\"\nkind = \"linear\"\ninputs = 784\noutputs = {w}\n\n"
    );
    for i in 1..n - 2 {
        if i % 2 == 1 {
            t.push_str(&format!("[[node]]\nid = \"n{i}\"\nkind = \"tanh\"\n\n"));
        } else {
            t.push_str(&format!("[[node]]\nid = \"n{i}\"\nkind = \"linear\"\ninputs = {w}\noutputs = {w}\n\n"));
        }
    }
    t.push_str(&format!("[[node]]\nid = \"n{}\"\nkind = \"linear\"\ninputs = {w}\noutputs = 10\n\n", n - 2));
    t.push_str(
        "[[node]]\nid = \"loss\"\nkind = \"softmax_cross_entropy\"\n\n[[edge]]\nfrom = \"image\"\nto = \"n0\"\n\n",
    );
    for i in 1..n - 1 {
        t.push_str(&format!("[[edge]]\nfrom = \"n{}\"\nto = \"n{i}\"\n\n", i - 1));
    }
    t.push_str(&format!("[[edge]]\nfrom = \"n{}\"\nto = \"loss\"\n\n", n - 2));
    t.push_str("[[edge]]\nfrom = \"label\"\nto = \"loss\"\n");
    ModelGraph::parse_valid(&t).map_err(|e| ClientError::Invalid(format!("benchmark graph of {n} VNodes: {e}")))
}

/// Job sizes summing to `vnodes`: alternately half and one and a half times the mean (when the
/// mean allows), the remainder on the last job.
fn job_sizes(vnodes: usize, jobs: usize) -> Vec<usize> {
    let base = vnodes / jobs;
    let d = if base >= 8 { base / 2 } else { 0 };
    let mut sizes: Vec<usize> = (0..jobs).map(|j| if j % 2 == 0 { base - d } else { base + d }).collect();
    if jobs % 2 == 1
        && let Some(last) = sizes.last_mut()
    {
        *last = base;
    }
    let placed: usize = sizes.iter().sum();
    if let Some(last) = sizes.last_mut() {
        *last += vnodes - placed;
    }
    sizes
}

/// Runs the benchmark.
pub fn run(args: &ScaleBenchArgs) -> anyhow::Result<ScaleBenchReport> {
    if args.pnodes == 0 || args.jobs == 0 || args.rounds == 0 {
        return Err(ClientError::Invalid("--pnodes, --jobs and --rounds must be at least 1".into()).into());
    }
    if args.vnodes < 4 * args.jobs {
        return Err(ClientError::Invalid(format!(
            "--vnodes {} is too few for --jobs {}: every job needs at least 4",
            args.vnodes, args.jobs
        ))
        .into());
    }
    let interval = Duration::from_millis(DEFAULT_HEARTBEAT_MS);
    let policy = HealthPolicy { interval, timeout: Duration::from_millis(DEFAULT_HEARTBEAT_TIMEOUT_MS) };
    let plans = plan(args.pnodes, args.seed);
    // PNode i registers, then beats, at offset i * interval / n: beats spread over the period.
    let offset = |i: usize| interval.mul_f64(i as f64 / args.pnodes as f64);

    eprintln!("registering {} pnodes", args.pnodes);
    let counted = Counted::start();
    let mut table = PNodeTable::new(policy, TrustBook::new(TrustPolicy::default()));
    let mut host = 0usize;
    for (i, p) in plans.iter().enumerate() {
        if !p.same_host {
            host += 1;
        }
        table.register(registration(i, host, p), offset(i))?;
        if p.draining {
            table.drain(&pnode_id(i));
        }
        if p.quarantined {
            for _ in 0..TrustPolicy::default().quarantine_after {
                table.record_outcome(&pnode_id(i), &Outcome::Invalid("simulated cheater".into()));
            }
        }
    }
    let measured = counted.stop();
    let estimate = table.footprint();
    let (registry_bytes, method) = match measured {
        Some(b) => (b, "counting allocator"),
        None => (estimate, "estimate from sizes"),
    };

    eprintln!("timing {} heartbeat rounds", args.rounds);
    let ids: Vec<String> = (0..args.pnodes).map(pnode_id).collect();
    let mut beats = 0u64;
    let mut unknown = 0u64;
    let mut beat_time = Duration::ZERO;
    for round in 1..=args.rounds {
        let start = interval.saturating_mul(u32::try_from(round).unwrap_or(u32::MAX));
        let t = CpuClock::now();
        for (i, id) in ids.iter().enumerate() {
            if plans[i].silent {
                continue;
            }
            if table.heartbeat(id, 0, false, start + offset(i)) != Beat::Alive {
                unknown += 1;
            }
            beats += 1;
        }
        beat_time += t.elapsed();
    }
    if unknown > 0 {
        anyhow::bail!("{unknown} heartbeats of registered pnodes were not accepted");
    }
    let heartbeat_ns = beat_time.as_secs_f64() * 1e9 / beats.max(1) as f64;
    let live = plans.iter().filter(|p| !p.silent).count();
    let heartbeat_core_share = heartbeat_ns * 1e-9 * live as f64 / interval.as_secs_f64();

    let now = interval.saturating_mul(u32::try_from(args.rounds).unwrap_or(u32::MAX).saturating_add(1));
    let pnodes_placeable = table.candidates(now, &Eligibility::default()).suitable;
    let placed = place_jobs(&mut table, args, now)?;
    let mut times = placed.times_ms.clone();
    times.sort_by(f64::total_cmp);
    let placement_wall_s = times.iter().sum::<f64>() / 1e3;
    let placement_cpu_s = placed.cpu.as_secs_f64();
    Ok(ScaleBenchReport {
        pnodes: args.pnodes,
        pnodes_placeable,
        jobs: args.jobs,
        vnodes: args.vnodes,
        jobs_placed: placed.jobs,
        vnodes_placed: placed.vnodes,
        failures: placed.failures,
        pnodes_used: placed.per_pnode.len(),
        most_vnodes_on_one_pnode: placed.per_pnode.values().copied().max().unwrap_or(0),
        placement_cpu_s,
        placement_wall_s,
        placement_job_p50_ms: percentile(&times, 0.5),
        placement_job_p99_ms: percentile(&times, 0.99),
        placement_job_max_ms: times.last().copied().unwrap_or(0.0),
        heartbeat_interval_ms: DEFAULT_HEARTBEAT_MS,
        heartbeats: beats,
        heartbeat_ns,
        heartbeat_core_share,
        registry_bytes,
        registry_bytes_per_pnode: registry_bytes as f64 / args.pnodes as f64,
        registry_bytes_method: method.into(),
        registry_bytes_estimate: estimate,
        placement_goal_met: placement_cpu_s <= 1.0,
        heartbeat_goal_met: heartbeat_core_share <= 0.1,
    })
}

/// What placing every job gave.
struct Placed {
    jobs: usize,
    vnodes: usize,
    failures: Vec<String>,
    /// VNodes per PNode used.
    per_pnode: HashMap<String, u32>,
    /// Wall time to place each job.
    times_ms: Vec<f64>,
    /// CPU time to place them all.
    cpu: Duration,
}

fn place_jobs(table: &mut PNodeTable, args: &ScaleBenchArgs, now: Duration) -> anyhow::Result<Placed> {
    let sizes = job_sizes(args.vnodes, args.jobs);
    let mut graphs: HashMap<(usize, usize), ValidGraph> = HashMap::new();
    let mut out = Placed {
        jobs: 0,
        vnodes: 0,
        failures: Vec::new(),
        per_pnode: HashMap::new(),
        times_ms: Vec::new(),
        cpu: Duration::ZERO,
    };
    let mut previous: Option<PreviousJob> = None;
    let step = (args.jobs / 10).max(1);
    eprintln!("placing {} jobs ({} VNodes) over {} pnodes", args.jobs, args.vnodes, args.pnodes);
    for (j, &n) in sizes.iter().enumerate() {
        let width = WIDTHS[j % WIDTHS.len()];
        let graph = match graphs.entry((n, width)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(wide_mlp(n, width)?),
        };
        let mut req = Eligibility::default();
        let replica = j % 10 == 9;
        if replica && let Some((assignment, class)) = &previous {
            // A replica of the job before: its class, none of its PNodes, none of their machines.
            req.class = class.clone();
            req.exclude = assignment.iter().map(|(_, p)| p.clone()).collect();
        } else if j % 20 == 19 {
            req.target = Target::Gpu;
        }
        let (t, cpu) = (Instant::now(), CpuClock::now());
        let demands = placement::demands(graph, j as u64, graph.spec.training.in_flight);
        if !req.exclude.is_empty() {
            req.avoid_hosts = table.hosts_of(&req.exclude);
        }
        let result = {
            let c = table.candidates(now, &req);
            let max = args.max_pnodes.min(c.suitable).max(1);
            placement::place(&demands, &c.offers, max)
        };
        let mut memory: Vec<(&str, u64)> = Vec::new();
        if let Ok(assignment) = &result {
            let by_vnode: HashMap<u32, u64> = demands.iter().map(|d| (d.vnode, d.memory)).collect();
            for (v, p) in assignment {
                let need = by_vnode.get(v).copied().unwrap_or(0);
                match memory.iter_mut().find(|(q, _)| *q == p.as_str()) {
                    Some((_, m)) => *m = m.saturating_add(need),
                    None => memory.push((p.as_str(), need)),
                }
            }
            for (p, m) in &memory {
                if !table.reserve(p, *m) {
                    anyhow::bail!("pnode {p} was offered but cannot hold {m} bytes");
                }
            }
        }
        out.cpu += cpu.elapsed();
        out.times_ms.push(t.elapsed().as_secs_f64() * 1e3);
        match result {
            Ok(assignment) => {
                out.jobs += 1;
                out.vnodes += assignment.len();
                for (_, p) in &assignment {
                    *out.per_pnode.entry(p.clone()).or_default() += 1;
                }
                let class =
                    assignment.first().and_then(|(_, p)| table.lookup(p, now)).map(|v| v.caps.determinism_class);
                previous = Some((assignment, class));
            }
            Err(e) => {
                if out.failures.len() < 5 {
                    out.failures.push(format!("job {j} ({n} VNodes): {e}"));
                }
                previous = None;
            }
        }
        if (j + 1) % step == 0 || j + 1 == args.jobs {
            eprintln!(
                "  placed {}/{} jobs ({} VNodes) in {:.3} s of CPU time",
                out.jobs,
                j + 1,
                out.vnodes,
                out.cpu.as_secs_f64()
            );
        }
    }
    Ok(out)
}

/// Prints the report for humans.
pub fn print(r: &ScaleBenchReport) {
    let goal = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "control plane at scale: {} pnodes ({} placeable), {} jobs, {} VNodes",
        r.pnodes, r.pnodes_placeable, r.jobs, r.vnodes
    );
    println!(
        "placement: {} of {} VNodes ({} of {} jobs) in {:.3} s of CPU time, goal <= 1 s {} ({:.3} s wall); \
         per job p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        r.vnodes_placed,
        r.vnodes,
        r.jobs_placed,
        r.jobs,
        r.placement_cpu_s,
        goal(r.placement_goal_met),
        r.placement_wall_s,
        r.placement_job_p50_ms,
        r.placement_job_p99_ms,
        r.placement_job_max_ms
    );
    println!("  {} pnodes got work, at most {} VNodes on one", r.pnodes_used, r.most_vnodes_on_one_pnode);
    for f in &r.failures {
        println!("  not placed: {f}");
    }
    println!(
        "heartbeats: {:.0} ns of CPU each through the table ({} timed); every pnode each {} ms = {:.2}% of one core, goal <= 10% {}",
        r.heartbeat_ns,
        r.heartbeats,
        r.heartbeat_interval_ms,
        r.heartbeat_core_share * 100.0,
        goal(r.heartbeat_goal_met)
    );
    println!(
        "registry memory: {:.1} MiB, {:.0} bytes per pnode ({}; estimate from sizes {:.0} bytes per pnode)",
        r.registry_bytes as f64 / (1u64 << 20) as f64,
        r.registry_bytes_per_pnode,
        r.registry_bytes_method,
        r.registry_bytes_estimate as f64 / r.pnodes.max(1) as f64
    );
}

/// The calling thread's CPU clock; reads as zero where the platform has none, rather than
/// failing the benchmark.
#[derive(Debug, Clone, Copy)]
struct CpuClock(Option<cpu_time::ThreadTime>);

impl CpuClock {
    fn now() -> CpuClock {
        CpuClock(cpu_time::ThreadTime::try_now().ok())
    }

    fn elapsed(self) -> Duration {
        self.0.and_then(|t| t.try_elapsed().ok()).unwrap_or(Duration::ZERO)
    }
}

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);
static FREED: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting the bytes requested and freed while a `bench-scale`
/// measurement runs. The `orchestrator` binary installs it; when no measurement runs it costs
/// one relaxed load per call.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

fn count(counter: &AtomicU64, bytes: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// the counting touches only atomics and never allocates.
// The one unsafe code of the workspace (`unsafe_code` is denied elsewhere): a global allocator
// must implement an unsafe trait; every method only forwards to `System` and counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(&ALLOCATED, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(&ALLOCATED, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        count(&FREED, layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(&FREED, layout.size());
            count(&ALLOCATED, new_size);
        }
        p
    }
}

/// Bytes allocated and not freed between `start` and `stop` on any thread: run nothing else
/// meanwhile.
struct Counted;

impl Counted {
    fn start() -> Counted {
        ALLOCATED.store(0, Ordering::SeqCst);
        FREED.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        Counted
    }

    /// Live bytes added since `start`, or `None` when [`CountingAlloc`] is not the global
    /// allocator (nothing was counted).
    fn stop(self) -> Option<u64> {
        // A probe allocation tells whether the counting allocator is installed at all.
        let probe = std::hint::black_box(Box::new([0u8; 64]));
        drop(probe);
        COUNTING.store(false, Ordering::SeqCst);
        let (allocated, freed) = (ALLOCATED.load(Ordering::SeqCst), FREED.load(Ordering::SeqCst));
        (allocated > 0).then(|| allocated.saturating_sub(freed))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        COUNTING.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_mesh_places_every_vnode_with_sane_numbers() {
        let args =
            ScaleBenchArgs { pnodes: 200, vnodes: 1_000, jobs: 10, rounds: 3, max_pnodes: DEFAULT_MAX_PNODES, seed: 7 };
        let r = run(&args).expect("bench runs");
        assert_eq!((r.jobs_placed, r.vnodes_placed), (10, 1_000), "{:?}", r.failures);
        assert!(r.failures.is_empty());
        assert!(r.pnodes_placeable < r.pnodes && r.pnodes_placeable > r.pnodes * 9 / 10, "{}", r.pnodes_placeable);
        assert!(r.pnodes_used > 10 && r.pnodes_used <= r.pnodes_placeable, "{}", r.pnodes_used);
        assert!(r.most_vnodes_on_one_pnode >= 1);
        assert!(r.heartbeats > 0 && r.heartbeat_ns > 0.0 && r.heartbeat_core_share > 0.0);
        assert_eq!(r.heartbeat_interval_ms, DEFAULT_HEARTBEAT_MS);
        // Unit tests run on the system allocator: the figure is the estimate.
        assert_eq!(
            (r.registry_bytes_method.as_str(), r.registry_bytes),
            ("estimate from sizes", r.registry_bytes_estimate)
        );
        assert!(
            r.registry_bytes_per_pnode > 200.0 && r.registry_bytes_per_pnode < 10_000.0,
            "{}",
            r.registry_bytes_per_pnode
        );
        assert!(r.placement_wall_s > 0.0 && r.placement_job_p50_ms <= r.placement_job_max_ms);
        assert!(r.placement_cpu_s >= 0.0);
    }

    #[test]
    fn job_sizes_vary_and_add_up() {
        let s = job_sizes(100_000, 1_000);
        assert_eq!(s.iter().sum::<usize>(), 100_000);
        assert_eq!((s[0], s[1]), (50, 150));
        let s = job_sizes(1_003, 3);
        assert_eq!(s.iter().sum::<usize>(), 1_003);
        assert!(s.iter().all(|&n| n >= 4));
        assert_eq!(job_sizes(20, 4), vec![5, 5, 5, 5]);
    }

    #[test]
    fn the_mlp_has_the_asked_number_of_vnodes_and_bad_flags_are_invalid_input() {
        for (n, w) in [(4, 64), (5, 256), (151, 1024)] {
            assert_eq!(wide_mlp(n, w).expect("valid").nodes.len(), n);
        }
        let args = ScaleBenchArgs { pnodes: 10, vnodes: 10, jobs: 5, rounds: 1, max_pnodes: 16, seed: 1 };
        let e = run(&args).expect_err("too few VNodes");
        assert_eq!(e.downcast_ref::<ClientError>().map(ClientError::exit_code), Some(2), "{e}");
    }
}
