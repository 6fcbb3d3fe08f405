//! Compact encodings of the tensors VNodes exchange: f16, bf16 and blockwise absmax int8.
//!
//! A producing VNode packs a tensor once; every consumer unpacks it to the same f32 values,
//! whether the tensor crossed a network or stayed in the process, so a job's result does not
//! depend on where its VNodes run. Every step is plain scalar arithmetic with round-to-nearest-
//! even, so the same input gives the same bits on every machine and run.

use crate::host::{HostData, HostTensor};
pub use dcnr_model::WireFormat;

/// Elements sharing one int8 scale. Small enough that one outlier costs little precision,
/// large enough that the scales add only 1/16 to the codes' bytes.
pub const INT8_BLOCK: usize = 64;

/// Largest code magnitude: the symmetric range keeps zero exact and ±absmax representable.
const INT8_MAX: f32 = 127.0;

/// Packs a float tensor in `format`; integer or already packed tensors, and `F32`, pass unchanged.
pub fn pack(t: &HostTensor, format: WireFormat) -> HostTensor {
    let HostData::F32(values) = &t.data else { return t.clone() };
    let data = match format {
        WireFormat::F32 => return t.clone(),
        WireFormat::F16 => HostData::F16(values.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect()),
        WireFormat::Bf16 => HostData::Bf16(values.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()),
        WireFormat::Int8 => {
            let (scales, codes) = int8_encode(values);
            HostData::Int8 { scales, codes }
        }
    };
    HostTensor { shape: t.shape.clone(), data }
}

/// The f32 values of a packed tensor; anything else passes unchanged.
pub fn unpack(t: HostTensor) -> HostTensor {
    let values = match &t.data {
        HostData::F16(bits) => bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect(),
        HostData::Bf16(bits) => bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(),
        HostData::Int8 { scales, codes } => int8_decode(scales, codes),
        _ => return t,
    };
    HostTensor::f32(t.shape, values)
}

/// `unpack(pack(t))`: the values a consumer sees, for references that never build the packed form.
pub fn round_trip(t: &HostTensor, format: WireFormat) -> HostTensor {
    unpack(pack(t, format))
}

/// Number of int8 scales for `n` elements.
pub fn int8_scales(n: usize) -> usize {
    n.div_ceil(INT8_BLOCK)
}

fn int8_encode(values: &[f32]) -> (Vec<f32>, Vec<i8>) {
    let mut scales = Vec::with_capacity(int8_scales(values.len()));
    let mut codes = Vec::with_capacity(values.len());
    for block in values.chunks(INT8_BLOCK) {
        // NaN makes the scale NaN, so the decoded block is NaN and the receiver's screen refuses it
        // rather than seeing silently zeroed values.
        let absmax = block.iter().fold(0f32, |m, x| if x.is_nan() || m.is_nan() { f32::NAN } else { m.max(x.abs()) });
        let scale = absmax / INT8_MAX;
        scales.push(scale);
        if scale == 0.0 {
            codes.extend(std::iter::repeat_n(0, block.len()));
        } else {
            // `as` saturates and maps NaN to 0; the range is already within ±127 by construction.
            codes.extend(block.iter().map(|&x| (x / scale).round_ties_even().clamp(-INT8_MAX, INT8_MAX) as i8));
        }
    }
    (scales, codes)
}

fn int8_decode(scales: &[f32], codes: &[i8]) -> Vec<f32> {
    codes
        .chunks(INT8_BLOCK)
        .zip(scales.iter().chain(std::iter::repeat(&f32::NAN)))
        .flat_map(|(block, &scale)| block.iter().map(move |&c| f32::from(c) * scale))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(values: Vec<f32>) -> HostTensor {
        HostTensor::f32(vec![1, values.len()], values)
    }

    fn values(t: &HostTensor) -> Vec<f32> {
        t.as_f32().map(<[f32]>::to_vec).unwrap_or_default()
    }

    #[test]
    fn f32_and_labels_pass_unchanged() {
        let x = t(vec![1.5, -2.0]);
        assert_eq!(pack(&x, WireFormat::F32), x);
        let y = HostTensor::i32(vec![2], vec![3, 4]);
        assert_eq!(pack(&y, WireFormat::Int8), y);
        assert_eq!(unpack(y.clone()), y);
    }

    #[test]
    fn int8_keeps_zero_and_the_block_extremes_exact_in_code() {
        let mut v: Vec<f32> = (0..70).map(|i| (i as f32 - 35.0) / 7.0).collect();
        v[3] = 0.0;
        let p = pack(&t(v.clone()), WireFormat::Int8);
        let HostData::Int8 { scales, codes } = &p.data else { panic!("not int8") };
        assert_eq!(scales.len(), 2);
        assert_eq!(codes.len(), 70);
        assert_eq!(codes[3], 0);
        assert_eq!(codes[0], -127, "the block's absmax maps to the end of the range");
        let back = values(&unpack(p));
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= 5.0 / 127.0 / 2.0 + 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn a_zero_block_decodes_to_zeros_and_nan_stays_visible() {
        assert_eq!(values(&round_trip(&t(vec![0.0; 10]), WireFormat::Int8)), vec![0.0; 10]);
        let back = values(&round_trip(&t(vec![1.0, f32::NAN, 2.0]), WireFormat::Int8));
        assert!(back.iter().all(|x| x.is_nan()));
        let back = values(&round_trip(&t(vec![1.0, f32::INFINITY]), WireFormat::Int8));
        assert!(back.iter().any(|x| !x.is_finite()));
    }

    #[test]
    fn half_formats_round_to_nearest() {
        let x = t(vec![1.0, 1.0 + 1.0 / 4096.0, 65504.0, -0.5, 3.0e-8]);
        let f = values(&round_trip(&x, WireFormat::F16));
        assert_eq!(f[0], 1.0);
        assert_eq!(f[1], 1.0, "ties go to even");
        assert_eq!(f[2], 65504.0);
        assert_eq!(f[3], -0.5);
        let b = values(&round_trip(&x, WireFormat::Bf16));
        assert_eq!(b[0], 1.0);
        assert_eq!(b[3], -0.5);
    }

    proptest! {
        #[test]
        fn packing_is_deterministic_and_bounded(v in proptest::collection::vec(-1.0e3f32..1.0e3, 1..300)) {
            for format in [WireFormat::F16, WireFormat::Bf16, WireFormat::Int8] {
                let a = pack(&t(v.clone()), format);
                prop_assert_eq!(&a, &pack(&t(v.clone()), format));
                let back = values(&unpack(a));
                prop_assert_eq!(back.len(), v.len());
                for (block, got) in v.chunks(INT8_BLOCK).zip(back.chunks(INT8_BLOCK)) {
                    let absmax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                    for (x, y) in block.iter().zip(got) {
                        let err = (x - y).abs();
                        let bound = match format {
                            WireFormat::Int8 => absmax / 127.0 / 2.0 * 1.0001 + 1e-30,
                            WireFormat::F16 => x.abs() / 2048.0 + 6.0e-8,
                            _ => x.abs() / 256.0 + 1e-38,
                        };
                        prop_assert!(err <= bound, "{:?}: {} -> {} (err {} > {})", format, x, y, err, bound);
                    }
                }
            }
        }

        #[test]
        fn packing_twice_changes_nothing(v in proptest::collection::vec(-10.0f32..10.0, 1..200)) {
            for format in [WireFormat::F16, WireFormat::Bf16] {
                let once = round_trip(&t(v.clone()), format);
                prop_assert_eq!(round_trip(&once, format), once);
            }
        }
    }
}
