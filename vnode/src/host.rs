//! Host-side tensors: the plain data a VNode receives and emits.

use burn::tensor::{Tensor, TensorData};

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
            HostData::F16(v) | HostData::Bf16(v) => v.len() * 2,
            HostData::Int8 { scales, codes } => scales.len() * 4 + codes.len(),
        };
        bytes as u64
    }

    /// Copies a rank-2 float tensor onto `device`.
    pub(crate) fn to_burn(&self, device: &burn::tensor::Device) -> Option<Tensor<2>> {
        self.clone().into_burn(device)
    }

    /// Moves a rank-2 float tensor onto `device` without copying it on the host.
    pub(crate) fn into_burn(self, device: &burn::tensor::Device) -> Option<Tensor<2>> {
        match (self.data, self.shape.as_slice()) {
            (HostData::F32(v), &[r, c]) => Some(Tensor::from_data(TensorData::new(v, [r, c]), device)),
            _ => None,
        }
    }

    /// Copies a rank-2 burn tensor back to the host.
    pub(crate) fn from_burn(t: Tensor<2>) -> Result<HostTensor, String> {
        let shape = t.dims().to_vec();
        let v = t.into_data().try_into_vec::<f32>().map_err(|e| format!("{e:?}"))?;
        Ok(HostTensor::f32(shape, v))
    }
}
