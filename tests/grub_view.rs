//! What GRUB reads of the host partition, judged the way GRUB reads it. GRUB's ext4 driver
//! cannot replay the journal: a file that was written, fsync'd and renamed is in the journal
//! but not yet at its home location, and a power cut before ext4 checkpoints leaves GRUB with
//! an empty or missing grub.cfg, grubenv or image (found on a real box: it never booted again).
//! Every verb must leave GRUB's files at their home locations before it returns.
//!
//! The host partition here is a real ext4 filesystem on a loop device, still mounted while
//! `grub-fstest` (GRUB's own filesystem code) reads the file that backs it.

mod common;

use common::HostRoot;

const GRUB_FILES: [&str; 2] = ["boot/grub/grub.cfg", "boot/grub/grubenv"];

#[test]
fn grub_sees_every_write_of_every_verb_without_journal_replay() {
    let h = HostRoot::on_ext4();
    h.run(&["init", "--version", "1.0"]).expect(0);
    h.assert_grub_sees(&GRUB_FILES, "init");

    h.register_prepared("2.0");
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    // The migration wrote into 2.0.img: GRUB must read the image as Linux does before it is
    // told to boot it.
    h.assert_grub_sees(&GRUB_FILES, "upgrade");
    h.assert_grub_sees(&["images/2.0.img"], "upgrade");

    h.grub_reboot();
    h.run(&["confirm", "--no-reboot"]).expect(0);
    h.assert_grub_sees(&GRUB_FILES, "confirm");

    h.run(&["revert", "--no-reboot"]).expect(0);
    h.assert_grub_sees(&GRUB_FILES, "revert");

    h.grub_reboot();

    h.run(&["upgrade", "--version", "2.0", "--no-reboot"])
        .expect(0);
    h.assert_grub_sees(&GRUB_FILES, "upgrade after revert");
}
