//! Where `prepare` learns what to fetch: the releases of its channel and the descriptors of
//! built artifacts, as targets of the server's TUF repository (verified by `appliance::trust`).

use std::time::Duration;

use anyhow::Result;
use reqwest::blocking::Client;

use crate::appliance::ctx::Ctx;
use crate::appliance::prepare::fetch;
use crate::appliance::trust::Trusted;
use crate::core::manifest::{self, Descriptor, Manifest, MAX_DESCRIPTOR_BYTES};
use crate::core::tuf;
use crate::error::Error;
use crate::sys::clock::now;

/// How long a box waits for a built artifact to appear in the repository's artifacts role.
const LISTING_LAG: Duration = Duration::from_secs(5);

/// The repository as verified at the start of one `prepare`.
pub struct Metadata(Trusted);

impl From<Trusted> for Metadata {
    fn from(t: Trusted) -> Metadata {
        Metadata(t)
    }
}

impl Metadata {
    /// Fetches and verifies the repository now (refused without a trusted root).
    pub fn load(ctx: &Ctx, server: &str) -> Result<Metadata> {
        Trusted::load(&ctx.layout, &ctx.config, server).map(Metadata)
    }

    /// The releases of `channel` as a box of `group` is offered them.
    pub fn manifest(&self, channel: &str, group: Option<&str>) -> Result<Manifest> {
        self.0.manifest(channel, group, now())
    }

    /// The descriptor of artifact `name`. A server that has not built it answers "come back
    /// later" (and builds it); one that never builds it (a base outside its diff window) 404.
    pub fn descriptor(&self, client: &Client, server: &str, name: &str) -> Result<Descriptor> {
        let target = tuf::artifact_target(&format!("{name}.descriptor"));
        let Some(bytes) = self.0.read(&target, MAX_DESCRIPTOR_BYTES)? else {
            // Not listed: asking for it has the server build it (or say it never will); once
            // built, it is listed at the server's next step. Its body is not trusted: the
            // listed target is what counts.
            let url = format!("{server}/v1/artifacts/{name}.descriptor");
            fetch::get_capped(client, &url, name, MAX_DESCRIPTOR_BYTES)?;
            return Err(Error::ComeBackLater {
                what: format!("{name} (built, not yet listed)"),
                retry_after: LISTING_LAG,
            }
            .into());
        };
        let d = manifest::descriptor_of_verified_target(&bytes, name)?;
        // The artifact is a target of its own: the same size and digest, or neither is used.
        match self.0.artifact(name)? {
            Some(b) if b.size == d.size && b.sha256 == d.sha256 => Ok(d),
            other => Err(Error::SignatureInvalid(format!(
                "the repository lists {name} as {other:?}, its descriptor says {} bytes with \
                 sha256 {}",
                d.size, d.sha256
            ))
            .into()),
        }
    }
}
