//! A release's rollout over time: the operator starts, pauses, resumes or withdraws it; the
//! server steps it from the reports (`rollout::step`) and turns it into the rollout document the
//! online rollout role signs in the TUF repository (`rollout_doc`): what boxes are offered.

use anyhow::Result;

use crate::core::manifest::Release;
use crate::core::tuf::{ReleaseRollout, RolloutDoc};
use crate::error::refused;
use crate::fleet::rollout::{self, Policy, Progress};
use crate::fleet::store::{Db, Rollout};

/// Starts (or restarts from its first stage) `version`'s rollout under `policy`.
pub fn start(db: &Db, version: &str, policy: Policy, now: u64) -> Result<Rollout> {
    policy.validate().map_err(refused)?;
    let r = Rollout {
        version: version.to_owned(),
        policy,
        progress: Progress::start(now),
    };
    db.save_rollout(&r, now)?;
    Ok(r)
}

/// What the operator does to a running rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Stop offering it to boxes not yet on it, with this reason.
    Pause(String),
    /// Offer it again; failures count from the next second on (the ones that paused it, or
    /// arrived with the resume, are not held against it again).
    Resume,
    /// Offer it to nobody new, for good.
    Withdraw,
}

/// Applies the operator's `cmd` to `version`'s rollout (refused if it has none, or if it was
/// withdrawn and `cmd` would offer it again).
pub fn command(db: &Db, version: &str, cmd: Command, now: u64) -> Result<Rollout> {
    let mut r = db.rollout(version)?.ok_or_else(|| {
        refused(format!(
            "{version} has no wave rollout (start one: --waves)"
        ))
    })?;
    let p = &mut r.progress;
    match cmd {
        Command::Pause(reason) => p.paused = Some(reason),
        Command::Resume if p.withdrawn => {
            return Err(refused(format!(
                "{version} was withdrawn; publish a new version"
            )))
        }
        Command::Resume => {
            p.paused = None;
            p.failures_since = now + 1;
        }
        Command::Withdraw => p.withdrawn = true,
    }
    db.save_rollout(&r, now)?;
    Ok(r)
}

/// Steps `version`'s rollout from its reports now and records the change, if any. Returns the
/// rollout as stored afterwards (None: it has none).
pub fn refresh(db: &Db, version: &str, now: u64) -> Result<Option<Rollout>> {
    let Some(mut r) = db.rollout(version)? else {
        return Ok(None);
    };
    let counts = db.counts(version, &r.progress)?;
    let next = rollout::step(&r.policy, &r.progress, &counts, now);
    if next == r.progress {
        return Ok(Some(r));
    }
    let before = std::mem::replace(&mut r.progress, next);
    if db.advance(&r, &before, now)? {
        if let Some(reason) = &r.progress.paused {
            tracing::warn!("rollout of {version} paused: {reason}");
        } else {
            tracing::info!("rollout of {version} at stage {}", r.progress.stage);
        }
        return Ok(Some(r));
    }
    // Changed meanwhile (the operator): theirs stands.
    db.rollout(version)
}

/// A channel's rollout document (`core::tuf::RolloutDoc`, signed by the online rollout role):
/// for each of `releases`, the percentage of the boxes outside listed groups, each listed
/// group's, and why it is paused. A release under a wave rollout takes them from the waves (as
/// a box reads it with `RolloutDoc::for_box`); any other from its own `rollout` and `paused`.
pub fn rollout_doc(db: Option<&Db>, releases: &[Release], now: u64) -> Result<RolloutDoc> {
    let mut doc = RolloutDoc::default();
    for rel in releases {
        let waves = match db {
            Some(db) => refresh(db, rel.version.as_str(), now)?,
            None => None,
        };
        let r = match waves {
            Some(r) => {
                let p = &r.progress;
                let paused = match (&p.paused, p.withdrawn) {
                    (_, true) => Some("withdrawn".to_owned()),
                    (Some(reason), _) => Some(reason.clone()),
                    (None, false) => rel.paused.then(|| "paused by the operator".to_owned()),
                };
                ReleaseRollout {
                    percent: rollout::rollout_for(&r.policy, p, None),
                    groups: (r.policy.groups.iter())
                        .map(|g| (g.clone(), rollout::rollout_for(&r.policy, p, Some(g))))
                        .collect(),
                    paused,
                }
            }
            None => ReleaseRollout {
                percent: rel.rollout,
                groups: Default::default(),
                paused: rel.paused.then(|| "paused by the operator".to_owned()),
            },
        };
        doc.releases.insert(rel.version.to_string(), r);
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::Blob;
    use crate::core::report::{testdata::report, Outcome};
    use crate::fleet::store::Enrolled;

    fn setup() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("fleet.db")).unwrap();
        for i in 0..10 {
            db.enroll(&enrolled(i), 0).unwrap();
        }
        (dir, db)
    }

    fn enrolled(i: u32) -> Enrolled {
        Enrolled {
            box_id: format!("box-{i}"),
            public_key: format!("ed25519:{i}"),
            group: "a".into(),
        }
    }

    fn post(db: &Db, i: u32, outcome: Outcome, at: u64) {
        let r = report(&format!("box-{i}"), "2.0", outcome, at);
        db.insert_report(&enrolled(i), &r, at).unwrap();
    }

    fn release() -> Vec<Release> {
        vec![Release {
            version: "2.0".parse().unwrap(),
            rollout: 100,
            paused: false,
            image: Blob {
                size: 1,
                sha256: "00".repeat(32),
            },
        }]
    }

    fn policy() -> Policy {
        Policy {
            waves: vec![10, 100],
            soak_secs: 100,
            min_successes: 2,
            max_failures: 3,
            ..Policy::default()
        }
    }

    /// Each release's percentage and pause as a box of `group` reads them from the rollout
    /// document of `now`.
    fn apply(db: &Db, releases: &mut [Release], group: Option<&str>, now: u64) -> Result<()> {
        let doc = rollout_doc(Some(db), releases, now)?;
        for rel in releases.iter_mut() {
            (rel.rollout, rel.paused) = doc.for_box(&rel.version, group);
        }
        Ok(())
    }

    #[test]
    fn the_manifest_follows_the_waves_after_soak_and_successes() {
        let (_d, db) = setup();
        start(&db, "2.0", policy(), 1000).unwrap();
        let mut rel = release();
        apply(&db, &mut rel, None, 1000).unwrap();
        assert_eq!((rel[0].rollout, rel[0].paused), (10, false));
        post(&db, 1, Outcome::Confirmed, 1010);
        post(&db, 2, Outcome::Confirmed, 1020);
        apply(&db, &mut rel, None, 1099).unwrap();
        assert_eq!(rel[0].rollout, 10, "not soaked yet");
        apply(&db, &mut rel, None, 1100).unwrap();
        assert_eq!(rel[0].rollout, 100);
        let mut other = release();
        apply(&db, &mut other, None, 1101).unwrap();
        assert_eq!(other[0].rollout, 100, "the stage is stored");
    }

    #[test]
    fn the_rollout_document_carries_each_groups_wave_and_the_pause_reason() {
        let (_d, db) = setup();
        let by_zone = Policy {
            groups: vec!["zone-a".into()],
            ..policy()
        };
        start(&db, "2.0", by_zone, 1000).unwrap();
        let doc = rollout_doc(Some(&db), &release(), 1000).unwrap();
        let r = &doc.releases["2.0"];
        assert_eq!((r.percent, r.groups["zone-a"], &r.paused), (0, 10, &None));
        for i in 0..3 {
            post(&db, i, Outcome::Fallback, 1001);
        }
        let doc = rollout_doc(Some(&db), &release(), 1002).unwrap();
        let reason = doc.releases["2.0"].paused.as_deref().unwrap_or_default();
        assert!(reason.contains("3 boxes failed"), "{reason:?}");
        let mut manual = release();
        manual[0].paused = true;
        let doc = rollout_doc(None, &manual, 1003).unwrap();
        assert_eq!(doc.releases["2.0"].percent, 100);
        assert!(doc.releases["2.0"].paused.is_some());
    }

    #[test]
    fn failures_pause_the_operator_resumes_or_withdraws() {
        let (_d, db) = setup();
        start(&db, "2.0", policy(), 1000).unwrap();
        for i in 0..3 {
            post(&db, i, Outcome::Fallback, 1001);
        }
        let r = refresh(&db, "2.0", 1002).unwrap().unwrap();
        assert!(r
            .progress
            .paused
            .as_deref()
            .unwrap()
            .contains("3 boxes failed"));
        let mut rel = release();
        apply(&db, &mut rel, None, 1003).unwrap();
        assert!(rel[0].paused);
        command(&db, "2.0", Command::Resume, 1004).unwrap();
        let mut rel = release();
        apply(&db, &mut rel, None, 1005).unwrap();
        assert!(
            !rel[0].paused,
            "the failures before the resume are forgiven"
        );
        command(&db, "2.0", Command::Withdraw, 1006).unwrap();
        let mut rel = release();
        apply(&db, &mut rel, None, 1007).unwrap();
        assert_eq!((rel[0].rollout, rel[0].paused), (0, true));
        assert!(command(&db, "2.0", Command::Resume, 1008).is_err());
        assert!(command(&db, "9.0", Command::Resume, 1008).is_err());
        let bad = Policy {
            waves: vec![50],
            ..policy()
        };
        assert!(start(&db, "3.0", bad, 0).is_err());
    }

    #[test]
    fn a_release_without_waves_keeps_its_manual_settings() {
        let (_d, db) = setup();
        let mut rel = release();
        rel[0].rollout = 42;
        apply(&db, &mut rel, None, 0).unwrap();
        assert_eq!((rel[0].rollout, rel[0].paused), (42, false));
    }
}
