//! upgradectl: image-based OS upgrades for appliances.

pub mod bootinfo;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod deploy;
pub mod error;
pub mod export;
pub mod fetch;
pub mod fsutil;
pub mod grub;
pub mod hashing;
pub mod health;
pub mod lock;
pub mod loopmount;
pub mod manifest;
pub mod migrate;
pub mod output;
pub mod paths;
pub mod prepare;
pub mod publish;
pub mod server;
pub mod sign;
pub mod state;
pub mod status;
pub mod store;
pub mod version;
pub mod zfs;

use anyhow::Result;
use clap::CommandFactory;

use cli::{Cli, Command};
use config::Config;
use deploy::Ctx;
use output::Output;
use paths::Layout;

/// Runs one invocation; the caller maps the error to an exit code.
pub fn run(cli: Cli, mut out: Output) -> Result<()> {
    match cli.command {
        Command::Completions(a) => {
            clap_complete::generate(
                a.shell,
                &mut Cli::command(),
                "upgradectl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => Ok(clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?),
        Command::Keygen(a) => {
            let public = sign::keygen(&a.out)?;
            out.report(&serde_json::json!({ "public_key": public }), |_| {
                public.clone()
            })
        }
        Command::Publish(a) => {
            let store = server::Store::open(&a.store.store)?;
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
        Command::Release(a) => {
            let paused = if a.pause {
                Some(true)
            } else if a.resume {
                Some(false)
            } else {
                None
            };
            let store = server::Store::open(&a.store.store)?;
            let r = publish::release(&store, &a.version, a.channel.as_deref(), a.rollout, paused)?;
            out.report(&r, |r| {
                let paused = if r.release.paused { ", paused" } else { "" };
                format!(
                    "{} on {}: rollout {}%{paused}",
                    r.release.version, r.channel, r.release.rollout
                )
            })
        }
        Command::Serve(a) => {
            let store = server::Store::open(&a.store.store)?;
            let key = sign::load_secret(&a.key)?;
            let source = std::sync::Arc::new(server::build::ZfsSource {
                zvol: a.store.zvol.clone(),
            });
            server::run(
                a.listen,
                server::Server::new(store, key, source, a.cache_mib << 20),
            )
        }
        command => {
            let config = Config::load(&cli.root)?;
            let mut ctx = Ctx {
                layout: Layout::new(&cli.root, &config.host_mount),
                config,
                out,
                wait: cli.wait,
            };
            dispatch(&mut ctx, command)
        }
    }
}

fn dispatch(ctx: &mut Ctx, command: Command) -> Result<()> {
    match command {
        Command::Status => {
            let s = status::gather(ctx)?;
            ctx.out.report(&s, status::render)
        }
        Command::Cleanup(a) => deploy::cleanup(ctx, a.dry_run),
        Command::Prepare(a) => {
            let wait = ctx.wait;
            prepare::prepare(ctx, a.version, wait)
        }
        Command::Upgrade(a) => deploy::upgrade(ctx, a.version, a.dry_run, a.no_reboot),
        Command::Confirm(a) => deploy::confirm(ctx, a.no_reboot),
        Command::Revert(a) => deploy::revert(ctx, a.no_reboot),
        Command::Init(a) => deploy::init(ctx, &a.version, a.host_uuid),
        Command::GrubEntries => deploy::grub_entries(ctx),
        Command::Completions(_)
        | Command::Man
        | Command::Keygen(_)
        | Command::Publish(_)
        | Command::Release(_)
        | Command::Serve(_) => {
            unreachable!("server and help verbs do not load the box configuration")
        }
    }
}
