//! What booted: the kernel command line and the initramfs's boot report.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::appliance::paths::Layout;
use crate::core::version::Version;

/// The initramfs's account of a boot (`key=value` lines, see docs/boot-chain.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BootReport {
    pub requested: Option<String>,
    pub booted: Option<String>,
    pub fallback: bool,
    /// The failure happened in an earlier boot, whose initramfs rebooted into the fallback's
    /// own entry (so the fallback runs its own kernel).
    pub redirected: bool,
    pub reason: Option<String>,
    pub fsck: Option<i32>,
}

impl BootReport {
    pub fn parse(text: &str) -> BootReport {
        let kv: BTreeMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let s = |k: &str| kv.get(k).filter(|v| !v.is_empty()).map(|v| v.to_string());
        BootReport {
            requested: s("requested"),
            booted: s("booted"),
            fallback: kv.get("fallback") == Some(&"1"),
            redirected: kv.get("redirected") == Some(&"1"),
            reason: s("reason"),
            fsck: kv.get("fsck").and_then(|v| v.parse().ok()),
        }
    }

    pub fn booted_version(&self) -> Option<Version> {
        version_of_image_path(self.booted.as_deref()?)
    }

    pub fn read(path: &Path) -> Result<Option<BootReport>> {
        match std::fs::read_to_string(path) {
            Ok(t) => Ok(Some(BootReport::parse(&t))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// `/images/415.0.img` → `415.0`.
pub fn version_of_image_path(p: &str) -> Option<Version> {
    Version::from_image_file_name(p.rsplit('/').next()?)
}

/// The value of `key=` on a kernel command line.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .next_back()
}

/// What this boot is running, as far as the box can tell.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Booted {
    /// The image running now, if the box booted an image.
    pub version: Option<Version>,
    /// The image GRUB asked for (differs from `version` after an initramfs fallback).
    pub requested: Option<Version>,
    /// The host partition's UUID from `root=UUID=`.
    pub host_uuid: Option<String>,
    /// This boot's initramfs report, if any.
    pub report: Option<BootReport>,
}

impl Booted {
    pub fn detect(layout: &Layout) -> Result<Booted> {
        let cmdline = match std::fs::read_to_string(layout.proc_cmdline()) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).context("reading the kernel command line"),
        };
        let requested = cmdline_value(&cmdline, "upgradectl.image").and_then(version_of_image_path);
        let host_uuid = cmdline_value(&cmdline, "root")
            .and_then(|r| r.strip_prefix("UUID="))
            .map(str::to_owned);
        let report = BootReport::read(&layout.run_boot_report())?;
        let version = report
            .as_ref()
            .and_then(BootReport::booted_version)
            .or_else(|| requested.clone());
        Ok(Booted {
            version,
            requested,
            host_uuid,
            report,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cmdline() {
        let c = "BOOT_IMAGE=(loop)/vmlinuz root=UUID=ab-cd rw upgradectl.image=/images/2.0.img upgradectl.fallback=/images/1.0.img panic=10";
        assert_eq!(
            cmdline_value(c, "upgradectl.image"),
            Some("/images/2.0.img")
        );
        assert_eq!(cmdline_value(c, "root"), Some("UUID=ab-cd"));
        assert_eq!(cmdline_value(c, "loop"), None);
        assert_eq!(
            version_of_image_path("/images/2.0.img"),
            Some("2.0".parse().unwrap())
        );
    }

    #[test]
    fn parses_a_fallback_report() {
        let r = BootReport::parse(
            "requested=/images/3.0.img\nbooted=/images/2.0.img\nfallback=1\nredirected=1\nreason=fsck\nfsck=0\n",
        );
        assert!(r.fallback);
        assert!(r.redirected);
        assert_eq!(r.reason.as_deref(), Some("fsck"));
        assert_eq!(r.booted_version(), Some("2.0".parse().unwrap()));
        assert_eq!(r.fsck, Some(0));
    }
}
