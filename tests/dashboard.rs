//! The operator's dashboard in a real headless browser: the real server on 127.0.0.1 with a
//! fleet database (`common/server.rs`), enrolled boxes (one with a hostile group label), signed
//! reports that pause a wave rollout by themselves, then Debian's Chromium renders `/fleet`
//! (`--dump-dom`, `--screenshot`). Chromium is required (`tools/install-deps`): without it this
//! test fails, it never skips.

#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fleet::enroll;
use server::{start_with, Fixture, Setup};
use upgradectl::core::report::Outcome;
use upgradectl::fleet::control;
use upgradectl::fleet::rollout::Policy;
use upgradectl::fleet::store::Db;
use upgradectl::sys::clock::now;

const HOSTILE: &str = "<script>alert(1)</script>";
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(90);

/// Box `i` reports `outcome` of 1.0 → 2.0, signed with `key`; the server must store it.
fn post(f: &Fixture, i: u8, key: &SigningKey, outcome: Outcome) {
    let body = fleet::signed(&fleet::report(i, "2.0", outcome), key);
    let status = fleet::post(&f.url("/v1/reports"), body);
    assert_eq!(status, 201, "{outcome:?} of box-{i}");
}

/// Debian's Chromium, or a loud failure.
fn chromium() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("chromium is not installed: the dashboard test needs a real browser (tools/install-deps, or apt-get install chromium)")
    })
}

/// Runs headless Chromium with `args` against `url` in its own profile; its stdout. Fails the
/// test if it exits badly or runs past the deadline.
fn run_chromium(profile: &Path, args: &[&str], url: &str) -> String {
    let started = Instant::now();
    let mut child = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chromium");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > CHROMIUM_DEADLINE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("chromium {args:?} ran over {CHROMIUM_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(status.success(), "chromium {args:?}: {status}\n{stderr}");
    eprintln!("chromium {args:?}: {:.2}s", started.elapsed().as_secs_f64());
    reader.join().unwrap()
}

#[test]
fn a_browser_shows_the_paused_release_why_and_the_boxes_by_version() {
    let f = start_with(Setup {
        fleet: true,
        ..Setup::default()
    });
    let db = Db::open_in(&f.root.join("store")).unwrap();
    let keys: Vec<_> = (1..=4).map(|i| enroll(&db, i, "zone-a")).collect();
    let hostile = enroll(&db, 5, HOSTILE);
    enroll(&db, 6, "zone-b");
    let policy = Policy {
        waves: vec![50, 100],
        groups: vec!["zone-a".into()],
        max_failures: 2,
        ..Policy::default()
    };
    control::start(&db, "2.0", policy, now()).unwrap();

    // box-1 took 2.0; box-2 and box-3 went back to 1.0 (the second failure pauses 2.0);
    // box-4 only prepared it; the hostile box-5 is on its trial; box-6 never reported.
    post(&f, 1, &keys[0], Outcome::Confirmed);
    post(&f, 2, &keys[1], Outcome::Fallback);
    post(&f, 3, &keys[2], Outcome::TrialFailed);
    post(&f, 4, &keys[3], Outcome::Prepared);
    post(&f, 5, &hostile, Outcome::Upgraded);
    let reason = db.rollout("2.0").unwrap().unwrap().progress.paused;
    let reason = reason.expect("paused by the reports");
    assert!(reason.contains("2 boxes failed"), "{reason}");

    // The operator's command shows the same.
    let status = Command::new(env!("CARGO_BIN_EXE_upgradectl"))
        .args(["fleet", "status", "--store"])
        .arg(f.root.join("store"))
        .output()
        .unwrap();
    let text = String::from_utf8(status.stdout).unwrap();
    eprintln!("{text}");
    assert!(text.contains(&format!("paused: {reason};")), "{text}");
    assert!(text.contains("2 of 3 failed (66.7%)"), "{text}");
    for line in [
        "  2.0: 2 boxes (<script>alert(1)</script> 1, zone-a 1)",
        "  1.0: 3 boxes (zone-a 3)",
        "  unknown: 1 boxes (zone-b 1)",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }

    let client = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client.get(f.url("/fleet")).send().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let header = |name: &str| resp.headers()[name].to_str().unwrap().to_owned();
    assert_eq!(header("cache-control"), "no-store");
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    let resp = client.get(f.url("/")).send().unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    assert_eq!(resp.headers()["location"], "/fleet");

    let dir = tempfile::tempdir().unwrap();
    let url = f.url("/fleet");
    let dom = run_chromium(&dir.path().join("profile"), &["--dump-dom"], &url);
    assert!(dom.contains("<h1>Fleet</h1>"), "{dom}");
    assert!(
        dom.contains("<section class=\"rollout paused\"><h2>2.0 <span class=\"state paused\">paused</span></h2>"),
        "{dom}"
    );
    let shown = "<p class=\"reason\">Paused since ";
    let at = dom
        .find(shown)
        .unwrap_or_else(|| panic!("no pause in {dom}"));
    let line = &dom[at..at + dom[at..].find("</p>").unwrap()];
    assert!(line.ends_with(&format!(": {reason}")), "{line}");
    assert!(
        dom.contains("66.7% (2 of 3 finished boxes failed)"),
        "{dom}"
    );
    for row in [
        "<tr><td>2.0</td><td>2</td><td>&lt;script&gt;alert(1)&lt;/script&gt;: 1, zone-a: 1</td></tr>",
        "<tr><td>1.0</td><td>3</td><td>zone-a: 3</td></tr>",
        "<tr><td>unknown</td><td>1</td><td>zone-b: 1</td></tr>",
        "<tr><th>boxes</th><th>prepared</th><th>upgraded</th><th>confirmed</th><th>failed</th><th>reverted</th><th>fallback</th><th>trial-failed</th></tr>",
        "<tr><td>distinct</td><td>1</td><td>1</td><td>1</td><td>0</td><td>0</td><td>1</td><td>1</td></tr>",
    ] {
        assert!(dom.contains(row), "{row} not in\n{dom}");
    }
    assert!(
        !dom.to_ascii_lowercase().contains("<script"),
        "an element was injected:\n{dom}"
    );

    let png = dir.path().join("dashboard.png");
    let shot = format!("--screenshot={}", png.display());
    run_chromium(
        &dir.path().join("profile"),
        &[&shot, "--window-size=1200,900", "--hide-scrollbars"],
        &url,
    );
    let bytes = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 10_000, "{} bytes: a blank page?", bytes.len());
    // `DASHBOARD_SCREENSHOT=docs/dashboard.png` keeps it (how docs/dashboard.png was made).
    if let Some(keep) = std::env::var_os("DASHBOARD_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }
}
