//! The upgrade plan, pure: which release a box fetches, from which local base, given the
//! manifest (from the TUF repository), its rollout bucket, what it accepted before and what its pool holds.

use anyhow::Result;
use sha2::{Digest, Sha256};

use crate::core::manifest::{Manifest, Release};
use crate::core::version::Version;
use crate::error::{refused, Error};

/// The box's stable rollout bucket in 0..100.
pub fn bucket(box_id: &str) -> u8 {
    let h = Sha256::digest(box_id.trim().as_bytes());
    (u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % 100) as u8
}

/// What a box fetches.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub release: Release,
    /// The local snapshot the diff starts from; `None` = full stream.
    pub base: Option<Version>,
}

/// Everything `plan` decides from; no I/O.
pub struct PlanInput<'a> {
    pub manifest: &'a Manifest,
    pub channel: &'a str,
    pub now: u64,
    pub bucket: u8,
    /// Versions at or below this are refused (no downgrade, no replay)...
    pub newest_accepted: Option<&'a Version>,
    /// ...except this one (equal to `newest_accepted`), when its image is gone from the box or
    /// was left half-migrated: fetching the same signed version again replays nothing.
    pub refetch: Option<&'a Version>,
    pub pinned: Option<&'a Version>,
    /// Snapshots in the box's pool.
    pub local: &'a [Version],
}

/// Picks the release to fetch and the base to fetch it from.
pub fn plan(i: &PlanInput) -> Result<Plan> {
    let m = i.manifest;
    if m.channel != i.channel {
        return Err(Error::SignatureInvalid(format!(
            "manifest is for channel {:?}, this box follows {:?}",
            m.channel, i.channel
        ))
        .into());
    }
    if m.expires <= i.now {
        return Err(refused(format!(
            "the manifest expired {}s ago; refusing stale data",
            i.now - m.expires
        )));
    }
    let release = match i.pinned {
        Some(v) => m
            .releases
            .iter()
            .find(|r| &r.version == v)
            .cloned()
            .ok_or_else(|| {
                refused(format!(
                    "version {v} is not published on channel {}",
                    i.channel
                ))
            })?,
        None => {
            let newest = m
                .releases
                .iter()
                .filter(|r| !r.paused && i.bucket < r.rollout)
                .max_by(|a, b| a.version.cmp(&b.version))
                .cloned();
            match newest {
                Some(r)
                    if i.newest_accepted.is_none_or(|n| &r.version > n)
                        || i.refetch == Some(&r.version) =>
                {
                    r
                }
                _ => {
                    return Err(Error::NothingToDo(format!(
                        "no newer image for this box on channel {}",
                        i.channel
                    ))
                    .into())
                }
            }
        }
    };
    if let Some(n) = i.newest_accepted {
        if &release.version < n || (&release.version == n && i.refetch != Some(n)) {
            return Err(refused(format!(
                "version {} is not newer than {n}, the newest this box has accepted \
                 (downgrades go through `upgradectl revert`)",
                release.version
            )));
        }
    }
    let base = i
        .local
        .iter()
        .filter(|v| *v < &release.version)
        .max()
        .cloned();
    Ok(Plan { release, base })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::testdata::*;

    fn input<'a>(
        m: &'a Manifest,
        local: &'a [Version],
        accepted: Option<&'a Version>,
    ) -> PlanInput<'a> {
        PlanInput {
            manifest: m,
            channel: "stable",
            now: 500,
            bucket: 50,
            newest_accepted: accepted,
            refetch: None,
            pinned: None,
            local,
        }
    }

    #[test]
    fn picks_newest_allowed_release_and_newest_local_base() {
        let m = manifest();
        let local = [v("1.0"), v("0.9")];
        let one = v("1.0");
        let p = plan(&input(&m, &local, Some(&one))).unwrap();
        assert_eq!(
            p.release.version,
            v("2.0"),
            "3.0 is at 10% (bucket 50), 4.0 is paused"
        );
        assert_eq!(p.base, Some(v("1.0")));
        let mut early = input(&m, &local, Some(&one));
        early.bucket = 5;
        assert_eq!(plan(&early).unwrap().release.version, v("3.0"));
        assert_eq!(
            plan(&input(&m, &[], Some(&one))).unwrap().base,
            None,
            "full stream"
        );
    }

    #[test]
    fn refuses_stale_foreign_and_old() {
        let m = manifest();
        let two = v("2.0");
        let err = plan(&input(&m, &[], Some(&two))).unwrap_err();
        assert!(matches!(
            err.downcast_ref::<Error>(),
            Some(Error::NothingToDo(_))
        ));
        let mut pinned = input(&m, &[], Some(&two));
        let one = v("1.0");
        pinned.pinned = Some(&one);
        assert!(format!("{:#}", plan(&pinned).unwrap_err()).contains("not newer"));
        let mut late = input(&m, &[], None);
        late.now = 2000;
        assert!(format!("{:#}", plan(&late).unwrap_err()).contains("expired"));
        let mut other = input(&m, &[], None);
        other.channel = "edge";
        assert!(plan(&other).is_err());
    }

    #[test]
    fn the_newest_accepted_version_is_fetched_again_only_as_a_refetch() {
        let m = manifest();
        let two = v("2.0");
        let mut i = input(&m, &[], Some(&two));
        assert!(plan(&i).is_err(), "no newer image");
        i.pinned = Some(&two);
        assert!(plan(&i).is_err(), "a pinned replay of an accepted version");
        i.refetch = Some(&two);
        assert_eq!(plan(&i).unwrap().release.version, two);
        i.pinned = None;
        assert_eq!(plan(&i).unwrap().release.version, two);
        let one = v("1.0");
        i.pinned = Some(&one);
        assert!(plan(&i).is_err(), "older than accepted, refetch or not");
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("box-1"), bucket("box-1\n"));
        let distinct: std::collections::HashSet<u8> =
            (0..200).map(|i| bucket(&format!("box-{i}"))).collect();
        assert!(distinct.len() > 50);
    }
}
