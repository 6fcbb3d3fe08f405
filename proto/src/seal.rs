//! Seals: a sender's signature on the hash of a tensor it sent to a VNode.
//!
//! Redundant execution finds the first VNode whose output departs from the quorum's; without
//! more, the PNode that ran it is blamed, even when what it consumed was garbage from a sender
//! that reported an honest hash. With seals, each training activation and gradient between
//! PNodes carries the sender's signature over [`payload`]: the job, generation, receiving VNode,
//! micro-batch, [`Route`] and the tensor's hash. The receiver checks it on arrival (refusing the
//! message otherwise) and reports it with the step, so the orchestrator can show that the
//! sender signed a tensor other than the one the quorum's sender sent. A receiver cannot forge
//! such a proof, and the context in the payload keeps a genuine seal from being replayed into
//! another step, VNode, generation or job.

use crate::v1;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

/// Domain tag of tensor hashes.
const TENSOR_TAG: &[u8] = b"dcnr-tensor-v1\0";

/// Domain tag of seal payloads; changing it invalidates every seal.
const SEAL_TAG: &[u8] = b"dcnr-seal-v1\0";

/// Which way a sealed tensor travelled into its VNode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    /// An activation into input `port`.
    Forward {
        /// The input port.
        port: u32,
    },
    /// A gradient from consumer (`from_vnode`, `from_port`).
    Backward {
        /// The consumer.
        from_vnode: u32,
        /// The consumer's input port the gradient belongs to.
        from_port: u32,
    },
}

impl Route {
    /// (kind, a, b): 0 and the port for a forward, 1 and the consumer for a backward; the form
    /// in which seals and execution fingerprints hash a route.
    pub fn parts(self) -> (u8, u32, u32) {
        match self {
            Route::Forward { port } => (0, port, 0),
            Route::Backward { from_vnode, from_port } => (1, from_vnode, from_port),
        }
    }

    /// The route a reported input names.
    pub fn of_input(i: &v1::StepInput) -> Route {
        if i.backward {
            Route::Backward { from_vnode: i.from_vnode, from_port: i.from_port }
        } else {
            Route::Forward { port: i.port }
        }
    }

    /// A report of the tensor that came this way, with its seal (or its hash alone).
    pub fn input(self, seal: v1::Seal) -> v1::StepInput {
        let seal = Some(seal);
        match self {
            Route::Forward { port } => v1::StepInput { port, seal, ..Default::default() },
            Route::Backward { from_vnode, from_port } => {
                v1::StepInput { backward: true, from_vnode, from_port, seal, ..Default::default() }
            }
        }
    }
}

/// Where a sealed tensor went: everything the signature binds besides the hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context<'a> {
    /// The job (a replica's own id for a replica).
    pub job: &'a str,
    /// Placement generation of sender and receiver.
    pub generation: u32,
    /// The receiving VNode.
    pub to_vnode: u32,
    /// The micro-batch (the training step).
    pub micro_batch: u64,
    /// How the tensor entered the VNode.
    pub route: Route,
}

/// Why a seal is not acceptable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The message carries none.
    #[error("the tensor carries no seal")]
    Missing,
    /// A field of the wrong length.
    #[error("the seal's {0} has the wrong length")]
    Length(&'static str),
    /// The hash does not describe the tensor.
    #[error("the seal's hash does not match the tensor sent")]
    Hash,
    /// 32 bytes that are not a curve point.
    #[error("the seal's public key is not a valid ed25519 key")]
    Key,
    /// The signature does not verify.
    #[error("the seal's signature does not verify")]
    Signature,
}

/// SHA-256 of a wire tensor: dtype, shape and bytes, so equal hashes mean equal tensors.
pub fn tensor_sha256(t: &v1::Tensor) -> [u8; 32] {
    hash_parts(t.dtype, &t.shape, &t.data)
}

/// [`tensor_sha256`] of the tensor these fields would encode, for a caller that holds them
/// without a wire tensor (and need not build one just to hash it).
pub fn hash_parts(dtype: i32, shape: &[u64], data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TENSOR_TAG);
    h.update(dtype.to_le_bytes());
    h.update((shape.len() as u64).to_le_bytes());
    for d in shape {
        h.update(d.to_le_bytes());
    }
    h.update(data);
    h.finalize().into()
}

/// The bytes a seal signs.
pub fn payload(ctx: &Context<'_>, tensor_sha256: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEAL_TAG.len() + ctx.job.len() + 64);
    out.extend_from_slice(SEAL_TAG);
    out.extend_from_slice(&(ctx.job.len() as u32).to_le_bytes());
    out.extend_from_slice(ctx.job.as_bytes());
    out.extend_from_slice(&ctx.generation.to_le_bytes());
    out.extend_from_slice(&ctx.to_vnode.to_le_bytes());
    out.extend_from_slice(&ctx.micro_batch.to_le_bytes());
    let (kind, a, b) = ctx.route.parts();
    out.push(kind);
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    out.extend_from_slice(tensor_sha256);
    out
}

/// `key`'s seal on a tensor with hash `tensor_sha256` sent as `ctx` says.
pub fn sign(key: &SigningKey, ctx: &Context<'_>, tensor_sha256: [u8; 32]) -> v1::Seal {
    v1::Seal {
        tensor_sha256: tensor_sha256.to_vec(),
        public_key: key.verifying_key().to_bytes().to_vec(),
        signature: key.sign(&payload(ctx, &tensor_sha256)).to_bytes().to_vec(),
    }
}

/// Checks that `seal` is a valid signature, for `ctx`, on its own hash; answers the signer's
/// public key and the hash.
pub fn verify(seal: &v1::Seal, ctx: &Context<'_>) -> Result<([u8; 32], [u8; 32]), SealError> {
    let hash: [u8; 32] = seal.tensor_sha256.as_slice().try_into().map_err(|_| SealError::Length("hash"))?;
    let key: [u8; 32] = seal.public_key.as_slice().try_into().map_err(|_| SealError::Length("public key"))?;
    let sig: [u8; 64] = seal.signature.as_slice().try_into().map_err(|_| SealError::Length("signature"))?;
    let vk = VerifyingKey::from_bytes(&key).map_err(|_| SealError::Key)?;
    vk.verify(&payload(ctx, &hash), &Signature::from_bytes(&sig)).map_err(|_| SealError::Signature)?;
    Ok((key, hash))
}

/// Checks the seal of a message as it arrived: valid for `ctx`, and a true hash of `tensor`.
/// Answers the signer's public key and the hash.
pub fn check_sent(
    seal: Option<&v1::Seal>,
    tensor: &v1::Tensor,
    ctx: &Context<'_>,
) -> Result<([u8; 32], [u8; 32]), SealError> {
    let seal = seal.ok_or(SealError::Missing)?;
    let (key, hash) = verify(seal, ctx)?;
    if hash != tensor_sha256(tensor) {
        return Err(SealError::Hash);
    }
    Ok((key, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(mb: u64) -> Context<'static> {
        Context { job: "job-1", generation: 2, to_vnode: 3, micro_batch: mb, route: Route::Forward { port: 0 } }
    }

    fn tensor(x: f32) -> v1::Tensor {
        crate::tensor::encode_f32(&[1, 2], &[x, 1.0])
    }

    #[test]
    fn a_seal_proves_the_tensor_and_its_context_only() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let t = tensor(0.5);
        let seal = sign(&key, &ctx(7), tensor_sha256(&t));
        let (pk, hash) = check_sent(Some(&seal), &t, &ctx(7)).unwrap();
        assert_eq!(pk, key.verifying_key().to_bytes());
        assert_eq!(hash, tensor_sha256(&t));
        // Another tensor, step, route, generation or job: refused.
        assert_eq!(check_sent(Some(&seal), &tensor(0.6), &ctx(7)), Err(SealError::Hash));
        assert_eq!(check_sent(Some(&seal), &t, &ctx(8)), Err(SealError::Signature));
        let gradient = Context { route: Route::Backward { from_vnode: 0, from_port: 0 }, ..ctx(7) };
        assert_eq!(check_sent(Some(&seal), &t, &gradient), Err(SealError::Signature));
        assert_eq!(check_sent(Some(&seal), &t, &Context { generation: 3, ..ctx(7) }), Err(SealError::Signature));
        assert_eq!(check_sent(Some(&seal), &t, &Context { job: "job-2", ..ctx(7) }), Err(SealError::Signature));
        assert_eq!(check_sent(None, &t, &ctx(7)), Err(SealError::Missing));
        // A receiver that swaps in its own hash cannot re-sign as the sender.
        let forged = v1::Seal { tensor_sha256: tensor_sha256(&tensor(0.6)).to_vec(), ..seal.clone() };
        assert_eq!(verify(&forged, &ctx(7)), Err(SealError::Signature));
        let short = v1::Seal { signature: vec![0; 10], ..seal };
        assert_eq!(verify(&short, &ctx(7)), Err(SealError::Length("signature")));
    }

    #[test]
    fn the_tensor_hash_covers_dtype_and_shape() {
        let a = crate::tensor::encode_f32(&[2, 1], &[0.5, 1.0]);
        let b = crate::tensor::encode_f32(&[1, 2], &[0.5, 1.0]);
        let c = v1::Tensor { dtype: v1::Dtype::I32 as i32, ..a.clone() };
        assert_ne!(tensor_sha256(&a), tensor_sha256(&b));
        assert_ne!(tensor_sha256(&a), tensor_sha256(&c));
        assert_eq!(tensor_sha256(&a), tensor_sha256(&a.clone()));
    }
}
