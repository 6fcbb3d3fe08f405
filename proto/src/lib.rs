//! The DCNR wire protocol (`dcnr.v1`): generated gRPC types plus the limits and conversions
//! every peer applies.
//!
//! API boundary: only this crate and the thin service adapters in `pnode::service` and
//! `orchestrator::service` name tonic types; the rest of the code speaks plain Rust types.

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("dcnr.v1");
}

pub mod identity;
pub mod limits;
pub mod tensor;
pub mod transport;

pub use tonic;

/// Protocol version spoken by this build; registration refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
