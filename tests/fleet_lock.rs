//! FleetLock over real HTTP against the real `upgradectl serve`: a group's reboot slots are a
//! semaphore under concurrent pre-reboots from many nodes, taking and giving back are
//! idempotent, errors are FleetLock's JSON, only enrolled boxes are admitted once any is
//! enrolled, and the slots survive a restart of the server.

#[path = "common/serve.rs"]
mod serve;

use std::sync::{Arc, Barrier};

use serde_json::{json, Value};
use serve::{free_port, repository, Serve};
use upgradectl::fleet::store::{Db, Enrolled};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap()
}

/// POSTs a FleetLock request for `node` in `group` to `path`: status and JSON body.
fn lock(base: &str, path: &str, node: &str, group: &str) -> (u16, Value) {
    let body = json!({"client_params": {"node_uuid": node, "group": group}});
    let resp = client()
        .post(format!("{base}{path}"))
        .header("fleet-lock-protocol", "true")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn take(base: &str, node: &str, group: &str) -> u16 {
    lock(base, "/v1/pre-reboot", node, group).0
}

fn give(base: &str, node: &str, group: &str) -> u16 {
    lock(base, "/v1/steady-state", node, group).0
}

#[test]
fn slots_are_a_semaphore_under_concurrency_idempotent_and_kept_across_a_restart() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = dir.path().join("store");
    let key = repository(dir.path());
    let port = free_port();
    let opts = ["--reboot-slots", "3", "--reboot-group-slots", "solo=1"];
    let s = Serve::start(&store, &key, port, &opts);
    let base = s.base.clone();

    // 40 nodes at once for 3 slots: exactly 3 get one.
    let nodes = 40;
    let barrier = Arc::new(Barrier::new(nodes));
    let askers: Vec<_> = (0..nodes)
        .map(|i| {
            let (base, barrier) = (base.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (i, take(&base, &format!("node-{i}"), "default"))
            })
        })
        .collect();
    let answers: Vec<(usize, u16)> = askers.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<usize> = (answers.iter())
        .filter(|(_, st)| *st == 200)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 3, "{answers:?}");
    assert!(
        answers.iter().all(|(_, st)| [200, 409].contains(st)),
        "{answers:?}"
    );
    let (w, l) = (format!("node-{}", winners[0]), "node-loser");
    let (status, body) = lock(&base, "/v1/pre-reboot", l, "default");
    assert_eq!(status, 409);
    assert_eq!(body["kind"], "failed_lock", "{body}");
    assert!(
        body["value"].as_str().unwrap().contains(&w),
        "names the holders: {body}"
    );
    assert_eq!(
        take(&base, &w, "default"),
        200,
        "a holder asking again keeps its slot"
    );
    assert_eq!(
        take(&base, &w, "solo"),
        409,
        "one slot per node, in one group"
    );
    // Groups count apart; "solo" has 1 slot.
    assert_eq!(take(&base, "s1", "solo"), 200);
    assert_eq!(take(&base, "s2", "solo"), 409);

    // Malformed requests: FleetLock's error body.
    let resp = client()
        .post(format!("{base}/v1/pre-reboot"))
        .body(json!({"client_params": {"node_uuid": "x", "group": "default"}}).to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400, "no fleet-lock-protocol header");
    let body: Value = serde_json::from_str(&resp.text().unwrap()).unwrap();
    assert_eq!(body["kind"], "bad_request");
    assert_eq!(lock(&base, "/v1/pre-reboot", "a b", "default").0, 400);
    assert_eq!(
        client()
            .get(format!("{base}/v1/pre-reboot"))
            .send()
            .unwrap()
            .status(),
        405
    );

    // A restart keeps who holds what.
    drop(s);
    let s = Serve::start(&store, &key, port, &opts);
    let base = s.base.clone();
    assert_eq!(
        take(&base, l, "default"),
        409,
        "still full after the restart"
    );
    for i in &winners {
        assert_eq!(take(&base, &format!("node-{i}"), "default"), 200);
    }
    // Giving back is idempotent and frees the slot for the next node.
    assert_eq!(give(&base, &w, "default"), 200);
    assert_eq!(give(&base, &w, "default"), 200);
    assert_eq!(take(&base, l, "default"), 200);
    assert_eq!(take(&base, "node-late", "default"), 409);
    drop(s);
    let db = Db::open_in(&store).unwrap();
    let held: Vec<String> = (db.reboot_slots().unwrap().into_iter())
        .filter(|h| h.group == "default")
        .map(|h| h.node)
        .collect();
    assert_eq!(held.len(), 3, "{held:?}");
    assert!(
        held.contains(&l.to_owned()) && !held.contains(&w),
        "{held:?}"
    );
}

#[test]
fn once_boxes_are_enrolled_only_they_may_take_slots() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = dir.path().join("store");
    let key = repository(dir.path());
    {
        let db = Db::open_in(&store).unwrap();
        let b = Enrolled {
            box_id: "serial-1".into(),
            public_key: "ed25519:AAAA".into(),
            group: "zone-a".into(),
        };
        db.enroll(&b, 1).unwrap();
    }
    let s = Serve::start(&store, &key, free_port(), &[]);
    let (status, body) = lock(&s.base, "/v1/pre-reboot", "stranger", "zone-a");
    assert_eq!(
        (status, &body["kind"]),
        (403, &json!("not_enrolled")),
        "{body}"
    );
    assert_eq!(give(&s.base, "stranger", "zone-a"), 403);
    assert_eq!(take(&s.base, "serial-1", "zone-a"), 200);
    assert_eq!(give(&s.base, "serial-1", "zone-a"), 200);
}
