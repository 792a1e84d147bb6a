//! No acknowledged report is lost when the server is killed: the real `upgradectl serve`
//! binary on 127.0.0.1 takes signed reports from several boxes at once, is killed with SIGKILL
//! mid-load, and every report it answered 2xx must be in its database afterwards (WAL with
//! `synchronous=FULL`; the answer is sent only after the commit). A power cut cannot be
//! simulated here: this shows that nothing acknowledged waits in the process's memory.

#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/serve.rs"]
mod serve;

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fleet::client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serve::free_port;
use upgradectl::core::report::{Outcome, Report};
use upgradectl::core::sign::{public_key_string, seal};
use upgradectl::fleet::store::{Db, Enrolled};
use upgradectl::sys::clock::now;

const BOXES: u8 = 8;
/// Each box posts at most this many reports (the load stops by itself).
const MAX_PER_BOX: usize = 3000;

fn serve(store: &Path, repo: &Path, port: u16) -> Child {
    serve::command(store, repo, port)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_until_serving(base: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    let c = client();
    while c
        .get(format!("{base}/v1/metadata/timestamp.json"))
        .send()
        .is_err()
    {
        assert!(Instant::now() < end, "the server never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Box `i`'s report, with a boot report to make it weigh something.
fn report(i: u8) -> Report {
    Report {
        boot_report: Some("x".repeat(512)),
        ..fleet::report(i, "2.0", Outcome::Confirmed)
    }
}

#[test]
fn every_acknowledged_report_survives_a_kill_9() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = dir.path().join("store");
    let repo = serve::repository(dir.path());
    let keys: Vec<SigningKey> = (0..BOXES)
        .map(|i| SigningKey::from_bytes(&[i + 1; 32]))
        .collect();
    {
        let db = Db::open_in(&store).unwrap();
        for (i, k) in keys.iter().enumerate() {
            let b = Enrolled {
                box_id: format!("box-{i}"),
                public_key: public_key_string(&k.verifying_key()),
                group: String::new(),
            };
            db.enroll(&b, now()).unwrap();
        }
    }
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = serve(&store, &repo, port);
    wait_until_serving(&base);

    let acked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let unanswered = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let posters: Vec<_> = (0..BOXES)
        .map(|i| {
            let (key, base) = (keys[usize::from(i)].clone(), base.clone());
            let (acked, unanswered, stop) = (acked.clone(), unanswered.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = client();
                for _ in 0..MAX_PER_BOX {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = report(i);
                    let body = serde_json::to_vec(&seal(&r, &key).unwrap()).unwrap();
                    match c.post(format!("{base}/v1/reports")).body(body).send() {
                        Ok(resp) if resp.status().is_success() => {
                            acked.lock().unwrap().push((r.box_id, r.id));
                        }
                        Ok(resp) => panic!("report refused: {}", resp.status()),
                        Err(_) => {
                            *unanswered.lock().unwrap() += 1;
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    // Kill it mid-load: once a good number of reports went through, or after 10 s.
    let end = Instant::now() + Duration::from_secs(10);
    while acked.lock().unwrap().len() < 400 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let status = child.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for p in posters {
        p.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let unanswered = *unanswered.lock().unwrap();

    let db = Db::open_in(&store).unwrap();
    let missing: Vec<_> = (acked.iter())
        .filter(|(b, id)| !db.has_report(b, id).unwrap())
        .collect();
    let stored = db.report_count().unwrap();
    println!(
        "killed by {status:?}: {} reports acknowledged, {} of them found, {stored} stored in \
         all, {unanswered} posts cut off unanswered by the kill",
        acked.len(),
        acked.len() - missing.len(),
    );
    assert!(!status.success(), "it was killed, not stopped");
    assert!(
        acked.len() >= 100,
        "only {} acknowledged before the kill",
        acked.len()
    );
    assert!(
        unanswered > 0,
        "the kill came after the load, not during it"
    );
    assert!(
        missing.is_empty(),
        "{} acknowledged reports lost",
        missing.len()
    );
    assert!(stored >= acked.len() as u64);

    // The server comes back on the same database and takes reports again.
    let mut again = serve(&store, &repo, port);
    wait_until_serving(&base);
    let r = report(0);
    let body = serde_json::to_vec(&seal(&r, &keys[0]).unwrap()).unwrap();
    let resp = client()
        .post(format!("{base}/v1/reports"))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    again.kill().unwrap();
    again.wait().unwrap();
}
