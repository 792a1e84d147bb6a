//! The reboot slots' rule, pure: each group has a number of slots, a semaphore; a node holds
//! at most one, in one group; a slot not given back within its lease counts as free again.
//! `fleet::store` keeps the slots, `fleet::fleetlock` answers the protocol with them.

use std::collections::BTreeMap;

use crate::core::fleetlock::ClientParams;

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
}
