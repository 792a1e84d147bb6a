//! The server's store directory: `releases.json` and `artifacts/` (built streams, their
//! descriptors, and the records of diffs not smaller than their full stream).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::source::StreamSource;
use crate::core::manifest::Release;
use crate::core::version::Version;
use crate::sys::fsutil::atomic_write;

/// A release as the server records it: on which channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRelease {
    /// The channel it is released on.
    pub channel: String,
    /// The release as manifests carry it.
    #[serde(flatten)]
    pub release: Release,
}

/// Whether an artifact is worth building (see `Store::buildable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buildable {
    /// Build it.
    Yes,
    /// A version is not published or not in the source.
    Unknown,
    /// A diff whose base is too old: the box should take the full stream.
    OutsideWindow,
    /// A diff that was built and found no smaller than the full stream: take that.
    NotSmaller,
}

/// Whether `from` is one of the `window` newest releases of `channel` older than `to`.
fn in_window(
    releases: &[StoredRelease],
    channel: &str,
    from: &Version,
    to: &Version,
    window: usize,
) -> bool {
    let mut older: Vec<&Version> = releases
        .iter()
        .filter(|r| r.channel == channel && &r.release.version < to)
        .map(|r| &r.release.version)
        .collect();
    older.sort_unstable_by(|a, b| b.cmp(a));
    older.iter().take(window).any(|v| *v == from)
}

/// The server's store directory: releases and built artifacts.
pub struct Store {
    dir: PathBuf,
    builds_started: AtomicUsize,
}

impl Store {
    /// Opens (creating) the store at `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        fs::create_dir_all(dir.join("artifacts"))
            .with_context(|| format!("creating store {}", dir.display()))?;
        Ok(Store {
            dir: dir.to_owned(),
            builds_started: AtomicUsize::new(0),
        })
    }

    fn releases_file(&self) -> PathBuf {
        self.dir.join("releases.json")
    }

    /// Every published release (none before the first publish).
    pub fn releases(&self) -> Result<Vec<StoredRelease>> {
        match fs::read(self.releases_file()) {
            Ok(data) => serde_json::from_slice(&data).context("parsing releases.json"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).context("reading releases.json"),
        }
    }

    /// Replaces releases.json atomically.
    pub fn save_releases(&self, releases: &[StoredRelease]) -> Result<()> {
        atomic_write(
            &self.releases_file(),
            &serde_json::to_vec_pretty(releases)?,
            0o644,
        )
    }

    /// A published version's release record (any channel).
    pub fn release(&self, v: &Version) -> Result<Option<Release>> {
        Ok(self
            .releases()?
            .into_iter()
            .map(|r| r.release)
            .find(|r| &r.version == v))
    }

    /// Where built artifacts live.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.dir.join("artifacts")
    }

    /// Where artifact `name` lives once built.
    pub fn artifact_path(&self, name: &str) -> PathBuf {
        self.artifacts_dir().join(name)
    }

    /// Where artifact `name`'s signed descriptor lives once built.
    pub fn descriptor_path(&self, name: &str) -> PathBuf {
        self.dir
            .join("artifacts")
            .join(format!("{name}.descriptor"))
    }

    /// Where the record lives that diff `name` is no smaller than the full stream (`build`).
    pub fn not_smaller_path(&self, name: &str) -> PathBuf {
        self.dir
            .join("artifacts")
            .join(format!("{name}.not-smaller"))
    }

    /// The size of built artifact `name`.
    pub fn artifact_size(&self, name: &str) -> Result<u64> {
        let path = self.artifact_path(name);
        Ok(fs::metadata(&path)
            .with_context(|| format!("reading the size of {}", path.display()))?
            .len())
    }

    /// Built = its descriptor exists (written last, atomically).
    pub fn is_built(&self, name: &str) -> bool {
        self.descriptor_path(name).is_file() && self.artifact_path(name).is_file()
    }

    /// Marks an artifact as just used (LRU eviction looks at mtimes).
    pub fn touch(&self, name: &str) {
        if let Ok(f) = fs::File::options()
            .append(true)
            .open(self.artifact_path(name))
        {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Whether `artifact_name(from, to)` is worth building: both versions published and in
    /// the source, and a diff's base one of the `window` newest releases of the target's
    /// channel before the target. Reads releases.json and asks the source: blocking.
    pub fn buildable(
        &self,
        from: Option<&Version>,
        to: &Version,
        window: usize,
        source: &dyn StreamSource,
    ) -> Result<Buildable> {
        let releases = self.releases()?;
        let published = |v: &Version| releases.iter().any(|r| &r.release.version == v);
        let Some(target) = releases.iter().find(|r| &r.release.version == to) else {
            return Ok(Buildable::Unknown);
        };
        if let Some(from) = from {
            if !published(from) {
                return Ok(Buildable::Unknown);
            }
            if !in_window(&releases, &target.channel, from, to, window) {
                return Ok(Buildable::OutsideWindow);
            }
            if self
                .not_smaller_path(&crate::core::manifest::artifact_name(Some(from), to))
                .is_file()
            {
                return Ok(Buildable::NotSmaller);
            }
        }
        let in_source = source.has(to)? && from.map_or(Ok(true), |f| source.has(f))?;
        Ok(if in_source {
            Buildable::Yes
        } else {
            Buildable::Unknown
        })
    }

    /// Removes what a build left half published (an artifact without its descriptor or the
    /// reverse); never a complete artifact.
    pub fn remove_incomplete(&self, name: &str) -> Result<()> {
        if self.is_built(name) {
            return Ok(());
        }
        for path in [self.descriptor_path(name), self.artifact_path(name)] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the temp files of builds that never finished (`.NAME.*.tmp`: a spooled stream
    /// can be as large as an image). Only when no build runs: at the server's start.
    pub fn remove_build_leftovers(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for e in fs::read_dir(self.artifacts_dir())? {
            let path = e?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                tracing::info!(
                    "removing {}, left by a build that never finished",
                    path.display()
                );
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Counts a build (tests assert "once").
    pub fn note_build_started(&self) {
        self.builds_started.fetch_add(1, Ordering::SeqCst);
    }

    /// How many builds were started since the store was opened.
    pub fn builds_started(&self) -> usize {
        self.builds_started.load(Ordering::SeqCst)
    }

    /// Evicts least recently used artifacts (never `keep`) until their total size fits `cap`.
    pub fn evict(&self, cap: u64, keep: &str) -> Result<()> {
        let mut items = Vec::new();
        for e in fs::read_dir(self.dir.join("artifacts"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if crate::core::manifest::parse_artifact_name(&name).is_some() {
                let md = e.metadata()?;
                items.push((md.modified()?, md.len(), name));
            }
        }
        let mut total: u64 = items.iter().map(|i| i.1).sum();
        items.sort();
        for (_, size, name) in items {
            if total <= cap {
                break;
            }
            if name == keep {
                continue;
            }
            tracing::info!("evicting {name} ({size} bytes) from the artifact cache");
            let _ = fs::remove_file(self.descriptor_path(&name));
            fs::remove_file(self.artifact_path(&name))?;
            total -= size;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::Blob;

    fn rel(channel: &str, v: &str) -> StoredRelease {
        StoredRelease {
            channel: channel.into(),
            release: Release {
                version: v.parse().unwrap(),
                rollout: 100,
                paused: false,
                image: Blob {
                    size: 1,
                    sha256: String::new(),
                },
            },
        }
    }

    #[test]
    fn build_leftovers_go_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let artifacts = store.artifacts_dir();
        for name in [
            ".1.0-to-2.0.abc.stream.tmp",
            ".full-2.0.x.xz.tmp",
            "full-2.0",
        ] {
            fs::write(artifacts.join(name), b"x").unwrap();
        }
        fs::write(store.descriptor_path("full-2.0"), b"{}").unwrap();
        assert_eq!(store.remove_build_leftovers().unwrap().len(), 2);
        let mut left: Vec<_> = fs::read_dir(&artifacts)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["full-2.0", "full-2.0.descriptor"]);
    }

    #[test]
    fn the_window_is_the_newest_releases_of_the_targets_channel_before_it() {
        let releases = [
            rel("stable", "1.0"),
            rel("stable", "2.0"),
            rel("beta", "2.5"),
            rel("stable", "3.0"),
            rel("stable", "4.0"),
        ];
        let v = |s: &str| -> Version { s.parse().unwrap() };
        let ok = |from, window| in_window(&releases, "stable", &v(from), &v("4.0"), window);
        assert!(ok("3.0", 1));
        assert!(!ok("2.0", 1));
        assert!(ok("2.0", 2));
        assert!(!ok("2.5", 5), "another channel's release is no base");
        assert!(!ok("1.0", 0));
    }
}
