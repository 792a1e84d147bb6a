//! Health checks run by `confirm`: configured commands that must exit 0 within their timeout.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::appliance::config::HealthCheck;
use crate::sys::cmd::Cmd;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    pub seconds: f64,
}

/// Runs one check, killing it at its timeout.
pub fn run_check(check: &HealthCheck) -> Result<CheckResult> {
    let start = Instant::now();
    let cmd = Cmd::new(&check.command[0]).args(&check.command[1..]);
    let mut child = cmd
        .to_command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting health check {}: {}", check.name, cmd.display()));
    let timeout = Duration::from_secs(check.timeout_seconds);
    let (ok, detail) = match child.as_mut() {
        Err(e) => (false, format!("{e:#}")),
        Ok(child) => loop {
            if let Some(status) = child.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut s) = child.stderr.take() {
                    use std::io::Read;
                    let _ = s.read_to_string(&mut stderr);
                }
                let detail = match status.code() {
                    Some(0) => "passed".to_owned(),
                    Some(c) if stderr.trim().is_empty() => format!("exited with {c}"),
                    Some(c) => format!("exited with {c}: {}", stderr.trim()),
                    None => "killed by a signal".to_owned(),
                };
                break (status.success(), detail);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                break (false, format!("timed out after {}s", check.timeout_seconds));
            }
            std::thread::sleep(Duration::from_millis(50));
        },
    };
    Ok(CheckResult {
        name: check.name.clone(),
        ok,
        detail,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Runs all checks (all of them, so the report is complete).
pub fn run_all(checks: &[HealthCheck]) -> Result<Vec<CheckResult>> {
    checks.iter().map(run_check).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cmd: &[&str], timeout: u64) -> HealthCheck {
        HealthCheck {
            name: "t".into(),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            timeout_seconds: timeout,
        }
    }

    #[test]
    fn pass_fail_timeout_and_missing() {
        assert!(run_check(&check(&["true"], 5)).unwrap().ok);
        let r = run_check(&check(&["sh", "-c", "echo sick >&2; exit 4"], 5)).unwrap();
        assert!(!r.ok && r.detail.contains("exited with 4: sick"), "{r:?}");
        let r = run_check(&check(&["sleep", "5"], 0)).unwrap();
        assert!(!r.ok && r.detail.contains("timed out"), "{r:?}");
        assert!(!run_check(&check(&["/no/such/check"], 5)).unwrap().ok);
    }
}
