//! The server side's verbs: `publish`, `release` (the release manager's, with wave
//! rollouts in the fleet database) and `serve` (the image server, with the fleet database).

use std::sync::Arc;

use anyhow::Result;

use serde::Serialize;

use crate::cli::{PublishArgs, ReleaseArgs, RepoCommand, ServeArgs, WaveArgs};
use crate::core::manifest::Blob;
use crate::error::refused;
use crate::fleet::control::{self, Command};
use crate::fleet::rollout::Policy;
use crate::fleet::semaphore::Slots;
use crate::fleet::store::Db;
use crate::fleet::view::{self, RolloutView};
use crate::output::Output;
use crate::server::artifacts::StoredRelease;
use crate::server::repo_sync::Repo;
use crate::server::{publish, source::ZfsSource, Server, Store, Tuning};
use crate::sys::clock::now;
use tough::schema::RoleType;

pub fn publish(a: PublishArgs, mut out: Output) -> Result<()> {
    let store = Store::open(&a.store.store)?;
    let r = publish::publish(
        &store,
        &a.store.zvol,
        &a.version,
        &a.from,
        &a.channel,
        a.rollout,
    )?;
    out.report(&r, |r| {
        format!(
            "published {} on {} at {}% ({} bytes, sha256 {}) in {:.1}s",
            r.version, r.channel, r.rollout, r.image.size, r.image.sha256, r.seconds
        )
    })
}

/// What `release` prints: the release record and its wave rollout, if it has one.
#[derive(Debug, Serialize)]
struct ReleaseReport {
    #[serde(flatten)]
    release: StoredRelease,
    /// The wave rollout (`rollout` is the release record's percentage).
    waves: Option<RolloutView>,
}

pub fn release(a: ReleaseArgs, mut out: Output) -> Result<()> {
    let paused = if a.pause || a.withdraw {
        Some(true)
    } else if a.resume {
        Some(false)
    } else {
        None
    };
    let rollout = if a.withdraw { Some(0) } else { a.rollout };
    let store = Store::open(&a.store.store)?;
    let db = Db::open_in(&a.store.store)?;
    let version = a.version.as_str();
    if store.release(&a.version)?.is_none() {
        return Err(refused(format!("version {version} is not published")));
    }
    if let Some(c) = &a.channel {
        publish::check_channel(c)?;
    }
    let managed = db.rollout(version)?.is_some();
    if managed && a.rollout.is_some() {
        return Err(refused(format!(
            "{version} rolls out in waves; --pause, --resume or --withdraw it, or start new --waves"
        )));
    }
    let now = now();
    if managed || a.waves.waves.is_some() {
        // Before releases.json: a refused command (resuming a withdrawn rollout, a bad wave
        // plan) leaves it as it was.
        let cmd = if a.withdraw {
            Some(Command::Withdraw)
        } else if a.pause {
            Some(Command::Pause("paused by the operator".into()))
        } else if a.resume {
            Some(Command::Resume)
        } else {
            None
        };
        if let Some(w) = &a.waves.waves {
            control::start(&db, version, policy(&a.waves, w), now)?;
        }
        if let Some(cmd) = cmd {
            control::command(&db, version, cmd, now)?;
        }
    }
    let r = publish::release(&store, &a.version, a.channel.as_deref(), rollout, paused)?;
    let view = match db.rollout(version)? {
        Some(r) => Some(view::view(&db, &r)?),
        None => None,
    };
    let report = ReleaseReport {
        release: r,
        waves: view,
    };
    out.report(&report, |r| match &r.waves {
        Some(v) => format!("{} (channel {})", view::line(v), r.release.channel),
        None => {
            let paused = if r.release.release.paused {
                ", paused"
            } else {
                ""
            };
            format!(
                "{} on {}: rollout {}%{paused}",
                r.release.release.version, r.release.channel, r.release.release.rollout
            )
        }
    })
}

fn policy(a: &WaveArgs, waves: &[u8]) -> Policy {
    Policy {
        waves: waves.to_vec(),
        groups: a.groups.clone(),
        soak_secs: a.soak,
        min_successes: a.min_successes,
        max_failures: a.max_failures,
        max_failure_rate: a.max_failure_rate,
        min_sample: a.min_sample,
    }
}

/// The `serve` verb: the image server over the store and its TUF repository, streams from ZFS.
pub fn serve(a: ServeArgs) -> Result<()> {
    let store = Store::open(&a.store.store)?;
    // Builds the last server process did not finish (killed, power cut): nobody else builds.
    store.remove_build_leftovers()?;
    let source = Arc::new(ZfsSource {
        zvol: a.store.zvol.clone(),
    });
    let tuning = Tuning {
        cache_cap: a.cache_mib << 20,
        diff_window: a.diff_window,
        max_builds: a.max_builds,
        zstd_ref_level: a.zstd_ref_level,
        zstd_ref_frame: a.zstd_ref_frame_mib << 20,
        idle_timeout: std::time::Duration::from_secs(a.idle_timeout),
        max_connections: a.max_connections,
        reboot_slots: Slots {
            default: a.reboot_slots,
            groups: a.reboot_group_slots.into_iter().collect(),
            lease_secs: a.reboot_lease,
        },
        ..Tuning::default()
    };
    let fleet = Db::open_in(&a.store.store)?;
    let repo = Arc::new(Repo::new(a.repo, a.repo_keys));
    // In step before the first request, then every --repo-sync-seconds on a thread of its own
    // (with its own handles on the store and the fleet database).
    let (store2, db) = (Store::open(&a.store.store)?, Db::open_in(&a.store.store)?);
    let db = std::sync::Mutex::new(db);
    repo.sync(&store2, Some(&db), now())?;
    let (r, every) = (
        repo.clone(),
        std::time::Duration::from_secs(a.repo_sync_seconds),
    );
    std::thread::spawn(move || loop {
        std::thread::sleep(every);
        if let Err(e) = r.sync(&store2, Some(&db), now()) {
            tracing::error!("bringing the TUF repository in step: {e:#}");
        }
    });
    let server = Server::new(store, source, tuning)
        .with_fleet(fleet)
        .with_repo(repo);
    crate::server::run(a.listen, server)
}

/// The `repo` verbs: the TUF repository (`server::tuf_repo`).
pub fn repo(c: RepoCommand, mut out: Output) -> Result<()> {
    use crate::server::tuf_repo;
    let (what, r) = match c {
        RepoCommand::Init(a) => {
            let o = tuf_repo::InitOptions {
                root_keys: a.root_keys,
                root_threshold: a.root_threshold,
            };
            tuf_repo::init(&a.repo.repo, &a.repo.keys, &o)?;
            ("init", a.repo)
        }
        RepoCommand::Release(a) => {
            let image = match (&a.published, &a.image, a.size, &a.sha256) {
                (Some(store), _, _, _) => {
                    (Store::open(store)?.release(&a.version)?)
                        .ok_or_else(|| refused(format!("{} is not published", a.version)))?
                        .image
                }
                (None, Some(path), _, _) => Blob {
                    size: std::fs::metadata(path)?.len(),
                    sha256: crate::core::hashing::sha256_file(path)?,
                },
                (None, None, Some(size), Some(sha256)) => Blob {
                    size,
                    sha256: sha256.clone(),
                },
                _ => return Err(refused("--image, or --size and --sha256")),
            };
            tuf_repo::release(&a.repo.repo, &a.repo.keys, &a.channel, &a.version, &image)
                .map_err(|e| refused(format!("{e:#}")))?;
            ("release", a.repo)
        }
        RepoCommand::RotateRoot(a) => {
            let roles = (a.roles.iter())
                .map(|r| match r.as_str() {
                    "root" => Ok(RoleType::Root),
                    "targets" => Ok(RoleType::Targets),
                    "snapshot" => Ok(RoleType::Snapshot),
                    "timestamp" => Ok(RoleType::Timestamp),
                    other => Err(refused(format!(
                        "no top-level role {other:?} (a delegated role's key is rotated with \
                         `repo rotate-delegation --role {other}`)"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            tuf_repo::rotate_root(
                &a.repo.repo,
                &a.repo.keys,
                &roles,
                a.root_keys,
                a.root_threshold,
            )?;
            ("rotate-root", a.repo)
        }
        RepoCommand::RotateDelegation(a) => {
            tuf_repo::rotate_delegation(&a.repo.repo, &a.repo.keys, &a.role)
                .map_err(|e| refused(format!("{e:#}")))?;
            ("rotate-delegation", a.repo)
        }
        RepoCommand::Refresh(a) => {
            tuf_repo::refresh(&a.repo, &a.keys)?;
            ("refresh", a)
        }
    };
    let report = serde_json::json!({"step": what, "repo": r.repo});
    out.report(&report, |_| format!("{what}: done ({})", r.repo.display()))
}
