//! The operator's fleet commands through the binary, on a store directory: enroll a box from
//! its `identity` output, start a wave rollout, pause, resume, withdraw, and what `release`
//! and `fleet status` print. (`publish` needs ZFS: releases.json is written by hand.)

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// `upgradectl --json ARGS`: exit code and the last stdout line as JSON.
fn run(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_upgradectl"))
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("null");
    (
        out.status.code().unwrap(),
        serde_json::from_str(last).unwrap(),
    )
}

fn publish_by_hand(store: &Path) {
    std::fs::create_dir_all(store).unwrap();
    let sha = "0".repeat(64);
    let releases = serde_json::json!([{"channel": "stable", "version": "2.0", "rollout": 100,
        "paused": false, "image": {"size": 1, "sha256": sha}}]);
    std::fs::write(store.join("releases.json"), releases.to_string()).unwrap();
}

#[test]
fn an_operator_runs_a_wave_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    publish_by_hand(&store);

    let root = dir.path().join("box");
    std::fs::create_dir_all(root.join("etc/upgradectl")).unwrap();
    std::fs::write(root.join("etc/machine-id"), "0123abcd\n").unwrap();
    let (code, id) = run(&["--root", root.to_str().unwrap(), "identity"]);
    assert_eq!(code, 0, "{id}");
    let id_file = dir.path().join("id.json");
    std::fs::write(&id_file, id.to_string()).unwrap();
    let (code, enrolled) = run(&[
        "fleet",
        "enroll",
        "--store",
        s,
        "--identity",
        id_file.to_str().unwrap(),
        "--group",
        "zone-b",
    ]);
    assert_eq!(code, 0, "{enrolled}");
    assert_eq!(enrolled["box_id"], "0123abcd");
    assert_eq!(enrolled["group"], "zone-b");
    assert_eq!(enrolled["public_key"], id["public_key"]);
    let (code, _) = run(&[
        "fleet",
        "enroll",
        "--store",
        s,
        "--box-id",
        "x",
        "--public-key",
        "ed25519:bogus",
    ]);
    assert_eq!(code, 2, "a bad key is refused");

    let rel = |extra: &[&str]| {
        let mut args = vec!["release", "--store", s, "--version", "2.0"];
        args.extend(extra);
        run(&args)
    };
    let (code, r) = rel(&[
        "--waves",
        "1,10,100",
        "--soak",
        "60",
        "--groups",
        "zone-a,zone-b",
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["waves"]["stage"], 0);
    assert_eq!(r["waves"]["group"], "zone-a");
    assert_eq!(r["waves"]["percent"], 1);
    assert_eq!(r["waves"]["paused"], Value::Null);
    assert_eq!(rel(&["--rollout", "50"]).0, 2, "waves own the percentage");
    assert_eq!(rel(&["--waves", "5,50"]).0, 2, "waves end at 100");
    let (_, r) = rel(&["--pause"]);
    assert_eq!(r["waves"]["paused"], "paused by the operator");
    assert_eq!(r["paused"], true);
    assert_eq!(r["rollout"], 100, "the release record's own percentage");
    let (_, r) = rel(&["--resume"]);
    assert_eq!(
        (&r["waves"]["paused"], &r["paused"]),
        (&Value::Null, &Value::Bool(false))
    );
    let (code, status) = run(&["fleet", "status", "--store", s]);
    assert_eq!(code, 0);
    assert_eq!(status["rollouts"][0]["version"], "2.0");
    assert_eq!(
        status["rollouts"][0]["policy"]["waves"],
        serde_json::json!([1, 10, 100])
    );
    assert_eq!(status["rollouts"][0]["state"], "advancing");
    assert_eq!(status["rollouts"][0]["failure_rate"], Value::Null);
    assert_eq!(
        status["versions"],
        serde_json::json!([{"version": null, "boxes": 1, "groups": {"zone-b": 1}}]),
        "enrolled, never reported"
    );
    let text = Command::new(env!("CARGO_BIN_EXE_upgradectl"))
        .args(["fleet", "status", "--store", s])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.starts_with("2.0: stage 1/9 (zone-a at 1%), advancing;"),
        "{text}"
    );
    assert!(
        text.contains("boxes by version:\n  unknown: 1 boxes (zone-b 1)\n"),
        "{text}"
    );
    let (_, r) = rel(&["--withdraw"]);
    assert_eq!(r["waves"]["withdrawn"], true);
    assert_eq!(
        (&r["paused"], &r["rollout"]),
        (&Value::Bool(true), &Value::from(0))
    );
    assert_eq!(rel(&["--resume"]).0, 2, "withdrawn for good");
    assert_eq!(
        run(&[
            "release",
            "--store",
            s,
            "--version",
            "3.0",
            "--waves",
            "1,100"
        ])
        .0,
        2
    );
}
