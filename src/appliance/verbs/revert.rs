//! `revert`: the previous image becomes the default again (or an unconfirmed trial is
//! abandoned), then reboot into it.

use anyhow::Result;
use serde::Serialize;

use crate::appliance::ctx::Ctx;
use crate::appliance::images;
use crate::appliance::intent;
use crate::appliance::report::{self, Step};
use crate::appliance::state::Pending;
use crate::core::report::Outcome;
use crate::core::version::Version;
use crate::error::refused;
use crate::sys::clock::now;

#[derive(Serialize)]
struct RevertReport {
    from: Version,
    to: Version,
    default: Option<Version>,
    reboot: bool,
}

/// Makes the previous image the default again (or abandons an unconfirmed trial) and reboots.
pub fn revert(ctx: &mut Ctx, no_reboot: bool) -> Result<()> {
    let started = now();
    let (_lock, mut state, finished) = intent::lock(ctx)?;
    let booted = ctx.booted_version()?;
    let target = match finished {
        // A revert interrupted after its intent was saved: it is done now, not done twice.
        Some(Pending::Revert { to }) => to,
        None => {
            let mut next = state.clone();
            let target = next.revert(&booted)?;
            if !images::image_path(&ctx.layout, &target).is_file() {
                return Err(refused(format!(
                    "image {target} is not on disk; cannot revert to it"
                )));
            }
            let pending = Pending::Revert { to: target.clone() };
            next.pending = Some(pending.clone());
            next.save(&ctx.layout.state_file())?;
            crate::fail_point!("revert::intent-saved");
            intent::write_grub(ctx, &next, &pending)?;
            next.pending = None;
            state = next;
            target
        }
    };
    ctx.finish(&mut state, "revert", Ok(()))?;
    let report = RevertReport {
        from: booted.clone(),
        to: target.clone(),
        default: state.default.clone(),
        reboot: !no_reboot && target != booted,
    };
    ctx.out.report(&report, |r| {
        format!("default image is now {} (was running {})", r.to, r.from)
    })?;
    let step = Step {
        outcome: Outcome::Reverted,
        from: Some(booted),
        to: Some(target.clone()),
        failed_check: None,
        started,
    };
    report::report(ctx, step);
    if report.reboot {
        ctx.reboot(&target)?;
    }
    Ok(())
}
