//! The box's reports to the fleet server: each step's outcome is spooled on the host partition
//! (`reports/`, one file each, written atomically) and sent, signed with the box's identity
//! key, to `POST /v1/reports`. Sending never fails or blocks a verb for long: a short timeout,
//! errors only logged, what is not acknowledged stays spooled and is sent at the next run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::appliance::ctx::Ctx;
use crate::appliance::identity;
use crate::appliance::paths::Layout;
use crate::core::report::{new_id, Outcome, Report, MAX_BOOT_REPORT};
use crate::core::sign::seal;
use crate::core::version::Version;
use crate::sys::clock::now;
use crate::sys::fsutil::atomic_write;

/// Most reports kept spooled; beyond it the oldest are dropped (a server gone for good).
pub const MAX_SPOOLED: usize = 256;
/// Most reports sent in one run.
const MAX_SENT_PER_RUN: usize = 32;
/// How long one report may take to send (connect included).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// No report is started after this much time sending in one run (so a slow server holds a
/// verb up at most this plus one `SEND_TIMEOUT`).
const SEND_BUDGET: Duration = Duration::from_secs(10);

/// What a verb reports.
#[derive(Debug, Clone)]
pub struct Step {
    pub outcome: Outcome,
    pub from: Option<Version>,
    pub to: Option<Version>,
    pub failed_check: Option<String>,
    /// When the step began (Unix seconds).
    pub started: u64,
}

/// Spools `step`'s report and sends what is pending. Never fails: problems are logged.
pub fn report(ctx: &Ctx, step: Step) {
    if let Err(e) = spool(ctx, &step) {
        tracing::warn!("spooling the {} report: {e:#}", step.outcome.as_str());
    }
    flush(ctx);
}

/// Sends the spooled reports, oldest first, until one is not acknowledged. Never fails.
pub fn flush(ctx: &Ctx) {
    if let Err(e) = try_flush(ctx) {
        tracing::warn!("sending reports (kept for the next run): {e:#}");
    }
}

fn spool(ctx: &Ctx, step: &Step) -> Result<()> {
    let boot_report = std::fs::read_to_string(ctx.layout.boot_report())
        .ok()
        .map(|mut s| {
            let mut cut = s.len().min(MAX_BOOT_REPORT);
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s
        });
    let r = Report {
        id: new_id(),
        box_id: identity::box_id(ctx)?,
        group: ctx.config.group.clone().unwrap_or_default(),
        sent: 0,
        from: step.from.clone(),
        to: step.to.clone(),
        outcome: step.outcome,
        failed_check: step.failed_check.clone(),
        boot_report,
        started: step.started,
        seconds: now().saturating_sub(step.started) as f64,
    };
    let dir = ctx.layout.reports_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!("{nanos:020}-{}.json", r.id);
    atomic_write(&dir.join(name), &serde_json::to_vec(&r)?, 0o644)?;
    let files = spooled(&dir)?;
    for old in files.iter().take(files.len().saturating_sub(MAX_SPOOLED)) {
        tracing::warn!("dropping the oldest spooled report {}", old.display());
        std::fs::remove_file(old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// The spooled report files, oldest first.
fn spooled(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut files = Vec::new();
    for e in entries {
        let path = e?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with(".json") && !name.starts_with('.') {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The reports not yet acknowledged by the server (unreadable files are skipped).
pub fn pending(layout: &Layout) -> Result<Vec<Report>> {
    let mut out = Vec::new();
    for f in spooled(&layout.reports_dir())? {
        match std::fs::read(&f).map(|d| serde_json::from_slice::<Report>(&d)) {
            Ok(Ok(r)) => out.push(r),
            _ => tracing::warn!("unreadable spooled report {}", f.display()),
        }
    }
    Ok(out)
}

/// An HTTP client for the small requests to fleet servers (reports, the reboot lock): each
/// request, connect included, takes at most `timeout`.
pub fn client(timeout: Duration) -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout)
        .user_agent(concat!("upgradectl/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("creating the HTTP client")
}

fn try_flush(ctx: &Ctx) -> Result<()> {
    let files = spooled(&ctx.layout.reports_dir())?;
    if files.is_empty() {
        return Ok(());
    }
    let Some(server) = &ctx.config.server else {
        tracing::debug!("no server configured; {} reports stay spooled", files.len());
        return Ok(());
    };
    let Some(key) = identity::load(&ctx.layout)? else {
        tracing::info!("no identity key (run `upgradectl identity`); reports stay spooled");
        return Ok(());
    };
    let client = client(SEND_TIMEOUT)?;
    let url = format!("{}/v1/reports", server.trim_end_matches('/'));
    let start = std::time::Instant::now();
    for f in files.iter().take(MAX_SENT_PER_RUN) {
        if start.elapsed() > SEND_BUDGET {
            tracing::info!("sending reports took {SEND_BUDGET:?}; the rest wait for the next run");
            break;
        }
        let Ok(mut r) = std::fs::read(f)
            .map_err(anyhow::Error::from)
            .and_then(|d| Ok(serde_json::from_slice::<Report>(&d)?))
        else {
            tracing::warn!("removing unreadable spooled report {}", f.display());
            std::fs::remove_file(f)?;
            continue;
        };
        // Signed now, for this attempt: the server refuses copies older than 10 minutes; the
        // id stays, so a copy whose answer was lost is stored once.
        r.sent = now();
        let body = serde_json::to_vec(&seal(&r, &key)?)?;
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        anyhow::ensure!(
            status.is_success(),
            "POST {url}: {status}: {}",
            resp.text().unwrap_or_default().trim()
        );
        std::fs::remove_file(f).with_context(|| format!("removing {}", f.display()))?;
    }
    Ok(())
}
