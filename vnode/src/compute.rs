//! Where a VNode's math runs: the host kernels, or a GPU through burn-wgpu (feature `gpu`).

/// Where a VNode's math runs.
#[derive(Debug, Clone, Default)]
pub enum Compute {
    /// The host kernels ([`crate::kernels`], burn flex for the spatial kinds).
    #[default]
    Host,
    /// A GPU: every kind with parameters or arithmetic on burn-wgpu; the loss on the host.
    #[cfg(feature = "gpu")]
    Gpu(crate::gpu::Gpu),
}

impl Compute {
    /// `host` or `gpu`, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Compute::Host => "host",
            #[cfg(feature = "gpu")]
            Compute::Gpu(_) => "gpu",
        }
    }

    /// Why the GPU this computes on was given up, once it was: its passes then run on the host.
    pub fn failure(&self) -> Option<&str> {
        match self {
            Compute::Host => None,
            #[cfg(feature = "gpu")]
            Compute::Gpu(gpu) => gpu.failure(),
        }
    }

    /// Whether passes run on a GPU now (one that has not failed).
    pub fn on_gpu(&self) -> bool {
        !matches!(self, Compute::Host) && self.failure().is_none()
    }
}
