//! `prepare`: fetch the next image in the background. Manifest (signed, fresh, newer) →
//! space → download the diff (resumable, verified) → `zfs receive` → export to
//! `images/.V.img.partial` → verify end to end → rename → register as prepared.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

mod choice;
pub mod export;
pub mod fetch;
pub mod metadata;
pub mod receive;
pub mod stream;

use crate::appliance::ctx::Ctx;
use crate::appliance::state::State;
use crate::appliance::{identity, images, pool};
use crate::core::manifest::{artifact_name, Descriptor, Encoding};
use crate::core::plan::{self, PlanInput};
use crate::core::version::Version;
use crate::error::{refused, Error};
use crate::sys::clock::now;
use crate::sys::{fsutil, zfs};
use choice::{choose_artifact, full_stream_may_help, host_bytes};
use fetch::{Fetched, Limits};
use metadata::Metadata;
use receive::receive;

#[derive(Debug, Serialize)]
pub struct PrepareReport {
    pub version: Version,
    /// The local snapshot the diff started from; null = full stream.
    pub base: Option<Version>,
    pub artifact: String,
    /// How the artifact was compressed (`xz`, `zstd-ref`); null when nothing was downloaded.
    pub encoding: Option<Encoding>,
    pub artifact_bytes: u64,
    /// Bytes that crossed the wire in this run (0 when resumed from a verified file).
    pub downloaded_bytes: u64,
    pub resumed_bytes: u64,
    pub image_bytes: u64,
    pub seconds: f64,
}

/// `prepare` for a caller that holds the lock (`upgrade` of an unprepared version).
pub fn prepare_locked(
    ctx: &mut Ctx,
    pinned: Option<&Version>,
    wait: bool,
) -> Result<PrepareReport> {
    let start = Instant::now();
    let max_wait = Duration::from_secs(ctx.config.download.max_wait_seconds);
    loop {
        match prepare_once(ctx, pinned) {
            Err(e) if wait => match e.downcast_ref::<Error>() {
                // Durations, not instants: no overflow whatever the server said.
                Some(Error::ComeBackLater { what, retry_after })
                    if start.elapsed().saturating_add(*retry_after) < max_wait =>
                {
                    let secs = retry_after.as_secs().clamp(1, 300);
                    ctx.out.event(
                        "come-back-later",
                        &serde_json::json!({"what": what, "retry_after": secs}),
                        &format!("the server is preparing {what}; retrying in {secs}s"),
                    )?;
                    std::thread::sleep(Duration::from_secs(secs));
                }
                _ => return Err(e),
            },
            other => return other,
        }
    }
}

/// One attempt.
fn prepare_once(ctx: &mut Ctx, pinned: Option<&Version>) -> Result<PrepareReport> {
    let start = Instant::now();
    let server = ctx
        .config
        .server
        .clone()
        .ok_or_else(|| refused("no `server` is configured"))?;
    let server = server.trim_end_matches('/');
    let limits = Limits {
        stall: Duration::from_secs(ctx.config.download.stall_seconds),
        min_speed: ctx.config.download.min_speed_bytes,
    };
    let client = fetch::client(&limits)?;
    let channel = ctx.config.channel.clone();

    let meta = Metadata::load(ctx, server)?;
    let manifest = meta.manifest(&channel, ctx.config.group.as_deref())?;
    let zvol = pool::zvol(ctx);
    let local = zfs::snapshots(&zvol)?;
    let mut state = ctx.load_state()?;
    let refetch = state
        .newest_accepted
        .clone()
        .filter(|v| !usable_image(ctx, &state, v));
    let plan = plan::plan(&PlanInput {
        manifest: &manifest,
        channel: &channel,
        now: now(),
        bucket: plan::bucket(&identity::box_id(ctx)?),
        newest_accepted: state.newest_accepted.as_ref(),
        refetch: refetch.as_ref(),
        pinned,
        local: &local,
    })?;
    let target = plan.release.version.clone();
    if usable_image(ctx, &state, &target) && state.prepared.as_ref() == Some(&target) {
        return Err(Error::NothingToDo(format!("image {target} is already prepared")).into());
    }
    // An image file of the target that is not usable (half-migrated) is replaced.
    fsutil::remove_durably(&images::image_path(&ctx.layout, &target))?;

    let mut report = PrepareReport {
        version: target.clone(),
        base: plan.base.clone(),
        artifact: String::new(),
        encoding: None,
        artifact_bytes: 0,
        downloaded_bytes: 0,
        resumed_bytes: 0,
        image_bytes: plan.release.image.size,
        seconds: 0.0,
    };
    let mut download = None;
    if local.contains(&target) {
        // Received before (an image exported again after an interrupted migration, or one
        // whose file went missing): nothing to download.
        images::remove_leftovers(&ctx.layout, &[])?;
        images::ensure_space(ctx, &mut state, plan.release.image.size)?;
        report.base = None;
        report.artifact = "local-snapshot".into();
    } else {
        let max_memory = ctx.config.download.max_decoder_mib << 20;
        let descriptor_of = |base: Option<&Version>| -> Result<Descriptor> {
            meta.descriptor(&client, server, &artifact_name(base, &target))
        };
        // A base whose diff did not receive before: no diff from it is asked for again (the
        // retries while the server builds the full stream downloaded and failed it each time).
        let base = plan
            .base
            .as_ref()
            .filter(|b| state.diff_failed_from.as_ref() != Some(*b));
        let image_size = plan.release.image.size;
        let (mut base, mut descriptor) = choose_artifact(&descriptor_of, base, max_memory, &|d| {
            images::could_fit(ctx, &state, host_bytes(d, d.size, image_size, max_memory))
        })?;
        let fetched = loop {
            let fetched = fetch_and_receive(
                ctx,
                &client,
                server,
                &zvol,
                &mut state,
                base.as_ref(),
                &target,
                &descriptor,
                &limits,
                plan.release.image.size,
            )?;
            match fetched {
                Ok(fetched) => break fetched,
                // A verified diff whose receive failed: see `full_stream_may_help`.
                Err(e) if base.is_some() && full_stream_may_help(&e) => {
                    tracing::warn!("{}: {e:#}; taking the full stream", descriptor.name);
                    fsutil::remove_durably(&ctx.layout.downloads_dir().join(&descriptor.name))?;
                    // Remembered before anything else can stop this run (come back later).
                    state.diff_failed_from = base.take();
                    state.save(&ctx.layout.state_file())?;
                    descriptor = descriptor_of(None)?;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("receiving {} into {zvol}", descriptor.name))
                }
            }
        };
        if base.is_none() {
            // The full stream replaced the pool's snapshots, the foreign base among them.
            state.diff_failed_from = None;
        }
        report.base = base.clone();
        report.artifact = descriptor.name.clone();
        report.encoding = Some(descriptor.encoding);
        report.artifact_bytes = descriptor.size;
        report.downloaded_bytes = fetched.downloaded;
        report.resumed_bytes = fetched.resumed;
        download = Some(ctx.layout.downloads_dir().join(&descriptor.name));
    }

    let device = zfs::snapshot_device(&zvol, &target)?;
    let partial = images::partial_path(&ctx.layout, &target);
    ctx.out.event(
        "export",
        &serde_json::json!({"version": target}),
        &format!("exporting image {target}"),
    )?;
    export::export(&device, &partial, &plan.release.image)?;
    crate::fail_point!("prepare::exported");
    let image = images::image_path(&ctx.layout, &target);
    std::fs::rename(&partial, &image)?;
    fsutil::fsync_dir(&ctx.layout.images_dir())?;
    // GRUB must read the whole image before any menu entry names it.
    fsutil::checkpoint(&image)?;
    crate::fail_point!("prepare::renamed");

    state.accept(&target)?;
    if state.half_migrated(&target) {
        state.reexported(&target);
        images::sync_grub(ctx, &state)?;
    } else {
        images::register_prepared(
            ctx,
            &mut state,
            &target,
            Some(plan.release.image.sha256.clone()),
        )?;
    }
    state.record("prepare", &Ok(()), now());
    state.save(&ctx.layout.state_file())?;
    if let Some(file) = download {
        fsutil::remove_durably(&file)?;
    }
    pool::prune(ctx, &state)?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Downloads `descriptor`'s artifact (resuming a partial one) into the downloads directory and
/// receives it into `zvol`. The outer error is the download's; the inner one the receive's
/// (the caller may take another artifact after it).
#[allow(clippy::too_many_arguments)]
fn fetch_and_receive(
    ctx: &mut Ctx,
    client: &reqwest::blocking::Client,
    server: &str,
    zvol: &str,
    state: &mut State,
    base: Option<&Version>,
    target: &Version,
    descriptor: &Descriptor,
    limits: &Limits,
    image_size: u64,
) -> Result<Result<Fetched>> {
    let name = &descriptor.name;
    let dir = ctx.layout.downloads_dir();
    let file = dir.join(name);
    let partial = fetch::partial_path(&file);
    // Everything this prepare writes on the host partition: the rest of the download, then
    // the image (sparse, so at most its size).
    images::remove_leftovers(&ctx.layout, &[file.clone(), partial.clone()])?;
    let have = [&file, &partial]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    let to_download = descriptor.size.saturating_sub(have);
    let max_memory = ctx.config.download.max_decoder_mib << 20;
    let need = host_bytes(descriptor, to_download, image_size, max_memory);
    images::ensure_space(ctx, state, need)?;
    // Only now: a prepare that does not fit writes nothing, not even the directory.
    std::fs::create_dir_all(&dir)?;
    crate::fail_point!("prepare::planned");

    let url = format!("{server}/v1/artifacts/{name}");
    ctx.out.event(
        "receive",
        &serde_json::json!({"artifact": name, "encoding": descriptor.encoding}),
        &format!("receiving {name} into {zvol} as it downloads"),
    )?;
    let on_disk = receive::on_disk(descriptor, max_memory, &dir);
    if let Some(disk) = &on_disk {
        tracing::info!(
            "{name}: frames of up to {} bytes, above download.max_decoder_mib: decoded through \
             a file in {}",
            disk.max_bytes,
            dir.display()
        );
    }
    let (fetched, received) = stream::overlap(
        |verified| download_and_publish(ctx, client, &url, &file, descriptor, limits, verified),
        |input| {
            receive(
                input,
                descriptor.encoding,
                zvol,
                base,
                target,
                max_memory,
                on_disk,
            )
        },
    );
    let outcome = settle(name, fetched, received)?;
    if outcome.is_ok() {
        crate::fail_point!("prepare::received");
    }
    Ok(outcome)
}

/// What a download and the receive that read it come to: the download's error wins, being
/// the cause of the receive's (its input stopped), unless the download stopped because the
/// receive failed; else the receive's result.
fn settle(name: &str, fetched: Result<Fetched>, received: Result<()>) -> Result<Result<Fetched>> {
    match (fetched, received) {
        (Err(e), Err(r)) if e.downcast_ref::<stream::ReceiveStopped>().is_some() => {
            tracing::debug!("the download of {name} stopped with the receive: {e:#}");
            Ok(Err(r))
        }
        (Err(e), received) => {
            if let Err(r) = received {
                tracing::debug!("the receive of {name} stopped with the download: {r:#}");
            }
            Err(e)
        }
        (Ok(fetched), received) => Ok(received.map(|()| fetched)),
    }
}

/// Downloads the artifact to `file`, publishing each verified chunk to `verified`, and then
/// its end: complete once the whole sha256 matched and `prepare::downloaded` passed (so a
/// fault there leaves the receive unfinished, as it was before the two overlapped), or the
/// failure, which stops the receive reading it.
fn download_and_publish(
    ctx: &mut Ctx,
    client: &reqwest::blocking::Client,
    url: &str,
    file: &std::path::Path,
    d: &Descriptor,
    limits: &Limits,
    verified: &stream::Verified,
) -> Result<Fetched> {
    let fetched = download_with_progress(ctx, client, url, file, d, limits, verified)
        .and_then(|fetched| downloaded_point().map(|()| fetched));
    verified.end(fetched, d.size)
}

/// The fail point after a complete, verified download (its `return` leaves this function).
fn downloaded_point() -> Result<()> {
    crate::fail_point!("prepare::downloaded");
    Ok(())
}

/// Whether `v`'s image file is on disk, registered and whole (not left half-migrated).
fn usable_image(ctx: &Ctx, state: &State, v: &Version) -> bool {
    state.state_of(v).is_some()
        && !state.half_migrated(v)
        && images::image_path(&ctx.layout, v).is_file()
}

fn download_with_progress(
    ctx: &mut Ctx,
    client: &reqwest::blocking::Client,
    url: &str,
    file: &std::path::Path,
    d: &Descriptor,
    limits: &Limits,
    verified: &stream::Verified,
) -> Result<Fetched> {
    use std::io::IsTerminal;
    let json = ctx.out.is_json();
    // No bar under -q (info is off then), as with any progress line.
    let bar = (!json && std::io::stderr().is_terminal() && tracing::enabled!(tracing::Level::INFO))
        .then(|| {
            let b = indicatif::ProgressBar::new(d.size);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("template"),
            );
            b.set_message(d.name.clone());
            b
        });
    let mut last_event = Instant::now();
    let out = &mut ctx.out;
    let mut progress = |done: u64, total: u64| {
        if let Some(b) = &bar {
            b.set_position(done);
        } else if json && (last_event.elapsed() > Duration::from_secs(1) || done == total) {
            last_event = Instant::now();
            let _ = out.event(
                "progress",
                &serde_json::json!({"artifact": d.name, "bytes": done, "total": total}),
                "",
            );
        }
    };
    let r = fetch::download_watched(client, url, file, d, limits, &mut progress, Some(verified));
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_download_wins_over_the_receive_it_stopped() {
        let stopped = || Err(anyhow::anyhow!("decompressing: the download stopped"));
        let err = settle("a", Err(anyhow::anyhow!("chunk 3 mismatch")), stopped()).unwrap_err();
        assert_eq!(format!("{err:#}"), "chunk 3 mismatch");
        let err = settle("a", Err(anyhow::anyhow!("timed out")), Ok(())).unwrap_err();
        assert_eq!(format!("{err:#}"), "timed out");
        // A good download: the receive's own result, for the caller to act on (another
        // artifact after a wrong reference).
        let inner = settle("a", Ok(Fetched::default()), Err(anyhow::anyhow!("zfs"))).unwrap();
        assert_eq!(format!("{:#}", inner.unwrap_err()), "zfs");
        let done = Fetched {
            downloaded: 5,
            resumed: 7,
        };
        let got = settle("a", Ok(done), Ok(())).unwrap().unwrap();
        assert_eq!((got.downloaded, got.resumed), (5, 7));
        // A download the failed receive stopped: the receive's error is the cause.
        let stopped_by = Err(stream::ReceiveStopped("zfs: destination exists".into()).into());
        let inner = settle(
            "a",
            stopped_by,
            Err(anyhow::anyhow!("zfs: destination exists")),
        );
        let inner = inner.unwrap().unwrap_err();
        assert_eq!(format!("{inner:#}"), "zfs: destination exists");
    }
}
