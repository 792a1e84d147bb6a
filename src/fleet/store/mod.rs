//! The fleet database, the only module that speaks SQL: enrolled boxes, their reports and each
//! release's rollout state, and the reboot slots of the FleetLock protocol, in one SQLite file (`<store>/fleet.db`).
//!
//! Durability: WAL with `synchronous=FULL`, so a report is on disk (its WAL frame fsync'd)
//! before `insert_report` returns, and the server acknowledges it only after that; a kill -9
//! or a power cut loses no acknowledged report. The schema grows by numbered migrations
//! (`PRAGMA user_version`). Moving to PostgreSQL (see `docs/fleet.md`) replaces this module.

mod rollouts;
mod slots;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};

use crate::core::report::{Outcome, Report};
use crate::fleet::rollout::{Counts, Policy, Progress};

/// The schema, one migration per entry; entry `i` takes `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE boxes (
    box_id     TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    grp        TEXT NOT NULL,
    enrolled   INTEGER NOT NULL
);
CREATE TABLE reports (
    box_id         TEXT NOT NULL REFERENCES boxes(box_id),
    id             TEXT NOT NULL,
    grp            TEXT NOT NULL,
    reported_group TEXT NOT NULL,
    from_version   TEXT,
    to_version     TEXT,
    outcome        TEXT NOT NULL,
    failed_check   TEXT,
    boot_report    TEXT,
    started        INTEGER NOT NULL,
    seconds        REAL NOT NULL,
    sent           INTEGER NOT NULL,
    received       INTEGER NOT NULL,
    PRIMARY KEY (box_id, id)
);
CREATE INDEX reports_by_release ON reports (to_version, outcome, received);
CREATE TABLE rollouts (
    version        TEXT PRIMARY KEY,
    policy         TEXT NOT NULL,
    stage          INTEGER NOT NULL,
    since          INTEGER NOT NULL,
    failures_since INTEGER NOT NULL,
    paused         TEXT,
    withdrawn      INTEGER NOT NULL,
    updated        INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE reboot_slots (
    node     TEXT PRIMARY KEY,
    grp      TEXT NOT NULL,
    acquired INTEGER NOT NULL,
    expires  INTEGER NOT NULL
);
CREATE INDEX reboot_slots_by_group ON reboot_slots (grp);
"#,
];

/// An enrolled box as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub box_id: String,
    pub public_key: String,
    pub group: String,
}

/// A release's rollout: its plan and where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub version: String,
    pub policy: Policy,
    pub progress: Progress,
}

/// How many enrolled boxes of one group run one version (`Db::boxes_by_version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionCount {
    /// None: the box has not reported yet, or its latest report names no version it runs.
    pub version: Option<String>,
    /// The enrolled group.
    pub group: String,
    pub boxes: u32,
}

/// The open fleet database.
pub struct Db {
    conn: Connection,
}

fn outcomes(pred: fn(Outcome) -> bool) -> String {
    let names: Vec<String> = Outcome::ALL
        .into_iter()
        .filter(|o| pred(*o))
        .map(|o| format!("'{}'", o.as_str()))
        .collect();
    names.join(",")
}

/// The database's file name in the server's store directory.
pub const FILE: &str = "fleet.db";

impl Db {
    /// Opens (creating) the database of the server's store directory `store`.
    pub fn open_in(store: &Path) -> Result<Db> {
        std::fs::create_dir_all(store)
            .with_context(|| format!("creating store {}", store.display()))?;
        Db::open(&store.join(FILE))
    }

    /// Opens (creating) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening fleet database {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        anyhow::ensure!(
            mode == "wal",
            "{}: journal mode {mode}, not wal",
            path.display()
        );
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        let mut db = Db { conn };
        db.migrate()
            .with_context(|| format!("migrating fleet database {}", path.display()))?;
        Ok(db)
    }

    /// The schema version this database is at.
    pub fn schema_version(&self) -> Result<usize> {
        let v: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        Ok(usize::try_from(v).unwrap_or(usize::MAX))
    }

    fn migrate(&mut self) -> Result<()> {
        let at = self.schema_version()?;
        anyhow::ensure!(
            at <= MIGRATIONS.len(),
            "schema version {at} is newer than this upgradectl knows ({})",
            MIGRATIONS.len()
        );
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(at) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Enrolls a box, or replaces its key and group if it was enrolled before.
    pub fn enroll(&self, b: &Enrolled, now: u64) -> Result<()> {
        Db::enroll_in(&self.conn, b, now)
    }

    fn enroll_in(conn: &Connection, b: &Enrolled, now: u64) -> Result<()> {
        let holder: Option<String> = conn
            .query_row(
                "SELECT box_id FROM boxes WHERE public_key = ?1 AND box_id != ?2",
                params![b.public_key, b.box_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(other) = holder {
            return Err(crate::error::refused(format!(
                "{}'s key is enrolled as box {other:?}: a key belongs to one box id (enroll \
                 {other:?} again with a new key first, or give this box its own)",
                b.box_id
            )));
        }
        conn.execute(
            "INSERT INTO boxes (box_id, public_key, grp, enrolled) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (box_id) DO UPDATE SET public_key = ?2, grp = ?3, enrolled = ?4",
            params![b.box_id, b.public_key, b.group, now as i64],
        )
        .with_context(|| format!("enrolling {}", b.box_id))?;
        Ok(())
    }

    /// Enrolls many boxes in one transaction (a factory batch): all or none.
    pub fn enroll_all(&mut self, boxes: &[Enrolled], now: u64) -> Result<()> {
        let tx = self.conn.transaction()?;
        for b in boxes {
            Db::enroll_in(&tx, b, now)?;
        }
        tx.commit().context("committing the enrollments")
    }

    /// The enrolled box holding `public_key`, if any.
    pub fn box_by_key(&self, public_key: &str) -> Result<Option<Enrolled>> {
        let row = self
            .conn
            .query_row(
                "SELECT box_id, public_key, grp FROM boxes WHERE public_key = ?1",
                [public_key],
                |r| {
                    Ok(Enrolled {
                        box_id: r.get(0)?,
                        public_key: r.get(1)?,
                        group: r.get(2)?,
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    /// Whether any box is enrolled.
    pub fn has_boxes(&self) -> Result<bool> {
        let n: i64 = self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM boxes)", [], |r| r.get(0))?;
        Ok(n == 1)
    }

    /// Whether box `box_id` is enrolled.
    pub fn is_enrolled(&self, box_id: &str) -> Result<bool> {
        let n: i64 = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM boxes WHERE box_id = ?1)",
            [box_id],
            |r| r.get(0),
        )?;
        Ok(n == 1)
    }

    /// Stores a verified report from enrolled box `b`, received at `now`. Returns false if
    /// this box already sent a report with this id (stored once, nothing changes).
    pub fn insert_report(&self, b: &Enrolled, r: &Report, now: u64) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO reports (box_id, id, grp, reported_group, from_version,
                   to_version, outcome, failed_check, boot_report, started, seconds, sent,
                   received)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    b.box_id,
                    r.id,
                    b.group,
                    r.group,
                    r.from.as_ref().map(|v| v.as_str()),
                    r.to.as_ref().map(|v| v.as_str()),
                    r.outcome.as_str(),
                    r.failed_check,
                    r.boot_report,
                    r.started as i64,
                    r.seconds,
                    r.sent as i64,
                    now as i64,
                ],
            )
            .with_context(|| format!("storing report {} of {}", r.id, b.box_id))?;
        Ok(n == 1)
    }

    /// How many reports are stored.
    pub fn report_count(&self) -> Result<u64> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM reports", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// How many reports of each outcome are stored (all releases; for metrics).
    pub fn report_totals(&self) -> Result<Vec<(Outcome, u64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT outcome, COUNT(*) FROM reports GROUP BY outcome")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, n) = row?;
            if let Some(o) = Outcome::parse(&name) {
                out.push((o, n as u64));
            }
        }
        Ok(out)
    }

    /// Whether box `box_id`'s report `id` is stored.
    pub fn has_report(&self, box_id: &str, id: &str) -> Result<bool> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM reports WHERE box_id = ?1 AND id = ?2",
            [box_id, id],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    fn distinct_boxes(&self, version: &str, which: &str, since: u64) -> Result<u32> {
        let sql = format!(
            "SELECT COUNT(DISTINCT box_id) FROM reports
             WHERE to_version = ?1 AND outcome IN ({which}) AND received >= ?2"
        );
        let n: i64 = self
            .conn
            .query_row(&sql, params![version, since as i64], |r| r.get(0))?;
        Ok(n as u32)
    }

    /// The report counts `rollout::step` decides from, for `version` at `p`.
    pub fn counts(&self, version: &str, p: &Progress) -> Result<Counts> {
        let ok = outcomes(Outcome::is_success);
        let bad = outcomes(Outcome::is_failure);
        Ok(Counts {
            stage_successes: self.distinct_boxes(version, &ok, p.since)?,
            successes: self.distinct_boxes(version, &ok, p.failures_since)?,
            failures: self.distinct_boxes(version, &bad, p.failures_since)?,
        })
    }

    /// Number of distinct boxes per outcome for `version` (all time).
    pub fn outcome_counts(&self, version: &str) -> Result<Vec<(Outcome, u32)>> {
        Outcome::ALL
            .into_iter()
            .map(|o| {
                let which = format!("'{}'", o.as_str());
                Ok((o, self.distinct_boxes(version, &which, 0)?))
            })
            .collect()
    }

    /// How many enrolled boxes run each version, per enrolled group, judged by each box's
    /// latest report (by arrival: `received`, then insertion order): its `to` if the outcome
    /// leaves the box on it (`Outcome::runs_target`), else its `from`.
    pub fn boxes_by_version(&self) -> Result<Vec<VersionCount>> {
        let target = outcomes(Outcome::runs_target);
        let sql = format!(
            "SELECT latest.version, b.grp, COUNT(*) FROM boxes b
             LEFT JOIN (
               SELECT box_id,
                 CASE WHEN outcome IN ({target}) THEN to_version ELSE from_version END
                   AS version,
                 ROW_NUMBER() OVER (PARTITION BY box_id ORDER BY received DESC, rowid DESC)
                   AS n
               FROM reports
             ) latest ON latest.box_id = b.box_id AND latest.n = 1
             GROUP BY latest.version, b.grp
             ORDER BY latest.version, b.grp"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([], |r| {
            Ok(VersionCount {
                version: r.get(0)?,
                group: r.get(1)?,
                boxes: r.get::<_, i64>(2)? as u32,
            })
        })?;
        rows.collect::<rusqlite::Result<_>>()
            .context("counting boxes by version")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::report::testdata::report;

    fn enrolled(id: &str) -> Enrolled {
        Enrolled {
            box_id: id.into(),
            public_key: format!("ed25519:{id}"),
            group: "zone-a".into(),
        }
    }

    #[test]
    fn a_key_enrolled_for_another_box_is_refused_with_its_holder_named() {
        let (_d, db) = db();
        db.enroll(&enrolled("a"), 1).unwrap();
        db.enroll(&enrolled("a"), 2).unwrap();
        let mut other = enrolled("b");
        other.public_key = enrolled("a").public_key;
        let err = db.enroll(&other, 3).unwrap_err();
        assert_eq!(crate::error::classify(&err).0, crate::error::Exit::Refused);
        assert!(
            format!("{err:#}").contains("enrolled as box \"a\""),
            "{err:#}"
        );
    }

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("fleet.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn opens_in_wal_with_full_sync_and_migrates_once() {
        let (dir, db) = db();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len());
        let sync: i64 = db
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        db.enroll(&enrolled("b1"), 1).unwrap();
        drop(db);
        let again = Db::open(&dir.path().join("fleet.db")).unwrap();
        assert!(again.box_by_key("ed25519:b1").unwrap().is_some(), "kept");
        again.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(again);
        let err = Db::open(&dir.path().join("fleet.db")).err().unwrap();
        assert!(format!("{err:#}").contains("newer"), "{err:#}");
    }

    #[test]
    fn enrolling_again_replaces_the_key_and_a_key_belongs_to_one_box() {
        let (_dir, db) = db();
        db.enroll(&enrolled("b1"), 1).unwrap();
        let mut moved = enrolled("b1");
        moved.public_key = "ed25519:new".into();
        db.enroll(&moved, 2).unwrap();
        assert!(db.box_by_key("ed25519:b1").unwrap().is_none());
        assert_eq!(db.box_by_key("ed25519:new").unwrap().unwrap(), moved);
        let mut thief = enrolled("b2");
        thief.public_key = "ed25519:new".into();
        assert!(db.enroll(&thief, 3).is_err());
    }

    #[test]
    fn reports_are_stored_once_and_counted_per_distinct_box() {
        let (_dir, db) = db();
        let (b1, b2) = (enrolled("b1"), enrolled("b2"));
        db.enroll(&b1, 0).unwrap();
        db.enroll(&b2, 0).unwrap();
        let r = report("b1", "2.0", Outcome::Fallback, 100);
        assert!(db.insert_report(&b1, &r, 100).unwrap());
        assert!(!db.insert_report(&b1, &r, 101).unwrap(), "a resend");
        let again = report("b1", "2.0", Outcome::Failed, 102);
        assert!(db.insert_report(&b1, &again, 102).unwrap());
        for (o, at) in [(Outcome::Confirmed, 150), (Outcome::Upgraded, 150)] {
            db.insert_report(&b2, &report("b2", "2.0", o, at), at)
                .unwrap();
        }
        db.insert_report(&b2, &report("b2", "3.0", Outcome::Failed, 160), 160)
            .unwrap();
        assert_eq!(db.report_count().unwrap(), 5);
        let totals = db.report_totals().unwrap();
        assert!(totals.contains(&(Outcome::Failed, 2)) && totals.contains(&(Outcome::Fallback, 1)));
        assert!(db.has_report("b1", &r.id).unwrap());
        assert!(!db.has_report("b2", &r.id).unwrap());
        let p = Progress::start(0);
        let c = db.counts("2.0", &p).unwrap();
        assert_eq!((c.stage_successes, c.successes, c.failures), (1, 1, 1));
        let later = Progress {
            since: 151,
            failures_since: 101,
            ..p
        };
        let c = db.counts("2.0", &later).unwrap();
        assert_eq!((c.stage_successes, c.successes, c.failures), (0, 1, 1));
        let by = db.outcome_counts("2.0").unwrap();
        assert!(by.contains(&(Outcome::Fallback, 1)) && by.contains(&(Outcome::Upgraded, 1)));
        let unknown = enrolled("b3");
        assert!(db.insert_report(&unknown, &r, 1).is_err(), "not enrolled");
    }

    #[test]
    fn boxes_count_on_the_version_their_latest_report_leaves_them_on() {
        let (_dir, db) = db();
        let mut hostile = enrolled("b4");
        hostile.group = "<script>".into();
        for b in [enrolled("b1"), enrolled("b2"), enrolled("b3"), hostile] {
            db.enroll(&b, 0).unwrap();
        }
        let store = |id: &str, outcome: Outcome, at: u64| {
            let b = db.box_by_key(&format!("ed25519:{id}")).unwrap().unwrap();
            db.insert_report(&b, &report(id, "2.0", outcome, at), at)
                .unwrap();
        };
        // b1 took 2.0; b2 tried it and fell back to 1.0; b3 only prepared it (same second as
        // its upgrade: insertion order decides); b4 never reported.
        store("b1", Outcome::Upgraded, 10);
        store("b1", Outcome::Confirmed, 20);
        store("b2", Outcome::Upgraded, 10);
        store("b2", Outcome::Fallback, 20);
        store("b3", Outcome::Upgraded, 30);
        store("b3", Outcome::Prepared, 30);
        let count = |version: Option<&str>, group: &str, boxes: u32| VersionCount {
            version: version.map(Into::into),
            group: group.into(),
            boxes,
        };
        assert_eq!(
            db.boxes_by_version().unwrap(),
            vec![
                count(None, "<script>", 1),
                count(Some("1.0"), "zone-a", 2),
                count(Some("2.0"), "zone-a", 1),
            ]
        );
    }

    #[test]
    fn rollouts_round_trip_and_advance_only_from_what_was_read() {
        let (_dir, db) = db();
        let mut r = Rollout {
            version: "2.0".into(),
            policy: Policy::default(),
            progress: Progress::start(10),
        };
        db.save_rollout(&r, 10).unwrap();
        assert_eq!(db.rollout("2.0").unwrap().unwrap(), r);
        let before = r.progress.clone();
        r.progress.stage = 1;
        assert!(db.advance(&r, &before, 20).unwrap());
        let mut stale = r.clone();
        stale.progress.paused = Some("x".into());
        assert!(
            !db.advance(&stale, &before, 30).unwrap(),
            "changed meanwhile"
        );
        assert_eq!(db.rollout("2.0").unwrap().unwrap().progress.stage, 1);
        assert_eq!(db.rollouts().unwrap().len(), 1);
        assert!(db.rollout("9.0").unwrap().is_none());
        assert_eq!(db.rollout_updated("2.0").unwrap(), Some(20));
        assert_eq!(db.rollout_updated("9.0").unwrap(), None);
    }
}
