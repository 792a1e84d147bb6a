//! Faults on the box: a process killed (SIGKILL) or failing at each named step, a migration
//! that breaks half way or does not fit. After each, the box is consistent (see
//! `HostRoot::assert_consistent`) and the next run does the right thing. The fail points are
//! compiled into the test build only (`sys::faults`).

mod common;

use common::HostRoot;

/// Item: kill -9 while the new image is loop-mounted used to leak a read-write mount, and
/// later runs mounted the image again through a second loop device (corrupting it).
#[test]
fn a_kill_while_the_image_is_mounted_leaks_nothing() {
    let h = HostRoot::with_prepared("2.0");
    let (code, out) = h.run_faulty(&["upgrade", "--no-reboot"], "switch::mounted=return(kill)");
    assert_eq!(code, None, "not killed: {out}");
    h.assert_consistent("a kill with 2.0 mounted");
    h.assert_image_released("2.0");
}

/// Item: a migration that fails half way left half the copies in the image and a later
/// upgrade armed it anyway. Now the image leaves GRUB's menu before it is opened and stays
/// out until it is exported again.
#[test]
fn a_migration_that_fails_half_way_is_never_armed() {
    let h = HostRoot::with_prepared("2.0");
    let (code, out) = h.run_faulty(&["upgrade", "--no-reboot"], "migrate::copied=1*off->return");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("fail point migrate::copied"), "{out}");
    h.assert_consistent("a failed migration");
    h.assert_menu(&["1.0"]);
    assert!(!h.grubenv().contains_key("next_entry"), "{:?}", h.grubenv());
    assert_eq!(h.state()["images"]["2.0"]["half_migrated"], true);
    let again = h.run(&["upgrade", "--no-reboot"]).expect(2);
    let msg = again.error()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("prepare"), "{msg}");
    assert!(!h.grubenv().contains_key("next_entry"));
}

/// Item: ENOSPC inside the image was a plain failure after a partial copy. Now the room is
/// checked before anything is copied, and the answer is "no space" (exit 6).
#[test]
fn a_migration_that_does_not_fit_copies_nothing() {
    let h = HostRoot::with_prepared("2.0");
    let big = h.path("etc/upgradectl/box.toml");
    std::fs::write(&big, vec![b'x'; 24 << 20]).unwrap();
    let r = h.run(&["upgrade", "--no-reboot"]).expect(6);
    assert_eq!(r.error()["kind"], "no-space", "{}", r.stdout);
    h.assert_consistent("a migration that does not fit");
    let m = h.mount_ro("2.0");
    assert_eq!(
        std::fs::read_to_string(m.path("etc/hostname")).unwrap(),
        "factory-2.0\n",
        "something was copied"
    );
    assert!(!h.grubenv().contains_key("next_entry"));
}

/// Item: an interrupted prepare left `images/.V.img.partial` and `downloads/*` behind, which
/// `status` did not show and `cleanup` did not remove (the box stayed out of space forever).
#[test]
fn leftovers_of_interrupted_runs_are_shown_and_cleaned_up() {
    let h = HostRoot::provisioned();
    let partial = h.host("images/.3.0.img.partial");
    std::fs::write(&partial, vec![7u8; 1 << 20]).unwrap();
    let downloads = h.host("var/lib/upgradectl/downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    std::fs::write(downloads.join("2.0-to-3.0.xz.partial"), vec![1u8; 1 << 20]).unwrap();
    std::fs::write(h.host("boot/grub/.tmp-abc123"), b"half a grub.cfg").unwrap();

    let s = h.status();
    let listed: Vec<&str> = s["leftovers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["path"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed
        .iter()
        .any(|p| p.ends_with("images/.3.0.img.partial")));

    let r = h.run(&["cleanup"]).expect(0);
    assert_eq!(r.last()["leftovers"].as_array().unwrap().len(), 3);
    assert!(r.last()["freed_bytes"].as_u64().unwrap() >= 2 << 20);
    assert!(!partial.exists());
    assert!(h.status()["leftovers"].as_array().unwrap().is_empty());
    h.run(&["cleanup"]).expect(3);
    h.assert_consistent("cleanup of leftovers");
}
