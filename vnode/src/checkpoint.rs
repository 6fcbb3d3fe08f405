//! The versioned, self-describing byte format of a VNode's state, written at drained points.
//!
//! Layout: `b"DCNRVNS1"`, a u32 LE header length, a JSON header (format version, VNode id, kind,
//! update count, optimizer step count, and the role and shape of every tensor), then the tensors'
//! f32 values little-endian in header order. A VNode has no random state after initialisation
//! (sample order lives in the orchestrator and is a function of the seed), so parameters,
//! optimizer moments and counters are the whole state.

use serde::{Deserialize, Serialize};

/// Leading bytes of every VNode state.
pub const MAGIC: &[u8; 8] = b"DCNRVNS1";
/// Format version this build writes and reads.
pub const FORMAT: u32 = 1;
/// Largest header accepted.
const MAX_HEADER: usize = 1 << 20;

/// What a tensor in the state is: a parameter or one of its optimizer moments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorRole {
    /// A parameter.
    Param,
    /// The optimizer's first moment (momentum) of a parameter.
    First,
    /// The optimizer's second moment of a parameter.
    Second,
    /// With several pipelines: a parameter as of the last averaging round, which the next
    /// round's change is measured from.
    Anchor,
    /// With several pipelines: the outer optimizer's momentum of a parameter.
    OuterMomentum,
}

/// One tensor's place in the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Role.
    pub role: TensorRole,
    /// Which parameter it belongs to.
    pub index: usize,
    /// For parameters: the version (update count) they are; the stash of a pipelined VNode keeps
    /// older versions that pending forwards will use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Shape.
    pub shape: Vec<usize>,
}

/// The JSON header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Format version.
    pub format: u32,
    /// VNode id.
    pub vnode: u32,
    /// Kind name.
    pub kind: String,
    /// Updates applied (the next micro-batch is this number).
    pub updates: u64,
    /// Optimizer steps (for Adam's bias correction).
    pub optimizer_steps: u64,
    /// Tensors in data order.
    pub tensors: Vec<TensorEntry>,
}

/// Why state bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StateError {
    /// Not a VNode state, or truncated.
    #[error("not a DCNR VNode state: {0}")]
    Malformed(String),
    /// Written by another format version.
    #[error("VNode state format {0} is not supported (this build reads format {FORMAT})")]
    Format(u32),
    /// Belongs to another VNode or kind, or shapes disagree with the graph.
    #[error("VNode state does not fit: {0}")]
    Mismatch(String),
}

/// Encodes a header and tensors.
pub fn encode(header: &Header, data: &[Vec<f32>]) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap_or_default();
    let total: usize = data.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(12 + json.len() + total * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    for t in data {
        for x in t {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// Decodes and checks lengths; the caller checks that the content fits its VNode.
pub fn decode(bytes: &[u8]) -> Result<(Header, Vec<Vec<f32>>), StateError> {
    let bad = |m: &str| StateError::Malformed(m.to_string());
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(bad("missing magic bytes"));
    }
    let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if len > MAX_HEADER || 12 + len > bytes.len() {
        return Err(bad("header length out of range"));
    }
    let header: Header = serde_json::from_slice(&bytes[12..12 + len]).map_err(|e| bad(&format!("header: {e}")))?;
    if header.format != FORMAT {
        return Err(StateError::Format(header.format));
    }
    let mut rest = &bytes[12 + len..];
    let mut data = Vec::with_capacity(header.tensors.len());
    for t in &header.tensors {
        let n = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("shape overflows"))?;
        let need = n.checked_mul(4).filter(|&b| b <= rest.len()).ok_or_else(|| bad("truncated tensor data"))?;
        data.push(rest[..need].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
        rest = &rest[need..];
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the last tensor"));
    }
    Ok((header, data))
}
