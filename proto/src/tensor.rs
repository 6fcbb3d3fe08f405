//! Checked conversion between wire tensors and plain host tensors.

use crate::limits::{MAX_ELEMENTS, MAX_RANK};
use crate::v1;

/// A tensor off the wire whose shape, dtype and byte length are consistent.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 32-bit signed integers (class labels).
    I32(Vec<i32>),
    /// IEEE half-precision bit patterns.
    F16(Vec<u16>),
    /// bfloat16 bit patterns.
    Bf16(Vec<u16>),
    /// Blockwise absmax int8: one scale per [`INT8_BLOCK`] codes.
    Int8 {
        /// Per-block scales.
        scales: Vec<f32>,
        /// One code per element.
        codes: Vec<i8>,
    },
}

/// Elements per scale of `DTYPE_INT8_BLOCK64`.
pub const INT8_BLOCK: usize = 64;

/// Why a wire tensor was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    /// The tensor field was absent.
    #[error("message carries no tensor")]
    Missing,
    /// Rank above the protocol limit.
    #[error("tensor rank {0} exceeds the limit of {MAX_RANK}")]
    Rank(usize),
    /// Element count overflowed or is above the limit.
    #[error("tensor shape {0:?} has too many elements (limit {MAX_ELEMENTS})")]
    TooLarge(Vec<u64>),
    /// Unknown or unspecified dtype.
    #[error("tensor dtype {0} is not supported (f32, i32, f16, bf16 or int8-block64)")]
    DType(i32),
    /// Byte length disagrees with shape and dtype.
    #[error("tensor of shape {shape:?} needs {expected} bytes but carries {actual}")]
    Length { shape: Vec<u64>, expected: u64, actual: usize },
}

/// Shape plus checked element data.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: HostData,
}

/// Little-endian bytes of 4-byte elements: a plain copy on little-endian machines.
fn le_bytes<T: bytemuck::Pod>(data: &[T], to_le: impl Fn(&T) -> [u8; 4]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice(data).to_vec()
    } else {
        data.iter().flat_map(to_le).collect()
    }
}

/// Encodes f32 elements.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> v1::Tensor {
    let bytes = le_bytes(data, |x| x.to_le_bytes());
    v1::Tensor { shape: shape.iter().map(|&d| d as u64).collect(), dtype: v1::Dtype::F32 as i32, data: bytes }
}

/// Encodes i32 elements.
pub fn encode_i32(shape: &[usize], data: &[i32]) -> v1::Tensor {
    let bytes = le_bytes(data, |x| x.to_le_bytes());
    v1::Tensor { shape: shape.iter().map(|&d| d as u64).collect(), dtype: v1::Dtype::I32 as i32, data: bytes }
}

/// Encodes 16-bit float bit patterns (`bf16` selects bfloat16, else IEEE half).
pub fn encode_16(shape: &[usize], bits: &[u16], bf16: bool) -> v1::Tensor {
    let dtype = if bf16 { v1::Dtype::Bf16 } else { v1::Dtype::F16 };
    let data = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    v1::Tensor { shape: shape.iter().map(|&d| d as u64).collect(), dtype: dtype as i32, data }
}

/// Encodes a blockwise int8 tensor: the scales, then the codes.
pub fn encode_int8(shape: &[usize], scales: &[f32], codes: &[i8]) -> v1::Tensor {
    let mut data = le_bytes(scales, |x| x.to_le_bytes());
    data.extend(codes.iter().map(|&c| c as u8));
    v1::Tensor { shape: shape.iter().map(|&d| d as u64).collect(), dtype: v1::Dtype::Int8Block64 as i32, data }
}

/// Decodes and checks a wire tensor.
pub fn decode(t: Option<&v1::Tensor>) -> Result<Decoded, TensorError> {
    let t = t.ok_or(TensorError::Missing)?;
    if t.shape.len() > MAX_RANK {
        return Err(TensorError::Rank(t.shape.len()));
    }
    let elements = t
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_ELEMENTS)
        .ok_or_else(|| TensorError::TooLarge(t.shape.clone()))?;
    let dtype = v1::Dtype::try_from(t.dtype).map_err(|_| TensorError::DType(t.dtype))?;
    // `elements` is at most MAX_ELEMENTS, so none of these can overflow.
    let expected = match dtype {
        v1::Dtype::F32 | v1::Dtype::I32 => elements * 4,
        v1::Dtype::F16 | v1::Dtype::Bf16 => elements * 2,
        v1::Dtype::Int8Block64 => elements.div_ceil(INT8_BLOCK as u64) * 4 + elements,
        v1::Dtype::Unspecified => return Err(TensorError::DType(t.dtype)),
    };
    if t.data.len() as u64 != expected {
        return Err(TensorError::Length { shape: t.shape.clone(), expected, actual: t.data.len() });
    }
    let little = cfg!(target_endian = "little");
    let words = || t.data.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
    // The bytes of a protobuf field carry no alignment, so the copy is what makes them typed.
    let halves = || t.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let data = match dtype {
        v1::Dtype::F32 if little => HostData::F32(bytemuck::pod_collect_to_vec(&t.data)),
        v1::Dtype::I32 if little => HostData::I32(bytemuck::pod_collect_to_vec(&t.data)),
        v1::Dtype::F32 => HostData::F32(words().map(f32::from_le_bytes).collect()),
        v1::Dtype::I32 => HostData::I32(words().map(i32::from_le_bytes).collect()),
        v1::Dtype::F16 => HostData::F16(halves()),
        v1::Dtype::Bf16 => HostData::Bf16(halves()),
        v1::Dtype::Int8Block64 => {
            let (scales, codes) = t.data.split_at(t.data.len() - elements as usize);
            HostData::Int8 {
                scales: scales.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                codes: codes.iter().map(|&c| c as i8).collect(),
            }
        }
        v1::Dtype::Unspecified => return Err(TensorError::DType(t.dtype)),
    };
    Ok(Decoded { shape: t.shape.iter().map(|&d| d as usize).collect(), data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_i32() {
        let t = encode_f32(&[2, 3], &[1.0, -2.5, 3.0, 0.0, f32::MIN_POSITIVE, 7.0]);
        let d = decode(Some(&t)).unwrap();
        assert_eq!(d.shape, vec![2, 3]);
        assert_eq!(d.data, HostData::F32(vec![1.0, -2.5, 3.0, 0.0, f32::MIN_POSITIVE, 7.0]));
        let t = encode_i32(&[3], &[0, 9, -1]);
        assert_eq!(decode(Some(&t)).unwrap().data, HostData::I32(vec![0, 9, -1]));
    }

    #[test]
    fn round_trip_compact() {
        let t = encode_16(&[3], &[1, 0x3c00, 0xffff], false);
        assert_eq!(decode(Some(&t)).unwrap().data, HostData::F16(vec![1, 0x3c00, 0xffff]));
        let t = encode_16(&[1], &[0x3f80], true);
        assert_eq!(decode(Some(&t)).unwrap().data, HostData::Bf16(vec![0x3f80]));
        let codes: Vec<i8> = (0..130).map(|i| (i % 255 - 127) as i8).collect();
        let t = encode_int8(&[2, 65], &[0.5, 1.5, -2.0], &codes);
        assert_eq!(t.data.len(), 3 * 4 + 130);
        assert_eq!(decode(Some(&t)).unwrap().data, HostData::Int8 { scales: vec![0.5, 1.5, -2.0], codes });
    }

    #[test]
    fn refuses_garbled_tensors() {
        let mut t = encode_f32(&[2, 2], &[1.0; 4]);
        t.data.pop();
        assert!(matches!(decode(Some(&t)), Err(TensorError::Length { .. })));
        let mut t = encode_f32(&[2], &[1.0; 2]);
        t.dtype = 99;
        assert_eq!(decode(Some(&t)), Err(TensorError::DType(99)));
        let t = v1::Tensor { shape: vec![u64::MAX, 2], dtype: 1, data: vec![] };
        assert!(matches!(decode(Some(&t)), Err(TensorError::TooLarge(_))));
        let mut t = encode_int8(&[2, 65], &[1.0, 2.0, 3.0], &[1; 130]);
        t.data.pop();
        assert!(matches!(decode(Some(&t)), Err(TensorError::Length { .. })));
        let t = v1::Tensor { shape: vec![2], dtype: v1::Dtype::F16 as i32, data: vec![0; 8] };
        assert!(matches!(decode(Some(&t)), Err(TensorError::Length { expected: 4, .. })));
        let t = v1::Tensor { shape: vec![1; 9], dtype: 1, data: vec![0; 4] };
        assert_eq!(decode(Some(&t)), Err(TensorError::Rank(9)));
        assert_eq!(decode(None), Err(TensorError::Missing));
    }
}
