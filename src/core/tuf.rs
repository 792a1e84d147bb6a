//! How upgradectl's releases sit in a TUF repository (The Update Framework): which role signs
//! what, the target names, and the rollout document. Pure: both the box (`appliance::trust`)
//! and whoever writes a repository read it from here. `docs/protocol.md` has the threat model.
//!
//! | role | keys | signs |
//! |---|---|---|
//! | `root` | offline, threshold | every role's keys |
//! | `targets` | offline | the delegations below, nothing else |
//! | one per channel (`stable`, ...) | offline | `releases/<channel>/<version>.img`: the image's size and sha256 |
//! | `rollout` | online | `rollout/<channel>.json`: who gets which release (percentages, pauses) |
//! | `artifacts` | online | `artifacts/<name>` and `artifacts/<name>.descriptor`: diffs built on demand |
//! | `snapshot`, `timestamp` | online | the versions of the above, freshness |

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::core::manifest::CHANNELS;
use crate::core::version::Version;
use crate::error::refused;

/// The role that delegates rollout documents (online key).
pub const ROLLOUT_ROLE: &str = "rollout";
/// The role that delegates built artifacts (online key).
pub const ARTIFACTS_ROLE: &str = "artifacts";

/// Largest rollout document a box reads.
pub const MAX_ROLLOUT_BYTES: u64 = 1 << 20;

/// The target path pattern a channel's role may sign.
pub fn channel_paths(channel: &str) -> String {
    format!("releases/{channel}/*")
}

/// The target of a release's image on a channel.
pub fn release_target(channel: &str, version: &Version) -> String {
    format!("releases/{channel}/{version}.img")
}

/// The version a release target names, if `name` is one of `channel`'s release targets.
pub fn parse_release_target(channel: &str, name: &str) -> Option<Version> {
    let rest = name.strip_prefix("releases/")?.strip_prefix(channel)?;
    let v = rest.strip_prefix('/')?.strip_suffix(".img")?;
    v.parse().ok()
}

/// The target of a channel's rollout document.
pub fn rollout_target(channel: &str) -> String {
    format!("rollout/{channel}.json")
}

/// The target of a built artifact (`A-to-B`, `full-B`) or of its descriptor.
pub fn artifact_target(name: &str) -> String {
    format!("artifacts/{name}")
}

/// Whether `channel` is one a box may follow (and hence a role name of the repository).
pub fn is_channel(channel: &str) -> bool {
    CHANNELS.contains(&channel)
}

/// Who gets a channel's releases, signed by the online `rollout` role. A release it does not
/// mention goes to every box (the release itself was signed offline; the online key can only
/// narrow or widen who gets it, never change what they get).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutDoc {
    #[serde(default)]
    pub releases: BTreeMap<String, ReleaseRollout>,
}

/// One release's rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRollout {
    /// Percentage of the boxes not in a listed group (by their stable bucket).
    pub percent: u8,
    /// Percentages of the boxes of each group, where a wave rollout goes group by group.
    #[serde(default)]
    pub groups: BTreeMap<String, u8>,
    /// Why it is paused (not offered to any box that does not have it yet).
    #[serde(default)]
    pub paused: Option<String>,
}

impl RolloutDoc {
    /// Parses and bounds a rollout document: percentages 0..=100.
    pub fn parse(bytes: &[u8]) -> Result<RolloutDoc> {
        let doc: RolloutDoc =
            serde_json::from_slice(bytes).map_err(|e| refused(format!("rollout document: {e}")))?;
        for (v, r) in &doc.releases {
            if r.percent > 100 || r.groups.values().any(|p| *p > 100) {
                return Err(refused(format!(
                    "rollout document: release {v:?} has a percentage above 100"
                )));
            }
        }
        Ok(doc)
    }

    /// The percentage of `group`'s boxes that may take `version`, and whether it is paused.
    pub fn for_box(&self, version: &Version, group: Option<&str>) -> (u8, bool) {
        match self.releases.get(&version.to_string()) {
            None => (100, false),
            Some(r) => {
                let percent = group
                    .and_then(|g| r.groups.get(g))
                    .copied()
                    .unwrap_or(r.percent);
                (percent, r.paused.is_some())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn release_targets_round_trip_and_stay_in_their_channel() {
        let name = release_target("stable", &v("2.0.1"));
        assert_eq!(name, "releases/stable/2.0.1.img");
        assert_eq!(parse_release_target("stable", &name), Some(v("2.0.1")));
        assert_eq!(parse_release_target("edge", &name), None);
        assert_eq!(
            parse_release_target("stable", "releases/stable/x.img"),
            None
        );
        assert_eq!(
            parse_release_target("stable", "releases/stablex/2.0.img"),
            None
        );
        assert_eq!(
            parse_release_target("stable", "releases/stable/2.0.tar"),
            None
        );
    }

    #[test]
    fn rollout_defaults_to_everyone_and_groups_override() {
        let doc = RolloutDoc::parse(
            br#"{"releases": {"2.0": {"percent": 5, "groups": {"zone-a": 100}, "paused": null},
                              "3.0": {"percent": 0, "paused": "3 of 20 failed"}}}"#,
        )
        .unwrap();
        assert_eq!(doc.for_box(&v("1.0"), None), (100, false));
        assert_eq!(doc.for_box(&v("2.0"), None), (5, false));
        assert_eq!(doc.for_box(&v("2.0"), Some("zone-a")), (100, false));
        assert_eq!(doc.for_box(&v("2.0"), Some("zone-b")), (5, false));
        assert_eq!(doc.for_box(&v("3.0"), None), (0, true));
        assert!(RolloutDoc::parse(br#"{"releases": {"2.0": {"percent": 101}}}"#).is_err());
        assert!(RolloutDoc::parse(br#"{"releases": {}, "extra": 1}"#).is_err());
    }
}
