//! What this machine offers: cores, memory, architecture, its determinism class, and a GPU.

use dcnr_proto::v1::Capabilities;

/// Capabilities of this machine, with the operator's overrides applied and the GPU chosen at
/// start (`gpu::choose`), if any.
pub fn detect(cores: Option<u32>, memory_mib: Option<u64>, gpu: Option<&crate::gpu::Gpu>) -> Capabilities {
    let cores = cores.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
    let memory_bytes = memory_mib.map(|m| m * 1024 * 1024).unwrap_or_else(physical_memory);
    Capabilities {
        cores,
        memory_bytes,
        arch: std::env::consts::ARCH.into(),
        os: std::env::consts::OS.into(),
        gpu: gpu.map(|g| g.description.clone()).unwrap_or_default(),
        determinism_class: determinism_class(),
        gpu_gflops: gpu.map_or(0.0, |g| g.gflops),
        gpu_determinism_class: gpu.map(|g| g.determinism_class.clone()).unwrap_or_default(),
    }
}

/// Results are only compared bit for bit between nodes of the same class: same kernels and
/// versions (`dcnr_vnode::KERNELS`), same architecture and the SIMD features its kernels may pick.
pub fn determinism_class() -> String {
    let mut feats: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ] {
            if on {
                feats.push(name);
            }
        }
    }
    format!("{}/{}/{}", dcnr_vnode::KERNELS, std::env::consts::ARCH, feats.join("+"))
}

fn physical_memory() -> u64 {
    // /proc/meminfo is the one portable-enough source on Linux volunteers; elsewhere the operator
    // passes --memory-mib.
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
