//! Receiving a box's report: only a report signed by an enrolled box's key, naming that box,
//! sent recently, is stored; anything else changes nothing. A stored failure is counted at
//! once (the rollout may pause).

use crate::core::report::Report;
use crate::core::sign::{self, parse_public_key, Envelope};
use crate::error::Error;
use crate::fleet::control;
use crate::fleet::store::Db;

/// Why a report was not stored; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Not an envelope, not a report, outside its limits or its time window (400).
    #[error("{0}")]
    Malformed(String),
    /// Not signed by an enrolled box, or signed by one for another (403).
    #[error("{0}")]
    Forbidden(String),
    /// The database failed (500; details in the log only).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// What happened to an accepted report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// Stored now (201).
    Stored,
    /// This box sent this report before; stored once (200).
    Duplicate,
}

/// Verifies `body` (a signed envelope of a `Report`) against the enrolled boxes and stores it.
pub fn receive(db: &Db, body: &[u8], now: u64) -> Result<Receipt, Refusal> {
    let env: Envelope = serde_json::from_slice(body)
        .map_err(|e| Refusal::Malformed(format!("not a signed envelope: {e}")))?;
    let mut signer = None;
    // A box signs with one key; a few entries are looked up, not as many as fit the body.
    for s in env.signatures.iter().take(4) {
        if let Some(b) = db.box_by_key(&s.key)? {
            signer = Some(b);
            break;
        }
    }
    let Some(enrolled) = signer else {
        return Err(Refusal::Forbidden("not signed by an enrolled box".into()));
    };
    let key = parse_public_key(&enrolled.public_key)?;
    let report: Report =
        sign::open(&env, &[key], "report").map_err(|e| match e.downcast_ref::<Error>() {
            Some(Error::SignatureInvalid(_)) => Refusal::Forbidden(format!("{e:#}")),
            _ => Refusal::Malformed(format!("{e:#}")),
        })?;
    if report.box_id != enrolled.box_id {
        return Err(Refusal::Forbidden(format!(
            "report for box {:?} signed by the key of {:?}",
            report.box_id, enrolled.box_id
        )));
    }
    report
        .validate(now)
        .map_err(|e| Refusal::Malformed(format!("{e:#}")))?;
    if !db.insert_report(&enrolled, &report, now)? {
        return Ok(Receipt::Duplicate);
    }
    if let Some(to) = report.to.as_ref().filter(|_| report.outcome.is_failure()) {
        if let Err(e) = control::refresh(db, to.as_str(), now) {
            // Stored is what the box needs to know; the next manifest request steps again.
            tracing::error!("stepping the rollout of {to} after a report: {e:#}");
        }
    }
    Ok(Receipt::Stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::report::{testdata::report, Outcome};
    use crate::core::sign::{public_key_string, seal};
    use crate::fleet::rollout::Policy;
    use crate::fleet::store::Enrolled;
    use ed25519_dalek::SigningKey;

    const NOW: u64 = 100_000;

    fn setup() -> (tempfile::TempDir, Db, SigningKey) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("fleet.db")).unwrap();
        let key = SigningKey::from_bytes(&[1; 32]);
        let b = Enrolled {
            box_id: "box-1".into(),
            public_key: public_key_string(&key.verifying_key()),
            group: "a".into(),
        };
        db.enroll(&b, 0).unwrap();
        (dir, db, key)
    }

    fn body(r: &Report, key: &SigningKey) -> Vec<u8> {
        serde_json::to_vec(&seal(r, key).unwrap()).unwrap()
    }

    #[test]
    fn an_enrolled_box_report_is_stored_once() {
        let (_d, db, key) = setup();
        let r = report("box-1", "2.0", Outcome::Confirmed, NOW);
        let b = body(&r, &key);
        assert_eq!(receive(&db, &b, NOW).unwrap(), Receipt::Stored);
        assert_eq!(receive(&db, &b, NOW + 5).unwrap(), Receipt::Duplicate);
        assert_eq!(db.report_count().unwrap(), 1);
        assert!(db.has_report("box-1", &r.id).unwrap());
    }

    #[test]
    fn forged_stale_and_malformed_reports_change_nothing() {
        let (_d, db, key) = setup();
        let stranger = SigningKey::from_bytes(&[2; 32]);
        let good = report("box-1", "2.0", Outcome::Fallback, NOW);
        let unenrolled = body(&good, &stranger);
        let mut env = seal(&good, &key).unwrap();
        env.signatures[0].sig = seal(&good, &stranger).unwrap().signatures[0].sig.clone();
        let bad_sig = serde_json::to_vec(&env).unwrap();
        let mut tampered = seal(&good, &key).unwrap();
        let other = report("box-1", "2.0", Outcome::Failed, NOW);
        tampered.payload = seal(&other, &key).unwrap().payload;
        tampered.signatures = seal(&good, &key).unwrap().signatures;
        let tampered = serde_json::to_vec(&tampered).unwrap();
        let someone_else = body(&report("box-2", "2.0", Outcome::Fallback, NOW), &key);
        for (what, b) in [
            ("unenrolled", unenrolled),
            ("bad signature", bad_sig),
            ("tampered", tampered),
            ("for another box", someone_else),
        ] {
            let e = receive(&db, &b, NOW).unwrap_err();
            assert!(matches!(e, Refusal::Forbidden(_)), "{what}: {e:?}");
        }
        let stale = body(&report("box-1", "2.0", Outcome::Fallback, NOW - 601), &key);
        let garbage = b"{\"payload\": 3}".to_vec();
        for (what, b) in [("stale", stale), ("garbage", garbage)] {
            let e = receive(&db, &b, NOW).unwrap_err();
            assert!(matches!(e, Refusal::Malformed(_)), "{what}: {e:?}");
        }
        assert_eq!(db.report_count().unwrap(), 0);
    }

    #[test]
    fn forged_failures_never_pause_and_real_ones_do_at_once() {
        let (_d, db, key) = setup();
        let policy = Policy {
            max_failures: 1,
            ..Policy::default()
        };
        control::start(&db, "2.0", policy, NOW).unwrap();
        let stranger = SigningKey::from_bytes(&[2; 32]);
        for _ in 0..50 {
            let r = report("box-1", "2.0", Outcome::Fallback, NOW);
            assert!(receive(&db, &body(&r, &stranger), NOW).is_err());
        }
        let before = db.rollout("2.0").unwrap().unwrap();
        assert_eq!(control::refresh(&db, "2.0", NOW).unwrap().unwrap(), before);
        assert!(before.progress.paused.is_none());
        let r = report("box-1", "2.0", Outcome::Fallback, NOW);
        receive(&db, &body(&r, &key), NOW).unwrap();
        let after = db.rollout("2.0").unwrap().unwrap();
        assert!(
            after.progress.paused.is_some(),
            "paused by the report itself"
        );
    }
}
