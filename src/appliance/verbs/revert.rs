//! `revert`: the previous image becomes the default again (or an unconfirmed trial is
//! abandoned), then reboot into it.

use anyhow::Result;
use serde::Serialize;

use crate::appliance::ctx::Ctx;
use crate::appliance::grub;
use crate::appliance::images;
use crate::core::version::Version;
use crate::error::refused;

#[derive(Serialize)]
struct RevertReport {
    from: Version,
    to: Version,
    default: Option<Version>,
    reboot: bool,
}

/// Makes the previous image the default again (or abandons an unconfirmed trial) and reboots.
pub fn revert(ctx: &mut Ctx, no_reboot: bool) -> Result<()> {
    let _lock = ctx.lock()?;
    let booted = ctx.booted_version()?;
    let mut state = ctx.load_state()?;
    let mut next = state.clone();
    let target = next.revert(&booted)?;
    if !images::image_path(&ctx.layout, &target).is_file() {
        return Err(refused(format!(
            "image {target} is not on disk; cannot revert to it"
        )));
    }
    images::sync_grub(ctx, &next)?;
    grub::update_env(
        &ctx.layout.grubenv(),
        &[(grub::NEXT_ENTRY, None), (grub::ATTEMPTED, None)],
    )?;
    state = next;
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
    if report.reboot {
        ctx.reboot(&target)?;
    }
    Ok(())
}
