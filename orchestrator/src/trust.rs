//! Reputation and quarantine, as plain data fed with outcomes (no IO, no clock).
//!
//! In the spirit of BOINC's adaptive replication, an identity is *new* until it has returned
//! `earn_after` consecutive valid results; only then is it *reliable* and checked less often.
//! One invalid result resets the run to zero and counts a strike; `forgive_after` consecutive
//! valid results forgive one strike; `quarantine_after` unforgiven strikes quarantine the
//! identity for good: it gets no work and cannot register again. A PNode presenting the
//! trusted-mode token is *trusted* (reduced validation) but is quarantined like anyone else
//! when it misbehaves: trust is a performance hint, never a correctness requirement.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Thresholds of the reputation rules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrustPolicy {
    /// Consecutive valid results before a new identity becomes reliable.
    pub earn_after: u64,
    /// Unforgiven invalid results that quarantine an identity.
    pub quarantine_after: u32,
    /// Consecutive valid results that forgive one strike.
    pub forgive_after: u64,
    /// Weight of each new result in the error-rate average.
    pub rate_weight: f64,
}

impl Default for TrustPolicy {
    fn default() -> Self {
        TrustPolicy { earn_after: 100, quarantine_after: 3, forgive_after: 100, rate_weight: 0.05 }
    }
}

/// The result of checking one execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It matched the quorum or a verified recomputation.
    Valid,
    /// It failed the cheap checks or disagreed with the quorum; the reason is kept.
    Invalid(String),
}

/// How much an identity is trusted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// Has not earned trust (yet, or since its last invalid result).
    New,
    /// Returned many consecutive valid results.
    Reliable,
    /// Presented the orchestrator's trusted-mode token.
    Trusted,
    /// Misbehaved repeatedly: no work, no re-registration.
    Quarantined,
}

impl Standing {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Standing::New => "new",
            Standing::Reliable => "reliable",
            Standing::Trusted => "trusted",
            Standing::Quarantined => "quarantined",
        }
    }
}

/// What an outcome changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Nothing worth telling.
    None,
    /// The identity just became reliable.
    Earned,
    /// A reliable identity fell back to new.
    Lost,
    /// The identity was quarantined just now, for this reason.
    Quarantined(String),
}

/// The record of one identity.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    /// Valid results since the last invalid one.
    pub consecutive_valid: u64,
    /// Valid results in all.
    pub valid: u64,
    /// Invalid results in all.
    pub invalid: u64,
    /// Invalid results not yet forgiven.
    pub strikes: u32,
    /// Exponential average of invalid results, in [0, 1].
    pub error_rate: f64,
    /// Presented the trusted-mode token at its last registration.
    pub token_trusted: bool,
    /// Why it was quarantined, once it is.
    pub quarantined: Option<String>,
    /// The most recent invalid result's reason.
    pub last_invalid: Option<String>,
}

impl Reputation {
    /// The join of two orchestrators' records of one identity: a quarantine in either holds;
    /// counts are the larger of the two (each is a lower bound of what the identity did, and
    /// merging again changes nothing); the run of valid results is the shorter. Commutative,
    /// associative and idempotent, so books merged in any order and any number of times agree.
    pub fn join(&self, other: &Reputation) -> Reputation {
        Reputation {
            consecutive_valid: self.consecutive_valid.min(other.consecutive_valid),
            valid: self.valid.max(other.valid),
            invalid: self.invalid.max(other.invalid),
            strikes: self.strikes.max(other.strikes),
            error_rate: self.error_rate.max(other.error_rate),
            token_trusted: self.token_trusted && other.token_trusted,
            // The smaller reason, so the choice does not depend on the order of merging.
            quarantined: match (&self.quarantined, &other.quarantined) {
                (Some(a), Some(b)) => Some(a.min(b).clone()),
                (a, b) => a.clone().or_else(|| b.clone()),
            },
            last_invalid: match (&self.last_invalid, &other.last_invalid) {
                (Some(a), Some(b)) => Some(a.min(b).clone()),
                (a, b) => a.clone().or_else(|| b.clone()),
            },
        }
    }

    /// Standing under `policy`.
    pub fn standing(&self, policy: &TrustPolicy) -> Standing {
        if self.quarantined.is_some() {
            Standing::Quarantined
        } else if self.token_trusted {
            Standing::Trusted
        } else if self.consecutive_valid >= policy.earn_after {
            Standing::Reliable
        } else {
            Standing::New
        }
    }

    /// 1 − error rate, in [0, 1].
    pub fn score(&self) -> f64 {
        (1.0 - self.error_rate).clamp(0.0, 1.0)
    }

    /// Applies one outcome. A quarantined identity stays quarantined whatever follows.
    pub fn record(&mut self, outcome: &Outcome, policy: &TrustPolicy) -> Transition {
        let before = self.standing(policy);
        let w = policy.rate_weight.clamp(0.0, 1.0);
        match outcome {
            Outcome::Valid => {
                self.valid += 1;
                self.consecutive_valid += 1;
                self.error_rate *= 1.0 - w;
                if policy.forgive_after > 0 && self.consecutive_valid.is_multiple_of(policy.forgive_after) {
                    self.strikes = self.strikes.saturating_sub(1);
                }
            }
            Outcome::Invalid(reason) => {
                self.invalid += 1;
                self.consecutive_valid = 0;
                self.error_rate = self.error_rate * (1.0 - w) + w;
                self.strikes = self.strikes.saturating_add(1);
                self.last_invalid = Some(reason.clone());
                if self.quarantined.is_none() && self.strikes >= policy.quarantine_after.max(1) {
                    let why =
                        format!("{} invalid result(s) without enough valid ones between; last: {reason}", self.strikes);
                    self.quarantined = Some(why.clone());
                    return Transition::Quarantined(why);
                }
            }
        }
        match (before, self.standing(policy)) {
            (Standing::New, Standing::Reliable) => Transition::Earned,
            (Standing::Reliable, Standing::New) => Transition::Lost,
            _ => Transition::None,
        }
    }
}

/// Every identity's reputation, kept for as long as the orchestrator runs, including after a
/// PNode leaves (so leaving and coming back wipes nothing).
#[derive(Debug, Clone, Default)]
pub struct TrustBook {
    policy: TrustPolicy,
    by_id: BTreeMap<String, Reputation>,
}

impl TrustBook {
    /// An empty book.
    pub fn new(policy: TrustPolicy) -> TrustBook {
        TrustBook { policy, by_id: BTreeMap::new() }
    }

    /// The rules in force.
    pub fn policy(&self) -> &TrustPolicy {
        &self.policy
    }

    /// Admits an identity at registration, noting whether it presented the token; a
    /// quarantined identity is refused with the reason.
    pub fn admit(&mut self, id: &str, token_trusted: bool) -> Result<Standing, String> {
        let rep = self.by_id.entry(id.to_string()).or_default();
        if let Some(why) = &rep.quarantined {
            return Err(why.clone());
        }
        rep.token_trusted = token_trusted;
        Ok(rep.standing(&self.policy))
    }

    /// Records an outcome of `id`'s work.
    pub fn record(&mut self, id: &str, outcome: &Outcome) -> Transition {
        let policy = self.policy;
        self.by_id.entry(id.to_string()).or_default().record(outcome, &policy)
    }

    /// Every identity's record, to be saved.
    pub fn reputations(&self) -> &BTreeMap<String, Reputation> {
        &self.by_id
    }

    /// The same book with saved records (a restart): quarantines and earned trust carry over.
    pub fn with_reputations(mut self, saved: BTreeMap<String, Reputation>) -> TrustBook {
        self.by_id = saved;
        self
    }

    /// Joins another orchestrator's records into this book ([`Reputation::join`]); returns the
    /// identities whose record changed.
    pub fn absorb(&mut self, other: &BTreeMap<String, Reputation>) -> Vec<String> {
        let mut changed = Vec::new();
        for (id, theirs) in other {
            let merged = match self.by_id.get(id) {
                Some(ours) => ours.join(theirs),
                None => theirs.clone(),
            };
            if self.by_id.get(id) != Some(&merged) {
                self.by_id.insert(id.clone(), merged);
                changed.push(id.clone());
            }
        }
        changed
    }

    /// Forgets `id` if its record holds nothing worth keeping: never quarantined, never caught
    /// with an invalid result, and no earned trust. A throwaway identity that registered and
    /// vanished then costs nothing forever; one that misbehaved or earned standing is kept.
    /// True if it was forgotten.
    pub fn forget_if_blank(&mut self, id: &str) -> bool {
        let blank = self.by_id.get(id).is_some_and(|r| {
            r.quarantined.is_none() && r.invalid == 0 && r.strikes == 0 && r.standing(&self.policy) == Standing::New
        });
        if blank {
            self.by_id.remove(id);
        }
        blank
    }

    /// The record of `id`, if it was ever seen.
    pub fn get(&self, id: &str) -> Option<&Reputation> {
        self.by_id.get(id)
    }

    /// Standing of `id` (an unknown identity is new).
    pub fn standing(&self, id: &str) -> Standing {
        self.by_id.get(id).map_or(Standing::New, |r| r.standing(&self.policy))
    }

    /// Whether `id` may be given work.
    pub fn placeable(&self, id: &str) -> bool {
        self.standing(id) != Standing::Quarantined
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_reputation() -> impl Strategy<Value = Reputation> {
        (
            (0u64..5, 0u64..5, 0u64..5, 0u32..4),
            (0.0f64..1.0, any::<bool>()),
            (proptest::option::of("[ab]"), proptest::option::of("[xy]")),
        )
            .prop_map(|((c, v, i, s), (e, t), (q, l))| Reputation {
                consecutive_valid: c,
                valid: v,
                invalid: i,
                strikes: s,
                error_rate: e,
                token_trusted: t,
                quarantined: q,
                last_invalid: l,
            })
    }

    proptest! {
        #[test]
        fn joining_books_is_order_free_and_keeps_every_quarantine(
            a in any_reputation(), b in any_reputation(), c in any_reputation()
        ) {
            prop_assert_eq!(a.join(&b), b.join(&a));
            prop_assert_eq!(a.join(&b).join(&c), a.join(&b.join(&c)));
            prop_assert_eq!(a.join(&a), a.clone());
            prop_assert_eq!(a.join(&b).quarantined.is_some(), a.quarantined.is_some() || b.quarantined.is_some());
        }
    }

    #[test]
    fn a_quarantine_absorbed_from_another_book_holds_here() {
        let mut here = TrustBook::new(TrustPolicy::default());
        assert!(here.admit("pn-1", false).is_ok());
        let mut there = BTreeMap::new();
        there.insert("pn-1".to_string(), Reputation { quarantined: Some("3 strikes".into()), ..Reputation::default() });
        assert_eq!(here.absorb(&there), vec!["pn-1".to_string()]);
        assert!(here.admit("pn-1", false).is_err());
        assert!(!here.placeable("pn-1"));
        assert!(here.absorb(&there).is_empty(), "absorbing twice changes nothing");
    }

    fn bad() -> Outcome {
        Outcome::Invalid("NaN".into())
    }

    #[test]
    fn trust_is_earned_slowly_and_lost_at_once() {
        let p = TrustPolicy { earn_after: 5, quarantine_after: 3, forgive_after: 5, rate_weight: 0.1 };
        let mut r = Reputation::default();
        for i in 1..5 {
            assert_eq!(r.record(&Outcome::Valid, &p), Transition::None, "after {i}");
        }
        assert_eq!(r.record(&Outcome::Valid, &p), Transition::Earned);
        assert_eq!(r.standing(&p), Standing::Reliable);
        assert_eq!(r.record(&bad(), &p), Transition::Lost);
        assert_eq!((r.standing(&p), r.consecutive_valid, r.strikes), (Standing::New, 0, 1));
        assert!(r.score() < 1.0);
    }

    #[test]
    fn repeated_misses_quarantine_for_good_and_block_admission() {
        let p = TrustPolicy { earn_after: 5, quarantine_after: 2, forgive_after: 3, rate_weight: 0.1 };
        let mut book = TrustBook::new(p);
        assert_eq!(book.admit("a", true), Ok(Standing::Trusted));
        book.record("a", &bad());
        // Three valid results forgive the strike, so the next miss is only the first again.
        for _ in 0..3 {
            book.record("a", &Outcome::Valid);
        }
        assert_eq!(book.get("a").unwrap().strikes, 0);
        assert_eq!(book.record("a", &bad()), Transition::None);
        let t = book.record("a", &bad());
        assert!(matches!(&t, Transition::Quarantined(why) if why.contains("NaN")), "{t:?}");
        assert!(!book.placeable("a"));
        for _ in 0..100 {
            book.record("a", &Outcome::Valid);
        }
        assert_eq!(book.standing("a"), Standing::Quarantined, "quarantine is absorbing");
        assert!(book.admit("a", true).unwrap_err().contains("invalid result"));
        assert!(book.placeable("b") && book.admit("b", false) == Ok(Standing::New));
    }

    proptest! {
        #[test]
        fn standing_follows_the_rules(
            outcomes in proptest::collection::vec(any::<bool>(), 0..300),
            earn in 1u64..20, q in 1u32..6, forgive in 1u64..20, token in any::<bool>(),
        ) {
            let p = TrustPolicy { earn_after: earn, quarantine_after: q, forgive_after: forgive, rate_weight: 0.05 };
            let mut r = Reputation { token_trusted: token, ..Reputation::default() };
            let mut quarantined_at = None;
            for (i, ok) in outcomes.iter().enumerate() {
                let t = r.record(&if *ok { Outcome::Valid } else { bad() }, &p);
                if matches!(t, Transition::Quarantined(_)) {
                    prop_assert!(quarantined_at.is_none(), "quarantined twice");
                    quarantined_at = Some(i);
                }
                prop_assert!((0.0..=1.0).contains(&r.score()));
            }
            let invalid = outcomes.iter().filter(|o| !**o).count() as u32;
            prop_assert_eq!(r.invalid as u32, invalid);
            prop_assert_eq!(r.valid as usize, outcomes.len() - invalid as usize);
            // Fewer misses than the threshold can never quarantine.
            if invalid < q { prop_assert!(quarantined_at.is_none()); }
            // A run of misses as long as the threshold always does.
            if outcomes.windows(q as usize).any(|w| w.iter().all(|o| !*o)) { prop_assert!(quarantined_at.is_some()); }
            let tail = outcomes.iter().rev().take_while(|o| **o).count() as u64;
            prop_assert_eq!(r.consecutive_valid, tail);
            let expected = if quarantined_at.is_some() { Standing::Quarantined }
                else if token { Standing::Trusted }
                else if tail >= earn { Standing::Reliable }
                else { Standing::New };
            prop_assert_eq!(r.standing(&p), expected);
        }
    }
}
