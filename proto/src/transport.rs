//! Client endpoints and servers configured the same way everywhere: Nagle off, explicit
//! deadlines, and HTTP/2 windows large enough that a tensor message never waits for a window
//! update (the 64 KiB default would stall every activation of a 64x256 batch for a round trip).
//!
//! Every connection the project opens is a client channel made here ([`ClientEndpoint`]); its
//! TCP connection comes from one connector that turns Nagle off, counts the bytes and, when link
//! emulation is on, shapes them ([`crate::shaping`]).

use crate::limits::{CONNECT_TIMEOUT, MAX_CONCURRENT_STREAMS, UNARY_TIMEOUT};
use crate::shaping::{self, ClientStream};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::transport::{Channel, Endpoint, Server, Uri};

/// HTTP/2 stream flow-control window.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// A client endpoint whose channels connect only through this module's connector, so no
/// connection escapes the byte counters or the link emulation.
#[derive(Debug, Clone)]
pub struct ClientEndpoint(Endpoint);

impl ClientEndpoint {
    /// Connects now.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        self.0.connect_with_connector(LinkConnector).await
    }

    /// A channel that connects on first use (and again after a broken connection).
    pub fn connect_lazy(&self) -> Channel {
        self.0.connect_with_connector_lazy(LinkConnector)
    }
}

/// A client endpoint for `url`; `deadline` applies to unary calls (None for long-lived streams).
pub fn endpoint(url: &str, deadline: Option<std::time::Duration>) -> Result<ClientEndpoint, tonic::transport::Error> {
    let e = Endpoint::from_shared(url.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    Ok(ClientEndpoint(match deadline {
        Some(d) => e.timeout(d),
        None => e,
    }))
}

/// An endpoint with the default unary deadline.
pub fn unary_endpoint(url: &str) -> Result<ClientEndpoint, tonic::transport::Error> {
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

/// Opens the TCP connection of every client channel: Nagle off, then [`shaping::client_stream`]
/// (counted always, shaped when link emulation is on). tonic applies the connect timeout around it.
#[derive(Debug, Clone, Copy)]
struct LinkConnector;

impl tonic::codegen::Service<Uri> for LinkConnector {
    type Response = TokioIo<ClientStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            let (host, port) = host_port(&uri)?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            Ok(TokioIo::new(shaping::client_stream(tcp)))
        })
    }
}

/// Host (without IPv6 brackets) and port of `uri`; the scheme's default port when none is given.
fn host_port(uri: &Uri) -> std::io::Result<(String, u16)> {
    let host = uri
        .host()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no host in `{uri}`")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_come_from_the_uri() {
        let hp = |s: &str| host_port(&s.parse::<Uri>().unwrap()).unwrap();
        assert_eq!(hp("http://127.0.0.1:7070"), ("127.0.0.1".to_string(), 7070));
        assert_eq!(hp("http://[::1]:9"), ("::1".to_string(), 9));
        assert_eq!(hp("http://example.org"), ("example.org".to_string(), 80));
        assert_eq!(hp("https://example.org"), ("example.org".to_string(), 443));
    }

    #[tokio::test]
    async fn a_channel_counts_its_bytes_in_both_directions() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A server that speaks no HTTP/2: it answers the preface with junk and the client drops
        // the connection; by then bytes have passed both ways.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"not http/2 at all, but bytes all the same").await;
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        let before = shaping::link_bytes();
        let channel = endpoint(&format!("http://{addr}"), None).unwrap().connect().await;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let after = loop {
            let now = shaping::link_bytes();
            if now.received > before.received || tokio::time::Instant::now() > deadline {
                break now;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        drop(channel);
        assert!(after.sent >= before.sent + 24, "the HTTP/2 preface was not counted: {before:?} -> {after:?}");
        assert!(after.received > before.received, "the reply was not counted: {before:?} -> {after:?}");
    }
}
