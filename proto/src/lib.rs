//! The DCNR wire protocol (`dcnr.v1`): generated gRPC types plus the limits and conversions
//! every peer applies.
//!
//! API boundary: the rest of the code speaks plain Rust types; the few modules outside this
//! crate that name tonic, prost or these generated types are listed in docs/ARCHITECTURE.md
//! ("Which modules name which framework").

#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("dcnr.v1");
}

pub mod identity;
pub mod limits;
pub mod relay;
pub mod seal;
pub mod shaping;
pub mod tensor;
pub mod tls;
pub mod transport;

pub use tonic;

/// Protocol version spoken by this build; registration refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
