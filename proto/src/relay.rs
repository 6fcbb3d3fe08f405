//! The relay protocol: how a PNode that cannot accept connections (behind NAT or a firewall)
//! is still reached, over connections it opened itself.
//!
//! A relay is a plain TCP service offered by any reachable orchestrator or PNode
//! (`--relay-listen`). Each connection to it starts with one line:
//!
//! - `DCNR-RELAY/1 LISTEN <public key hex>`: a PNode behind NAT keeps this control connection
//!   open. The relay answers `NONCE <hex>`, the PNode `SIGN <hex>` (its ed25519 signature over
//!   [`listen_payload`]), and the relay `OK <pnode id>`. From then on the relay writes
//!   `OPEN <token>` when someone wants to reach that PNode, and `PING` now and then (answered
//!   `PONG`).
//! - `DCNR-RELAY/1 CONNECT <pnode id>`: someone wants to reach that PNode. The relay sends it an
//!   `OPEN`, and the PNode dials back with
//! - `DCNR-RELAY/1 ACCEPT <token>`: the relay answers `OK` to both ends and then copies bytes
//!   between them, blindly.
//!
//! What flows through is the same gRPC-over-TLS a direct connection carries, end to end between
//! the two parties: the relay sees ciphertext, cannot forge either side (the client checks that
//! the certificate names the PNode it asked for, [`crate::transport`]), and can at worst drop
//! the traffic, as any router on the path could. Lines are ASCII, at most [`MAX_LINE`] bytes, and
//! read byte by byte so no byte of the stream that follows is consumed with them.
//!
//! A relayed PNode's endpoint is an ordinary URL whose path names the target:
//! `https://<relay host>:<relay port>/relay/<pnode id>` ([`relayed_url`]); every client connects
//! through [`crate::transport`], which dials such a URL through [`dial`].

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// First word of every opening line; a relay refuses another version.
pub const MAGIC: &str = "DCNR-RELAY/1";

/// Longest line either side sends or accepts, newline included.
pub const MAX_LINE: usize = 256;

/// Longest wait for the other side's next line while a connection is being set up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of a relay's listen nonce.
pub const NONCE_BYTES: usize = 32;

/// Bytes of a connection token.
pub const TOKEN_BYTES: usize = 16;

/// Path prefix of a relayed endpoint URL.
const PATH_PREFIX: &str = "/relay/";

/// Domain tag of the listen proof.
const LISTEN_TAG: &[u8] = b"dcnr-relay-listen-v1\0";

/// Why a relay exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The connection failed or closed.
    #[error("relay connection: {0}")]
    Io(#[from] std::io::Error),
    /// The other side said something this protocol does not allow.
    #[error("relay protocol: {0}")]
    Protocol(String),
    /// The relay refused, saying why.
    #[error("the relay refused: {0}")]
    Refused(String),
    /// No answer in time.
    #[error("the relay did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<RelayError> for std::io::Error {
    fn from(e: RelayError) -> std::io::Error {
        match e {
            RelayError::Io(e) => e,
            RelayError::Refused(m) => std::io::Error::new(std::io::ErrorKind::ConnectionRefused, m),
            RelayError::Timeout(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, e.to_string()),
            RelayError::Protocol(_) => std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        }
    }
}

/// The opening line of a connection to a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A PNode behind NAT offers to be reached here (its public key).
    Listen([u8; 32]),
    /// Reach the PNode with this id.
    Connect(String),
    /// The dial-back for the `OPEN` with this token.
    Accept([u8; TOKEN_BYTES]),
}

impl Hello {
    /// The line, newline included.
    pub fn line(&self) -> String {
        match self {
            Hello::Listen(key) => format!("{MAGIC} LISTEN {}\n", hex::encode(key)),
            Hello::Connect(id) => format!("{MAGIC} CONNECT {id}\n"),
            Hello::Accept(token) => format!("{MAGIC} ACCEPT {}\n", hex::encode(token)),
        }
    }

    /// Parses an opening line (without its newline).
    pub fn parse(line: &str) -> Result<Hello, RelayError> {
        let bad = || RelayError::Protocol(format!("unexpected opening {:?}", shown(line)));
        let mut words = line.split(' ');
        match words.next() {
            Some(MAGIC) => {}
            Some(w) if w.starts_with("DCNR-RELAY/") => {
                return Err(RelayError::Protocol(format!(
                    "unsupported relay protocol {:?}; this side speaks {MAGIC}",
                    shown(w)
                )));
            }
            _ => return Err(bad()),
        }
        let (Some(verb), Some(arg), None) = (words.next(), words.next(), words.next()) else { return Err(bad()) };
        match verb {
            "LISTEN" => Ok(Hello::Listen(hex_array(arg).ok_or_else(bad)?)),
            "CONNECT" if is_pnode_id(arg) => Ok(Hello::Connect(arg.to_string())),
            "ACCEPT" => Ok(Hello::Accept(hex_array(arg).ok_or_else(bad)?)),
            _ => Err(bad()),
        }
    }
}

/// At most 64 characters of a line, for an error message.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `N` bytes from exactly `2N` hex digits.
pub fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    hex::decode(s).ok()?.try_into().ok()
}

/// Whether `s` looks like a PNode id (`pn-` and hex, as `identity::pnode_id` makes them).
pub fn is_pnode_id(s: &str) -> bool {
    s.len() > 3
        && s.len() <= 64
        && s.starts_with("pn-")
        && s[3..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// What a listening PNode signs: the relay's fresh nonce, so a proof is good for one control
/// connection only.
pub fn listen_payload(nonce: &[u8; NONCE_BYTES]) -> Vec<u8> {
    [LISTEN_TAG, nonce.as_slice()].concat()
}

/// A PNode's proof that it holds `key`, for the relay's `nonce`.
pub fn sign_listen(key: &SigningKey, nonce: &[u8; NONCE_BYTES]) -> [u8; 64] {
    key.sign(&listen_payload(nonce)).to_bytes()
}

/// Checks a listen proof; returns the PNode id the key gives.
pub fn verify_listen(public: &[u8; 32], nonce: &[u8; NONCE_BYTES], signature: &[u8; 64]) -> Result<String, RelayError> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| RelayError::Protocol("not an ed25519 public key".into()))?;
    key.verify_strict(&listen_payload(nonce), &Signature::from_bytes(signature))
        .map_err(|_| RelayError::Refused("the listen signature does not verify".into()))?;
    Ok(crate::identity::pnode_id(public))
}

/// Reads one line (without its newline), a byte at a time so nothing after it is consumed.
pub async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, RelayError> {
    let mut line = Vec::with_capacity(64);
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            break;
        }
        if line.len() + 1 >= MAX_LINE {
            return Err(RelayError::Protocol(format!("a line longer than {MAX_LINE} bytes")));
        }
        if !(b.is_ascii_graphic() || b == b' ') {
            return Err(RelayError::Protocol("a line with control or non-ASCII bytes".into()));
        }
        line.push(b);
    }
    // Checked above: printable ASCII only.
    String::from_utf8(line).map_err(|_| RelayError::Protocol("a line that is not ASCII".into()))
}

/// [`read_line`] within [`HANDSHAKE_TIMEOUT`].
pub async fn read_line_timely<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, RelayError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read_line(r)).await.map_err(|_| RelayError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// Writes one line (newline included by the caller).
pub async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, line: &str) -> Result<(), RelayError> {
    w.write_all(line.as_bytes()).await?;
    w.flush().await?;
    Ok(())
}

/// Reads the relay's answer: `OK` (with any argument) is success, `ERR <why>` a refusal.
pub async fn expect_ok<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, RelayError> {
    let line = read_line_timely(r).await?;
    match line.split_once(' ').unwrap_or((line.as_str(), "")) {
        ("OK", rest) => Ok(rest.to_string()),
        ("ERR", why) => Err(RelayError::Refused(why.to_string())),
        _ => Err(RelayError::Protocol(format!("expected OK or ERR, got {:?}", shown(&line)))),
    }
}

/// A TCP connection to PNode `target` through the relay at `host:port`, ready for the TLS (or
/// plaintext gRPC) that would have gone to the PNode directly.
pub async fn dial(host: &str, port: u16, target: &str) -> Result<TcpStream, RelayError> {
    let mut tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    write_line(&mut tcp, &Hello::Connect(target.to_string()).line()).await?;
    // The relay answers once the PNode has dialed back, which takes it a round trip.
    tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, expect_ok(&mut tcp))
        .await
        .map_err(|_| RelayError::Timeout(HANDSHAKE_TIMEOUT * 2))??;
    Ok(tcp)
}

/// The endpoint URL of PNode `pnode` reached through the relay at `relay` (`host:port`), with
/// `scheme` (`https`, or `http` in plaintext mode).
pub fn relayed_url(scheme: &str, relay: &str, pnode: &str) -> String {
    format!("{scheme}://{relay}{PATH_PREFIX}{pnode}")
}

/// The PNode a URL path names, when the URL is a relayed endpoint (`/relay/<id>`).
pub fn relayed_target(path: &str) -> Option<&str> {
    path.strip_prefix(PATH_PREFIX).filter(|id| is_pnode_id(id))
}

/// Whether `url` has a path beyond `/` (a PNode may advertise only a plain `scheme://host:port`;
/// relayed endpoints are assigned, never claimed).
pub fn has_path(url: &str) -> bool {
    url.split_once("://").and_then(|(_, rest)| rest.split_once('/')).is_some_and(|(_, path)| !path.is_empty())
}

/// Whether `addr` is a usable `host:port` to advertise a relay at.
pub fn is_relay_address(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else { return false };
    !host.is_empty()
        && addr.len() <= 255
        && port.parse::<u16>().is_ok_and(|p| p != 0)
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_lines_round_trip_and_garbage_is_refused() {
        let key = [7u8; 32];
        for h in [Hello::Listen(key), Hello::Connect("pn-0123456789abcdef".into()), Hello::Accept([9; TOKEN_BYTES])] {
            let line = h.line();
            assert!(line.len() < MAX_LINE);
            assert_eq!(Hello::parse(line.trim_end_matches('\n')).unwrap(), h);
        }
        for bad in [
            "",
            "GET / HTTP/1.1",
            "DCNR-RELAY/1 CONNECT",
            "DCNR-RELAY/1 CONNECT ../etc",
            "DCNR-RELAY/1 CONNECT pn-ABC",
            "DCNR-RELAY/1 LISTEN 00",
            "DCNR-RELAY/1 ACCEPT zz",
            "DCNR-RELAY/1 CONNECT pn-01 extra",
            "DCNR-RELAY/1 SHOUT pn-01",
        ] {
            assert!(matches!(Hello::parse(bad), Err(RelayError::Protocol(_))), "{bad:?} was accepted");
        }
        let e = Hello::parse("DCNR-RELAY/9 CONNECT pn-01").unwrap_err().to_string();
        assert!(e.contains("unsupported relay protocol"), "{e}");
    }

    #[test]
    fn a_listen_proof_holds_for_its_key_and_nonce_only() {
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let public = key.verifying_key().to_bytes();
        let nonce = [5u8; NONCE_BYTES];
        let sig = sign_listen(&key, &nonce);
        assert_eq!(verify_listen(&public, &nonce, &sig).unwrap(), crate::identity::pnode_id(&public));
        assert!(verify_listen(&public, &[6u8; NONCE_BYTES], &sig).is_err(), "another nonce");
        let other = SigningKey::from_bytes(&[4u8; 32]).verifying_key().to_bytes();
        assert!(verify_listen(&other, &nonce, &sig).is_err(), "another key");
    }

    #[test]
    fn relayed_urls_name_their_target() {
        let url = relayed_url("https", "10.0.0.1:7071", "pn-00ff");
        assert_eq!(url, "https://10.0.0.1:7071/relay/pn-00ff");
        let uri: tonic::transport::Uri = url.parse().unwrap();
        assert_eq!(relayed_target(uri.path()), Some("pn-00ff"));
        assert_eq!(relayed_target("/"), None);
        assert_eq!(relayed_target("/relay/not-an-id"), None);
        assert!(has_path(&url));
        assert!(!has_path("https://10.0.0.1:7071"));
        assert!(!has_path("https://10.0.0.1:7071/"));
        assert!(is_relay_address("10.0.0.1:7071") && is_relay_address("relay.example.org:7071"));
        assert!(!is_relay_address("10.0.0.1") && !is_relay_address("10.0.0.1:0") && !is_relay_address("a b:1"));
    }

    #[tokio::test]
    async fn lines_are_bounded_and_leave_what_follows_unread() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        write_line(&mut a, "OK pn-01\nrest").await.unwrap();
        assert_eq!(expect_ok(&mut b).await.unwrap(), "pn-01");
        let mut rest = [0u8; 4];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"rest");
        write_line(&mut a, &"x".repeat(MAX_LINE * 2)).await.unwrap();
        assert!(matches!(read_line(&mut b).await, Err(RelayError::Protocol(_))));
        let (mut a, mut b) = tokio::io::duplex(64);
        write_line(&mut a, "ERR no such pnode\n").await.unwrap();
        assert!(matches!(expect_ok(&mut b).await, Err(RelayError::Refused(m)) if m == "no such pnode"));
    }
}
