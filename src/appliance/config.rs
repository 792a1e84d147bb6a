//! `upgradectl.toml`: the image's configuration, merged with an optional box-specific override
//! on the host partition. Unknown keys and wrong types are errors naming the key and the file.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;

use crate::core::manifest::CHANNELS;
pub use crate::error::ConfigError;

/// Where the image's configuration lives.
pub const IMAGE_CONFIG: &str = "/etc/upgradectl/upgradectl.toml";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Base URL of the image server.
    pub server: Option<String>,
    /// Release channel followed: stable, candidate, beta or edge.
    pub channel: String,
    /// Where the host partition is mounted inside a booted image.
    pub host_mount: PathBuf,
    /// ZFS dataset (a zvol is created under it) that receives images on the box.
    pub dataset: String,
    /// Free space kept on the host partition beyond a new image, in MiB.
    pub space_margin_mib: u64,
    /// Images kept beyond booted, default, previous and prepared.
    pub keep_extra_images: usize,
    /// Stable identity for rollout bucketing; default: /etc/machine-id.
    pub box_id: Option<String>,
    /// The box's group or zone label, for rollouts that go group by group and for reports.
    pub group: Option<String>,
    pub grub: GrubConfig,
    pub migrate: MigrateConfig,
    pub health: Vec<HealthCheck>,
    pub trust: TrustConfig,
    pub download: DownloadConfig,
    pub reboot: RebootConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrubConfig {
    /// Extra kernel arguments for every image (e.g. `console=ttyS0`).
    pub kernel_args: String,
    /// A boot that dies reboots after this many seconds (`panic=N`).
    pub panic_seconds: u32,
    /// Menu timeout.
    pub timeout_seconds: u32,
    /// The host partition's filesystem UUID; default: `root=UUID=` of the running kernel.
    pub host_uuid: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MigrateConfig {
    /// Absolute paths, directories or globs copied from the running image into the new one.
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub name: String,
    /// argv of the check; exit 0 means healthy.
    pub command: Vec<String>,
    #[serde(default = "default_check_timeout")]
    pub timeout_seconds: u64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// The TUF root metadata the image ships (`root.json`), where trust starts on a box that
    /// has not followed a newer root yet (see `appliance::trust`).
    pub root: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    /// Abort when the transfer stays below `min_speed_bytes` per second for this long.
    pub stall_seconds: u64,
    pub min_speed_bytes: u64,
    /// Longest `--wait` sleeps for "come back later", in total.
    pub max_wait_seconds: u64,
    /// Most memory decompressing an artifact may take, MiB (fewer decoder threads first, then
    /// the artifact is refused): an artifact the online artifacts key listed cannot make the
    /// box allocate more. A longer `zstd-ref` frame is decoded on disk (`sys::refcodec::OnDisk`).
    pub max_decoder_mib: u64,
}

/// When `upgrade` may switch and reboot (see `appliance::gate`, `appliance::rebootlock`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RebootConfig {
    /// Base URL of a FleetLock server (`upgradectl serve`, airlock...): `upgrade` takes a
    /// reboot slot of the box's group before it arms a trial, `confirm` gives it back.
    pub fleetlock_url: Option<String>,
    /// Local time ranges `HH:MM-HH:MM` (may cross midnight) in which `upgrade` switches;
    /// empty: any time.
    pub window: Vec<String>,
    /// Commands that exit 0 when the box may reboot now; any other exit, a timeout or failing
    /// to start means busy.
    pub busy_checks: Vec<Vec<String>>,
    /// Wait while another program holds a systemd inhibitor lock on shutdown or sleep
    /// (default true).
    pub honour_inhibitors: Option<bool>,
}

fn default_check_timeout() -> u64 {
    60
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: None,
            channel: "stable".into(),
            host_mount: "/host".into(),
            dataset: "upgradectl".into(),
            space_margin_mib: 256,
            keep_extra_images: 0,
            box_id: None,
            group: None,
            grub: GrubConfig::default(),
            migrate: MigrateConfig::default(),
            health: Vec::new(),
            trust: TrustConfig::default(),
            download: DownloadConfig::default(),
            reboot: RebootConfig::default(),
        }
    }
}

impl Default for GrubConfig {
    fn default() -> Self {
        GrubConfig {
            kernel_args: String::new(),
            panic_seconds: 10,
            timeout_seconds: 3,
            host_uuid: None,
        }
    }
}

impl Default for MigrateConfig {
    fn default() -> Self {
        MigrateConfig {
            paths: [
                "/etc/hostname",
                "/etc/hosts",
                "/etc/machine-id",
                "/etc/passwd",
                "/etc/shadow",
                "/etc/group",
                "/etc/gshadow",
                "/etc/ssh/ssh_host_*",
                "/etc/network/interfaces",
                "/etc/network/interfaces.d",
                "/etc/netplan",
                "/etc/upgradectl/box.toml",
                "/etc/hostid",
                "/etc/zfs/zpool.cache",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            stall_seconds: 60,
            min_speed_bytes: 1024,
            max_wait_seconds: 3600,
            max_decoder_mib: 256,
        }
    }
}

impl Config {
    /// Loads the image's configuration under `root` (defaults when absent), then merges the
    /// box-specific override found on the host partition.
    pub fn load(root: &Path) -> Result<Config> {
        let image_file = crate::appliance::paths::under(root, IMAGE_CONFIG);
        let mut value = read_table(&image_file)?.unwrap_or_default();
        let host_mount = value
            .get("host_mount")
            .and_then(|v| v.as_str())
            .unwrap_or("/host")
            .to_owned();
        let layout = crate::appliance::paths::Layout::new(root, Path::new(&host_mount));
        let override_file = layout.host_config();
        let mut blame = image_file.clone();
        if let Some(over) = read_table(&override_file)? {
            if over.contains_key("host_mount") {
                return Err(ConfigError {
                    file: override_file,
                    message: "host_mount can only be set in the image's configuration".into(),
                }
                .into());
            }
            merge(&mut value, over);
            blame = override_file;
        }
        Self::from_table(value, &blame)
    }

    /// Parses one file's text (used by `load` and tests).
    pub fn parse(text: &str, file: &Path) -> Result<Config> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_table(table, file)
    }

    fn from_table(table: toml::Table, file: &Path) -> Result<Config> {
        let bad = |message: String| ConfigError {
            file: file.to_owned(),
            message,
        };
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    bad(inner.message().to_owned())
                } else {
                    bad(format!("{path}: {}", inner.message()))
                }
            })?;
        if !CHANNELS.contains(&config.channel.as_str()) {
            return Err(bad(format!(
                "channel: {:?} is not one of {}",
                config.channel,
                CHANNELS.join(", ")
            ))
            .into());
        }
        if let Some(g) = &config.group {
            let ok = (1..=128).contains(&g.len())
                && g.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad(format!(
                    "group: {g:?} is not 1..=128 letters, digits, '.', '_' or '-'"
                ))
                .into());
            }
        }
        if !config.host_mount.is_absolute() {
            return Err(bad("host_mount: must be an absolute path".into()).into());
        }
        for p in &config.migrate.paths {
            if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
                return Err(
                    bad(format!("migrate.paths: {p:?} must be absolute, without ..")).into(),
                );
            }
        }
        for h in &config.health {
            if h.command.is_empty() {
                return Err(bad(format!("health: check {:?} has an empty command", h.name)).into());
            }
        }
        config.check_numbers().map_err(bad)?;
        config.check_reboot().map_err(bad)?;
        Ok(config)
    }

    /// Refuses a window that does not parse, an empty busy check, a lock URL that is not HTTP.
    fn check_reboot(&self) -> std::result::Result<(), String> {
        let r = &self.reboot;
        crate::appliance::window::parse(&r.window).map_err(|e| format!("reboot.window: {e}"))?;
        if let Some(i) = r.busy_checks.iter().position(|c| c.is_empty()) {
            return Err(format!("reboot.busy_checks[{i}]: an empty command"));
        }
        if let Some(u) = &r.fleetlock_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!("reboot.fleetlock_url: {u:?} is not an http(s) URL"));
            }
        }
        Ok(())
    }

    /// Refuses numbers that make no sense (a zero timeout, a wait of years); the message names
    /// the key and the accepted range.
    fn check_numbers(&self) -> std::result::Result<(), String> {
        let d = &self.download;
        within("download.stall_seconds", d.stall_seconds, 1..=3600)?;
        within("download.min_speed_bytes", d.min_speed_bytes, 1..=1 << 30)?;
        within(
            "download.max_wait_seconds",
            d.max_wait_seconds,
            0..=7 * 86400,
        )?;
        within("download.max_decoder_mib", d.max_decoder_mib, 16..=1 << 16)?;
        within(
            "grub.panic_seconds",
            self.grub.panic_seconds.into(),
            1..=3600,
        )?;
        within(
            "grub.timeout_seconds",
            self.grub.timeout_seconds.into(),
            0..=600,
        )?;
        within("space_margin_mib", self.space_margin_mib, 0..=1 << 20)?;
        within("keep_extra_images", self.keep_extra_images as u64, 0..=64)?;
        for (i, h) in self.health.iter().enumerate() {
            within(
                &format!("health[{i}].timeout_seconds"),
                h.timeout_seconds,
                1..=3600,
            )?;
        }
        Ok(())
    }
}

/// `Err` naming `key` when `value` is outside `range`.
fn within(
    key: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> std::result::Result<(), String> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(format!(
        "{key}: {value} is not within {}..={}",
        range.start(),
        range.end()
    ))
}

fn read_table(file: &Path) -> Result<Option<toml::Table>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ConfigError {
                file: file.to_owned(),
                message: e.to_string(),
            }
            .into())
        }
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError {
        file: file.to_owned(),
        message: e.to_string(),
    })?;
    // Type and unknown-key errors are reported against this file, before merging.
    Config::from_table(table.clone(), file)?;
    Ok(Some(table))
}

/// Deep-merges `over` into `base`: tables merge, everything else is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../upgradectl.toml.example");
        let c = Config::parse(text, Path::new("upgradectl.toml.example")).unwrap();
        assert_eq!(c.channel, "stable");
        assert!(!c.health.is_empty());
        assert!(!c.migrate.paths.is_empty());
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let err = Config::parse("chanel = \"edge\"\n", Path::new("/etc/x.toml")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("/etc/x.toml") && msg.contains("chanel"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_key_and_file() {
        let err =
            Config::parse("[grub]\npanic_seconds = \"ten\"\n", Path::new("/f.toml")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("/f.toml") && msg.contains("panic_seconds"),
            "{msg}"
        );
    }

    #[test]
    fn bad_channel_and_paths_are_refused() {
        assert!(Config::parse("channel = \"nightly\"", Path::new("f")).is_err());
        assert!(Config::parse("group = \"a&b\"", Path::new("f")).is_err());
        assert!(Config::parse("group = \"zone-a.1\"", Path::new("f")).is_ok());
        assert!(Config::parse("[migrate]\npaths = [\"etc/x\"]", Path::new("f")).is_err());
        assert!(Config::parse("[migrate]\npaths = [\"/etc/../x\"]", Path::new("f")).is_err());
    }

    #[test]
    fn the_reboot_section_is_checked() {
        let c = Config::parse(
            "[reboot]\nfleetlock_url = \"http://lock:8080\"\nwindow = [\"22:00-02:00\"]\n\
             busy_checks = [[\"pgrep\", \"-x\", \"backup\"]]\nhonour_inhibitors = false\n",
            Path::new("f"),
        )
        .unwrap();
        assert_eq!(c.reboot.window, ["22:00-02:00"]);
        assert_eq!(c.reboot.busy_checks[0][0], "pgrep");
        assert_eq!(c.reboot.honour_inhibitors, Some(false));
        for (text, key) in [
            ("[reboot]\nwindow = [\"25:00-01:00\"]", "reboot.window"),
            ("[reboot]\nbusy_checks = [[]]", "reboot.busy_checks[0]"),
            (
                "[reboot]\nfleetlock_url = \"lock:8080\"",
                "reboot.fleetlock_url",
            ),
            ("[reboot]\nfleetlock = \"http://x\"", "fleetlock"),
        ] {
            let msg = format!(
                "{:#}",
                Config::parse(text, Path::new("/u.toml")).unwrap_err()
            );
            assert!(
                msg.contains(key) && msg.contains("/u.toml"),
                "{text}: {msg}"
            );
        }
    }

    #[test]
    fn host_override_merges_over_image_config() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/upgradectl")).unwrap();
        std::fs::write(
            root.join("etc/upgradectl/upgradectl.toml"),
            "channel = \"beta\"\n[grub]\nkernel_args = \"quiet\"\npanic_seconds = 5\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("host/var/lib/upgradectl")).unwrap();
        std::fs::write(
            root.join("host/var/lib/upgradectl/upgradectl.toml"),
            "[grub]\nkernel_args = \"console=ttyS0\"\n",
        )
        .unwrap();
        let c = Config::load(root).unwrap();
        assert_eq!(c.channel, "beta");
        assert_eq!(c.grub.kernel_args, "console=ttyS0");
        assert_eq!(c.grub.panic_seconds, 5);
    }

    #[test]
    fn nonsensical_numbers_are_refused_naming_key_and_file() {
        for (text, key) in [
            ("[download]\nstall_seconds = 0", "download.stall_seconds"),
            (
                "[download]\nstall_seconds = 99999999",
                "download.stall_seconds",
            ),
            (
                "[download]\nmin_speed_bytes = 0",
                "download.min_speed_bytes",
            ),
            (
                "[download]\nmax_wait_seconds = 99999999",
                "download.max_wait_seconds",
            ),
            ("[grub]\npanic_seconds = 0", "grub.panic_seconds"),
            ("[grub]\ntimeout_seconds = 100000", "grub.timeout_seconds"),
            ("space_margin_mib = 99999999999", "space_margin_mib"),
            ("keep_extra_images = 100000", "keep_extra_images"),
            (
                "[[health]]\nname = \"x\"\ncommand = [\"true\"]\ntimeout_seconds = 0",
                "health[0].timeout_seconds",
            ),
        ] {
            let err = Config::parse(text, Path::new("/etc/u.toml")).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.contains(key) && msg.contains("/etc/u.toml"),
                "{text}: {msg}"
            );
            assert!(err.downcast_ref::<ConfigError>().is_some(), "{msg}");
        }
    }
}
