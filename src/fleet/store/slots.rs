//! The reboot slots of the FleetLock protocol in the fleet database (`reboot_slots`): taking
//! one by the pure rule of `fleet::semaphore`, giving it back, listing them.

use anyhow::{Context, Result};
use rusqlite::params;

use super::Db;
use crate::core::fleetlock::ClientParams;
use crate::fleet::semaphore::{self, Holder, Take};

/// A `reboot_slots` row selected as `node, grp, expires`.
fn holder(r: &rusqlite::Row) -> rusqlite::Result<Holder> {
    Ok(Holder {
        node: r.get(0)?,
        group: r.get(1)?,
        expires: r.get::<_, i64>(2)? as u64,
    })
}

impl Db {
    /// Takes (`semaphore::decide`) one of `slots` reboot slots of `p.group` for `p.node_uuid`,
    /// held until `expires`, in one immediate transaction: two servers or processes on one
    /// file never hand out the same slot twice.
    pub fn take_reboot_slot(
        &self,
        p: &ClientParams,
        slots: u32,
        expires: u64,
        now: u64,
    ) -> Result<Take> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        let holders = {
            let mut stmt = tx.prepare(
                "SELECT node, grp, expires FROM reboot_slots WHERE grp = ?1 OR node = ?2
                 ORDER BY acquired, node",
            )?;
            let rows = stmt.query_map([&p.group, &p.node_uuid], holder)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let take = semaphore::decide(&holders, p, slots, now);
        match take {
            Take::Renew => {
                tx.execute(
                    "UPDATE reboot_slots SET expires = ?2 WHERE node = ?1",
                    params![p.node_uuid, expires as i64],
                )?;
            }
            Take::Grant => {
                tx.execute(
                    "INSERT OR REPLACE INTO reboot_slots (node, grp, acquired, expires)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![p.node_uuid, p.group, now as i64, expires as i64],
                )?;
            }
            Take::Full(_) | Take::OtherGroup(_) => {}
        }
        tx.commit()
            .with_context(|| format!("taking a reboot slot for {}", p.node_uuid))?;
        Ok(take)
    }

    /// Gives back the reboot slot `node` holds; false if it held none.
    pub fn release_reboot_slot(&self, node: &str) -> Result<bool> {
        let n = self
            .conn
            .execute("DELETE FROM reboot_slots WHERE node = ?1", [node])
            .with_context(|| format!("releasing the reboot slot of {node}"))?;
        Ok(n == 1)
    }

    /// Every stored reboot slot (expired ones too), by group and age.
    pub fn reboot_slots(&self) -> Result<Vec<Holder>> {
        let mut stmt = self
            .conn
            .prepare("SELECT node, grp, expires FROM reboot_slots ORDER BY grp, acquired, node")?;
        let rows = stmt.query_map([], holder)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}
