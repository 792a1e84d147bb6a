//! upgradectl's persistent state on the host partition and the state machine of an image's
//! life: prepared → trying → good, or → bad. Transitions are pure and refuse illegal starts.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::core::version::Version;
use crate::error::{refused, Error};
use crate::sys::fsutil::atomic_write;

const SCHEMA: u32 = 1;

/// Where an image stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageState {
    /// Complete and verified on disk, never booted as a confirmed default.
    Prepared,
    /// Armed for one boot (GRUB `next_entry`), or booted and awaiting `confirm`.
    Trying,
    /// Booted and passed its health checks (or installed at the factory).
    Good,
    /// Failed to boot or failed its health checks: never tried again automatically.
    Bad,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub state: ImageState,
    /// sha256 of the whole image file, when known (verified at prepare).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Why the image is bad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A migration into the image started and did not finish: its content is neither the
    /// exported image nor a migrated one. It is out of GRUB's menu and is exported again
    /// from the pool's snapshot before it is used.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub half_migrated: bool,
}

impl ImageRecord {
    pub fn new(state: ImageState) -> Self {
        ImageRecord {
            state,
            sha256: None,
            reason: None,
            half_migrated: false,
        }
    }
}

/// A trial boot in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trying {
    pub version: Version,
    /// The image running when the trial was armed.
    pub from: Version,
}

/// A change of the state whose GRUB side is not written yet. The state is saved with it first,
/// then GRUB's files, then it is cleared: a run interrupted in between is finished by the next
/// run (`intent::lock`), never undone by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "verb")]
pub enum Pending {
    /// `revert` to `to`: grub.cfg with the new default, grubenv with nothing armed.
    Revert { to: Version },
}

/// The last operation's outcome, for `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub verb: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub schema: u32,
    /// The image GRUB boots by default.
    pub default: Option<Version>,
    /// The revert target.
    pub previous: Option<Version>,
    pub trying: Option<Trying>,
    /// An image prepared and not yet tried.
    pub prepared: Option<Version>,
    /// Newest version ever accepted from a server: older or equal ones are refused (no replay).
    pub newest_accepted: Option<Version>,
    pub images: BTreeMap<Version, ImageRecord>,
    pub last_operation: Option<Operation>,
    /// The host partition's filesystem UUID, learned at provisioning or from `root=UUID=`.
    #[serde(default)]
    pub host_uuid: Option<String>,
    /// An operation written as intent whose GRUB side is not done yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// The local snapshot a verified diff would not receive onto (the same bytes under another
    /// GUID, as a pool seeded by copying the image has it): `prepare` takes full streams until
    /// one replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_failed_from: Option<Version>,
}

impl Default for State {
    fn default() -> Self {
        State {
            schema: SCHEMA,
            default: None,
            previous: None,
            trying: None,
            prepared: None,
            newest_accepted: None,
            images: BTreeMap::new(),
            last_operation: None,
            host_uuid: None,
            pending: None,
            diff_failed_from: None,
        }
    }
}

/// What `confirm` finds when it looks at the booted image.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// The booted image is on trial: run the health checks.
    Trial(Version),
    /// The trial image never came up (GRUB or the initramfs fell back); it is now bad.
    TrialDidNotBoot { tried: Version, booted: Version },
    /// A trial was armed but GRUB never booted it (power lost before the switch): disarmed.
    TrialNotAttempted(Version),
    /// No trial: nothing to confirm.
    AlreadyDefault,
}

impl State {
    /// Loads the state, or an empty one when the box has none yet.
    pub fn load(path: &Path) -> Result<State> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state: State = serde_json::from_slice(&text)
            .with_context(|| format!("parsing state file {}", path.display()))?;
        anyhow::ensure!(
            state.schema == SCHEMA,
            "state file {} has schema {}, this upgradectl knows {SCHEMA}",
            path.display(),
            state.schema
        );
        Ok(state)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        atomic_write(path, &text, 0o644).context("saving state")
    }

    pub fn state_of(&self, v: &Version) -> Option<ImageState> {
        self.images.get(v).map(|r| r.state)
    }

    /// Whether a migration into `v` was interrupted (see `ImageRecord::half_migrated`).
    pub fn half_migrated(&self, v: &Version) -> bool {
        self.images.get(v).is_some_and(|r| r.half_migrated)
    }

    /// `v`'s image file was exported again after an interrupted migration: usable again.
    pub fn reexported(&mut self, v: &Version) {
        if let Some(r) = self.images.get_mut(v) {
            r.half_migrated = false;
        }
    }

    /// The migration into `v` (to be armed from `booted`) starts: from now until `arm`, the
    /// image is not bootable. Refuses what `arm` would refuse, before the image is touched.
    pub fn begin_migration(&mut self, v: &Version, booted: &Version) -> Result<()> {
        self.clone().arm(v, booted)?;
        self.images
            .get_mut(v)
            .expect("arm checked it")
            .half_migrated = true;
        Ok(())
    }

    fn set_state(&mut self, v: &Version, state: ImageState) {
        self.images
            .entry(v.clone())
            .or_insert_with(|| ImageRecord::new(state))
            .state = state;
    }

    /// Provisioning: `v` is the factory image, good and default.
    pub fn install(&mut self, v: &Version) {
        self.set_state(v, ImageState::Good);
        self.default = Some(v.clone());
        self.newest_accepted = self.newest_accepted.clone().max(Some(v.clone()));
    }

    /// A complete, verified image file is on disk.
    pub fn register_prepared(&mut self, v: &Version, sha256: Option<String>) -> Result<()> {
        match self.state_of(v) {
            Some(ImageState::Bad) => {
                return Err(refused(format!(
                    "image {v} was marked bad and is never tried again"
                )))
            }
            Some(ImageState::Good) | Some(ImageState::Trying) => {
                return Err(Error::NothingToDo(format!("image {v} is already installed")).into())
            }
            Some(ImageState::Prepared) | None => {}
        }
        self.set_state(v, ImageState::Prepared);
        let record = self.images.get_mut(v).expect("just set");
        record.half_migrated = false;
        if sha256.is_some() {
            record.sha256 = sha256;
        }
        self.prepared = Some(v.clone());
        Ok(())
    }

    /// Arms a one-shot boot of `v` from the running image `booted`.
    pub fn arm(&mut self, v: &Version, booted: &Version) -> Result<()> {
        if v == booted {
            return Err(Error::NothingToDo(format!("image {v} is already running")).into());
        }
        match self.state_of(v) {
            None => return Err(refused(format!("image {v} is not prepared"))),
            Some(ImageState::Bad) => {
                return Err(refused(format!(
                    "image {v} was marked bad ({}) and is not tried again",
                    self.images[v]
                        .reason
                        .as_deref()
                        .unwrap_or("no reason recorded")
                )))
            }
            Some(ImageState::Prepared) | Some(ImageState::Good) | Some(ImageState::Trying) => {}
        }
        if let Some(t) = &self.trying {
            if &t.version != v {
                return Err(refused(format!(
                    "image {} is already being tried; confirm or revert first",
                    t.version
                )));
            }
        }
        self.set_state(v, ImageState::Trying);
        self.images.get_mut(v).expect("just set").half_migrated = false;
        self.trying = Some(Trying {
            version: v.clone(),
            from: booted.clone(),
        });
        Ok(())
    }

    /// Looks at what booted, after a reboot. A trial that GRUB attempted (`attempted`) but that
    /// did not come up is marked bad; one never attempted (power lost before the switch) is
    /// disarmed.
    pub fn settle(&mut self, booted: &Version, attempted: bool) -> Settle {
        match self.trying.clone() {
            Some(t) if &t.version == booted => Settle::Trial(booted.clone()),
            Some(t) if !attempted => {
                self.set_state(&t.version, ImageState::Prepared);
                self.trying = None;
                Settle::TrialNotAttempted(t.version)
            }
            Some(t) => {
                self.mark_bad(
                    &t.version,
                    format!("did not boot; the box came back on {booted}"),
                );
                Settle::TrialDidNotBoot {
                    tried: t.version,
                    booted: booted.clone(),
                }
            }
            None => {
                if self.default.is_none() {
                    // A box provisioned by hand: adopt what runs.
                    self.install(booted);
                }
                Settle::AlreadyDefault
            }
        }
    }

    /// The trial image passed its health checks: it becomes the default.
    pub fn confirm(&mut self, booted: &Version) -> Result<()> {
        match &self.trying {
            Some(t) if &t.version == booted => {}
            _ => return Err(refused(format!("image {booted} is not on trial"))),
        }
        self.set_state(booted, ImageState::Good);
        if self.default.as_ref() != Some(booted) {
            self.previous = self.default.take();
        }
        self.default = Some(booted.clone());
        self.trying = None;
        if self.prepared.as_ref() == Some(booted) {
            self.prepared = None;
        }
        Ok(())
    }

    /// The default image could not be booted (the initramfs fell back to `booted`): it is bad,
    /// and the image that booted becomes the default.
    pub fn demote_default(&mut self, booted: &Version, reason: String) -> Result<()> {
        let Some(default) = self.default.clone() else {
            return Err(refused("there is no default image to demote"));
        };
        if &default == booted || !self.bootable(booted) {
            return Err(refused(format!(
                "cannot make {booted} the default in place of {default}"
            )));
        }
        self.mark_bad(&default, reason);
        if self.previous.as_ref() == Some(booted) {
            self.previous = None;
        }
        self.default = Some(booted.clone());
        Ok(())
    }

    /// The trial image failed its health checks.
    pub fn fail_trial(&mut self, booted: &Version, reason: String) -> Result<()> {
        match &self.trying {
            Some(t) if &t.version == booted => {}
            _ => return Err(refused(format!("image {booted} is not on trial"))),
        }
        self.mark_bad(booted, reason);
        Ok(())
    }

    fn mark_bad(&mut self, v: &Version, reason: String) {
        self.set_state(v, ImageState::Bad);
        self.images.get_mut(v).expect("just set").reason = Some(reason);
        if self.trying.as_ref().is_some_and(|t| &t.version == v) {
            self.trying = None;
        }
        if self.prepared.as_ref() == Some(v) {
            self.prepared = None;
        }
    }

    /// Goes back: an unconfirmed trial is abandoned (the default boots next); otherwise the
    /// previous image becomes the default and the current default becomes the previous one.
    /// Returns the image the box must boot next.
    pub fn revert(&mut self, booted: &Version) -> Result<Version> {
        if let Some(t) = self.trying.take() {
            self.set_state(&t.version, ImageState::Prepared);
            if &t.version == booted {
                return self
                    .default
                    .clone()
                    .ok_or_else(|| refused("there is no default image to go back to"));
            }
            // A trial armed but not booted yet: disarming it is the revert.
            return Ok(booted.clone());
        }
        let Some(prev) = self.previous.clone() else {
            return Err(
                Error::NothingToDo("there is no previous image to revert to".into()).into(),
            );
        };
        if self.state_of(&prev) == Some(ImageState::Bad) {
            return Err(refused(format!("the previous image {prev} is marked bad")));
        }
        self.previous = self.default.replace(prev.clone());
        Ok(prev)
    }

    /// Images that must stay on disk: booted, default, previous, prepared, on trial.
    pub fn protected(&self, booted: Option<&Version>) -> Vec<Version> {
        let mut keep: Vec<Version> = [
            booted.cloned(),
            self.default.clone(),
            self.previous.clone(),
            self.prepared.clone(),
            self.trying.as_ref().map(|t| t.version.clone()),
        ]
        .into_iter()
        .flatten()
        .collect();
        keep.sort();
        keep.dedup();
        keep
    }

    /// Whether GRUB may offer `v`: registered and not bad.
    pub fn bootable(&self, v: &Version) -> bool {
        matches!(
            self.state_of(v),
            Some(ImageState::Prepared | ImageState::Trying | ImageState::Good)
        ) && !self.half_migrated(v)
    }

    /// Forgets an image whose file was removed. Bad images are remembered so that they are
    /// never tried again.
    pub fn forget(&mut self, v: &Version) {
        if self.state_of(v) != Some(ImageState::Bad) {
            self.images.remove(v);
        }
    }

    /// Records that `v` was accepted from a server (anti-replay high-water mark).
    /// Records that `v` was fetched; an older version is refused (the same one is a refetch).
    pub fn accept(&mut self, v: &Version) -> Result<()> {
        if let Some(n) = &self.newest_accepted {
            if v < n {
                return Err(refused(format!(
                    "version {v} is not newer than {n}, the newest this box has accepted \
                     (downgrades go through `upgradectl revert`)"
                )));
            }
        }
        self.newest_accepted = Some(v.clone());
        Ok(())
    }

    pub fn record(&mut self, verb: &str, result: &Result<()>, now: u64) {
        self.last_operation = Some(Operation {
            verb: verb.to_owned(),
            ok: result.is_ok(),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
            at: now,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn installed() -> State {
        let mut s = State::default();
        s.install(&v("1.0"));
        s
    }

    #[test]
    fn happy_path_prepare_try_confirm() {
        let mut s = installed();
        s.register_prepared(&v("2.0"), Some("ab".into())).unwrap();
        assert_eq!(s.prepared, Some(v("2.0")));
        s.arm(&v("2.0"), &v("1.0")).unwrap();
        assert_eq!(s.state_of(&v("2.0")), Some(ImageState::Trying));
        assert_eq!(s.settle(&v("2.0"), true), Settle::Trial(v("2.0")));
        s.confirm(&v("2.0")).unwrap();
        assert_eq!(s.default, Some(v("2.0")));
        assert_eq!(s.previous, Some(v("1.0")));
        assert_eq!(s.trying, None);
        assert_eq!(s.prepared, None);
        assert_eq!(s.state_of(&v("2.0")), Some(ImageState::Good));
    }

    #[test]
    fn a_trial_that_never_booted_is_bad_and_not_tried_again() {
        let mut s = installed();
        s.register_prepared(&v("3.0"), None).unwrap();
        s.arm(&v("3.0"), &v("1.0")).unwrap();
        let settle = s.settle(&v("1.0"), true);
        assert_eq!(
            settle,
            Settle::TrialDidNotBoot {
                tried: v("3.0"),
                booted: v("1.0")
            }
        );
        assert_eq!(s.state_of(&v("3.0")), Some(ImageState::Bad));
        assert_eq!(s.default, Some(v("1.0")));
        assert!(s.arm(&v("3.0"), &v("1.0")).is_err());
        assert!(s.register_prepared(&v("3.0"), None).is_err());
        // Forgetting the file keeps the verdict.
        s.forget(&v("3.0"));
        assert_eq!(s.state_of(&v("3.0")), Some(ImageState::Bad));
    }

    #[test]
    fn a_trial_never_attempted_is_disarmed_not_bad() {
        let mut s = installed();
        s.register_prepared(&v("2.0"), None).unwrap();
        s.arm(&v("2.0"), &v("1.0")).unwrap();
        assert_eq!(
            s.settle(&v("1.0"), false),
            Settle::TrialNotAttempted(v("2.0"))
        );
        assert_eq!(s.state_of(&v("2.0")), Some(ImageState::Prepared));
        assert_eq!(s.trying, None);
        s.arm(&v("2.0"), &v("1.0")).unwrap();
    }

    #[test]
    fn failed_health_checks_mark_bad_and_keep_default() {
        let mut s = installed();
        s.register_prepared(&v("2.0"), None).unwrap();
        s.arm(&v("2.0"), &v("1.0")).unwrap();
        s.fail_trial(&v("2.0"), "ssh failed".into()).unwrap();
        assert_eq!(s.default, Some(v("1.0")));
        assert_eq!(s.state_of(&v("2.0")), Some(ImageState::Bad));
        assert!(s.confirm(&v("2.0")).is_err());
    }

    #[test]
    fn illegal_starts_are_refused() {
        let mut s = installed();
        assert!(s.arm(&v("2.0"), &v("1.0")).is_err(), "unprepared");
        assert!(s.arm(&v("1.0"), &v("1.0")).is_err(), "already running");
        assert!(s.confirm(&v("1.0")).is_err(), "nothing on trial");
        assert!(s.revert(&v("1.0")).is_err(), "no previous");
        s.register_prepared(&v("2.0"), None).unwrap();
        s.register_prepared(&v("3.0"), None).unwrap();
        s.arm(&v("2.0"), &v("1.0")).unwrap();
        assert!(s.arm(&v("3.0"), &v("1.0")).is_err(), "another trial armed");
        assert!(
            s.register_prepared(&v("1.0"), None).is_err(),
            "already installed"
        );
    }

    #[test]
    fn revert_toggles_default_and_previous() {
        let mut s = installed();
        s.register_prepared(&v("2.0"), None).unwrap();
        s.arm(&v("2.0"), &v("1.0")).unwrap();
        s.settle(&v("2.0"), true);
        s.confirm(&v("2.0")).unwrap();
        assert_eq!(s.revert(&v("2.0")).unwrap(), v("1.0"));
        assert_eq!(
            (s.default.clone(), s.previous.clone()),
            (Some(v("1.0")), Some(v("2.0")))
        );
        assert_eq!(s.revert(&v("1.0")).unwrap(), v("2.0"));
        assert_eq!(s.default, Some(v("2.0")));
    }

    #[test]
    fn revert_abandons_an_unconfirmed_trial() {
        let mut s = installed();
        s.register_prepared(&v("2.0"), None).unwrap();
        s.arm(&v("2.0"), &v("1.0")).unwrap();
        assert_eq!(s.revert(&v("2.0")).unwrap(), v("1.0"));
        assert_eq!(s.trying, None);
        assert_eq!(s.default, Some(v("1.0")));
        assert_eq!(s.state_of(&v("2.0")), Some(ImageState::Prepared));
    }

    #[test]
    fn replays_and_downgrades_are_refused() {
        let mut s = installed();
        assert!(s.accept(&v("0.9")).is_err());
        // The same version again is a refetch (`core::plan` decides when that is allowed).
        s.accept(&v("1.0")).unwrap();
        s.accept(&v("2.0")).unwrap();
        assert!(s.accept(&v("1.5")).is_err());
        s.accept(&v("10.0")).unwrap();
    }

    #[test]
    fn protected_images() {
        let mut s = installed();
        s.register_prepared(&v("2.0"), None).unwrap();
        s.arm(&v("2.0"), &v("1.0")).unwrap();
        s.settle(&v("2.0"), true);
        s.confirm(&v("2.0")).unwrap();
        s.register_prepared(&v("3.0"), None).unwrap();
        assert_eq!(
            s.protected(Some(&v("2.0"))),
            vec![v("1.0"), v("2.0"), v("3.0")]
        );
    }

    #[test]
    fn state_round_trips_through_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let mut s = installed();
        s.register_prepared(&v("2.0"), Some("00ff".into())).unwrap();
        s.save(&p).unwrap();
        assert_eq!(State::load(&p).unwrap(), s);
        assert_eq!(
            State::load(&dir.path().join("none")).unwrap(),
            State::default()
        );
    }
}
