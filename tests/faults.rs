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
