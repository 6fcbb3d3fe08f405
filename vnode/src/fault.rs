//! Fault injection, a testing aid: `pnode --fault KIND[:RATE]` makes this PNode misbehave the
//! way a broken or dishonest volunteer would, so the trust layer can be tested against real
//! processes. Faults apply to what this PNode's VNodes send (activations, gradients, loss values
//! and the output hashes in their `Done` reports), never to what they compute or keep.
//!
//! Whether micro-batch *m* of VNode *v* is hit is decided by a ChaCha20 stream keyed by
//! SHA-256 of (`--fault-seed`, job, *v*, *m*, phase), so a run with the same seed misbehaves in
//! exactly the same places whatever the timing.

use crate::{HostData, HostTensor, Outbound, Phase};
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use std::str::FromStr;
use std::time::Duration;

/// How the PNode misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Adds uniform noise in [-1, 1) to every value sent.
    Corrupt,
    /// Negates the gradients sent (activations stay honest).
    SignFlip,
    /// Multiplies every value sent by 100.
    Scale,
    /// Sends NaN in place of the first value.
    Nan,
    /// Sends zeros in place of the result (as a node that skipped the work would).
    Lazy,
    /// Delays every message by `--fault-delay-ms` (results stay honest).
    Slow,
}

impl FaultKind {
    /// Name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Corrupt => "corrupt",
            FaultKind::SignFlip => "sign-flip",
            FaultKind::Scale => "scale",
            FaultKind::Nan => "nan",
            FaultKind::Lazy => "lazy",
            FaultKind::Slow => "slow",
        }
    }

    /// Whether the fault changes results (every kind but `slow`).
    pub fn alters_results(self) -> bool {
        self != FaultKind::Slow
    }
}

/// A fault and the fraction of (VNode, micro-batch) executions it hits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultSpec {
    /// What goes wrong.
    pub kind: FaultKind,
    /// Probability in (0, 1] that an execution is hit.
    pub rate: f64,
}

impl FromStr for FaultSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<FaultSpec, String> {
        let (name, rate) = match s.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (s, None),
        };
        let kind = match name {
            "corrupt" => FaultKind::Corrupt,
            "sign-flip" => FaultKind::SignFlip,
            "scale" => FaultKind::Scale,
            "nan" => FaultKind::Nan,
            "lazy" => FaultKind::Lazy,
            "slow" => FaultKind::Slow,
            other => {
                return Err(format!("unknown fault `{other}`; expected corrupt, sign-flip, scale, nan, lazy or slow"));
            }
        };
        let rate = match rate {
            None => 1.0,
            Some(r) => r.parse::<f64>().map_err(|_| format!("fault rate `{r}` is not a number"))?,
        };
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(format!("fault rate {rate} must be in (0, 1]"));
        }
        Ok(FaultSpec { kind, rate })
    }
}

/// Applies one fault to outbound messages.
#[derive(Debug, Clone)]
pub struct Injector {
    spec: FaultSpec,
    seed: u64,
    delay: Duration,
    conceal: bool,
}

impl Injector {
    /// An injector for `spec`, deterministic given `seed`; `delay` is used by `slow`.
    pub fn new(spec: FaultSpec, seed: u64, delay: Duration) -> Injector {
        Injector { spec, seed, delay, conceal: false }
    }

    /// The same fault, covering its tracks: `Done` reports keep the hash of the honest result,
    /// so only what the PNode signed for the tensors it sent can show who cheated.
    pub fn concealing(mut self) -> Injector {
        self.conceal = true;
        self
    }

    /// The fault.
    pub fn spec(&self) -> FaultSpec {
        self.spec
    }

    fn stream(&self, job: &str, vnode: u32, mb: u64, phase: Phase) -> ChaCha20Rng {
        let mut h = Sha256::new();
        h.update(b"dcnr-fault-v1\0");
        h.update(self.seed.to_le_bytes());
        h.update((job.len() as u32).to_le_bytes());
        h.update(job.as_bytes());
        h.update(vnode.to_le_bytes());
        h.update(mb.to_le_bytes());
        h.update([match phase {
            Phase::Train => 0u8,
            Phase::Eval => 1,
            Phase::Infer => 2,
        }]);
        ChaCha20Rng::from_seed(h.finalize().into())
    }

    /// Whether the execution (job, vnode, mb, phase) misbehaves; with the stream for its noise.
    fn hit(&self, job: &str, vnode: u32, mb: u64, phase: Phase) -> Option<ChaCha20Rng> {
        let mut rng = self.stream(job, vnode, mb, phase);
        let draw = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (draw < self.spec.rate).then_some(rng)
    }

    /// Rewrites `out`, an output of VNode `from` of `job`, as the fault dictates.
    pub fn apply(&self, job: &str, from: u32, mut out: Outbound) -> Outbound {
        let kind = self.spec.kind;
        match &mut out {
            Outbound::Forward { mb, phase, tensor, .. } => {
                if let Some(mut rng) = self.hit(job, from, *mb, *phase) {
                    self.distort(kind, false, tensor, &mut rng);
                }
            }
            Outbound::Backward { mb, tensor, .. } => {
                if let Some(mut rng) = self.hit(job, from, *mb, Phase::Train) {
                    self.distort(kind, true, tensor, &mut rng);
                }
            }
            Outbound::Loss { mb, phase, loss, .. } => {
                if let Some(mut rng) = self.hit(job, from, *mb, *phase) {
                    *loss = match kind {
                        FaultKind::Corrupt => *loss + noise(&mut rng),
                        FaultKind::Scale => *loss * 100.0,
                        FaultKind::Nan => f32::NAN,
                        FaultKind::Lazy => 0.0,
                        FaultKind::SignFlip | FaultKind::Slow => *loss,
                    };
                }
            }
            Outbound::Predictions { mb, probabilities } => {
                if let Some(mut rng) = self.hit(job, from, *mb, Phase::Infer) {
                    self.distort(kind, false, probabilities, &mut rng);
                }
            }
            Outbound::Sync { mb, tensor, .. } => {
                // A cheating copy spoils its share of the average; the copies' end states then
                // disagree, which the job checks.
                if let Some(mut rng) = self.hit(job, from, *mb, Phase::Train) {
                    self.distort(kind, true, tensor, &mut rng);
                }
            }
            Outbound::Done { mb, output_sha256, .. } => {
                // The hash describes what was sent: a node that sent something else cannot report
                // the honest hash without doing the honest work.
                if kind.alters_results() && !self.conceal && self.hit(job, from, *mb, Phase::Train).is_some() {
                    let mut h = Sha256::new();
                    h.update(*output_sha256);
                    h.update(kind.name().as_bytes());
                    *output_sha256 = h.finalize().into();
                }
            }
        }
        out
    }

    fn distort(&self, kind: FaultKind, gradient: bool, t: &mut HostTensor, rng: &mut ChaCha20Rng) {
        let HostData::F32(v) = &mut t.data else { return };
        match kind {
            FaultKind::Corrupt => v.iter_mut().for_each(|x| *x += noise(rng)),
            FaultKind::SignFlip if gradient => v.iter_mut().for_each(|x| *x = -*x),
            FaultKind::SignFlip => {}
            FaultKind::Scale => v.iter_mut().for_each(|x| *x *= 100.0),
            FaultKind::Nan => {
                if let Some(x) = v.first_mut() {
                    *x = f32::NAN;
                }
            }
            FaultKind::Lazy => v.iter_mut().for_each(|x| *x = 0.0),
            // The VNode actor's own thread sleeps: this node is simply slow to answer.
            FaultKind::Slow => std::thread::sleep(self.delay),
        }
    }
}

fn noise(rng: &mut ChaCha20Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(mb: u64) -> Outbound {
        Outbound::Forward { to: 1, port: 0, mb, phase: Phase::Train, tensor: HostTensor::f32(vec![1, 3], vec![1.0; 3]) }
    }

    fn values(o: &Outbound) -> Vec<f32> {
        match o {
            Outbound::Forward { tensor, .. } | Outbound::Backward { tensor, .. } => tensor.as_f32().unwrap().to_vec(),
            _ => vec![],
        }
    }

    #[test]
    fn specs_parse_with_clear_errors() {
        assert_eq!("nan".parse::<FaultSpec>(), Ok(FaultSpec { kind: FaultKind::Nan, rate: 1.0 }));
        assert_eq!("sign-flip:0.25".parse::<FaultSpec>(), Ok(FaultSpec { kind: FaultKind::SignFlip, rate: 0.25 }));
        assert!("boom".parse::<FaultSpec>().unwrap_err().contains("unknown fault `boom`"));
        assert!("nan:2".parse::<FaultSpec>().unwrap_err().contains("(0, 1]"));
        assert!("nan:x".parse::<FaultSpec>().unwrap_err().contains("not a number"));
    }

    #[test]
    fn each_kind_distorts_as_documented() {
        let at = |k, o| Injector::new(FaultSpec { kind: k, rate: 1.0 }, 1, Duration::ZERO).apply("j", 0, o);
        assert!(values(&at(FaultKind::Nan, fwd(0)))[0].is_nan());
        assert_eq!(values(&at(FaultKind::Scale, fwd(0))), vec![100.0; 3]);
        assert_eq!(values(&at(FaultKind::Lazy, fwd(0))), vec![0.0; 3]);
        assert_eq!(values(&at(FaultKind::SignFlip, fwd(0))), vec![1.0; 3], "activations stay honest");
        let grad = Outbound::Backward { to: 0, from: (1, 0), mb: 0, tensor: HostTensor::f32(vec![1, 2], vec![2.0; 2]) };
        assert_eq!(values(&at(FaultKind::SignFlip, grad)), vec![-2.0; 2]);
        let noisy = values(&at(FaultKind::Corrupt, fwd(0)));
        assert!(noisy.iter().all(|x| (0.0..2.0).contains(x)) && noisy != vec![1.0; 3]);
        assert_eq!(values(&at(FaultKind::Slow, fwd(0))), vec![1.0; 3]);
    }

    #[test]
    fn a_concealing_fault_reports_the_honest_hash() {
        let done = || Outbound::Done {
            mb: 0,
            compute_us: 0,
            cpu_us: 0,
            bytes_in: 0,
            bytes_out: 0,
            output_sha256: [7; 32],
            round_sha256: None,
        };
        let hash = |o: Outbound| match o {
            Outbound::Done { output_sha256, .. } => output_sha256,
            _ => unreachable!(),
        };
        let plain = Injector::new(FaultSpec { kind: FaultKind::Corrupt, rate: 1.0 }, 1, Duration::ZERO);
        assert_ne!(hash(plain.clone().apply("j", 0, done())), [7; 32]);
        assert_eq!(hash(plain.concealing().apply("j", 0, done())), [7; 32]);
    }

    #[test]
    fn hits_are_deterministic_and_follow_the_rate() {
        let inj = Injector::new(FaultSpec { kind: FaultKind::Lazy, rate: 0.3 }, 9, Duration::ZERO);
        let hits: Vec<bool> = (0..1000).map(|mb| values(&inj.apply("j", 2, fwd(mb)))[0] == 0.0).collect();
        let again: Vec<bool> = (0..1000).map(|mb| values(&inj.apply("j", 2, fwd(mb)))[0] == 0.0).collect();
        assert_eq!(hits, again);
        let n = hits.iter().filter(|h| **h).count();
        assert!((220..380).contains(&n), "{n} hits of 1000 at rate 0.3");
        let other = Injector::new(FaultSpec { kind: FaultKind::Lazy, rate: 0.3 }, 10, Duration::ZERO);
        let differ = (0..1000).filter(|&mb| (values(&other.apply("j", 2, fwd(mb)))[0] == 0.0) != hits[mb as usize]);
        assert!(differ.count() > 100, "another seed hits elsewhere");
    }
}
