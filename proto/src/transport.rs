//! Client endpoints and servers configured the same way everywhere: Nagle off, explicit
//! deadlines, and HTTP/2 windows large enough that a tensor message never waits for a window
//! update (the 64 KiB default would stall every activation of a 64x256 batch for a round trip).

use crate::limits::{CONNECT_TIMEOUT, MAX_CONCURRENT_STREAMS, UNARY_TIMEOUT};
use tonic::transport::{Endpoint, Server};

/// HTTP/2 stream flow-control window.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// A client endpoint for `url`; `deadline` applies to unary calls (None for long-lived streams).
pub fn endpoint(url: &str, deadline: Option<std::time::Duration>) -> Result<Endpoint, tonic::transport::Error> {
    let e = Endpoint::from_shared(url.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    Ok(match deadline {
        Some(d) => e.timeout(d),
        None => e,
    })
}

/// An endpoint with the default unary deadline.
pub fn unary_endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    endpoint(url, Some(UNARY_TIMEOUT))
}

/// A server builder with the protocol's limits and windows.
pub fn server() -> Server {
    Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .tcp_nodelay(true)
}
