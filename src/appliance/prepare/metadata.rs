//! Where `prepare` learns what to fetch: the server's TUF repository (`appliance::trust`),
//! when the image ships a root (`trust.root`), or else the signed manifest and descriptors of
//! the envelope protocol (`trust.public_keys`), which the repository replaces.

use std::time::Duration;

use anyhow::Result;
use ed25519_dalek::VerifyingKey;
use reqwest::blocking::Client;

use crate::appliance::ctx::Ctx;
use crate::appliance::prepare::fetch;
use crate::appliance::trust::Trusted;
use crate::core::manifest::{self, Descriptor, Manifest, MAX_DESCRIPTOR_BYTES, MAX_MANIFEST_BYTES};
use crate::core::sign::{self, Envelope};
use crate::core::tuf;
use crate::error::{refused, Error};
use crate::sys::clock::now;

/// How long a box waits for a built artifact to appear in the repository's artifacts role.
const LISTING_LAG: Duration = Duration::from_secs(5);

pub enum Metadata {
    Tuf(Box<Trusted>),
    Envelopes(Vec<VerifyingKey>),
}

impl Metadata {
    /// The repository, verified now, or the trusted keys of the envelopes.
    pub fn load(ctx: &Ctx, server: &str) -> Result<Metadata> {
        if ctx.config.trust.root.is_some() {
            return Ok(Metadata::Tuf(Box::new(Trusted::load(
                &ctx.layout,
                &ctx.config,
                server,
            )?)));
        }
        let keys = (ctx.config.trust.public_keys.iter())
            .map(|k| {
                sign::parse_public_key(k).map_err(|e| refused(format!("trust.public_keys: {e:#}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Metadata::Envelopes(keys))
    }

    /// The releases of `channel` as a box of `group` is offered them.
    pub fn manifest(
        &self,
        client: &Client,
        server: &str,
        channel: &str,
        group: Option<&str>,
    ) -> Result<Manifest> {
        match self {
            Metadata::Tuf(t) => t.manifest(channel, group, now()),
            Metadata::Envelopes(keys) => {
                let mut url = format!("{server}/v1/channels/{channel}/manifest");
                // The group is letters, digits, '.', '_' and '-' (checked with the configuration).
                if let Some(g) = group {
                    url += &format!("?group={g}");
                }
                let env = fetch::get_envelope(client, &url, "the manifest", MAX_MANIFEST_BYTES)?;
                manifest::open_manifest(&env, keys, now())
            }
        }
    }

    /// The descriptor of artifact `name`. A server that has not built it answers "come back
    /// later" (and builds it); one that never builds it (a base outside its diff window) 404.
    pub fn descriptor(&self, client: &Client, server: &str, name: &str) -> Result<Descriptor> {
        let url = format!("{server}/v1/artifacts/{name}.descriptor");
        match self {
            Metadata::Envelopes(keys) => {
                let env = fetch::get_envelope(client, &url, name, MAX_DESCRIPTOR_BYTES)?;
                manifest::open_descriptor(&env, keys, name)
            }
            Metadata::Tuf(t) => {
                let target = tuf::artifact_target(&format!("{name}.descriptor"));
                let Some(bytes) = t.read(&target, MAX_DESCRIPTOR_BYTES)? else {
                    // Not listed: asking for it has the server build it (or say it never
                    // will); once built, it is listed at the server's next step.
                    fetch::get_envelope(client, &url, name, MAX_DESCRIPTOR_BYTES)?;
                    return Err(Error::ComeBackLater {
                        what: format!("{name} (built, not yet listed)"),
                        retry_after: LISTING_LAG,
                    }
                    .into());
                };
                let env: Envelope = serde_json::from_slice(&bytes)
                    .map_err(|e| refused(format!("the descriptor of {name}: {e}")))?;
                let d = manifest::descriptor_of_verified_target(&env, name)?;
                // The artifact is a target of its own: the same size and digest, or neither
                // is used.
                match t.artifact(name)? {
                    Some(b) if b.size == d.size && b.sha256 == d.sha256 => Ok(d),
                    other => Err(Error::SignatureInvalid(format!(
                        "the repository lists {name} as {other:?}, its descriptor says {} bytes \
                         with sha256 {}",
                        d.size, d.sha256
                    ))
                    .into()),
                }
            }
        }
    }
}
