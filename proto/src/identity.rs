//! PNode identity on the wire: ids derived from ed25519 public keys, and the signed
//! registration that proves a PNode holds the key it claims.
//!
//! Scheme (docs/TRUST.md): the PNode asks `Challenge` for a fresh random nonce, then sends
//! `Register` with its public key, the nonce and an ed25519 signature over
//! [`registration_payload`], a length-prefixed encoding of every field that matters (nonce,
//! key, protocol version, name, endpoint, capabilities, a hash of the trusted token). The
//! orchestrator accepts a nonce once and only while it is fresh, so a captured registration
//! cannot be replayed, and a signature binds the endpoint, so nobody can redirect another
//! identity's traffic. Both sides build the payload with this one function.

use crate::v1;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Domain tag of the registration payload; changing it invalidates every signature.
const REGISTER_TAG: &[u8] = b"dcnr-register-v1\0";

/// Domain tag of PNode ids.
const ID_TAG: &[u8] = b"dcnr-pnode-id-v1\0";

/// Bytes of a registration nonce.
pub const NONCE_BYTES: usize = 32;

/// Why a registration's proof of identity is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// No key, or a key of the wrong length (an older PNode build sends none).
    #[error("registration carries no valid ed25519 public key ({0} bytes; 32 needed): upgrade the pnode")]
    KeyLength(usize),
    /// 32 bytes that are not a curve point.
    #[error("the public key is not a valid ed25519 key")]
    BadKey,
    /// Signature of the wrong length.
    #[error("registration signature has {0} bytes; 64 needed")]
    SignatureLength(usize),
    /// The signature does not verify.
    #[error("registration signature does not verify for public key {0}")]
    BadSignature(String),
}

/// The PNode id of a public key: `pn-` and the first 16 hex digits of its domain-tagged SHA-256.
pub fn pnode_id(public_key: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(ID_TAG);
    h.update(public_key);
    format!("pn-{}", &hex::encode(h.finalize())[..16])
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The bytes a PNode signs to register: every field of `req` except the signature itself.
pub fn registration_payload(req: &v1::RegisterRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(REGISTER_TAG);
    put(&mut out, &req.nonce);
    put(&mut out, &req.public_key);
    out.extend_from_slice(&req.protocol_version.to_le_bytes());
    put(&mut out, req.name.as_bytes());
    put(&mut out, req.endpoint.as_bytes());
    let c = req.capabilities.clone().unwrap_or_default();
    out.extend_from_slice(&c.cores.to_le_bytes());
    out.extend_from_slice(&c.memory_bytes.to_le_bytes());
    for s in [&c.arch, &c.os, &c.gpu, &c.determinism_class] {
        put(&mut out, s.as_bytes());
    }
    // The token is a secret: only its hash enters the payload, which is never sent.
    put(&mut out, &Sha256::digest(req.trusted_token.as_bytes()));
    out.push(u8::from(req.behind_nat));
    put(&mut out, req.relay_offer.as_bytes());
    out.extend_from_slice(&c.gpu_gflops.to_le_bytes());
    put(&mut out, c.gpu_determinism_class.as_bytes());
    out
}

/// Fills in `public_key` and `signature` of a request whose other fields (nonce included) are set.
pub fn sign_registration(key: &SigningKey, req: &mut v1::RegisterRequest) {
    req.public_key = key.verifying_key().to_bytes().to_vec();
    req.signature = key.sign(&registration_payload(req)).to_bytes().to_vec();
}

/// Checks the signature of a registration; returns the key it proves possession of. Whether the
/// nonce is fresh is the caller's business.
pub fn verify_registration(req: &v1::RegisterRequest) -> Result<[u8; 32], IdentityError> {
    let key: [u8; 32] =
        req.public_key.as_slice().try_into().map_err(|_| IdentityError::KeyLength(req.public_key.len()))?;
    let verifying = VerifyingKey::from_bytes(&key).map_err(|_| IdentityError::BadKey)?;
    let sig: [u8; 64] =
        req.signature.as_slice().try_into().map_err(|_| IdentityError::SignatureLength(req.signature.len()))?;
    // verify_strict also refuses weak keys and malleable signatures.
    verifying
        .verify_strict(&registration_payload(req), &Signature::from_bytes(&sig))
        .map_err(|_| IdentityError::BadSignature(hex::encode(key)))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &SigningKey) -> v1::RegisterRequest {
        let mut req = v1::RegisterRequest {
            protocol_version: 1,
            name: "a".into(),
            endpoint: "http://127.0.0.1:1".into(),
            capabilities: Some(v1::Capabilities { cores: 2, ..Default::default() }),
            nonce: vec![7; NONCE_BYTES],
            ..Default::default()
        };
        sign_registration(key, &mut req);
        req
    }

    #[test]
    fn a_signed_registration_verifies_and_any_changed_field_breaks_it() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let req = request(&key);
        assert_eq!(verify_registration(&req).unwrap(), key.verifying_key().to_bytes());
        let tampered: [fn(&mut v1::RegisterRequest); 6] = [
            |r| r.endpoint = "http://127.0.0.1:2".into(),
            |r| r.nonce[0] ^= 1,
            |r| r.name.push('x'),
            |r| r.trusted_token = "t".into(),
            |r| r.capabilities.as_mut().unwrap().cores = 3,
            |r| r.protocol_version = 2,
        ];
        for t in tampered {
            let mut r = req.clone();
            t(&mut r);
            assert!(matches!(verify_registration(&r), Err(IdentityError::BadSignature(_))));
        }
        let mut other = req.clone();
        other.public_key = SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes().to_vec();
        assert!(matches!(verify_registration(&other), Err(IdentityError::BadSignature(_))));
        let mut short = req.clone();
        short.public_key.clear();
        assert_eq!(verify_registration(&short), Err(IdentityError::KeyLength(0)));
        let mut short = req;
        short.signature.truncate(10);
        assert_eq!(verify_registration(&short), Err(IdentityError::SignatureLength(10)));
    }

    #[test]
    fn ids_derive_from_keys_only() {
        let a = SigningKey::from_bytes(&[1; 32]).verifying_key().to_bytes();
        let b = SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes();
        assert_eq!(pnode_id(&a), pnode_id(&a));
        assert_ne!(pnode_id(&a), pnode_id(&b));
        assert_eq!(pnode_id(&a).len(), 19);
    }
}
