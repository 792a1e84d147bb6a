//! The box's verbs that switch images: provision, upgrade (migrate → arm GRUB → reboot),
//! confirm (health checks → make default, or go back), revert and cleanup.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::bootinfo::Booted;
use crate::cmd::Cmd;
use crate::config::Config;
use crate::error::{refused, Error};
use crate::grub::{self, Menu};
use crate::health::{self, CheckResult};
use crate::lock::Lock;
use crate::loopmount::ImageMount;
use crate::migrate;
use crate::output::Output;
use crate::paths::Layout;
use crate::state::{ImageState, Settle, State};
use crate::store;
use crate::version::Version;

/// Everything a verb works with.
pub struct Ctx {
    pub layout: Layout,
    pub config: Config,
    pub out: Output,
    /// Wait for the lock instead of failing at once.
    pub wait: bool,
}

impl Ctx {
    pub fn lock(&self) -> Result<Lock> {
        Lock::acquire(&self.layout.lock_file(), self.wait)
    }

    pub fn load_state(&self) -> Result<State> {
        State::load(&self.layout.state_file())
    }

    pub fn booted(&self) -> Result<Booted> {
        Booted::detect(&self.layout)
    }

    /// The running image; refused when the box did not boot one.
    pub fn booted_version(&self) -> Result<Version> {
        self.booted()?.version.ok_or_else(|| {
            refused("this system was not booted from an upgradectl image (no upgradectl.image= on the kernel command line)")
        })
    }

    /// The GRUB menu the state calls for: every registered, not-bad image present on disk.
    pub fn menu(&self, state: &State) -> Result<Menu> {
        let booted = self.booted()?;
        let images = store::list(&self.layout)?
            .into_iter()
            .map(|i| i.version)
            .filter(|v| state.bootable(v))
            .collect();
        Ok(Menu {
            images,
            default: state.default.clone(),
            previous: state.previous.clone(),
            host_uuid: self
                .config
                .grub
                .host_uuid
                .clone()
                .or(booted.host_uuid)
                .or_else(|| state.host_uuid.clone()),
            kernel_args: self.config.grub.kernel_args.clone(),
            panic_seconds: self.config.grub.panic_seconds,
            timeout_seconds: self.config.grub.timeout_seconds,
        })
    }

    /// Rewrites grub.cfg from the state.
    pub fn sync_grub(&self, state: &State) -> Result<()> {
        grub::write_config(&self.layout.grub_cfg(), &self.menu(state)?)
    }

    fn baseline_path(&self, v: &Version) -> std::path::PathBuf {
        self.layout
            .state_dir()
            .join("baseline")
            .join(format!("{v}.json"))
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Saves the state with the outcome of `verb` recorded.
fn finish<T>(ctx: &Ctx, state: &mut State, verb: &str, result: Result<T>) -> Result<T> {
    let summary = result
        .as_ref()
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e:#}"));
    state.record(verb, &summary, now());
    state.save(&ctx.layout.state_file())?;
    result
}

/// Reboots into `target` (GRUB is already set up for it). Under `--root DIR` other than `/`
/// upgradectl works on a box that is not the running system: the reboot is only reported.
fn reboot(ctx: &mut Ctx, target: &Version) -> Result<()> {
    if ctx.layout.root() != std::path::Path::new("/") {
        return ctx.out.event(
            "reboot-skipped",
            &serde_json::json!({"into": target, "root": ctx.layout.root()}),
            &format!(
                "not rebooting: {} is not the running system; the next boot is {target}",
                ctx.layout.root().display()
            ),
        );
    }
    ctx.out.event(
        "reboot",
        &serde_json::json!({"into": target}),
        &format!("rebooting into {target}"),
    )?;
    Cmd::new("systemctl")
        .arg("reboot")
        .run()
        .context("rebooting")
}

#[derive(Serialize)]
struct InitReport {
    default: Version,
    images: Vec<Version>,
}

/// Provisioning: `images/V.img` exists on the host partition; make it the default.
pub fn init(ctx: &mut Ctx, version: &Version, host_uuid: Option<String>) -> Result<()> {
    let _lock = ctx.lock()?;
    let path = store::image_path(&ctx.layout, version);
    if !path.is_file() {
        return Err(refused(format!("image {} does not exist", path.display())));
    }
    let mut state = ctx.load_state()?;
    state.install(version);
    if host_uuid.is_some() {
        state.host_uuid = host_uuid;
    }
    std::fs::create_dir_all(ctx.layout.grub_dir())?;
    if !ctx.layout.grubenv().exists() {
        grub::update_env(&ctx.layout.grubenv(), &[])?;
    }
    ctx.sync_grub(&state)?;
    finish(ctx, &mut state, "init", Ok(()))?;
    let report = InitReport {
        default: version.clone(),
        images: ctx.menu(&state)?.images,
    };
    ctx.out.report(&report, |r| {
        format!("box provisioned: default image {}", r.default)
    })
}

#[derive(Serialize)]
struct UpgradeReport {
    version: Version,
    from: Version,
    migration: migrate::Plan,
    dry_run: bool,
    reboot: bool,
    seconds: f64,
}

/// The fast part of an upgrade: migrate configuration into the prepared image, arm GRUB to try
/// it once, reboot.
pub fn upgrade(
    ctx: &mut Ctx,
    version: Option<Version>,
    dry_run: bool,
    no_reboot: bool,
) -> Result<()> {
    let start = Instant::now();
    let _lock = ctx.lock()?;
    let booted = ctx.booted_version()?;
    let mut state = ctx.load_state()?;
    let ready = |s: &State, v: &Version| {
        s.state_of(v).is_some() && store::image_path(&ctx.layout, v).is_file()
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
            let report = crate::prepare::prepare_locked(ctx, pinned.as_ref(), ctx.wait)?;
            state = ctx.load_state()?;
            report.version
        }
    };
    let result = switch(ctx, &mut state, &booted, &target, dry_run);
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
    let migration = finish(ctx, &mut state, "upgrade", result)?;
    let report = UpgradeReport {
        version: target.clone(),
        from: booted,
        migration,
        dry_run,
        reboot: !no_reboot,
        seconds: start.elapsed().as_secs_f64(),
    };
    ctx.out.report(&report, render_upgrade)?;
    if !no_reboot {
        reboot(ctx, &target)?;
    }
    Ok(())
}

fn render_upgrade(r: &UpgradeReport) -> String {
    let mut s = String::new();
    for a in &r.migration.actions {
        match a {
            migrate::Action::Copy { path, .. } => s += &format!("  migrate {path}\n"),
            migrate::Action::Remove { path } => s += &format!("  remove  {path}\n"),
            migrate::Action::Same { .. } => {}
        }
    }
    for c in &r.migration.conflicts {
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

/// Migrates and arms `target`. Order matters for power loss: grub.cfg (with the new entry),
/// then the state (trial armed), then grubenv's `next_entry` in one atomic write. Each GRUB
/// write checkpoints the host filesystem's journal, so the migrated image's blocks and grub.cfg
/// are where GRUB reads them before `next_entry` names the image.
fn switch(
    ctx: &mut Ctx,
    state: &mut State,
    booted: &Version,
    target: &Version,
    dry_run: bool,
) -> Result<migrate::Plan> {
    let image = store::image_path(&ctx.layout, target);
    match state.state_of(target) {
        Some(ImageState::Bad) | Some(ImageState::Prepared) | Some(ImageState::Good) | Some(ImageState::Trying)
            if image.is_file() => {}
        _ => {
            return Err(refused(format!(
                "image {target} is not prepared on this box; run `upgradectl prepare --version {target}` first"
            )))
        }
    }
    // Check the transition before touching the image.
    state.clone().arm(target, booted)?;

    let mount = ImageMount::open(&image, dry_run)?;
    let patterns = &ctx.config.migrate.paths;
    let running_baseline = migrate::load_baseline(&ctx.baseline_path(booted))?;
    let plan = migrate::plan(
        ctx.layout.root(),
        mount.path(),
        patterns,
        running_baseline.as_ref(),
    )
    .context("planning the configuration migration")?;
    if dry_run {
        mount.close()?;
        return Ok(plan);
    }
    let shipped = migrate::baseline(mount.path(), patterns)?;
    crate::fsutil::atomic_write(
        &ctx.baseline_path(target),
        &serde_json::to_vec(&shipped)?,
        0o644,
    )?;
    migrate::apply(ctx.layout.root(), mount.path(), &plan).context("migrating configuration")?;
    mount.close()?;

    state.arm(target, booted)?;
    ctx.sync_grub(state)?;
    state.save(&ctx.layout.state_file())?;
    grub::update_env(
        &ctx.layout.grubenv(),
        &[
            (grub::NEXT_ENTRY, Some(&target.grub_id())),
            (grub::ATTEMPTED, None),
        ],
    )
    .context("arming GRUB's one-shot entry")?;
    Ok(plan)
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
pub fn confirm(ctx: &mut Ctx, no_reboot: bool) -> Result<()> {
    let _lock = ctx.lock()?;
    let booted = ctx.booted_version()?;
    let mut state = ctx.load_state()?;
    let env = grub::read_env(&ctx.layout.grubenv())?;
    // Our grub.cfg records each one-shot boot it makes; a trial GRUB never started (power lost
    // between arming and rebooting) is disarmed instead of being blamed.
    let attempted = state
        .trying
        .as_ref()
        .is_some_and(|t| env.get(grub::ATTEMPTED) == Some(&t.version.grub_id()));
    let settle = state.settle(&booted, attempted);
    let (outcome, message, checks, result, reboot_to): (
        &str,
        String,
        Vec<CheckResult>,
        Result<()>,
        Option<Version>,
    ) = match settle {
        Settle::Trial(v) => {
            let checks = health::run_all(&ctx.config.health)?;
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
    ctx.sync_grub(&state)?;
    if outcome == "confirmed" || outcome == "trial-not-attempted" {
        grub::update_env(&ctx.layout.grubenv(), &[(grub::ATTEMPTED, None)])?;
    }
    // The verdict is recorded, reported and acted on (reboot) before it becomes the exit code.
    state.record("confirm", &result, now());
    state.save(&ctx.layout.state_file())?;
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
    if let Some(target) = reboot_to.filter(|_| !no_reboot) {
        reboot(ctx, &target)?;
    }
    match (outcome, result) {
        ("nothing-to-do", _) => Err(Error::NothingToDo(message).into()),
        (_, r) => r,
    }
}

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
    if !store::image_path(&ctx.layout, &target).is_file() {
        return Err(refused(format!(
            "image {target} is not on disk; cannot revert to it"
        )));
    }
    ctx.sync_grub(&next)?;
    grub::update_env(
        &ctx.layout.grubenv(),
        &[(grub::NEXT_ENTRY, None), (grub::ATTEMPTED, None)],
    )?;
    state = next;
    finish(ctx, &mut state, "revert", Ok(()))?;
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
        reboot(ctx, &target)?;
    }
    Ok(())
}

#[derive(Serialize)]
struct CleanupReport {
    removed: Vec<Version>,
    kept: Vec<Version>,
    freed_bytes: u64,
    dry_run: bool,
}

/// Removes images that are neither booted, default, previous nor prepared.
pub fn cleanup(ctx: &mut Ctx, dry_run: bool) -> Result<()> {
    let _lock = ctx.lock()?;
    let mut state = ctx.load_state()?;
    let booted = ctx.booted()?.version;
    let on_disk = store::list(&ctx.layout)?;
    let versions: Vec<Version> = on_disk.iter().map(|i| i.version.clone()).collect();
    let remove = store::plan_cleanup(
        &versions,
        &state.protected(booted.as_ref()),
        ctx.config.keep_extra_images,
    );
    let freed = on_disk
        .iter()
        .filter(|i| remove.contains(&i.version))
        .map(|i| i.allocated)
        .sum();
    if !dry_run {
        remove_images(ctx, &mut state, &remove)?;
        finish(ctx, &mut state, "cleanup", Ok(()))?;
    }
    let kept = versions
        .into_iter()
        .filter(|v| !remove.contains(v))
        .collect();
    let report = CleanupReport {
        removed: remove,
        kept,
        freed_bytes: freed,
        dry_run,
    };
    let empty = report.removed.is_empty();
    ctx.out.report(&report, |r| {
        let verb = if r.dry_run { "would remove" } else { "removed" };
        let mut s: String = r
            .removed
            .iter()
            .map(|v| format!("{verb} image {v}\n"))
            .collect();
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
        return Err(Error::NothingToDo("no image to remove".into()).into());
    }
    Ok(())
}

/// Removes image files (menu first, so GRUB never offers a missing image), then forgets them.
pub fn remove_images(ctx: &Ctx, state: &mut State, remove: &[Version]) -> Result<()> {
    if remove.is_empty() {
        return Ok(());
    }
    let mut next = state.clone();
    for v in remove {
        next.forget(v);
    }
    let mut menu = ctx.menu(&next)?;
    menu.images.retain(|v| !remove.contains(v));
    grub::write_config(&ctx.layout.grub_cfg(), &menu)?;
    for v in remove {
        crate::fsutil::remove_durably(&store::image_path(&ctx.layout, v))?;
        let _ = std::fs::remove_file(ctx.baseline_path(v));
    }
    *state = next;
    Ok(())
}

/// Registers a complete, verified image file as prepared and adds it to the menu.
pub fn register_prepared(
    ctx: &Ctx,
    state: &mut State,
    v: &Version,
    sha256: Option<String>,
) -> Result<()> {
    state.register_prepared(v, sha256)?;
    ctx.sync_grub(state)
}

/// Makes room for an image of `bytes` (plus the margin), removing unprotected images when that
/// is enough; otherwise `NoSpace` before anything is touched.
pub fn ensure_space(ctx: &Ctx, state: &mut State, bytes: u64) -> Result<()> {
    let booted = ctx.booted()?.version;
    let protected = state.protected(booted.as_ref());
    let removable: Vec<store::ImageFile> = store::list(&ctx.layout)?
        .into_iter()
        .filter(|i| !protected.contains(&i.version))
        .collect();
    let remove = store::preflight(
        &ctx.layout,
        bytes,
        ctx.config.space_margin_mib << 20,
        &removable,
    )?;
    remove_images(ctx, state, &remove)?;
    state.save(&ctx.layout.state_file())
}

/// Prints the GRUB menu entries (for `grub.d/09_upgradectl`).
pub fn grub_entries(ctx: &mut Ctx) -> Result<()> {
    let state = ctx.load_state()?;
    let entries = grub::render_entries(&ctx.menu(&state)?);
    ctx.out.report(&entries, |e| e.clone())
}
