//! What an operator sees of the fleet (`fleet status`, `release`, the dashboard, metrics):
//! each rollout's plan, the stage it is at, whether it is paused and why and since when, how
//! many boxes reported each outcome, and how many enrolled boxes run each version.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use crate::core::version::Version;
use crate::fleet::rollout::Policy;
use crate::fleet::store::{Db, Rollout, VersionCount};

/// Where a rollout stands, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// It moves to its next stage once the current one soaked with enough successes.
    Advancing,
    /// At its last stage: offered to every box.
    Complete,
    /// Offered to nobody new until the operator resumes it (`paused` says why).
    Paused,
    /// Offered to nobody new, for good.
    Withdrawn,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Advancing => "advancing",
            State::Complete => "complete",
            State::Paused => "paused",
            State::Withdrawn => "withdrawn",
        }
    }
}

/// A rollout as `--json` prints it (stable schema, see docs/fleet.md).
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    pub version: String,
    pub policy: Policy,
    pub stage: usize,
    /// The group whose boxes the current stage adds (null: every box not in a listed group).
    pub group: Option<String>,
    /// The current wave's percentage of that group.
    pub percent: u8,
    /// When the current stage began (Unix seconds).
    pub since: u64,
    pub state: State,
    pub paused: Option<String>,
    pub withdrawn: bool,
    /// When the rollout was last written (Unix seconds): for a paused or withdrawn one, when
    /// it was paused or withdrawn (nothing steps it meanwhile).
    pub updated: u64,
    /// Distinct boxes by outcome (all outcomes listed, zeros included; all time).
    pub boxes: BTreeMap<&'static str, u32>,
    /// Failures count from here (the start or the last resume), as the automatic pause
    /// counts them.
    pub counting_since: u64,
    /// Distinct boxes that finished (confirmed or failed) since `counting_since`.
    pub finished: u32,
    /// Distinct boxes it failed on since `counting_since`.
    pub failures: u32,
    /// `failures / finished` (null while none finished).
    pub failure_rate: Option<f64>,
}

/// How many enrolled boxes run one version (by their latest report; see
/// `Outcome::runs_target`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionView {
    /// Null: not reported yet, or the latest report names no version the box runs.
    pub version: Option<String>,
    pub boxes: u32,
    /// The same boxes by enrolled group ("" for boxes in no group).
    pub groups: BTreeMap<String, u32>,
}

/// Everything `fleet status` and the dashboard show.
#[derive(Debug, Clone, Serialize)]
pub struct FleetView {
    pub rollouts: Vec<RolloutView>,
    /// Newest version first; unknown last.
    pub versions: Vec<VersionView>,
    /// FleetLock's stored reboot slots (a slot whose `expires` has passed is free).
    pub reboot_slots: Vec<crate::fleet::semaphore::Holder>,
}

/// The fleet as the operator sees it now.
pub fn fleet(db: &Db) -> Result<FleetView> {
    Ok(FleetView {
        rollouts: rollouts(db)?,
        versions: versions(db.boxes_by_version()?),
        reboot_slots: db.reboot_slots()?,
    })
}

/// Every wave rollout, as the operator sees it.
pub fn rollouts(db: &Db) -> Result<Vec<RolloutView>> {
    db.rollouts()?.iter().map(|r| view(db, r)).collect()
}

/// `r` as the operator sees it, with its counts.
pub fn view(db: &Db, r: &Rollout) -> Result<RolloutView> {
    let p = &r.progress;
    let (group, percent) = r.policy.stage(p.stage);
    let boxes = db.outcome_counts(&r.version)?;
    let c = db.counts(&r.version, p)?;
    let finished = c.successes + c.failures;
    let state = if p.withdrawn {
        State::Withdrawn
    } else if p.paused.is_some() {
        State::Paused
    } else if p.stage + 1 >= r.policy.stages() {
        State::Complete
    } else {
        State::Advancing
    };
    Ok(RolloutView {
        version: r.version.clone(),
        group: group.map(Into::into),
        percent,
        stage: p.stage,
        since: p.since,
        state,
        paused: p.paused.clone(),
        withdrawn: p.withdrawn,
        updated: db.rollout_updated(&r.version)?.unwrap_or(p.since),
        boxes: boxes.into_iter().map(|(o, c)| (o.as_str(), c)).collect(),
        counting_since: p.failures_since,
        finished,
        failures: c.failures,
        failure_rate: (finished > 0).then(|| f64::from(c.failures) / f64::from(finished)),
        policy: r.policy.clone(),
    })
}

/// The per-group counts folded per version, newest version first (by version order, not
/// text), unknown last.
pub fn versions(counts: Vec<VersionCount>) -> Vec<VersionView> {
    let mut by: BTreeMap<Option<String>, VersionView> = BTreeMap::new();
    for c in counts {
        let v = by.entry(c.version.clone()).or_insert_with(|| VersionView {
            version: c.version,
            boxes: 0,
            groups: BTreeMap::new(),
        });
        v.boxes += c.boxes;
        *v.groups.entry(c.group).or_default() += c.boxes;
    }
    let mut out: Vec<VersionView> = by.into_values().collect();
    let key = |v: &VersionView| {
        let parsed = v.version.as_deref().map(|s| s.parse::<Version>().ok());
        (parsed, v.version.clone())
    };
    out.sort_by_key(|v| std::cmp::Reverse(key(v)));
    out
}

/// One line for a human.
pub fn line(v: &RolloutView) -> String {
    let state = match (&v.paused, v.withdrawn) {
        (_, true) => "withdrawn".to_owned(),
        (Some(reason), _) => format!("paused: {reason}"),
        (None, _) => v.state.as_str().to_owned(),
    };
    let group = v.group.as_deref().unwrap_or("all");
    let counts: Vec<String> = (v.boxes.iter())
        .filter(|(_, c)| **c > 0)
        .map(|(o, c)| format!("{o} {c}"))
        .collect();
    let rate = match v.failure_rate {
        Some(r) => format!(
            "; {} of {} failed ({:.1}%)",
            v.failures,
            v.finished,
            r * 100.0
        ),
        None => String::new(),
    };
    format!(
        "{}: stage {}/{} ({group} at {}%), {state}; boxes: {}{rate}",
        v.version,
        v.stage + 1,
        v.policy.stages(),
        v.percent,
        if counts.is_empty() {
            "none reported".to_owned()
        } else {
            counts.join(", ")
        }
    )
}

/// The boxes by version for a human: one line per version.
pub fn version_lines(versions: &[VersionView]) -> Vec<String> {
    (versions.iter())
        .map(|v| {
            let groups: Vec<String> = (v.groups.iter())
                .map(|(g, n)| format!("{} {n}", if g.is_empty() { "(none)" } else { g }))
                .collect();
            format!(
                "{}: {} boxes ({})",
                v.version.as_deref().unwrap_or("unknown"),
                v.boxes,
                groups.join(", ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_fold_groups_and_sort_newest_first_unknown_last() {
        let c = |v: Option<&str>, g: &str, n| VersionCount {
            version: v.map(Into::into),
            group: g.into(),
            boxes: n,
        };
        let counts = vec![
            c(None, "a", 1),
            c(Some("10.0"), "a", 2),
            c(Some("2.0"), "", 3),
            c(Some("2.0"), "b", 4),
        ];
        let v = versions(counts);
        let order: Vec<_> = v.iter().map(|v| (v.version.as_deref(), v.boxes)).collect();
        assert_eq!(order, [(Some("10.0"), 2), (Some("2.0"), 7), (None, 1)]);
        assert_eq!(
            version_lines(&v),
            [
                "10.0: 2 boxes (a 2)",
                "2.0: 7 boxes ((none) 3, b 4)",
                "unknown: 1 boxes (a 1)"
            ]
        );
    }
}
