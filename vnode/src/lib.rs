//! VNode kinds: per-layer forward, local backward, optimizers, and the state machine
//! that orders a VNode's work so its results never depend on message timing.
//!
//! Architecture invariant: no networking and no actor framework here. A [`VNode`] consumes
//! plain [`Inbound`] messages and returns [`Outbound`] ones; whoever hosts it (a PNode actor, a
//! test, the single-process reference) moves them.

pub mod autodiff;
pub mod batches;
pub mod checkpoint;
pub mod compact;
pub mod compute;
pub mod fault;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod host;
pub mod kernels;
pub mod layer;
pub mod memory;
pub mod optim;
pub mod reference;
pub mod rounds;
pub mod sanity;
pub mod seed;
mod vnode;

pub use compute::Compute;
pub use host::{HostData, HostTensor};
pub use vnode::{Inbound, Outbound, Phase, VNode, VNodeError, VNodeSpec};

/// How many steps ahead of its in-flight window a VNode accepts training inputs: the job feeds
/// data this far ahead so that a feed's trip over a slow link never sits on a step's critical
/// path (a VNode holds early inputs until the update order lets it run).
pub const FEED_AHEAD: u64 = 32;

/// The kernels VNode math runs on, as the determinism class names them: results agree bit for
/// bit only between machines with the same kernels, architecture and SIMD features. Dense,
/// element-wise and optimizer passes run on `gemm` and host code ([`kernels`]); the spatial
/// kinds on burn's flex backend ([`autodiff`]). A VNode on a GPU is in its adapter's class
/// instead ([`Compute`]).
pub const KERNELS: &str = "gemm-0.19+flex-0.22";

/// SHA-256 over f32 values as little-endian bytes: the canonical parameter and activation hash.
pub fn sha256_f32<'a>(chunks: impl IntoIterator<Item = &'a [f32]>) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for c in chunks {
        if cfg!(target_endian = "little") {
            h.update(bytemuck::cast_slice::<f32, u8>(c));
        } else {
            for x in c {
                h.update(x.to_le_bytes());
            }
        }
    }
    h.finalize().into()
}
