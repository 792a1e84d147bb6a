//! upgradectl: image-based OS upgrades for appliances. One binary, two programs and what they
//! share (see docs/architecture.md):
//! - `core`: versions, the protocol's documents, signatures, hashing; pure;
//! - `sys`: thin effects (tools, durable writes, ZFS, loop mounts, the lock, the clock);
//! - `appliance`: the box (prepare, upgrade, confirm, revert, ...);
//! - `server`: the image server and the release manager's verbs;
//! - `fleet`: the server's fleet database, box reports, waves and the automatic pause.

pub mod appliance;
pub mod cli;
pub mod core;
pub mod error;
pub mod fleet;
pub mod log;
pub mod output;
pub mod server;
pub mod sys;

use anyhow::Result;
use clap::CommandFactory;

use appliance::config::Config;
use appliance::ctx::Ctx;
use appliance::paths::Layout;
use appliance::verbs;
use cli::{Cli, Command};
use output::Output;

/// Runs one invocation; the caller maps the error to an exit code. Call it while the process
/// has one thread: it first moves into a private mount namespace (see
/// `sys::loopmount::private_mount_namespace`).
pub fn run(cli: Cli, out: Output) -> Result<()> {
    sys::loopmount::private_mount_namespace()?;
    sys::clock::init_local_offset();
    let box_ctx = |out: Output| -> Result<Ctx> {
        let config = Config::load(&cli.root)?;
        Ok(Ctx {
            layout: Layout::new(&cli.root, &config.host_mount),
            config,
            out,
            wait: cli.wait,
        })
    };
    match cli.command {
        Command::Status => verbs::status::status(&mut box_ctx(out)?),
        Command::Cleanup(a) => verbs::cleanup::cleanup(&mut box_ctx(out)?, a.dry_run),
        Command::Prepare(a) => verbs::prepare::prepare(&mut box_ctx(out)?, a.version, cli.wait),
        Command::Releases => verbs::releases::releases(&mut box_ctx(out)?),
        Command::Upgrade(a) => {
            let mode = verbs::upgrade::Mode {
                dry_run: a.dry_run,
                no_reboot: a.no_reboot,
                now: a.now,
            };
            verbs::upgrade::upgrade(&mut box_ctx(out)?, a.version, mode)
        }
        Command::Confirm(a) => verbs::confirm::confirm(&mut box_ctx(out)?, a.no_reboot, a.deadline),
        Command::Revert(a) => verbs::revert::revert(&mut box_ctx(out)?, a.no_reboot),
        Command::Init(a) => verbs::init::init(&mut box_ctx(out)?, &a.version, a.host_uuid),
        Command::GrubEntries => verbs::grub_entries::grub_entries(&mut box_ctx(out)?),
        Command::Publish(a) => server::verbs::publish(a, out),
        Command::Release(a) => server::verbs::release(a, out),
        Command::Serve(a) => server::verbs::serve(a),
        Command::Fleet(c) => fleet::verbs::fleet(c, out),
        Command::Repo(c) => server::verbs::repo(c, out),
        Command::Identity => verbs::identity::identity(&mut box_ctx(out)?),
        Command::Completions(a) => {
            let mut cmd = Cli::command();
            clap_complete::generate(a.shell, &mut cmd, "upgradectl", &mut std::io::stdout());
            Ok(())
        }
        Command::Man(a) => man(a.out_dir.as_deref()),
    }
}

/// The `man` verb: upgradectl.1 on stdout, or every page written into `out_dir`.
fn man(out_dir: Option<&std::path::Path>) -> Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let pages = cli::man_pages()?;
    let Some(dir) = out_dir else {
        return Ok(std::io::stdout().write_all(&pages[0].1)?);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, roff) in pages {
        let path = dir.join(name);
        std::fs::write(&path, roff).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
