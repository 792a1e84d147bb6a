//! The server side's verbs: `keygen`, `publish`, `release` (the release manager's) and `serve`
//! (the image server).

use std::sync::Arc;

use anyhow::Result;

use crate::cli::{KeygenArgs, PublishArgs, ReleaseArgs, ServeArgs};
use crate::output::Output;
use crate::server::{keys, publish, source::ZfsSource, Server, Store, Tuning};

pub fn keygen(a: KeygenArgs, mut out: Output) -> Result<()> {
    let public = keys::keygen(&a.out)?;
    out.report(&serde_json::json!({ "public_key": public }), |_| {
        public.clone()
    })
}

pub fn publish(a: PublishArgs, mut out: Output) -> Result<()> {
    let store = Store::open(&a.store.store)?;
    let r = publish::publish(
        &store,
        &a.store.zvol,
        &a.version,
        &a.from,
        &a.channel,
        a.rollout,
    )?;
    out.report(&r, |r| {
        format!(
            "published {} on {} at {}% ({} bytes, sha256 {}) in {:.1}s",
            r.version, r.channel, r.rollout, r.image.size, r.image.sha256, r.seconds
        )
    })
}

pub fn release(a: ReleaseArgs, mut out: Output) -> Result<()> {
    let paused = if a.pause {
        Some(true)
    } else if a.resume {
        Some(false)
    } else {
        None
    };
    let store = Store::open(&a.store.store)?;
    let r = publish::release(&store, &a.version, a.channel.as_deref(), a.rollout, paused)?;
    out.report(&r, |r| {
        let paused = if r.release.paused { ", paused" } else { "" };
        format!(
            "{} on {}: rollout {}%{paused}",
            r.release.version, r.channel, r.release.rollout
        )
    })
}

/// The `serve` verb: the image server over the store, signing with the key, streams from ZFS.
pub fn serve(a: ServeArgs) -> Result<()> {
    let store = Store::open(&a.store.store)?;
    let key = keys::load_secret(&a.key)?;
    let source = Arc::new(ZfsSource {
        zvol: a.store.zvol.clone(),
    });
    let tuning = Tuning {
        cache_cap: a.cache_mib << 20,
        diff_window: a.diff_window,
        max_builds: a.max_builds,
        idle_timeout: std::time::Duration::from_secs(a.idle_timeout),
        max_connections: a.max_connections,
        ..Tuning::default()
    };
    crate::server::run(a.listen, Server::new(store, key, source, tuning))
}
