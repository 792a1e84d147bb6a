//! `upgradectl status`: everything a person or a check-in agent needs to know about the box.
//! The JSON shape is documented in the README and stable.

use anyhow::Result;
use serde::Serialize;

use crate::appliance::bootinfo::BootReport;
use crate::appliance::ctx::Ctx;
use crate::appliance::gate;
use crate::appliance::grub;
use crate::appliance::images;
use crate::appliance::rebootlock;
use crate::appliance::report;
use crate::appliance::state::{ImageState, Operation, Trying};
use crate::appliance::trust;
use crate::core::report::Report;
use crate::core::version::Version;
use crate::sys::fsutil;

#[derive(Debug, Serialize)]
pub struct Status {
    pub booted: Option<Version>,
    /// The image GRUB asked for this boot (differs from `booted` after an initramfs fallback).
    pub requested: Option<Version>,
    pub default: Option<Version>,
    pub previous: Option<Version>,
    pub prepared: Option<Version>,
    pub trying: Option<TrialStatus>,
    pub newest_accepted: Option<Version>,
    pub images: Vec<ImageStatus>,
    pub host: HostStatus,
    /// Files interrupted runs left on the host partition; `cleanup` and the next `prepare`
    /// remove them.
    pub leftovers: Vec<images::Leftover>,
    /// The ZFS pool images are received into (null without ZFS or with the pool not imported).
    pub pool: Option<crate::sys::zfs::PoolUsage>,
    pub last_operation: Option<Operation>,
    /// The initramfs's report of the last boot (persistent on the host partition).
    pub last_boot: Option<BootReport>,
    /// Reports to the fleet server not acknowledged yet (sent at the next run).
    pub pending_reports: Vec<Report>,
    /// The version of the TUF root this box trusts now (after the rotations it followed);
    /// null before its first verified load.
    pub trusted_root: Option<u64>,
    /// Why the prepared image waits for `upgrade` (the timer's): outside the maintenance
    /// window, busy checks, inhibitor locks. Empty when it may switch or nothing is prepared.
    pub waiting: Vec<String>,
    /// The FleetLock reboot slot this box holds, or may hold, and gives back at its next
    /// `confirm`.
    pub reboot_lock: Option<rebootlock::Held>,
}

#[derive(Debug, Serialize)]
pub struct TrialStatus {
    pub version: Version,
    pub from: Version,
    /// GRUB will boot it once at the next boot.
    pub armed: bool,
    /// GRUB already booted it once.
    pub attempted: bool,
}

#[derive(Debug, Serialize)]
pub struct ImageStatus {
    pub version: Version,
    /// prepared, trying, good, bad, or unknown (a file upgradectl did not register).
    pub state: String,
    pub size: u64,
    pub allocated: u64,
    pub booted: bool,
    pub default: bool,
    pub in_menu: bool,
    /// A migration into it was interrupted: `prepare` exports it again before it is used.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub half_migrated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct HostStatus {
    pub path: String,
    pub free_bytes: Option<u64>,
}

pub fn gather(ctx: &Ctx) -> Result<Status> {
    let state = ctx.load_state()?;
    let booted = ctx.booted()?;
    let env = grub::read_env(&ctx.layout.grubenv()).unwrap_or_default();
    let trying = state
        .trying
        .as_ref()
        .map(|Trying { version, from }| TrialStatus {
            version: version.clone(),
            from: from.clone(),
            armed: env.get(grub::NEXT_ENTRY) == Some(&version.grub_id()),
            attempted: env.get(grub::ATTEMPTED) == Some(&version.grub_id()),
        });
    let mut images = Vec::new();
    for file in images::list(&ctx.layout)?.into_iter().rev() {
        let record = state.images.get(&file.version);
        let state_name = match record.map(|r| r.state) {
            Some(ImageState::Prepared) => "prepared",
            Some(ImageState::Trying) => "trying",
            Some(ImageState::Good) => "good",
            Some(ImageState::Bad) => "bad",
            None => "unknown",
        };
        images.push(ImageStatus {
            booted: booted.version.as_ref() == Some(&file.version),
            default: state.default.as_ref() == Some(&file.version),
            in_menu: state.bootable(&file.version),
            half_migrated: state.half_migrated(&file.version),
            state: state_name.to_owned(),
            size: file.size,
            allocated: file.allocated,
            sha256: record.and_then(|r| r.sha256.clone()),
            reason: record.and_then(|r| r.reason.clone()),
            version: file.version,
        });
    }
    let waiting = match (&state.prepared, &state.trying) {
        (Some(_), None) => gate::reasons(ctx)?,
        _ => Vec::new(),
    };
    Ok(Status {
        waiting,
        reboot_lock: rebootlock::held(ctx)?,
        booted: booted.version,
        requested: booted.requested,
        default: state.default,
        previous: state.previous,
        prepared: state.prepared,
        trying,
        newest_accepted: state.newest_accepted,
        images,
        host: HostStatus {
            path: ctx.layout.host().display().to_string(),
            free_bytes: fsutil::free_bytes(ctx.layout.host()).ok(),
        },
        leftovers: images::leftovers(&ctx.layout)?,
        pool: crate::appliance::pool::usage(ctx),
        last_operation: state.last_operation,
        last_boot: BootReport::read(&ctx.layout.boot_report())?,
        pending_reports: report::pending(&ctx.layout)?,
        trusted_root: trust::followed_root_version(&ctx.layout),
    })
}

fn opt(v: &Option<Version>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), Version::to_string)
}

/// Human rendering.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    o += &format!("booted:    {}", opt(&s.booted));
    if s.requested.is_some() && s.requested != s.booted {
        o += &format!(
            " (GRUB asked for {}; the initramfs fell back)",
            opt(&s.requested)
        );
    }
    o += &format!(
        "\ndefault:   {}\nprevious:  {}\nprepared:  {}\n",
        opt(&s.default),
        opt(&s.previous),
        opt(&s.prepared)
    );
    if let Some(t) = &s.trying {
        let how = if t.armed {
            "armed for the next boot"
        } else if t.attempted {
            "booted once, awaiting confirm"
        } else {
            "armed"
        };
        o += &format!("trying:    {} from {} ({how})\n", t.version, t.from);
    }
    for w in &s.waiting {
        o += &format!("waiting:   {w}\n");
    }
    if let Some(l) = &s.reboot_lock {
        o += &format!("reboot lock: a slot of group {} at {}\n", l.group, l.url);
    }
    o += "images:\n";
    for i in &s.images {
        let mut marks = Vec::new();
        if i.booted {
            marks.push("booted");
        }
        if i.default {
            marks.push("default");
        }
        if i.half_migrated {
            marks.push("HALF-MIGRATED: prepare exports it again");
        }
        o += &format!(
            "  {:<12} {:<9} {:>7} MiB ({} MiB on disk){}{}\n",
            i.version.to_string(),
            i.state,
            i.size >> 20,
            i.allocated >> 20,
            if marks.is_empty() {
                String::new()
            } else {
                format!("  [{}]", marks.join(", "))
            },
            i.reason
                .as_ref()
                .map(|r| format!("  {r}"))
                .unwrap_or_default()
        );
    }
    if let Some(free) = s.host.free_bytes {
        o += &format!("host:      {} ({} MiB free)\n", s.host.path, free >> 20);
    }
    if let Some(p) = &s.pool {
        o += &format!(
            "pool:      {} ({} of {} MiB used)\n",
            p.name,
            p.allocated >> 20,
            p.size >> 20
        );
    }
    if !s.leftovers.is_empty() {
        let bytes: u64 = s.leftovers.iter().map(|l| l.allocated).sum();
        o += &format!(
            "leftovers: {} file(s), {} MiB from interrupted runs (cleanup or the next prepare removes them)\n",
            s.leftovers.len(),
            bytes >> 20
        );
    }
    if let Some(op) = &s.last_operation {
        o += &format!(
            "last op:   {} {}",
            op.verb,
            if op.ok { "ok" } else { "FAILED" }
        );
        if let Some(e) = &op.error {
            o += &format!(": {e}");
        }
        o += "\n";
    }
    if let Some(b) = &s.last_boot {
        o += &format!(
            "last boot: {} (requested {}){}\n",
            b.booted.as_deref().unwrap_or("-"),
            b.requested.as_deref().unwrap_or("-"),
            if b.fallback {
                format!(
                    ", FELL BACK: {}{}",
                    b.reason.as_deref().unwrap_or("?"),
                    if b.redirected {
                        " (rebooted into the fallback's own entry)"
                    } else {
                        " (under the requested image's kernel)"
                    }
                )
            } else {
                String::new()
            }
        );
    }
    if !s.pending_reports.is_empty() {
        o += &format!(
            "reports:   {} not yet acknowledged by the server\n",
            s.pending_reports.len()
        );
    }
    if let Some(v) = s.trusted_root {
        o += &format!("trust:     TUF root version {v}\n");
    }
    o
}
