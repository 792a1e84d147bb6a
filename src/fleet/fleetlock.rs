//! Reboot coordination for the fleet (the FleetLock protocol's server side): each group has a
//! number of reboot slots, a semaphore; a node takes one before it reboots (`pre-reboot`) and
//! gives it back once it runs steady again (`steady-state`). A node holds at most one slot, in
//! one group; a slot not given back within its lease counts as free again, so a box that died
//! holding one does not block its group for ever. The rule (`decide`) is pure; `store` keeps
//! the slots in the fleet database.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::core::fleetlock::ClientParams;
use crate::fleet::store::Db;

/// How many boxes of a group may reboot at once, and for how long a slot is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    /// Slots of a group not named in `groups`.
    pub default: u32,
    /// Slots per named group.
    pub groups: BTreeMap<String, u32>,
    /// Seconds a slot is held without being taken again or given back.
    pub lease_secs: u64,
}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            default: 1,
            groups: BTreeMap::new(),
            lease_secs: 3600,
        }
    }
}

impl Slots {
    /// Slots of `group`.
    pub fn of(&self, group: &str) -> u32 {
        self.groups.get(group).copied().unwrap_or(self.default)
    }
}

/// Parses `GROUP=N` (a `--reboot-group-slots` value).
pub fn parse_group_slots(s: &str) -> Result<(String, u32), String> {
    let (g, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not GROUP=N"))?;
    crate::core::report::check_label("group", g, false).map_err(|e| e.to_string())?;
    let n = n
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not a number of slots"))?;
    Ok((g.to_owned(), n))
}

/// A slot as stored: who holds it, in which group, until when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    pub node: String,
    pub group: String,
    /// Unix seconds the lease runs out (the slot counts as free from then on).
    pub expires: u64,
}

/// What a `pre-reboot` leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// The node holds a slot of this group already: its lease starts again.
    Renew,
    /// A slot was free: the node takes it.
    Grant,
    /// Every slot is held by someone else (these nodes).
    Full(Vec<String>),
    /// The node holds a slot of another group.
    OtherGroup(String),
}

/// The pure rule. `holders`: the stored slots of `p.group` and the one of `p.node_uuid`, if
/// any; leases run out at `expires`.
pub fn decide(holders: &[Holder], p: &ClientParams, slots: u32, now: u64) -> Take {
    let live = || holders.iter().filter(|h| h.expires > now);
    if let Some(mine) = live().find(|h| h.node == p.node_uuid) {
        return match mine.group == p.group {
            true => Take::Renew,
            false => Take::OtherGroup(mine.group.clone()),
        };
    }
    let others: Vec<String> = live()
        .filter(|h| h.group == p.group)
        .map(|h| h.node.clone())
        .collect();
    if others.len() < slots as usize {
        Take::Grant
    } else {
        Take::Full(others)
    }
}

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

    fn h(node: &str, group: &str, expires: u64) -> Holder {
        Holder {
            node: node.into(),
            group: group.into(),
            expires,
        }
    }

    fn p(node: &str, group: &str) -> ClientParams {
        ClientParams {
            node_uuid: node.into(),
            group: group.into(),
        }
    }

    #[test]
    fn a_group_is_a_semaphore_and_leases_run_out() {
        let held = [h("a", "g", 100), h("b", "g", 100)];
        assert_eq!(decide(&[], &p("a", "g"), 1, 10), Take::Grant);
        assert_eq!(decide(&held[..1], &p("b", "g"), 2, 10), Take::Grant);
        assert_eq!(
            decide(&held, &p("c", "g"), 2, 10),
            Take::Full(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            decide(&held, &p("a", "g"), 2, 10),
            Take::Renew,
            "idempotent"
        );
        assert_eq!(decide(&held, &p("c", "g"), 2, 100), Take::Grant, "expired");
        assert_eq!(
            decide(&held, &p("c", "g"), 0, 10),
            Take::Full(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            decide(&[], &p("c", "g"), 0, 10),
            Take::Full(vec![]),
            "0 slots: never"
        );
        assert_eq!(
            decide(&held, &p("a", "other"), 5, 10),
            Take::OtherGroup("g".into())
        );
        assert_eq!(decide(&held, &p("a", "other"), 5, 100), Take::Grant);
    }

    #[test]
    fn slots_per_group() {
        let mut s = Slots::default();
        assert_eq!(s.of("x"), 1);
        let (g, n) = parse_group_slots("zone-a=3").unwrap();
        s.groups.insert(g, n);
        assert_eq!((s.of("zone-a"), s.of("zone-b")), (3, 1));
        for bad in ["zone-a", "a b=1", "zone=x", "=2"] {
            assert!(parse_group_slots(bad).is_err(), "{bad}");
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
