//! Reboot coordination for the fleet (the FleetLock protocol's server side): each group has a
//! number of reboot slots, a semaphore; a node takes one before it reboots (`pre-reboot`) and
//! gives it back once it runs steady again (`steady-state`). A node holds at most one slot, in
//! one group; a slot not given back within its lease counts as free again, so a box that died
//! holding one does not block its group for ever. The rule is `semaphore` (pure); `store`
//! keeps the slots in the fleet database; this module admits the asker and answers.

use anyhow::Result;

use crate::core::fleetlock::ClientParams;
use crate::fleet::semaphore::{Slots, Take};
use crate::fleet::store::Db;

/// Why a lock request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The fleet has enrolled boxes and this node is none of them.
    #[error("node {0:?} is not an enrolled box")]
    NotEnrolled(String),
    /// No slot free.
    #[error("all {slots} reboot slots of group {group:?} are held (by {})", holders.join(", "))]
    Full {
        group: String,
        slots: u32,
        holders: Vec<String>,
    },
    /// The node holds a slot of another group.
    #[error("node {node:?} holds a reboot slot of group {held:?}; release it first")]
    OtherGroup { node: String, held: String },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Who may ask: anybody while no box is enrolled, else enrolled boxes only (by box id).
fn admit(db: &Db, node: &str) -> Result<(), Refusal> {
    if db.has_boxes()? && !db.is_enrolled(node)? {
        return Err(Refusal::NotEnrolled(node.to_owned()));
    }
    Ok(())
}

/// `pre-reboot`: takes (or renews) a slot of `p.group` for `p.node_uuid`.
pub fn pre_reboot(db: &Db, p: &ClientParams, slots: &Slots, now: u64) -> Result<Take, Refusal> {
    admit(db, &p.node_uuid)?;
    let n = slots.of(&p.group);
    match db.take_reboot_slot(p, n, now + slots.lease_secs, now)? {
        t @ (Take::Renew | Take::Grant) => Ok(t),
        Take::Full(holders) => Err(Refusal::Full {
            group: p.group.clone(),
            slots: n,
            holders,
        }),
        Take::OtherGroup(held) => Err(Refusal::OtherGroup {
            node: p.node_uuid.clone(),
            held,
        }),
    }
}

/// `steady-state`: gives back the slot `p.node_uuid` holds (in whichever group); true if it held
/// one. Holding none is fine (the request is idempotent).
pub fn steady_state(db: &Db, p: &ClientParams) -> Result<bool, Refusal> {
    admit(db, &p.node_uuid)?;
    Ok(db.release_reboot_slot(&p.node_uuid)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(node: &str, group: &str) -> ClientParams {
        ClientParams {
            node_uuid: node.into(),
            group: group.into(),
        }
    }

    #[test]
    fn slots_are_taken_and_given_back_in_the_database_and_only_by_enrolled_boxes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_in(dir.path()).unwrap();
        let s = Slots::default();
        assert_eq!(pre_reboot(&db, &p("a", "g"), &s, 10).unwrap(), Take::Grant);
        assert_eq!(pre_reboot(&db, &p("a", "g"), &s, 11).unwrap(), Take::Renew);
        let full = pre_reboot(&db, &p("b", "g"), &s, 12).unwrap_err();
        assert!(matches!(full, Refusal::Full { .. }), "{full}");
        assert_eq!(pre_reboot(&db, &p("b", "h"), &s, 12).unwrap(), Take::Grant);
        assert!(steady_state(&db, &p("a", "g")).unwrap());
        assert!(!steady_state(&db, &p("a", "g")).unwrap(), "idempotent");
        assert_eq!(pre_reboot(&db, &p("c", "g"), &s, 13).unwrap(), Take::Grant);
        let later = 13 + s.lease_secs;
        assert_eq!(
            pre_reboot(&db, &p("d", "g"), &s, later).unwrap(),
            Take::Grant
        );
        let b = crate::fleet::store::Enrolled {
            box_id: "d".into(),
            public_key: "ed25519:d".into(),
            group: "g".into(),
        };
        db.enroll(&b, 1).unwrap();
        let e = pre_reboot(&db, &p("x", "g"), &s, later).unwrap_err();
        assert!(matches!(e, Refusal::NotEnrolled(_)), "{e}");
        assert!(matches!(
            steady_state(&db, &p("x", "g")),
            Err(Refusal::NotEnrolled(_))
        ));
        assert!(steady_state(&db, &p("d", "g")).unwrap());
    }
}
