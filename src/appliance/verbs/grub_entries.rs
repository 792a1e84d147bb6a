//! `grub-entries`: what `grub.d/09_upgradectl` adds to a grub.cfg made by `grub-mkconfig`:
//! upgradectl's default, the one-shot trial's record and fallbacks, and the image entries.

use anyhow::Result;

use crate::appliance::ctx::Ctx;
use crate::appliance::grub;
use crate::appliance::images;

/// Prints the GRUB menu entries (for `grub.d/09_upgradectl`).
pub fn grub_entries(ctx: &mut Ctx) -> Result<()> {
    let state = ctx.load_state()?;
    let entries = grub::render_mkconfig_fragment(&images::menu(ctx, &state)?);
    ctx.out.report(&entries, |e| e.clone())
}
