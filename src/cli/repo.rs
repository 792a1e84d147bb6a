//! The `repo` verbs' command line: the TUF repository's steps (`server::tuf_repo`).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::core::version::Version;

/// The TUF repository's steps (see docs/protocol.md, "The TUF repository").
#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a repository and every key: root (offline, --root-keys, --root-threshold),
    /// targets and one role per channel (offline), snapshot, timestamp, rollout and artifacts
    /// (online: copy those four to the server).
    Init(RepoInitArgs),
    /// Sign a release on a channel with the channel's offline key: the exported image's size
    /// and sha256. The server publishes it at its next refresh.
    Release(RepoReleaseArgs),
    /// Rotate keys: a new root version with new keys for the given roles, signed by the
    /// current root keys and the new ones; the old key files move to KEYS/revoked/.
    RotateRoot(RepoRotateArgs),
    /// Offline: a new key for a delegated role (a channel, rollout or artifacts), the old one
    /// revoked; the targets role is signed again.
    RotateDelegation(RepoRotateDelegationArgs),
    /// Publish the newest verified version of every role: a new snapshot and timestamp,
    /// signed with the online keys.
    Refresh(RepoArgs),
}

#[derive(Debug, Args)]
pub struct RepoArgs {
    /// The repository directory (served at /v1/: metadata/ and the data targets).
    #[arg(long)]
    pub repo: PathBuf,
    /// The directory of key files (`<role>.<n>.pk8`) this step signs with.
    #[arg(long)]
    pub keys: PathBuf,
}

#[derive(Debug, Args)]
pub struct RepoInitArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long, default_value_t = 1)]
    pub root_keys: usize,
    /// Root signatures needed: any new root needs this many of the old keys and of its own.
    #[arg(long, default_value_t = 1)]
    pub root_threshold: u64,
}

#[derive(Debug, Args)]
pub struct RepoReleaseArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long, default_value = "stable")]
    pub channel: String,
    #[arg(long)]
    pub version: Version,
    /// The exported image file (its size and sha256 are signed); or --published, or --size
    /// and --sha256.
    #[arg(long, conflicts_with_all = ["size", "sha256", "published"],
          required_unless_present_any = ["sha256", "published"])]
    pub image: Option<PathBuf>,
    /// The image server's store: sign the image `publish` recorded for this version there.
    #[arg(long, conflicts_with_all = ["size", "sha256"])]
    pub published: Option<PathBuf>,
    #[arg(long, requires = "sha256")]
    pub size: Option<u64>,
    #[arg(long, requires = "size")]
    pub sha256: Option<String>,
}

#[derive(Debug, Args)]
pub struct RepoRotateArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The roles that get new keys (root, targets, snapshot, timestamp).
    #[arg(long, value_delimiter = ',', default_value = "root")]
    pub roles: Vec<String>,
    /// How many root keys when root is rotated.
    #[arg(long, default_value_t = 1)]
    pub root_keys: usize,
    /// Root's new threshold (0: unchanged).
    #[arg(long, default_value_t = 0)]
    pub root_threshold: u64,
}

#[derive(Debug, Args)]
pub struct RepoRotateDelegationArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The delegated role that gets a new key: stable, candidate, beta, edge, rollout or
    /// artifacts.
    #[arg(long)]
    pub role: String,
}
