//! The command line: one options struct per verb; doc comments are the help text, and the
//! man pages are rendered from it.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::core::version::Version;

mod repo;
pub use repo::{RepoArgs, RepoCommand, RepoInitArgs, RepoReleaseArgs, RepoRotateArgs};

/// Image-based OS upgrades: whole ext4 images booted by GRUB loopback, delivered as ZFS diffs.
#[derive(Debug, Parser)]
#[command(name = "upgradectl", version, about, long_about = None)]
pub struct Cli {
    /// Resolve every path under this directory (tests, provisioning).
    #[arg(long, global = true, default_value = "/", value_name = "DIR")]
    pub root: PathBuf,
    /// Machine-readable output: JSON Lines on stdout, the last line is the result.
    #[arg(long, global = true)]
    pub json: bool,
    /// Wait instead of failing: for another upgradectl holding the lock, and (prepare,
    /// upgrade) while the server builds a diff ("come back later").
    #[arg(long, global = true)]
    pub wait: bool,
    /// More logging on stderr: -v adds debug, -vv trace (the default is info).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less logging on stderr: -q warnings and errors only, -qq errors only. Neither touches
    /// stdout (the report, `--json`) nor the final error message.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's arguments. Help and version exit as usual; a usage error is refused
    /// input (exit 2), reported as JSON on stdout when `--json` is among the arguments.
    pub fn parse_or_exit() -> Cli {
        use clap::error::ErrorKind;
        let err = match Cli::try_parse() {
            Ok(cli) => return cli,
            Err(e) => e,
        };
        let json = std::env::args_os().any(|a| a == "--json");
        if !json
            || matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            )
        {
            err.exit();
        }
        let text = err.render().to_string();
        let message = text
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ");
        let exit = crate::error::Exit::Refused as u8;
        crate::output::print_error(true, &anyhow::anyhow!("{message}"), "refused", exit);
        std::process::exit(exit.into());
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the booted, default, previous and prepared images, every image on disk, free
    /// space, the last operation and what the initramfs reported about the last boot.
    Status,
    /// Remove images that are neither booted, default, previous nor prepared.
    Cleanup(CleanupArgs),
    /// Download the next image (a ZFS diff from the newest local snapshot), receive it and
    /// export it to images/VERSION.img, verified; resumable.
    Prepare(PrepareArgs),
    /// Show the releases the server offers this box, verified through its TUF repository, and
    /// which one `prepare` would take.
    Releases,
    /// Switch to a prepared image: migrate configuration, arm GRUB to try it once, reboot.
    Upgrade(UpgradeArgs),
    /// After a boot: run the health checks; a healthy trial image becomes the default, an
    /// unhealthy one is marked bad and the box goes back.
    Confirm(ConfirmArgs),
    /// Make the previous image the default again and reboot into it.
    Revert(RebootArgs),
    /// Provision a host partition: make images/VERSION.img the default and write GRUB's files.
    Init(InitArgs),
    /// Print this box's identity for enrollment (box id, group, public key), creating its
    /// key on the host partition at the first call (provisioning).
    Identity,
    /// Print the GRUB menu entries (used by /etc/grub.d/09_upgradectl).
    #[command(hide = true)]
    GrubEntries,
    /// Server: publish an image version from an ext4 image, a directory or a tarball.
    Publish(PublishArgs),
    /// Server: change a published release's channel, rollout percentage or pause.
    Release(ReleaseArgs),
    /// Server: serve the TUF repository and artifacts over HTTP, building diffs on demand.
    Serve(ServeArgs),
    /// Server: the fleet (enrolled boxes, their reports, wave rollouts).
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Release manager and server: the TUF repository (create it, sign releases offline,
    /// rotate root, refresh the online snapshot and timestamp; docs/protocol.md).
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Print shell completions.
    Completions(CompletionsArgs),
    /// Print the man page (roff), or write one page per verb into a directory.
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// The version to prepare; default: the newest this box may take on its channel.
    #[arg(long)]
    pub version: Option<Version>,
}

/// Where the server keeps its data.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The server's store directory (releases.json, built artifacts).
    #[arg(long, default_value = "/var/lib/upgradectl-server")]
    pub store: PathBuf,
    /// The ZFS volume holding the published images, one snapshot per version.
    #[arg(long, default_value = "tank/upgradectl/image")]
    pub zvol: String,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub version: Version,
    /// An ext4 image file (.img), a root directory, or a tarball.
    #[arg(long)]
    pub from: PathBuf,
    #[arg(long, default_value = "stable")]
    pub channel: String,
    /// Percentage of boxes that may take it.
    #[arg(long, default_value_t = 100)]
    pub rollout: u8,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub version: Version,
    /// Move the release to this channel.
    #[arg(long)]
    pub channel: Option<String>,
    #[arg(long)]
    pub rollout: Option<u8>,
    /// Stop offering it.
    #[arg(long, conflicts_with_all = ["resume", "withdraw"])]
    pub pause: bool,
    /// Offer it again (a wave rollout counts failures from now on).
    #[arg(long, conflicts_with = "withdraw")]
    pub resume: bool,
    /// Offer it to no box that does not have it, for good.
    #[arg(long)]
    pub withdraw: bool,
    #[command(flatten)]
    pub waves: WaveArgs,
}

/// A wave rollout, steered by the boxes' reports (see docs/fleet.md).
#[derive(Debug, Args)]
pub struct WaveArgs {
    /// Start a wave rollout: percentages of each group's boxes, increasing, ending at 100.
    #[arg(long, value_delimiter = ',', value_name = "PERCENT,...")]
    pub waves: Option<Vec<u8>>,
    /// Groups (zones) in the order they update, one after the other; other boxes come last.
    #[arg(long, value_delimiter = ',', requires = "waves")]
    pub groups: Vec<String>,
    /// Least seconds a wave runs before the next one starts.
    #[arg(long, default_value_t = 3600, requires = "waves")]
    pub soak: u64,
    /// Least number of boxes that confirm the release during a wave before the next starts.
    #[arg(long, default_value_t = 1, requires = "waves")]
    pub min_successes: u32,
    /// Pause once this many boxes failed among the first --min-sample that finished (0: never
    /// before the sample is complete).
    #[arg(long, default_value_t = 3, requires = "waves")]
    pub max_failures: u32,
    /// From --min-sample finished boxes on: pause once more than this fraction failed.
    #[arg(long, default_value_t = 0.05, requires = "waves")]
    pub max_failure_rate: f64,
    /// How many boxes must finish (confirm or fail) before the failure rate is trusted.
    #[arg(long, default_value_t = 20, requires = "waves")]
    pub min_sample: u32,
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Enroll a box: its reports are accepted from now on (again: replaces its key).
    Enroll(EnrollArgs),
    /// Each wave rollout: its stage, pause and why, boxes by outcome.
    Status(FleetStoreArgs),
}

#[derive(Debug, Args)]
pub struct FleetStoreArgs {
    /// The server's store directory (fleet.db lives there).
    #[arg(long, default_value = "/var/lib/upgradectl-server")]
    pub store: PathBuf,
}

#[derive(Debug, Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    pub store: FleetStoreArgs,
    /// The box id it reports under (`upgradectl identity` prints it).
    #[arg(long, required_unless_present = "identity")]
    pub box_id: Option<String>,
    /// Its public key, `ed25519:...`.
    #[arg(long, required_unless_present = "identity")]
    pub public_key: Option<String>,
    /// Its group or zone label.
    #[arg(long)]
    pub group: Option<String>,
    /// `upgradectl --json identity`'s output instead of the three options above.
    #[arg(long, conflicts_with_all = ["box_id", "public_key"])]
    pub identity: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: std::net::SocketAddr,
    /// Disk the artifact cache may use, MiB; least recently used artifacts are evicted.
    #[arg(long, default_value_t = 10240)]
    pub cache_mib: u64,
    /// Diffs are built only from the N newest releases of the target's channel before the
    /// target; boxes on older versions are told to take the full stream.
    #[arg(long, default_value_t = 3)]
    pub diff_window: usize,
    /// How many artifacts are built at once.
    #[arg(long, default_value_t = 1)]
    pub max_builds: usize,
    /// zstd level of diffs compressed against their base image (`zstd-ref`); higher is smaller
    /// and slower to build (figures in docs/protocol.md).
    #[arg(long, default_value_t = crate::server::http::DEFAULT_ZSTD_REF_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=22))]
    pub zstd_ref_level: i32,
    /// Most MiB of stream per `zstd-ref` frame: the buffer a box's decoder needs for any diff
    /// (in memory up to its `download.max_decoder_mib`, on its host partition beyond); smaller
    /// frames cost size and build time (docs/protocol.md).
    #[arg(long, default_value_t = crate::server::http::DEFAULT_ZSTD_REF_FRAME >> 20,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub zstd_ref_frame_mib: u64,
    /// Seconds a connection may stay without sending a complete request head before it is closed.
    #[arg(long, default_value_t = 15)]
    pub idle_timeout: u64,
    /// Most connections served at once (also bounded by the open-files limit).
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// FleetLock: how many boxes of a group may reboot at once (0: none).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub reboot_slots: u32,
    /// FleetLock: the reboot slots of one group, overriding --reboot-slots (repeatable).
    #[arg(long, value_name = "GROUP=N", value_parser = crate::fleet::semaphore::parse_group_slots)]
    pub reboot_group_slots: Vec<(String, u32)>,
    /// FleetLock: seconds a reboot slot stays held when the box never gives it back (it died).
    #[arg(long, default_value_t = 3600, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(60..=7 * 86400))]
    pub reboot_lease: u64,
    /// The TUF repository (`repo init`) to publish at /v1/metadata/: boxes learn releases,
    /// rollouts and artifacts only from it. The server keeps its rollout documents, built
    /// artifacts and timestamp up to date.
    #[arg(long)]
    pub repo: PathBuf,
    /// The repository's online keys (snapshot, timestamp, rollout, artifacts); never the
    /// offline ones.
    #[arg(long)]
    pub repo_keys: PathBuf,
    /// Seconds between two syncs of the repository (a pause reaches the boxes within this).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub repo_sync_seconds: u64,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The image to switch to; default: the prepared one.
    #[arg(long)]
    pub version: Option<Version>,
    /// Arm GRUB but do not reboot.
    #[arg(long)]
    pub no_reboot: bool,
    /// Show the migration plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Switch now, outside the maintenance window and whatever the busy checks and inhibitor
    /// locks say (the fleet's reboot lock is still taken).
    #[arg(long)]
    pub now: bool,
}

#[derive(Debug, Args)]
pub struct RebootArgs {
    /// Do not reboot (the change takes effect at the next boot).
    #[arg(long)]
    pub no_reboot: bool,
}

#[derive(Debug, Args)]
pub struct ConfirmArgs {
    /// Do not reboot (the change takes effect at the next boot).
    #[arg(long)]
    pub no_reboot: bool,
    /// Run by the trial deadline timer: a trial still unconfirmed now failed (it hung before
    /// its health checks could run); it is marked bad and the box goes back.
    #[arg(long)]
    pub deadline: bool,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The factory image, already at images/VERSION.img on the host partition.
    #[arg(long)]
    pub version: Version,
    /// The host partition's filesystem UUID (for GRUB's search and root=).
    #[arg(long)]
    pub host_uuid: Option<String>,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write upgradectl.1 and one page per verb (upgradectl-prepare.1, ...) into this
    /// directory instead of printing upgradectl.1.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

/// The man pages as (file name, roff): upgradectl.1 first, then one per visible verb
/// (upgradectl-prepare.1, ...), as `git`-style tools have, each ending in a SEE ALSO that
/// links the others (`\%`: names are not hyphenated). Dated with this version's release.
pub fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let source = format!("upgradectl {}", env!("CARGO_PKG_VERSION"));
    let date = release_date(include_str!("../../debian/changelog")).unwrap_or_default();
    // Built once from the top, so that each verb's page is named upgradectl-VERB.
    let mut top = Cli::command().disable_help_subcommand(true);
    top.build();
    let verbs: Vec<_> = top
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let title = |c: &clap::Command| c.get_display_name().unwrap_or(c.get_name()).to_owned();
    let verb_titles: Vec<_> = verbs.iter().map(title).collect();
    let see_also = |titles: &[String]| {
        let refs: Vec<_> = (titles.iter())
            .map(|t| format!("\\fB\\%{}\\fR(1)", t.replace('-', "\\-")))
            .collect();
        format!(".SH \"SEE ALSO\"\n{}\n", refs.join(", "))
    };
    let mut pages = Vec::new();
    let top_see_also = see_also(&verb_titles);
    let each = std::iter::once((top, top_see_also))
        .chain((verbs.into_iter()).map(|v| (v, see_also(&["upgradectl".to_owned()]))));
    for (cmd, see_also) in each {
        let man = clap_mangen::Man::new(cmd)
            .date(date.clone())
            .source(source.clone())
            .manual("upgradectl manual");
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        roff.extend_from_slice(see_also.as_bytes());
        pages.push((man.get_filename(), roff));
    }
    Ok(pages)
}

/// The date (YYYY-MM-DD) of the newest entry of a Debian changelog: this version's release,
/// for the man pages' footer (a page needs one: without it `.TH` shifts its fields).
fn release_date(changelog: &str) -> Option<String> {
    use time::format_description::well_known::Rfc2822;
    let line = changelog.lines().find(|l| l.starts_with(" -- "))?;
    let (_, date) = line.split_once(">  ")?;
    let date = time::OffsetDateTime::parse(date.trim(), &Rfc2822).ok()?;
    Some(format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_versions_are_refused_by_the_parser() {
        let r = Cli::try_parse_from(["upgradectl", "upgrade", "--version", "../etc"]);
        assert!(r.is_err());
        let r = Cli::try_parse_from(["upgradectl", "upgrade", "--version", "415.0", "--no-reboot"]);
        assert!(r.is_ok());
    }

    #[test]
    fn release_date_is_the_newest_changelog_entry() {
        let changelog = "upgradectl (0.2.0-1) unstable; urgency=medium\n\n  * Two.\n\n \
            -- Dev <d@example.org>  Mon, 07 Dec 2026 09:30:00 +0000\n\n\
            upgradectl (0.1.0-1) unstable; urgency=medium\n\n  * One.\n\n \
            -- Dev <d@example.org>  Sun, 22 Nov 2026 21:00:00 +0000\n";
        assert_eq!(release_date(changelog).as_deref(), Some("2026-12-07"));
        assert_eq!(release_date("no entries\n"), None);
        // The package's own changelog has a date.
        assert!(release_date(include_str!("../../debian/changelog")).is_some());
    }

    #[test]
    fn every_visible_verb_has_a_page_and_the_pages_link_each_other() {
        let pages = man_pages().unwrap();
        let names: Vec<_> = pages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "upgradectl.1");
        assert!(names.contains(&"upgradectl-prepare.1"), "{names:?}");
        assert!(!names.contains(&"upgradectl-grub-entries.1"), "{names:?}");
        let top = String::from_utf8(pages[0].1.clone()).unwrap();
        assert!(top.contains("\\fB\\%upgradectl\\-prepare\\fR(1)"), "{top}");
        let (_, prepare) = pages
            .iter()
            .find(|(n, _)| n == "upgradectl-prepare.1")
            .unwrap();
        let prepare = String::from_utf8_lossy(prepare);
        assert!(
            prepare.ends_with(".SH \"SEE ALSO\"\n\\fB\\%upgradectl\\fR(1)\n"),
            "{prepare}"
        );
    }
}
