//! `cleanup`: remove images that are neither booted, default, previous nor prepared, and what
//! interrupted runs left behind.

use anyhow::Result;
use serde::Serialize;

use crate::appliance::ctx::Ctx;
use crate::appliance::images;
use crate::appliance::intent;
use crate::core::version::Version;
use crate::error::Error;

#[derive(Serialize)]
struct CleanupReport {
    removed: Vec<Version>,
    /// Partial exports and downloads, temp files of interrupted runs.
    leftovers: Vec<std::path::PathBuf>,
    kept: Vec<Version>,
    freed_bytes: u64,
    dry_run: bool,
}

/// Removes images that are neither booted, default, previous nor prepared.
pub fn cleanup(ctx: &mut Ctx, dry_run: bool) -> Result<()> {
    let (_lock, mut state, _) = intent::lock(ctx)?;
    let booted = ctx.booted()?.version;
    let on_disk = images::list(&ctx.layout)?;
    let versions: Vec<Version> = on_disk.iter().map(|i| i.version.clone()).collect();
    let remove = images::plan_cleanup(
        &versions,
        &state.protected(booted.as_ref()),
        ctx.config.keep_extra_images,
    );
    let leftovers = images::leftovers(&ctx.layout)?;
    let freed = on_disk
        .iter()
        .filter(|i| remove.contains(&i.version))
        .map(|i| i.allocated)
        .chain(leftovers.iter().map(|l| l.allocated))
        .sum();
    if !dry_run {
        images::remove_leftovers(&ctx.layout, &[])?;
        images::remove(ctx, &mut state, &remove)?;
        crate::appliance::pool::prune(ctx, &state)?;
        ctx.finish(&mut state, "cleanup", Ok(()))?;
    }
    let kept = versions
        .into_iter()
        .filter(|v| !remove.contains(v))
        .collect();
    let report = CleanupReport {
        removed: remove,
        leftovers: leftovers.into_iter().map(|l| l.path).collect(),
        kept,
        freed_bytes: freed,
        dry_run,
    };
    let empty = report.removed.is_empty() && report.leftovers.is_empty();
    ctx.out.report(&report, |r| {
        let verb = if r.dry_run { "would remove" } else { "removed" };
        let mut s: String = r
            .removed
            .iter()
            .map(|v| format!("{verb} image {v}\n"))
            .collect();
        for l in &r.leftovers {
            s += &format!("{verb} {} (left by an interrupted run)\n", l.display());
        }
        s += &format!(
            "{} MiB {}; kept {}",
            r.freed_bytes >> 20,
            if r.dry_run { "would be freed" } else { "freed" },
            r.kept
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        s
    })?;
    if empty {
        return Err(Error::NothingToDo("no image or leftover to remove".into()).into());
    }
    Ok(())
}
