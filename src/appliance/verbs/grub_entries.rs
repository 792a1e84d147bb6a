//! `grub-entries`: the menu entries alone, for `grub.d/09_upgradectl` on hosts that run
//! `grub-mkconfig`.

use anyhow::Result;

use crate::appliance::ctx::Ctx;
use crate::appliance::grub;
use crate::appliance::images;

/// Prints the GRUB menu entries (for `grub.d/09_upgradectl`).
pub fn grub_entries(ctx: &mut Ctx) -> Result<()> {
    let state = ctx.load_state()?;
    let entries = grub::render_entries(&images::menu(ctx, &state)?);
    ctx.out.report(&entries, |e| e.clone())
}
