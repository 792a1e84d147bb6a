//! The box's TUF verification (`appliance::trust`, through `upgradectl releases`) against
//! repositories written by the Python reference implementation (`tests/tuf/repo.py`, `tuf`
//! from PyPI in the venv tools/install-deps makes), served over real HTTP: accepted when
//! right, and every attack class of the TUF specification refused, each on its own; root
//! rotations followed.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{json, Value};

/// The venv tools/install-deps creates with python-tuf; no silent skip when it is missing.
const PYTHON: &str = "/opt/upgradectl-tuf/bin/python";

struct Repo {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    dir: PathBuf,
}

impl Repo {
    fn new(dir: &Path) -> Repo {
        assert!(
            Path::new(PYTHON).exists(),
            "{PYTHON} is missing: run tools/install-deps (python-tuf in a venv)"
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tuf/repo.py");
        let mut child = Command::new(PYTHON)
            .arg(script)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting tests/tuf/repo.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Repo {
            child,
            stdin,
            stdout,
            dir: dir.to_owned(),
        }
    }

    fn cmd(&mut self, c: Value) {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ok", "repo.py {c}");
    }

    fn release(&mut self, channel: &str, version: &str) {
        self.cmd(
            json!({"op": "release", "channel": channel, "version": version,
                        "size": 1 << 20, "sha256": digest(version)}),
        );
    }

    fn root_v1(&self) -> PathBuf {
        self.dir.join("metadata/1.root.json")
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn digest(seed: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(seed.as_bytes()))
}

/// Serves `dir` at `/v1/` (real HTTP, axum + tower-http's ServeDir); with `endless`, that path
/// answers a body that never ends.
fn serve(dir: &Path, endless: Option<&'static str>) -> SocketAddr {
    use axum::body::Body;
    use axum::routing::get;
    use futures::StreamExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut app = axum::Router::new();
            if let Some(path) = endless {
                app = app.route(
                    path,
                    get(|| async {
                        let chunk = axum::body::Bytes::from(vec![b' '; 64 << 10]);
                        let s = futures::stream::repeat(chunk).map(Ok::<_, std::io::Error>);
                        Body::from_stream(s)
                    }),
                );
            }
            let app = app.nest_service("/v1", tower_http::services::ServeDir::new(dir));
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    addr
}

/// A box (a root directory) trusting `root`, following `channel` of the server at `addr`.
struct TestBox {
    root: tempfile::TempDir,
}

impl TestBox {
    fn new(addr: SocketAddr, root_json: &Path, channel: &str) -> TestBox {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc/upgradectl");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::copy(root_json, etc.join("root.json")).unwrap();
        std::fs::write(
            etc.join("upgradectl.toml"),
            format!(
                "server = \"http://{addr}\"\nchannel = \"{channel}\"\nbox_id = \"box-1\"\n\
                 [trust]\nroot = \"/etc/upgradectl/root.json\"\n"
            ),
        )
        .unwrap();
        TestBox { root }
    }

    /// `upgradectl --json releases`: exit code and the last JSON line.
    fn releases(&self) -> (i32, Value) {
        let out = Command::new(env!("CARGO_BIN_EXE_upgradectl"))
            .arg("--root")
            .arg(self.root.path())
            .args(["--json", "releases"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or("null");
        let v: Value = serde_json::from_str(last).unwrap_or(Value::Null);
        (out.status.code().unwrap_or(-1), v)
    }

    fn accepts(&self) -> Value {
        let (code, v) = self.releases();
        assert_eq!(code, 0, "refused a good repository: {v}");
        v
    }

    fn refuses(&self, what: &str) -> Value {
        let (code, v) = self.releases();
        assert_eq!(
            code, 2,
            "{what}: expected a refusal (exit 2), got {code}: {v}"
        );
        v
    }

    fn trusted_file(&self, name: &str) -> Vec<u8> {
        std::fs::read(
            self.root
                .path()
                .join("host/var/lib/upgradectl/tuf")
                .join(name),
        )
        .unwrap()
    }
}

fn versions(v: &Value) -> Vec<(String, u64, bool)> {
    v["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["version"].as_str().unwrap().to_owned(),
                r["rollout"].as_u64().unwrap(),
                r["paused"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A repository with stable 1.0 and 2.0, served; a box trusting its first root.
fn setup(root_keys: u32, threshold: u32) -> (tempfile::TempDir, Repo, TestBox) {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = Repo::new(dir.path());
    repo.cmd(json!({"op": "init", "root_keys": root_keys, "root_threshold": threshold}));
    repo.release("stable", "1.0");
    repo.release("stable", "2.0");
    let addr = serve(dir.path(), None);
    let b = TestBox::new(addr, &repo.root_v1(), "stable");
    (dir, repo, b)
}

#[test]
fn a_repository_written_by_python_tuf_is_accepted_with_its_rollout() {
    let (_d, mut repo, b) = setup(1, 1);
    repo.release("edge", "9.0");
    repo.release("stable", "3.0");
    repo.cmd(
        json!({"op": "rollout", "channel": "stable", "doc": {"releases": {
        "3.0": {"percent": 100, "paused": "3 of 20 failed"},
        "2.0": {"percent": 100}}}}),
    );
    let v = b.accepts();
    assert_eq!(
        versions(&v),
        [
            ("1.0".into(), 100, false),
            ("2.0".into(), 100, false),
            ("3.0".into(), 100, true)
        ],
        "{v}"
    );
    assert_eq!(v["next"], "2.0", "the paused 3.0 is not taken: {v}");
    assert_eq!(v["root_version"], 1);
}

#[test]
fn arbitrary_installation_a_release_signed_by_an_unknown_key_is_refused() {
    let (_d, mut repo, b) = setup(1, 1);
    b.accepts();
    repo.cmd(json!({"op": "new_key", "name": "attacker"}));
    repo.cmd(
        json!({"op": "release", "channel": "stable", "version": "6.6",
                    "size": 1, "sha256": digest("evil"), "signers": ["attacker"]}),
    );
    let v = b.refuses("a channel role signed by a key root never delegated to");
    assert!(v.to_string().contains("signature"), "{v}");
}

#[test]
fn arbitrary_installation_a_target_that_does_not_match_its_hash_is_refused() {
    let (d, mut repo, b) = setup(1, 1);
    repo.cmd(
        json!({"op": "rollout", "channel": "stable", "doc": {"releases": {"2.0": {"percent": 0}}}}),
    );
    b.accepts();
    // The online role signed percent 0; a mirror serves the same length with 100.
    for entry in walk(&d.path().join("rollout")) {
        let text = std::fs::read_to_string(&entry).unwrap();
        std::fs::write(&entry, text.replace("\"percent\": 0", "\"percent\": 9")).unwrap();
    }
    b.refuses("a rollout document whose bytes are not the signed ones");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn endless_data_is_cut_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = Repo::new(dir.path());
    repo.cmd(json!({"op": "init"}));
    let addr = serve(dir.path(), Some("/v1/metadata/timestamp.json"));
    let b = TestBox::new(addr, &repo.root_v1(), "stable");
    let started = std::time::Instant::now();
    let v = b.refuses("an endless timestamp.json");
    assert!(v.to_string().contains("Maximum size"), "{v}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "stopped reading only after {:?}",
        started.elapsed()
    );
}

#[test]
fn fast_forward_a_stolen_timestamp_key_is_recovered_by_rotating_it() {
    let (_d, mut repo, b) = setup(1, 1);
    b.accepts();
    // The thief signs timestamp version 1000 with the (valid) online key.
    repo.cmd(json!({"op": "publish", "timestamp_version": 1000}));
    b.accepts();
    // The repository owner's next timestamp (version 5) is now a rollback to the box...
    repo.cmd(json!({"op": "publish", "timestamp_version": 5}));
    let v = b.refuses("a timestamp older than the one trusted");
    assert!(
        v.to_string().contains("previously fetched version 1000"),
        "{v}"
    );
    // ...until root rotates the timestamp key: the box forgets the fast-forwarded version.
    repo.cmd(json!({"op": "rotate_root", "roles": ["timestamp"]}));
    repo.cmd(json!({"op": "publish", "timestamp_version": 6}));
    let v = b.accepts();
    assert_eq!(v["root_version"], 2);
}

#[test]
fn indefinite_freeze_expired_metadata_is_refused() {
    let (_d, mut repo, b) = setup(1, 1);
    b.accepts();
    repo.cmd(json!({"op": "publish", "expires_seconds": -60}));
    let v = b.refuses("an expired timestamp and snapshot");
    assert!(v.to_string().to_lowercase().contains("expired"), "{v}");
}

#[test]
fn mix_and_match_metadata_of_different_times_is_refused() {
    let (d, mut repo, b) = setup(1, 1);
    b.accepts();
    let old = std::fs::read(d.path().join("metadata/3.stable.json")).unwrap();
    repo.release("stable", "3.0");
    // The snapshot names stable version 4; the mirror serves the old role under that name.
    std::fs::write(d.path().join("metadata/4.stable.json"), old).unwrap();
    let v = b.refuses("an older channel role served for the version the snapshot names");
    assert!(v.to_string().contains("version mismatch"), "{v}");
}

#[test]
fn rollback_to_an_older_snapshot_is_refused_even_with_a_fresh_timestamp() {
    let (_d, mut repo, b) = setup(1, 1);
    let v = b.accepts();
    assert_eq!(v["next"], "2.0");
    // Snapshot 3 is the one before 2.0's release; a timestamp thief points at it.
    repo.cmd(json!({"op": "point_timestamp", "snapshot_version": 2}));
    let v = b.refuses("a timestamp naming an older snapshot than the trusted one");
    assert!(v.to_string().contains("Snapshot version 2"), "{v}");
}

#[test]
fn a_mirror_serving_stale_metadata_is_refused() {
    let (d, mut repo, b) = setup(1, 1);
    let stale = tempfile::tempdir().unwrap();
    copy_dir(d.path(), stale.path());
    repo.release("stable", "3.0");
    assert_eq!(b.accepts()["next"], "3.0");
    // The mirror goes back to its copy of yesterday's repository (not expired, all signed).
    let _ = std::fs::remove_dir_all(d.path().join("metadata"));
    copy_dir(stale.path(), d.path());
    b.refuses("yesterday's metadata after today's");
    let trusted: Value = serde_json::from_slice(&b.trusted_file("timestamp.json")).unwrap();
    assert_eq!(
        trusted["signed"]["version"], 4,
        "the box keeps the newest timestamp it accepted"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn key_compromise_below_the_root_threshold_cannot_rotate_root() {
    let (_d, mut repo, b) = setup(3, 2);
    b.accepts();
    // One of three root keys stolen: the thief's new root carries one old signature.
    repo.cmd(
        json!({"op": "rotate_root", "keys": 1, "threshold": 1, "old_signers": [0],
                    "roles": ["root", "targets"]}),
    );
    let v = b.refuses("a new root signed by one of 2-of-3 old root keys");
    assert!(
        v.to_string()
            .contains("threshold of 2 not met for role root"),
        "{v}"
    );
}

#[test]
fn wrong_software_another_channels_key_cannot_publish_to_stable() {
    let (_d, mut repo, b) = setup(1, 1);
    b.accepts();
    repo.cmd(json!({"op": "release", "channel": "edge", "version": "9.9",
                    "size": 1, "sha256": digest("edge"), "path_channel": "stable"}));
    let v = b.refuses("a stable release target signed by the edge role");
    assert!(
        v.to_string()
            .contains("not delegated: releases/stable/9.9.img"),
        "{v}"
    );
}

#[test]
fn wrong_software_another_products_repository_is_refused() {
    let (_d, _repo, b) = setup(1, 1);
    b.accepts();
    let other = tempfile::tempdir().unwrap();
    let mut theirs = Repo::new(other.path());
    theirs.cmd(json!({"op": "init"}));
    theirs.release("stable", "99.0");
    let addr = serve(other.path(), None);
    // The same box state, pointed at the other product's server.
    let toml = b.root.path().join("etc/upgradectl/upgradectl.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    let text = text.replace(
        &text[text.find("http://").unwrap()..text.find("\"\n").unwrap()],
        &format!("http://{addr}"),
    );
    std::fs::write(&toml, text).unwrap();
    b.refuses("a repository signed by keys this box's root does not know");
}

#[test]
fn root_rotation_one_of_one_to_two_of_three() {
    let (_d, mut repo, b) = setup(1, 1);
    b.accepts();
    repo.cmd(json!({"op": "rotate_root", "keys": 3, "threshold": 2, "new_signers": [0, 1]}));
    repo.release("stable", "3.0");
    let v = b.accepts();
    assert_eq!(
        (v["root_version"].as_u64(), v["next"].as_str()),
        (Some(2), Some("3.0"))
    );
    let root: Value = serde_json::from_slice(&b.trusted_file("root.json")).unwrap();
    assert_eq!(root["signed"]["roles"]["root"]["threshold"], 2);
}

#[test]
fn root_rotation_of_every_key_at_once_and_through_an_intermediate_root() {
    let (_d, mut repo, b) = setup(1, 1);
    b.accepts();
    // Every role's keys replaced in one new root, then root's again: the box, offline for
    // both, walks 1 -> 2 -> 3.
    repo.cmd(json!({"op": "rotate_root", "roles": ["root", "targets", "snapshot", "timestamp"]}));
    repo.cmd(json!({"op": "rotate_root", "roles": ["root"]}));
    repo.release("stable", "3.0");
    let v = b.accepts();
    assert_eq!(
        (v["root_version"].as_u64(), v["next"].as_str()),
        (Some(3), Some("3.0"))
    );
}

#[test]
fn a_revoked_keys_signatures_are_refused_after_the_rotation() {
    let (_d, mut repo, b) = setup(1, 1);
    b.accepts();
    repo.cmd(json!({"op": "alias_key", "name": "timestamp", "to": "revoked"}));
    repo.cmd(json!({"op": "rotate_root", "roles": ["timestamp"]}));
    b.accepts();
    repo.cmd(json!({"op": "publish", "timestamp_signers": ["revoked"]}));
    let v = b.refuses("a timestamp signed by the key root revoked");
    assert!(
        v.to_string()
            .contains("threshold of 1 not met for role timestamp"),
        "{v}"
    );
}

// -- the repository `upgradectl repo` writes (server::tuf_repo), read by both clients --

fn upgradectl(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_upgradectl"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "upgradectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// python-tuf's ngclient against the repository at `addr`: each target's length and sha256.
fn python_client(addr: SocketAddr, root: &Path, work: &Path, targets: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tuf/client.py");
    let out = Command::new(PYTHON)
        .arg(script)
        .arg(format!("http://{addr}/v1"))
        .arg(root)
        .arg(work)
        .args(targets)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python-tuf's client refused our repository: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn our_repository_is_accepted_by_the_box_and_by_python_tuf_and_rotations_are_followed() {
    let d = tempfile::tempdir().unwrap();
    let (repo, keys) = (d.path().join("repo"), d.path().join("keys"));
    let (repo_s, keys_s) = (repo.to_str().unwrap(), keys.to_str().unwrap());
    let at = ["--repo", repo_s, "--keys", keys_s];
    upgradectl(&[&["repo", "init"][..], &at, &["--root-keys", "1"]].concat());
    let root_v1 = d.path().join("root-v1.json");
    std::fs::copy(repo.join("metadata/1.root.json"), &root_v1).unwrap();
    let sha = digest("2.0");
    let release = |v: &str, sha: &str| {
        upgradectl(
            &[
                &["repo", "release"][..],
                &at,
                &["--version", v, "--size", "4096", "--sha256", sha],
            ]
            .concat(),
        );
        upgradectl(&[&["repo", "refresh"][..], &at].concat());
    };
    release("2.0", &sha);
    let addr = serve(&repo, None);
    let b = TestBox::new(addr, &root_v1, "stable");
    let v = b.accepts();
    assert_eq!(versions(&v), [("2.0".into(), 100, false)], "{v}");
    assert_eq!(v["releases"][0]["image"]["sha256"], sha.as_str());
    let py = tempfile::tempdir().unwrap();
    let got = python_client(addr, &root_v1, py.path(), &["releases/stable/2.0.img"]);
    assert_eq!(
        got["releases/stable/2.0.img"],
        json!({"length": 4096, "sha256": sha})
    );

    // Root goes from 1-of-1 to 2-of-3 and every top-level key is replaced; then 3.0.
    upgradectl(
        &[
            &["repo", "rotate-root"][..],
            &at,
            &[
                "--roles",
                "root,targets,snapshot,timestamp",
                "--root-keys",
                "3",
                "--root-threshold",
                "2",
            ],
        ]
        .concat(),
    );
    upgradectl(&[&["repo", "refresh"][..], &at].concat());
    release("3.0", &digest("3.0"));
    let v = b.accepts();
    assert_eq!(
        (v["root_version"].as_u64(), v["next"].as_str()),
        (Some(2), Some("3.0")),
        "{v}"
    );
    let got = python_client(addr, &root_v1, py.path(), &["releases/stable/3.0.img"]);
    assert_eq!(got["releases/stable/3.0.img"]["length"], 4096);
    assert!(
        keys.join("revoked/timestamp.1.pk8").exists(),
        "the old timestamp key is set aside"
    );
}

#[test]
fn a_release_signed_with_a_key_revoked_by_rotation_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (repo, keys) = (d.path().join("repo"), d.path().join("keys"));
    let (repo_s, keys_s) = (repo.to_str().unwrap(), keys.to_str().unwrap());
    let at = ["--repo", repo_s, "--keys", keys_s];
    upgradectl(&[&["repo", "init"][..], &at].concat());
    let root_v1 = repo.join("metadata/1.root.json");
    let addr = serve(&repo, None);
    let b = TestBox::new(addr, &root_v1, "stable");
    b.accepts();
    // Keep the targets key, rotate it away, then sign a new top-level targets with the
    // revoked key: refresh leaves out what does not verify, so write it as a mirror would.
    upgradectl(&[&["repo", "rotate-root"][..], &at, &["--roles", "targets"]].concat());
    upgradectl(&[&["repo", "refresh"][..], &at].concat());
    b.accepts();
    let old = std::fs::read(repo.join("metadata/1.targets.json")).unwrap();
    let newest = repo.join("metadata/2.targets.json");
    std::fs::write(&newest, &old).unwrap();
    let v = b.refuses("a targets role signed by the key root revoked");
    assert!(v.to_string().contains("targets"), "{v}");
}

#[path = "common/serve.rs"]
mod serve_bin;

#[test]
fn serve_publishes_the_repository_with_online_keys_only_and_a_pause_reaches_the_box() {
    let d = tempfile::tempdir().unwrap();
    let (repo, keys, online, store) = (
        d.path().join("repo"),
        d.path().join("keys"),
        d.path().join("online-keys"),
        d.path().join("store"),
    );
    let (repo_s, keys_s) = (repo.to_str().unwrap(), keys.to_str().unwrap());
    let at = ["--repo", repo_s, "--keys", keys_s];
    upgradectl(&[&["repo", "init"][..], &at].concat());
    let sha = digest("2.0");
    upgradectl(
        &[
            &["repo", "release"][..],
            &at,
            &["--version", "2.0", "--size", "4096", "--sha256", &sha],
        ]
        .concat(),
    );
    // The server gets the four online keys, nothing else.
    std::fs::create_dir_all(&online).unwrap();
    for role in ["snapshot", "timestamp", "rollout", "artifacts"] {
        let f = format!("{role}.1.pk8");
        std::fs::copy(keys.join(&f), online.join(&f)).unwrap();
    }
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(
        store.join("releases.json"),
        json!([{"channel": "stable", "version": "2.0", "rollout": 30, "paused": false,
                "image": {"size": 4096, "sha256": sha}}])
        .to_string(),
    )
    .unwrap();
    let port = serve_bin::free_port();
    // `serve --repo D/repo --repo-keys D/online-keys`.
    let _server = serve_bin::Serve::start(&store, d.path(), port, &["--repo-sync-seconds", "1"]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let b = TestBox::new(addr, &repo.join("metadata/1.root.json"), "stable");
    // The release the release manager signed offline is published by the server's first sync,
    // with the rollout the server signs online.
    let v = b.accepts();
    assert_eq!(versions(&v), [("2.0".into(), 30, false)], "{v}");
    upgradectl(&[
        "release",
        "--store",
        store.to_str().unwrap(),
        "--version",
        "2.0",
        "--pause",
    ]);
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = b.accepts();
        if versions(&v) == [("2.0".into(), 30, true)] {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the pause never reached the box: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // What the server serves carries the cache headers a CDN needs.
    let get = |path: &str| reqwest::blocking::get(format!("http://{addr}{path}")).unwrap();
    let ts = get("/v1/metadata/timestamp.json");
    assert_eq!(ts.headers()["cache-control"], "no-cache");
    let snap = get("/v1/metadata/1.snapshot.json");
    assert!(snap.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
}

#[path = "common/server.rs"]
mod inproc;

/// The in-process server publishing a repository, and a box root trusting its first root.
fn inproc_with_repo() -> (
    inproc::Fixture,
    tempfile::TempDir,
    upgradectl::appliance::config::Config,
    upgradectl::appliance::paths::Layout,
) {
    let f = inproc::start_with(inproc::Setup {
        repo: true,
        ..Default::default()
    });
    let boxroot = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(boxroot.path().join("etc")).unwrap();
    std::fs::copy(
        f.root.join("repo/metadata/1.root.json"),
        boxroot.path().join("etc/root.json"),
    )
    .unwrap();
    let mut config = upgradectl::appliance::config::Config::default();
    config.trust.root = Some("/etc/root.json".into());
    let layout = upgradectl::appliance::paths::Layout::new(boxroot.path(), &config.host_mount);
    (f, boxroot, config, layout)
}

#[test]
fn a_built_artifact_is_listed_by_the_online_role_and_read_at_its_digest_name() {
    use upgradectl::appliance::trust::Trusted;
    let (f, _boxroot, config, layout) = inproc_with_repo();
    let server = format!("http://{}", f.addr);
    let listed = || {
        Trusted::load(&layout, &config, &server)
            .unwrap()
            .artifact("1.0-to-2.0")
            .unwrap()
    };
    assert_eq!(listed(), None, "nothing is built yet");
    // A box asks for the diff: the server builds it, then lists it and its descriptor.
    let _ = reqwest::blocking::get(format!("{server}/v1/artifacts/1.0-to-2.0.descriptor"));
    inproc::wait_for(
        "the diff listed in the artifacts role",
        std::time::Duration::from_secs(60),
        || listed().is_some(),
    );
    let store = f.root.join("store/artifacts");
    let blob = listed().unwrap();
    let artifact = std::fs::read(store.join("1.0-to-2.0")).unwrap();
    assert_eq!(
        (blob.size, blob.sha256.as_str()),
        (artifact.len() as u64, digest_bytes(&artifact).as_str())
    );
    // The descriptor as a target, fetched at `artifacts/<sha256>.<name>` and verified.
    let t = Trusted::load(&layout, &config, &server).unwrap();
    let got = t
        .read("artifacts/1.0-to-2.0.descriptor", 8 << 20)
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        std::fs::read(store.join("1.0-to-2.0.descriptor")).unwrap()
    );
}

fn digest_bytes(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn prepare_takes_descriptors_from_the_repository_and_refuses_one_its_artifact_contradicts() {
    use upgradectl::appliance::prepare::metadata::Metadata;
    use upgradectl::appliance::trust::Trusted;
    use upgradectl::error::Error;
    let (f, _boxroot, config, layout) = inproc_with_repo();
    let server = format!("http://{}", f.addr);
    let client = upgradectl::appliance::prepare::fetch::client(&inproc::limits()).unwrap();
    let descriptor = || {
        let meta = Metadata::from(Trusted::load(&layout, &config, &server).unwrap());
        meta.descriptor(&client, &server, "1.0-to-2.0")
    };
    // Not built: come back later (the request has the server build it), until it is listed.
    let first = descriptor().unwrap_err();
    assert!(
        matches!(
            first.downcast_ref::<Error>(),
            Some(Error::ComeBackLater { .. })
        ),
        "{first:#}"
    );
    let mut got = None;
    inproc::wait_for(
        "the descriptor from the repository",
        std::time::Duration::from_secs(60),
        || {
            got = descriptor().ok();
            got.is_some()
        },
    );
    let d = got.unwrap();
    let artifact = std::fs::read(f.root.join("store/artifacts/1.0-to-2.0")).unwrap();
    assert_eq!(
        (d.size, d.sha256),
        (artifact.len() as u64, digest_bytes(&artifact))
    );
    // The online artifacts key lists the artifact with other bytes than its descriptor says:
    // neither is used.
    let wrong = upgradectl::core::manifest::Blob {
        size: 1234,
        sha256: digest("other"),
    };
    let (repo, keys) = (f.root.join("repo"), f.root.join("keys"));
    let listed = [("1.0-to-2.0".to_owned(), wrong)];
    upgradectl::server::tuf_repo::add_artifacts(&repo, &keys, &listed).unwrap();
    upgradectl::server::tuf_repo::refresh(&repo, &keys).unwrap();
    let e = descriptor().unwrap_err();
    assert!(
        matches!(e.downcast_ref::<Error>(), Some(Error::SignatureInvalid(_))),
        "{e:#}"
    );
}

#[test]
fn a_channel_key_rotated_twice_is_followed_and_the_revoked_key_signs_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (repo, keys) = (d.path().join("repo"), d.path().join("keys"));
    let (repo_s, keys_s) = (repo.to_str().unwrap(), keys.to_str().unwrap());
    let at = ["--repo", repo_s, "--keys", keys_s];
    let release = |keys: &str, v: &str| {
        let sha = digest(v);
        let args = [
            "--repo",
            repo_s,
            "--keys",
            keys,
            "--version",
            v,
            "--size",
            "4096",
        ];
        upgradectl(&[&["repo", "release"][..], &args, &["--sha256", &sha]].concat());
    };
    upgradectl(&[&["repo", "init"][..], &at].concat());
    release(keys_s, "1.0");
    upgradectl(&[&["repo", "refresh"][..], &at].concat());
    let root_v1 = repo.join("metadata/1.root.json");
    let addr = serve(&repo, None);
    let b = TestBox::new(addr, &root_v1, "stable");
    b.accepts();
    for n in 1..=2 {
        upgradectl(
            &[
                &["repo", "rotate-delegation"][..],
                &at,
                &["--role", "stable"],
            ]
            .concat(),
        );
        upgradectl(&[&["repo", "refresh"][..], &at].concat());
        let v = b.accepts();
        assert_eq!(versions(&v), [("1.0".into(), 100, false)], "{v}");
        assert!(keys.join(format!("revoked/stable.{n}.pk8")).exists());
        assert!(keys.join(format!("stable.{}.pk8", n + 1)).exists());
    }
    release(keys_s, "2.0");
    upgradectl(&[&["repo", "refresh"][..], &at].concat());
    assert_eq!(b.accepts()["next"], "2.0");
    // The first, revoked key cannot sign 3.0: the repository no longer delegates to it.
    let stolen = d.path().join("stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    std::fs::copy(
        keys.join("revoked/stable.1.pk8"),
        stolen.join("stable.1.pk8"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_upgradectl"))
        .args(["repo", "release", "--repo", repo_s, "--keys"])
        .arg(&stolen)
        .args([
            "--version",
            "3.0",
            "--size",
            "4096",
            "--sha256",
            &digest("3.0"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!b.accepts().to_string().contains("3.0"));
    // The reference implementation agrees the rotated repository is sound.
    let py = tempfile::tempdir().unwrap();
    let got = python_client(addr, &root_v1, py.path(), &["releases/stable/2.0.img"]);
    assert_eq!(got["releases/stable/2.0.img"]["length"], 4096);
    // And the verb refuses a role that is not delegated.
    let out = Command::new(env!("CARGO_BIN_EXE_upgradectl"))
        .args(
            [
                &["repo", "rotate-delegation"][..],
                &at,
                &["--role", "timestamp"],
            ]
            .concat(),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
