//! `releases`: what the server offers this box, verified end to end through the TUF repository
//! (the same verification `prepare` relies on), and which release `prepare` would take. Reads
//! no image and downloads no artifact; it persists the metadata it accepted, like any load.

use anyhow::Result;
use serde::Serialize;

use crate::appliance::ctx::Ctx;
use crate::appliance::identity;
use crate::appliance::trust::Trusted;
use crate::core::manifest::Release;
use crate::core::plan::{self, PlanInput};
use crate::core::version::Version;
use crate::error::{refused, Error};
use crate::sys::clock::now;

#[derive(Debug, Serialize)]
pub struct Offer {
    pub channel: String,
    pub group: Option<String>,
    /// The TUF root version the box trusts now (after any rotation it followed).
    pub root_version: u64,
    pub bucket: u8,
    pub releases: Vec<Release>,
    /// What `prepare` would take; null with `why_not` when nothing.
    pub next: Option<Version>,
    pub why_not: Option<String>,
}

pub fn releases(ctx: &mut Ctx) -> Result<()> {
    let server = (ctx.config.server.clone()).ok_or_else(|| refused("no `server` is configured"))?;
    let trusted = Trusted::load(&ctx.layout, &ctx.config, &server)?;
    let channel = ctx.config.channel.clone();
    let group = ctx.config.group.clone();
    let manifest = trusted.manifest(&channel, group.as_deref(), now())?;
    let state = ctx.load_state()?;
    let bucket = plan::bucket(&identity::box_id(ctx)?);
    let picked = plan::plan(&PlanInput {
        manifest: &manifest,
        channel: &channel,
        now: now(),
        bucket,
        newest_accepted: state.newest_accepted.as_ref(),
        refetch: None,
        pinned: None,
        local: &[],
    });
    let (next, why_not) = match picked {
        Ok(p) => (Some(p.release.version), None),
        Err(e)
            if e.downcast_ref::<Error>()
                .is_some_and(|e| matches!(e, Error::NothingToDo(_))) =>
        {
            (None, Some(e.to_string()))
        }
        Err(e) => return Err(e),
    };
    let offer = Offer {
        channel,
        group,
        root_version: trusted.root_version(),
        bucket,
        releases: manifest.releases,
        next,
        why_not,
    };
    ctx.out.report(&offer, render)
}

fn render(o: &Offer) -> String {
    let mut s = format!(
        "channel {} (root v{}, bucket {}):\n",
        o.channel, o.root_version, o.bucket
    );
    for r in &o.releases {
        let state = if r.paused { "paused" } else { "offered" };
        s += &format!(
            "  {}  {}% {state}  {} bytes\n",
            r.version, r.rollout, r.image.size
        );
    }
    match (&o.next, &o.why_not) {
        (Some(v), _) => s += &format!("prepare would take {v}"),
        (None, Some(why)) => s += why,
        (None, None) => {}
    }
    s
}
