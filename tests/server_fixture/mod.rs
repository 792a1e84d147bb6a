//! The real image server on 127.0.0.1 with a stand-in for ZFS, for the host tests of delivery.
//! ZFS cannot run on this host (no module), so send streams come from `FileSource`, which
//! reads stream files from a directory; the real ZFS path runs in the VM tier.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use upgradectl::appliance::prepare::fetch;
use upgradectl::core::manifest::{self, Blob, Descriptor, Release, MAX_DESCRIPTOR_BYTES};
use upgradectl::core::version::Version;
use upgradectl::error::Error;
use upgradectl::server::artifacts::StoredRelease;
use upgradectl::server::{Server, Store, StreamSource, Tuning};

/// Size of the small stream `full-0.5`, for tests that download thousands of times.
pub const SMALL_STREAM: usize = 200 << 10;

/// Stand-in for ZFS (not available on this host): streams are files `full-V` / `A-to-B`.
pub struct FileSource {
    dir: PathBuf,
    delay: Duration,
}

impl StreamSource for FileSource {
    fn send(&self, from: Option<&Version>, to: &Version, out: &mut dyn Write) -> Result<()> {
        std::thread::sleep(self.delay);
        let name = match from {
            Some(f) => format!("{f}-to-{to}"),
            None => format!("full-{to}"),
        };
        out.write_all(&std::fs::read(self.dir.join(name))?)?;
        Ok(())
    }
    /// The full stream of `v` stands for the image every box holding `v` has.
    fn reference(&self, v: &Version) -> Result<PathBuf> {
        Ok(self.dir.join(format!("full-{v}")))
    }
    fn full_len(&self, v: &Version) -> Result<u64> {
        Ok(std::fs::metadata(self.dir.join(format!("full-{v}")))?.len())
    }
    fn has(&self, v: &Version) -> Result<bool> {
        Ok(self.dir.join(format!("full-{v}")).exists())
    }
}

/// A running server and where its files are.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub server: Arc<Server>,
    pub addr: SocketAddr,
}

// Versions and test data as the server fault tests make them.
#[path = "../common/server.rs"]
pub mod shared;
pub use shared::{limits, noise, v};

/// Starts the server on a free port; builds wait `delay`, the cache holds `cache_cap` bytes.
pub fn start(delay: Duration, cache_cap: u64) -> Fixture {
    // In memory when it can be: tests rewrite and fsync these files thousands of times.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let root = dir.path().to_owned();
    let streams = root.join("streams");
    std::fs::create_dir_all(&streams).unwrap();
    std::fs::write(streams.join("full-1.0"), noise(3 << 20, 1)).unwrap();
    // Larger than the diff: a diff no smaller than its full stream is not served.
    std::fs::write(streams.join("full-2.0"), noise(10 << 20, 2)).unwrap();
    std::fs::write(streams.join("1.0-to-2.0"), noise(9 << 20, 3)).unwrap();
    std::fs::write(streams.join("full-0.5"), noise(SMALL_STREAM, 5)).unwrap();
    let store = Store::open(&root.join("store")).unwrap();
    let blob = |n: u8| Blob {
        size: 1,
        sha256: format!("{n:02x}"),
    };
    store
        .save_releases(&[
            StoredRelease {
                channel: "stable".into(),
                release: Release {
                    version: v("1.0"),
                    rollout: 100,
                    paused: false,
                    image: blob(1),
                },
            },
            StoredRelease {
                channel: "stable".into(),
                release: Release {
                    version: v("2.0"),
                    rollout: 100,
                    paused: false,
                    image: blob(2),
                },
            },
            // The small artifact, on a channel of its own.
            StoredRelease {
                channel: "beta".into(),
                release: Release {
                    version: v("0.5"),
                    rollout: 100,
                    paused: false,
                    image: blob(5),
                },
            },
        ])
        .unwrap();
    let server = Arc::new(Server::new(
        store,
        Arc::new(FileSource {
            dir: streams,
            delay,
        }),
        Tuning {
            retry_after: 1,
            cache_cap,
            zstd_ref_level: 3,
            ..Tuning::default()
        },
    ));
    let addr = upgradectl::server::spawn_local(server.clone()).unwrap();
    Fixture {
        _dir: dir,
        root,
        server,
        addr,
    }
}

impl Fixture {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Polls the descriptor until built; returns it validated.
    pub fn descriptor(&self, name: &str) -> Descriptor {
        let client = fetch::client(&limits()).unwrap();
        for _ in 0..1200 {
            match fetch::get_capped(
                &client,
                &self.url(&format!("/v1/artifacts/{name}.descriptor")),
                name,
                MAX_DESCRIPTOR_BYTES,
            ) {
                Ok(bytes) => return manifest::descriptor_of_verified_target(&bytes, name).unwrap(),
                Err(e) => match e.downcast_ref::<Error>() {
                    Some(Error::ComeBackLater { .. }) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => panic!("{e:#}"),
                },
            }
        }
        panic!("{name} was never built");
    }

    /// Downloads artifact `name` to `dest` as the box does.
    pub fn download(&self, name: &str, dest: &Path, d: &Descriptor) -> Result<fetch::Fetched> {
        shared::download_from(self.addr, name, dest, d)
    }
}
