//! Each release's rollout in the fleet database (`rollouts`): its plan and progress, written
//! whole or advanced only from the progress the caller read (another process may have won).

use anyhow::{Context, Result};
use rusqlite::{params, OptionalExtension};

use super::{Db, Rollout};
use crate::fleet::rollout::Progress;

impl Db {
    /// When `version`'s rollout was last written (Unix seconds): started, stepped, paused or
    /// resumed. A paused or withdrawn rollout is never stepped, so for one it is when that
    /// happened.
    pub fn rollout_updated(&self, version: &str) -> Result<Option<u64>> {
        let at: Option<i64> = self
            .conn
            .query_row(
                "SELECT updated FROM rollouts WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()?;
        Ok(at.map(|t| t as u64))
    }

    /// `version`'s rollout, if it has one.
    pub fn rollout(&self, version: &str) -> Result<Option<Rollout>> {
        Ok(self.rollouts_where("WHERE version = ?1", [version])?.pop())
    }

    /// Every rollout.
    pub fn rollouts(&self) -> Result<Vec<Rollout>> {
        self.rollouts_where("", [])
    }

    fn rollouts_where<P: rusqlite::Params>(&self, filter: &str, p: P) -> Result<Vec<Rollout>> {
        let sql = format!(
            "SELECT version, policy, stage, since, failures_since, paused, withdrawn
             FROM rollouts {filter} ORDER BY version"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                Progress {
                    stage: r.get::<_, i64>(2)? as usize,
                    since: r.get::<_, i64>(3)? as u64,
                    failures_since: r.get::<_, i64>(4)? as u64,
                    paused: r.get(5)?,
                    withdrawn: r.get(6)?,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (version, policy, progress) = row?;
            let policy = serde_json::from_str(&policy)
                .with_context(|| format!("rollout policy of {version}"))?;
            out.push(Rollout {
                version,
                policy,
                progress,
            });
        }
        Ok(out)
    }

    /// Writes `r` (a new rollout, or a changed one).
    pub fn save_rollout(&self, r: &Rollout, now: u64) -> Result<()> {
        let p = &r.progress;
        self.conn
            .execute(
                "INSERT INTO rollouts (version, policy, stage, since, failures_since, paused,
                   withdrawn, updated)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (version) DO UPDATE SET policy = ?2, stage = ?3, since = ?4,
                   failures_since = ?5, paused = ?6, withdrawn = ?7, updated = ?8",
                params![
                    r.version,
                    serde_json::to_string(&r.policy)?,
                    p.stage as i64,
                    p.since as i64,
                    p.failures_since as i64,
                    p.paused,
                    p.withdrawn,
                    now as i64,
                ],
            )
            .with_context(|| format!("saving the rollout of {}", r.version))?;
        Ok(())
    }

    /// Writes `r`'s progress only if the stored one is still `before` (another process, the
    /// operator's `release`, may have changed it meanwhile: theirs wins).
    pub fn advance(&self, r: &Rollout, before: &Progress, now: u64) -> Result<bool> {
        let (p, b) = (&r.progress, before);
        let n = self.conn.execute(
            "UPDATE rollouts SET stage = ?2, since = ?3, failures_since = ?4, paused = ?5,
               updated = ?6
             WHERE version = ?1 AND stage = ?7 AND since = ?8 AND failures_since = ?9
               AND paused IS ?10 AND withdrawn = ?11",
            params![
                r.version,
                p.stage as i64,
                p.since as i64,
                p.failures_since as i64,
                p.paused,
                now as i64,
                b.stage as i64,
                b.since as i64,
                b.failures_since as i64,
                b.paused,
                b.withdrawn,
            ],
        )?;
        Ok(n == 1)
    }
}
