//! Client endpoints and servers configured the same way everywhere: Nagle off, explicit
//! deadlines, and HTTP/2 windows large enough that a tensor message never waits for a window
//! update (the 64 KiB default would stall every activation of a 64x256 batch for a round trip).
//!
//! Every connection the project opens is a client channel made here ([`ClientEndpoint`]); its
//! TCP connection comes from one connector that turns Nagle off, counts the bytes and, when link
//! emulation is on, shapes them ([`crate::shaping`]), and wraps them in TLS ([`crate::tls`]):
//! `https://` URLs get TLS checked against the mesh's CA and the identity the caller expects;
//! `http://` URLs only where the process runs `--insecure-plaintext`. Servers take connections
//! from [`incoming`], which does the TLS handshake off the accept loop and tells every handler
//! the proven caller ([`peer`]).

use crate::limits::{CONNECT_TIMEOUT, MAX_CONCURRENT_STREAMS, UNARY_TIMEOUT};
use crate::shaping::{self, ClientStream};
use crate::tls::{Expect, Peer, TlsError};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint, Server, Uri};

/// Why a client endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The URL does not parse.
    #[error("`{0}` is not a valid URL (expected e.g. https://127.0.0.1:7070)")]
    Url(String),
    /// TLS settings missing or unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A plaintext URL in a process that requires TLS, or the reverse.
    #[error("{0}")]
    Scheme(String),
}

/// HTTP/2 stream flow-control window.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// A client endpoint whose channels connect only through this module's connector, so no
/// connection escapes the byte counters or the link emulation.
#[derive(Debug, Clone)]
pub struct ClientEndpoint(Endpoint, LinkConnector);

impl ClientEndpoint {
    /// Connects now.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        self.0.connect_with_connector(self.1.clone()).await
    }

    /// A channel that connects on first use (and again after a broken connection).
    pub fn connect_lazy(&self) -> Channel {
        self.0.connect_with_connector_lazy(self.1.clone())
    }
}

/// A client endpoint for `url`, whose server must prove to be `expect`; `deadline` applies to
/// unary calls (None for long-lived streams).
pub fn endpoint(url: &str, deadline: Option<Duration>, expect: &Expect) -> Result<ClientEndpoint, EndpointError> {
    endpoint_as(url, deadline, expect, crate::tls::client_security().as_ref())
}

/// Like [`endpoint`], with `security` instead of the process's client security (a test that
/// acts as several parties at once).
pub fn endpoint_as(
    url: &str,
    deadline: Option<Duration>,
    expect: &Expect,
    security: Option<&crate::tls::ClientSecurity>,
) -> Result<ClientEndpoint, EndpointError> {
    let tls = match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("https") => match crate::tls::client_tls_for(security, expect)? {
            Some(tls) => Some(tls),
            None => {
                return Err(EndpointError::Scheme(format!(
                    "`{url}` asks for TLS, but this process runs with --insecure-plaintext"
                )));
            }
        },
        Some("http") => match security {
            Some(crate::tls::ClientSecurity::Plaintext) => None,
            _ => {
                return Err(EndpointError::Scheme(format!(
                    "`{url}` is plaintext; the mesh speaks TLS (https://). Plaintext is for local development \
                     only: pass --insecure-plaintext to every process"
                )));
            }
        },
        _ => return Err(EndpointError::Url(url.to_string())),
    };
    let tls = match (relayed_target_of(url), tls) {
        // Through a relay the certificate must name the PNode asked for, whatever the caller
        // expected: the relay chose where the bytes went.
        (Some(target), Some(_)) => match expect {
            Expect::PNode(id) if *id != target => {
                return Err(EndpointError::Scheme(format!("`{url}` reaches pnode {target}, not {expect}")));
            }
            _ => crate::tls::client_tls_for(security, &Expect::PNode(target))?,
        },
        (_, tls) => tls,
    };
    let e = Endpoint::from_shared(url.to_string())
        .map_err(|_| EndpointError::Url(url.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    let e = match deadline {
        Some(d) => e.timeout(d),
        None => e,
    };
    Ok(ClientEndpoint(e, LinkConnector { tls: tls.map(Arc::new) }))
}

/// The PNode a relayed endpoint URL reaches ([`crate::relay::relayed_url`]).
fn relayed_target_of(url: &str) -> Option<String> {
    let uri: Uri = url.parse().ok()?;
    crate::relay::relayed_target(uri.path()).map(str::to_string)
}

/// An endpoint with the default unary deadline.
pub fn unary_endpoint(url: &str, expect: &Expect) -> Result<ClientEndpoint, EndpointError> {
    endpoint(url, Some(UNARY_TIMEOUT), expect)
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
/// (counted always, shaped when link emulation is on), then TLS when the URL asked for it. tonic
/// applies the connect timeout around it.
#[derive(Clone)]
struct LinkConnector {
    tls: Option<Arc<(Arc<rustls::ClientConfig>, ServerName<'static>)>>,
}

impl std::fmt::Debug for LinkConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConnector").field("tls", &self.tls.as_ref().map(|t| t.1.to_str().into_owned())).finish()
    }
}

/// A client connection: plaintext (local development) or TLS.
pub enum LinkStream {
    /// No TLS.
    Plain(ClientStream),
    /// TLS over the counted, possibly shaped, stream.
    Tls(Box<tokio_rustls::client::TlsStream<ClientStream>>),
}

impl tonic::codegen::Service<Uri> for LinkConnector {
    type Response = TokioIo<LinkStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let (host, port) = host_port(&uri)?;
            let tcp = match crate::relay::relayed_target(uri.path()) {
                Some(target) => crate::relay::dial(&host, port, target).await?,
                None => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
            };
            tcp.set_nodelay(true)?;
            let stream = shaping::client_stream(tcp);
            Ok(TokioIo::new(match tls {
                None => LinkStream::Plain(stream),
                Some(t) => {
                    let (config, name) = &*t;
                    let tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name.clone(), stream).await?;
                    LinkStream::Tls(Box::new(tls))
                }
            }))
        })
    }
}

/// Delegates the IO traits to whichever stream a connection is.
macro_rules! delegate_io {
    ($ty:ident, $a:ident, $b:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::$b(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }

        impl AsyncWrite for $ty {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::$b(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::$b(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::$a(s) => s.is_write_vectored(),
                    $ty::$b(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_flush(cx),
                    $ty::$b(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::$b(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_io!(LinkStream, Plain, Tls);
delegate_io!(ServerStream, Plain, Tls);

/// A server connection: plaintext (local development) or TLS.
pub enum ServerStream {
    /// No TLS: every caller is anonymous.
    Plain(TcpStream),
    /// TLS; the client's certificate, if any, was verified against the mesh's CA.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// What a handler knows about its caller's connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The remote address.
    pub remote: Option<SocketAddr>,
    /// Who the certificate proves the caller to be.
    pub peer: Peer,
}

impl tonic::transport::server::Connected for ServerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            ServerStream::Plain(s) => PeerInfo { remote: s.peer_addr().ok(), peer: Peer::Anonymous },
            ServerStream::Tls(s) => {
                let (tcp, conn) = s.get_ref();
                let peer = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|leaf| Peer::from_leaf(leaf))
                    .unwrap_or(Peer::Anonymous);
                PeerInfo { remote: tcp.peer_addr().ok(), peer }
            }
        }
    }
}

/// The proven caller of a request (anonymous when it presented no certificate).
pub fn peer<T>(req: &tonic::Request<T>) -> Peer {
    req.extensions().get::<PeerInfo>().map(|i| i.peer.clone()).unwrap_or(Peer::Anonymous)
}

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// The connections a server accepts from `listener`: Nagle off, and with `tls` a TLS handshake,
/// done on its own task (bounded in time and number) so a slow client holds up no one else. A
/// failed handshake is logged and dropped; it never stops the server.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> impl tokio_stream::Stream<Item = Result<ServerStream, std::io::Error>> + Send + 'static {
    incoming_with(listener, None, tls)
}

/// [`incoming`], also taking connections handed over by `relayed` (those a PNode behind NAT
/// opened to its relay, [`crate::relay`]); they get the same TLS handshake.
pub fn incoming_with(
    listener: TcpListener,
    mut relayed: Option<tokio::sync::mpsc::Receiver<TcpStream>>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> impl tokio_stream::Stream<Item = Result<ServerStream, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<ServerStream>(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let next = async {
                match relayed.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                Some(tcp) = next => {
                    let remote = tcp.peer_addr();
                    remote.map(|r| (tcp, r))
                }
            };
            let (tcp, remote) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let stream = match acceptor {
                    None => ServerStream::Plain(tcp),
                    Some(a) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(tcp)).await {
                        Ok(Ok(s)) => ServerStream::Tls(Box::new(s)),
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            REFUSED_HANDSHAKES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            REFUSED_HANDSHAKES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                    },
                };
                drop(permit);
                let _ = tx.send(stream).await;
            });
        }
    });
    tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

static REFUSED_HANDSHAKES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// TLS handshakes this process's servers refused or that timed out (`dcnr_tls_handshakes_refused_total`).
pub fn refused_handshakes() -> u64 {
    REFUSED_HANDSHAKES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Host and port of the URL `url` (see [`host_port`]), or `None` if it does not parse.
pub fn url_host_port(url: &str) -> Option<(String, u16)> {
    host_port(&url.parse::<Uri>().ok()?).ok()
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
        crate::tls::set_client_security(crate::tls::ClientSecurity::Plaintext);
        let channel = endpoint(&format!("http://{addr}"), None, &Expect::Orchestrator).unwrap().connect().await;
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
