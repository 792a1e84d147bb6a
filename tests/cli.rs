//! Host integration tests of the command line's contract: refused input (bad versions, bad
//! configuration) is exit 2 with a clear message, JSON in JSON mode; one upgradectl at a time
//! (exit 5, or `--wait`); the man page and completions are generated.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{HostRoot, CONFIG};

#[test]
fn bad_versions_are_refused_as_json() {
    let h = HostRoot::provisioned();
    let absurd = "1.".repeat(100) + "1";
    for (bad, why) in [
        ("../x", "path separators"),
        ("1..2", "empty part"),
        ("2.0/../../etc", "path separators"),
        ("", "empty"),
        ("1.0-rc1", "only digits and dots"),
        (absurd.as_str(), "too long"),
    ] {
        for verb in [&["upgrade", "--no-reboot"][..], &["init"][..]] {
            let mut args = verb.to_vec();
            args.extend(["--version", bad]);
            let r = h.run(&args).expect(2);
            assert_eq!(r.lines.len(), 1, "one JSON line: {}", r.stdout);
            let e = r.error();
            assert_eq!(e["kind"], "refused");
            assert_eq!(e["exit"], 2);
            let msg = e["message"].as_str().unwrap();
            assert!(
                msg.contains("invalid version") && msg.contains(why),
                "{bad:?}: {msg}"
            );
            assert!(msg.len() < 400, "message echoes the absurd input: {msg}");
        }
    }
    assert!(h.grubenv().is_empty());
}

#[test]
fn usage_errors_are_json_in_json_mode_and_text_otherwise() {
    let h = HostRoot::provisioned();
    let r = h.run(&["status", "--bogus"]).expect(2);
    assert!(r.error()["message"].as_str().unwrap().contains("--bogus"));
    let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("upgradectl"))
        .args(["--root", h.root().to_str().unwrap()])
        .args(["upgrade", "--version", "../x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid version \"../x\""), "{stderr}");
}

#[test]
fn bad_config_names_the_key_and_the_file() {
    let h = HostRoot::provisioned();
    let image_config = h.path("etc/upgradectl/upgradectl.toml");
    let override_config = h.host("var/lib/upgradectl/upgradectl.toml");
    let cases = [
        ("chanel = \"edge\"\n", "chanel"),
        ("[grub]\npanic_seconds = \"ten\"\n", "grub.panic_seconds"),
        ("[[health]]\nname = \"x\"\ncommand = \"true\"\n", "health"),
        ("channel = \"nightly\"\n", "channel"),
        ("[grub\n", "TOML"),
    ];
    for (text, key) in cases {
        h.set_config(&format!("{CONFIG}\n{text}"));
        if text.starts_with('[') {
            // Tables after the base config would merge into its tables; test them alone.
            h.set_config(text);
        }
        for verb in ["status", "upgrade", "confirm", "cleanup"] {
            let r = h.run(&[verb]).expect(2);
            let msg = r.error()["message"].as_str().unwrap().to_owned();
            assert!(
                msg.contains(&image_config.display().to_string()),
                "{verb} {text:?}: {msg}"
            );
            if key != "TOML" {
                assert!(msg.contains(key), "{verb} {text:?}: {msg}");
            }
        }
    }
    // The box-specific override is blamed for its own mistakes.
    h.set_config(CONFIG);
    std::fs::write(&override_config, "[grub]\ntimeout_seconds = -1\n").unwrap();
    let r = h.run(&["status"]).expect(2);
    let msg = r.error()["message"].as_str().unwrap();
    assert!(
        msg.contains(&override_config.display().to_string()) && msg.contains("timeout_seconds"),
        "{msg}"
    );
    std::fs::write(&override_config, "host_mount = \"/elsewhere\"\n").unwrap();
    let r = h.run(&["status"]).expect(2);
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("host_mount"));
}

/// A second upgradectl meets the first one's lock: exit 5 at once, or waits with `--wait`.
/// The first one is real too: `confirm` holding the lock while a slow health check runs.
#[test]
fn a_second_caller_is_locked_out_or_waits() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.set_config(&CONFIG.replace("command = [\"true\"]", "command = [\"sleep\", \"2\"]"));
    let mut first = h
        .command(&["confirm", "--no-reboot"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let lock = h.host("var/lib/upgradectl/lock");
    let holder = format!("pid {}", first.id());
    let start = Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default() != holder {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "confirm never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let r = h.run(&["cleanup"]).expect(5);
    assert_eq!(r.error()["kind"], "locked");
    assert!(
        r.error()["message"].as_str().unwrap().contains(&holder),
        "{}",
        r.stdout
    );
    // Reading does not need the lock.
    assert_eq!(h.status()["trying"]["version"], "2.0");

    let waiter = h
        .command(&["--wait", "revert", "--no-reboot"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        first.try_wait().unwrap().is_none(),
        "the check is too fast for this test"
    );
    assert!(first.wait().unwrap().success());
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    // The waiter ran after confirm made 2.0 the default: it reverted to 1.0.
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(report["to"], "1.0", "{report}");
}

/// A man(1) renders the page without complaint (groff with every warning on).
#[track_caller]
fn assert_renders_cleanly(page: &std::path::Path) {
    if std::path::Path::new("/usr/bin/groff").exists() {
        let out = std::process::Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(page)
            .output()
            .unwrap();
        assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    }
}

#[test]
fn man_page_and_completions_are_generated() {
    let h = HostRoot::new();
    // They need no configuration, even a broken one.
    h.set_config("chanel = 1\n");
    let man = h.command(&["man"]).output().unwrap();
    assert!(man.status.success());
    let man = String::from_utf8(man.stdout).unwrap();
    assert!(
        man.starts_with(".ie") || man.contains(".TH upgradectl"),
        "{man}"
    );
    for verb in ["status", "cleanup", "upgrade", "confirm", "revert", "init"] {
        assert!(man.contains(verb), "man page lacks {verb}");
    }
    // A man(1) that renders it without complaint.
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("upgradectl.1");
    std::fs::write(&page, &man).unwrap();
    assert_renders_cleanly(&page);

    // One page per verb for the package (tools/gen-assets), as git-style tools have; each
    // names itself and renders cleanly. The hidden grub-entries has none.
    let pages = dir.path().join("pages");
    let out = h
        .command(&["man", "--out-dir", pages.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for verb in [
        "prepare", "upgrade", "confirm", "revert", "serve", "publish",
    ] {
        let page = pages.join(format!("upgradectl-{verb}.1"));
        let text = std::fs::read_to_string(&page).unwrap();
        // Title, section, date, source, manual: all five, or man(1) shifts them.
        let th = text.lines().find(|l| l.starts_with(".TH ")).unwrap();
        assert!(
            th.starts_with(&format!(".TH upgradectl-{verb} 1 20")),
            "{th}"
        );
        assert!(
            th.ends_with(r#" "upgradectl 0.1.0" "upgradectl manual""#),
            "{th}"
        );
        assert!(text.contains(&format!("upgradectl {verb}")), "{text}");
        assert_renders_cleanly(&page);
    }
    assert!(pages.join("upgradectl.1").exists());
    assert!(!pages.join("upgradectl-grub-entries.1").exists());

    let bash = h.command(&["completions", "bash"]).output().unwrap();
    assert!(bash.status.success());
    let script = dir.path().join("upgradectl.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p upgradectl",
            script.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("-F _upgradectl upgradectl"));
    let text = String::from_utf8_lossy(&bash.stdout);
    assert!(text.contains("upgrade") && text.contains("--no-reboot"));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = h.command(&["completions", shell]).output().unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    h.command(&["completions", "tcsh"])
        .output()
        .map(|o| assert_eq!(o.status.code(), Some(2)))
        .unwrap();
}
