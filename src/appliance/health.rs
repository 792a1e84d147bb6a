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

/// How much of a check's stderr the report keeps (the rest is read and dropped).
const STDERR_KEEP: usize = 4096;

/// Runs one check in its own process group, killing the group at its timeout. Its stderr is
/// drained on a thread, so a check that writes more than a pipe holds never blocks.
pub fn run_check(check: &HealthCheck) -> Result<CheckResult> {
    use std::os::unix::process::CommandExt;
    let start = Instant::now();
    let cmd = Cmd::new(&check.command[0]).args(&check.command[1..]);
    let spawned = cmd
        .to_command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting health check {}: {}", check.name, cmd.display()));
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Ok(result(check, start, false, format!("{e:#}"))),
    };
    let stderr = drain(child.stderr.take().expect("piped"));
    let timeout = Duration::from_secs(check.timeout_seconds);
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let kill_group = || {
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                kill_group();
                let _ = child.wait();
                let detail = format!("timed out after {}s", check.timeout_seconds);
                return Ok(result(check, start, false, detail));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                kill_group();
                let _ = child.wait();
                return Err(e).with_context(|| format!("waiting for health check {}", check.name));
            }
        }
    };
    // Whatever the check left running must not outlive it either.
    kill_group();
    let stderr = stderr
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default();
    let detail = match status.code() {
        Some(0) => "passed".to_owned(),
        Some(c) if stderr.trim().is_empty() => format!("exited with {c}"),
        Some(c) => format!("exited with {c}: {}", stderr.trim()),
        None => "killed by a signal".to_owned(),
    };
    Ok(result(check, start, status.success(), detail))
}

/// Reads a pipe to its end on a thread; sends the first `STDERR_KEEP` bytes as text.
fn drain(mut pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = STDERR_KEEP.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        let _ = tx.send(String::from_utf8_lossy(&kept).into_owned());
    });
    rx
}

fn result(check: &HealthCheck, start: Instant, ok: bool, detail: String) -> CheckResult {
    CheckResult {
        name: check.name.clone(),
        ok,
        detail,
        seconds: start.elapsed().as_secs_f64(),
    }
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

    /// A check that writes more than a pipe holds must not block and "time out".
    #[test]
    fn a_chatty_check_passes() {
        let r = run_check(&check(
            &[
                "sh",
                "-c",
                "head -c 300000 /dev/zero | tr '\\0' x >&2; exit 0",
            ],
            10,
        ))
        .unwrap();
        assert!(r.ok, "{r:?}");
    }

    /// At its timeout the check's whole process group goes, grandchildren included.
    #[test]
    fn a_timeout_kills_the_checks_children() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("alive");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let r = run_check(&check(&["sh", "-c", &script], 1)).unwrap();
        assert!(!r.ok && r.detail.contains("timed out"), "{r:?}");
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !marker.exists(),
            "a child of the check outlived its timeout"
        );
    }
}
