//! Placement: which PNode hosts which VNode. Pure functions, so they are tested without a mesh.
//!
//! [`eligible`] says which PNodes one placement may use (the job actor and the scale benchmark
//! apply the same filter). [`place`] cuts the graph into contiguous runs of its topological
//! order (so most traffic stays inside one PNode), one run per PNode, minimising the heaviest
//! run; the heaviest runs go to the PNodes with the most cores. Memory is a hard limit: a run
//! that does not fit the PNode its rank gives it goes to the strongest remaining one it fits.
//! Runs are cut only between units: in local mode a unit is a block, whose edges carry a
//! gradient round trip every step, so only the forward-only block boundaries cross PNodes
//! (unless a block fits no PNode, then any cut).

use crate::registry::{Health, PNodeView};
use crate::trust::Standing;
use dcnr_model::envelope::Target;
use dcnr_model::{TrainingMode, ValidGraph};
use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeSet;

/// What one VNode needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    /// VNode id.
    pub vnode: u32,
    /// Consecutive demands of one unit go to one PNode when they fit.
    pub unit: u32,
    /// Its data-parallel pipeline: each pipeline gets PNodes of its own when there are enough.
    pub group: u32,
    /// Relative compute cost of one step.
    pub work: u64,
    /// Bytes of memory it needs.
    pub memory: u64,
}

/// What one PNode offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    /// PNode id.
    pub pnode: String,
    /// CPU cores.
    pub cores: u32,
    /// Memory in bytes (0 = unknown, treated as unlimited).
    pub memory: u64,
    /// Reached through a relay: every message takes an extra hop, so it ranks as a fifth of
    /// its cores ([`RELAYED_WEIGHT`]).
    pub relayed: bool,
    /// The GPU's measured throughput in GFLOP/s when the job computes on it, else 0.
    pub gpu_gflops: u32,
}

/// What a relayed PNode's cores count for against a direct one's, in fifths (Petals scores
/// relayed servers at 0.2x).
pub const RELAYED_WEIGHT: u64 = 1;
/// What a direct PNode's cores count for, in fifths.
const DIRECT_WEIGHT: u64 = 5;

/// What one CPU core sustains on the VNode kernels' matrix products, in GFLOP/s: the rate at
/// which a GPU's measured throughput counts as cores. (A PNode's own start-up benchmark puts one
/// AVX-512 core here at 30 to 60 GFLOP/s and an AVX2 laptop core near 20.)
pub const CORE_GFLOPS: u64 = 25;

impl Offer {
    /// What `view` offers a job with `target`: its cores, its GPU's throughput when the job
    /// computes on it, its memory, and whether it is relayed.
    pub fn of(view: &PNodeView, target: Target) -> Offer {
        Offer {
            pnode: view.id.clone(),
            cores: view.caps.cores,
            memory: view.caps.memory_bytes,
            relayed: view.reach.relayed_via.is_some(),
            gpu_gflops: if view.caps.computes_on_gpu(target) { view.caps.gpu_gflops } else { 0 },
        }
    }

    /// Its strength for ranking, in fifths of a core: its cores, or its GPU counted as cores
    /// at [`CORE_GFLOPS`] when that is more; a relayed PNode's counted at a fifth (the link
    /// cost: every message takes an extra hop).
    fn strength(&self) -> u64 {
        let cores = u64::from(self.cores).max(u64::from(self.gpu_gflops) / CORE_GFLOPS);
        cores * if self.relayed { RELAYED_WEIGHT } else { DIRECT_WEIGHT }
    }
}

/// Why no placement exists.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    /// No PNode is available.
    #[error("no healthy pnode is available")]
    NoPNodes,
    /// The graph has no VNodes.
    #[error("the job has no VNodes")]
    NoVNodes,
    /// A run of VNodes does not fit in memory anywhere (`pnode` offers the most left).
    #[error("VNodes {vnodes:?} need {need} bytes, but pnode {pnode} offers {offer}")]
    Memory { vnodes: Vec<u32>, need: u64, pnode: String, offer: u64 },
}

/// Which PNodes one placement may use.
#[derive(Debug, Clone, Default)]
pub struct Eligibility {
    /// The job's target: `Gpu` takes only PNodes with a GPU.
    pub target: Target,
    /// Only PNodes of this determinism class (a replica's).
    pub class: Option<String>,
    /// PNodes this execution must not use (failed ones, or those whose work a replica checks).
    pub exclude: BTreeSet<String>,
    /// Machines to keep off, as `verify::host_of` names them (for a replica, those of the PNodes
    /// whose work it checks: `PNodeTable::hosts_of`), so one machine cannot vote twice.
    pub avoid_hosts: BTreeSet<String>,
}

/// Whether `view` (with its health as of now) may get work of this kind: healthy, with a GPU
/// if the target needs one, of the requested class, and not quarantined. Exclusions aside: a
/// job's `Share` of the mesh is counted over these.
pub fn suitable(view: &PNodeView, req: &Eligibility) -> bool {
    view.health == Health::Healthy
        && view.reach.reachable()
        && (req.target != Target::Gpu || !view.caps.gpu.is_empty())
        && req.class.as_ref().is_none_or(|c| c == view.caps.class_for(req.target))
        && view.standing != Standing::Quarantined
}

/// Whether this placement may use `view` (with its health as of now): [`suitable`] and not
/// [`kept_off`].
pub fn eligible(view: &PNodeView, req: &Eligibility) -> bool {
    suitable(view, req) && !kept_off(view, req)
}

/// Whether the request keeps this placement off `view`: excluded, or on a machine it avoids.
pub fn kept_off(view: &PNodeView, req: &Eligibility) -> bool {
    // Split without allocating or parsing addresses: this runs for every PNode of the mesh on
    // every replica placement, and the avoided hosts are never loopback (`host_of`).
    req.exclude.contains(&view.id)
        || (!req.avoid_hosts.is_empty()
            && crate::verify::endpoint_host(&view.endpoint)
                .is_some_and(|h| req.avoid_hosts.iter().any(|a| a.eq_ignore_ascii_case(h))))
}

/// Memory and work estimates of each VNode of `graph` in topological order, for [`place`]; the
/// memory is `VNodeSpec::memory_estimate`, the limit PNodes enforce.
pub fn demands(graph: &ValidGraph, root_seed: u64, in_flight: u32) -> Vec<Demand> {
    let batch = graph.spec.training.batch_size as u64;
    graph
        .topo
        .iter()
        .filter_map(|&id| graph.nodes.get(id as usize).map(|n| (id, n)))
        .map(|(id, n)| {
            let vspec = dcnr_vnode::VNodeSpec {
                node: n.clone(),
                optimizer: graph.spec.optimizer,
                recipe: graph.spec.training.recipe(),
                root_seed,
                in_flight,
                averaging: None,
                compute: Default::default(),
            };
            Demand {
                vnode: id,
                unit: if graph.mode() == TrainingMode::Local { n.block } else { id },
                group: n.pipeline,
                work: (n.param_count() as u64).saturating_add(batch.saturating_mul(n.output_width as u64)),
                memory: vspec.memory_estimate(batch as usize),
            }
        })
        .collect()
}

/// Stronger first: more (weighted) cores, then more memory, then by id so the order is total.
fn stronger(a: &Offer, b: &Offer) -> Ordering {
    b.strength().cmp(&a.strength()).then(b.memory.cmp(&a.memory)).then(a.pnode.cmp(&b.pnode))
}

/// The `k` strongest of `offers` (k >= 1), strongest first, in O(n) for k much smaller than n:
/// selection on strength and memory alone, ids compared only among offers tied at the cut. (A
/// mesh has few distinct core and memory sizes, so ids decide most comparisons of a plain sort;
/// comparing them for every offer of every job cost more than the rest of placement.)
fn strongest<'a>(offers: &[&'a Offer], k: usize) -> Vec<&'a Offer> {
    let mut ranked: Vec<&Offer> = offers.to_vec();
    if k < ranked.len() {
        let size = |o: &Offer| (std::cmp::Reverse(o.strength()), std::cmp::Reverse(o.memory));
        let cut = size(ranked.select_nth_unstable_by_key(k - 1, |o| size(o)).1);
        let (mut chosen, mut tied): (Vec<&Offer>, Vec<&Offer>) =
            ranked.iter().copied().filter(|o| size(o) <= cut).partition(|o| size(o) < cut);
        let room = k - chosen.len();
        if room < tied.len() {
            tied.select_nth_unstable_by(room - 1, |a, b| a.pnode.cmp(&b.pnode));
        }
        chosen.extend_from_slice(&tied[..room]);
        ranked = chosen;
    }
    ranked.sort_unstable_by(|a, b| stronger(a, b));
    ranked
}

/// Assigns every demand (given in topological order) to an offer: returns (vnode, pnode) pairs.
/// Offers may be owned or borrowed (a table of thousands of PNodes lends its own).
pub fn place<O: Borrow<Offer>>(
    demands: &[Demand],
    offers: &[O],
    max_pnodes: usize,
) -> Result<Vec<(u32, String)>, PlacementError> {
    if demands.is_empty() {
        return Err(PlacementError::NoVNodes);
    }
    if offers.is_empty() {
        return Err(PlacementError::NoPNodes);
    }
    let all: Vec<&Offer> = offers.iter().map(Borrow::borrow).collect();
    let group_ids: BTreeSet<u32> = demands.iter().map(|d| d.group).collect();
    let groups = group_ids.len();
    if groups > 1 && all.len() >= groups && max_pnodes >= groups {
        // Each pipeline on PNodes of its own: the strongest offers dealt out in turn, so the
        // copies, which wait for one another every round, get alike shares.
        let ranked = strongest(&all, all.len().min(max_pnodes));
        let mut out = Vec::with_capacity(demands.len());
        for (g, id) in group_ids.iter().enumerate() {
            let mine: Vec<&Offer> = ranked.iter().skip(g).step_by(groups).copied().collect();
            let group: Vec<Demand> = demands.iter().filter(|d| d.group == *id).cloned().collect();
            out.extend(place(&group, &mine, (max_pnodes / groups).max(1))?);
        }
        out.sort_by_key(|p| p.0);
        return Ok(out);
    }
    let mut units: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, d) in demands.iter().enumerate() {
        match units.last_mut() {
            Some(u) if demands[u.start].unit == d.unit => u.end = i + 1,
            _ => units.push(i..i + 1),
        }
    }
    match place_units(demands, &units, &all, max_pnodes) {
        Err(PlacementError::Memory { .. }) if units.len() < demands.len() => {
            let singles: Vec<std::ops::Range<usize>> = (0..demands.len()).map(|i| i..i + 1).collect();
            place_units(demands, &singles, &all, max_pnodes)
        }
        placed => placed,
    }
}

/// [`place`] with cuts only between `units` (contiguous ranges covering `demands`).
fn place_units(
    demands: &[Demand],
    units: &[std::ops::Range<usize>],
    all: &[&Offer],
    max_pnodes: usize,
) -> Result<Vec<(u32, String)>, PlacementError> {
    let parts = all.len().min(units.len()).min(max_pnodes.max(1));
    // Only the `parts` strongest are ranked; the rest are looked at only for a run that fits
    // none of them.
    let ranked = strongest(all, parts);
    let unit_work: Vec<u64> =
        units.iter().map(|u| demands[u.clone()].iter().fold(0u64, |s, d| s.saturating_add(d.work))).collect();
    let runs: Vec<std::ops::Range<usize>> =
        split(&unit_work, parts).into_iter().map(|r| units[r.start].start..units[r.end - 1].end).collect();
    let mut order: Vec<usize> = (0..runs.len()).collect();
    let run_work = |r: &std::ops::Range<usize>| demands[r.clone()].iter().fold(0u64, |s, d| s.saturating_add(d.work));
    order.sort_by(|&a, &b| run_work(&runs[b]).cmp(&run_work(&runs[a])).then(a.cmp(&b)));
    let mut taken: Vec<&str> = Vec::with_capacity(parts);
    let mut out = Vec::with_capacity(demands.len());
    for &ri in &order {
        let run = &demands[runs[ri].clone()];
        let need = run.iter().fold(0u64, |s, d| s.saturating_add(d.memory));
        let free = |o: &&Offer| !taken.contains(&o.pnode.as_str());
        let fits = |o: &&Offer| o.memory == 0 || need <= o.memory;
        // When everything fits, run k (by weight) takes rank k; a run too big for its rank
        // takes the next strongest PNode it fits rather than failing the whole job.
        let pick = ranked
            .iter()
            .copied()
            .filter(free)
            .find(fits)
            .or_else(|| all.iter().copied().filter(free).filter(fits).min_by(|a, b| stronger(a, b)));
        let Some(offer) = pick else {
            let roomiest = all.iter().copied().filter(free).max_by_key(|o| o.memory);
            let (pnode, offer) = roomiest.map_or((String::new(), 0), |o| (o.pnode.clone(), o.memory));
            return Err(PlacementError::Memory { vnodes: run.iter().map(|d| d.vnode).collect(), need, pnode, offer });
        };
        taken.push(&offer.pnode);
        out.extend(run.iter().map(|d| (d.vnode, offer.pnode.clone())));
    }
    out.sort_by_key(|p| p.0);
    Ok(out)
}

/// Splits items of `work` into exactly `parts` non-empty contiguous runs minimising the heaviest.
fn split(work: &[u64], parts: usize) -> Vec<std::ops::Range<usize>> {
    let work: Vec<u64> = work.iter().map(|w| (*w).max(1)).collect();
    let (mut lo, mut hi) = (work.iter().copied().max().unwrap_or(1), work.iter().sum::<u64>());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if greedy(&work, mid, parts).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    greedy(&work, lo, parts).unwrap_or_else(|| std::iter::once(0..work.len()).collect())
}

/// Cuts runs of at most `cap` work, leaving at least one item for every later run.
fn greedy(work: &[u64], cap: u64, parts: usize) -> Option<Vec<std::ops::Range<usize>>> {
    let mut runs = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let left_after = parts - p - 1;
        let mut end = start;
        let mut sum = 0;
        while end < work.len() - left_after && (end == start || sum + work[end] <= cap) {
            if sum + work[end] > cap {
                return None;
            }
            sum += work[end];
            end += 1;
        }
        if end == start {
            return None;
        }
        runs.push(start..end);
        start = end;
    }
    (start == work.len()).then_some(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(vnode: u32, work: u64) -> Demand {
        Demand { vnode, unit: vnode, group: 0, work, memory: 10 }
    }
    fn o(p: &str, cores: u32) -> Offer {
        Offer { pnode: p.into(), cores, memory: 0, relayed: false, gpu_gflops: 0 }
    }

    #[test]
    fn a_relayed_pnode_counts_a_fifth_and_gets_the_lighter_run_or_none() {
        let relayed = |p: &str, cores| Offer { relayed: true, ..o(p, cores) };
        // Four relayed cores count as 4/5 of a core: below one direct core.
        let ds = [d(0, 100), d(1, 10)];
        let p = place(&ds, &[relayed("far", 4), o("near", 1)], 8).unwrap();
        assert_eq!(p, vec![(0, "near".to_string()), (1, "far".to_string())], "the heavy run goes to the direct one");
        // Ten relayed cores outrank one direct core (10/5 = 2 > 1).
        let p = place(&ds, &[relayed("far", 10), o("near", 1)], 8).unwrap();
        assert_eq!(p[0].1, "far");
        // With one PNode to choose, a direct one of the same size wins.
        let p = place(&ds, &[relayed("far", 2), o("near", 2)], 1).unwrap();
        assert!(p.iter().all(|x| x.1 == "near"), "{p:?}");
    }

    #[test]
    fn a_fast_gpu_outranks_cores_and_a_relayed_one_pays_for_its_link() {
        let gpu = |p: &str, cores, gflops| Offer { gpu_gflops: gflops, ..o(p, cores) };
        let ds = [d(0, 100), d(1, 10)];
        // 2 cores and 1000 GFLOP/s (40 cores' worth) against 16 cores: the GPU takes the heavy run.
        let p = place(&ds, &[o("cpu", 16), gpu("gpu", 2, 1000)], 8).unwrap();
        assert_eq!(p, vec![(0, "gpu".to_string()), (1, "cpu".to_string())]);
        // A GPU slower than the cores it sits beside counts as those cores: a lavapipe or an old
        // integrated GPU does not outrank a big CPU.
        let p = place(&ds, &[o("cpu", 16), gpu("gpu", 2, 100)], 8).unwrap();
        assert_eq!(p[0].1, "cpu");
        // Relayed, the same GPU counts a fifth: 40 cores' worth is 8, below 16 direct cores.
        let p = place(&ds, &[o("cpu", 16), Offer { relayed: true, ..gpu("gpu", 2, 1000) }], 8).unwrap();
        assert_eq!(p[0].1, "cpu");
    }

    #[test]
    fn each_pipeline_gets_pnodes_of_its_own_when_there_are_enough() {
        let copy =
            |g: u32| (0..6).map(move |i| Demand { vnode: g * 6 + i, unit: g * 6 + i, group: g, work: 10, memory: 10 });
        let ds: Vec<Demand> = copy(0).chain(copy(1)).collect();
        let offers = [o("a", 2), o("b", 2), o("c", 2), o("d", 2)];
        let p = place(&ds, &offers, 8).unwrap();
        let hosts = |g: u32| -> std::collections::BTreeSet<String> {
            p.iter().filter(|x| x.0 / 6 == g).map(|x| x.1.clone()).collect()
        };
        assert_eq!(hosts(0).len(), 2, "{p:?}");
        assert_eq!(hosts(1).len(), 2, "{p:?}");
        assert!(hosts(0).is_disjoint(&hosts(1)), "{p:?}");
        // Fewer PNodes than pipelines: the copies share them.
        let p = place(&ds, &[o("a", 2)], 8).unwrap();
        assert!(p.iter().all(|x| x.1 == "a"));
        // Two PNodes, two pipelines: one each.
        let p = place(&ds, &offers[..2], 8).unwrap();
        assert!(p.iter().filter(|x| x.0 < 6).all(|x| x.1 == p[0].1));
        assert!(p.iter().filter(|x| x.0 >= 6).all(|x| x.1 != p[0].1));
    }

    #[test]
    fn mlp_spreads_over_three_pnodes() {
        let ds = [d(0, 217), d(1, 16), d(2, 82), d(3, 16), d(4, 3), d(5, 1)];
        let p = place(&ds, &[o("a", 2), o("b", 2), o("c", 2)], 8).unwrap();
        let used: std::collections::BTreeSet<_> = p.iter().map(|x| x.1.clone()).collect();
        assert_eq!(used.len(), 3);
        assert_eq!(p[0].1, "a", "the heaviest run goes to the first strongest pnode");
    }

    #[test]
    fn memory_is_a_hard_limit_and_empty_inputs_fail() {
        let ds = [Demand { vnode: 0, unit: 0, group: 0, work: 1, memory: 100 }];
        let off = [Offer { pnode: "a".into(), cores: 1, memory: 50, relayed: false, gpu_gflops: 0 }];
        assert!(matches!(place(&ds, &off, 8), Err(PlacementError::Memory { .. })));
        assert_eq!(place::<Offer>(&ds, &[], 8), Err(PlacementError::NoPNodes));
        assert_eq!(place(&[], &off, 8), Err(PlacementError::NoVNodes));
    }

    #[test]
    fn a_run_too_big_for_its_rank_goes_to_the_next_pnode_it_fits() {
        let ds = [
            Demand { vnode: 0, unit: 0, group: 0, work: 10, memory: 100 },
            Demand { vnode: 1, unit: 1, group: 0, work: 1, memory: 100 },
        ];
        let off = [
            Offer { pnode: "big-cpu".into(), cores: 32, memory: 50, relayed: false, gpu_gflops: 0 },
            Offer { pnode: "mid".into(), cores: 8, memory: 200, relayed: false, gpu_gflops: 0 },
            Offer { pnode: "small".into(), cores: 2, memory: 100, relayed: false, gpu_gflops: 0 },
        ];
        let p = place(&ds, &off, 2).unwrap();
        assert_eq!(p, vec![(0, "mid".to_string()), (1, "small".to_string())]);
        let e = place(&[Demand { vnode: 0, unit: 0, group: 0, work: 1, memory: 300 }], &off, 2).unwrap_err();
        assert!(matches!(&e, PlacementError::Memory { pnode, offer: 200, .. } if pnode == "mid"), "{e}");
    }

    #[test]
    fn units_stay_on_one_pnode_unless_they_fit_none() {
        // Local mode's blocks of the MNIST MLP: fc1,relu1 | fc2,relu2 | fc3,loss.
        let unit = |vnode: u32, work: u64| Demand { vnode, unit: vnode / 2, group: 0, work, memory: 10 };
        let ds = [unit(0, 217), unit(1, 16), unit(2, 82), unit(3, 16), unit(4, 3), unit(5, 1)];
        let p = place(&ds, &[o("a", 2), o("b", 2), o("c", 2)], 8).unwrap();
        let on: Vec<&str> = p.iter().map(|x| x.1.as_str()).collect();
        assert_eq!(on, ["a", "a", "b", "b", "c", "c"]);
        // Fewer PNodes than units: still cut only between units.
        let p = place(&ds, &[o("a", 2), o("b", 2)], 8).unwrap();
        let on: Vec<&str> = p.iter().map(|x| x.1.as_str()).collect();
        assert_eq!(on, ["a", "a", "b", "b", "b", "b"]);
        // A unit too big for any PNode is split rather than refused.
        let big = |vnode: u32| Demand { vnode, unit: 0, group: 0, work: 1, memory: 60 };
        let off = [
            Offer { pnode: "a".into(), cores: 1, memory: 100, relayed: false, gpu_gflops: 0 },
            Offer { pnode: "b".into(), cores: 1, memory: 100, relayed: false, gpu_gflops: 0 },
        ];
        let p = place(&[big(0), big(1)], &off, 8).unwrap();
        assert_ne!(p[0].1, p[1].1);
    }

    #[test]
    fn borrowed_offers_place_like_owned_ones() {
        let ds = [d(0, 5), d(1, 1), d(2, 7)];
        let off: Vec<Offer> = (0..50).map(|i| o(&format!("p{i:02}"), 1 + i % 7)).collect();
        let refs: Vec<&Offer> = off.iter().collect();
        assert_eq!(place(&ds, &refs, 2), place(&ds, &off, 2));
    }

    /// The placement before only the strongest offers were ranked: every offer sorted.
    fn place_sorting_all(demands: &[Demand], offers: &[Offer], max_pnodes: usize) -> Vec<(u32, String)> {
        let mut offers = offers.to_vec();
        offers.sort_by(stronger);
        let parts = offers.len().min(demands.len()).min(max_pnodes.max(1));
        let runs = split(&demands.iter().map(|d| d.work).collect::<Vec<_>>(), parts);
        let mut order: Vec<usize> = (0..runs.len()).collect();
        let run_work = |r: &std::ops::Range<usize>| demands[r.clone()].iter().map(|d| d.work).sum::<u64>();
        order.sort_by(|&a, &b| run_work(&runs[b]).cmp(&run_work(&runs[a])).then(a.cmp(&b)));
        let mut out = Vec::new();
        for (slot, &ri) in order.iter().enumerate() {
            out.extend(demands[runs[ri].clone()].iter().map(|d| (d.vnode, offers[slot].pnode.clone())));
        }
        out.sort_by_key(|p| p.0);
        out
    }

    proptest! {
        #[test]
        fn ranking_only_the_strongest_changes_nothing_when_memory_fits(
            works in proptest::collection::vec(1u64..1000, 1..40),
            offers in proptest::collection::vec((1u32..6, 0u64..4), 1..60),
            max in 1usize..20,
        ) {
            let ds: Vec<Demand> = works.iter().enumerate().map(|(i, &w)| d(i as u32, w)).collect();
            let offers: Vec<Offer> = offers
                .iter()
                .enumerate()
                .map(|(i, &(cores, gib))| Offer { pnode: format!("p{i}"), cores, memory: gib << 30, relayed: false, gpu_gflops: 0 })
                .collect();
            prop_assert_eq!(place(&ds, &offers, max).unwrap(), place_sorting_all(&ds, &offers, max));
        }

        #[test]
        fn every_vnode_placed_once_on_contiguous_runs(works in proptest::collection::vec(1u64..1000, 1..40), n in 1usize..6) {
            let ds: Vec<Demand> = works.iter().enumerate().map(|(i, &w)| d(i as u32, w)).collect();
            let offers: Vec<Offer> = (0..n).map(|i| o(&format!("p{i}"), 1 + i as u32 % 3)).collect();
            let p = place(&ds, &offers, 8).unwrap();
            prop_assert_eq!(p.len(), ds.len());
            prop_assert!(p.iter().enumerate().all(|(i, x)| x.0 == i as u32));
            let used: std::collections::BTreeSet<_> = p.iter().map(|x| x.1.clone()).collect();
            prop_assert_eq!(used.len(), n.min(ds.len()));
            let changes = p.windows(2).filter(|w| w[0].1 != w[1].1).count();
            prop_assert_eq!(changes + 1, used.len(), "runs are contiguous");
        }
    }
}
