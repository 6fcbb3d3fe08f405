//! Host-side tensors: the plain data a VNode receives and emits.

use crate::kernels::Matrix;

/// Element data of a host tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// Activations, gradients, parameters.
    F32(Vec<f32>),
    /// Class labels.
    I32(Vec<i32>),
    /// IEEE half-precision bit patterns ([`crate::compact`]).
    F16(Vec<u16>),
    /// bfloat16 bit patterns ([`crate::compact`]).
    Bf16(Vec<u16>),
    /// Blockwise absmax int8: one scale per [`crate::compact::INT8_BLOCK`] codes.
    Int8 {
        /// Per-block scale (absmax / 127).
        scales: Vec<f32>,
        /// One code per element.
        codes: Vec<i8>,
    },
    /// Raw pixels of the job's data, which the VNode reading them normalises itself.
    U8(Vec<u8>),
}

/// A row-major tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements (`product(shape)` of them).
    pub data: HostData,
}

impl HostTensor {
    /// A float tensor.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
        HostTensor { shape, data: HostData::F32(data) }
    }

    /// An integer tensor.
    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> HostTensor {
        HostTensor { shape, data: HostData::I32(data) }
    }

    /// A byte tensor (raw pixels).
    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> HostTensor {
        HostTensor { shape, data: HostData::U8(data) }
    }

    /// Float elements, if this is a float tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            HostData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Rows of a rank-2 tensor (the batch size).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Number of elements implied by the shape.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the element count matches the shape.
    pub fn is_consistent(&self) -> bool {
        let n = self.numel();
        match &self.data {
            HostData::F32(v) => v.len() == n,
            HostData::I32(v) => v.len() == n,
            HostData::U8(v) => v.len() == n,
            HostData::F16(v) | HostData::Bf16(v) => v.len() == n,
            HostData::Int8 { scales, codes } => codes.len() == n && scales.len() == crate::compact::int8_scales(n),
        }
    }

    /// Whether this is a compact encoding that [`crate::compact::unpack`] turns back into f32.
    pub fn is_packed(&self) -> bool {
        matches!(self.data, HostData::F16(_) | HostData::Bf16(_) | HostData::Int8 { .. })
    }

    /// Bytes of element data as it travels: what a message of this tensor costs on a link.
    pub fn data_bytes(&self) -> u64 {
        let bytes = match &self.data {
            HostData::F32(v) => v.len() * 4,
            HostData::I32(v) => v.len() * 4,
            HostData::U8(v) => v.len(),
            HostData::F16(v) | HostData::Bf16(v) => v.len() * 2,
            HostData::Int8 { scales, codes } => scales.len() * 4 + codes.len(),
        };
        bytes as u64
    }

    /// A rank-2 float tensor as a matrix, moving its values.
    pub fn into_matrix(self) -> Option<Matrix> {
        match (self.data, self.shape.as_slice()) {
            (HostData::F32(v), &[r, c]) => Matrix::new(r, c, v),
            _ => None,
        }
    }

    /// A matrix as a rank-2 float tensor, moving its values.
    pub fn from_matrix(m: Matrix) -> HostTensor {
        HostTensor::f32(m.shape(), m.into_data())
    }

    /// A copy of a matrix as a rank-2 float tensor.
    pub fn copy_of(m: &Matrix) -> HostTensor {
        HostTensor::f32(m.shape(), m.data().to_vec())
    }
}
