//! The initramfs script's redirect: when the image GRUB booted cannot be used, the initramfs
//! points GRUB at the fallback's own entry (grubenv `upgradectl_redirect`, rewritten in place)
//! and reboots, so the fallback runs its own kernel. Its shell functions run here on a real
//! ext4 host partition, under BusyBox's shell (the initramfs's) and dash, and what they write
//! is read back through GRUB's own driver, without a journal replay. The whole boot chain runs
//! in the VM tier (`vm-tests/run fallback`).

mod common;

use std::fs;
use std::process::Command;

use common::{tool, HostRoot};

const SCRIPT: &str = include_str!("../initramfs-hooks/scripts/local-bottom/upgradectl");
const SHELLS: [&[&str]; 2] = [&["busybox", "sh"], &["dash"]];

/// The script's functions (between its `--- functions` markers).
fn functions() -> &'static str {
    let start = SCRIPT.find("# --- functions").expect("functions marker");
    let end = SCRIPT.find("# --- end functions").expect("end marker");
    &SCRIPT[start..end]
}

/// Runs `call` after the script's functions under `shell`; (exit code, stdout).
fn run(shell: &[&str], call: &str) -> (i32, String) {
    let out = Command::new(shell[0])
        .args(&shell[1..])
        .arg("-c")
        .arg(format!("{}\n{call}", functions()))
        .output()
        .unwrap_or_else(|e| panic!("{shell:?} must be installed (tools/install-deps): {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn entry_ids_match_upgradectls_menu() {
    for shell in SHELLS {
        assert_eq!(run(shell, "grub_id /images/2.0.img").1, "upgradectl-2.0\n");
        assert_eq!(
            run(shell, "grub_id /images/415.1-rc1.img").1,
            "upgradectl-415.1-rc1\n"
        );
    }
}

#[test]
fn a_redirect_is_written_in_place_where_grub_reads_it() {
    for shell in SHELLS {
        let h = HostRoot::on_ext4();
        h.run(&["init", "--version", "1.0"]).expect(0);
        let env = h.grubenv_path();
        let env = env.to_str().unwrap();
        tool(&[
            "grub-editenv",
            env,
            "set",
            "upgradectl_attempted=upgradectl-2.0",
        ]);
        tool(&["grub-editenv", env, "set", "upgradectl_redirect=stale"]);
        // What GRUB reads now is what it reads before the initramfs runs.
        h.remount_host();
        let (rc, _) = run(
            shell,
            &format!("grubenv_set {env} upgradectl_redirect upgradectl-1.0"),
        );
        assert_eq!(rc, 0, "{shell:?}");
        let vars = h.grubenv();
        assert_eq!(vars["upgradectl_redirect"], "upgradectl-1.0", "{shell:?}");
        assert_eq!(vars["upgradectl_attempted"], "upgradectl-2.0", "{shell:?}");
        assert_eq!(vars.len(), 2, "{vars:?}");
        assert_eq!(fs::metadata(env).unwrap().len(), 1024);
        // No remount, no checkpoint: GRUB's own driver sees the new block already.
        h.assert_grub_sees(&["boot/grub/grubenv"], "the initramfs's redirect");
    }
}

#[test]
fn a_grubenv_it_cannot_rewrite_safely_is_left_alone() {
    let h = HostRoot::on_ext4();
    h.run(&["init", "--version", "1.0"]).expect(0);
    let env = h.grubenv_path();
    let env_s = env.to_str().unwrap();
    let escaped = {
        tool(&["grub-editenv", env_s, "set", "note=a\\b"]);
        fs::read(&env).unwrap()
    };
    let long = "x".repeat(1000);
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        ("missing", vec![], "upgradectl-1.0".into()),
        (
            "short",
            b"# GRUB Environment Block\n".to_vec(),
            "upgradectl-1.0".into(),
        ),
        ("not a grubenv", vec![b'#'; 1024], "upgradectl-1.0".into()),
        ("escaped characters", escaped, "upgradectl-1.0".into()),
        ("does not fit", fs::read(&env).unwrap(), long),
    ];
    for shell in SHELLS {
        for (what, bytes, value) in &cases {
            if *what == "missing" {
                let _ = fs::remove_file(&env);
            } else {
                fs::write(&env, bytes).unwrap();
            }
            let (rc, _) = run(
                shell,
                &format!("grubenv_set {env_s} upgradectl_redirect {value}"),
            );
            assert_ne!(rc, 0, "{what} ({shell:?})");
            if *what == "missing" {
                assert!(!env.exists(), "{what}");
            } else {
                assert_eq!(&fs::read(&env).unwrap(), bytes, "{what} ({shell:?})");
            }
        }
    }
}

/// A trial whose image the initramfs cannot use: it redirects GRUB to the default's own entry,
/// GRUB boots it once, and `confirm` marks the trial bad from the carried-over report.
#[test]
fn a_redirected_trial_is_marked_bad_and_the_redirect_is_booted_once() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    assert_eq!(h.grub_reboot(), "upgradectl-2.0");
    // 2.0's initramfs: the image fails fsck; redirect to the fallback (the default, 1.0).
    let env = h.grubenv_path();
    let (rc, _) = run(
        SHELLS[0],
        &format!(
            "grubenv_set {} upgradectl_redirect \"$(grub_id /images/1.0.img)\"",
            env.display()
        ),
    );
    assert_eq!(rc, 0);
    assert_eq!(h.grub_reboot(), "upgradectl-1.0");
    assert!(!h.grubenv().contains_key("upgradectl_redirect"));
    h.boot_report_as("2.0", "1.0", "fsck", true);
    let s = h.status();
    assert_eq!(s["last_boot"]["redirected"], true);
    assert_eq!(s["last_boot"]["requested"], "/images/2.0.img");
    h.run(&["confirm", "--no-reboot"]).expect(1);
    assert_eq!(h.state()["images"]["2.0"]["state"], "bad");
    assert_eq!(h.state()["default"], "1.0");
    // The next boot is the default's, not a redirect.
    assert_eq!(h.grub_reboot(), "upgradectl-1.0");
    h.assert_consistent("a redirected trial");
}

/// A default image that fails at boot: the initramfs redirects to the previous image's entry;
/// `confirm` demotes the default. A redirect GRUB could not clear is cleared by `confirm`.
#[test]
fn a_redirected_default_is_demoted_and_a_stuck_redirect_is_cleared() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.run(&["confirm", "--no-reboot"]).expect(0);
    assert_eq!(h.grub_reboot(), "upgradectl-2.0");
    let env = h.grubenv_path();
    tool(&[
        "grub-editenv",
        env.to_str().unwrap(),
        "set",
        "upgradectl_redirect=upgradectl-1.0",
    ]);
    // As if GRUB booted the redirect but could not save its environment.
    h.boot("1.0");
    h.boot_report_as("2.0", "1.0", "fsck", true);
    let r = h.run(&["confirm", "--no-reboot"]).expect(1);
    assert_eq!(r.lines[0]["outcome"], "default-demoted", "{}", r.stdout);
    assert_eq!(h.state()["default"], "1.0");
    assert!(!h.grubenv().contains_key("upgradectl_redirect"));
    h.assert_consistent("a redirected default");
}
