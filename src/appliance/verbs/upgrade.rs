//! `upgrade`: the fast part of a switch. Migrate configuration into the prepared image, arm
//! GRUB to try it once, reboot (preparing first when the image is not there yet). It switches
//! only when the gate says so (the window, busy checks, inhibitors; `--now` skips it) and with
//! a reboot slot of the fleet's lock (when configured), taken before anything is armed.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::appliance::ctx::Ctx;
use crate::appliance::gate;
use crate::appliance::grub;
use crate::appliance::images;
use crate::appliance::intent;
use crate::appliance::migrate;
use crate::appliance::rebootlock;
use crate::appliance::report::{self, Step};
use crate::appliance::state::{ImageState, State};
use crate::core::report::Outcome;
use crate::core::version::Version;
use crate::error::{refused, Error};
use crate::sys::clock::now;
use crate::sys::loopmount::ImageMount;

#[derive(Serialize)]
struct UpgradeReport {
    version: Version,
    from: Version,
    migration: migrate::Plan,
    dry_run: bool,
    reboot: bool,
    seconds: f64,
}

/// How `upgrade` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// Show the migration plan; change nothing.
    pub dry_run: bool,
    /// Arm, but do not reboot.
    pub no_reboot: bool,
    /// Switch whatever the window, busy checks and inhibitors say (the reboot lock still
    /// holds).
    pub now: bool,
}

/// The fast part of an upgrade: migrate configuration into the prepared image, arm GRUB to try
/// it once, reboot.
pub fn upgrade(ctx: &mut Ctx, version: Option<Version>, mode: Mode) -> Result<()> {
    let Mode {
        dry_run,
        no_reboot,
        now: right_now,
    } = mode;
    let start = Instant::now();
    let started = now();
    let (_lock, mut state, _) = intent::lock(ctx)?;
    let booted = ctx.booted_version()?;
    let ready = |s: &State, v: &Version| {
        s.state_of(v).is_some()
            && !s.half_migrated(v)
            && images::image_path(&ctx.layout, v).is_file()
    };
    let target = match version.or_else(|| state.prepared.clone()) {
        Some(v) if state.state_of(&v) == Some(ImageState::Bad) => {
            return Err(refused(format!(
                "image {v} was marked bad and is not tried again"
            )));
        }
        Some(v) if ready(&state, &v) => v,
        Some(v) if dry_run || ctx.config.server.is_none() => {
            return Err(refused(format!(
                "image {v} is not prepared on this box; run `upgradectl prepare --version {v}` first"
            )));
        }
        None if dry_run || ctx.config.server.is_none() => {
            return Err(Error::NothingToDo(
                "no image is prepared; run `upgradectl prepare`".into(),
            )
            .into());
        }
        // Not prepared yet: prepare first (download, receive, export, verify).
        pinned => {
            let report = crate::appliance::prepare::prepare_locked(ctx, pinned.as_ref(), ctx.wait)?;
            state = ctx.load_state()?;
            report.version
        }
    };
    if !dry_run {
        // Before anything is armed: a refusal leaves the box as it was.
        let waiting = if right_now {
            vec![]
        } else {
            gate::reasons(ctx)?
        };
        if !waiting.is_empty() {
            let why = waiting.join("; ");
            return Err(Error::NotNow(format!("not switching to {target} now: {why}")).into());
        }
        rebootlock::take(ctx)?;
    }
    let result = switch(ctx, &mut state, &booted, &target, dry_run);
    if result.is_err() && !dry_run {
        rebootlock::release(ctx);
    }
    if dry_run {
        let migration = result?;
        let report = UpgradeReport {
            version: target,
            from: booted,
            migration,
            dry_run,
            reboot: false,
            seconds: start.elapsed().as_secs_f64(),
        };
        return ctx.out.report(&report, render_upgrade);
    }
    let migration = ctx.finish(&mut state, "upgrade", result)?;
    let report = UpgradeReport {
        version: target.clone(),
        from: booted,
        migration,
        dry_run,
        reboot: !no_reboot,
        seconds: start.elapsed().as_secs_f64(),
    };
    ctx.out.report(&report, render_upgrade)?;
    let step = Step {
        outcome: Outcome::Upgraded,
        from: Some(report.from.clone()),
        to: Some(target.clone()),
        failed_check: None,
        started,
    };
    report::report(ctx, step);
    if !no_reboot {
        ctx.reboot(&target)?;
    }
    Ok(())
}

fn render_upgrade(r: &UpgradeReport) -> String {
    let mut s = String::new();
    for a in &r.migration.actions {
        match a {
            migrate::Action::Copy { path, .. } => s += &format!("  migrate {path}\n"),
            migrate::Action::Remove { path } => s += &format!("  remove  {path}\n"),
            migrate::Action::Merge { path, .. } => s += &format!("  merge   {path}\n"),
            migrate::Action::Added { path } => {
                s += &format!("  new     {path} (the new image adds it)\n")
            }
            migrate::Action::Same { .. } | migrate::Action::Keep { .. } => {}
        }
    }
    for c in &r.migration.conflicts {
        if c.contains(": ") {
            // An account database's conflict, with its resolution.
            s += &format!("  warning: {c}\n");
            continue;
        }
        s += &format!(
            "  warning: {c} changed on this box and in image {}; the box's copy wins\n",
            r.version
        );
    }
    if r.dry_run {
        s += &format!("would switch from {} to {} (dry run)\n", r.from, r.version);
    } else {
        s += &format!(
            "image {} armed for one boot (from {}) in {:.2}s\n",
            r.version, r.from, r.seconds
        );
        if !r.reboot {
            s += "reboot to try it; `upgradectl confirm` makes it the default once it is healthy\n";
        }
    }
    s
}

/// Migrates and arms `target`. Order matters for power loss and kills:
/// 1. the state marks the image half-migrated and grub.cfg drops it, before it is opened
///    read-write: an interrupted migration leaves an image nobody boots, which `prepare`
///    exports again from the pool's snapshot;
/// 2. migrate, unmount, fsync the image;
/// 3. grub.cfg (with the entry again), the state (trial armed), then grubenv's `next_entry`.
///
/// Each GRUB write checkpoints the host filesystem's journal, so the migrated image's blocks
/// and grub.cfg are where GRUB reads them before `next_entry` names the image.
fn switch(
    ctx: &mut Ctx,
    state: &mut State,
    booted: &Version,
    target: &Version,
    dry_run: bool,
) -> Result<migrate::Plan> {
    let image = images::image_path(&ctx.layout, target);
    if state.state_of(target).is_none() || !image.is_file() {
        return Err(refused(format!(
            "image {target} is not prepared on this box; run `upgradectl prepare --version {target}` first"
        )));
    }
    if state.half_migrated(target) {
        return Err(refused(format!(
            "image {target} was left half-migrated by an interrupted upgrade; run \
             `upgradectl prepare --version {target}` to export it again"
        )));
    }
    // Check the transition and that GRUB can consume a one-shot entry, before touching the
    // image.
    state.clone().arm(target, booted)?;
    grub::check_env_writable(ctx.layout.host())?;
    if !dry_run {
        state.begin_migration(target, booted)?;
        state.save(&ctx.layout.state_file())?;
        images::sync_grub(ctx, state)?;
        crate::fail_point!("switch::marked");
    }

    let mount = ImageMount::open(&image, dry_run)?;
    let patterns = &ctx.config.migrate.paths;
    let hashes = migrate::load_baseline(&ctx.baseline_path(booted))?;
    let accounts = migrate::load_baseline(&ctx.shipped_accounts_path(booted))?;
    let shipped = migrate::Shipped {
        hashes: hashes.as_ref(),
        accounts: accounts.as_ref(),
    };
    let plan = migrate::plan(ctx.layout.root(), mount.path(), patterns, shipped)
        .context("planning the configuration migration")?;
    if dry_run {
        mount.close()?;
        return Ok(plan);
    }
    crate::fail_point!("switch::mounted");
    let shipped = migrate::baseline(mount.path(), patterns)?;
    crate::sys::fsutil::atomic_write(
        &ctx.baseline_path(target),
        &serde_json::to_vec(&shipped)?,
        0o644,
    )?;
    crate::sys::fsutil::atomic_write(
        &ctx.shipped_accounts_path(target),
        &serde_json::to_vec(&migrate::shipped_accounts(mount.path(), &shipped)?)?,
        0o600,
    )?;
    migrate::apply(ctx.layout.root(), mount.path(), &plan).context("migrating configuration")?;
    crate::fail_point!("switch::migrated");
    mount.close()?;
    crate::fail_point!("switch::closed");

    state.arm(target, booted)?;
    images::sync_grub(ctx, state)?;
    crate::fail_point!("switch::grub-written");
    state.save(&ctx.layout.state_file())?;
    crate::fail_point!("switch::state-saved");
    grub::update_env(
        &ctx.layout.grubenv(),
        &[
            (grub::NEXT_ENTRY, Some(&target.grub_id())),
            (grub::ATTEMPTED, None),
        ],
    )
    .context("arming GRUB's one-shot entry")?;
    crate::fail_point!("switch::armed");
    Ok(plan)
}
