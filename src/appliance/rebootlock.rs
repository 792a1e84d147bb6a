//! The box's side of the FleetLock protocol (`[reboot] fleetlock_url`): `upgrade` takes a
//! reboot slot of its group before it arms a trial, and `confirm` gives it back once the box
//! runs steady (the trial confirmed, or the box back on its default).
//!
//! Intent first: `reboot-lock.json` on the host partition records the slot (server, node,
//! group) before `pre-reboot` is sent and goes only when the server acknowledged
//! `steady-state` or refused the slot, so a slot the server may hold is never forgotten: a
//! `confirm` that cannot reach the server keeps the record and the next one (every boot runs
//! it) tries again. node_uuid is the box id, group the configured group or `default`.

use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::appliance::ctx::Ctx;
use crate::appliance::identity;
use crate::core::fleetlock::{self as protocol, ClientParams, ErrorBody, Request};
use crate::error::Error;
use crate::sys::clock::now;
use crate::sys::fsutil::atomic_write;

/// How long one lock request may take (connect included).
const TIMEOUT: Duration = Duration::from_secs(10);

/// A reboot slot this box asked for and has not given back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The FleetLock server's base URL.
    pub url: String,
    pub node_uuid: String,
    pub group: String,
    /// When it was asked for (Unix seconds).
    pub since: u64,
}

/// The slot recorded on the host partition, if any. A record that does not parse (a torn
/// write cannot leave one: it is written atomically) is ignored with a warning; the server's
/// lease frees the slot it named.
pub fn held(ctx: &Ctx) -> Result<Option<Held>> {
    let path = ctx.layout.reboot_lock();
    match std::fs::read(&path) {
        Ok(d) => Ok(serde_json::from_slice(&d)
            .map_err(|e| tracing::warn!("ignoring {}: {e}", path.display()))
            .ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn forget(ctx: &Ctx) -> Result<()> {
    let path = ctx.layout.reboot_lock();
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// POSTs `params` to `path` of the server at `url`: `Ok` on 200, the server's error body
/// (kind, value) otherwise; `Err` when it could not be asked.
fn ask(url: &str, path: &str, params: &ClientParams) -> Result<std::result::Result<(), ErrorBody>> {
    let client = crate::appliance::report::client(TIMEOUT)?;
    let endpoint = format!("{}{path}", url.trim_end_matches('/'));
    let body = serde_json::to_vec(&Request {
        client_params: params.clone(),
    })?;
    let resp = client
        .post(&endpoint)
        .header(protocol::HEADER, "true")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .with_context(|| format!("POST {endpoint}"))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(Ok(()));
    }
    // The answer is read only up to a small cap: the server is not trusted with our memory.
    let mut text = Vec::new();
    use std::io::Read;
    let _ = resp.take(4096).read_to_end(&mut text);
    let body = serde_json::from_slice(&text).unwrap_or_else(|_| ErrorBody {
        kind: format!("http-{}", status.as_u16()),
        value: String::from_utf8_lossy(&text).trim().to_owned(),
    });
    Ok(Err(body))
}

/// Takes a reboot slot before a switch (nothing to do without `fleetlock_url`). Refused
/// (every slot held): `Error::NotNow` and no record; the server unreachable: an error, and the
/// record stays (the request may have reached it), for `confirm` to give back.
pub fn take(ctx: &Ctx) -> Result<()> {
    let Some(url) = ctx.config.reboot.fleetlock_url.clone() else {
        return Ok(());
    };
    let params = ClientParams {
        node_uuid: identity::box_id(ctx)?,
        group: (ctx.config.group.clone()).unwrap_or_else(|| protocol::DEFAULT_GROUP.into()),
    };
    crate::core::report::check_label("box id", &params.node_uuid, false)?;
    let held = Held {
        url: url.clone(),
        node_uuid: params.node_uuid.clone(),
        group: params.group.clone(),
        since: now(),
    };
    atomic_write(
        &ctx.layout.reboot_lock(),
        &serde_json::to_vec(&held)?,
        0o644,
    )
    .context("recording the reboot slot")?;
    match ask(&url, protocol::PRE_REBOOT, &params).context("taking a reboot slot")? {
        Ok(()) => Ok(()),
        Err(refusal) => {
            forget(ctx)?;
            Err(Error::NotNow(format!(
                "the reboot lock at {url} refused a slot of group {} ({}: {})",
                params.group, refusal.kind, refusal.value
            ))
            .into())
        }
    }
}

/// Gives the recorded slot back, if any. Never fails: a server that cannot be reached or
/// refuses is logged and the record stays for the next call.
pub fn release(ctx: &Ctx) {
    let result = held(ctx).and_then(|held| {
        let Some(h) = held else { return Ok(()) };
        let params = ClientParams {
            node_uuid: h.node_uuid.clone(),
            group: h.group.clone(),
        };
        match ask(&h.url, protocol::STEADY_STATE, &params)? {
            Ok(()) => forget(ctx),
            Err(e) => anyhow::bail!("{} refused: {}: {}", h.url, e.kind, e.value),
        }
    });
    if let Err(e) = result {
        tracing::warn!("giving back the reboot slot (tried again at the next confirm): {e:#}");
    }
}
