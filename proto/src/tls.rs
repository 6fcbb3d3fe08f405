//! TLS on every link, and who is at the other end.
//!
//! The orchestrator is the mesh's certificate authority (docs/SECURITY.md). Every member holds a
//! certificate from it that names what the member is, as a DNS name no resolver is ever asked
//! about: [`ORCHESTRATOR_NAME`] for the orchestrator, [`pnode_name`] for a PNode. A client checks
//! the server's certificate against the CA *and* against the identity it meant to reach
//! ([`Expect`]), whatever address it dialled; a server asks every client for a certificate,
//! verifies any it gets against the CA, and hands handlers the proven [`Peer`]. Clients without a
//! certificate (a maintainer's CLI, a PNode before it registers) are [`Peer::Anonymous`] and may
//! call only what is open to anyone.
//!
//! Certificates are held in a [`CertSlot`], so a renewed certificate takes effect for new
//! connections without restarting a server.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::{Arc, RwLock};

pub use rustls::ServerConfig as ServerTls;
pub use rustls::pki_types::CertificateDer;

/// The name in the orchestrator's certificate.
pub const ORCHESTRATOR_NAME: &str = "orchestrator.dcnr";
/// Suffix of the name in a PNode's certificate.
const PNODE_SUFFIX: &str = ".pnode.dcnr";
/// ALPN protocol of every link: gRPC runs over HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// The name in PNode `id`'s certificate.
pub fn pnode_name(id: &str) -> String {
    format!("{id}{PNODE_SUFFIX}")
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// PEM or DER that does not parse.
    #[error("{0}")]
    Parse(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA presented by a server is not the pinned one.
    #[error("the orchestrator's CA has SHA-256 {found}, not the pinned {pinned}")]
    PinMismatch {
        /// Pinned fingerprint.
        pinned: String,
        /// Presented fingerprint.
        found: String,
    },
    /// Reaching the server to read its CA failed.
    #[error("cannot read the CA of {url}: {why}")]
    Bootstrap {
        /// Server URL.
        url: String,
        /// Why.
        why: String,
    },
}

/// Who is at the other end of a connection, as its verified certificate proves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// No certificate (or a plaintext connection).
    Anonymous,
    /// The orchestrator.
    Orchestrator,
    /// A registered PNode, by id.
    PNode(String),
}

impl Peer {
    /// The peer a verified leaf certificate names; a certificate naming nothing we know is
    /// anonymous (it proves membership of nothing).
    pub fn from_leaf(der: &[u8]) -> Peer {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Peer::Anonymous };
        let Ok(Some(san)) = cert.subject_alternative_name() else { return Peer::Anonymous };
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                if *n == ORCHESTRATOR_NAME {
                    return Peer::Orchestrator;
                }
                if let Some(id) = n.strip_suffix(PNODE_SUFFIX) {
                    return Peer::PNode(id.to_string());
                }
            }
        }
        Peer::Anonymous
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Anonymous => f.write_str("an anonymous client"),
            Peer::Orchestrator => f.write_str("the orchestrator"),
            Peer::PNode(id) => write!(f, "pnode {id}"),
        }
    }
}

/// Whom a client means to reach: the server's certificate must name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expect {
    /// The orchestrator.
    Orchestrator,
    /// PNode `id`.
    PNode(String),
    /// Some registered PNode (where the caller knows only an endpoint).
    AnyPNode,
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Orchestrator => f.write_str("the orchestrator"),
            Expect::PNode(id) => write!(f, "pnode {id}"),
            Expect::AnyPNode => f.write_str("a pnode"),
        }
    }
}

/// Checks a server's chain against the CA, for the name of the member its leaf names, and that
/// this member is the one expected.
#[derive(Debug)]
struct MemberVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expect: Expect,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = Peer::from_leaf(end_entity);
        let name = match (&self.expect, &peer) {
            (Expect::Orchestrator, Peer::Orchestrator) => ORCHESTRATOR_NAME.to_string(),
            (Expect::PNode(want), Peer::PNode(id)) if want == id => pnode_name(id),
            (Expect::AnyPNode, Peer::PNode(id)) => pnode_name(id),
            _ => {
                return Err(rustls::Error::General(format!(
                    "the server's certificate names {peer}, but {} was expected",
                    self.expect
                )));
            }
        };
        let name = ServerName::try_from(name).map_err(|e| rustls::Error::General(e.to_string()))?;
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The provider every config uses, named so nothing depends on a process-wide default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and key that can be replaced while servers and clients use it.
#[derive(Debug, Default)]
pub struct CertSlot(RwLock<Option<Arc<CertifiedKey>>>);

impl CertSlot {
    /// An empty slot: until it is filled, servers refuse handshakes and clients go anonymous.
    pub fn new() -> Arc<CertSlot> {
        Arc::new(CertSlot::default())
    }

    /// Installs `chain` (leaf first) with its PKCS#8 private key.
    pub fn set(&self, chain: Vec<CertificateDer<'static>>, key_pkcs8: &[u8]) -> Result<(), TlsError> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
        let signer = provider().key_provider.load_private_key(key)?;
        let certified = Arc::new(CertifiedKey::new(chain, signer));
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(certified);
        Ok(())
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a certificate is installed.
    pub fn is_set(&self) -> bool {
        self.current().is_some()
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.is_set()
    }
}

/// The mesh's trust anchor and this process's own certificate: everything both ends of a link
/// need.
#[derive(Debug, Clone)]
pub struct MeshTls {
    roots: Arc<RootCertStore>,
    ca_der: CertificateDer<'static>,
    /// This process's certificate (empty for an anonymous client).
    pub identity: Arc<CertSlot>,
    /// One client config per party reached, built once.
    clients: Arc<std::sync::Mutex<std::collections::HashMap<Expect, Arc<ClientConfig>>>>,
}

/// Most client configs kept (one per PNode reached); beyond it the cache starts again.
const MAX_CLIENT_CONFIGS: usize = 4096;

impl MeshTls {
    /// Trusts the CA certificate `ca` (DER), with `identity` as this process's certificate.
    pub fn new(ca: CertificateDer<'static>, identity: Arc<CertSlot>) -> Result<MeshTls, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone()).map_err(|e| TlsError::Parse(format!("the CA certificate is not usable: {e}")))?;
        Ok(MeshTls { roots: Arc::new(roots), ca_der: ca, identity, clients: Arc::default() })
    }

    /// Trusts the CA in PEM file `path`; no certificate of its own.
    pub fn from_ca_file(path: &Path) -> Result<MeshTls, TlsError> {
        let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })?;
        let ca = CertificateDer::from_pem_slice(&pem)
            .map_err(|e| TlsError::Parse(format!("{} holds no PEM certificate: {e}", path.display())))?;
        MeshTls::new(ca, CertSlot::new())
    }

    /// The CA certificate (DER).
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// Hex SHA-256 of the CA certificate: what a PNode pins.
    pub fn ca_sha256(&self) -> String {
        fingerprint(&self.ca_der)
    }

    /// The client side: verifies that the server is `expect` with a certificate from the CA,
    /// presents our certificate if we have one.
    pub fn client_config(&self, expect: &Expect) -> Result<Arc<ClientConfig>, TlsError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(expect) {
            return Ok(c.clone());
        }
        if clients.len() >= MAX_CLIENT_CONFIGS {
            clients.clear();
        }
        let config = self.new_client_config(expect)?;
        clients.insert(expect.clone(), config.clone());
        Ok(config)
    }

    fn new_client_config(&self, expect: &Expect) -> Result<Arc<ClientConfig>, TlsError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Parse(format!("server verifier: {e}")))?;
        let verifier = Arc::new(MemberVerifier { inner, expect: expect.clone() });
        let mut c = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.identity.clone());
        // No session resumption: a resumed session keeps the identity of the one it resumes, and
        // a PNode's first connection (to register) is anonymous while later ones must not be.
        c.resumption = rustls::client::Resumption::disabled();
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(c))
    }

    /// The server side: our certificate from the slot; client certificates asked for, verified
    /// against the CA when given, optional (anonymous callers reach only open calls).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Parse(format!("client verifier: {e}")))?;
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.identity.clone());
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(c))
    }
}

/// Hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// PEM text of a DER certificate.
pub fn to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Reads the CA certificate a server presents, without trusting it: the first step of pinning
/// by fingerprint or trust on first use. Nothing is sent over the connection.
pub async fn fetch_server_ca(url: &str) -> Result<CertificateDer<'static>, TlsError> {
    let fail = |why: String| TlsError::Bootstrap { url: url.to_string(), why };
    let uri: tonic::transport::Uri = url.parse().map_err(|e| fail(format!("not a URL: {e}")))?;
    let host = uri.host().ok_or_else(|| fail("no host".into()))?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let recorder = Arc::new(ChainRecorder::default());
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let tcp = tokio::time::timeout(crate::limits::CONNECT_TIMEOUT, tokio::net::TcpStream::connect((host, port)))
        .await
        .map_err(|_| fail("connect timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let name = ServerName::try_from(ORCHESTRATOR_NAME).map_err(|e| fail(e.to_string()))?;
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
    tokio::time::timeout(crate::limits::CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| fail("TLS handshake timed out".into()))?
        .map_err(|e| fail(format!("TLS handshake: {e}")))?;
    let chain = recorder.0.read().unwrap_or_else(|p| p.into_inner()).clone();
    // The CA is the last certificate of the chain the server sends (leaf, CA).
    chain.into_iter().last().ok_or_else(|| fail("the server sent no CA certificate".into()))
}

/// Pins: checks that `ca` has fingerprint `pinned` (hex SHA-256, case and colons ignored).
pub fn check_pin(ca: &CertificateDer<'_>, pinned: &str) -> Result<(), TlsError> {
    let want: String = pinned.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    let found = fingerprint(ca);
    if found == want { Ok(()) } else { Err(TlsError::PinMismatch { pinned: want, found }) }
}

/// Accepts any server chain and keeps it: used only by [`fetch_server_ca`], whose connection
/// carries nothing. The handshake signature is still checked against the presented leaf.
#[derive(Debug, Default)]
struct ChainRecorder(RwLock<Vec<CertificateDer<'static>>>);

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// How a process reaches the mesh's servers: TLS with the mesh's CA, or plaintext (local
/// development only, `--insecure-plaintext`).
#[derive(Debug, Clone)]
pub enum ClientSecurity {
    /// TLS, verifying servers against the CA.
    Tls(MeshTls),
    /// No TLS at all.
    Plaintext,
}

static CLIENT: RwLock<Option<ClientSecurity>> = RwLock::new(None);

/// Sets how this process's client connections are secured; connections opened later use it.
pub fn set_client_security(s: ClientSecurity) {
    *CLIENT.write().unwrap_or_else(|p| p.into_inner()) = Some(s);
}

/// How this process's client connections are secured (None: not configured yet).
pub fn client_security() -> Option<ClientSecurity> {
    CLIENT.read().unwrap_or_else(|p| p.into_inner()).clone()
}

pub(crate) fn client_tls_for(
    security: Option<&ClientSecurity>,
    expect: &Expect,
) -> Result<Option<(Arc<ClientConfig>, ServerName<'static>)>, TlsError> {
    match security {
        // The name sent in the handshake is only a label: the verifier checks what the
        // certificate names against `expect`.
        Some(ClientSecurity::Tls(t)) => Ok(Some((t.client_config(expect)?, ServerName::try_from(ORCHESTRATOR_NAME).map_err(|e| TlsError::Parse(e.to_string()))?))),
        Some(ClientSecurity::Plaintext) => Ok(None),
        None => Err(TlsError::Parse(
            "this process has no TLS settings: pass the orchestrator's CA (--ca), or --insecure-plaintext for local development"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_ignore_case_and_colons() {
        let der = CertificateDer::from(vec![1u8, 2, 3]);
        let f = fingerprint(&der);
        assert!(check_pin(&der, &f.to_uppercase()).is_ok());
        let colons: Vec<String> = f.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        assert!(check_pin(&der, &colons.join(":")).is_ok());
        assert!(matches!(check_pin(&der, &"0".repeat(64)), Err(TlsError::PinMismatch { .. })));
    }

    #[test]
    fn junk_certificates_name_nobody() {
        assert_eq!(Peer::from_leaf(b"not a certificate"), Peer::Anonymous);
        assert_eq!(Peer::from_leaf(&[]), Peer::Anonymous);
    }
}
