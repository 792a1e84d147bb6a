//! The fleet over real HTTP: boxes' signed reports into the server's database, and manifests
//! whose rollout follows the waves and pauses by itself. The real server on 127.0.0.1 (see
//! `common/server.rs`; its stand-in for ZFS plays no part here).

#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/server.rs"]
mod server;

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fleet::{enroll, report, signed};
use server::{start_with, Fixture, Setup};
use upgradectl::core::report::Outcome;
use upgradectl::core::sign::public_key_string;
use upgradectl::fleet::control;
use upgradectl::fleet::rollout::Policy;
use upgradectl::fleet::store::{Db, Enrolled};
use upgradectl::sys::clock::now;

fn fleet() -> (Fixture, Db) {
    let f = start_with(Setup {
        fleet: true,
        repo: true,
        ..Setup::default()
    });
    let db = Db::open_in(&f.root.join("store")).unwrap();
    (f, db)
}

fn post(f: &Fixture, body: Vec<u8>) -> u16 {
    fleet::post(&f.url("/v1/reports"), body)
}

/// Release 2.0 as a box of `group` is offered it from the repository: (rollout, paused).
fn offered(f: &Fixture, group: Option<&str>) -> (u8, bool) {
    let m = f.offered("stable", group);
    let r = m.releases.iter().find(|r| r.version.as_str() == "2.0");
    let r = r.unwrap();
    (r.rollout, r.paused)
}

#[test]
fn reports_answer_with_clear_statuses_and_only_enrolled_ones_are_stored() {
    let (f, db) = fleet();
    let key = enroll(&db, 1, "zone-a");
    let r = report(1, "2.0", Outcome::Confirmed);
    assert_eq!(post(&f, signed(&r, &key)), 201);
    assert_eq!(post(&f, signed(&r, &key)), 200, "a resend is stored once");
    let stranger = SigningKey::from_bytes(&[99; 32]);
    assert_eq!(
        post(&f, signed(&report(1, "2.0", Outcome::Failed), &stranger)),
        403
    );
    assert_eq!(
        post(&f, signed(&report(2, "2.0", Outcome::Failed), &key)),
        403
    );
    let mut stale = report(1, "2.0", Outcome::Failed);
    stale.sent -= 3600;
    assert_eq!(post(&f, signed(&stale, &key)), 400);
    assert_eq!(post(&f, b"not json".to_vec()), 400);
    assert_eq!(post(&f, vec![b' '; 200 << 10]), 413);
    assert_eq!(f.get("/v1/reports").0, 405);
    assert_eq!(db.report_count().unwrap(), 1);
    assert!(db.has_report("box-1", &r.id).unwrap());
}

#[test]
fn the_manifest_follows_the_waves_and_forged_reports_advance_nothing() {
    let (f, db) = fleet();
    assert_eq!(
        offered(&f, None),
        (100, false),
        "no waves: as the operator set it"
    );
    let key = enroll(&db, 1, "zone-a");
    let soak = 2;
    let policy = Policy {
        waves: vec![10, 100],
        soak_secs: soak,
        min_successes: 1,
        ..Policy::default()
    };
    let started = Instant::now();
    control::start(&db, "2.0", policy, now()).unwrap();
    assert_eq!(offered(&f, None), (10, false));
    // Forged successes, from a key nobody enrolled: refused, and the wave never moves.
    let stranger = SigningKey::from_bytes(&[99; 32]);
    for _ in 0..20 {
        let r = report(1, "2.0", Outcome::Confirmed);
        assert_eq!(post(&f, signed(&r, &stranger)), 403);
    }
    std::thread::sleep(Duration::from_secs(soak + 1));
    assert_eq!(
        offered(&f, None),
        (10, false),
        "soaked, but no real success"
    );
    // A real success: only a stage that soaked since it began advances.
    assert_eq!(
        post(&f, signed(&report(1, "2.0", Outcome::Confirmed), &key)),
        201
    );
    assert_eq!(offered(&f, None), (100, false));
    assert!(started.elapsed() >= Duration::from_secs(soak));
}

#[test]
fn failures_pause_the_release_for_everyone_not_yet_on_it() {
    let (f, db) = fleet();
    let keys: Vec<_> = (1..=3).map(|i| enroll(&db, i, "zone-a")).collect();
    let policy = Policy {
        waves: vec![50, 100],
        groups: vec!["zone-a".into(), "zone-b".into()],
        max_failures: 2,
        ..Policy::default()
    };
    control::start(&db, "2.0", policy, now()).unwrap();
    assert_eq!(offered(&f, Some("zone-a")), (50, false));
    assert_eq!(
        offered(&f, Some("zone-b")),
        (0, false),
        "one zone at a time"
    );
    let stranger = SigningKey::from_bytes(&[99; 32]);
    let client_errors = || {
        let (_, _, metrics) = f.get("/metrics");
        let line = metrics
            .lines()
            .find_map(|l| l.strip_prefix("upgradectl_http_responses_total{class=\"4xx\"} "));
        line.unwrap().parse::<u64>().unwrap()
    };
    let before = client_errors();
    for _ in 0..20 {
        let forged = report(1, "2.0", Outcome::Fallback);
        assert_eq!(post(&f, signed(&forged, &stranger)), 403);
    }
    assert_eq!(
        client_errors() - before,
        20,
        "forged reports in the metrics"
    );
    let one = report(1, "2.0", Outcome::Fallback);
    assert_eq!(post(&f, signed(&one, &keys[0])), 201);
    assert_eq!(
        post(&f, signed(&one, &keys[0])),
        200,
        "the same failure twice"
    );
    assert_eq!(offered(&f, Some("zone-a")), (50, false), "one failed box");
    let two = report(2, "2.0", Outcome::TrialFailed);
    assert_eq!(post(&f, signed(&two, &keys[1])), 201);
    assert_eq!(offered(&f, Some("zone-a")), (50, true), "paused");
    let reason = db.rollout("2.0").unwrap().unwrap().progress.paused.unwrap();
    assert!(reason.contains("2 boxes failed"), "{reason}");
    let (status, _, metrics) = f.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "upgradectl_rollout_paused{version=\"2.0\"} 1",
        "upgradectl_rollout_percent{version=\"2.0\"} 50",
        "upgradectl_reports{outcome=\"fallback\"} 1",
        "upgradectl_reports{outcome=\"trial-failed\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    control::command(&db, "2.0", control::Command::Resume, now()).unwrap();
    assert_eq!(offered(&f, Some("zone-a")), (50, false), "resumed");
}

mod the_box {
    use super::*;
    use upgradectl::appliance::config::Config;
    use upgradectl::appliance::ctx::Ctx;
    use upgradectl::appliance::identity;
    use upgradectl::appliance::paths::Layout;
    use upgradectl::appliance::report::{self, Step, MAX_SPOOLED, SEND_TIMEOUT};
    use upgradectl::core::report::MAX_BOOT_REPORT;
    use upgradectl::output::Output;

    fn ctx(root: &std::path::Path, server: Option<String>) -> Ctx {
        let config = Config {
            box_id: Some("box-7".into()),
            group: Some("zone-a".into()),
            server,
            ..Config::default()
        };
        Ctx {
            layout: Layout::new(root, &config.host_mount),
            config,
            out: Output::new(false, Box::new(std::io::sink())),
            wait: false,
        }
    }

    fn step(outcome: Outcome) -> Step {
        Step {
            outcome,
            from: Some("1.0".parse().unwrap()),
            to: Some("2.0".parse().unwrap()),
            failed_check: None,
            started: now(),
        }
    }

    #[test]
    fn without_a_server_reports_stay_spooled_capped_and_bounded() {
        let root = tempfile::tempdir().unwrap();
        let ctx = ctx(root.path(), None);
        std::fs::create_dir_all(ctx.layout.state_dir()).unwrap();
        let long = "é".repeat(MAX_BOOT_REPORT);
        std::fs::write(ctx.layout.boot_report(), long).unwrap();
        for _ in 0..MAX_SPOOLED + 2 {
            report::report(&ctx, step(Outcome::Upgraded));
        }
        let p = report::pending(&ctx.layout).unwrap();
        assert_eq!(p.len(), MAX_SPOOLED, "the oldest are dropped");
        let boot = p[0].boot_report.as_ref().unwrap();
        assert!(boot.len() <= MAX_BOOT_REPORT && boot.starts_with('é'));
        let ids: std::collections::HashSet<_> = p.iter().map(|r| &r.id).collect();
        assert_eq!(ids.len(), p.len());
        for r in &p {
            r.validate(now()).unwrap_err(); // `sent` is set only when it is signed
            assert_eq!((r.box_id.as_str(), r.group.as_str()), ("box-7", "zone-a"));
        }
    }

    #[test]
    fn reports_stay_spooled_until_the_enrolled_box_gets_them_acknowledged() {
        let (f, db) = fleet();
        let root = tempfile::tempdir().unwrap();
        let mut ctx = ctx(root.path(), Some(f.url("")));
        report::report(&ctx, step(Outcome::Upgraded));
        assert_eq!(report::pending(&ctx.layout).unwrap().len(), 1, "no key yet");
        let key = identity::load_or_create(&ctx.layout).unwrap();
        report::report(&ctx, step(Outcome::Confirmed));
        let spooled = report::pending(&ctx.layout).unwrap();
        assert_eq!(spooled.len(), 2, "not enrolled: 403, kept");
        assert_eq!(db.report_count().unwrap(), 0);
        let b = Enrolled {
            box_id: "box-7".into(),
            public_key: public_key_string(&key.verifying_key()),
            group: "zone-a".into(),
        };
        db.enroll(&b, now()).unwrap();
        report::flush(&ctx);
        assert!(report::pending(&ctx.layout).unwrap().is_empty());
        for r in &spooled {
            assert!(db.has_report("box-7", &r.id).unwrap(), "{r:?}");
        }
        assert_eq!(db.report_count().unwrap(), 2);

        // A server that accepts connections and never answers costs one short timeout.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        ctx.config.server = Some(format!("http://{}", silent.local_addr().unwrap()));
        let t = Instant::now();
        report::report(&ctx, step(Outcome::Reverted));
        assert!(
            t.elapsed() < SEND_TIMEOUT + Duration::from_secs(3),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(report::pending(&ctx.layout).unwrap().len(), 1);
        ctx.config.server = Some(f.url(""));
        report::flush(&ctx);
        assert!(report::pending(&ctx.layout).unwrap().is_empty());
        assert_eq!(db.report_count().unwrap(), 3);
    }
}
