//! The account databases (`/etc/passwd`, `/etc/group`, `/etc/shadow`, `/etc/gshadow`) merged
//! per entry, keyed by name, against the copy the running image shipped (`base`):
//!
//! - an account the box has keeps the box's entry (its password, its shell, its home), unless
//!   the box never changed it and the new image did: then the new image's entry is taken;
//! - membership lists (`group`'s members, `gshadow`'s admins and members) are merged as sets;
//! - an account the new image adds is added, one it removed is removed when the box never
//!   changed it; an account the box removed stays removed;
//! - the same name with another UID (GID) on each side keeps the box's entry, and a new image
//!   account whose UID (GID) a box account already uses is not added: both are reported (its
//!   shadow or gshadow entry is dropped as well: `Merged::refused`, `drop_names`).
//!
//! Without a base (first upgrade from a factory image) nothing is removed. Pure: no files.

use std::collections::{BTreeMap, BTreeSet};

/// Which of the four colon-separated databases a text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Passwd,
    Group,
    Shadow,
    Gshadow,
}

/// Where each database lives.
const PATHS: [(&str, Db); 4] = [
    ("/etc/passwd", Db::Passwd),
    ("/etc/group", Db::Group),
    ("/etc/shadow", Db::Shadow),
    ("/etc/gshadow", Db::Gshadow),
];

impl Db {
    /// The database a migrated path holds, if it is one of the four.
    pub fn for_path(path: &str) -> Option<Db> {
        PATHS.iter().find(|(p, _)| *p == path).map(|(_, db)| *db)
    }

    /// The database whose accounts this one holds the secrets of (passwd for shadow).
    pub fn owner(self) -> Option<Db> {
        match self {
            Db::Shadow => Some(Db::Passwd),
            Db::Gshadow => Some(Db::Group),
            Db::Passwd | Db::Group => None,
        }
    }

    /// Where the database lives.
    pub fn path(self) -> &'static str {
        PATHS
            .iter()
            .find(|(_, db)| *db == self)
            .map_or("", |(p, _)| p)
    }

    /// The field holding the numeric id that must not clash (UID, GID).
    fn id_field(self) -> Option<usize> {
        match self {
            Db::Passwd | Db::Group => Some(2),
            Db::Shadow | Db::Gshadow => None,
        }
    }

    /// The fields holding comma-separated member lists.
    fn set_fields(self) -> &'static [usize] {
        match self {
            Db::Group => &[3],
            Db::Gshadow => &[2, 3],
            Db::Passwd | Db::Shadow => &[],
        }
    }
}

/// One line of a database: an entry (its colon-separated fields, the first one the name) or
/// anything else (blank lines, comments), kept as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Entry(Vec<String>),
    Other(String),
}

impl Line {
    fn name(&self) -> Option<&str> {
        match self {
            Line::Entry(fields) => Some(&fields[0]),
            Line::Other(_) => None,
        }
    }
}

/// Parses a database. Never fails: a line that is not an entry is kept as `Other`.
pub fn parse(text: &str) -> Vec<Line> {
    text.split_terminator('\n').map(parse_line).collect()
}

fn parse_line(line: &str) -> Line {
    let fields: Vec<String> = line.split(':').map(String::from).collect();
    if fields[0].is_empty() || line.starts_with('#') || fields.len() < 2 {
        Line::Other(line.to_owned())
    } else {
        Line::Entry(fields)
    }
}

/// Renders a database back: one line each, newline-terminated.
pub fn render(lines: &[Line]) -> String {
    let mut out = String::new();
    for line in lines {
        match line {
            Line::Entry(fields) => out += &fields.join(":"),
            Line::Other(text) => out += text,
        }
        out.push('\n');
    }
    out
}

/// A merged database and what deserves a human's eye.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub text: String,
    /// Real conflicts, each with the rule that resolved it.
    pub conflicts: Vec<String>,
    /// The new image's accounts that were not added (their id clashed): their shadow and
    /// gshadow entries must go too (`drop_names`).
    pub refused: Vec<String>,
}

/// Merges the box's database (`ours`) into the new image's (`theirs`) against what the running
/// image shipped (`base`, `None` when unknown). Order: the new image's entries first, in its
/// order, then the box's own, in the box's order.
pub fn merge(db: Db, base: Option<&str>, ours: &str, theirs: &str) -> Merged {
    let base_lines = base.map(parse);
    let base = base_lines.as_deref().map(by_name);
    let ours_lines = parse(ours);
    let theirs_lines = parse(theirs);
    let ours = by_name(&ours_lines);
    let theirs_map = by_name(&theirs_lines);
    let mut conflicts = Vec::new();
    let mut refused = Vec::new();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for line in &theirs_lines {
        let Some(name) = line.name() else {
            out.push(line.clone());
            continue;
        };
        if !seen.insert(name.to_owned()) {
            continue;
        }
        let b = base.as_ref().and_then(|b| b.get(name));
        let entry = match ours.get(name) {
            Some(o) => Some(merge_entry(
                db,
                b.copied(),
                o,
                theirs_map[name],
                &mut conflicts,
            )),
            None => added_by_image(
                db,
                base.as_ref(),
                name,
                b.is_some(),
                &ours,
                theirs_map[name],
            )
            .map_err(|c| {
                conflicts.push(c);
                refused.push(name.to_owned());
            })
            .ok()
            .flatten(),
        };
        out.extend(entry.map(Line::Entry));
    }
    for line in &ours_lines {
        match line.name() {
            None if !theirs_lines.contains(line) => out.push(line.clone()),
            Some(name) if seen.insert(name.to_owned()) => {
                let b = base.as_ref().and_then(|b| b.get(name));
                if let Some(kept) = removed_by_image(name, b.copied(), ours[name], &mut conflicts) {
                    out.push(Line::Entry(kept));
                }
            }
            _ => {}
        }
    }
    Merged {
        text: render(&out),
        conflicts: conflicts
            .into_iter()
            .map(|c| format!("{}: {c}", db.path()))
            .collect(),
        refused,
    }
}

/// `text` without the entries named in `names`.
pub fn drop_names(text: &str, names: &[String]) -> String {
    let mut lines = parse(text);
    lines.retain(|l| l.name().is_none_or(|n| !names.iter().any(|x| x == n)));
    render(&lines)
}

/// First entry of each name.
fn by_name(lines: &[Line]) -> BTreeMap<&str, &Vec<String>> {
    let mut map = BTreeMap::new();
    for line in lines {
        if let (Some(name), Line::Entry(fields)) = (line.name(), line) {
            map.entry(name).or_insert(fields);
        }
    }
    map
}

/// An entry both sides have: the box's, unless only the new image changed it; member lists
/// merged as sets; a different id reported.
fn merge_entry(
    db: Db,
    base: Option<&Vec<String>>,
    ours: &[String],
    theirs: &[String],
    conflicts: &mut Vec<String>,
) -> Vec<String> {
    if let Some(i) = db.id_field() {
        if ours.get(i) != theirs.get(i) {
            conflicts.push(format!(
                "{} has id {} on this box and {} in the new image; the box's entry wins",
                ours[0],
                ours.get(i).map_or("", String::as_str),
                theirs.get(i).map_or("", String::as_str),
            ));
            return ours.to_vec();
        }
    }
    let only_image_changed = base.is_some_and(|b| b.as_slice() == ours);
    let mut out = if only_image_changed {
        theirs.to_vec()
    } else {
        ours.to_vec()
    };
    for &i in db.set_fields() {
        if let Some(field) = out.get_mut(i) {
            *field = merge_set(
                base.and_then(|b| b.get(i)).map(String::as_str),
                ours.get(i).map_or("", String::as_str),
                theirs.get(i).map_or("", String::as_str),
            );
        }
    }
    out
}

/// An entry only the new image has: added, unless the base had it (the box removed it) or its
/// id is one a box account already uses (reported, `Err`).
fn added_by_image(
    db: Db,
    base: Option<&BTreeMap<&str, &Vec<String>>>,
    name: &str,
    in_base: bool,
    ours: &BTreeMap<&str, &Vec<String>>,
    theirs: &[String],
) -> Result<Option<Vec<String>>, String> {
    if base.is_some() && in_base {
        return Ok(None);
    }
    if let Some(i) = db.id_field() {
        let id = theirs.get(i);
        if let Some(holder) = ours.values().find(|o| o.get(i) == id) {
            return Err(format!(
                "the new image's {name} has id {} that this box's {} already uses; not added",
                id.map_or("", String::as_str),
                holder[0],
            ));
        }
    }
    Ok(Some(theirs.to_vec()))
}

/// An entry only the box has: kept, unless the new image removed it and the box never changed
/// it. A removed entry the box changed is kept and reported.
fn removed_by_image(
    name: &str,
    base: Option<&Vec<String>>,
    ours: &[String],
    conflicts: &mut Vec<String>,
) -> Option<Vec<String>> {
    match base {
        None => Some(ours.to_vec()),
        Some(b) if b.as_slice() == ours => None,
        Some(_) => {
            conflicts.push(format!(
                "{name}: removed by the new image but changed on this box; the box's entry stays"
            ));
            Some(ours.to_vec())
        }
    }
}

/// Three-way merge of a comma-separated set: what both keep, plus what either side added since
/// the base (without a base: the union). The box's order first.
fn merge_set(base: Option<&str>, ours: &str, theirs: &str) -> String {
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect()
    };
    let base = base.map(split);
    let (ours, theirs) = (split(ours), split(theirs));
    let added = |m: &String| base.as_ref().is_none_or(|b| !b.contains(m));
    let mut out: Vec<String> = Vec::new();
    for m in ours.iter().chain(&theirs) {
        let keep = (ours.contains(m) && theirs.contains(m)) || added(m);
        if keep && !out.contains(m) {
            out.push(m.clone());
        }
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: &str = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\nold:x:101:101::/:/usr/sbin/nologin\n";

    #[test]
    fn box_entries_win_image_accounts_are_added_and_removed() {
        let ours = "root:x:0:0:root:/root:/bin/zsh\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\nold:x:101:101::/:/usr/sbin/nologin\nalice:x:1000:1000::/home/alice:/bin/bash\n";
        let theirs = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/var/lib/daemon:/usr/sbin/nologin\n_chrony:x:110:110::/var/lib/chrony:/usr/sbin/nologin\n";
        let m = merge(Db::Passwd, Some(BASE), ours, theirs);
        assert_eq!(
            m.text,
            "root:x:0:0:root:/root:/bin/zsh\n\
             daemon:x:1:1::/var/lib/daemon:/usr/sbin/nologin\n\
             _chrony:x:110:110::/var/lib/chrony:/usr/sbin/nologin\n\
             alice:x:1000:1000::/home/alice:/bin/bash\n"
        );
        assert!(m.conflicts.is_empty(), "{:?}", m.conflicts);
        // Without a base nothing is removed and the box's entries win.
        let m = merge(Db::Passwd, None, ours, theirs);
        assert!(m.text.contains("old:x:101"), "{}", m.text);
        assert!(m.text.contains("daemon:x:1:1::/usr/sbin:"), "{}", m.text);
    }

    #[test]
    fn id_clashes_keep_the_box_entry_and_are_reported() {
        let ours = "root:x:0:0::/root:/bin/sh\nalice:x:110:110::/home/alice:/bin/sh\nntp:x:120:120::/:/bin/false\n";
        let theirs = "root:x:0:0::/root:/bin/sh\n_chrony:x:110:110::/:/bin/false\nntp:x:121:121::/:/bin/false\n";
        let m = merge(Db::Passwd, None, ours, theirs);
        assert!(!m.text.contains("_chrony"), "{}", m.text);
        assert!(m.text.contains("ntp:x:120:120"), "{}", m.text);
        assert_eq!(m.conflicts.len(), 2, "{:?}", m.conflicts);
        assert_eq!(m.refused, vec!["_chrony".to_string()]);
        let shadow = "root:*:1::::::\n_chrony:!:2::::::\n";
        assert_eq!(drop_names(shadow, &m.refused), "root:*:1::::::\n");
        assert!(
            m.conflicts[0].starts_with("/etc/passwd: the new image's _chrony has id 110"),
            "{:?}",
            m.conflicts
        );
    }

    #[test]
    fn members_merge_as_sets() {
        let base = "sudo:x:27:admin\n";
        let ours = "sudo:x:27:admin,alice\n";
        let theirs = "sudo:x:27:ops\n";
        let m = merge(Db::Group, Some(base), ours, theirs);
        assert_eq!(m.text, "sudo:x:27:alice,ops\n");
        let m = merge(
            Db::Gshadow,
            None,
            "sudo:!:alice:alice\n",
            "sudo:!:root:ops\n",
        );
        assert_eq!(m.text, "sudo:!:alice,root:alice,ops\n");
    }

    #[test]
    fn keeps_comments_and_odd_lines() {
        let text = "# comment\n\nroot:x:0:0::/:/bin/sh\n+nis\n:odd\n";
        assert_eq!(render(&parse(text)), text);
        let m = merge(Db::Passwd, None, text, "root:x:0:0::/:/bin/sh\n");
        assert!(m.text.contains("# comment\n"), "{}", m.text);
    }

    fn line() -> impl Strategy<Value = String> {
        "[a-z_:#,0-9 \\r]{0,24}"
    }

    fn db_text() -> impl Strategy<Value = String> {
        prop::collection::vec(line(), 0..8)
            .prop_map(|l| l.iter().map(|x| format!("{x}\n")).collect())
    }

    fn db_kind() -> impl Strategy<Value = Db> {
        prop_oneof![
            Just(Db::Passwd),
            Just(Db::Group),
            Just(Db::Shadow),
            Just(Db::Gshadow)
        ]
    }

    proptest! {
        #[test]
        fn parse_render_round_trip(text in db_text()) {
            prop_assert_eq!(render(&parse(&text)), text);
        }

        #[test]
        fn merge_never_loses_a_box_account(
            db in db_kind(),
            base in prop::option::of(db_text()),
            ours in db_text(),
            theirs in db_text(),
        ) {
            let m = merge(db, base.as_deref(), &ours, &theirs);
            let merged = parse(&m.text);
            let names: BTreeSet<&str> = merged.iter().filter_map(Line::name).collect();
            for line in parse(&ours) {
                let Some(name) = line.name() else { continue };
                let removed_unchanged = base.as_deref().is_some_and(|b| {
                    by_name(&parse(b)).contains_key(name)
                        && !by_name(&parse(&theirs)).contains_key(name)
                });
                prop_assert!(names.contains(name) || removed_unchanged, "lost {name}: {}", m.text);
            }
        }

        #[test]
        fn merge_never_panics(
            db in db_kind(),
            base in prop::option::of(".{0,200}"),
            ours in ".{0,200}",
            theirs in ".{0,200}",
        ) {
            let _ = merge(db, base.as_deref(), &ours, &theirs);
        }
    }
}
