//! The operator's dashboard, `GET /fleet` (`/` redirects there): one server-rendered HTML page
//! of `fleet::view` (each release's rollout, why it is paused, boxes by version, who holds a
//! reboot slot), with inline
//! CSS, no script and no external asset, never cached. `render` is pure. Markup is written only
//! from `&'static str`; everything else (versions, group labels that boxes chose, pause
//! reasons) goes through `Html::text`, which escapes it.

use std::fmt::Display;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::respond::{internal, with_db};
use crate::core::report::Outcome;
use crate::fleet::store::Db;
use crate::fleet::view::{self, FleetView, RolloutView, State as RolloutState};
use crate::sys::clock::now;

/// Reloads itself this often (seconds): a meta refresh, no script.
const REFRESH_SECS: u32 = 30;

/// Nothing but inline style; an injected script or outside resource would not run or load
/// even if escaping failed.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'";

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:2em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.2em;margin:0 0 .4em}\
section{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}\
.state{display:inline-block;padding:0 .5em;border-radius:4px;color:#fff;font-size:.85em}\
.state.advancing{background:#2a7ab0}.state.complete{background:#2e8b57}\
.state.paused{background:#c0392b}.state.withdrawn{background:#555}\
section.paused{border:2px solid #c0392b}section.withdrawn{border:2px solid #555}\
.reason{font-weight:bold;color:#c0392b}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;\
text-align:left}ol.stages li.done{color:#888}ol.stages li.current{font-weight:bold}\
.muted{color:#777}";

/// The dashboard's routes over the fleet database.
pub fn router(db: Arc<Mutex<Db>>) -> Router {
    Router::new()
        .route("/fleet", get(get_fleet))
        .route("/", get(|| async { Redirect::to("/fleet") }))
        .with_state(db)
}

async fn get_fleet(State(db): State<Arc<Mutex<Db>>>) -> Response {
    match with_db(db, view::fleet).await {
        Ok(v) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                (header::CONTENT_SECURITY_POLICY, CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            render(&v, now()),
        )
            .into_response(),
        Err(e) => internal("reading the fleet database for the dashboard", e),
    }
}

/// An HTML document being written: markup only from literals, text always escaped.
struct Html(String);

impl Html {
    fn raw(&mut self, markup: &'static str) -> &mut Html {
        self.0.push_str(markup);
        self
    }

    /// `t` as HTML text (also safe inside a quoted attribute).
    fn text(&mut self, t: impl Display) -> &mut Html {
        for c in t.to_string().chars() {
            match c {
                '&' => self.0.push_str("&amp;"),
                '<' => self.0.push_str("&lt;"),
                '>' => self.0.push_str("&gt;"),
                '"' => self.0.push_str("&quot;"),
                '\'' => self.0.push_str("&#39;"),
                c => self.0.push(c),
            }
        }
        self
    }

    /// A table row of cells, each escaped.
    fn row(&mut self, cells: &[&dyn Display]) -> &mut Html {
        self.raw("<tr>");
        for c in cells {
            self.raw("<td>").text(c).raw("</td>");
        }
        self.raw("</tr>\n")
    }
}

/// Unix seconds `t` as UTC date and time, and how long before `now` it was.
fn when(t: u64, now: u64) -> String {
    let at = utc(t);
    let s = now.saturating_sub(t);
    let ago = match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    };
    format!("{at} ({ago} ago)")
}

/// The page for `v`, rendered at `now`.
pub fn render(v: &FleetView, now: u64) -> String {
    let mut h = Html(String::new());
    h.raw("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta http-equiv=\"refresh\" content=\"")
        .text(REFRESH_SECS)
        .raw("\"><title>upgradectl fleet</title><style>")
        .raw(STYLE)
        .raw("</style></head>\n<body>\n<h1>Fleet</h1>\n<p class=\"muted\">as of ")
        .text(when(now, now))
        .raw("</p>\n<h2>Releases</h2>\n");
    if v.rollouts.is_empty() {
        h.raw("<p class=\"muted\">No wave rollouts.</p>\n");
    }
    for r in &v.rollouts {
        rollout(&mut h, r, now);
    }
    h.raw("<section id=\"versions\"><h2>Boxes by version</h2>\n")
        .raw("<p class=\"muted\">Each enrolled box counts once, on the version its latest ")
        .raw("report leaves it on.</p>\n");
    if v.versions.is_empty() {
        h.raw("<p class=\"muted\">No boxes enrolled.</p>\n");
    } else {
        h.raw("<table><tr><th>version</th><th>boxes</th><th>by group</th></tr>\n");
        for ver in &v.versions {
            let groups: Vec<String> = (ver.groups.iter())
                .map(|(g, n)| format!("{}: {n}", if g.is_empty() { "(none)" } else { g }))
                .collect();
            let name = ver.version.as_deref().unwrap_or("unknown");
            h.row(&[&name, &ver.boxes, &groups.join(", ")]);
        }
        h.raw("</table>\n");
    }
    h.raw("</section>\n<section id=\"reboot-slots\"><h2>Reboot slots</h2>\n")
        .raw("<p class=\"muted\">FleetLock: the boxes that may reboot into a new image now, ")
        .raw("until they report steady state or their lease runs out.</p>\n");
    if v.reboot_slots.is_empty() {
        h.raw("<p class=\"muted\">No box holds a reboot slot.</p>\n");
    } else {
        h.raw("<table><tr><th>box</th><th>group</th><th>lease</th></tr>\n");
        for s in &v.reboot_slots {
            let group = if s.group.is_empty() {
                "(none)"
            } else {
                &s.group
            };
            let lease = match s.expires > now {
                true => format!("runs out {}", when_ahead(s.expires, now)),
                false => format!("ran out {} (the slot is free)", when(s.expires, now)),
            };
            h.row(&[&s.node, &group, &lease]);
        }
        h.raw("</table>\n");
    }
    h.raw("</section>\n</body></html>\n");
    h.0
}

/// Unix seconds `t` (after `now`) as UTC date and time, and how long from `now`.
fn when_ahead(t: u64, now: u64) -> String {
    format!("{} (in {} min)", utc(t), t.saturating_sub(now).div_ceil(60))
}

/// Unix seconds `t` as UTC date and time (RFC 3339), or the number when out of range.
fn utc(t: u64) -> String {
    OffsetDateTime::from_unix_timestamp(t as i64)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

fn rollout(h: &mut Html, r: &RolloutView, now: u64) {
    let class = r.state.as_str();
    h.raw("<section class=\"rollout ")
        .raw(class)
        .raw("\"><h2>")
        .text(&r.version)
        .raw(" <span class=\"state ")
        .raw(class)
        .raw("\">")
        .raw(class)
        .raw("</span></h2>\n");
    let group = r.group.as_deref().unwrap_or("every other box");
    match (r.state, &r.paused) {
        (RolloutState::Withdrawn, _) => {
            h.raw("<p class=\"reason\">Withdrawn since ")
                .text(when(r.updated, now))
                .raw(": offered to nobody new, for good.</p>\n");
        }
        (_, Some(reason)) => {
            h.raw("<p class=\"reason\">Paused since ")
                .text(when(r.updated, now))
                .raw(": ")
                .text(reason)
                .raw("</p>\n");
        }
        _ => {}
    }
    h.raw("<p>Stage ")
        .text(r.stage + 1)
        .raw(" of ")
        .text(r.policy.stages())
        .raw(": <b>")
        .text(group)
        .raw(" at ")
        .text(r.percent)
        .raw("%</b>, since ")
        .text(when(r.since, now))
        .raw("</p>\n<ol class=\"stages\">");
    for i in 0..r.policy.stages() {
        let (g, pct) = r.policy.stage(i);
        h.raw(match i.cmp(&r.stage) {
            std::cmp::Ordering::Less => "<li class=\"done\">",
            std::cmp::Ordering::Equal => "<li class=\"current\">",
            std::cmp::Ordering::Greater => "<li class=\"pending\">",
        })
        .text(g.unwrap_or("every other box"))
        .raw(" at ")
        .text(pct)
        .raw("%</li>");
    }
    h.raw("</ol>\n<p>Failure rate since ")
        .text(when(r.counting_since, now))
        .raw(": ");
    match r.failure_rate {
        Some(rate) => h
            .text(format!(
                "{:.1}% ({} of {} finished boxes failed)",
                rate * 100.0,
                r.failures,
                r.finished
            ))
            .raw("</p>\n"),
        None => h.raw("none finished yet</p>\n"),
    };
    let p = &r.policy;
    h.raw("<p class=\"muted\">Pauses at ")
        .text(format!(
            "{} failures before {} finished, then above {:.1}%; a stage soaks {} s and needs at \
             least {} boxes that confirmed.",
            p.max_failures,
            p.min_sample,
            p.max_failure_rate * 100.0,
            p.soak_secs,
            p.min_successes
        ))
        .raw("</p>\n<table class=\"outcomes\"><tr><th>boxes</th>");
    for o in Outcome::ALL {
        h.raw("<th>").text(o.as_str()).raw("</th>");
    }
    h.raw("</tr>\n");
    let counts: Vec<u32> = (Outcome::ALL.iter())
        .map(|o| r.boxes.get(o.as_str()).copied().unwrap_or(0))
        .collect();
    let mut cells: Vec<&dyn Display> = vec![&"distinct"];
    cells.extend(counts.iter().map(|n| n as &dyn Display));
    h.row(&cells);
    h.raw("</table></section>\n");
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::fleet::rollout::Policy;
    use crate::fleet::view::VersionView;

    fn paused(reason: &str) -> RolloutView {
        RolloutView {
            version: "2.0".into(),
            policy: Policy {
                groups: vec!["<b>zone</b>".into()],
                ..Policy::default()
            },
            stage: 1,
            group: Some("<b>zone</b>".into()),
            percent: 5,
            since: 1000,
            state: RolloutState::Paused,
            paused: Some(reason.into()),
            withdrawn: false,
            updated: 1500,
            boxes: BTreeMap::from([("fallback", 2), ("confirmed", 1)]),
            counting_since: 900,
            finished: 3,
            failures: 2,
            failure_rate: Some(2.0 / 3.0),
        }
    }

    #[test]
    fn every_database_string_is_escaped() {
        let v = FleetView {
            rollouts: vec![paused("2 boxes failed <img src=x onerror=alert(1)>")],
            versions: vec![VersionView {
                version: Some("2.0".into()),
                boxes: 3,
                groups: BTreeMap::from([("<script>alert(\"x\")</script>".into(), 3)]),
            }],
            reboot_slots: vec![],
        };
        let html = render(&v, 1600);
        for hostile in ["<script>", "<img", "<b>zone"] {
            assert!(!html.contains(hostile), "{hostile} unescaped in\n{html}");
        }
        assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;: 3"));
        assert!(html.contains("2 boxes failed &lt;img src=x onerror=alert(1)&gt;"));
        assert!(html.contains("Paused since 1970-01-01T00:25:00Z (100 s ago)"));
        assert!(html.contains("66.7% (2 of 3 finished boxes failed)"));
        assert!(html.contains("<li class=\"current\">&lt;b&gt;zone&lt;/b&gt; at 5%</li>"));
    }

    #[test]
    fn reboot_slots_show_who_holds_them_and_leases_that_ran_out() {
        use crate::fleet::semaphore::Holder;
        let v = FleetView {
            rollouts: vec![],
            versions: vec![],
            reboot_slots: vec![
                Holder {
                    node: "box-<7>".into(),
                    group: "zone-a".into(),
                    expires: 5000,
                },
                Holder {
                    node: "box-8".into(),
                    group: String::new(),
                    expires: 1000,
                },
            ],
        };
        let html = render(&v, 1600);
        assert!(html.contains("<td>box-&lt;7&gt;</td><td>zone-a</td><td>runs out 1970-01-01T01:23:20Z (in 57 min)</td>"), "{html}");
        assert!(html.contains("<td>box-8</td><td>(none)</td><td>ran out 1970-01-01T00:16:40Z (10 min ago) (the slot is free)</td>"), "{html}");
    }

    #[test]
    fn an_empty_fleet_says_so() {
        let html = render(
            &FleetView {
                rollouts: vec![],
                versions: vec![],
                reboot_slots: vec![],
            },
            0,
        );
        assert!(html.contains("No wave rollouts.") && html.contains("No boxes enrolled."));
        assert!(html.contains("No box holds a reboot slot."));
    }
}
