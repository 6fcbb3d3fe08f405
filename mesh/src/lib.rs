//! What every process on the mesh shares: the adapters between the wire and plain values, and
//! the little process plumbing the `orchestrator` and `pnode` binaries both need.
//!
//! Module map: [`convert`] (wire messages to and from VNode messages, checked), [`link`] (a
//! gRPC stream of VNode messages to one PNode, used by PNodes to forward activations and by the
//! orchestrator to feed data), [`exposition`] (the Prometheus text format), [`signal`] (Ctrl-C
//! and SIGTERM), [`discovery`] (`--orchestrator` lists and their DNS look-up), [`relay`] (a relay for PNodes
//! behind NAT, and a PNode's side of one).
//!
//! Architecture invariant: this crate holds no actors and no policy. It depends on `proto` and
//! `vnode` only, so `orchestrator` and `pnode` can share it without depending on each other.

pub mod convert;
pub mod discovery;
pub mod exposition;
pub mod link;
pub mod relay;
pub mod signal;
