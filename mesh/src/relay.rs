//! Both ends of a relay ([`dcnr_proto::relay`] has the protocol): [`serve`] runs one, for any
//! reachable orchestrator or PNode that offers relaying, and [`listen`] keeps a PNode behind NAT
//! reachable through one, handing each connection someone opened to it over as if it had been
//! accepted.
//!
//! Bounds: a relay holds at most [`RelayLimits::listeners`] listening PNodes (one control
//! connection per identity; a newer one replaces the older), [`RelayLimits::pending`]
//! connections waiting for their dial-back per PNode (each for at most
//! [`dcnr_proto::relay::HANDSHAKE_TIMEOUT`]), and [`RelayLimits::spliced`] relayed connections
//! in all; beyond them it answers `ERR` and closes. Every handshake line is bounded and timed.

use dcnr_proto::relay::{self, Hello, NONCE_BYTES, RelayError, TOKEN_BYTES};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// How many of what a relay holds at once.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// PNodes listening.
    pub listeners: usize,
    /// Connections waiting for one PNode's dial-back.
    pub pending: usize,
    /// Relayed connections open, in all.
    pub spliced: usize,
    /// How often the relay pings a listening PNode; two periods of silence end it.
    pub ping: Duration,
}

impl Default for RelayLimits {
    fn default() -> RelayLimits {
        RelayLimits { listeners: 1024, pending: 32, spliced: 4096, ping: Duration::from_secs(10) }
    }
}

/// Counters of a relay (process-wide, for `/metrics`).
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// PNodes listening now.
    pub listeners: AtomicU64,
    /// Connections relayed so far.
    pub spliced_total: AtomicU64,
    /// Connections refused (unknown PNode, limits, bad handshakes).
    pub refused_total: AtomicU64,
    /// Bytes copied, both directions.
    pub bytes_total: AtomicU64,
}

/// This process's relay counters.
pub static RELAY: RelayCounters = RelayCounters {
    listeners: AtomicU64::new(0),
    spliced_total: AtomicU64::new(0),
    refused_total: AtomicU64::new(0),
    bytes_total: AtomicU64::new(0),
};

struct Listening {
    /// Distinguishes a replaced control connection from its successor.
    serial: u64,
    open: mpsc::Sender<[u8; TOKEN_BYTES]>,
}

struct State {
    limits: RelayLimits,
    listening: Mutex<HashMap<String, Listening>>,
    waiting: Mutex<HashMap<[u8; TOKEN_BYTES], oneshot::Sender<TcpStream>>>,
    spliced: Arc<tokio::sync::Semaphore>,
    serial: AtomicU64,
}

impl State {
    fn listening(&self) -> std::sync::MutexGuard<'_, HashMap<String, Listening>> {
        self.listening.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; TOKEN_BYTES], oneshot::Sender<TcpStream>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs a relay on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, limits: RelayLimits) {
    let state = Arc::new(State {
        limits,
        listening: Mutex::new(HashMap::new()),
        waiting: Mutex::new(HashMap::new()),
        spliced: Arc::new(tokio::sync::Semaphore::new(limits.spliced)),
        serial: AtomicU64::new(0),
    });
    // Connections still in their handshake: beyond this many, new ones wait in the backlog.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "relay: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(state, tcp, permit).await {
                RELAY.refused_total.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%remote, error = %e, "relay: connection ended");
            }
        });
    }
}

/// Refuses with a reason the other side can read, then reports it.
async fn refuse<T, W: AsyncWrite + Unpin>(w: &mut W, why: String) -> Result<T, RelayError> {
    let _ = relay::write_line(w, &format!("ERR {why}\n")).await;
    Err(RelayError::Refused(why))
}

async fn connection(
    state: Arc<State>,
    mut tcp: TcpStream,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), RelayError> {
    let hello = relay::read_line_timely(&mut tcp).await?;
    let hello = match Hello::parse(&hello) {
        Ok(h) => h,
        Err(e) => return refuse(&mut tcp, e.to_string()).await,
    };
    match hello {
        Hello::Listen(key) => {
            let (id, serial, open) = match admit_listener(&state, &mut tcp, key).await? {
                Some(admitted) => admitted,
                None => return Ok(()),
            };
            drop(permit);
            RELAY.listeners.fetch_add(1, Ordering::Relaxed);
            let r = control(&state, tcp, open).await;
            RELAY.listeners.fetch_sub(1, Ordering::Relaxed);
            let mut listening = state.listening();
            if listening.get(&id).is_some_and(|l| l.serial == serial) {
                listening.remove(&id);
            }
            tracing::info!(pnode = %id, "relay: pnode stopped listening");
            r
        }
        Hello::Connect(target) => {
            drop(permit);
            connect(&state, tcp, &target).await
        }
        Hello::Accept(token) => {
            drop(permit);
            let waiter = state.waiting().remove(&token);
            match waiter {
                Some(w) => {
                    // The connecting side answers both ends once it has this stream.
                    let _ = w.send(tcp);
                    Ok(())
                }
                None => refuse(&mut tcp, "no connection waits for this token".into()).await,
            }
        }
    }
}

/// The listen handshake: a fresh nonce, the PNode's signature over it, then its slot. Answers
/// `None` when refused (the refusal already sent).
async fn admit_listener(
    state: &State,
    tcp: &mut TcpStream,
    key: [u8; 32],
) -> Result<Option<(String, u64, mpsc::Receiver<[u8; TOKEN_BYTES]>)>, RelayError> {
    let mut nonce = [0u8; NONCE_BYTES];
    if getrandom::fill(&mut nonce).is_err() {
        return refuse(tcp, "the relay has no randomness".into()).await;
    }
    relay::write_line(tcp, &format!("NONCE {}\n", hex::encode(nonce))).await?;
    let line = relay::read_line_timely(tcp).await?;
    let sig = line.strip_prefix("SIGN ").and_then(relay::hex_array::<64>);
    let Some(sig) = sig else { return refuse(tcp, "expected SIGN <signature>".into()).await };
    let id = match relay::verify_listen(&key, &nonce, &sig) {
        Ok(id) => id,
        Err(e) => return refuse(tcp, e.to_string()).await,
    };
    let (open_tx, open_rx) = mpsc::channel(state.limits.pending);
    let serial = state.serial.fetch_add(1, Ordering::Relaxed);
    let admitted = {
        let mut listening = state.listening();
        let full = !listening.contains_key(&id) && listening.len() >= state.limits.listeners;
        if !full {
            // A newer control connection replaces an older one (the PNode reconnected).
            listening.insert(id.clone(), Listening { serial, open: open_tx });
        }
        !full
    };
    if !admitted {
        return refuse(tcp, format!("this relay serves {} pnodes already", state.limits.listeners)).await;
    }
    relay::write_line(tcp, &format!("OK {id}\n")).await?;
    tracing::info!(pnode = %id, "relay: pnode listening");
    Ok(Some((id, serial, open_rx)))
}

/// A listening PNode's control connection: passes on `OPEN`s, pings, and ends when the PNode
/// goes silent, closes, or is replaced (its sender dropped).
async fn control(state: &State, tcp: TcpStream, mut open: mpsc::Receiver<[u8; TOKEN_BYTES]>) -> Result<(), RelayError> {
    let (mut rd, mut wr) = tcp.into_split();
    let (pong_tx, mut pong_rx) = mpsc::channel::<()>(1);
    let reader = tokio::spawn(async move {
        loop {
            match relay::read_line(&mut rd).await {
                Ok(l) if l == "PONG" => {
                    let _ = pong_tx.try_send(());
                }
                Ok(l) => {
                    return Err::<(), _>(RelayError::Protocol(format!("unexpected {l:?} on a control connection")));
                }
                Err(e) => return Err(e),
            }
        }
    });
    let _abort = AbortOnDrop(reader);
    let mut ping = tokio::time::interval(state.limits.ping);
    let mut unanswered = 0u32;
    loop {
        tokio::select! {
            token = open.recv() => match token {
                Some(t) => relay::write_line(&mut wr, &format!("OPEN {}\n", hex::encode(t))).await?,
                None => return Ok(()),
            },
            _ = ping.tick() => {
                if unanswered >= 2 {
                    return Err(RelayError::Timeout(state.limits.ping * 2));
                }
                unanswered += 1;
                relay::write_line(&mut wr, "PING\n").await?;
            }
            p = pong_rx.recv() => match p {
                Some(()) => unanswered = 0,
                None => return Ok(()),
            },
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Someone wants `target`: ask it to dial back, then splice the two connections.
async fn connect(state: &State, mut tcp: TcpStream, target: &str) -> Result<(), RelayError> {
    let Ok(slot) = state.spliced.clone().try_acquire_owned() else {
        return refuse(&mut tcp, "the relay is at its connection limit".into()).await;
    };
    let open = state.listening().get(target).map(|l| l.open.clone());
    let Some(open) = open else { return refuse(&mut tcp, format!("pnode {target} is not listening here")).await };
    let mut token = [0u8; TOKEN_BYTES];
    if getrandom::fill(&mut token).is_err() {
        return refuse(&mut tcp, "the relay has no randomness".into()).await;
    }
    let (tx, rx) = oneshot::channel();
    state.waiting().insert(token, tx);
    if open.try_send(token).is_err() {
        state.waiting().remove(&token);
        return refuse(&mut tcp, format!("pnode {target} has too many connections waiting")).await;
    }
    let accepted = tokio::time::timeout(relay::HANDSHAKE_TIMEOUT, rx).await;
    state.waiting().remove(&token);
    let Ok(Ok(mut back)) = accepted else {
        return refuse(&mut tcp, format!("pnode {target} did not dial back")).await;
    };
    relay::write_line(&mut back, "OK\n").await?;
    relay::write_line(&mut tcp, "OK\n").await?;
    RELAY.spliced_total.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(pnode = %target, "relay: connection spliced");
    let copied = tokio::io::copy_bidirectional(&mut tcp, &mut back).await;
    drop(slot);
    if let Ok((a, b)) = copied {
        RELAY.bytes_total.fetch_add(a.saturating_add(b), Ordering::Relaxed);
    }
    Ok(())
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address cannot be listened on.
    #[error("cannot listen for relay connections on {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
    /// The address to advertise is not `host:port`.
    #[error("the relay address {0:?} is not host:port")]
    Advertise(String),
}

/// Binds `listen` and runs a relay there (default limits) on the current runtime; answers the
/// `host:port` to advertise: `advertise`, or the address bound.
pub async fn start(listen: std::net::SocketAddr, advertise: Option<String>) -> Result<String, StartError> {
    let listener = TcpListener::bind(listen).await.map_err(|e| StartError::Bind(listen, e))?;
    let local = listener.local_addr().map_err(|e| StartError::Bind(listen, e))?;
    let advertised = advertise.unwrap_or_else(|| local.to_string());
    if !relay::is_relay_address(&advertised) {
        return Err(StartError::Advertise(advertised));
    }
    tokio::spawn(serve(listener, RelayLimits::default()));
    tracing::info!(%local, %advertised, "relaying for pnodes behind NAT");
    Ok(advertised)
}

/// Whether the server of endpoint `url` accepts a TCP connection within `within`: how an
/// orchestrator finds that a registering PNode is behind NAT (a dropped or refused connection).
pub async fn accepts_connections(url: &str, within: Duration) -> bool {
    let Some((host, port)) = dcnr_proto::transport::url_host_port(url) else { return false };
    matches!(tokio::time::timeout(within, TcpStream::connect((host.as_str(), port))).await, Ok(Ok(_)))
}

/// A PNode's standing with its relay: whether the control connection is up now.
#[derive(Debug, Clone, Default)]
pub struct Listener {
    ready: Arc<AtomicBool>,
}

impl Listener {
    /// Whether the relay accepted this PNode and the control connection is open.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Signs a relay's nonce with the PNode's identity key.
pub type NonceSigner = Arc<dyn Fn(&[u8; NONCE_BYTES]) -> [u8; 64] + Send + Sync>;

/// Keeps this PNode (public key `public`) listening at the relay `addr` (`host:port`), and
/// hands every connection opened to it through the relay to `conns`. Reconnects, backing off,
/// whenever the control connection fails; stops when `conns` closes or the task is aborted.
pub fn listen(
    addr: String,
    public: [u8; 32],
    sign: NonceSigner,
    conns: mpsc::Sender<TcpStream>,
) -> (Listener, tokio::task::JoinHandle<()>) {
    let listener = Listener::default();
    let ready = listener.ready.clone();
    let task = tokio::spawn(async move {
        let mut wait = Duration::from_millis(200);
        while !conns.is_closed() {
            match listen_once(&addr, public, &sign, &conns, &ready).await {
                Ok(()) => wait = Duration::from_millis(200),
                Err(e) => tracing::warn!(relay = %addr, error = %e, "relay connection lost; reconnecting"),
            }
            ready.store(false, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    });
    (listener, task)
}

async fn listen_once(
    addr: &str,
    public: [u8; 32],
    sign: &NonceSigner,
    conns: &mpsc::Sender<TcpStream>,
    ready: &AtomicBool,
) -> Result<(), RelayError> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    relay::write_line(&mut tcp, &Hello::Listen(public).line()).await?;
    let line = relay::read_line_timely(&mut tcp).await?;
    if let Some(why) = line.strip_prefix("ERR ") {
        return Err(RelayError::Refused(why.to_string()));
    }
    let nonce = line
        .strip_prefix("NONCE ")
        .and_then(relay::hex_array::<NONCE_BYTES>)
        .ok_or_else(|| RelayError::Protocol(format!("expected NONCE, got {line:?}")))?;
    relay::write_line(&mut tcp, &format!("SIGN {}\n", hex::encode(sign(&nonce)))).await?;
    let id = relay::expect_ok(&mut tcp).await?;
    ready.store(true, Ordering::Relaxed);
    tracing::info!(relay = %addr, pnode = %id, "listening through the relay");
    // The relay pings every period; silence for three of the longest periods means it is gone.
    let silence = RelayLimits::default().ping * 3;
    loop {
        let line = tokio::time::timeout(silence, relay::read_line(&mut tcp))
            .await
            .map_err(|_| RelayError::Timeout(silence))??;
        if line == "PING" {
            relay::write_line(&mut tcp, "PONG\n").await?;
        } else if let Some(token) = line.strip_prefix("OPEN ").and_then(relay::hex_array::<TOKEN_BYTES>) {
            let (addr, conns) = (addr.to_string(), conns.clone());
            tokio::spawn(async move {
                match dial_back(&addr, token).await {
                    Ok(tcp) => {
                        let _ = conns.send(tcp).await;
                    }
                    Err(e) => tracing::debug!(relay = %addr, error = %e, "dial-back failed"),
                }
            });
        } else {
            return Err(RelayError::Protocol(format!("unexpected {line:?} on the control connection")));
        }
    }
}

async fn dial_back(addr: &str, token: [u8; TOKEN_BYTES]) -> Result<TcpStream, RelayError> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    relay::write_line(&mut tcp, &Hello::Accept(token).line()).await?;
    relay::expect_ok(&mut tcp).await?;
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    fn signer(k: ed25519_dalek::SigningKey) -> NonceSigner {
        Arc::new(move |n| relay::sign_listen(&k, n))
    }

    async fn relay_at(limits: RelayLimits) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(serve(l, limits));
        addr
    }

    #[tokio::test]
    async fn a_listening_pnode_is_reached_through_the_relay_both_ways() {
        let addr = relay_at(RelayLimits::default()).await;
        let k = key(1);
        let id = dcnr_proto::identity::pnode_id(&k.verifying_key().to_bytes());
        let (tx, mut rx) = mpsc::channel(4);
        let (listener, _task) = listen(addr.clone(), k.verifying_key().to_bytes(), signer(k), tx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !listener.is_ready() {
            assert!(tokio::time::Instant::now() < deadline, "never listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (host, port) = addr.rsplit_once(':').unwrap();
        let port: u16 = port.parse().unwrap();
        for round in 0..3u8 {
            let mut client = relay::dial(host, port, &id).await.unwrap();
            let mut server = rx.recv().await.unwrap();
            client.write_all(&[round; 1000]).await.unwrap();
            let mut got = [0u8; 1000];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round; 1000]);
            server.write_all(b"back").await.unwrap();
            let mut back = [0u8; 4];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"back");
        }
        let e = relay::dial(host, port, "pn-00000000000000ff").await.unwrap_err();
        assert!(matches!(&e, RelayError::Refused(m) if m.contains("not listening")), "{e}");
    }

    #[tokio::test]
    async fn a_forged_listen_or_a_stray_accept_is_refused() {
        let addr = relay_at(RelayLimits::default()).await;
        // Claims key 1 but signs with key 2.
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        relay::write_line(&mut tcp, &Hello::Listen(key(1).verifying_key().to_bytes()).line()).await.unwrap();
        let nonce = relay::read_line(&mut tcp).await.unwrap();
        let nonce = relay::hex_array::<NONCE_BYTES>(nonce.strip_prefix("NONCE ").unwrap()).unwrap();
        let sig = relay::sign_listen(&key(2), &nonce);
        relay::write_line(&mut tcp, &format!("SIGN {}\n", hex::encode(sig))).await.unwrap();
        assert!(matches!(relay::expect_ok(&mut tcp).await, Err(RelayError::Refused(_))));
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        relay::write_line(&mut tcp, &Hello::Accept([1; TOKEN_BYTES]).line()).await.unwrap();
        assert!(matches!(relay::expect_ok(&mut tcp).await, Err(RelayError::Refused(_))));
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(relay::expect_ok(&mut tcp).await.is_err());
    }

    #[tokio::test]
    async fn a_full_relay_says_so() {
        let addr = relay_at(RelayLimits { listeners: 1, ..RelayLimits::default() }).await;
        let (tx, _rx) = mpsc::channel(4);
        let (first, _t1) = listen(addr.clone(), key(1).verifying_key().to_bytes(), signer(key(1)), tx.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !first.is_ready() {
            assert!(tokio::time::Instant::now() < deadline, "never listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r =
            listen_once(&addr, key(2).verifying_key().to_bytes(), &signer(key(2)), &tx, &AtomicBool::new(false)).await;
        assert!(matches!(&r, Err(RelayError::Refused(m)) if m.contains("serves 1 pnodes")), "{r:?}");
    }
}
