//! Admission of PNodes: the registration challenges (single-use nonces with a lifetime) and the
//! trusted-mode token. Plain Rust: the caller supplies the clock and the random bytes.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq as _;

/// How long a challenge nonce may be redeemed.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(30);

/// Most outstanding challenges; beyond it new ones are refused until old ones expire, so a
/// flood of `Challenge` calls cannot grow memory without bound.
pub const MAX_PENDING: usize = 4096;

/// Most outstanding challenges for one source address, so one client cannot take them all.
pub const MAX_PENDING_PER_SOURCE: usize = 32;

/// Why a challenge could not be issued or redeemed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionError {
    /// Too many challenges outstanding.
    #[error("too many registrations in progress; retry shortly")]
    Busy,
    /// The public key is not 32 bytes.
    #[error("the public key has {0} bytes; 32 needed")]
    KeyLength(usize),
    /// Too many challenges outstanding for this source address.
    #[error("too many registrations in progress from this address; retry shortly")]
    SourceBusy,
    /// Never issued, already used, or expired.
    #[error("the registration nonce is unknown, used or expired; ask for a new challenge")]
    UnknownNonce,
    /// Issued to another key.
    #[error("the registration nonce was issued to another public key")]
    WrongKey,
}

/// Outstanding registration challenges.
#[derive(Debug)]
pub struct Challenges {
    ttl: Duration,
    max: usize,
    per_source: usize,
    /// Nonce → (public key, expiry, source address).
    pending: HashMap<[u8; 32], ([u8; 32], Instant, Option<std::net::IpAddr>)>,
}

impl Default for Challenges {
    fn default() -> Self {
        Challenges::new(CHALLENGE_TTL, MAX_PENDING)
    }
}

impl Challenges {
    /// An empty set with the given lifetime and bound.
    pub fn new(ttl: Duration, max: usize) -> Challenges {
        Challenges { ttl, max, per_source: MAX_PENDING_PER_SOURCE.min(max), pending: HashMap::new() }
    }

    /// Records `nonce` (fresh random bytes from the caller) as issued to `public_key`, asked
    /// from address `source`, at `now`.
    pub fn issue(
        &mut self,
        public_key: &[u8],
        nonce: [u8; 32],
        source: Option<std::net::IpAddr>,
        now: Instant,
    ) -> Result<[u8; 32], AdmissionError> {
        let key: [u8; 32] = public_key.try_into().map_err(|_| AdmissionError::KeyLength(public_key.len()))?;
        self.pending.retain(|_, (_, expires, _)| *expires > now);
        if source.is_some() && self.pending.values().filter(|p| p.2 == source).count() >= self.per_source {
            return Err(AdmissionError::SourceBusy);
        }
        if self.pending.len() >= self.max {
            return Err(AdmissionError::Busy);
        }
        self.pending.insert(nonce, (key, now + self.ttl, source));
        Ok(nonce)
    }

    /// Consumes `nonce` for `public_key`: each nonce admits at most one registration.
    pub fn redeem(&mut self, nonce: &[u8], public_key: &[u8; 32], now: Instant) -> Result<(), AdmissionError> {
        let nonce: [u8; 32] = nonce.try_into().map_err(|_| AdmissionError::UnknownNonce)?;
        let (key, expires, _) = self.pending.remove(&nonce).ok_or(AdmissionError::UnknownNonce)?;
        if expires <= now {
            return Err(AdmissionError::UnknownNonce);
        }
        if key != *public_key {
            return Err(AdmissionError::WrongKey);
        }
        Ok(())
    }
}

/// What a presented token amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCheck {
    /// No token presented: an untrusted PNode.
    Absent,
    /// The token matches: a trusted PNode.
    Matches,
    /// A token that does not match: refused, since an operator who set one expects trust.
    Mismatch,
    /// A token presented to an orchestrator without one: admitted untrusted.
    NotConfigured,
}

/// The orchestrator's trusted-mode token, kept as its SHA-256 only.
#[derive(Clone, Default)]
pub struct TrustedToken(Option<[u8; 32]>);

impl std::fmt::Debug for TrustedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustedToken({})", if self.0.is_some() { "set" } else { "none" })
    }
}

/// What the `Orchestrator` service needs to admit PNodes: challenges and the token.
#[derive(Debug, Default)]
pub struct Admission {
    /// Outstanding challenges.
    pub challenges: std::sync::Mutex<Challenges>,
    /// The trusted-mode token.
    pub token: TrustedToken,
}

impl TrustedToken {
    /// A token from its text (surrounding whitespace removed); `None` for an empty one.
    pub fn new(text: &str) -> Option<TrustedToken> {
        let t = text.trim();
        (!t.is_empty()).then(|| TrustedToken(Some(Sha256::digest(t.as_bytes()).into())))
    }

    /// A token known only by its SHA-256 (64 hex digits).
    pub fn from_sha256_hex(hex_digest: &str) -> Option<TrustedToken> {
        let bytes = hex::decode(hex_digest.trim()).ok()?;
        Some(TrustedToken(Some(bytes.try_into().ok()?)))
    }

    /// Reads the token file; an empty or unreadable file is an error, never "no token".
    pub fn from_file(path: &Path) -> Result<TrustedToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the trusted token file {}: {e}", path.display()))?;
        TrustedToken::new(&text).ok_or_else(|| format!("the trusted token file {} is empty", path.display()))
    }

    /// Compares a presented token in constant time (over digests, so length leaks nothing).
    pub fn check(&self, presented: &str) -> TokenCheck {
        match (&self.0, presented.is_empty()) {
            (_, true) => TokenCheck::Absent,
            (None, false) => TokenCheck::NotConfigured,
            (Some(want), false) => {
                let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
                if bool::from(want.ct_eq(&got)) { TokenCheck::Matches } else { TokenCheck::Mismatch }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_single_use_bound_to_its_key_and_expires() {
        let t0 = Instant::now();
        let mut c = Challenges::new(Duration::from_secs(5), 2);
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let n = c.issue(&k1, [9; 32], None, t0).unwrap();
        assert_eq!(c.redeem(&n, &k2, t0), Err(AdmissionError::WrongKey));
        let n = c.issue(&k1, [9; 32], None, t0).unwrap();
        assert_eq!(c.redeem(&n, &k1, t0), Ok(()));
        assert_eq!(c.redeem(&n, &k1, t0), Err(AdmissionError::UnknownNonce), "no replay");
        let n = c.issue(&k1, [8; 32], None, t0).unwrap();
        assert_eq!(c.redeem(&n, &k1, t0 + Duration::from_secs(6)), Err(AdmissionError::UnknownNonce));
        assert_eq!(c.issue(&[0; 3], [1; 32], None, t0), Err(AdmissionError::KeyLength(3)));
        c.issue(&k1, [1; 32], None, t0).unwrap();
        c.issue(&k1, [2; 32], None, t0).unwrap();
        assert_eq!(c.issue(&k1, [3; 32], None, t0), Err(AdmissionError::Busy));
        assert!(c.issue(&k1, [3; 32], None, t0 + Duration::from_secs(6)).is_ok(), "expired ones make room");
    }

    #[test]
    fn one_source_cannot_take_every_challenge() {
        let t0 = Instant::now();
        let mut c = Challenges::new(Duration::from_secs(5), 100);
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for i in 0..MAX_PENDING_PER_SOURCE {
            c.issue(&[1; 32], [i as u8; 32], Some(a), t0).unwrap();
        }
        assert_eq!(c.issue(&[1; 32], [200; 32], Some(a), t0), Err(AdmissionError::SourceBusy));
        assert!(c.issue(&[1; 32], [201; 32], Some(b), t0).is_ok(), "another source still registers");
        assert!(c.issue(&[1; 32], [202; 32], Some(a), t0 + Duration::from_secs(6)).is_ok(), "expired ones make room");
    }

    #[test]
    fn tokens_compare_exactly() {
        let t = TrustedToken::new(" s3cret\n").unwrap();
        assert_eq!(t.check("s3cret"), TokenCheck::Matches);
        assert_eq!(t.check("s3cre"), TokenCheck::Mismatch);
        assert_eq!(t.check(""), TokenCheck::Absent);
        assert_eq!(TrustedToken::default().check("x"), TokenCheck::NotConfigured);
        assert!(TrustedToken::new("  \n").is_none());
    }
}
