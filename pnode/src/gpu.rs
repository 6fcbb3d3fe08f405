//! The GPU this PNode offers (`--device`): found and timed once at start, then advertised in its
//! capabilities (adapter, throughput, determinism class).

use crate::config::DeviceChoice;

/// A GPU that works here, and how fast it multiplies.
#[derive(Debug, Clone)]
pub struct Gpu {
    /// The GPU VNodes compute on when a job allows it.
    pub compute: dcnr_vnode::Compute,
    /// `name (backend, type)`.
    pub description: String,
    /// Backend, adapter and driver: results are bit-identical only within one class.
    pub determinism_class: String,
    /// f32 matrix-product throughput measured at start, GFLOP/s.
    pub gflops: f64,
    /// The same product on this PNode's CPU kernels, GFLOP/s.
    pub host_gflops: f64,
}

/// Why the GPU asked for cannot be offered.
#[derive(Debug, thiserror::Error)]
pub enum GpuChoiceError {
    /// `--device gpu` on a build without the cargo feature.
    #[error("--device gpu: this pnode was built without GPU support (build it with `--features gpu`)")]
    NotBuilt,
    /// `--device gpu`, and no adapter works.
    #[error("--device gpu: {0}")]
    Unusable(String),
}

/// Side of the product the start-up benchmark times: big enough to load a GPU for a moment,
/// small enough to take well under a second on a software one.
#[cfg(feature = "gpu")]
const BENCH_SIDE: usize = 256;

/// Whether this machine may have a GPU: on Linux, a device node of one (a DRM render node,
/// NVIDIA's, AMD's compute node, WSL's). Without one, `auto` does not start Vulkan at all: a
/// server with only a software driver installed then starts quickly and prints nothing.
#[cfg(feature = "gpu")]
fn may_have_gpu() -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    let render_node = std::fs::read_dir("/dev/dri")
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("renderD")))
        .unwrap_or(false);
    render_node || ["/dev/nvidia0", "/dev/kfd", "/dev/dxg"].iter().any(|p| std::path::Path::new(p).exists())
}

/// The GPU to offer for `choice`: `None` for the CPU. `auto` passes over software adapters,
/// which are slower than the CPU kernels they would replace.
pub fn choose(choice: DeviceChoice) -> Result<Option<Gpu>, GpuChoiceError> {
    match choice {
        DeviceChoice::Cpu => Ok(None),
        #[cfg(not(feature = "gpu"))]
        DeviceChoice::Gpu => Err(GpuChoiceError::NotBuilt),
        #[cfg(not(feature = "gpu"))]
        DeviceChoice::Auto => Ok(None),
        #[cfg(feature = "gpu")]
        DeviceChoice::Auto if !may_have_gpu() => Ok(None),
        #[cfg(feature = "gpu")]
        DeviceChoice::Gpu | DeviceChoice::Auto => {
            use dcnr_vnode::gpu;
            let found = gpu::adapters();
            let best = match (choice, found.first()) {
                (_, None) => None,
                (DeviceChoice::Auto, Some(a)) if a.is_software() => None,
                (_, Some(a)) => Some(a.clone()),
            };
            let Some(adapter) = best else {
                return match choice {
                    DeviceChoice::Gpu => Err(GpuChoiceError::Unusable(gpu::GpuError::NoAdapter.to_string())),
                    _ => Ok(None),
                };
            };
            match gpu::bench(BENCH_SIDE, 4) {
                Ok(speed) => Ok(Some(Gpu {
                    compute: dcnr_vnode::Compute::Gpu(gpu::Gpu::open(adapter.clone())),
                    description: adapter.describe(),
                    determinism_class: adapter.determinism_class(),
                    gflops: speed.gflops,
                    host_gflops: speed.host_gflops,
                })),
                Err(e) if choice == DeviceChoice::Gpu => {
                    Err(GpuChoiceError::Unusable(format!("{}: {e}", adapter.describe())))
                }
                Err(e) => {
                    tracing::warn!(adapter = %adapter.describe(), error = %e, "the GPU does not work; offering the CPU only");
                    Ok(None)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_needs_no_gpu() {
        assert!(choose(DeviceChoice::Cpu).unwrap().is_none());
    }

    #[cfg(not(feature = "gpu"))]
    #[test]
    fn without_the_feature_auto_is_the_cpu_and_gpu_says_how_to_get_one() {
        assert!(choose(DeviceChoice::Auto).unwrap().is_none());
        let e = choose(DeviceChoice::Gpu).unwrap_err().to_string();
        assert!(e.contains("--features gpu"), "{e}");
    }

    /// On lavapipe in CI: `--device gpu` takes a software adapter and measures it.
    #[cfg(feature = "gpu")]
    #[test]
    fn a_gpu_asked_for_is_found_and_timed() {
        let g = choose(DeviceChoice::Gpu).unwrap().expect("a GPU");
        assert!(g.gflops > 0.0 && g.determinism_class.starts_with("wgpu/"), "{g:?}");
    }
}
