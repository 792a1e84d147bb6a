//! `status`: everything a person or a check-in agent needs to know about the box.

use anyhow::Result;

use crate::appliance::ctx::Ctx;
use crate::appliance::status;

pub fn status(ctx: &mut Ctx) -> Result<()> {
    let s = status::gather(ctx)?;
    ctx.out.report(&s, status::render)
}
