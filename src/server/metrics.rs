//! Prometheus metrics (`GET /metrics`, text format 0.0.4): requests by status class and bytes
//! served (counted by a middleware), builds, reports by outcome, each wave rollout's state and
//! the reboot slots held per group.
//! `render` is pure: it formats a `Snapshot` the handler gathers.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use crate::core::report::Outcome;
use crate::fleet::view::RolloutView;

/// What the middleware counts.
#[derive(Debug, Default)]
pub struct Counters {
    /// Responses by status class: 1xx .. 5xx.
    by_class: [AtomicU64; 5],
    /// Response bytes announced by Content-Length (artifact bodies, ranges included).
    bytes: AtomicU64,
}

impl Counters {
    fn record(&self, status: u16, bytes: u64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Responses by status class (`1xx`..`5xx`) and bytes served so far.
    pub fn read(&self) -> ([u64; 5], u64) {
        let classes = std::array::from_fn(|i| self.by_class[i].load(Ordering::Relaxed));
        (classes, self.bytes.load(Ordering::Relaxed))
    }
}

/// The middleware: counts each response and its announced length.
pub async fn count(State(c): State<Arc<Counters>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let bytes = (resp.headers().get(header::CONTENT_LENGTH))
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    c.record(resp.status().as_u16(), bytes);
    resp
}

/// Everything `/metrics` shows, gathered at the request.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub responses: [u64; 5],
    pub bytes: u64,
    pub builds_started: u64,
    pub builds_in_progress: u64,
    /// None: the server runs without the fleet database.
    pub reports: Option<Vec<(Outcome, u64)>>,
    pub rollouts: Vec<RolloutView>,
    /// Reboot slots held now (lease not run out), by group (None: no fleet database).
    pub reboot_slots: Option<Vec<(String, u64)>>,
}

/// Slots held at `now` by group, from the stored holders (a lease that ran out is free).
pub fn held_slots(holders: &[crate::fleet::semaphore::Holder], now: u64) -> Vec<(String, u64)> {
    let mut by_group = std::collections::BTreeMap::<String, u64>::new();
    for h in holders.iter().filter(|h| h.expires > now) {
        *by_group.entry(h.group.clone()).or_default() += 1;
    }
    by_group.into_iter().collect()
}

fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        o,
        "# HELP upgradectl_{name} {help}\n# TYPE upgradectl_{name} {kind}"
    );
}

/// The text exposition of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut o = String::new();
    family(
        &mut o,
        "http_responses_total",
        "counter",
        "HTTP responses by status class.",
    );
    for (i, n) in s.responses.iter().enumerate() {
        let _ = writeln!(
            o,
            "upgradectl_http_responses_total{{class=\"{}xx\"}} {n}",
            i + 1
        );
    }
    family(
        &mut o,
        "http_response_bytes_total",
        "counter",
        "Bytes of response bodies.",
    );
    let _ = writeln!(o, "upgradectl_http_response_bytes_total {}", s.bytes);
    family(
        &mut o,
        "builds_started_total",
        "counter",
        "Artifact builds started.",
    );
    let _ = writeln!(o, "upgradectl_builds_started_total {}", s.builds_started);
    family(
        &mut o,
        "builds_in_progress",
        "gauge",
        "Builds running or waiting.",
    );
    let _ = writeln!(o, "upgradectl_builds_in_progress {}", s.builds_in_progress);
    if let Some(reports) = &s.reports {
        family(&mut o, "reports", "gauge", "Stored box reports by outcome.");
        for o_ in Outcome::ALL {
            let n = reports
                .iter()
                .find(|(x, _)| *x == o_)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(o, "upgradectl_reports{{outcome=\"{}\"}} {n}", o_.as_str());
        }
    }
    if let Some(slots) = &s.reboot_slots {
        family(
            &mut o,
            "reboot_slots_held",
            "gauge",
            "FleetLock reboot slots held now, by group.",
        );
        for (group, n) in slots {
            let _ = writeln!(o, "upgradectl_reboot_slots_held{{group=\"{group}\"}} {n}");
        }
    }
    if s.rollouts.is_empty() {
        return o;
    }
    family(
        &mut o,
        "rollout_stage",
        "gauge",
        "Current stage of a wave rollout (from 0).",
    );
    family(
        &mut o,
        "rollout_percent",
        "gauge",
        "Current wave percentage of its group.",
    );
    family(
        &mut o,
        "rollout_paused",
        "gauge",
        "1 if paused or withdrawn.",
    );
    family(
        &mut o,
        "rollout_boxes",
        "gauge",
        "Distinct boxes by outcome.",
    );
    for r in &s.rollouts {
        let v = &r.version;
        let paused = u8::from(r.paused.is_some() || r.withdrawn);
        let _ = writeln!(o, "upgradectl_rollout_stage{{version=\"{v}\"}} {}", r.stage);
        let _ = writeln!(
            o,
            "upgradectl_rollout_percent{{version=\"{v}\"}} {}",
            r.percent
        );
        let _ = writeln!(o, "upgradectl_rollout_paused{{version=\"{v}\"}} {paused}");
        for (outcome, n) in &r.boxes {
            let _ = writeln!(
                o,
                "upgradectl_rollout_boxes{{version=\"{v}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_the_exposition() {
        let c = Counters::default();
        c.record(200, 100);
        c.record(503, 0);
        c.record(206, 50);
        let (responses, bytes) = c.read();
        assert_eq!((responses, bytes), ([0, 2, 0, 0, 1], 150));
        let holder = |group: &str, expires| crate::fleet::semaphore::Holder {
            node: "n".into(),
            group: group.into(),
            expires,
        };
        let holders = [holder("a", 20), holder("a", 30), holder("b", 5)];
        let s = Snapshot {
            responses,
            bytes,
            reports: Some(vec![(Outcome::Fallback, 3)]),
            reboot_slots: Some(held_slots(&holders, 10)),
            ..Snapshot::default()
        };
        let text = render(&s);
        assert!(text.contains("upgradectl_http_responses_total{class=\"2xx\"} 2\n"));
        assert!(text.contains("upgradectl_http_response_bytes_total 150\n"));
        assert!(text.contains("upgradectl_reports{outcome=\"fallback\"} 3\n"));
        assert!(text.contains("upgradectl_reports{outcome=\"confirmed\"} 0\n"));
        assert!(text.contains("upgradectl_reboot_slots_held{group=\"a\"} 2\n"));
        assert!(
            !text.contains("group=\"b\""),
            "a lease that ran out is a free slot"
        );
        assert!(
            !text.contains("rollout"),
            "no rollouts, no rollout families"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
    }
}
