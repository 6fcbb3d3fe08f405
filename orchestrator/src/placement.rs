//! Placement: which PNode hosts which VNode. A pure function, so it is tested without a mesh.
//!
//! The graph is cut into contiguous runs of its topological order (so most traffic stays
//! inside one PNode), one run per PNode, minimising the heaviest run; the heaviest runs go to
//! the PNodes with the most cores. Memory is a hard limit.

/// What one VNode needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    /// VNode id.
    pub vnode: u32,
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
    /// A run of VNodes does not fit in memory anywhere.
    #[error("VNodes {vnodes:?} need {need} bytes, but pnode {pnode} offers {offer}")]
    Memory { vnodes: Vec<u32>, need: u64, pnode: String, offer: u64 },
}

/// Assigns every demand (given in topological order) to an offer: returns (vnode, pnode) pairs.
pub fn place(demands: &[Demand], offers: &[Offer], max_pnodes: usize) -> Result<Vec<(u32, String)>, PlacementError> {
    if demands.is_empty() {
        return Err(PlacementError::NoVNodes);
    }
    if offers.is_empty() {
        return Err(PlacementError::NoPNodes);
    }
    let mut offers = offers.to_vec();
    offers.sort_by(|a, b| b.cores.cmp(&a.cores).then(b.memory.cmp(&a.memory)).then(a.pnode.cmp(&b.pnode)));
    let parts = offers.len().min(demands.len()).min(max_pnodes.max(1));
    let runs = split(demands, parts);
    let mut order: Vec<usize> = (0..runs.len()).collect();
    let run_work = |r: &std::ops::Range<usize>| demands[r.clone()].iter().map(|d| d.work).sum::<u64>();
    order.sort_by(|&a, &b| run_work(&runs[b]).cmp(&run_work(&runs[a])).then(a.cmp(&b)));
    let mut out = Vec::with_capacity(demands.len());
    for (slot, &ri) in order.iter().enumerate() {
        let offer = &offers[slot];
        let run = &demands[runs[ri].clone()];
        let need: u64 = run.iter().map(|d| d.memory).sum();
        if offer.memory != 0 && need > offer.memory {
            return Err(PlacementError::Memory {
                vnodes: run.iter().map(|d| d.vnode).collect(),
                need,
                pnode: offer.pnode.clone(),
                offer: offer.memory,
            });
        }
        out.extend(run.iter().map(|d| (d.vnode, offer.pnode.clone())));
    }
    out.sort_by_key(|p| p.0);
    Ok(out)
}

/// Splits `demands` into exactly `parts` non-empty contiguous runs minimising the heaviest.
fn split(demands: &[Demand], parts: usize) -> Vec<std::ops::Range<usize>> {
    let work: Vec<u64> = demands.iter().map(|d| d.work.max(1)).collect();
    let (mut lo, mut hi) = (work.iter().copied().max().unwrap_or(1), work.iter().sum::<u64>());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if greedy(&work, mid, parts).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    greedy(&work, lo, parts).unwrap_or_else(|| std::iter::once(0..demands.len()).collect())
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
        Demand { vnode, work, memory: 10 }
    }
    fn o(p: &str, cores: u32) -> Offer {
        Offer { pnode: p.into(), cores, memory: 0 }
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
        let ds = [Demand { vnode: 0, work: 1, memory: 100 }];
        let off = [Offer { pnode: "a".into(), cores: 1, memory: 50 }];
        assert!(matches!(place(&ds, &off, 8), Err(PlacementError::Memory { .. })));
        assert_eq!(place(&ds, &[], 8), Err(PlacementError::NoPNodes));
        assert_eq!(place(&[], &off, 8), Err(PlacementError::NoVNodes));
    }

    proptest! {
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
