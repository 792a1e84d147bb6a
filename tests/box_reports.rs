//! The box's side of the fleet through the binary: `identity` creates the box's key once and
//! prints what the factory enrolls; each step's report is spooled on the host partition and
//! listed by `status --json` until a server acknowledges it (none is configured here, so
//! they stay), and the verbs' results do not depend on it.

mod common;

use common::{HostRoot, CONFIG};

fn config(health_ok: bool) -> String {
    let c = format!("box_id = \"serial-1\"\ngroup = \"zone-a\"\n{CONFIG}");
    if health_ok {
        c
    } else {
        c.replace(
            "command = [\"true\"]",
            "command = [\"sh\", \"-c\", \"exit 3\"]",
        )
    }
}

#[test]
fn identity_is_created_once_and_printed_for_enrollment() {
    let h = HostRoot::provisioned();
    h.set_config(&config(true));
    let first = h.run(&["identity"]).expect(0);
    let id = first.last().clone();
    assert_eq!(id["box_id"], "serial-1");
    assert_eq!(id["group"], "zone-a");
    assert!(id["public_key"].as_str().unwrap().starts_with("ed25519:"));
    let again = h.run(&["identity"]).expect(0);
    assert_eq!(again.last()["public_key"], id["public_key"], "kept");
    let key = h.host("var/lib/upgradectl/identity.key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn each_step_is_spooled_and_listed_until_acknowledged() {
    let h = HostRoot::with_prepared("2.0");
    h.set_config(&config(true));
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h.set_config(&config(false));
    h.run(&["confirm", "--no-reboot"]).expect(1);
    let s = h.status();
    let pending = s["pending_reports"].as_array().unwrap();
    let outcomes: Vec<_> = pending.iter().map(|r| r["outcome"].clone()).collect();
    assert_eq!(outcomes, ["upgraded", "failed"], "{pending:?}");
    let failed = &pending[1];
    assert_eq!(
        (&failed["from"], &failed["to"]),
        (&"1.0".into(), &"2.0".into())
    );
    assert_eq!(failed["failed_check"], "always");
    assert_eq!(failed["box_id"], "serial-1");
    assert_eq!(failed["group"], "zone-a");
    assert_eq!(failed["sent"], 0, "never sent: no server");
    assert_ne!(pending[0]["id"], pending[1]["id"]);
}

#[test]
fn the_box_id_from_machine_id_survives_an_image_switch() {
    // No box_id configured: the first use takes /etc/machine-id and keeps it on the host
    // partition, so the next image (its own machine-id) is still the same box: the same
    // identity to enroll, the same rollout bucket.
    let h = HostRoot::provisioned();
    h.set_config(&config(true).replace("box_id = \"serial-1\"\n", ""));
    let machine_id = h.root().join("etc/machine-id");
    std::fs::write(&machine_id, "0123456789abcdef0123456789abcdef\n").unwrap();
    let first = h.run(&["identity"]).expect(0);
    assert_eq!(first.last()["box_id"], "0123456789abcdef0123456789abcdef");
    std::fs::write(&machine_id, "fedcba9876543210fedcba9876543210\n").unwrap();
    let after = h.run(&["identity"]).expect(0);
    assert_eq!(after.last()["box_id"], first.last()["box_id"]);
}
