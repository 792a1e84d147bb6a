//! Host tests of delivery: the real server and the real client over 127.0.0.1 with real HTTP.
//! ZFS cannot run on this host (no module), so send streams come from `FileSource`, a stand-in
//! that reads stream files from a directory; the real ZFS path runs in the VM tier.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use ed25519_dalek::SigningKey;
use upgradectl::appliance::prepare::fetch::{self, Limits};
use upgradectl::core::manifest::{
    Blob, Descriptor, Manifest, Release, MAX_DESCRIPTOR_BYTES, MAX_MANIFEST_BYTES,
};
use upgradectl::core::sign::{self, Envelope};
use upgradectl::core::version::Version;
use upgradectl::error::Error;
use upgradectl::server::artifacts::StoredRelease;
use upgradectl::server::{Server, Store, StreamSource};

/// Stand-in for ZFS (not available on this host): streams are files `full-V` / `A-to-B`.
struct FileSource {
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
    fn has(&self, v: &Version) -> Result<bool> {
        Ok(self.dir.join(format!("full-{v}")).exists())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    key: SigningKey,
    server: Arc<Server>,
    addr: SocketAddr,
}

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

/// Pseudo-random, poorly compressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
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

fn start(delay: Duration, cache_cap: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let streams = root.join("streams");
    std::fs::create_dir_all(&streams).unwrap();
    std::fs::write(streams.join("full-1.0"), noise(3 << 20, 1)).unwrap();
    std::fs::write(streams.join("full-2.0"), noise(3 << 20, 2)).unwrap();
    std::fs::write(streams.join("1.0-to-2.0"), noise(9 << 20, 3)).unwrap();
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
        ])
        .unwrap();
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let mut server = Server::new(
        store,
        key.clone(),
        Arc::new(FileSource {
            dir: streams,
            delay,
        }),
        cache_cap,
    );
    server.retry_after = 1;
    let server = Arc::new(server);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let s = server.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            upgradectl::server::serve(listener, s).await.unwrap();
        });
    });
    Fixture {
        _dir: dir,
        root,
        key,
        server,
        addr,
    }
}

fn limits() -> Limits {
    Limits {
        stall: Duration::from_secs(10),
        min_speed: 1,
    }
}

impl Fixture {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Polls the descriptor until built; returns it verified.
    fn descriptor(&self, name: &str) -> Descriptor {
        let client = fetch::client(&limits()).unwrap();
        for _ in 0..1200 {
            match fetch::get_envelope(
                &client,
                &self.url(&format!("/v1/artifacts/{name}.descriptor")),
                name,
                MAX_DESCRIPTOR_BYTES,
            ) {
                Ok(env) => return sign::open(&env, &[self.key.verifying_key()], name).unwrap(),
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

    fn manifest_envelope(&self, channel: &str) -> Result<Envelope> {
        let client = fetch::client(&limits()).unwrap();
        let url = self.url(&format!("/v1/channels/{channel}/manifest"));
        fetch::get_envelope(&client, &url, "manifest", MAX_MANIFEST_BYTES)
    }

    fn download(&self, name: &str, dest: &Path, d: &Descriptor) -> Result<fetch::Fetched> {
        let client = fetch::client(&limits()).unwrap();
        fetch::download(
            &client,
            &self.url(&format!("/v1/artifacts/{name}")),
            dest,
            d,
            &limits(),
            &mut |_, _| {},
        )
    }
}

#[test]
fn manifest_is_signed_fresh_and_per_channel() {
    let f = start(Duration::ZERO, u64::MAX);
    let env = f.manifest_envelope("stable").unwrap();
    let m: Manifest = sign::open(&env, &[f.key.verifying_key()], "manifest").unwrap();
    assert_eq!(m.channel, "stable");
    assert_eq!(m.releases.len(), 2);
    assert!(m.expires > m.issued);
    let other = SigningKey::from_bytes(&[8u8; 32]);
    let err = sign::open::<Manifest>(&env, &[other.verifying_key()], "manifest").unwrap_err();
    assert!(matches!(
        err.downcast_ref::<Error>(),
        Some(Error::SignatureInvalid(_))
    ));
    let edge = f.manifest_envelope("edge").unwrap();
    let m: Manifest = sign::open(&edge, &[f.key.verifying_key()], "manifest").unwrap();
    assert!(m.releases.is_empty());
    assert!(f.manifest_envelope("nightly").is_err());
}

#[test]
fn missing_diff_says_come_back_later_and_is_built_once_for_many_boxes() {
    let f = start(Duration::from_millis(500), u64::MAX);
    let url = f.url("/v1/artifacts/1.0-to-2.0.xz.descriptor");
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let client = fetch::client(&limits()).unwrap();
                let resp = client.get(&url).send().unwrap();
                (
                    resp.status().as_u16(),
                    resp.headers().get("retry-after").cloned(),
                    resp.headers().get("cache-control").cloned(),
                )
            })
        })
        .collect();
    for h in handles {
        let (status, retry, cache) = h.join().unwrap();
        assert_eq!(status, 503);
        assert_eq!(retry.unwrap(), "1");
        assert_eq!(cache.unwrap(), "no-store");
    }
    let d = f.descriptor("1.0-to-2.0.xz");
    assert_eq!(f.server.builds_started(), 1, "sixteen boxes, one build");
    assert_eq!(d.from, Some(v("1.0")));
    assert_eq!(d.chunks.len() as u64, d.size.div_ceil(d.chunk_size));
    // Built artifacts are immutable and cacheable anywhere.
    let client = fetch::client(&limits()).unwrap();
    let resp = client
        .get(f.url("/v1/artifacts/1.0-to-2.0.xz"))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    // Unknown versions and names that are not artifacts are 404, never built.
    for bad in [
        "/v1/artifacts/1.0-to-9.0.xz",
        "/v1/artifacts/..%2Fstore.xz",
        "/v1/artifacts/2.0-to-1.0.xz",
    ] {
        assert_eq!(
            client.get(f.url(bad)).send().unwrap().status().as_u16(),
            404,
            "{bad}"
        );
    }
}

#[test]
fn download_verifies_resumes_and_decompresses_to_the_stream() {
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("1.0-to-2.0.xz");
    let dest = f.root.join("dl/1.0-to-2.0.xz");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    // An earlier run got a bit more than one chunk before it was cut.
    let served = std::fs::read(f.root.join("store/artifacts/1.0-to-2.0.xz")).unwrap();
    let cut = d.chunk_size as usize + 1000;
    std::fs::write(f.root.join("dl/1.0-to-2.0.xz.partial"), &served[..cut]).unwrap();
    let got = f.download("1.0-to-2.0.xz", &dest, &d).unwrap();
    assert_eq!(
        got.resumed, d.chunk_size,
        "resumes from the last verified chunk"
    );
    assert_eq!(got.downloaded, d.size - d.chunk_size);
    assert_eq!(std::fs::read(&dest).unwrap(), served);
    // A rerun downloads nothing.
    assert_eq!(
        f.download("1.0-to-2.0.xz", &dest, &d).unwrap().downloaded,
        0
    );
    // What was verified decompresses to the exact stream.
    let mut stream = Vec::new();
    std::io::copy(&mut liblzma::read::XzDecoder::new(&served[..]), &mut stream).unwrap();
    assert_eq!(stream, noise(9 << 20, 3));
}

#[test]
fn corrupted_truncated_and_oversized_artifacts_are_refused() {
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("full-2.0.xz");
    let path = f.root.join("store/artifacts/full-2.0.xz");
    let good = std::fs::read(&path).unwrap();
    let dest = f.root.join("full-2.0.xz");

    let mut bad = good.clone();
    bad[10] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    let err = f.download("full-2.0.xz", &dest, &d).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::ChecksumMismatch { .. })
        ),
        "{err:#}"
    );
    assert!(!dest.exists());

    std::fs::write(&path, &good[..good.len() - 100]).unwrap();
    let err = f.download("full-2.0.xz", &dest, &d).unwrap_err();
    assert!(format!("{err:#}").contains("ended after"), "{err:#}");
    assert!(!dest.exists());

    let mut long = good.clone();
    long.extend_from_slice(b"trailing junk");
    std::fs::write(&path, &long).unwrap();
    let err = f.download("full-2.0.xz", &dest, &d).unwrap_err();
    assert!(format!("{err:#}").contains("longer than"), "{err:#}");
    assert!(!dest.exists());

    // With the right bytes back, the same partial state completes.
    std::fs::write(&path, &good).unwrap();
    f.download("full-2.0.xz", &dest, &d).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), good);
}

#[test]
fn cache_cap_evicts_least_recently_used() {
    let f = start(Duration::ZERO, 4 << 20);
    f.descriptor("full-1.0.xz");
    f.descriptor("full-2.0.xz");
    let artifacts = f.root.join("store/artifacts");
    assert!(
        !artifacts.join("full-1.0.xz").exists(),
        "the older artifact was evicted"
    );
    assert!(artifacts.join("full-2.0.xz").exists());
}

#[test]
fn complete_but_corrupt_download_is_verified_and_fetched_again() {
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("full-2.0.xz");
    let good = std::fs::read(f.root.join("store/artifacts/full-2.0.xz")).unwrap();
    let dest = f.root.join("full-2.0.xz");
    f.download("full-2.0.xz", &dest, &d).unwrap();
    // The finished file rots on disk: right size, wrong bytes.
    let mut rotten = good.clone();
    rotten[good.len() / 2] ^= 0x01;
    std::fs::write(&dest, &rotten).unwrap();
    let got = f.download("full-2.0.xz", &dest, &d).unwrap();
    assert_eq!(got.downloaded, d.size, "the bad file was fetched again");
    assert_eq!(std::fs::read(&dest).unwrap(), good);
}

#[test]
fn descriptor_with_absurd_chunk_sizes_fails_without_panicking() {
    let f = start(Duration::ZERO, u64::MAX);
    let good = f.descriptor("full-2.0.xz");
    let dest = f.root.join("full-2.0.xz");
    for chunk_size in [0, 1 << 62, u64::MAX] {
        let mut d = good.clone();
        d.chunk_size = chunk_size;
        let err = f.download("full-2.0.xz", &dest, &d).unwrap_err();
        assert!(
            format!("{err:#}").contains("chunk_size"),
            "chunk_size {chunk_size}: {err:#}"
        );
        assert!(!dest.exists());
    }
}
