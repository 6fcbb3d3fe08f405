//! Cost of the cheap checks (`VNode::screen`) on the MNIST MLP's traffic, for docs/BENCHMARKS.md:
//! `cargo run --release -p dcnr-vnode --example screen_cost`.

use dcnr_vnode::sanity::{MAX_ABS, check_values};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // Floats a VNode receives per training step of the 784-256-256-10 MLP at batch 64: features,
    // three activations and three gradients (labels are integers and cost nothing here).
    let sizes = [("features 64x784", 64 * 784), ("activation 64x256", 64 * 256), ("logits 64x10", 64 * 10)];
    let per_step = 64 * 784 + 2 * (64 * 256 * 2 + 64 * 256 * 2 + 64 * 10);
    for (name, n) in sizes {
        let data: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01 - 0.4).collect();
        let runs: Vec<f64> = (0..7)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..2000 {
                    std::hint::black_box(check_values(std::hint::black_box(&data), MAX_ABS)).ok();
                }
                t.elapsed().as_secs_f64() / 2000.0 * 1e6
            })
            .collect();
        let us = median(runs);
        println!("{name}: {us:.2} us per check ({:.1} GB/s)", n as f64 * 4.0 / us / 1e3);
    }
    let data: Vec<f32> = vec![0.1; per_step];
    let runs: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..500 {
                std::hint::black_box(check_values(std::hint::black_box(&data), MAX_ABS)).ok();
            }
            t.elapsed().as_secs_f64() / 500.0 * 1e6
        })
        .collect();
    println!("one training step's received floats ({per_step}): {:.1} us", median(runs));
}
