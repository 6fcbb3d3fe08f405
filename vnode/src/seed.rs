//! Seed derivation: every random stream of a job is a ChaCha20 stream keyed by
//! SHA-256("dcnr-seed-v1" || root_seed || purpose || id), so streams are independent of each
//! other, of placement and of time. No OS entropy is ever used.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

/// Random-stream purposes; their names are part of the derivation and must never change.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// Initial parameters of a VNode (id = VNode id).
    Init,
    /// Order of training samples in an epoch (id = epoch).
    Shuffle,
    /// Initial parameters of a VNode's auxiliary head in local mode (id = VNode id).
    AuxInit,
    /// A dropout node's mask for one training step (ids = node id in pipeline 0, pipeline,
    /// step).
    Dropout,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Init => b"init",
            Purpose::Shuffle => b"shuffle",
            Purpose::AuxInit => b"aux-init",
            Purpose::Dropout => b"dropout",
        }
    }
}

/// The 32-byte key of one stream.
pub fn derive(root: u64, purpose: Purpose, id: u64) -> [u8; 32] {
    derive_path(root, purpose, &[id])
}

/// The key of a stream named by several ids; with one id it is [`derive`]'s.
pub fn derive_path(root: u64, purpose: Purpose, ids: &[u64]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"dcnr-seed-v1");
    h.update(root.to_le_bytes());
    h.update((purpose.tag().len() as u32).to_le_bytes());
    h.update(purpose.tag());
    for id in ids {
        h.update(id.to_le_bytes());
    }
    h.finalize().into()
}

/// The ChaCha20 stream for (root, purpose, id).
pub fn stream(root: u64, purpose: Purpose, id: u64) -> ChaCha20Rng {
    ChaCha20Rng::from_seed(derive(root, purpose, id))
}

/// The ChaCha20 stream for (root, purpose, ids).
pub fn stream_path(root: u64, purpose: Purpose, ids: &[u64]) -> ChaCha20Rng {
    ChaCha20Rng::from_seed(derive_path(root, purpose, ids))
}

/// A uniform f32 in [-bound, bound) from 24 random bits; spelled out here rather than taken
/// from a distribution crate so the bits of initial parameters never change with a dependency.
pub fn uniform(rng: &mut ChaCha20Rng, bound: f32) -> f32 {
    use rand::Rng;
    let unit = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
    (unit * 2.0 - 1.0) * bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_stable_and_distinct() {
        assert_eq!(derive(1, Purpose::Init, 0), derive(1, Purpose::Init, 0));
        assert_ne!(derive(1, Purpose::Init, 0), derive(1, Purpose::Init, 1));
        assert_ne!(derive(1, Purpose::Init, 0), derive(2, Purpose::Init, 0));
        assert_ne!(derive(1, Purpose::Init, 0), derive(1, Purpose::Shuffle, 0));
        assert_eq!(derive(1, Purpose::Init, 5), derive_path(1, Purpose::Init, &[5]));
        assert_ne!(derive_path(1, Purpose::Dropout, &[0, 0, 1]), derive_path(1, Purpose::Dropout, &[0, 1, 0]));
        let mut a = stream(7, Purpose::Init, 3);
        let x = uniform(&mut a, 0.5);
        assert!((-0.5..0.5).contains(&x));
        let mut b = stream(7, Purpose::Init, 3);
        assert_eq!(x.to_bits(), uniform(&mut b, 0.5).to_bits());
    }
}
