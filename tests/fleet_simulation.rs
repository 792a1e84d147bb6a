//! A fleet against the real server on 127.0.0.1: 2000 simulated boxes, each with its own
//! enrolled key, check in (the TUF repository as the box verifies it, the box's own plan and
//! bucket logic), take the release if they are offered it, and report confirmed or fallback,
//! signed. The load is bounded (rounds and wall-clock time) and stops by itself.
//!
//! A round is one check-in period: every waiting box checks in once. The check-ins are spread
//! over it, and the server brings the repository in step `SYNCS_PER_ROUND` times in it, as
//! `serve` does every `--repo-sync-seconds`. Real boxes check in every 6 h with up to 1 h of
//! random delay (upgradectl-prepare.timer) against a 60 s sync: about 360 syncs per period;
//! this simulation takes 20, the more pessimistic side (more boxes act on a stale rollout).
//!
//! A bad release (20% of boxes fail it) must pause by itself before more than 1% of the fleet
//! took it, and stay paused; a good one (0.5% background failures) must reach 100%.
//! `cargo test --test fleet_simulation -- --nocapture` prints the figures.

#[path = "common/server.rs"]
mod server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use server::{limits, start_with, Fixture, Setup};
use sha2::{Digest, Sha256};
use upgradectl::appliance::prepare::fetch;
use upgradectl::core::manifest::Manifest;
use upgradectl::core::plan::{bucket, plan, PlanInput};
use upgradectl::core::report::{new_id, Outcome, Report};
use upgradectl::core::sign::{public_key_string, seal};
use upgradectl::core::version::Version;
use upgradectl::fleet::control;
use upgradectl::fleet::rollout::Policy;
use upgradectl::fleet::store::{Db, Enrolled};
use upgradectl::sys::clock::now;

const FLEET: usize = 2000;
const THREADS: usize = 4;
const MAX_ROUNDS: usize = 200;
/// Repository syncs in one check-in period (see the module's comment).
const SYNCS_PER_ROUND: usize = 20;
const MAX_TIME: Duration = Duration::from_secs(120);

/// Where a simulated box is with release 2.0.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Waiting,
    Confirmed,
    Failed,
}

struct Sim {
    f: Fixture,
    keys: Vec<SigningKey>,
    ids: Vec<String>,
    state: Mutex<Vec<Fate>>,
    /// Boxes that took 2.0 (were offered it and installed it).
    took: AtomicUsize,
    /// Per mille of boxes 2.0 breaks.
    fails_permille: u64,
}

/// Whether release 2.0 breaks box `id` (a fixed share of the fleet, by hash).
fn breaks(id: &str, permille: u64) -> bool {
    let h = Sha256::digest(format!("breaks:{id}").as_bytes());
    u64::from_be_bytes(h[..8].try_into().unwrap()) % 1000 < permille
}

fn start(fails_permille: u64, policy: Policy) -> Sim {
    let f = start_with(Setup {
        fleet: true,
        repo: true,
        full_size: 1024,
        diff_size: 1024,
        ..Setup::default()
    });
    let mut db = Db::open_in(&f.root.join("store")).unwrap();
    let keys: Vec<SigningKey> = (0..FLEET)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            SigningKey::from_bytes(&seed)
        })
        .collect();
    let ids: Vec<String> = (0..FLEET).map(|i| format!("sim-{i:05}")).collect();
    let boxes: Vec<Enrolled> = (keys.iter().zip(&ids))
        .map(|(k, id)| Enrolled {
            box_id: id.clone(),
            public_key: public_key_string(&k.verifying_key()),
            group: String::new(),
        })
        .collect();
    db.enroll_all(&boxes, now()).unwrap();
    control::start(&db, "2.0", policy, now()).unwrap();
    Sim {
        f,
        keys,
        ids,
        state: Mutex::new(vec![Fate::Waiting; FLEET]),
        took: AtomicUsize::new(0),
        fails_permille,
    }
}

fn policy() -> Policy {
    Policy {
        waves: vec![1, 5, 25, 100],
        soak_secs: 2,
        min_successes: 5,
        max_failures: 3,
        max_failure_rate: 0.05,
        min_sample: 20,
        ..Policy::default()
    }
}

impl Sim {
    /// One check-in of box `i` that read `m` from the repository: plan as the box does, and
    /// if 2.0 is the plan, take it and report how it went.
    fn check_in(&self, client: &reqwest::blocking::Client, i: usize, m: &Manifest) {
        let one: Version = "1.0".parse().unwrap();
        let input = PlanInput {
            manifest: m,
            channel: "stable",
            now: now(),
            bucket: bucket(&self.ids[i]),
            newest_accepted: Some(&one),
            refetch: None,
            pinned: None,
            local: std::slice::from_ref(&one),
        };
        let Ok(p) = plan(&input) else {
            return; // nothing for this box now
        };
        assert_eq!(p.release.version.as_str(), "2.0");
        self.took.fetch_add(1, Ordering::SeqCst);
        let failed = breaks(&self.ids[i], self.fails_permille);
        let outcome = if failed {
            Outcome::Fallback
        } else {
            Outcome::Confirmed
        };
        let r = Report {
            id: new_id(),
            box_id: self.ids[i].clone(),
            group: String::new(),
            sent: now(),
            from: Some(one.clone()),
            to: Some(p.release.version.clone()),
            outcome,
            failed_check: None,
            boot_report: None,
            started: now(),
            seconds: 0.0,
        };
        let body = serde_json::to_vec(&seal(&r, &self.keys[i]).unwrap()).unwrap();
        let resp = client
            .post(self.f.url("/v1/reports"))
            .body(body)
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        // A box the release broke marked it bad: it never takes it again.
        self.state.lock().unwrap()[i] = if failed {
            Fate::Failed
        } else {
            Fate::Confirmed
        };
    }

    /// Every waiting box checks in once, in `SYNCS_PER_ROUND` slices (box index order, which
    /// neither the bucket nor the failure hash follows), each slice spread over `THREADS`
    /// threads.
    fn round(&self) {
        let waiting: Vec<usize> = (self.state.lock().unwrap().iter().enumerate())
            .filter(|(_, s)| **s == Fate::Waiting)
            .map(|(i, _)| i)
            .collect();
        for slice in waiting.chunks(waiting.len().div_ceil(SYNCS_PER_ROUND).max(1)) {
            // The boxes of a slice read the same repository (the server syncs it, then the
            // boxes verify it; verifying it once stands for all of them).
            let m = self.f.offered("stable", None);
            let m = &m;
            std::thread::scope(|scope| {
                for t in 0..THREADS {
                    let mine: Vec<usize> = slice.iter().copied().skip(t).step_by(THREADS).collect();
                    scope.spawn(move || {
                        let client = fetch::client(&limits()).unwrap();
                        for i in mine {
                            self.check_in(&client, i, m);
                        }
                    });
                }
            });
        }
    }

    fn count(&self, s: Fate) -> usize {
        self.state
            .lock()
            .unwrap()
            .iter()
            .filter(|x| **x == s)
            .count()
    }

    /// Whether the server paused 2.0, at its next repository sync.
    fn paused(&self) -> Option<String> {
        self.f.sync();
        let db = Db::open_in(&self.f.root.join("store")).unwrap();
        db.rollout("2.0").unwrap().unwrap().progress.paused
    }
}

#[test]
fn a_bad_release_pauses_itself_within_its_first_wave() {
    let sim = start(200, policy());
    let t0 = Instant::now();
    let mut paused_after = None;
    let mut rounds = 0;
    while rounds < MAX_ROUNDS && t0.elapsed() < MAX_TIME {
        sim.round();
        rounds += 1;
        if sim.paused().is_some() {
            paused_after = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let paused_after = paused_after.expect("the bad release never paused");
    let took = sim.took.load(Ordering::SeqCst);
    // Paused is paused: more rounds, nobody new takes it.
    for _ in 0..3 {
        sim.round();
    }
    let took_later = sim.took.load(Ordering::SeqCst);
    let reason = sim.paused().unwrap();
    let first_wave = sim.ids.iter().filter(|id| bucket(id) < 1).count();
    println!(
        "bad release (20% of boxes fail it), fleet {FLEET}: paused after {:.1}s and {rounds} \
         rounds; {took} boxes took it ({:.2}% of the fleet; its first wave has {first_wave}), \
         {} failed; reason: {reason}; {} more took it in 3 more rounds",
        paused_after.as_secs_f64(),
        took as f64 * 100.0 / FLEET as f64,
        sim.count(Fate::Failed),
        took_later - took,
    );
    // The pause reaches the boxes at the server's next repository sync: nobody beyond the
    // first wave (1%: bucket 0) takes it, and at most 1% of the fleet does.
    assert!(
        took <= first_wave,
        "{took} boxes took the bad release, the first wave has {first_wave}"
    );
    assert!(
        took * 100 <= FLEET,
        "{took} boxes took the bad release: more than 1% of {FLEET}"
    );
    assert!(took > 0);
    assert_eq!(took_later, took, "offered after the pause");
}

#[test]
fn a_good_release_reaches_the_whole_fleet() {
    let sim = start(5, policy());
    let t0 = Instant::now();
    let mut rounds = 0;
    while sim.count(Fate::Waiting) > 0 && rounds < MAX_ROUNDS && t0.elapsed() < MAX_TIME {
        sim.round();
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, failed) = (sim.count(Fate::Confirmed), sim.count(Fate::Failed));
    println!(
        "good release (0.5% of boxes fail it), fleet {FLEET}: {ok} confirmed and {failed} \
         failed after {:.1}s and {rounds} rounds; paused: {:?}",
        t0.elapsed().as_secs_f64(),
        sim.paused()
    );
    assert_eq!(sim.paused(), None);
    assert_eq!(ok + failed, FLEET, "every box took it");
}
