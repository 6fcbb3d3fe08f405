//! Cheap checks on every tensor a VNode receives and every result the orchestrator accepts:
//! dtype, shape, NaN/Inf and absurd magnitudes. They cost one pass over the data and catch
//! garbage whatever the verification policy; subtler cheating (a scaled or stale result) is left
//! to redundant execution.

use crate::host::{HostData, HostTensor};

/// Largest magnitude any activation, gradient, loss or parameter may have. Training on
/// normalised data keeps values many orders of magnitude below it; a value beyond it means the
/// sender is broken or lying, and accepting it would poison every update after it.
pub const MAX_ABS: f32 = 1.0e6;

/// What is wrong with a tensor.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SanityError {
    /// Float where integers were expected or the reverse.
    #[error("dtype is {got}, expected {expected}")]
    Dtype {
        /// Expected dtype name.
        expected: &'static str,
        /// Actual dtype name.
        got: &'static str,
    },
    /// Wrong rank, width or row count, or elements that do not fill the shape.
    #[error("shape {got:?} does not match {expected}")]
    Shape {
        /// What the shape should be, in words.
        expected: String,
        /// The shape received.
        got: Vec<usize>,
    },
    /// NaN or an infinity.
    #[error("element {index} is {value}")]
    NonFinite {
        /// Flat index of the first offending element.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// A finite value beyond [`MAX_ABS`].
    #[error("element {index} is {value:e}, beyond the limit of ±{limit:e}")]
    Magnitude {
        /// Flat index of the first offending element.
        index: usize,
        /// Its value.
        value: f32,
        /// The limit.
        limit: f32,
    },
    /// A micro-batch no honest sender could have produced yet.
    #[error("micro-batch {mb} is ahead of anything this VNode can take (at most {limit})")]
    Ahead {
        /// The micro-batch sent.
        mb: u64,
        /// The furthest one that could be legitimate.
        limit: u64,
    },
    /// A tensor of a verified job that its sender did not prove it sent (no valid seal).
    #[error("no valid proof of origin: {0}")]
    Unproven(String),
    /// A class label out of range.
    #[error("label {label} at {index} is not in 0..{classes}")]
    Label {
        /// Flat index.
        index: usize,
        /// The label.
        label: i32,
        /// Number of classes.
        classes: usize,
    },
}

fn dtype_name(t: &HostTensor) -> &'static str {
    match t.data {
        HostData::F32(_) => "f32",
        HostData::I32(_) => "i32",
        HostData::F16(_) => "f16",
        HostData::Bf16(_) => "bf16",
        HostData::Int8 { .. } => "int8",
        HostData::U8(_) => "u8",
    }
}

/// Every value finite and within ±`limit`.
pub fn check_values(data: &[f32], limit: f32) -> Result<(), SanityError> {
    // One branch-free pass for the common case (no early exit, so it vectorises; NaN fails the
    // comparison); the slow search only runs on a failure.
    let ok = data.chunks(64).all(|c| c.iter().fold(true, |ok, x| ok & (x.abs() <= limit)));
    if ok {
        return Ok(());
    }
    for (index, &value) in data.iter().enumerate() {
        if !value.is_finite() {
            return Err(SanityError::NonFinite { index, value });
        }
        if value.abs() > limit {
            return Err(SanityError::Magnitude { index, value, limit });
        }
    }
    Ok(())
}

/// A scalar result (a loss) is finite and within [`MAX_ABS`].
pub fn check_scalar(value: f32) -> Result<(), SanityError> {
    check_values(&[value], MAX_ABS)
}

/// A float tensor of `shape` (`None` entries match any size > 0) with sane values.
pub fn check_f32(t: &HostTensor, shape: &[Option<usize>]) -> Result<(), SanityError> {
    let Some(values) = t.as_f32() else {
        return Err(SanityError::Dtype { expected: "f32", got: dtype_name(t) });
    };
    let fits = t.shape.len() == shape.len()
        && t.shape.iter().zip(shape).all(|(&got, want)| got > 0 && want.is_none_or(|w| w == got))
        && t.is_consistent();
    if !fits {
        let dims: Vec<String> = shape.iter().map(|d| d.map_or("batch".to_string(), |d| d.to_string())).collect();
        return Err(SanityError::Shape { expected: format!("f32 [{}]", dims.join(", ")), got: t.shape.clone() });
    }
    check_values(values, MAX_ABS)
}

/// Raw pixel bytes of `shape` (`None` entries match any size > 0); bytes need no value check.
pub fn check_u8(t: &HostTensor, shape: &[Option<usize>]) -> Result<(), SanityError> {
    if !matches!(t.data, HostData::U8(_)) {
        return Err(SanityError::Dtype { expected: "u8", got: dtype_name(t) });
    }
    let fits = t.shape.len() == shape.len()
        && t.shape.iter().zip(shape).all(|(&got, want)| got > 0 && want.is_none_or(|w| w == got))
        && t.is_consistent();
    if !fits {
        let dims: Vec<String> = shape.iter().map(|d| d.map_or("batch".to_string(), |d| d.to_string())).collect();
        return Err(SanityError::Shape { expected: format!("u8 [{}]", dims.join(", ")), got: t.shape.clone() });
    }
    Ok(())
}

/// Integer labels of shape `[rows]`, each in `0..classes`.
pub fn check_labels(t: &HostTensor, classes: usize) -> Result<(), SanityError> {
    let HostData::I32(labels) = &t.data else {
        return Err(SanityError::Dtype { expected: "i32", got: dtype_name(t) });
    };
    if t.shape.len() != 1 || t.shape[0] == 0 || !t.is_consistent() {
        return Err(SanityError::Shape { expected: "i32 [batch]".into(), got: t.shape.clone() });
    }
    match labels.iter().enumerate().find(|(_, l)| **l < 0 || **l as usize >= classes) {
        Some((index, &label)) => Err(SanityError::Label { index, label, classes }),
        None => Ok(()),
    }
}

/// Who sent a tensor a VNode refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// Another VNode (its output, or its gradient for a backward message).
    VNode(u32),
    /// Job data fed by the orchestrator.
    Data,
}

impl std::fmt::Display for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sender::VNode(v) => write!(f, "vnode {v}"),
            Sender::Data => write!(f, "the job's data feed"),
        }
    }
}

/// A tensor refused by the cheap checks, naming who sent it.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("vnode {to} refused the {what} of micro-batch {mb} from {from}: {error}")]
pub struct Rejection {
    /// The receiving VNode.
    pub to: u32,
    /// Micro-batch.
    pub mb: u64,
    /// The sender.
    pub from: Sender,
    /// "activation", "gradient", "labels", "features".
    pub what: &'static str,
    /// What is wrong.
    pub error: SanityError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_bad_element() {
        assert_eq!(check_values(&[0.0, 1.0, -2.5], MAX_ABS), Ok(()));
        assert!(matches!(check_values(&[0.0, f32::NAN], MAX_ABS), Err(SanityError::NonFinite { index: 1, .. })));
        assert!(matches!(
            check_values(&[f32::NEG_INFINITY], MAX_ABS),
            Err(SanityError::NonFinite { index: 0, value }) if value == f32::NEG_INFINITY
        ));
        assert!(matches!(check_values(&[1.0, 3.0e6], MAX_ABS), Err(SanityError::Magnitude { index: 1, .. })));
        assert!(check_scalar(f32::NAN).is_err());
    }

    #[test]
    fn shapes_dtypes_and_labels() {
        let t = HostTensor::f32(vec![2, 3], vec![0.0; 6]);
        assert_eq!(check_f32(&t, &[None, Some(3)]), Ok(()));
        assert!(matches!(check_f32(&t, &[None, Some(4)]), Err(SanityError::Shape { .. })));
        assert!(matches!(check_f32(&t, &[Some(2)]), Err(SanityError::Shape { .. })));
        let ragged = HostTensor::f32(vec![2, 3], vec![0.0; 5]);
        assert!(matches!(check_f32(&ragged, &[None, Some(3)]), Err(SanityError::Shape { .. })));
        let labels = HostTensor::i32(vec![3], vec![0, 9, 10]);
        assert!(matches!(check_f32(&labels, &[None]), Err(SanityError::Dtype { expected: "f32", .. })));
        assert_eq!(check_labels(&labels, 10), Err(SanityError::Label { index: 2, label: 10, classes: 10 }));
        assert_eq!(check_labels(&HostTensor::i32(vec![2], vec![0, 9]), 10), Ok(()));
    }
}
