//! A real HTTP cache in front of the real server: Debian's nginx, configured from the shipped
//! `contrib/nginx-cache.conf` (only its addresses and paths changed), between the server of
//! `common/server.rs` (real HTTP; stream files stand in for ZFS) and the box's own download
//! code. What an operator relies on: "come back later" is never cached, a built artifact costs
//! the origin its bytes once however many boxes download it, Range resumes work through the
//! cache, and the TUF repository's timestamp always comes from the origin while its versioned
//! metadata costs the origin once.
//!
//! Origin bytes are counted by a relay between nginx and the server that passes every byte
//! through unchanged. nginx runs as one foreground process of the test's user (root in CI) in
//! a temp directory. Without nginx the test fails, it does not skip (`tools/install-deps`
//! installs it).

#[path = "common/server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use server::{download_from, limits, start, start_with, Setup};
use upgradectl::appliance::prepare::fetch;
use upgradectl::core::manifest::{self, Descriptor};

/// The shipped example, as an operator copies it.
const EXAMPLE: &str = include_str!("../contrib/nginx-cache.conf");

/// The diff every test downloads (9 MiB of noise: two of the example's 8 MiB slices).
const DIFF: &str = "1.0-to-2.0";

/// Counts the bytes the origin sends: a TCP relay in front of it. A measuring tap, not a
/// stand-in: requests and responses pass through unchanged.
struct OriginTap {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
}

impl OriginTap {
    fn new(origin: SocketAddr) -> OriginTap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                let Ok(up) = TcpStream::connect(origin) else {
                    continue;
                };
                let (mut down_r, mut up_w) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut down_r, &mut up_w);
                    let _ = up_w.shutdown(Shutdown::Write);
                });
                let counter = counter.clone();
                std::thread::spawn(move || relay_counting(up, down, &counter));
            }
        });
        OriginTap { addr, sent }
    }

    /// Bytes the origin has sent so far.
    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// What `f` cost the origin, in bytes.
    fn cost<T>(&self, f: impl FnOnce() -> T) -> (u64, T) {
        let before = self.sent();
        let out = f();
        (self.sent() - before, out)
    }
}

/// Copies `from` into `to`, counting each byte before it is passed on.
fn relay_counting(mut from: TcpStream, mut to: TcpStream, counter: &AtomicU64) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                counter.fetch_add(n as u64, Ordering::SeqCst);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// nginx running the example configuration in a temp directory, in the foreground, one
/// process (killed on drop).
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// A port free a moment ago (nginx binds it itself).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `text` with each `(from, to)` replaced; each `from` must occur exactly once, so that a
/// change to the example that the test no longer matches fails here rather than testing
/// something else.
fn template(text: &str, subst: &[(&str, String)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in subst {
        assert_eq!(
            out.matches(from).count(),
            1,
            "contrib/nginx-cache.conf should hold {from:?} once"
        );
        out = out.replace(from, to);
    }
    out
}

impl Nginx {
    /// Starts nginx in front of `origin`. Fails loudly when nginx is not installed.
    fn start(origin: SocketAddr) -> Nginx {
        let dir = tempfile::Builder::new()
            .prefix("upgradectl-nginx-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        for sub in ["cache", "tmp"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let port = free_port();
        let site = template(
            EXAMPLE,
            &[
                ("server 127.0.0.1:8080;", format!("server {origin};")),
                ("listen 80;", format!("listen 127.0.0.1:{port};")),
                (
                    "/var/cache/nginx/upgradectl ",
                    format!("{} ", d.join("cache").display()),
                ),
                (
                    "/var/log/nginx/upgradectl-access.log",
                    d.join("access.log").display().to_string(),
                ),
            ],
        );
        std::fs::write(d.join("upgradectl-cache.conf"), site).unwrap();
        // What Debian's /etc/nginx/nginx.conf provides around conf.d, in the temp directory;
        // one process in the foreground (no master, so no workers to switch to www-data).
        let main = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  \
             proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n  \
             uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n  \
             include {d}/upgradectl-cache.conf;\n}}\n",
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), main).unwrap();
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|p| !p.starts_with('/') || Path::new(p).exists())
            .unwrap();
        let mut child = Command::new(nginx)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nginx ({e}): the HTTP cache test needs Debian's nginx \
                     (apt-get install nginx; tools/install-deps installs it)"
                )
            });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(d.join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "nginx did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, addr, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// nginx's access log (the example's format: cache status and origin bytes per request
    /// and per slice), for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One answer: status, the cache's verdict (`X-Cache-Status`), Cache-Control, body.
struct Answer {
    status: u16,
    cache: String,
    cache_control: String,
    body: Vec<u8>,
}

fn get(url: &str) -> Answer {
    let client = fetch::client(&limits()).unwrap();
    let resp = client.get(url).send().unwrap();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (cache, cache_control) = (header("x-cache-status"), header("cache-control"));
    Answer {
        status: resp.status().as_u16(),
        cache,
        cache_control,
        body: resp.bytes().unwrap().to_vec(),
    }
}

/// The descriptor in an answer, validated (the box trusts the copy the repository lists; the
/// repository's own path through the cache is tested below).
fn open(a: &Answer, name: &str) -> Descriptor {
    manifest::descriptor_of_verified_target(&a.body, name).unwrap()
}

/// A box's download of `DIFF` through `at`: the descriptor, then the artifact into `dir`,
/// verified against it.
fn box_download(at: SocketAddr, dir: &Path) -> fetch::Fetched {
    let a = get(&format!("http://{at}/v1/artifacts/{DIFF}.descriptor"));
    assert_eq!(a.status, 200);
    let d = open(&a, DIFF);
    download_from(at, DIFF, &dir.join(DIFF), &d).unwrap()
}

fn box_dir(root: &Path, n: usize) -> PathBuf {
    let dir = root.join(format!("box{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn come_back_later_is_never_cached_and_an_artifact_costs_the_origin_once() {
    // The build takes 2 s: boxes asking meanwhile are told to come back later.
    let f = start_with(Setup {
        delay: Duration::from_secs(2),
        ..Setup::default()
    });
    let tap = OriginTap::new(f.addr);
    let nginx = Nginx::start(tap.addr);
    let boxes = tempfile::tempdir().unwrap();

    // While it builds, descriptor and artifact answer 503: each from the origin, never from
    // the cache (a cached 503 would keep the boxes waiting after the build, until it
    // expired). Then the first box downloads it through the cache. All of this together
    // costs the origin the artifact once, plus a few short answers: whether a poll raced
    // the end of the build and cached the artifact first or the first box did.
    let mut later = 0;
    let (first, (descriptor, fetched)) = tap.cost(|| {
        let descriptor = loop {
            let a = get(&nginx.url(&format!("/v1/artifacts/{DIFF}.descriptor")));
            match a.status {
                200 => break open(&a, DIFF),
                503 => {
                    assert_ne!(
                        a.cache, "HIT",
                        "a come back later answer came from the cache"
                    );
                    assert_eq!(a.cache_control, "no-store");
                    later += 1;
                }
                s => panic!("descriptor: {s}\n{}", nginx.log()),
            }
            let art = get(&nginx.url(&format!("/v1/artifacts/{DIFF}")));
            if art.status == 503 {
                assert_ne!(
                    art.cache, "HIT",
                    "a come back later answer came from the cache"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let fetched = box_download(nginx.addr, &box_dir(boxes.path(), 0));
        (descriptor, fetched)
    });
    assert!(
        later >= 2,
        "{later} come back later answers during a 2 s build"
    );
    assert_eq!(f.server.builds_started(), 1);
    let size = descriptor.size;
    assert_eq!(fetched.downloaded, size);
    assert!(
        (size..size + (64 << 10)).contains(&first),
        "the first box cost the origin {first} bytes for a {size}-byte artifact\n{}",
        nginx.log()
    );
    // Every other box costs it nothing: descriptor and artifact come from the cache.
    const BOXES: usize = 8;
    let mut with_cache = first;
    for n in 1..BOXES {
        let (cost, fetched) = tap.cost(|| box_download(nginx.addr, &box_dir(boxes.path(), n)));
        assert_eq!(fetched.downloaded, size);
        assert_eq!(
            cost,
            0,
            "box {n} cost the origin {cost} bytes\n{}",
            nginx.log()
        );
        with_cache += cost;
    }
    let a = get(&nginx.url(&format!("/v1/artifacts/{DIFF}.descriptor")));
    assert_eq!((a.status, a.cache.as_str()), (200, "HIT"));

    // The same boxes straight at the origin, for comparison.
    let direct = tempfile::tempdir().unwrap();
    let (without_cache, _) = tap.cost(|| {
        for n in 0..BOXES {
            box_download(tap.addr, &box_dir(direct.path(), n));
        }
    });
    assert!(without_cache >= BOXES as u64 * size);
    println!(
        "origin bytes for {BOXES} boxes downloading {DIFF} ({size} bytes) and its descriptor: \
         {without_cache} without the cache, {with_cache} with it"
    );
}

#[test]
fn range_resumes_work_through_the_cache() {
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor(DIFF);
    let boxes = tempfile::tempdir().unwrap();
    // The artifact as the origin serves it, to leave a box's interrupted download behind.
    let whole = boxes.path().join("whole");
    f.download(DIFF, &whole, &d).unwrap();
    let whole = std::fs::read(&whole).unwrap();
    let tap = OriginTap::new(f.addr);
    let nginx = Nginx::start(tap.addr);
    const MIB: u64 = 1 << 20;
    assert!(
        d.size > 8 * MIB + MIB / 2,
        "the artifact spans two 8 MiB slices"
    );

    // A box whose download stopped at `stopped` bytes resumes through the cache: Range from
    // its last verified chunk, answered 206 (the client refuses anything else).
    let resume = |n: usize, stopped: u64| {
        let dir = box_dir(boxes.path(), n);
        let dest = dir.join(DIFF);
        std::fs::write(fetch::partial_path(&dest), &whole[..stopped as usize]).unwrap();
        let (cost, fetched) = tap.cost(|| download_from(nginx.addr, DIFF, &dest, &d).unwrap());
        assert_eq!(fetched.resumed + fetched.downloaded, d.size);
        assert_eq!(std::fs::read(&dest).unwrap(), whole);
        println!(
            "box {n}: resumed at {} of {} bytes, origin sent {cost}",
            fetched.resumed, d.size
        );
        (cost, fetched)
    };
    // Nothing cached yet: the resume from 8 MiB costs the origin only the second slice.
    let (cost, fetched) = resume(0, 9 * MIB);
    assert_eq!(fetched.resumed, 8 * MIB);
    let tail = d.size - 8 * MIB;
    assert!(
        (tail..tail + (64 << 10)).contains(&cost),
        "a resume from 8 MiB cost the origin {cost} bytes, its slice is {tail}\n{}",
        nginx.log()
    );
    // From 4 MiB: the first slice from the origin, the second from the cache.
    let (cost, fetched) = resume(1, 5 * MIB);
    assert_eq!(fetched.resumed, 4 * MIB);
    assert!(
        (8 * MIB..8 * MIB + (64 << 10)).contains(&cost),
        "cost {cost}\n{}",
        nginx.log()
    );
    // Everything cached: a resume costs the origin nothing.
    let (cost, _) = resume(2, 6 * MIB);
    assert_eq!(cost, 0, "{}", nginx.log());
}

#[test]
fn the_timestamp_always_comes_from_the_origin_and_versioned_metadata_costs_it_once() {
    let f = start_with(Setup {
        repo: true,
        ..Setup::default()
    });
    let tap = OriginTap::new(f.addr);
    let nginx = Nginx::start(tap.addr);
    // A box verifies the repository through the cache.
    let m = f.offered_at(&nginx.url(""), "stable", None);
    assert_eq!(m.releases.len(), 2, "{m:?}");

    // The timestamp says "no-cache": every box's request reaches the origin.
    let url = nginx.url("/v1/metadata/timestamp.json");
    let version = |a: &Answer| {
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        (v["signed"]["version"].as_u64().unwrap(), v)
    };
    let (cost, first) = tap.cost(|| get(&url));
    assert_eq!(
        (first.status, first.cache_control.as_str()),
        (200, "no-cache")
    );
    assert!(cost > 0);
    let (cost, again) = tap.cost(|| get(&url));
    assert_ne!(again.cache, "HIT", "{}", nginx.log());
    assert!(cost > 0, "a timestamp from the cache");

    // Versioned metadata never changes: once in the cache, it costs the origin nothing.
    let (_, ts) = version(&first);
    let snapshot = ts["signed"]["meta"]["snapshot.json"]["version"]
        .as_u64()
        .unwrap();
    let url = nginx.url(&format!("/v1/metadata/{snapshot}.snapshot.json"));
    let (cost, fetched) = tap.cost(|| get(&url));
    assert_eq!(fetched.status, 200);
    assert!(
        fetched.cache_control.contains("immutable"),
        "{}",
        fetched.cache_control
    );
    assert!(
        cost > 0 || fetched.cache == "HIT",
        "the box's load above cached it"
    );
    let (cost, cached) = tap.cost(|| get(&url));
    assert_eq!((cached.cache.as_str(), cost), ("HIT", 0), "{}", nginx.log());

    // The server signs a new timestamp: the next box sees it at once, not a cached one.
    let repo = f.repo.as_ref().unwrap();
    upgradectl::server::tuf_repo::refresh(&repo.dir, &repo.keys).unwrap();
    let (newer, _) = version(&get(&nginx.url("/v1/metadata/timestamp.json")));
    assert!(newer > version(&first).0, "{newer}");
    let m = f.offered_at(&nginx.url(""), "stable", None);
    assert_eq!(m.releases.len(), 2);
}
