//! When `upgrade` may switch (the timer runs it; `--now` skips this): inside the maintenance
//! window (`[reboot] window`), with every busy check saying the box may reboot (exit 0), and
//! with no other program holding a systemd inhibitor lock that blocks shutdown or sleep. The
//! reasons to wait are words for the refusal and for `status`.

use anyhow::Result;
use serde::Deserialize;

use crate::appliance::config::{HealthCheck, RebootConfig};
use crate::appliance::ctx::Ctx;
use crate::appliance::health;
use crate::appliance::window;
use crate::sys::clock::local_minute_of_day;
use crate::sys::cmd::{installed, Cmd};

/// How long one busy check may run before it counts as busy.
const BUSY_CHECK_TIMEOUT: u64 = 30;

/// Why the box should not switch now; empty: it may.
pub fn reasons(ctx: &Ctx) -> Result<Vec<String>> {
    let r = &ctx.config.reboot;
    let mut out = Vec::new();
    out.extend(outside_window(r, local_minute_of_day()));
    out.extend(busy(r)?);
    if r.honour_inhibitors.unwrap_or(true) && ctx.live() {
        out.extend(inhibitors().into_iter().map(|i| i.to_string()));
    }
    Ok(out)
}

/// Why `minute` (local) is outside the window, if it is.
fn outside_window(r: &RebootConfig, minute: u16) -> Option<String> {
    // The configuration was checked when it was loaded.
    let ranges = window::parse(&r.window).unwrap_or_default();
    (!window::open(&ranges, minute)).then(|| {
        format!(
            "outside the maintenance window ({} local; window {})",
            window::clock(minute),
            r.window.join(", ")
        )
    })
}

/// The busy checks that say "busy", with what they said.
fn busy(r: &RebootConfig) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for argv in &r.busy_checks {
        let check = HealthCheck {
            name: argv.join(" "),
            command: argv.clone(),
            timeout_seconds: BUSY_CHECK_TIMEOUT,
        };
        let result = health::run_check(&check)?;
        if !result.ok {
            out.push(format!("busy: {} ({})", check.name, result.detail));
        }
    }
    Ok(out)
}

/// An inhibitor lock another program holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inhibitor {
    pub what: String,
    pub who: String,
    pub why: String,
}

impl std::fmt::Display for Inhibitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "inhibited: {} blocks {} ({})",
            self.who, self.what, self.why
        )
    }
}

/// `busctl --json=short call ... ListInhibitors`'s answer: `a(ssssuu)`, each (what, who, why,
/// mode, uid, pid).
#[derive(Deserialize)]
struct Listed {
    data: (Vec<Listing>,),
}

/// One inhibitor as logind lists it: what, who, why, mode, uid, pid.
type Listing = (String, String, String, String, u32, u32);

/// The inhibitors in `json` that block (`mode` block, not delay) shutdown or sleep.
pub fn parse_inhibitors(json: &str) -> Result<Vec<Inhibitor>> {
    let listed: Listed = serde_json::from_str(json)?;
    let blocks = |what: &str| what.split(':').any(|w| w == "shutdown" || w == "sleep");
    Ok((listed.data.0.into_iter())
        .filter(|(what, _, _, mode, _, _)| mode == "block" && blocks(what))
        .map(|(what, who, why, ..)| Inhibitor { what, who, why })
        .collect())
}

/// The blocking inhibitors logind knows. Without busctl, or without logind to ask (nobody can
/// hold an inhibitor then), none.
fn inhibitors() -> Vec<Inhibitor> {
    if !installed("busctl") {
        tracing::debug!("busctl is not installed: no inhibitor locks are read");
        return Vec::new();
    }
    let listed = Cmd::new("busctl")
        .args([
            "--json=short",
            "call",
            "org.freedesktop.login1",
            "/org/freedesktop/login1",
        ])
        .args(["org.freedesktop.login1.Manager", "ListInhibitors"])
        .stdout()
        .and_then(|json| parse_inhibitors(&json));
    listed.unwrap_or_else(|e| {
        tracing::info!("reading systemd's inhibitor locks (taken as none): {e:#}");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_blocking_shutdown_or_sleep_inhibitors_count() {
        let json = include_str!("../../tests/fixtures/busctl-list-inhibitors.json");
        let found = parse_inhibitors(json).unwrap();
        let who: Vec<&str> = found.iter().map(|i| i.who.as_str()).collect();
        assert_eq!(who, ["backup-agent", "apt"], "{found:?}");
        assert!(found[0].to_string().contains("nightly backup"));
        assert!(parse_inhibitors("{}").is_err());
    }

    #[test]
    fn the_window_and_busy_checks_give_their_reasons() {
        let r = RebootConfig {
            window: vec!["01:00-05:00".into()],
            busy_checks: vec![
                vec!["true".into()],
                vec![
                    "sh".into(),
                    "-c".into(),
                    "echo backing up >&2; exit 1".into(),
                ],
                vec!["/nonexistent/check".into()],
            ],
            ..RebootConfig::default()
        };
        assert_eq!(outside_window(&r, 2 * 60), None);
        let why = outside_window(&r, 12 * 60 + 5).unwrap();
        assert!(
            why.contains("12:05") && why.contains("01:00-05:00"),
            "{why}"
        );
        assert_eq!(outside_window(&RebootConfig::default(), 12 * 60), None);
        let busy = busy(&r).unwrap();
        assert_eq!(busy.len(), 2, "{busy:?}");
        assert!(busy[0].contains("backing up"), "{busy:?}");
        assert!(busy[1].contains("/nonexistent/check"), "{busy:?}");
    }
}
