//! Host integration tests of an image's life on a box: init, status, upgrade (configuration
//! really lands in the new image file), the simulated reboot, confirm (healthy, unhealthy,
//! did not boot), revert and cleanup. Real ext4 images on loop devices, real GRUB tools.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::{HostRoot, HOST_UUID, NETPLAN_GID, NETPLAN_UID};
use serde_json::{json, Value};

fn sha256(path: &std::path::Path) -> String {
    common::tool(&["sha256sum", path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn init_provisions_grub_and_state() {
    let h = HostRoot::new();
    let r = h.run(&["init", "--version", "1.0"]).expect(0);
    assert_eq!(r.last()["default"], "1.0");
    h.assert_menu(&["1.0"]);
    assert_eq!(h.grub_default().as_deref(), Some("1.0"));
    let cfg = h.grub_cfg();
    assert!(
        cfg.contains(&format!(
            "search --no-floppy --fs-uuid --set=root {HOST_UUID}"
        )),
        "{cfg}"
    );
    assert!(cfg.contains(&format!(
        "root=UUID={HOST_UUID} rw upgradectl.image=/images/1.0.img panic=7 console=ttyS0,115200"
    )));
    // A real environment block GRUB can load, with nothing armed.
    assert!(h.grubenv().is_empty(), "{:?}", h.grubenv());
    assert_eq!(fs::metadata(h.grubenv_path()).unwrap().len(), 1024);
    let s = h.state();
    assert_eq!(s["default"], "1.0");
    assert_eq!(s["images"]["1.0"]["state"], "good");
    // 2.0 is on disk but was never registered: not in the menu.
    assert!(s["images"].get("2.0").is_none());
}

#[test]
fn init_refuses_a_missing_image() {
    let h = HostRoot::new();
    let r = h.run(&["init", "--version", "7.0"]).expect(2);
    assert!(
        r.error()["message"].as_str().unwrap().contains("7.0.img"),
        "{}",
        r.stdout
    );
    assert!(!h.state_path().exists());
}

#[test]
fn status_reports_the_documented_schema() {
    let h = HostRoot::with_prepared("2.0");
    h.boot_report("1.0", "1.0", "");
    let s = h.status();
    let keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
    for k in [
        "booted",
        "requested",
        "default",
        "previous",
        "prepared",
        "trying",
        "newest_accepted",
        "images",
        "host",
        "last_operation",
        "last_boot",
    ] {
        assert!(keys.contains(&k), "status lacks {k}: {s}");
    }
    assert_eq!(s["booted"], "1.0");
    assert_eq!(s["requested"], "1.0");
    assert_eq!(s["default"], "1.0");
    assert_eq!(s["previous"], Value::Null);
    assert_eq!(s["prepared"], "2.0");
    assert_eq!(s["trying"], Value::Null);
    // Newest first, each with its state and sizes.
    let images = s["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0]["version"], "2.0");
    assert_eq!(images[0]["state"], "prepared");
    assert_eq!(images[0]["in_menu"], true);
    assert_eq!(images[0]["booted"], false);
    assert_eq!(images[1]["version"], "1.0");
    assert_eq!(images[1]["state"], "good");
    assert_eq!(images[1]["booted"], true);
    assert_eq!(images[1]["default"], true);
    assert_eq!(images[1]["size"], 16 << 20);
    let allocated = images[1]["allocated"].as_u64().unwrap();
    assert!(allocated > 0 && allocated <= 16 << 20, "{allocated}");
    assert!(s["host"]["free_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        s["host"]["path"],
        h.root().join("host").display().to_string()
    );
    assert_eq!(s["last_operation"]["verb"], "init");
    assert_eq!(s["last_operation"]["ok"], true);
    assert_eq!(s["last_boot"]["booted"], "/images/1.0.img");
    assert_eq!(s["last_boot"]["fallback"], false);
}

#[test]
fn status_of_an_empty_box() {
    let h = HostRoot::new();
    fs::remove_file(h.path("proc/cmdline")).unwrap();
    let s = h.status();
    assert_eq!(s["booted"], Value::Null);
    assert_eq!(s["default"], Value::Null);
    // Files upgradectl never registered are listed as unknown and kept out of the menu.
    assert_eq!(s["images"][0]["state"], "unknown");
    assert_eq!(s["images"][0]["in_menu"], false);
}

/// The whole commit step: configuration lands in the image file with its metadata, GRUB is
/// armed for exactly one boot, nothing stays mounted.
#[test]
fn upgrade_migrates_into_the_image_and_arms_grub() {
    let h = HostRoot::with_prepared("2.0");
    let r = h.run(&["upgrade", "--no-reboot"]).expect(0);
    let report = r.last();
    assert_eq!(report["version"], "2.0");
    assert_eq!(report["from"], "1.0");
    assert_eq!(report["reboot"], false);
    assert!(report["migration"]["absent"]
        .as_array()
        .unwrap()
        .contains(&json!("/etc/not-there")));

    h.assert_image_released("2.0");
    {
        let m = h.mount_ro("2.0");
        assert_eq!(
            fs::read_to_string(m.path("etc/hostname")).unwrap(),
            "box-17\n"
        );
        assert_eq!(
            xattr::get(m.path("etc/hostname"), "user.origin").unwrap(),
            Some(b"box-17".to_vec())
        );
        let key = fs::metadata(m.path("etc/ssh/ssh_host_ed25519_key")).unwrap();
        assert_eq!(key.mode() & 0o7777, 0o600);
        assert_eq!(
            fs::read_to_string(m.path("etc/ssh/ssh_host_ed25519_key")).unwrap(),
            "PRIVATE KEY OF BOX 17\n"
        );
        assert!(m.path("etc/ssh/ssh_host_ed25519_key.pub").is_file());
        // Not declared: the image's own copy stays.
        assert_eq!(
            fs::read_to_string(m.path("etc/ssh/sshd_config")).unwrap(),
            "# image 2.0\n"
        );
        let netplan = fs::symlink_metadata(m.path("etc/netplan/10-box.yaml")).unwrap();
        assert_eq!(
            (netplan.uid(), netplan.gid(), netplan.mode() & 0o7777),
            (NETPLAN_UID, NETPLAN_GID, 0o640)
        );
        assert_eq!(
            fs::read_link(m.path("etc/netplan/current.yaml")).unwrap(),
            std::path::Path::new("10-box.yaml")
        );
        // A declared directory mirrors the box's.
        assert!(!m.path("etc/netplan/01-default.yaml").exists());
        assert_eq!(
            fs::read_to_string(m.path("etc/upgradectl/box.toml")).unwrap(),
            "serial = \"B17\"\n"
        );
        assert_eq!(
            fs::read_to_string(m.path("etc/os-release")).unwrap(),
            "VERSION_ID=2.0\n"
        );
    }
    // The running image is untouched.
    assert_eq!(
        fs::read_to_string(h.path("etc/hostname")).unwrap(),
        "box-17\n"
    );

    h.assert_menu(&["2.0", "1.0"]);
    assert_eq!(h.grub_default().as_deref(), Some("1.0"));
    assert!(h
        .grub_cfg()
        .contains("upgradectl.image=/images/2.0.img upgradectl.fallback=/images/1.0.img panic=7"));
    let env = h.grubenv();
    assert_eq!(
        env.get("next_entry").map(String::as_str),
        Some("upgradectl-2.0")
    );
    assert!(!env.contains_key("upgradectl_attempted"));

    let s = h.status();
    assert_eq!(s["trying"]["version"], "2.0");
    assert_eq!(s["trying"]["from"], "1.0");
    assert_eq!(s["trying"]["armed"], true);
    assert_eq!(s["trying"]["attempted"], false);
    assert_eq!(s["default"], "1.0");
}

#[test]
fn upgrade_dry_run_changes_nothing() {
    let h = HostRoot::with_prepared("2.0");
    let before = sha256(&h.image("2.0"));
    let state_before = h.state();
    let cfg_before = h.grub_cfg();
    let r = h.run(&["upgrade", "--dry-run"]).expect(0);
    let report = r.last();
    assert_eq!(report["dry_run"], true);
    let actions = report["migration"]["actions"].as_array().unwrap();
    assert!(
        actions.contains(&json!({"action": "copy", "path": "/etc/hostname", "kind": "file"})),
        "{report}"
    );
    assert!(actions.contains(&json!({"action": "remove", "path": "/etc/netplan/01-default.yaml"})));
    assert_eq!(sha256(&h.image("2.0")), before);
    assert_eq!(h.state(), state_before);
    assert_eq!(h.grub_cfg(), cfg_before);
    assert!(h.grubenv().is_empty());
    h.assert_image_released("2.0");
}

#[test]
fn upgrade_without_a_prepared_image_says_so() {
    let h = HostRoot::provisioned();
    let r = h.run(&["upgrade", "--no-reboot"]).expect(3);
    assert_eq!(r.error()["kind"], "nothing-to-do");
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("no image is prepared"));
    // An image file on disk is not prepared until it is registered.
    let r = h
        .run(&["upgrade", "--version", "2.0", "--no-reboot"])
        .expect(2);
    assert!(r.error()["message"]
        .as_str()
        .unwrap()
        .contains("not prepared"));
    assert!(h.grubenv().is_empty());
}

/// The box's full loop: upgrade, GRUB boots the new image once, healthy, default.
#[test]
fn healthy_trial_becomes_the_default() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    assert_eq!(h.grub_reboot(), "upgradectl-2.0");
    let s = h.status();
    assert_eq!(s["booted"], "2.0");
    assert_eq!(s["trying"]["attempted"], true);
    assert_eq!(s["trying"]["armed"], false);

    let r = h.run(&["confirm", "--no-reboot"]).expect(0);
    assert_eq!(r.last()["outcome"], "confirmed");
    assert_eq!(r.last()["checks"][0]["ok"], true);
    let s = h.status();
    assert_eq!(s["default"], "2.0");
    assert_eq!(s["previous"], "1.0");
    assert_eq!(s["trying"], Value::Null);
    assert_eq!(s["prepared"], Value::Null);
    assert_eq!(s["images"][0]["state"], "good");
    h.assert_menu(&["2.0", "1.0"]);
    assert_eq!(h.grub_default().as_deref(), Some("2.0"));
    // Entry numbers: GRUB's fallback takes no ids. 1.0 is the second entry.
    assert!(h.grub_cfg().contains("set fallback=\"1\""));
    assert!(h.grubenv().is_empty(), "{:?}", h.grubenv());

    // The next boot is the new default, and there is nothing left to confirm.
    assert_eq!(h.grub_reboot(), "upgradectl-2.0");
    let r = h.run(&["confirm", "--no-reboot"]).expect(3);
    assert_eq!(r.error()["kind"], "nothing-to-do");
}

#[test]
fn unhealthy_trial_is_bad_and_never_tried_again() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.fail_health();
    let r = h.run(&["confirm", "--no-reboot"]).expect(1);
    let report = &r.lines[r.lines.len() - 2];
    assert_eq!(report["outcome"], "failed", "{}", r.stdout);
    assert_eq!(report["checks"][0]["ok"], false);
    assert!(report["checks"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("sshd is down"));
    assert_eq!(r.error()["kind"], "failed");

    let s = h.status();
    assert_eq!(s["default"], "1.0");
    assert_eq!(s["trying"], Value::Null);
    assert_eq!(s["prepared"], Value::Null);
    let bad = &s["images"][0];
    assert_eq!(
        (&bad["version"], &bad["state"]),
        (&json!("2.0"), &json!("bad"))
    );
    assert!(bad["reason"].as_str().unwrap().contains("sshd is down"));
    assert_eq!(bad["in_menu"], false);
    assert_eq!(s["last_operation"]["ok"], false);
    h.assert_menu(&["1.0"]);
    assert_eq!(h.grub_default().as_deref(), Some("1.0"));

    // Back on 1.0: the bad image is refused, by name and by default.
    assert_eq!(h.grub_reboot(), "upgradectl-1.0");
    let r = h
        .run(&["upgrade", "--version", "2.0", "--no-reboot"])
        .expect(2);
    assert!(r.error()["message"].as_str().unwrap().contains("bad"));
    h.run(&["upgrade", "--no-reboot"]).expect(3);
    assert!(!h.grubenv().contains_key("next_entry"));
}

#[test]
fn trial_that_did_not_boot_is_bad() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    // GRUB consumed the one-shot entry, but the box came back on 1.0 (panic, watchdog).
    h.grub_reboot();
    h.boot("1.0");
    let r = h.run(&["confirm", "--no-reboot"]).expect(1);
    assert_eq!(r.lines[r.lines.len() - 2]["outcome"], "trial-did-not-boot");
    let s = h.status();
    assert_eq!(s["default"], "1.0");
    assert_eq!(s["images"][0]["state"], "bad");
    h.assert_menu(&["1.0"]);
    h.run(&["upgrade", "--version", "2.0", "--no-reboot"])
        .expect(2);
}

#[test]
fn initramfs_fallback_marks_the_trial_bad() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    // GRUB asked for 2.0; the initramfs could not fsck it and booted the fallback.
    h.boot_report("2.0", "1.0", "fsck");
    let s = h.status();
    assert_eq!(s["booted"], "1.0");
    assert_eq!(s["requested"], "2.0");
    assert_eq!(s["last_boot"]["fallback"], true);
    assert_eq!(s["last_boot"]["reason"], "fsck");
    h.run(&["confirm", "--no-reboot"]).expect(1);
    assert_eq!(h.state()["images"]["2.0"]["state"], "bad");
    assert_eq!(h.state()["default"], "1.0");
}

#[test]
fn trial_never_attempted_stays_prepared() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    // Power lost before the reboot: GRUB never saw next_entry; the box boots its default.
    let r = h.run(&["confirm", "--no-reboot"]).expect(0);
    assert_eq!(r.last()["outcome"], "trial-not-attempted");
    let s = h.state();
    assert_eq!(s["images"]["2.0"]["state"], "prepared");
    assert_eq!(s["trying"], Value::Null);
    // It can be tried again.
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    assert_eq!(
        h.grubenv().get("next_entry").map(String::as_str),
        Some("upgradectl-2.0")
    );
}

#[test]
fn revert_goes_back_to_the_previous_image() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.run(&["confirm", "--no-reboot"]).expect(0);

    let r = h.run(&["revert", "--no-reboot"]).expect(0);
    assert_eq!(r.last()["from"], "2.0");
    assert_eq!(r.last()["to"], "1.0");
    assert_eq!(r.last()["reboot"], false);
    let s = h.status();
    assert_eq!(s["default"], "1.0");
    assert_eq!(s["previous"], "2.0");
    h.assert_menu(&["2.0", "1.0"]);
    assert_eq!(h.grub_default().as_deref(), Some("1.0"));
    assert!(!h.grubenv().contains_key("next_entry"));
    assert_eq!(h.grub_reboot(), "upgradectl-1.0");
    assert_eq!(h.status()["booted"], "1.0");
}

#[test]
fn revert_disarms_an_armed_trial() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.run(&["revert", "--no-reboot"]).expect(0);
    assert!(!h.grubenv().contains_key("next_entry"));
    let s = h.state();
    assert_eq!(s["trying"], Value::Null);
    assert_eq!(s["default"], "1.0");
    assert_eq!(h.grub_reboot(), "upgradectl-1.0");
}

#[test]
fn revert_without_a_previous_image_has_nothing_to_do() {
    let h = HostRoot::provisioned();
    let r = h.run(&["revert", "--no-reboot"]).expect(3);
    assert_eq!(r.error()["kind"], "nothing-to-do");
}

/// Images: 0.5 (old), 0.9 (previous), 1.0 (default), 1.5 (booted, unregistered), 2.0
/// (prepared), 3.0 (unknown).
fn crowded_box() -> HostRoot {
    let h = HostRoot::with_prepared("2.0");
    for v in ["0.5", "0.9", "1.5", "3.0"] {
        h.add_image(v);
    }
    let mut s = h.state();
    s["previous"] = "0.9".into();
    s["images"]["0.9"] = json!({"state": "good"});
    s["images"]["0.5"] = json!({"state": "good"});
    h.write_state(&s);
    h.boot("1.5");
    h
}

#[test]
fn cleanup_dry_run_removes_nothing() {
    let h = crowded_box();
    let r = h.run(&["cleanup", "--dry-run"]).expect(0);
    assert_eq!(r.last()["dry_run"], true);
    assert_eq!(r.last()["removed"], json!(["3.0", "0.5"]));
    assert!(r.last()["freed_bytes"].as_u64().unwrap() > 0);
    for v in ["0.5", "0.9", "1.0", "1.5", "2.0", "3.0"] {
        assert!(h.image(v).is_file(), "{v} removed by a dry run");
    }
}

#[test]
fn cleanup_keeps_booted_default_previous_and_prepared() {
    let h = crowded_box();
    let r = h.run(&["cleanup"]).expect(0);
    assert_eq!(r.last()["removed"], json!(["3.0", "0.5"]));
    assert_eq!(r.last()["kept"], json!(["0.9", "1.0", "1.5", "2.0"]));
    for v in ["0.9", "1.0", "1.5", "2.0"] {
        assert!(h.image(v).is_file(), "{v} was removed");
    }
    for v in ["0.5", "3.0"] {
        assert!(!h.image(v).exists(), "{v} was kept");
    }
    assert!(h.state()["images"].get("0.5").is_none());
    // Nothing left to remove: exit 3, and still nothing protected goes.
    let r = h.run(&["cleanup"]).expect(3);
    assert_eq!(r.error()["kind"], "nothing-to-do");
    h.run(&["cleanup", "--dry-run"]).expect(3);
    for v in ["0.9", "1.0", "1.5", "2.0"] {
        assert!(h.image(v).is_file(), "{v} was removed");
    }
    h.assert_menu(&["2.0", "1.0", "0.9"]);
}

#[test]
fn cleanup_remembers_bad_images() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.boot("1.0");
    h.run(&["confirm", "--no-reboot"]).expect(1);
    h.run(&["cleanup"]).expect(0);
    assert!(!h.image("2.0").exists());
    assert_eq!(h.state()["images"]["2.0"]["state"], "bad");
    // Even if the file comes back, it is not tried again.
    h.add_image("2.0");
    h.run(&["upgrade", "--version", "2.0", "--no-reboot"])
        .expect(2);
}

/// Without `--no-reboot` a failed trial sends the box back. Under `--root` the reboot is only
/// reported (`reboot-skipped`), which is what lets this test run on a real machine.
#[test]
fn unhealthy_trial_reboots_into_the_default() {
    let h = HostRoot::with_prepared("2.0");
    let r = h.run(&["upgrade"]).expect(0);
    assert_eq!(r.last()["event"], "reboot-skipped", "{}", r.stdout);
    assert_eq!(r.last()["into"], "2.0");
    h.grub_reboot();
    h.fail_health();
    let r = h.run(&["confirm"]).expect(1);
    let reboot = r
        .lines
        .iter()
        .find(|l| l["event"] == "reboot-skipped")
        .unwrap_or_else(|| panic!("no reboot decided: {}", r.stdout));
    assert_eq!(reboot["into"], "1.0");
    assert_eq!(h.grub_reboot(), "upgradectl-1.0");
}

/// Loop devices are shared by the whole machine: upgradectl processes (or anyone) attaching at
/// the same moment must not fail because another took the device they were offered.
#[test]
fn concurrent_loop_mounts_do_not_collide() {
    let boxes: Vec<HostRoot> = (0..6).map(|_| HostRoot::with_prepared("2.0")).collect();
    for _round in 0..3 {
        let children: Vec<_> = boxes
            .iter()
            .map(|h| {
                h.command(&["upgrade", "--dry-run"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for h in &boxes {
        h.assert_image_released("2.0");
    }
}

/// A new image whose declared directory is a symlink out of its root: nothing is written
/// through it, GRUB is not armed, the failure is recorded, the image is released.
#[test]
fn upgrade_refuses_to_write_through_a_symlink_in_the_new_image() {
    let h = HostRoot::provisioned();
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("etc")).unwrap();
    fs::create_dir_all(src.path().join("host")).unwrap();
    std::os::unix::fs::symlink("/host", src.path().join("etc/netplan")).unwrap();
    common::mkfs(src.path(), &h.image("3.0"), 16);
    h.register_prepared("3.0");
    let r = h.run(&["upgrade", "--no-reboot"]).expect(2);
    let msg = r.error()["message"].as_str().unwrap();
    assert!(msg.contains("symlink"), "{msg}");
    h.assert_image_released("3.0");
    assert!(!h.grubenv().contains_key("next_entry"));
    let s = h.state();
    assert_eq!(s["trying"], Value::Null);
    assert_eq!(s["last_operation"]["verb"], "upgrade");
    assert_eq!(s["last_operation"]["ok"], false);
    // Nothing landed on the host partition through the link.
    assert!(!h.host("10-box.yaml").exists());
    let m = h.mount_ro("3.0");
    assert!(!m.path("etc/hostname").exists(), "migration went ahead");
}

/// A file the box changed and the next image changed too is reported; the box's copy wins.
#[test]
fn upgrade_reports_paths_changed_on_the_box_and_in_the_image() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.run(&["confirm", "--no-reboot"]).expect(0);
    h.add_image("3.0");
    h.register_prepared("3.0");
    let r = h.run(&["upgrade", "--no-reboot"]).expect(0);
    let conflicts = &r.last()["migration"]["conflicts"];
    // hostname: box-17 on the box, factory-3.0 in the image, factory-2.0 as 2.0 shipped it.
    assert!(
        conflicts
            .as_array()
            .unwrap()
            .contains(&json!("/etc/hostname")),
        "{conflicts}"
    );
    // The box changed its keys but 3.0 ships none: not a conflict.
    assert!(!conflicts
        .as_array()
        .unwrap()
        .contains(&json!("/etc/ssh/ssh_host_ed25519_key")));
    let m = h.mount_ro("3.0");
    assert_eq!(
        fs::read_to_string(m.path("etc/hostname")).unwrap(),
        "box-17\n"
    );
}

/// A trial that never reaches its health checks (userspace hung before confirm) is settled by
/// the deadline timer: marked bad, the default stays, and the box reboots back.
#[test]
fn a_trial_past_its_deadline_is_bad_and_the_box_goes_back() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    let r = h.run(&["confirm", "--deadline"]).expect(1);
    assert!(
        r.lines.iter().any(|l| l["event"] == "reboot-skipped"),
        "{}",
        r.stdout
    );
    let s = h.state();
    assert_eq!(s["images"]["2.0"]["state"], "bad");
    assert_eq!(s["default"], "1.0");
    assert_eq!(h.grub_default().as_deref(), Some("1.0"));
    h.assert_menu(&["1.0"]);
    // Once settled, the deadline finds nothing to do.
    h.grub_reboot();
    h.run(&["confirm", "--deadline"]).expect(3);
}

/// Hosts that run grub-mkconfig: the real 00_header (which consumes next_entry) followed by
/// grub.d/09_upgradectl's fragment is valid GRUB script that records the trial's attempt,
/// keeps its fallback chain and sets upgradectl's default; a failing `upgradectl` fails the
/// hook instead of producing a menu without images.
#[test]
fn grub_mkconfig_mode_keeps_the_trial_and_fails_loudly() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    let header = std::process::Command::new("/etc/grub.d/00_header")
        .env("pkgdatadir", "/usr/share/grub")
        .env("GRUB_DEFAULT", "0")
        .env("GRUB_TIMEOUT", "1")
        .output()
        .unwrap();
    assert!(header.status.success());
    let out = h.command(&["grub-entries"]).output().unwrap();
    assert!(out.status.success());
    let entries: String = serde_json::from_slice(&out.stdout).unwrap();
    let cfg = format!("{}{entries}", String::from_utf8_lossy(&header.stdout));
    let file = h.path("mkconfig.cfg");
    fs::write(&file, &cfg).unwrap();
    common::tool(&["grub-script-check", file.to_str().unwrap()]);
    let consumed = cfg.find("set boot_once=true").unwrap();
    let recorded = cfg.find("set upgradectl_attempted=\"${default}\"").unwrap();
    assert!(consumed < recorded, "{cfg}");
    assert!(cfg.contains("set fallback=\"1\""), "{cfg}");
    assert!(cfg.contains("  set default=\"upgradectl-1.0\""), "{cfg}");
    assert!(cfg.contains("--id upgradectl-2.0"), "{cfg}");

    let bin = tempfile::tempdir().unwrap();
    let stub = bin.path().join("upgradectl");
    fs::write(&stub, "#!/bin/sh\nexit 1\n").unwrap();
    common::tool(&["chmod", "755", stub.to_str().unwrap()]);
    let hook =
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/grub.d/09_upgradectl"))
            .env("PATH", format!("{}:/usr/bin:/bin", bin.path().display()))
            .output()
            .unwrap();
    assert!(
        !hook.status.success(),
        "a failing upgradectl must fail grub-mkconfig"
    );
}

/// Appends `text` to the file at `path`, keeping its mode and owner.
fn append(path: &std::path::Path, text: &str) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Replaces `from` by `to` in the file at `path`, keeping its mode and owner.
fn replace_in(path: &std::path::Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    fs::write(path, text.replace(from, to)).unwrap();
}

/// The test configuration with `extra` migration paths.
fn config_with(extra: &[&str]) -> String {
    let extra: String = extra.iter().map(|p| format!(", \"{p}\"")).collect();
    common::CONFIG.replace(
        "\"/etc/not-there\"]",
        &format!("\"/etc/not-there\"{extra}]"),
    )
}

/// Issue "Failure paths", item 4: a new image that adds a system user keeps it, and the box
/// keeps its password and its local user: the account databases are merged per entry.
#[test]
fn upgrade_merges_the_images_new_system_user_with_the_boxs_accounts() {
    let h = HostRoot::with_prepared("2.0");
    h.set_config(&config_with(&[
        "/etc/passwd",
        "/etc/group",
        "/etc/shadow",
        "/etc/gshadow",
    ]));
    h.add_image_with("2.0", |root| {
        let chrony = "_chrony:x:110:110:Chrony daemon:/var/lib/chrony:/usr/sbin/nologin\n";
        append(&root.join("etc/passwd"), chrony);
        append(&root.join("etc/group"), "_chrony:x:110:\n");
        append(&root.join("etc/shadow"), "_chrony:!:19500::::::\n");
        append(&root.join("etc/gshadow"), "_chrony:!::\n");
    });
    let hash = "$y$j9T$boxsalt$boxhash";
    replace_in(&h.path("etc/shadow"), "root:*:", &format!("root:{hash}:"));
    append(
        &h.path("etc/passwd"),
        "alice:x:1000:1000:Alice:/home/alice:/bin/bash\n",
    );
    append(&h.path("etc/group"), "alice:x:1000:\n");
    replace_in(&h.path("etc/group"), "sudo:x:27:", "sudo:x:27:alice");
    append(&h.path("etc/shadow"), "alice:$y$alice:19600:0:99999:7:::\n");
    append(&h.path("etc/gshadow"), "alice:!::\n");

    let r = h.run(&["upgrade", "--no-reboot"]).expect(0);
    assert_eq!(
        r.last()["migration"]["conflicts"],
        json!([]),
        "{}",
        r.stdout
    );
    h.assert_image_released("2.0");
    let m = h.mount_ro("2.0");
    let read = |rel: &str| fs::read_to_string(m.path(rel)).unwrap();
    assert_eq!(
        read("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\n\
         daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
         _chrony:x:110:110:Chrony daemon:/var/lib/chrony:/usr/sbin/nologin\n\
         alice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
    );
    assert_eq!(
        read("etc/group"),
        "root:x:0:\nshadow:x:42:\nsudo:x:27:alice\n_chrony:x:110:\nalice:x:1000:\n"
    );
    let shadow = read("etc/shadow");
    assert!(
        shadow.starts_with(&format!("root:{hash}:19000:")),
        "{shadow}"
    );
    assert!(shadow.contains("\n_chrony:!:19500::::::\n"), "{shadow}");
    assert!(
        shadow.ends_with("\nalice:$y$alice:19600:0:99999:7:::\n"),
        "{shadow}"
    );
    assert_eq!(
        read("etc/gshadow"),
        "root:*::\nshadow:*::\nsudo:*::\n_chrony:!::\nalice:!::\n"
    );
    for (rel, mode, gid) in [
        ("etc/shadow", 0o640, common::SHADOW_GID),
        ("etc/gshadow", 0o640, common::SHADOW_GID),
        ("etc/passwd", 0o644, 0),
    ] {
        let md = fs::metadata(m.path(rel)).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (mode, 0, gid),
            "{rel}"
        );
    }
}

/// The second upgrade merges against what the running image shipped: a file the box never
/// changed takes the new image's copy, an account the new image removed or changed and the box
/// never touched follows the new image, the box's own changes stay.
#[test]
fn upgrade_merges_three_way_against_what_the_running_image_shipped() {
    let h = HostRoot::with_prepared("2.0");
    let accounts = ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"];
    h.set_config(&config_with(&[&accounts[..], &["/etc/issue"]].concat()));
    h.add_image_with("2.0", |root| {
        fs::write(root.join("etc/issue"), "Debian 12\n").unwrap()
    });
    fs::write(h.path("etc/issue"), "Debian 12\n").unwrap();
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.run(&["confirm", "--no-reboot"]).expect(0);
    let shipped = h.host("var/lib/upgradectl/baseline/2.0.accounts.json");
    assert_eq!(fs::metadata(&shipped).unwrap().mode() & 0o777, 0o600);

    h.add_image_with("3.0", |root| {
        fs::write(root.join("etc/issue"), "Debian 13\n").unwrap();
        replace_in(
            &root.join("etc/passwd"),
            "/root:/bin/bash",
            "/root:/bin/zsh",
        );
        replace_in(
            &root.join("etc/passwd"),
            "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
            "",
        );
    });
    h.register_prepared("3.0");
    append(
        &h.path("etc/passwd"),
        "alice:x:1000:1000:Alice:/home/alice:/bin/bash\n",
    );
    let r = h.run(&["upgrade", "--no-reboot"]).expect(0);
    let actions = &r.last()["migration"]["actions"];
    assert!(
        actions
            .as_array()
            .unwrap()
            .contains(&json!({"action": "keep", "path": "/etc/issue"})),
        "{actions}"
    );
    let m = h.mount_ro("3.0");
    assert_eq!(
        fs::read_to_string(m.path("etc/issue")).unwrap(),
        "Debian 13\n"
    );
    assert_eq!(
        fs::read_to_string(m.path("etc/passwd")).unwrap(),
        "root:x:0:0:root:/root:/bin/zsh\nalice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
    );
}

/// The default image fails its fsck at boot: the initramfs falls back to the previous image.
/// Nothing demoted the default before, so every boot fell back forever (confirm said "nothing
/// to do"). Now the first confirm after such a boot marks it bad and makes the image that
/// booted the default: the box converges on a good image by itself.
#[test]
fn a_default_the_initramfs_falls_back_from_is_demoted() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.run(&["confirm", "--no-reboot"]).expect(0);
    assert_eq!(h.state()["default"], "2.0");
    // GRUB boots the default, 2.0; its image fails fsck; the initramfs mounts 1.0.
    h.grub_reboot();
    h.boot_report("2.0", "1.0", "fsck");
    let r = h.run(&["confirm", "--no-reboot"]).expect(1);
    // The report, then the error line (as for a failed trial).
    assert_eq!(r.lines[0]["outcome"], "default-demoted", "{}", r.stdout);
    let s = h.state();
    assert_eq!(s["images"]["2.0"]["state"], "bad");
    assert_eq!(s["default"], "1.0");
    assert_eq!(h.grub_default().as_deref(), Some("1.0"));
    h.assert_menu(&["1.0"]);
    h.assert_consistent("demoting a default");
}

/// A default that never comes up far enough to confirm (a kernel panic, a hang the watchdog
/// ends): GRUB counts its boots, confirm clears the count; after three boots without a confirm
/// GRUB boots the previous image, where confirm demotes the default.
#[test]
fn a_default_that_never_confirms_is_given_up_after_three_boots() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.run(&["confirm", "--no-reboot"]).expect(0);
    // Healthy boots: each confirm starts the count again.
    for _ in 0..4 {
        assert_eq!(h.grub_reboot(), "upgradectl-2.0");
        assert_eq!(h.grubenv()["upgradectl_boots"], "1");
        h.run(&["confirm", "--no-reboot"]).expect(3);
        assert!(!h.grubenv().contains_key("upgradectl_boots"));
    }
    // 2.0 now dies before userspace, three times.
    for _ in 0..3 {
        assert_eq!(h.grub_reboot(), "upgradectl-2.0");
    }
    assert_eq!(h.grub_reboot(), "upgradectl-1.0");
    let r = h.run(&["confirm", "--no-reboot"]).expect(1);
    assert_eq!(r.lines[0]["outcome"], "default-demoted", "{}", r.stdout);
    let s = h.state();
    assert_eq!(s["default"], "1.0");
    assert_eq!(s["images"]["2.0"]["state"], "bad");
    assert!(!h.grubenv().contains_key("upgradectl_boots"));
    assert_eq!(h.grub_reboot(), "upgradectl-1.0");
    h.assert_consistent("giving up on a default");
}

/// A default whose entry fails inside GRUB (its image unreadable: GRUB finds no kernel) falls
/// back to the previous image at every boot; confirm there keeps the count going, and after the
/// last counted boot (3) confirm demotes the default.
#[test]
fn a_default_grub_cannot_boot_is_given_up_though_its_fallback_confirms() {
    let h = HostRoot::with_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.run(&["confirm", "--no-reboot"]).expect(0);
    for n in 1..=2 {
        // GRUB counts the default's boot, the entry fails, GRUB's fallback boots 1.0.
        assert_eq!(h.grub_reboot(), "upgradectl-2.0");
        h.boot("1.0");
        h.run(&["confirm", "--no-reboot"]).expect(3);
        assert_eq!(h.grubenv()["upgradectl_boots"], n.to_string());
    }
    // The third counted boot fails the same way: confirm on the fallback gives up on 2.0.
    assert_eq!(h.grub_reboot(), "upgradectl-2.0");
    h.boot("1.0");
    let r = h.run(&["confirm", "--no-reboot"]).expect(1);
    assert_eq!(r.lines[0]["outcome"], "default-demoted", "{}", r.stdout);
    assert_eq!(h.state()["default"], "1.0");
    assert!(!h.grubenv().contains_key("upgradectl_boots"));
    h.assert_consistent("giving up on a default GRUB cannot boot");
}
