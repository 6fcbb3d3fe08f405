//! Conversions between wire messages and VNode messages, in one place for PNodes and the
//! orchestrator's data feeder alike. A `Feed` is decoded into a [`FeedRequest`], which only the
//! PNode hosting the VNode can turn into its input (it holds the job's dataset).

use dcnr_proto::seal::{self, Route};
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
        HostData::U8(v) => tensor::encode_u8(&t.shape, v),
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
        tensor::HostData::U8(v) => HostTensor::u8(d.shape, v),
    })
}

/// The phase a wire value names (`None`: unspecified or unknown).
pub fn phase_from_wire(p: i32) -> Option<Phase> {
    match v1::Phase::try_from(p) {
        Ok(v1::Phase::Train) => Some(Phase::Train),
        Ok(v1::Phase::Eval) => Some(Phase::Eval),
        Ok(v1::Phase::Infer) => Some(Phase::Infer),
        _ => None,
    }
}

/// Wire phase.
pub fn phase_to_wire(p: Phase) -> i32 {
    match p {
        Phase::Train => v1::Phase::Train as i32,
        Phase::Eval => v1::Phase::Eval as i32,
        Phase::Infer => v1::Phase::Infer as i32,
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
        seal: None,
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
        seal: None,
    }
}

/// A sync message on the wire: copy `from`'s change of parameter `index` in the round closed by
/// step `mb`.
pub fn sync_message(to: &Target, mb: u64, from: u32, index: u32, t: &HostTensor) -> v1::VNodeMessage {
    v1::VNodeMessage {
        job_id: to.job.clone(),
        to_vnode: to.vnode,
        micro_batch: mb,
        generation: to.generation,
        body: Some(Body::Sync(v1::Sync { from_vnode: from, index, tensor: Some(tensor_to_wire(t)) })),
        seal: None,
    }
}

/// Any VNode-to-VNode message on the wire.
pub fn inbound_message(to: &Target, msg: &Inbound) -> v1::VNodeMessage {
    match msg {
        Inbound::Forward { mb, phase, port, tensor } => forward_message(to, *mb, *phase, *port, tensor),
        Inbound::Backward { mb, from, tensor } => backward_message(to, *mb, *from, tensor),
        Inbound::Sync { mb, from, index, tensor } => sync_message(to, *mb, *from, *index, tensor),
    }
}

/// How a training activation or gradient enters its VNode, the part of a seal's context the
/// message itself names; `None` for evaluation traffic and parameter syncs, which carry no seal.
pub fn seal_route(msg: &Inbound) -> Option<Route> {
    match msg {
        Inbound::Forward { phase: Phase::Train, port, .. } => Some(Route::Forward { port: *port }),
        Inbound::Backward { from, .. } => Some(Route::Backward { from_vnode: from.0, from_port: from.1 }),
        Inbound::Forward { .. } | Inbound::Sync { .. } => None,
    }
}

/// [`seal_route`] of a wire message, with the tensor the seal must describe.
pub fn wire_seal_route(m: &v1::VNodeMessage) -> Option<(Route, &v1::Tensor)> {
    match &m.body {
        Some(Body::Forward(f)) if f.phase == v1::Phase::Train as i32 => {
            Some((Route::Forward { port: f.port }, f.tensor.as_ref()?))
        }
        Some(Body::Backward(b)) => {
            Some((Route::Backward { from_vnode: b.from_vnode, from_port: b.from_port }, b.tensor.as_ref()?))
        }
        _ => None,
    }
}

/// [`seal::tensor_sha256`] of the wire form of `t`, without building it for f32 tensors (the
/// activations and gradients of every local delivery in a sealed job).
pub fn tensor_sha256(t: &HostTensor) -> [u8; 32] {
    match &t.data {
        // In memory, a little-endian machine's f32 bytes are their wire bytes.
        HostData::F32(v) if cfg!(target_endian = "little") => {
            let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            seal::hash_parts(v1::Dtype::F32 as i32, &shape, bytemuck::cast_slice(v))
        }
        _ => seal::tensor_sha256(&tensor_to_wire(t)),
    }
}

/// The seal context of a message for `to`: where it went and how.
pub fn seal_context<'a>(to: &'a Target, mb: u64, route: Route) -> seal::Context<'a> {
    seal::Context { job: &to.job, generation: to.generation, to_vnode: to.vnode, micro_batch: mb, route }
}

/// A request to feed data input `port` of micro-batch `mb` from batch `batch` of the job's
/// dataset (see the `Feed` message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedRequest {
    /// Micro-batch the input belongs to.
    pub mb: u64,
    /// Train or eval.
    pub phase: Phase,
    /// Input port of the target VNode.
    pub port: u32,
    /// Training step, or evaluation batch number.
    pub batch: u64,
}

/// A feed message on the wire.
pub fn feed_message(to: &Target, feed: FeedRequest) -> v1::VNodeMessage {
    v1::VNodeMessage {
        job_id: to.job.clone(),
        to_vnode: to.vnode,
        micro_batch: feed.mb,
        body: Some(Body::Feed(v1::Feed { port: feed.port, phase: phase_to_wire(feed.phase), batch: feed.batch })),
        generation: to.generation,
        seal: None,
    }
}

/// A decoded wire message: a VNode message, or a request to build one from the job's data.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// Ready for the VNode.
    Inbound(Inbound),
    /// To be built by the PNode that holds the job's dataset.
    Feed(FeedRequest),
}

/// Decodes a wire message into its target and what it carries, checking every field.
pub fn message_from_wire(m: v1::VNodeMessage) -> Result<(Target, Incoming), ConvertError> {
    let (job, vnode, mb, generation) = (m.job_id, m.to_vnode, m.micro_batch, m.generation);
    let malformed = |job: &str, what| ConvertError::Malformed { job: job.to_string(), vnode, mb, what };
    let tensor = |t: Option<&v1::Tensor>| {
        tensor_from_wire(t).map_err(|source| ConvertError::Tensor { job: job.clone(), vnode, mb, source })
    };
    let inbound = match m.body {
        Some(Body::Feed(f)) => {
            let phase = phase_from_wire(f.phase).ok_or_else(|| malformed(&job, "unknown phase"))?;
            let feed = FeedRequest { mb, phase, port: f.port, batch: f.batch };
            return Ok((Target { job, vnode, generation }, Incoming::Feed(feed)));
        }
        Some(Body::Forward(f)) => {
            let phase = phase_from_wire(f.phase).ok_or_else(|| malformed(&job, "unknown phase"))?;
            Inbound::Forward { mb, phase, port: f.port, tensor: tensor(f.tensor.as_ref())? }
        }
        Some(Body::Backward(b)) => {
            Inbound::Backward { mb, from: (b.from_vnode, b.from_port), tensor: tensor(b.tensor.as_ref())? }
        }
        Some(Body::Sync(c)) => {
            Inbound::Sync { mb, from: c.from_vnode, index: c.index, tensor: tensor(c.tensor.as_ref())? }
        }
        None => return Err(malformed(&job, "message has no body")),
    };
    Ok((Target { job, vnode, generation }, Incoming::Inbound(inbound)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_tensor_hashes_as_its_wire_form() {
        for t in [
            HostTensor::f32(vec![2, 3], vec![0.5, -1.0, 3.25, 0.0, -0.0, 7.0]),
            HostTensor::i32(vec![3], vec![1, 2, 9]),
            HostTensor::u8(vec![1, 2], vec![0, 255]),
        ] {
            assert_eq!(tensor_sha256(&t), seal::tensor_sha256(&tensor_to_wire(&t)), "{t:?}");
        }
    }

    #[test]
    fn feeds_round_trip_and_garbled_ones_are_refused() {
        let to = Target { job: "j".into(), vnode: 3, generation: 2 };
        let feed = FeedRequest { mb: 40, phase: Phase::Eval, port: 1, batch: 7 };
        let (t, got) = message_from_wire(feed_message(&to, feed)).unwrap();
        assert_eq!(t, to);
        assert!(matches!(got, Incoming::Feed(f) if f == feed));
        let mut bad = feed_message(&to, feed);
        if let Some(Body::Feed(f)) = &mut bad.body {
            f.phase = 9;
        }
        assert!(matches!(message_from_wire(bad), Err(ConvertError::Malformed { what: "unknown phase", .. })));
    }

    #[test]
    fn pixels_have_a_wire_form() {
        let t = HostTensor::u8(vec![1, 3], vec![0, 128, 255]);
        let w = tensor_to_wire(&t);
        assert_eq!(w.data.len(), 3);
        assert_eq!(tensor_from_wire(Some(&w)).unwrap(), t);
        let to = Target { job: "j".into(), vnode: 0, generation: 1 };
        let (_, got) = message_from_wire(forward_message(&to, 5, Phase::Train, 0, &t)).unwrap();
        assert!(matches!(got, Incoming::Inbound(Inbound::Forward { mb: 5, tensor, .. }) if tensor == t));
    }

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
