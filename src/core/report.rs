//! What a box tells the server after each step of an upgrade: the report document, its limits,
//! and which outcomes count as a success or a failure of the release it went to.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::core::version::Version;
use crate::error::refused;

/// Largest report request body the server reads (an envelope of a report at its limits).
pub const MAX_REPORT_BYTES: usize = 64 << 10;
/// Longest boot report carried (what the initramfs wrote; longer is cut by the box).
pub const MAX_BOOT_REPORT: usize = 8 << 10;
/// Longest box id, group label or failing check name.
pub const MAX_LABEL: usize = 128;
/// How old a report's `sent` may be when it arrives (a replay after this is refused).
pub const MAX_REPORT_AGE: u64 = 600;

/// What happened on the box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The image was downloaded, received and exported.
    Prepared,
    /// GRUB was armed to try the image once.
    Upgraded,
    /// The trial image passed its health checks and became the default.
    Confirmed,
    /// The trial image failed its health checks; marked bad, the box went back.
    Failed,
    /// The operator went back to the previous image.
    Reverted,
    /// The initramfs could not boot the image and fell back to the previous one.
    Fallback,
    /// The trial never confirmed before its deadline (it hung); marked bad.
    TrialFailed,
}

impl Outcome {
    /// Every outcome, for the database's text form and for tests.
    pub const ALL: [Outcome; 7] = [
        Outcome::Prepared,
        Outcome::Upgraded,
        Outcome::Confirmed,
        Outcome::Failed,
        Outcome::Reverted,
        Outcome::Fallback,
        Outcome::TrialFailed,
    ];

    /// The release reached its goal on this box.
    pub fn is_success(self) -> bool {
        self == Outcome::Confirmed
    }

    /// The release broke this box (it went back by itself).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::Failed | Outcome::Fallback | Outcome::TrialFailed
        )
    }

    /// Whether a box whose last report is this outcome runs the report's `to` (else its
    /// `from`). `to`: it confirmed the release, armed its trial (upgraded: it reboots into it
    /// and a failed trial sends a later report), or reverted to it (a revert's `to` is the
    /// image it went back to). `from`: it only prepared `to`, or `to` failed on it and it went
    /// back (failed, trial-failed, fallback). A report that names no such version (a fallback
    /// of a demoted default names no `from`) leaves the box's version unknown.
    pub fn runs_target(self) -> bool {
        matches!(
            self,
            Outcome::Confirmed | Outcome::Upgraded | Outcome::Reverted
        )
    }

    /// The stable text form (as in JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Prepared => "prepared",
            Outcome::Upgraded => "upgraded",
            Outcome::Confirmed => "confirmed",
            Outcome::Failed => "failed",
            Outcome::Reverted => "reverted",
            Outcome::Fallback => "fallback",
            Outcome::TrialFailed => "trial-failed",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// One report, signed by the box's identity key when sent (see `docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Random, chosen once when the report is spooled: a report sent twice is stored once.
    pub id: String,
    pub box_id: String,
    /// The box's group or zone label, as it sees itself (the server counts the enrolled one).
    #[serde(default)]
    pub group: String,
    /// Unix seconds when this copy was signed; refused when older than `MAX_REPORT_AGE`.
    pub sent: u64,
    pub from: Option<Version>,
    pub to: Option<Version>,
    pub outcome: Outcome,
    /// The health check that failed, if one did.
    #[serde(default)]
    pub failed_check: Option<String>,
    /// What the initramfs reported about the boot, if anything.
    #[serde(default)]
    pub boot_report: Option<String>,
    /// When the step started (Unix seconds) and how long it took.
    #[serde(default)]
    pub started: u64,
    #[serde(default)]
    pub seconds: f64,
}

/// Refuses a label (box id, group, check name) that is empty (unless `empty_ok`), longer than
/// `MAX_LABEL` or not printable ASCII without spaces.
pub fn check_label(what: &str, s: &str, empty_ok: bool) -> Result<()> {
    let ok = (empty_ok || !s.is_empty())
        && s.len() <= MAX_LABEL
        && s.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(refused(format!(
            "{what} {:?} is not 1..={MAX_LABEL} printable ASCII characters",
            s.chars().take(40).collect::<String>()
        )))
    }
}

impl Report {
    /// Refuses a report outside its limits, or sent more than `MAX_REPORT_AGE` before `now` or
    /// more than the allowed clock skew after it.
    pub fn validate(&self, now: u64) -> Result<()> {
        let id_ok =
            (16..=64).contains(&self.id.len()) && self.id.bytes().all(|b| b.is_ascii_hexdigit());
        if !id_ok {
            return Err(refused("report id is not 16..=64 hex digits"));
        }
        check_label("report box_id", &self.box_id, false)?;
        check_label("report group", &self.group, true)?;
        if let Some(c) = &self.failed_check {
            check_label("report failed_check", c, false)?;
        }
        if self
            .boot_report
            .as_ref()
            .is_some_and(|b| b.len() > MAX_BOOT_REPORT)
        {
            return Err(refused(format!(
                "report boot_report is over {MAX_BOOT_REPORT} bytes"
            )));
        }
        if !self.seconds.is_finite() || self.seconds < 0.0 {
            return Err(refused("report seconds is not a duration"));
        }
        let skew = crate::core::manifest::MAX_CLOCK_SKEW;
        if self.sent > now.saturating_add(skew) || self.sent.saturating_add(MAX_REPORT_AGE) < now {
            return Err(refused(format!(
                "report sent at {} is outside the window around {now}",
                self.sent
            )));
        }
        Ok(())
    }
}

/// A new random report id (128 bits, hex).
pub fn new_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
pub mod testdata {
    use super::*;

    /// A valid report of `outcome` for `box_id` going to `to`, sent at `sent`.
    pub fn report(box_id: &str, to: &str, outcome: Outcome, sent: u64) -> Report {
        Report {
            id: new_id(),
            box_id: box_id.into(),
            group: "zone-a".into(),
            sent,
            from: Some("1.0".parse().unwrap()),
            to: Some(to.parse().unwrap()),
            outcome,
            failed_check: None,
            boot_report: None,
            started: sent.saturating_sub(5),
            seconds: 5.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdata::report;
    use super::*;

    #[test]
    fn outcomes_round_trip_and_classify() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
            assert!(!(o.is_success() && o.is_failure()));
        }
        assert!(Outcome::Fallback.is_failure() && Outcome::TrialFailed.is_failure());
        assert!(!Outcome::Reverted.is_failure() && !Outcome::Prepared.is_success());
        for o in Outcome::ALL {
            assert!(!(o.is_failure() && o.runs_target()), "{o:?}: went back");
        }
        assert!(Outcome::Reverted.runs_target() && !Outcome::Prepared.runs_target());
        assert_eq!(Outcome::parse("bogus"), None);
    }

    #[test]
    fn validation_bounds_every_field_and_the_time_window() {
        let now = 10_000;
        let ok = report("box-1", "2.0", Outcome::Confirmed, now);
        ok.validate(now).unwrap();
        type Mutation = Box<dyn Fn(&mut Report)>;
        let bad: Vec<(&str, Mutation)> = vec![
            ("id", Box::new(|r| r.id = "xyz".into())),
            ("box_id", Box::new(|r| r.box_id = String::new())),
            ("box_id", Box::new(|r| r.box_id = "a b".into())),
            ("group", Box::new(|r| r.group = "x".repeat(MAX_LABEL + 1))),
            ("check", Box::new(|r| r.failed_check = Some("\n".into()))),
            (
                "boot",
                Box::new(|r| r.boot_report = Some("x".repeat(MAX_BOOT_REPORT + 1))),
            ),
            ("seconds", Box::new(|r| r.seconds = f64::NAN)),
            ("old", Box::new(move |r| r.sent = now - MAX_REPORT_AGE - 1)),
            ("future", Box::new(move |r| r.sent = now + 301)),
        ];
        for (what, mutate) in bad {
            let mut r = ok.clone();
            mutate(&mut r);
            assert!(r.validate(now).is_err(), "{what} accepted");
        }
        let mut edge = ok.clone();
        edge.sent = now - MAX_REPORT_AGE;
        edge.validate(now).unwrap();
    }
}
