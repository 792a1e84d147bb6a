//! The image server for the host tests of delivery: the real server over 127.0.0.1 with real
//! HTTP. ZFS cannot run on this host (no module), so send streams come from `FileSource`, a
//! stand-in that reads stream files from a directory; the real ZFS path runs in the VM tier.
//!
//! Used by `tests/delivery.rs` and `tests/server_faults.rs` as `#[path = "common/server.rs"]`.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use upgradectl::appliance::config::Config;
use upgradectl::appliance::paths::Layout;
use upgradectl::appliance::prepare::fetch::{self, Limits};
use upgradectl::appliance::trust::Trusted;
use upgradectl::core::manifest::{self, Blob, Descriptor, Manifest, Release};
use upgradectl::core::version::Version;
use upgradectl::error::Error;
use upgradectl::fleet::store::Db;
use upgradectl::server::artifacts::StoredRelease;
use upgradectl::server::repo_sync::Repo;
use upgradectl::server::tuf_repo;
use upgradectl::server::{Server, Store, StreamSource, Tuning};

/// Stand-in for ZFS (not available on this host): streams are files `full-V` / `A-to-B`.
pub struct FileSource {
    pub dir: PathBuf,
    /// How long each send takes before it writes anything (a slow build).
    pub delay: Duration,
    /// How long each `has` takes (a slow `zfs list`).
    pub has_delay: Duration,
    /// Sends running now, and the most that ever ran at once.
    pub running: AtomicUsize,
    pub max_running: AtomicUsize,
    /// How many times `has` was asked.
    pub has_calls: AtomicUsize,
    /// The base's snapshot device cannot be opened (a server unit without access to it).
    pub reference_unreadable: std::sync::atomic::AtomicBool,
}

impl StreamSource for FileSource {
    fn send(&self, from: Option<&Version>, to: &Version, out: &mut dyn Write) -> Result<()> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let name = match from {
            Some(f) => format!("{f}-to-{to}"),
            None => format!("full-{to}"),
        };
        let result = std::fs::read(self.dir.join(name))
            .map_err(anyhow::Error::from)
            .and_then(|data| Ok(out.write_all(&data)?));
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }
    /// The full stream of `v` stands for the image every box holding `v` has.
    fn reference(&self, v: &Version) -> Result<PathBuf> {
        if self.reference_unreadable.load(Ordering::SeqCst) {
            anyhow::bail!("/dev/zvol/srv/image@{v}: Permission denied");
        }
        Ok(self.dir.join(format!("full-{v}")))
    }
    fn full_len(&self, v: &Version) -> Result<u64> {
        Ok(std::fs::metadata(self.dir.join(format!("full-{v}")))?.len())
    }
    fn has(&self, v: &Version) -> Result<bool> {
        self.has_calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.has_delay);
        Ok(self.dir.join(format!("full-{v}")).exists())
    }
}

/// What a test server holds and how it behaves.
pub struct Setup {
    /// Published versions, all on `stable`, oldest first. Streams: `full-V` for each
    /// (`full_size` bytes) and `A-to-B` for each consecutive pair (`diff_size` bytes).
    pub versions: Vec<&'static str>,
    pub full_size: usize,
    pub diff_size: usize,
    pub delay: Duration,
    pub has_delay: Duration,
    pub tuning: Tuning,
    /// With the fleet database (`<root>/store/fleet.db`): reports and wave rollouts.
    pub fleet: bool,
    /// Publishing a TUF repository (`<root>/repo`, every key in `<root>/keys`) with every
    /// release signed, and a box root trusting its first root (`<root>/box`): `offered`.
    pub repo: bool,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            versions: vec!["1.0", "2.0"],
            full_size: 10 << 20,
            diff_size: 9 << 20,
            delay: Duration::ZERO,
            has_delay: Duration::ZERO,
            tuning: Tuning {
                retry_after: 1,
                // Noise does not compress: a cheap level builds the same sizes.
                zstd_ref_level: 3,
                ..Tuning::default()
            },
            fleet: false,
            repo: false,
        }
    }
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub server: Arc<Server>,
    pub source: Arc<FileSource>,
    pub addr: SocketAddr,
    /// The repository the server publishes (`Setup::repo`).
    pub repo: Option<Arc<Repo>>,
}

pub fn v(s: &str) -> Version {
    s.parse().unwrap()
}

/// Pseudo-random, poorly compressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Stream files: `full-V` with seed i+1, `A-to-B` (consecutive) with seed n+i+1.
fn write_streams(dir: &Path, setup: &Setup) {
    std::fs::create_dir_all(dir).unwrap();
    let n = setup.versions.len() as u64;
    for (i, ver) in setup.versions.iter().enumerate() {
        let i = i as u64;
        std::fs::write(
            dir.join(format!("full-{ver}")),
            noise(setup.full_size, i + 1),
        )
        .unwrap();
    }
    for (i, pair) in setup.versions.windows(2).enumerate() {
        let name = format!("{}-to-{}", pair[0], pair[1]);
        std::fs::write(dir.join(name), noise(setup.diff_size, n + i as u64 + 1)).unwrap();
    }
}

fn stored_release(ver: &str, n: u8) -> StoredRelease {
    StoredRelease {
        channel: "stable".into(),
        release: Release {
            version: v(ver),
            rollout: 100,
            paused: false,
            image: Blob {
                size: 1,
                sha256: format!("{n:064x}"),
            },
        },
    }
}

/// A server with two releases (1.0, 2.0) whose builds take `delay`.
pub fn start(delay: Duration, cache_cap: u64) -> Fixture {
    let mut setup = Setup {
        delay,
        ..Setup::default()
    };
    setup.tuning.cache_cap = cache_cap;
    start_with(setup)
}

pub fn start_with(setup: Setup) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let streams = root.join("streams");
    write_streams(&streams, &setup);
    let store = Store::open(&root.join("store")).unwrap();
    let releases: Vec<_> = (setup.versions.iter().enumerate())
        .map(|(i, ver)| stored_release(ver, i as u8 + 1))
        .collect();
    store.save_releases(&releases).unwrap();
    let source = Arc::new(FileSource {
        dir: streams,
        delay: setup.delay,
        has_delay: setup.has_delay,
        running: AtomicUsize::new(0),
        max_running: AtomicUsize::new(0),
        has_calls: AtomicUsize::new(0),
        reference_unreadable: Default::default(),
    });
    let server = Server::new(store, source.clone(), setup.tuning);
    let server = match setup.fleet {
        true => server.with_fleet(Db::open_in(&root.join("store")).unwrap()),
        false => server,
    };
    let repo = setup.repo.then(|| {
        let (repo, keys) = (root.join("repo"), root.join("keys"));
        let o = tuf_repo::InitOptions {
            root_keys: 1,
            root_threshold: 1,
        };
        tuf_repo::init(&repo, &keys, &o).unwrap();
        for r in &releases {
            let (version, image) = (&r.release.version, &r.release.image);
            tuf_repo::release(&repo, &keys, &r.channel, version, image).unwrap();
        }
        let boxroot = root.join("box/etc");
        std::fs::create_dir_all(&boxroot).unwrap();
        std::fs::copy(repo.join("metadata/1.root.json"), boxroot.join("root.json")).unwrap();
        let repo = Arc::new(Repo::new(repo, keys));
        let store = Store::open(&root.join("store")).unwrap();
        repo.sync(&store, None, 0).unwrap();
        repo
    });
    let server = match &repo {
        Some(r) => server.with_repo(r.clone()),
        None => server,
    };
    let server = Arc::new(server);
    let addr = upgradectl::server::spawn_local(server.clone()).unwrap();
    Fixture {
        _dir: dir,
        root,
        server,
        source,
        addr,
        repo,
    }
}

pub fn limits() -> Limits {
    Limits {
        stall: Duration::from_secs(10),
        min_speed: 1,
    }
}

/// Downloads artifact `name` from the server at `addr` to `dest`, as the box does.
pub fn download_from(
    addr: SocketAddr,
    name: &str,
    dest: &Path,
    d: &Descriptor,
) -> Result<fetch::Fetched> {
    let client = fetch::client(&limits()).unwrap();
    fetch::download(
        &client,
        &format!("http://{addr}/v1/artifacts/{name}"),
        dest,
        d,
        &limits(),
        &mut |_, _| {},
    )
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `deadline`.
pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Fixture {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET `path`: status, Retry-After (if any) and body.
    pub fn get(&self, path: &str) -> (u16, Option<u64>, String) {
        let client = fetch::client(&limits()).unwrap();
        let resp = client.get(self.url(path)).send().unwrap();
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|h| h.to_str().unwrap().parse().unwrap());
        (status, retry, resp.text().unwrap())
    }

    /// Polls the descriptor until built; returns it validated (its bytes as served: what the
    /// repository lists is checked in `tests/tuf.rs`).
    pub fn descriptor(&self, name: &str) -> Descriptor {
        let client = fetch::client(&limits()).unwrap();
        for _ in 0..1200 {
            match fetch::get_capped(
                &client,
                &self.url(&format!("/v1/artifacts/{name}.descriptor")),
                name,
                manifest::MAX_DESCRIPTOR_BYTES,
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

    pub fn download(&self, name: &str, dest: &Path, d: &Descriptor) -> Result<fetch::Fetched> {
        download_from(self.addr, name, dest, d)
    }

    /// What a box of `group` on `channel` is offered now, as the box reads it: the server
    /// brings its repository in step (rollout documents from the waves and reports), then the
    /// box verifies the repository from its trusted root. Needs `Setup::repo`.
    pub fn offered(&self, channel: &str, group: Option<&str>) -> Manifest {
        self.sync();
        self.offered_at(&format!("http://{}", self.addr), channel, group)
    }

    /// What a box reading the repository from `server` (this one, or a cache in front of it)
    /// is offered, without a sync first.
    pub fn offered_at(&self, server: &str, channel: &str, group: Option<&str>) -> Manifest {
        let mut config = Config::default();
        config.trust.root = Some("/etc/root.json".into());
        let layout = Layout::new(&self.root.join("box"), &config.host_mount);
        let now = upgradectl::sys::clock::now();
        Trusted::load(&layout, &config, server)
            .and_then(|t| t.manifest(channel, group, now))
            .unwrap()
    }

    /// One step of the server's repository sync, as `serve` runs it every few seconds.
    pub fn sync(&self) {
        let repo = self.repo.as_ref().expect("a server without a repository");
        let store_dir = self.root.join("store");
        let store = Store::open(&store_dir).unwrap();
        let db = (store_dir.join("fleet.db").exists())
            .then(|| std::sync::Mutex::new(Db::open_in(&store_dir).unwrap()));
        repo.sync(&store, db.as_ref(), upgradectl::sys::clock::now())
            .unwrap();
    }
}
