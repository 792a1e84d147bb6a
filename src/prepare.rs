//! `prepare`: fetch the next image in the background. Manifest (signed, fresh, newer) →
//! space → download the diff (resumable, verified) → `zfs receive` → export to
//! `images/.V.img.partial` → verify end to end → rename → register as prepared.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::deploy::{self, Ctx};
use crate::error::{refused, Error};
use crate::fetch::{self, Fetched, Limits};
use crate::manifest::{self, artifact_name, Descriptor, Manifest, PlanInput};
use crate::sign;
use crate::store;
use crate::version::Version;
use crate::zfs;

#[derive(Debug, Serialize)]
pub struct PrepareReport {
    pub version: Version,
    /// The local snapshot the diff started from; null = full stream.
    pub base: Option<Version>,
    pub artifact: String,
    pub artifact_bytes: u64,
    /// Bytes that crossed the wire in this run (0 when resumed from a verified file).
    pub downloaded_bytes: u64,
    pub resumed_bytes: u64,
    pub image_bytes: u64,
    pub seconds: f64,
}

/// The zvol on the box that receives images.
pub fn box_zvol(ctx: &Ctx) -> String {
    format!("{}/image", ctx.config.dataset)
}

fn box_id(ctx: &Ctx) -> Result<String> {
    if let Some(id) = &ctx.config.box_id {
        return Ok(id.clone());
    }
    let path = ctx.layout.in_root("/etc/machine-id");
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} for the rollout bucket (or set box_id)",
            path.display()
        )
    })
}

/// The verb. `wait`: sleep through "come back later" (bounded by download.max_wait_seconds).
pub fn prepare(ctx: &mut Ctx, pinned: Option<Version>, wait: bool) -> Result<()> {
    let _lock = ctx.lock()?;
    let report = prepare_locked(ctx, pinned.as_ref(), wait)?;
    ctx.out.report(&report, render)
}

/// `prepare` for a caller that holds the lock (`upgrade` of an unprepared version).
pub fn prepare_locked(
    ctx: &mut Ctx,
    pinned: Option<&Version>,
    wait: bool,
) -> Result<PrepareReport> {
    let deadline = Instant::now() + Duration::from_secs(ctx.config.download.max_wait_seconds);
    loop {
        match prepare_once(ctx, pinned) {
            Err(e) if wait => match e.downcast_ref::<Error>() {
                Some(Error::ComeBackLater { what, retry_after })
                    if Instant::now() + *retry_after < deadline =>
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

fn trusted_keys(ctx: &Ctx) -> Result<Vec<ed25519_dalek::VerifyingKey>> {
    ctx.config
        .trust
        .public_keys
        .iter()
        .map(|k| {
            sign::parse_public_key(k).map_err(|e| refused(format!("trust.public_keys: {e:#}")))
        })
        .collect()
}

fn prepare_once(ctx: &mut Ctx, pinned: Option<&Version>) -> Result<PrepareReport> {
    let start = Instant::now();
    let server = ctx
        .config
        .server
        .clone()
        .ok_or_else(|| refused("no `server` is configured"))?;
    let server = server.trim_end_matches('/');
    let trusted = trusted_keys(ctx)?;
    let limits = Limits {
        stall: Duration::from_secs(ctx.config.download.stall_seconds),
        min_speed: ctx.config.download.min_speed_bytes,
    };
    let client = fetch::client(&limits)?;
    let channel = ctx.config.channel.clone();

    let url = format!("{server}/v1/channels/{channel}/manifest");
    let manifest: Manifest = sign::open(
        &fetch::get_envelope(&client, &url, "the manifest")?,
        &trusted,
        "manifest",
    )?;
    let zvol = box_zvol(ctx);
    let local = zfs::snapshots(&zvol)?;
    let mut state = ctx.load_state()?;
    let plan = manifest::plan(&PlanInput {
        manifest: &manifest,
        channel: &channel,
        now: crate::server::now(),
        bucket: manifest::bucket(&box_id(ctx)?),
        newest_accepted: state.newest_accepted.as_ref(),
        pinned,
        local: &local,
    })?;
    let target = plan.release.version.clone();
    if store::image_path(&ctx.layout, &target).is_file() && state.prepared.as_ref() == Some(&target)
    {
        return Err(Error::NothingToDo(format!("image {target} is already prepared")).into());
    }
    deploy::ensure_space(ctx, &mut state, plan.release.image.size)?;

    let name = artifact_name(plan.base.as_ref(), &target);
    let durl = format!("{server}/v1/artifacts/{name}.descriptor");
    let descriptor: Descriptor = sign::open(
        &fetch::get_envelope(&client, &durl, &name)?,
        &trusted,
        &name,
    )?;
    if descriptor.name != name || descriptor.to != target || descriptor.from != plan.base {
        return Err(Error::SignatureInvalid(format!(
            "the descriptor at {durl} describes {}, not {name}",
            descriptor.name
        ))
        .into());
    }
    let dir = ctx.layout.downloads_dir();
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(&name);
    let aurl = format!("{server}/v1/artifacts/{name}");
    let fetched = download_with_progress(ctx, &client, &aurl, &file, &descriptor, &limits)?;

    ctx.out.event(
        "receive",
        &serde_json::json!({"artifact": name}),
        &format!("receiving {name} into {zvol}"),
    )?;
    receive(&file, &zvol, plan.base.as_ref(), &target)
        .with_context(|| format!("receiving {name} into {zvol}"))?;

    let device = zfs::snapshot_device(&zvol, &target)?;
    let partial = store::partial_path(&ctx.layout, &target);
    ctx.out.event(
        "export",
        &serde_json::json!({"version": target}),
        &format!("exporting image {target}"),
    )?;
    crate::export::export(&device, &partial, &plan.release.image)?;
    let image = store::image_path(&ctx.layout, &target);
    std::fs::rename(&partial, &image)?;
    crate::fsutil::fsync_dir(&ctx.layout.images_dir())?;
    // GRUB must read the whole image before any menu entry names it.
    crate::fsutil::checkpoint(&image)?;

    state.accept(&target)?;
    deploy::register_prepared(
        ctx,
        &mut state,
        &target,
        Some(plan.release.image.sha256.clone()),
    )?;
    state.record("prepare", &Ok(()), crate::server::now());
    state.save(&ctx.layout.state_file())?;
    let _ = std::fs::remove_file(&file);
    Ok(PrepareReport {
        version: target,
        base: plan.base,
        artifact: name,
        artifact_bytes: descriptor.size,
        downloaded_bytes: fetched.downloaded,
        resumed_bytes: fetched.resumed,
        image_bytes: plan.release.image.size,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn download_with_progress(
    ctx: &mut Ctx,
    client: &reqwest::blocking::Client,
    url: &str,
    file: &std::path::Path,
    d: &Descriptor,
    limits: &Limits,
) -> Result<Fetched> {
    use std::io::IsTerminal;
    let json = ctx.out.is_json();
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
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
    let r = fetch::download(client, url, file, d, limits, &mut progress);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    r
}

/// Decompresses the verified artifact on all cores into `zfs receive -s -F`. A receive left
/// half done by an interruption is aborted first: the artifact is local and verified, so
/// receiving it again costs no download.
fn receive(file: &std::path::Path, zvol: &str, base: Option<&Version>, to: &Version) -> Result<()> {
    if zfs::snapshots(zvol)?.contains(to) {
        return Ok(());
    }
    if let Some((parent, _)) = zvol.rsplit_once('/') {
        zfs::ensure_filesystem(parent)?;
    }
    if zfs::exists(zvol)? {
        zfs::abort_receive(zvol)?;
    } else if base.is_some() {
        anyhow::bail!("{zvol} does not exist; an incremental stream needs its base");
    }
    let cmd = zfs::receive_cmd(zvol);
    let mut child = cmd
        .to_command()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cmd.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut xz = xz_reader(std::fs::File::open(file)?)?;
    let copied = std::io::copy(&mut xz, &mut stdin).and_then(|_| stdin.flush());
    drop(stdin);
    let output = child.wait_with_output()?;
    crate::cmd::check_status(&cmd, &output)?;
    copied.context("decompressing into zfs receive")?;
    Ok(())
}

/// Decompresses xz on all cores (the server writes independent blocks for this).
pub fn xz_reader<R: std::io::Read>(
    input: R,
) -> Result<liblzma::read::XzDecoder<std::io::BufReader<R>>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads)
        .memlimit_stop(u64::MAX)
        .decoder()
        .context("creating the xz decoder")?;
    Ok(liblzma::read::XzDecoder::new_stream(
        std::io::BufReader::new(input),
        stream,
    ))
}
