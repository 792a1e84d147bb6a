//! What an operator sees of a rollout (`fleet status`, `release`): its plan, the stage it is
//! at, whether it is paused and why, and how many boxes reported each outcome.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use crate::fleet::rollout::Policy;
use crate::fleet::store::{Db, Rollout};

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
    pub paused: Option<String>,
    pub withdrawn: bool,
    /// Distinct boxes by outcome (all outcomes listed, zeros included).
    pub boxes: BTreeMap<&'static str, u32>,
}

/// `r` as the operator sees it, with its counts.
pub fn view(db: &Db, r: &Rollout) -> Result<RolloutView> {
    let n = r.policy.waves.len().max(1);
    let p = &r.progress;
    let boxes = db.outcome_counts(&r.version)?;
    Ok(RolloutView {
        version: r.version.clone(),
        group: r.policy.groups.get(p.stage / n).cloned(),
        percent: r.policy.waves.get(p.stage % n).copied().unwrap_or(0),
        stage: p.stage,
        since: p.since,
        paused: p.paused.clone(),
        withdrawn: p.withdrawn,
        boxes: boxes.into_iter().map(|(o, c)| (o.as_str(), c)).collect(),
        policy: r.policy.clone(),
    })
}

/// One line for a human.
pub fn line(v: &RolloutView) -> String {
    let state = match (&v.paused, v.withdrawn) {
        (_, true) => "withdrawn".to_owned(),
        (Some(reason), _) => format!("paused: {reason}"),
        (None, _) => "advancing".to_owned(),
    };
    let group = v.group.as_deref().unwrap_or("all");
    let counts: Vec<String> = (v.boxes.iter())
        .filter(|(_, c)| **c > 0)
        .map(|(o, c)| format!("{o} {c}"))
        .collect();
    format!(
        "{}: stage {}/{} ({group} at {}%), {state}; boxes: {}",
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
