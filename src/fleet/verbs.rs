//! The fleet verbs of the server's operator: `fleet enroll` (a box's identity, at the
//! factory) and `fleet status` (each wave rollout).

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::cli::{EnrollArgs, FleetCommand};
use crate::core::report::check_label;
use crate::core::sign::{parse_public_key, public_key_string};
use crate::error::refused;
use crate::fleet::store::{Db, Enrolled};
use crate::fleet::view;
use crate::output::Output;
use crate::sys::clock::now;

pub fn fleet(cmd: FleetCommand, out: Output) -> Result<()> {
    match cmd {
        FleetCommand::Enroll(a) => enroll(a, out),
        FleetCommand::Status(a) => status(&view::fleet(&Db::open_in(&a.store)?)?, out),
    }
}

fn status(v: &view::FleetView, mut out: Output) -> Result<()> {
    out.report(v, |v| {
        let mut lines: Vec<String> = v.rollouts.iter().map(view::line).collect();
        if lines.is_empty() {
            lines.push("no wave rollouts".into());
        }
        lines.push("boxes by version:".into());
        if v.versions.is_empty() {
            lines.push("  no boxes enrolled".into());
        }
        lines.extend(
            view::version_lines(&v.versions)
                .iter()
                .map(|l| format!("  {l}")),
        );
        let now = now();
        for h in &v.reboot_slots {
            let lease = match h.expires > now {
                true => format!("lease {}s left", h.expires - now),
                false => "lease run out: free".into(),
            };
            lines.push(format!("reboot slot of {}: {} ({lease})", h.group, h.node));
        }
        lines.join("\n")
    })
}

/// What `upgradectl --json identity` prints on the box.
#[derive(Debug, Deserialize)]
struct IdentityFile {
    box_id: String,
    public_key: String,
    #[serde(default)]
    group: Option<String>,
}

fn enroll(a: EnrollArgs, mut out: Output) -> Result<()> {
    let (box_id, key, group) = match &a.identity {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let id: IdentityFile = serde_json::from_str(text.trim())
                .map_err(|e| refused(format!("{}: {e}", path.display())))?;
            (id.box_id, id.public_key, a.group.clone().or(id.group))
        }
        None => (
            a.box_id.clone().unwrap_or_default(),
            a.public_key.clone().unwrap_or_default(),
            a.group.clone(),
        ),
    };
    let public_key =
        public_key_string(&parse_public_key(&key).map_err(|e| refused(format!("{e:#}")))?);
    let group = group.unwrap_or_default();
    check_label("box id", &box_id, false)?;
    check_label("group", &group, true)?;
    let b = Enrolled {
        box_id,
        public_key,
        group,
    };
    Db::open_in(&a.store.store)?.enroll(&b, now())?;
    out.report(
        &serde_json::json!({"box_id": b.box_id, "public_key": b.public_key, "group": b.group}),
        |_| format!("enrolled {} (group {:?})", b.box_id, b.group),
    )
}
