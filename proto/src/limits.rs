//! Explicit sizes and deadlines for every gRPC peer, so no default silently decides them.

use std::time::Duration;

/// Largest encoded or decoded message (a 1000-sample f32 batch of 784 features is ~3 MiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Deadline of a unary control call (register, allocate, resolve, fetch).
pub const UNARY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for establishing a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most concurrent HTTP/2 streams one connection may open to a server.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Largest tensor rank accepted off the wire.
pub const MAX_RANK: usize = 8;
/// Largest element count of one tensor accepted off the wire.
pub const MAX_ELEMENTS: u64 = (MAX_MESSAGE_BYTES / 4) as u64;
