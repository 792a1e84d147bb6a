//! `prepare`: fetch the next image in the background (the pipeline is `appliance::prepare`).

use anyhow::Result;

use crate::appliance::ctx::Ctx;
use crate::appliance::intent;
use crate::appliance::prepare::{prepare_locked, PrepareReport};
use crate::appliance::report::{self, Step};
use crate::core::report::Outcome;
use crate::core::version::Version;
use crate::sys::clock::now;

/// The verb. `wait`: sleep through "come back later" (bounded by download.max_wait_seconds).
pub fn prepare(ctx: &mut Ctx, pinned: Option<Version>, wait: bool) -> Result<()> {
    let (_lock, _, _) = intent::lock(ctx)?;
    let started = now();
    let result = prepare_locked(ctx, pinned.as_ref(), wait);
    match &result {
        Ok(r) => report::report(
            ctx,
            Step {
                outcome: Outcome::Prepared,
                from: ctx.booted_version().ok(),
                to: Some(r.version.clone()),
                failed_check: None,
                started,
            },
        ),
        // The prepare timer's runs also send what earlier runs could not.
        Err(_) => report::flush(ctx),
    }
    ctx.out.report(&result?, render)
}

fn render(r: &PrepareReport) -> String {
    format!(
        "image {} prepared from {} ({} MiB downloaded, {} MiB resumed; image {} MiB) in {:.1}s",
        r.version,
        r.base
            .as_ref()
            .map_or("a full stream".to_owned(), |b| format!("a diff from {b}")),
        r.downloaded_bytes >> 20,
        r.resumed_bytes >> 20,
        r.image_bytes >> 20,
        r.seconds
    )
}
