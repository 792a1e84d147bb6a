//! The one place that talks to `zfs`: listing snapshots, send, receive, and zvol devices.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::core::version::Version;
use crate::sys::cmd::Cmd;

/// Versions of `zvol`'s snapshots, from `zfs list -H -p -t snapshot -o name,createtxg` output.
/// Snapshots whose names are not versions are ignored. Pure.
pub fn parse_snapshots(zvol: &str, text: &str) -> Vec<Version> {
    let mut out: Vec<Version> = text
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter_map(|name| name.strip_prefix(zvol)?.strip_prefix('@')?.parse().ok())
        .collect();
    out.sort();
    out
}

/// Whether `dataset` exists. A pool that is not imported (or any other failure of `zfs`) is
/// an error, never "absent": that would make prepare receive a full stream into nothing.
pub fn exists(dataset: &str) -> Result<bool> {
    let out = Cmd::new("zfs")
        .args(["list", "-H", "-o", "name", dataset])
        .capture()?;
    if out.status.success() {
        return Ok(true);
    }
    let pool = dataset.split('/').next().unwrap_or(dataset);
    let pool_imported = Cmd::new("zpool")
        .args(["list", "-H", "-o", "name", pool])
        .code()?
        == 0;
    absent_or_error(
        dataset,
        &String::from_utf8_lossy(&out.stderr),
        pool_imported,
    )
}

/// What a failed `zfs list DATASET` means: absent only when zfs says so and the pool is there.
/// Pure.
fn absent_or_error(dataset: &str, stderr: &str, pool_imported: bool) -> Result<bool> {
    let pool = dataset.split('/').next().unwrap_or(dataset);
    if !pool_imported {
        anyhow::bail!("ZFS pool {pool} is not imported (looking for {dataset})");
    }
    if stderr.contains("dataset does not exist") {
        return Ok(false);
    }
    anyhow::bail!("zfs list {dataset} failed: {}", stderr.trim())
}

/// `zfs destroy -r dataset`: the dataset and its snapshots.
pub fn destroy_recursive(dataset: &str) -> Result<()> {
    Cmd::new("zfs").args(["destroy", "-r", dataset]).run()
}

/// `zfs destroy zvol@v`.
pub fn destroy_snapshot(zvol: &str, v: &Version) -> Result<()> {
    Cmd::new("zfs")
        .args(["destroy", &format!("{zvol}@{v}")])
        .run()
}

/// A pool's size and use, in bytes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PoolUsage {
    pub name: String,
    pub size: u64,
    pub allocated: u64,
    pub free: u64,
}

/// `zpool list -Hp -o name,size,allocated,free POOL`.
pub fn pool_usage(pool: &str) -> Result<PoolUsage> {
    let text = Cmd::new("zpool")
        .args(["list", "-H", "-p", "-o", "name,size,allocated,free", pool])
        .stdout()?;
    parse_pool_usage(&text).with_context(|| format!("parsing `zpool list {pool}`: {text:?}"))
}

/// Parses one line of `zpool list -Hp -o name,size,allocated,free`. Pure.
pub fn parse_pool_usage(text: &str) -> Option<PoolUsage> {
    let mut f = text.lines().next()?.split('\t');
    Some(PoolUsage {
        name: f.next()?.to_owned(),
        size: f.next()?.parse().ok()?,
        allocated: f.next()?.parse().ok()?,
        free: f.next()?.parse().ok()?,
    })
}

/// Snapshot versions of a zvol (none when it does not exist).
pub fn snapshots(zvol: &str) -> Result<Vec<Version>> {
    if !exists(zvol)? {
        return Ok(Vec::new());
    }
    let text = Cmd::new("zfs")
        .args([
            "list",
            "-H",
            "-p",
            "-t",
            "snapshot",
            "-o",
            "name,createtxg",
            "-d",
            "1",
            zvol,
        ])
        .stdout()?;
    Ok(parse_snapshots(zvol, &text))
}

/// `zfs send` of `zvol@to`, incremental from `@from` when given.
pub fn send_cmd(zvol: &str, from: Option<&Version>, to: &Version) -> Cmd {
    let cmd = Cmd::new("zfs").arg("send");
    let cmd = match from {
        Some(f) => cmd.args(["-i", &format!("@{f}")]),
        None => cmd,
    };
    cmd.arg(format!("{zvol}@{to}"))
}

/// The length of the full send stream of `zvol@v` (`zfs send -nP`: a dry run, no data read).
pub fn send_size(zvol: &str, v: &Version) -> Result<u64> {
    let out = Cmd::new("zfs")
        .args(["send", "-nP", &format!("{zvol}@{v}")])
        .stdout()?;
    parse_send_size(&out)
        .with_context(|| format!("no size in the output of zfs send -nP {zvol}@{v}: {out:?}"))
}

/// The `size` line of `zfs send -nP`'s output (`size\t123456`).
pub fn parse_send_size(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("size\t"))
        .and_then(|n| n.trim().parse().ok())
}

/// `zfs receive -s -F zvol`: resumable, rolling back anything written since the last snapshot.
pub fn receive_cmd(zvol: &str) -> Cmd {
    Cmd::new("zfs").args(["receive", "-s", "-F", zvol])
}

/// Drops a half-received stream's saved state (after an interruption).
pub fn abort_receive(zvol: &str) -> Result<()> {
    let token = Cmd::new("zfs")
        .args(["get", "-H", "-o", "value", "receive_resume_token", zvol])
        .stdout()
        .unwrap_or_default();
    if !token.trim().is_empty() && token.trim() != "-" {
        Cmd::new("zfs").args(["receive", "-A", zvol]).run()?;
    }
    Ok(())
}

/// Creates `dataset` and its parents if missing.
pub fn ensure_filesystem(dataset: &str) -> Result<()> {
    if !exists(dataset)? {
        Cmd::new("zfs").args(["create", "-p", dataset]).run()?;
    }
    Ok(())
}

/// The block device of a zvol snapshot (made visible on demand: setting it needs the `snapdev`
/// permission, which a server unit need not have when the operator set it), once udev created it.
pub fn snapshot_device(zvol: &str, v: &Version) -> Result<PathBuf> {
    let snapdev = Cmd::new("zfs")
        .args(["get", "-H", "-o", "value", "snapdev", zvol])
        .stdout()?;
    if snapdev.trim() != "visible" {
        Cmd::new("zfs")
            .args(["set", "snapdev=visible", zvol])
            .run()?;
    }
    wait_for_device(PathBuf::from(format!("/dev/zvol/{zvol}@{v}")))
}

/// The block device of a zvol.
pub fn volume_device(zvol: &str) -> Result<PathBuf> {
    wait_for_device(PathBuf::from(format!("/dev/zvol/{zvol}")))
}

/// Waits for udev's `/dev/zvol/...` link. The kernel's `zd*` device can exist without it: after
/// a power cut, the box booted with a snapshot's device and no link (an event udev lost at
/// import), and waiting alone never made it (found by the VM power cuts). So after a first
/// settle, udev is asked to process the zvols' `add` events again; that only (re)creates links.
fn wait_for_device(path: PathBuf) -> Result<PathBuf> {
    let start = Instant::now();
    let mut replayed = Instant::now();
    let _ = Cmd::new("udevadm").args(["settle", "--timeout=5"]).run();
    while !path.exists() {
        if start.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("{} did not appear within 60s", path.display());
        }
        if replayed.elapsed() > Duration::from_secs(2) {
            let _ = Cmd::new("udevadm")
                .args([
                    "trigger",
                    "--action=add",
                    "--subsystem-match=block",
                    "--sysname-match=zd*",
                ])
                .run();
            replayed = Instant::now();
        }
        let _ = Cmd::new("udevadm").args(["settle", "--timeout=5"]).run();
        std::thread::sleep(Duration::from_millis(200));
    }
    path.canonicalize()
        .with_context(|| format!("resolving {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_pool_is_an_error_not_an_absent_dataset() {
        let not_there = "cannot open 'box/upgradectl/image': dataset does not exist\n";
        assert!(!absent_or_error("box/upgradectl/image", not_there, true).unwrap());
        assert!(absent_or_error("box/upgradectl/image", not_there, false).is_err());
        assert!(absent_or_error("box/x", "permission denied", true).is_err());
    }

    #[test]
    fn send_size_parses_the_dry_runs_size_line() {
        let text = "full\tsrv/images/image@2.0\t634563928\nsize\t634563928\n";
        assert_eq!(parse_send_size(text), Some(634563928));
        assert_eq!(parse_send_size("full\tx@1\t5\n"), None);
    }

    #[test]
    fn pool_usage_parses() {
        let u = parse_pool_usage("box\t3154116608\t1002438656\t2151677952\n").unwrap();
        assert_eq!(u.allocated, 1002438656);
        assert!(parse_pool_usage("box\tx\n").is_none());
    }

    #[test]
    fn parses_captured_zfs_list_output() {
        let text = include_str!("../../tests/fixtures/zfs-list-snapshots.txt");
        let got = parse_snapshots("box/upgradectl/image", text);
        assert_eq!(
            got,
            vec!["1.0".parse::<Version>().unwrap(), "2.0".parse().unwrap()]
        );
        assert!(parse_snapshots("other/image", text).is_empty());
    }

    #[test]
    fn send_command_lines() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert_eq!(
            send_cmd("p/i", Some(&v("1.0")), &v("2.0")).display(),
            "zfs send -i @1.0 p/i@2.0"
        );
        assert_eq!(
            send_cmd("p/i", None, &v("2.0")).display(),
            "zfs send p/i@2.0"
        );
    }
}
