//! `prepare`: fetch the next image in the background (the pipeline is `appliance::prepare`).

use anyhow::Result;

use crate::appliance::ctx::Ctx;
use crate::appliance::intent;
use crate::appliance::prepare::{prepare_locked, PrepareReport};
use crate::core::version::Version;

/// The verb. `wait`: sleep through "come back later" (bounded by download.max_wait_seconds).
pub fn prepare(ctx: &mut Ctx, pinned: Option<Version>, wait: bool) -> Result<()> {
    let (_lock, _, _) = intent::lock(ctx)?;
    let report = prepare_locked(ctx, pinned.as_ref(), wait)?;
    ctx.out.report(&report, render)
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
