//! GPU adapters as wgpu sees them, and a short benchmark of one (feature `gpu`).
//!
//! Results computed on a GPU are reproducible per adapter and driver, not across them, so an
//! adapter names its own determinism class ([`Adapter::determinism_class`]). Starting a wgpu
//! device can panic inside the backend (no adapter after all, a lost device); the benchmark
//! catches that and returns it as an error, so a bad GPU never takes the PNode down.

use crate::layer::KernelError;
use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// One GPU adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// The adapter's name (`llvmpipe (LLVM 15.0.6, 256 bits)`, `NVIDIA H200`).
    pub name: String,
    /// The graphics API it is reached through (`Vulkan`, `Metal`, `Dx12`, `Gl`).
    pub backend: String,
    /// Discrete, integrated, virtual, CPU (a software rasteriser such as lavapipe) or other.
    pub device_type: String,
    /// The driver and its version.
    pub driver: String,
}

impl Adapter {
    /// Results are compared bit for bit only within one class: backend, adapter and driver.
    pub fn determinism_class(&self) -> String {
        format!("wgpu/{}/{}/{}", self.backend, self.name, self.driver)
    }

    /// A software rasteriser (lavapipe, SwiftShader): it runs the GPU code path on the CPU.
    pub fn is_software(&self) -> bool {
        self.device_type == "Cpu"
    }

    /// One line for logs and capabilities: `NVIDIA H200 (Vulkan, DiscreteGpu)`.
    pub fn describe(&self) -> String {
        format!("{} ({}, {})", self.name, self.backend, self.device_type)
    }
}

/// Every adapter wgpu finds, best first (discrete, integrated, virtual, then software).
pub fn adapters() -> Vec<Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Vulkan, Metal, DX12 (or what WGPU_BACKEND names): the APIs burn-wgpu computes on.
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        pollster::block_on(instance.enumerate_adapters(backends))
    }));
    let mut out: Vec<(u8, Adapter)> = found
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let info = a.get_info();
            let rank = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => 0,
                wgpu::DeviceType::IntegratedGpu => 1,
                wgpu::DeviceType::VirtualGpu => 2,
                wgpu::DeviceType::Cpu => 3,
                wgpu::DeviceType::Other => 4,
            };
            let driver = match (info.driver.trim(), info.driver_info.trim()) {
                ("", i) => i.to_string(),
                (d, "") => d.to_string(),
                (d, i) => format!("{d} {i}"),
            };
            let adapter = Adapter {
                name: info.name.clone(),
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver,
            };
            (rank, adapter)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    out.into_iter().map(|(_, a)| a).collect()
}

/// A GPU that VNodes compute on, shared by every VNode of the PNode. Its first failure (a
/// lost device, an allocation it could not make, any panic inside the backend) is kept: from
/// then on every pass on it fails at once with that reason, and the VNodes compute on the host.
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<GpuInner>,
}

struct GpuInner {
    adapter: Adapter,
    device: Device,
    failure: OnceLock<String>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("adapter", &self.inner.adapter).field("failure", &self.failure()).finish()
    }
}

impl Gpu {
    /// The default adapter as burn-wgpu opens it (the best of [`adapters`]).
    pub fn open(adapter: Adapter) -> Gpu {
        Gpu { inner: Arc::new(GpuInner { adapter, device: device(), failure: OnceLock::new() }) }
    }

    /// The adapter it runs on.
    pub fn adapter(&self) -> &Adapter {
        &self.inner.adapter
    }

    /// Why it stopped being used, once it failed.
    pub fn failure(&self) -> Option<&str> {
        self.inner.failure.get().map(String::as_str)
    }

    /// Stops using it, for `why` (the first reason given is kept). Besides the failures `run`
    /// catches, this is how an operator or a test takes a GPU out of service.
    pub fn fail(&self, why: impl Into<String>) {
        let _ = self.inner.failure.set(why.into());
    }

    /// `f` on the device, unless it has failed before; a failure of `f` (a device error or a
    /// panic inside the backend) fails the GPU.
    pub fn run<R>(&self, f: impl FnOnce(&Device) -> Result<R, KernelError>) -> Result<R, KernelError> {
        if let Some(why) = self.failure() {
            return Err(KernelError::Device(why.to_string()));
        }
        // A pass builds its tensors inside `f` and drops them there, so a panic leaves no
        // half-written state behind on this side; the device is not used again.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&self.inner.device))) {
            Ok(Err(KernelError::Device(why))) => {
                self.fail(why.clone());
                Err(KernelError::Device(why))
            }
            Ok(done) => done,
            Err(p) => {
                let why = panic_text(p.as_ref());
                self.fail(why.clone());
                Err(KernelError::Device(why))
            }
        }
    }
}

/// Why the GPU could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// wgpu found no adapter.
    #[error("no GPU adapter found (is a Vulkan driver installed?)")]
    NoAdapter,
    /// The backend failed (panicked) while starting the device or computing.
    #[error("the GPU backend failed: {0}")]
    Backend(String),
    /// The device computed something other than the host does, beyond rounding.
    #[error("the GPU computed a wrong product: element {index} is {got}, the host gives {want}")]
    Wrong {
        /// Which element.
        index: usize,
        /// The GPU's value.
        got: f32,
        /// The host's.
        want: f32,
    },
}

/// What a short benchmark measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSpeed {
    /// Sustained f32 matrix-product throughput on the GPU, in GFLOP/s.
    pub gflops: f64,
    /// The same product on the host kernels, in GFLOP/s, for comparison.
    pub host_gflops: f64,
}

/// The device burn runs on for the default adapter.
pub fn device() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

/// Times `rounds` products of two `n`×`n` matrices on the default adapter (after one warm-up,
/// which compiles the kernels), checks one against the host kernels, and times the host too.
pub fn bench(n: usize, rounds: u32) -> Result<GpuSpeed, GpuError> {
    if adapters().is_empty() {
        return Err(GpuError::NoAdapter);
    }
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let (a2, b2) = (a.clone(), b.clone());
    // Nothing the closure touches outlives it, so a panic leaves no broken state behind.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let device = device();
        let x = Tensor::<2>::from_data(TensorData::new(a2, [n, n]), &device);
        let y = Tensor::<2>::from_data(TensorData::new(b2, [n, n]), &device);
        let first = x.clone().matmul(y.clone()).into_data().try_to_vec::<f32>().unwrap_or_default();
        let start = Instant::now();
        for _ in 0..rounds.max(1) {
            // Reading the product back waits for the device to finish it.
            drop(x.clone().matmul(y.clone()).into_data());
        }
        (first, start.elapsed())
    }));
    let (product, took) = run.map_err(|p| GpuError::Backend(panic_text(p.as_ref())))?;
    let host_start = Instant::now();
    let shape = || GpuError::Backend("a matrix of the wrong size".into());
    let (ha, hb) = (
        crate::kernels::Matrix::new(n, n, a).ok_or_else(shape)?,
        crate::kernels::Matrix::new(n, n, b).ok_or_else(shape)?,
    );
    let mut host = crate::kernels::Matrix::zeros(n, n);
    crate::kernels::matmul(host.data_mut(), ha.view(), hb.view(), false)
        .map_err(|e| GpuError::Backend(e.to_string()))?;
    let host_took = host_start.elapsed();
    let want = host.data();
    if product.len() != want.len() {
        return Err(GpuError::Backend(format!("{} values back for {}", product.len(), want.len())));
    }
    // Sums of n products of values below 0.5: rounding differs by order of summation only.
    let tolerance = 1e-4 * n as f32;
    if let Some((index, (got, want))) =
        product.iter().zip(want).enumerate().find(|(_, (g, w))| (*g - *w).abs().is_nan() || (*g - *w).abs() > tolerance)
    {
        return Err(GpuError::Wrong { index, got: *got, want: *want });
    }
    let flops = 2.0 * (n as f64).powi(3);
    let per = |d: Duration, times: u32| flops * f64::from(times) / d.as_secs_f64().max(1e-9) / 1e9;
    Ok(GpuSpeed { gflops: per(took, rounds.max(1)), host_gflops: per(host_took, 1) })
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a Vulkan driver: lavapipe (Debian's mesa-vulkan-drivers) in CI.
    #[test]
    fn an_adapter_is_found_and_multiplies_as_the_host_does() {
        let found = adapters();
        assert!(!found.is_empty(), "no adapter: install mesa-vulkan-drivers");
        let a = &found[0];
        assert!(a.determinism_class().starts_with("wgpu/"), "{a:?}");
        let speed = bench(128, 2).unwrap();
        assert!(speed.gflops > 0.0 && speed.host_gflops > 0.0, "{speed:?}");
    }
}
