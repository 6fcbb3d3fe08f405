//! Conversions between wire messages and VNode messages, in one place for PNodes and the
//! orchestrator's data feeder alike.

use dcnr_proto::tensor::{self, TensorError};
use dcnr_proto::v1::{self, v_node_message::Body};
use dcnr_vnode::{HostData, HostTensor, Inbound, Phase};

/// Why a wire message could not become a VNode message.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The tensor is garbled.
    #[error("job {job} vnode {vnode} micro-batch {mb}: {source}")]
    Tensor { job: String, vnode: u32, mb: u64, source: TensorError },
    /// No body or an unspecified phase.
    #[error("job {job} vnode {vnode} micro-batch {mb}: {what}")]
    Malformed { job: String, vnode: u32, mb: u64, what: &'static str },
}

/// Wire tensor of a host tensor.
pub fn tensor_to_wire(t: &HostTensor) -> v1::Tensor {
    match &t.data {
        HostData::F32(v) => tensor::encode_f32(&t.shape, v),
        HostData::I32(v) => tensor::encode_i32(&t.shape, v),
        HostData::F16(v) => tensor::encode_16(&t.shape, v, false),
        HostData::Bf16(v) => tensor::encode_16(&t.shape, v, true),
        HostData::Int8 { scales, codes } => tensor::encode_int8(&t.shape, scales, codes),
    }
}

// Both ends of the int8 encoding must agree on the block the scales cover.
const _: () = assert!(tensor::INT8_BLOCK == dcnr_vnode::compact::INT8_BLOCK);

/// Host tensor of a wire tensor (checked).
pub fn tensor_from_wire(t: Option<&v1::Tensor>) -> Result<HostTensor, TensorError> {
    let d = tensor::decode(t)?;
    Ok(match d.data {
        tensor::HostData::F32(v) => HostTensor::f32(d.shape, v),
        tensor::HostData::I32(v) => HostTensor::i32(d.shape, v),
        tensor::HostData::F16(v) => HostTensor { shape: d.shape, data: HostData::F16(v) },
        tensor::HostData::Bf16(v) => HostTensor { shape: d.shape, data: HostData::Bf16(v) },
        tensor::HostData::Int8 { scales, codes } => {
            HostTensor { shape: d.shape, data: HostData::Int8 { scales, codes } }
        }
    })
}

/// Wire phase.
pub fn phase_to_wire(p: Phase) -> i32 {
    match p {
        Phase::Train => v1::Phase::Train as i32,
        Phase::Eval => v1::Phase::Eval as i32,
    }
}

/// Where a VNode message goes: job, target VNode and the placement generation it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Job id.
    pub job: String,
    /// Target VNode.
    pub vnode: u32,
    /// Placement generation of the sender.
    pub generation: u32,
}

/// A forward message on the wire.
pub fn forward_message(to: &Target, mb: u64, phase: Phase, port: u32, t: &HostTensor) -> v1::VNodeMessage {
    v1::VNodeMessage {
        job_id: to.job.clone(),
        to_vnode: to.vnode,
        micro_batch: mb,
        body: Some(Body::Forward(v1::Forward { port, phase: phase_to_wire(phase), tensor: Some(tensor_to_wire(t)) })),
        generation: to.generation,
    }
}

/// A backward message on the wire.
pub fn backward_message(to: &Target, mb: u64, from: (u32, u32), t: &HostTensor) -> v1::VNodeMessage {
    v1::VNodeMessage {
        job_id: to.job.clone(),
        to_vnode: to.vnode,
        micro_batch: mb,
        generation: to.generation,
        body: Some(Body::Backward(v1::Backward {
            from_vnode: from.0,
            from_port: from.1,
            tensor: Some(tensor_to_wire(t)),
        })),
    }
}

/// Decodes a wire message into its target and a VNode message, checking every field.
pub fn inbound_from_wire(m: v1::VNodeMessage) -> Result<(Target, Inbound), ConvertError> {
    let (job, vnode, mb, generation) = (m.job_id, m.to_vnode, m.micro_batch, m.generation);
    let malformed = |job: &str, what| ConvertError::Malformed { job: job.to_string(), vnode, mb, what };
    let inbound = match m.body {
        Some(Body::Forward(f)) => {
            let phase = match v1::Phase::try_from(f.phase) {
                Ok(v1::Phase::Train) => Phase::Train,
                Ok(v1::Phase::Eval) => Phase::Eval,
                _ => return Err(malformed(&job, "unknown phase")),
            };
            let tensor = tensor_from_wire(f.tensor.as_ref()).map_err(|source| ConvertError::Tensor {
                job: job.clone(),
                vnode,
                mb,
                source,
            })?;
            Inbound::Forward { mb, phase, port: f.port, tensor }
        }
        Some(Body::Backward(b)) => {
            let tensor = tensor_from_wire(b.tensor.as_ref()).map_err(|source| ConvertError::Tensor {
                job: job.clone(),
                vnode,
                mb,
                source,
            })?;
            Inbound::Backward { mb, from: (b.from_vnode, b.from_port), tensor }
        }
        None => return Err(malformed(&job, "message has no body")),
    };
    Ok((Target { job, vnode, generation }, inbound))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcnr_vnode::compact::{self, WireFormat};

    #[test]
    fn packed_tensors_cross_the_wire_unchanged_and_small() {
        let values: Vec<f32> = (0..64 * 256).map(|i| ((i * 37 % 1001) as f32 - 500.0) / 97.0).collect();
        let t = HostTensor::f32(vec![64, 256], values);
        for (format, bytes) in [
            (WireFormat::F32, 65536),
            (WireFormat::F16, 32768),
            (WireFormat::Bf16, 32768),
            (WireFormat::Int8, 16384 + 1024),
        ] {
            let packed = compact::pack(&t, format);
            let wire = tensor_to_wire(&packed);
            assert_eq!(wire.data.len(), bytes, "{format:?}");
            let back = tensor_from_wire(Some(&wire)).unwrap();
            assert_eq!(back, packed, "{format:?}");
            assert_eq!(compact::unpack(back), compact::round_trip(&t, format));
        }
    }
}
