//! Waves and the automatic pause, pure: from a release's wave plan, where its rollout stands,
//! the boxes' report counts and the time, the next state and the percentage each group gets.
//!
//! A rollout walks through stages: for each group in the plan's order (then everybody else),
//! each wave percentage in turn. A stage advances only when it has soaked for `soak_secs`
//! *and* at least `min_successes` boxes confirmed the release since it began. Failures pause
//! it (for everyone not yet on it): `max_failures` of them among the first `min_sample` boxes
//! that finished, or, from then on, a rate above `max_failure_rate`. A paused or withdrawn
//! rollout never advances; only the operator resumes it.

use serde::{Deserialize, Serialize};

/// How a release rolls out; chosen by the operator (`release --waves ...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Percentages of each group's boxes, increasing, the last 100 (e.g. 1, 5, 25, 100).
    pub waves: Vec<u8>,
    /// Groups (zones) in the order they update, one after the other; boxes of any other group
    /// come last. Empty: all boxes together.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Least time a stage runs before the next one starts.
    pub soak_secs: u64,
    /// Least number of boxes that confirmed the release during a stage before the next starts.
    pub min_successes: u32,
    /// Before `min_sample` boxes finished: pause once this many failed (0: never early).
    pub max_failures: u32,
    /// From `min_sample` finished boxes on: pause once more than this fraction failed.
    pub max_failure_rate: f64,
    /// How many boxes must finish (confirm or fail) before the rate is trusted.
    pub min_sample: u32,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            waves: vec![1, 5, 25, 100],
            groups: Vec::new(),
            soak_secs: 3600,
            min_successes: 1,
            max_failures: 3,
            max_failure_rate: 0.05,
            min_sample: 20,
        }
    }
}

impl Policy {
    /// Refuses a plan the rollout could not follow.
    pub fn validate(&self) -> Result<(), String> {
        if self.waves.is_empty() || self.waves.last() != Some(&100) {
            return Err("waves must end at 100".into());
        }
        if self.waves.windows(2).any(|w| w[0] >= w[1]) || self.waves[0] == 0 {
            return Err("waves must increase from above 0".into());
        }
        if !(0.0..=1.0).contains(&self.max_failure_rate) {
            return Err("max failure rate is a fraction (0-1)".into());
        }
        Ok(())
    }

    /// How many stages: each wave of each listed group, then of everybody else.
    pub fn stages(&self) -> usize {
        (self.groups.len() + 1) * self.waves.len()
    }

    /// Stage `i`'s group (None: every box in no listed group) and wave percentage.
    pub fn stage(&self, i: usize) -> (Option<&str>, u8) {
        let n = self.waves.len().max(1);
        let group = self.groups.get(i / n).map(String::as_str);
        (group, self.waves.get(i % n).copied().unwrap_or(0))
    }
}

/// Where a rollout stands (kept in the fleet database).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Index into the stages (group-major, then wave).
    pub stage: usize,
    /// When this stage began (Unix seconds); successes count from here.
    pub since: u64,
    /// Failures count from here (the rollout's start, or the last resume).
    pub failures_since: u64,
    /// Why it is paused, if it is.
    pub paused: Option<String>,
    /// Withdrawn by the operator: offered to nobody new, for good.
    pub withdrawn: bool,
}

impl Progress {
    /// A rollout starting now at its first stage.
    pub fn start(now: u64) -> Progress {
        Progress {
            stage: 0,
            since: now,
            failures_since: now,
            paused: None,
            withdrawn: false,
        }
    }
}

/// Distinct boxes that reported on the release (never a forged report: those are refused
/// before they are stored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Boxes that confirmed it since the stage began.
    pub stage_successes: u32,
    /// Boxes that confirmed it since `failures_since`.
    pub successes: u32,
    /// Boxes it failed on since `failures_since`.
    pub failures: u32,
}

/// The pause rule alone: why the counts stop the rollout, if they do. Before `min_sample`
/// boxes finished, `max_failures` failures pause it (e.g. 3 of the first 20); from then on,
/// a failure rate above `max_failure_rate` does (so a small background failure rate in a
/// large fleet does not stop a good release).
pub fn pause_reason(p: &Policy, c: &Counts) -> Option<String> {
    let finished = c.successes + c.failures;
    let sample = p.min_sample.max(1);
    if finished < sample {
        return (p.max_failures > 0 && c.failures >= p.max_failures).then(|| {
            format!(
                "{} boxes failed of the first {finished} (limit {} before {sample})",
                c.failures, p.max_failures
            )
        });
    }
    let rate = f64::from(c.failures) / f64::from(finished);
    (rate > p.max_failure_rate).then(|| {
        format!(
            "{} of {finished} boxes failed ({:.1}% > {:.1}%)",
            c.failures,
            rate * 100.0,
            p.max_failure_rate * 100.0
        )
    })
}

/// The next state of a rollout: paused by the counts, or advanced one stage when the current
/// one soaked long enough with enough successes, or unchanged.
pub fn step(p: &Policy, cur: &Progress, c: &Counts, now: u64) -> Progress {
    if cur.withdrawn || cur.paused.is_some() {
        return cur.clone();
    }
    if let Some(reason) = pause_reason(p, c) {
        return Progress {
            paused: Some(reason),
            ..cur.clone()
        };
    }
    let last = p.stages().saturating_sub(1);
    let soaked = now.saturating_sub(cur.since) >= p.soak_secs;
    if cur.stage < last && soaked && c.stage_successes >= p.min_successes {
        return Progress {
            stage: cur.stage + 1,
            since: now,
            ..cur.clone()
        };
    }
    cur.clone()
}

/// The percentage of `group`'s boxes offered the release at `cur`: 100 for groups before the
/// current one, the current wave for it, 0 after; 0 for everyone while withdrawn.
pub fn rollout_for(p: &Policy, cur: &Progress, group: Option<&str>) -> u8 {
    if cur.withdrawn || p.waves.is_empty() {
        return 0;
    }
    let n = p.waves.len();
    let (current, wave) = (cur.stage / n, cur.stage % n);
    let mine = group
        .and_then(|g| p.groups.iter().position(|x| x == g))
        .unwrap_or(p.groups.len());
    match mine.cmp(&current) {
        std::cmp::Ordering::Less => 100,
        std::cmp::Ordering::Equal => p.waves[wave],
        std::cmp::Ordering::Greater => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> Policy {
        Policy {
            soak_secs: 100,
            min_successes: 2,
            ..Policy::default()
        }
    }

    fn counts(stage_successes: u32, successes: u32, failures: u32) -> Counts {
        Counts {
            stage_successes,
            successes,
            failures,
        }
    }

    #[test]
    fn a_stage_advances_only_after_soak_and_enough_successes() {
        let p = policy();
        let s = Progress::start(1000);
        assert_eq!(rollout_for(&p, &s, None), 1);
        assert_eq!(step(&p, &s, &counts(50, 50, 0), 1099), s, "not soaked");
        assert_eq!(step(&p, &s, &counts(1, 1, 0), 5000), s, "too few");
        let next = step(&p, &s, &counts(2, 2, 0), 1100);
        assert_eq!((next.stage, next.since), (1, 1100));
        assert_eq!(rollout_for(&p, &next, None), 5);
        let mut at = next;
        for _ in 0..10 {
            at = step(&p, &at, &counts(2, 2, 0), at.since + 100);
        }
        assert_eq!(at.stage, 3, "stops at the last stage");
        assert_eq!(rollout_for(&p, &at, Some("anything")), 100);
    }

    #[test]
    fn failures_pause_by_count_and_by_rate_with_a_minimum_sample() {
        let p = policy();
        let s = Progress::start(0);
        let paused = step(&p, &s, &counts(0, 0, 3), 1);
        assert!(paused
            .paused
            .unwrap()
            .contains("3 boxes failed of the first 3"));
        assert_eq!(step(&p, &s, &counts(0, 15, 2), 1), s, "2 of 17: not yet");
        let paused = step(&p, &s, &counts(0, 14, 3), 1).paused.unwrap();
        assert!(
            paused.contains("3 boxes failed of the first 17"),
            "{paused}"
        );
        // Past the sample only the rate counts: 40 failures of 1000 is a background 4%.
        assert_eq!(step(&p, &s, &counts(0, 960, 40), 1), s);
        let p = Policy {
            max_failures: 0,
            ..policy()
        };
        assert_eq!(step(&p, &s, &counts(0, 1, 2), 1), s, "sample too small");
        let paused = step(&p, &s, &counts(0, 18, 2), 1).paused.unwrap();
        assert!(paused.contains("2 of 20 boxes failed"), "{paused}");
        assert_eq!(step(&p, &s, &counts(0, 19, 1), 1), s, "5% is not above 5%");
        let stuck = step(&p, &s, &counts(0, 18, 2), 1000);
        assert_eq!(step(&p, &stuck, &counts(99, 99, 0), 9999), stuck, "stays");
    }

    #[test]
    fn groups_update_one_after_the_other() {
        let p = Policy {
            waves: vec![50, 100],
            groups: vec!["a".into(), "b".into()],
            ..policy()
        };
        let at = |stage| Progress {
            stage,
            ..Progress::start(0)
        };
        let view = |s: usize| {
            [Some("a"), Some("b"), None, Some("zzz")].map(|g| rollout_for(&p, &at(s), g))
        };
        assert_eq!(view(0), [50, 0, 0, 0]);
        assert_eq!(view(1), [100, 0, 0, 0]);
        assert_eq!(view(2), [100, 50, 0, 0]);
        assert_eq!(view(4), [100, 100, 50, 50]);
        assert_eq!(view(5), [100, 100, 100, 100]);
        assert_eq!(p.stages(), 6);
        assert_eq!(
            (p.stage(0), p.stage(3), p.stage(5)),
            ((Some("a"), 50), (Some("b"), 100), (None, 100))
        );
    }

    #[test]
    fn withdrawn_is_offered_to_nobody_and_never_moves() {
        let p = policy();
        let w = Progress {
            withdrawn: true,
            stage: 3,
            ..Progress::start(0)
        };
        assert_eq!(rollout_for(&p, &w, None), 0);
        assert_eq!(step(&p, &w, &counts(9, 9, 0), 9999), w);
    }

    #[test]
    fn bad_plans_are_refused() {
        assert!(policy().validate().is_ok());
        for waves in [vec![], vec![5, 50], vec![50, 5, 100], vec![0, 100]] {
            let p = Policy { waves, ..policy() };
            assert!(p.validate().is_err(), "{:?}", p.waves);
        }
    }

    fn any_policy() -> impl Strategy<Value = Policy> {
        (
            prop::collection::btree_set(1u8..100, 0..4),
            0usize..3,
            0u64..1000,
            0u32..5,
            0u32..5,
            0.0f64..0.5,
            0u32..30,
        )
            .prop_map(|(w, g, soak, min_s, max_f, rate, sample)| {
                let mut waves: Vec<u8> = w.into_iter().collect();
                waves.push(100);
                Policy {
                    waves,
                    groups: (0..g).map(|i| format!("g{i}")).collect(),
                    soak_secs: soak,
                    min_successes: min_s,
                    max_failures: max_f,
                    max_failure_rate: rate,
                    min_sample: sample,
                }
            })
    }

    proptest! {
        /// Whatever the counts: at most one stage per step, never before the soak, never past
        /// the last stage, never while paused; once the sample is reached, more successes
        /// never cause a pause that fewer would not; no group's percentage ever goes down.
        #[test]
        fn steps_are_monotone_and_bounded(
            p in any_policy(),
            stage_frac in 0.0f64..1.0,
            since in 0u64..10_000,
            dt in 0u64..2000,
            (ss, s, f) in (0u32..50, 0u32..50, 0u32..10),
            extra in 0u32..50,
        ) {
            prop_assert!(p.validate().is_ok());
            let stage = ((p.stages() - 1) as f64 * stage_frac) as usize;
            let cur = Progress { stage, ..Progress::start(since) };
            let c = counts(ss.min(s), s, f);
            let next = step(&p, &cur, &c, since + dt);
            prop_assert!(next.stage == cur.stage || next.stage == cur.stage + 1);
            prop_assert!(next.stage < p.stages());
            if next.stage > cur.stage {
                prop_assert!(dt >= p.soak_secs && c.stage_successes >= p.min_successes);
                prop_assert!(next.paused.is_none());
            }
            let paused = Progress { paused: Some("x".into()), ..cur.clone() };
            prop_assert_eq!(step(&p, &paused, &c, since + dt), paused);
            let more = counts(c.stage_successes, s + extra, f);
            if s + f >= p.min_sample.max(1) && pause_reason(&p, &more).is_some() {
                prop_assert!(pause_reason(&p, &c).is_some());
            }
            for g in [None, Some("g0"), Some("g1"), Some("other")] {
                prop_assert!(rollout_for(&p, &next, g) >= rollout_for(&p, &cur, g));
            }
        }
    }
}
