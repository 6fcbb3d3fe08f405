//! The mesh's certificate authority and the orchestrator's own secrets (docs/SECURITY.md).
//!
//! Kept in the TLS directory (`serve --tls-dir`, default `dcnr-tls`): the CA's key
//! (`ca.key.pem`, mode 0600) and certificate (`ca.pem`, which clients and PNodes trust or pin),
//! and the local maintainer token (`maintainer.token`, 0600). Each file is created once,
//! atomically (written aside, then linked into place, which fails if another process got there
//! first), so orchestrators sharing the directory share one CA. At `Register` the CA issues a
//! PNode a short-lived certificate for the ed25519 key it proved to hold, naming its id; the
//! orchestrator gives itself a certificate naming [`ORCHESTRATOR_NAME`] at every start.

use anyhow::{Context as _, bail};
use dcnr_proto::tls::{CertSlot, MeshTls, ORCHESTRATOR_NAME, pnode_name};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Lifetime of a PNode certificate unless `serve --cert-lifetime-s` says otherwise.
pub const DEFAULT_PNODE_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of the CA certificate.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the orchestrator's own certificate (a new one at every start).
const OWN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Clock skew a certificate tolerates: it is valid from this long before it was issued.
const SKEW: Duration = Duration::from_secs(300);

/// The certificate authority of one mesh.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    ca: CertificateDer<'static>,
    tls: MeshTls,
    dir: PathBuf,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa").field("dir", &self.dir).field("ca_sha256", &self.tls.ca_sha256()).finish()
    }
}

/// A certificate issued to a PNode.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Chain, DER: the PNode's certificate, then the CA's.
    pub chain: Vec<Vec<u8>>,
    /// When it stops being valid.
    pub not_after: SystemTime,
}

/// An ed25519 public key as rcgen takes it: the raw 32 bytes.
struct Ed25519Public([u8; 32]);

impl PublicKeyData for Ed25519Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "DCNR mesh CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn member_params(name: &str, lifetime: Duration, now: SystemTime) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(vec![name.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One certificate serves both ends: members are servers to some and clients of others.
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = (now - SKEW).into();
    p.not_after = (now + lifetime).into();
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(|e| anyhow::anyhow!("no OS randomness for a serial number: {e}"))?;
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    Ok(p)
}

/// Writes `bytes` to `path` unless it exists (private: mode 0600); returns what is at `path`
/// afterwards, which is another process's file if it won the race.
fn create_once(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<Vec<u8>> {
    if let Ok(existing) = std::fs::read(path) {
        return Ok(existing);
    }
    let dir = path.parent().context("a file path without a directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    if !private {
        use std::os::unix::fs::PermissionsExt as _;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    // A hard link fails if the name exists: exactly one creator wins.
    match std::fs::hard_link(tmp.path(), path) {
        Ok(()) => Ok(bytes.to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(std::fs::read(path)?),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

impl MeshCa {
    /// Loads the CA from `dir`, creating the directory, key and certificate the first time.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<MeshCa> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the TLS directory {}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let fresh = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let key_pem = create_once(&dir.join("ca.key.pem"), fresh.serialize_pem().as_bytes(), true)?;
        let key = KeyPair::from_pem(std::str::from_utf8(&key_pem).context("ca.key.pem is not text")?)
            .context("ca.key.pem holds no usable key")?;
        let now = SystemTime::now();
        let mut params = ca_params();
        params.not_before = (now - SKEW).into();
        params.not_after = (now + CA_LIFETIME).into();
        let fresh_cert = params.self_signed(&key)?;
        let cert_pem = create_once(&dir.join("ca.pem"), fresh_cert.pem().as_bytes(), false)?;
        let ca = rustls_pki_types::pem::PemObject::from_pem_slice(&cert_pem).context("ca.pem holds no certificate")?;
        let ca: CertificateDer<'static> = ca;
        let spki = key.subject_public_key_info();
        // The SubjectPublicKeyInfo appears verbatim inside the certificate that carries it: a
        // directory whose two files were replaced separately would issue certificates no one trusts.
        if !ca.as_ref().windows(spki.len()).any(|w| w == spki.as_slice()) {
            bail!(
                "{} and {} do not belong together; move the directory aside to start a new CA",
                dir.join("ca.pem").display(),
                dir.join("ca.key.pem").display()
            );
        }
        let issuer = Issuer::new(ca_params(), key);
        let own = CertSlot::new();
        let tls = MeshTls::new(ca.clone(), own.clone())?;
        let out = MeshCa { issuer, ca, tls, dir: dir.to_path_buf() };
        let own_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let own_cert = member_params(ORCHESTRATOR_NAME, OWN_LIFETIME, now)?.signed_by(&own_key, &out.issuer)?;
        own.set(vec![own_cert.der().clone(), out.ca.clone()], &own_key.serialize_der())?;
        Ok(out)
    }

    /// TLS settings of the orchestrator: the CA, and its own certificate.
    pub fn tls(&self) -> &MeshTls {
        &self.tls
    }

    /// Where the CA certificate is kept.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues PNode `pnode_id` a certificate for its ed25519 key, valid for `lifetime`.
    pub fn issue_pnode(&self, pnode_id: &str, public_key: &[u8; 32], lifetime: Duration) -> anyhow::Result<Issued> {
        let now = SystemTime::now();
        let params = member_params(&pnode_name(pnode_id), lifetime, now)?;
        let cert = params.signed_by(&Ed25519Public(*public_key), &self.issuer)?;
        Ok(Issued { chain: vec![cert.der().to_vec(), self.ca.to_vec()], not_after: now + lifetime })
    }

    /// Reads the local maintainer token, creating a random one the first time.
    pub fn local_maintainer_token(&self) -> anyhow::Result<String> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no OS randomness for a token: {e}"))?;
        let fresh = format!("{}\n", hex::encode(raw));
        let text = create_once(&self.dir.join("maintainer.token"), fresh.as_bytes(), true)?;
        let token = String::from_utf8(text).context("maintainer.token is not text")?.trim().to_string();
        if token.is_empty() {
            bail!("{} is empty", self.dir.join("maintainer.token").display());
        }
        Ok(token)
    }
}

/// The CA certificate in `dir`, for clients on the orchestrator's machine.
pub fn local_ca_file(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// The maintainer token in `dir`, for clients on the orchestrator's machine.
pub fn local_token_file(dir: &Path) -> PathBuf {
    dir.join("maintainer.token")
}

/// The orchestrator's TLS settings, shared by its server and its calls to PNodes.
pub type SharedCa = Arc<MeshCa>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_is_created_once_and_issues_certificates_naming_the_pnode() {
        let dir = tempfile::tempdir().unwrap();
        let a = MeshCa::load_or_create(dir.path()).unwrap();
        let b = MeshCa::load_or_create(dir.path()).unwrap();
        assert_eq!(a.tls().ca_sha256(), b.tls().ca_sha256(), "a second start keeps the CA");
        assert_eq!(a.local_maintainer_token().unwrap(), b.local_maintainer_token().unwrap());
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let pk = key.verifying_key().to_bytes();
        let id = dcnr_proto::identity::pnode_id(&pk);
        let issued = a.issue_pnode(&id, &pk, Duration::from_secs(60)).unwrap();
        assert_eq!(dcnr_proto::tls::Peer::from_leaf(&issued.chain[0]), dcnr_proto::tls::Peer::PNode(id));
        assert_eq!(issued.chain[1], a.ca.to_vec());
    }

    #[test]
    fn a_key_and_certificate_from_different_cas_are_refused() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        MeshCa::load_or_create(d1.path()).unwrap();
        MeshCa::load_or_create(d2.path()).unwrap();
        std::fs::copy(d2.path().join("ca.pem"), d1.path().join("ca.pem")).unwrap();
        assert!(MeshCa::load_or_create(d1.path()).is_err());
    }
}
