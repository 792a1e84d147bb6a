//! When the box switches, through the binary on a box in a temp directory: `upgrade` takes a
//! reboot slot from a real FleetLock server (`upgradectl serve` on 127.0.0.1) before it arms
//! anything, exits 7 with nothing armed when the group's slots are all held, and `confirm`
//! gives the slot back (and tries again at the next run when the server cannot be reached);
//! outside the maintenance window `upgrade` waits and `upgrade --now` does not.

mod common;
#[path = "common/serve.rs"]
mod serve;

use common::{HostRoot, CONFIG};
use serde_json::{json, Value};
use serve::{free_port, repository, Serve};

fn config(reboot: &str) -> String {
    format!("box_id = \"serial-1\"\ngroup = \"zone-a\"\n{CONFIG}\n[reboot]\n{reboot}\n")
}

/// pre-reboot (`take`) or steady-state for `node` in zone-a: the HTTP status.
fn lock(base: &str, take: bool, node: &str) -> u16 {
    let path = if take { "pre-reboot" } else { "steady-state" };
    let body = json!({"client_params": {"node_uuid": node, "group": "zone-a"}});
    reqwest::blocking::Client::new()
        .post(format!("{base}/v1/{path}"))
        .header("fleet-lock-protocol", "true")
        .body(body.to_string())
        .send()
        .unwrap()
        .status()
        .as_u16()
}

/// What `upgrade` must not touch when it refuses.
fn armed_state(h: &HostRoot) -> (Value, std::collections::BTreeMap<String, String>, String) {
    (h.state(), h.grubenv(), h.grub_cfg())
}

#[test]
fn upgrade_waits_for_a_reboot_slot_and_confirm_gives_it_back() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (store, key, port) = (
        dir.path().join("store"),
        repository(dir.path()),
        free_port(),
    );
    let server = Serve::start(&store, &key, port, &["--reboot-slots", "1"]);
    let base = server.base.clone();
    let h = HostRoot::with_prepared("2.0");
    h.set_config(&config(&format!("fleetlock_url = \"{base}\"")));

    // Another box of zone-a reboots: the group's only slot is taken.
    assert_eq!(lock(&base, true, "serial-2"), 200);
    let before = armed_state(&h);
    let run = h.run(&["upgrade", "--no-reboot", "--now"]).expect(7);
    assert_eq!(run.error()["kind"], "not-now", "{}", run.stdout);
    assert!(
        run.stdout.contains("serial-2"),
        "names who holds it: {}",
        run.stdout
    );
    assert_eq!(armed_state(&h), before, "nothing armed");
    assert!(!h.host("var/lib/upgradectl/reboot-lock.json").exists());
    assert!(h.status()["reboot_lock"].is_null());

    // The slot is free again: the box takes it, arms the trial and reboots into it.
    assert_eq!(lock(&base, false, "serial-2"), 200);
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    assert_eq!(h.state()["trying"]["version"], "2.0");
    assert_eq!(
        lock(&base, true, "serial-3"),
        409,
        "serial-1 holds the slot"
    );
    assert_eq!(h.status()["reboot_lock"]["node_uuid"], "serial-1");

    // Confirm with the lock server down: confirmed all the same, the slot kept for later.
    drop(server);
    h.grub_reboot();
    h.run(&["confirm", "--no-reboot"]).expect(0);
    assert_eq!(h.state()["default"], "2.0");
    assert_eq!(
        h.status()["reboot_lock"]["group"],
        "zone-a",
        "still to give back"
    );

    // The next confirm (the next boot) reaches it and gives the slot back.
    let server = Serve::start(&store, &key, port, &["--reboot-slots", "1"]);
    assert_eq!(
        lock(&server.base, true, "serial-3"),
        409,
        "kept across the restart"
    );
    h.run(&["confirm", "--no-reboot"]).expect(3);
    assert!(h.status()["reboot_lock"].is_null());
    assert!(!h.host("var/lib/upgradectl/reboot-lock.json").exists());
    assert_eq!(lock(&server.base, true, "serial-3"), 200, "given back");
}

/// A window of one hour that starts `from_now` hours from now (UTC, as the box is run with
/// TZ=UTC).
fn window(from_now: u64) -> String {
    let hour = upgradectl::sys::clock::now() / 3600 % 24;
    let start = (hour + 24 + from_now) % 24;
    format!("window = [\"{start:02}:00-{:02}:00\"]", (start + 2) % 24)
}

#[test]
fn outside_the_window_upgrade_waits_and_now_does_not() {
    let h = HostRoot::with_prepared("2.0");
    let utc = [("TZ", "UTC")];
    h.set_config(&config(&format!(
        "{}\nhonour_inhibitors = false",
        window(3)
    )));
    let before = armed_state(&h);
    let run = h.run_env(&["upgrade", "--no-reboot"], &utc).expect(7);
    let msg = run.error()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("outside the maintenance window"), "{msg}");
    assert_eq!(armed_state(&h), before, "nothing armed");
    let status = h.run_env(&["status"], &utc).expect(0);
    let waiting = status.last()["waiting"].as_array().unwrap().clone();
    assert!(
        waiting[0]
            .as_str()
            .unwrap()
            .contains("outside the maintenance window"),
        "{waiting:?}"
    );

    // Busy: a check that says so keeps it waiting even inside the window.
    let busy = "busy_checks = [[\"sh\", \"-c\", \"echo backup running >&2; exit 1\"]]";
    h.set_config(&config(&format!("{}\n{busy}", window(23))));
    let run = h.run_env(&["upgrade", "--no-reboot"], &utc).expect(7);
    assert!(run.stdout.contains("backup running"), "{}", run.stdout);
    assert!(
        !run.stdout.contains("outside"),
        "inside the window: {}",
        run.stdout
    );
    assert_eq!(armed_state(&h), before, "nothing armed");

    h.run_env(&["upgrade", "--no-reboot", "--now"], &utc)
        .expect(0);
    assert_eq!(h.state()["trying"]["version"], "2.0");
}
