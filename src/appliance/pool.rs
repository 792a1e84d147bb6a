//! The box's ZFS pool: the zvol images are received into, the snapshots that are the bases of
//! future diffs (and no others: the pool must not fill over months of releases), its usage.

use anyhow::Result;

use crate::appliance::ctx::Ctx;
use crate::appliance::state::State;
use crate::core::version::Version;
use crate::sys::cmd;
use crate::sys::zfs::{self, PoolUsage};

/// The zvol on the box that receives images.
pub fn zvol(ctx: &Ctx) -> String {
    format!("{}/image", ctx.config.dataset)
}

/// Which snapshots to destroy: all but those of `keep` (images the box keeps: booted, default,
/// previous, prepared, on trial) and the newest one (the base of the next diff). Pure.
pub fn snapshots_to_destroy(snapshots: &[Version], keep: &[Version]) -> Vec<Version> {
    let newest = snapshots.iter().max();
    snapshots
        .iter()
        .filter(|s| !keep.contains(s) && Some(*s) != newest)
        .cloned()
        .collect()
}

/// Destroys the snapshots no future diff needs. A box without ZFS has nothing to prune.
pub fn prune(ctx: &Ctx, state: &State) -> Result<Vec<Version>> {
    if !cmd::installed("zfs") {
        return Ok(Vec::new());
    }
    let zvol = zvol(ctx);
    let booted = ctx.booted()?.version;
    let destroy = snapshots_to_destroy(&zfs::snapshots(&zvol)?, &state.protected(booted.as_ref()));
    for v in &destroy {
        tracing::info!("destroying snapshot {zvol}@{v}: no image on the box needs it");
        zfs::destroy_snapshot(&zvol, v)?;
    }
    Ok(destroy)
}

/// The pool's size and use, when the box has ZFS and the pool is imported.
pub fn usage(ctx: &Ctx) -> Option<PoolUsage> {
    let pool = ctx.config.dataset.split('/').next()?;
    cmd::installed("zpool")
        .then(|| zfs::pool_usage(pool).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn keeps_the_kept_images_and_the_newest_base() {
        let snaps = [v("1.0"), v("2.0"), v("3.0"), v("4.0"), v("5.0")];
        assert_eq!(
            snapshots_to_destroy(&snaps, &[v("2.0"), v("4.0")]),
            vec![v("1.0"), v("3.0")]
        );
        assert!(snapshots_to_destroy(&[v("1.0")], &[]).is_empty());
        assert!(snapshots_to_destroy(&[], &[v("1.0")]).is_empty());
    }
}
