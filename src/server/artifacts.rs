//! The server's store directory: `releases.json` and `artifacts/` (built streams and their
//! signed descriptors).

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
    pub channel: String,
    #[serde(flatten)]
    pub release: Release,
}

pub struct Store {
    dir: PathBuf,
    builds_started: AtomicUsize,
}

impl Store {
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

    pub fn releases(&self) -> Result<Vec<StoredRelease>> {
        match fs::read(self.releases_file()) {
            Ok(data) => serde_json::from_slice(&data).context("parsing releases.json"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e).context("reading releases.json"),
        }
    }

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

    pub fn artifact_path(&self, name: &str) -> PathBuf {
        self.dir.join("artifacts").join(name)
    }

    pub fn descriptor_path(&self, name: &str) -> PathBuf {
        self.dir
            .join("artifacts")
            .join(format!("{name}.descriptor"))
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

    pub fn can_build(
        &self,
        from: Option<&Version>,
        to: &Version,
        source: &dyn StreamSource,
    ) -> Result<bool> {
        let known =
            |v: &Version| -> Result<bool> { Ok(self.release(v)?.is_some() && source.has(v)?) };
        Ok(known(to)? && from.map_or(Ok(true), known)?)
    }

    pub fn note_build_started(&self) {
        self.builds_started.fetch_add(1, Ordering::SeqCst);
    }

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
