//! `confirm`: after a boot, settle a trial. Healthy → default; unhealthy → bad, back to the
//! default. A box that runs steady gives its reboot slot back (`rebootlock`).

use anyhow::Result;
use serde::Serialize;

use crate::appliance::bootinfo::{version_of_image_path, BootReport};
use crate::appliance::ctx::Ctx;
use crate::appliance::grub;
use crate::appliance::health::{self, CheckResult};
use crate::appliance::images;
use crate::appliance::intent;
use crate::appliance::rebootlock;
use crate::appliance::report::{self, Step};
use crate::appliance::state::{Pending, Settle, State};
use crate::core::report::Outcome;
use crate::core::version::Version;
use crate::error::Error;
use crate::sys::clock::now;

/// Why the default image failed, when this boot shows it did: the initramfs fell back (or
/// redirected) from it to `booted` (missing, fails fsck, does not mount: every boot would go
/// the same way), or GRUB gave up on it after `MAX_UNCONFIRMED_BOOTS` boots that never
/// reached a `confirm` (it crashed or hung before userspace) and booted the previous image.
fn default_failure(
    report: &Option<BootReport>,
    env: &grub::Env,
    state: &State,
    booted: &Version,
) -> Option<String> {
    let default = state.default.as_ref().filter(|d| *d != booted)?;
    if let Some(r) = report.as_ref().filter(|r| r.fallback) {
        if r.requested
            .as_deref()
            .and_then(version_of_image_path)
            .as_ref()
            == Some(default)
        {
            return Some(format!(
                "the initramfs could not boot it ({}); the box fell back to {booted}",
                r.reason.as_deref().unwrap_or("unknown reason")
            ));
        }
    }
    let max = grub::MAX_UNCONFIRMED_BOOTS;
    (env.get(grub::BOOTS) == Some(&max.to_string()) && state.previous.as_ref() == Some(booted))
        .then(|| {
            format!("it did not come up {max} boots in a row (no confirm); GRUB booted {booted}")
        })
}

#[derive(Serialize)]
struct ConfirmReport {
    booted: Version,
    outcome: &'static str,
    default: Option<Version>,
    checks: Vec<CheckResult>,
    message: String,
}

/// After a boot: settle a trial. Healthy → default; unhealthy → bad, back to the default.
/// `deadline`: the trial's time is up (the deadline timer); still on trial means it failed.
pub fn confirm(ctx: &mut Ctx, no_reboot: bool, deadline: bool) -> Result<()> {
    let started = now();
    let (_lock, mut state, finished) = intent::lock(ctx)?;
    // One look at this boot (kernel command line, the initramfs's report) serves throughout.
    let this_boot = ctx.booted()?;
    let booted = Ctx::image_of(&this_boot)?;
    let env = grub::read_env(&ctx.layout.grubenv())?;
    // Our grub.cfg records each one-shot boot it makes; a trial GRUB never started (power lost
    // between arming and rebooting) is disarmed instead of being blamed.
    let attempted = state
        .trying
        .as_ref()
        .is_some_and(|t| env.get(grub::ATTEMPTED) == Some(&t.version.grub_id()));
    // What the report names: the trial (and where it came from) and the default, as before.
    let (trial, old_default) = (state.trying.clone(), state.default.clone());
    let settle = state.settle(&booted, attempted);
    let report = this_boot.report;
    let default_failure = default_failure(&report, &env, &state, &booted);
    // A revert cut short before GRUB's files said so booted the image it was leaving; its
    // intent is finished now (`intent::lock`), and so is its reboot.
    let revert_finished = match finished {
        Some(Pending::Revert { to }) if to != booted && state.default.as_ref() == Some(&to) => {
            Some(to)
        }
        _ => None,
    };
    let (outcome, message, checks, result, reboot_to): (
        &str,
        String,
        Vec<CheckResult>,
        Result<()>,
        Option<Version>,
    ) = match settle {
        Settle::Trial(v) => {
            let checks = if deadline {
                vec![CheckResult {
                    name: "deadline".into(),
                    ok: false,
                    detail: "the trial was not confirmed before its deadline".into(),
                    seconds: 0.0,
                }]
            } else {
                health::run_all(&ctx.config.health)?
            };
            let failed: Vec<String> = checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.detail))
                .collect();
            if failed.is_empty() {
                state.confirm(&v)?;
                (
                    "confirmed",
                    format!("image {v} is healthy and now the default"),
                    checks,
                    Ok(()),
                    None,
                )
            } else {
                let reason = format!("health checks failed: {}", failed.join("; "));
                state.fail_trial(&v, reason.clone())?;
                let back = state.default.clone();
                let msg = format!(
                    "image {v} marked bad ({reason}); going back to {}",
                    back.as_ref().map_or("-".into(), |b| b.to_string())
                );
                (
                    "failed",
                    msg.clone(),
                    checks,
                    Err(anyhow::anyhow!(msg)),
                    back,
                )
            }
        }
        Settle::TrialDidNotBoot { tried, booted } => {
            let msg = format!("image {tried} did not come up; the box is back on {booted} and {tried} is marked bad");
            (
                "trial-did-not-boot",
                msg.clone(),
                vec![],
                Err(anyhow::anyhow!(msg)),
                None,
            )
        }
        Settle::TrialNotAttempted(v) => (
            "trial-not-attempted",
            format!("image {v} was armed but never booted (interrupted switch); it stays prepared"),
            vec![],
            Ok(()),
            None,
        ),
        Settle::AlreadyDefault if revert_finished.is_some() => {
            let to = revert_finished.clone().expect("checked");
            (
                "revert-finished",
                format!("an interrupted revert to {to} is finished; the box goes back to it"),
                vec![],
                Ok(()),
                Some(to),
            )
        }
        Settle::AlreadyDefault if default_failure.is_some() => {
            let default = state.default.clone().expect("checked");
            let reason = default_failure.expect("checked");
            state.demote_default(&booted, reason.clone())?;
            let msg = format!(
                "default image {default} marked bad ({reason}); {booted} is the default now"
            );
            (
                "default-demoted",
                msg.clone(),
                vec![],
                Err(anyhow::anyhow!(msg)),
                None,
            )
        }
        Settle::AlreadyDefault => {
            let msg = if state.default.as_ref() == Some(&booted) {
                format!("image {booted} is the default; nothing to confirm")
            } else {
                format!(
                    "image {booted} runs but is not the default ({}); nothing to confirm",
                    state.default.as_ref().map_or("-".into(), |d| d.to_string())
                )
            };
            ("nothing-to-do", msg, vec![], Ok(()), None)
        }
    };
    // grub.cfg first: a crash before the state is saved leaves the new default in GRUB and the
    // trial in the state, which the next confirm settles the same way.
    crate::fail_point!("confirm::checked");
    images::sync_grub(ctx, &state)?;
    crate::fail_point!("confirm::grub-written");
    if outcome == "confirmed" || outcome == "trial-not-attempted" {
        grub::update_env(&ctx.layout.grubenv(), &[(grub::ATTEMPTED, None)])?;
        crate::fail_point!("confirm::env-written");
    }
    // The default came up: its count of unconfirmed boots starts again. Another image came up
    // instead (GRUB fell back from the default, which failed inside GRUB): the count goes on,
    // so that GRUB gives up on the default after the last counted boot and this confirm there
    // demotes it. GRUB clears a redirect when it boots it; one still set means it could not
    // (its environment is not writable here), and every boot would go the same way.
    let default_came_up = state.default.as_ref() == Some(&booted);
    let stale: Vec<(&str, Option<&str>)> = [grub::BOOTS, grub::REDIRECT]
        .into_iter()
        .filter(|k| env.contains_key(*k) && (*k != grub::BOOTS || default_came_up))
        .map(|k| (k, None))
        .collect();
    if !stale.is_empty() {
        grub::update_env(&ctx.layout.grubenv(), &stale)?;
    }
    // The verdict is recorded, reported and acted on (reboot) before it becomes the exit code.
    state.record("confirm", &result, now());
    state.save(&ctx.layout.state_file())?;
    let failed_check = checks.iter().find(|c| !c.ok).map(|c| c.name.clone());
    let outcome_reported = match outcome {
        "confirmed" => Some(Outcome::Confirmed),
        "failed" if deadline => Some(Outcome::TrialFailed),
        "failed" => Some(Outcome::Failed),
        "trial-did-not-boot" | "default-demoted" => Some(Outcome::Fallback),
        "revert-finished" => Some(Outcome::Reverted),
        _ => None,
    };
    let report = ConfirmReport {
        booted,
        outcome,
        default: state.default.clone(),
        checks,
        message: message.clone(),
    };
    ctx.out.report(&report, |r| {
        let mut s = String::new();
        for c in &r.checks {
            s += &format!(
                "  {} {}: {} ({:.1}s)\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail,
                c.seconds
            );
        }
        s + &r.message
    })?;
    if let Some(o) = outcome_reported {
        let (from, to) = match (o, trial) {
            (Outcome::Fallback, None) => (None, old_default),
            (Outcome::Reverted, _) => (Some(report.booted.clone()), revert_finished),
            (_, t) => (t.as_ref().map(|t| t.from.clone()), t.map(|t| t.version)),
        };
        let step = Step {
            outcome: o,
            from,
            to,
            failed_check,
            started,
        };
        report::report(ctx, step);
    }
    // The box runs steady (the trial confirmed, or the box on its default again): the reboot
    // slot goes back. A failed trial keeps it until the box is back.
    if reboot_to.is_none() {
        rebootlock::release(ctx);
    }
    if let Some(target) = reboot_to.filter(|_| !no_reboot) {
        ctx.reboot(&target)?;
    }
    match (outcome, result) {
        ("nothing-to-do", _) => Err(Error::NothingToDo(message).into()),
        (_, r) => r,
    }
}
