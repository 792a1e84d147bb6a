//! upgradectl: image-based OS upgrades for appliances.

pub mod bootinfo;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod deploy;
pub mod error;
pub mod fsutil;
pub mod grub;
pub mod health;
pub mod lock;
pub mod loopmount;
pub mod migrate;
pub mod output;
pub mod paths;
pub mod state;
pub mod status;
pub mod store;
pub mod version;

use anyhow::Result;
use clap::CommandFactory;

use cli::{Cli, Command};
use config::Config;
use deploy::Ctx;
use output::Output;
use paths::Layout;

/// Runs one invocation; the caller maps the error to an exit code.
pub fn run(cli: Cli, out: Output) -> (Output, Result<()>) {
    match cli.command {
        Command::Completions(a) => {
            clap_complete::generate(
                a.shell,
                &mut Cli::command(),
                "upgradectl",
                &mut std::io::stdout(),
            );
            return (out, Ok(()));
        }
        Command::Man => {
            let r = clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(Into::into);
            return (out, r);
        }
        _ => {}
    }
    let config = match Config::load(&cli.root) {
        Ok(c) => c,
        Err(e) => return (out, Err(e)),
    };
    let mut ctx = Ctx {
        layout: Layout::new(&cli.root, &config.host_mount),
        config,
        out,
        wait: cli.wait,
    };
    let result = dispatch(&mut ctx, cli.command);
    (ctx.out, result)
}

fn dispatch(ctx: &mut Ctx, command: Command) -> Result<()> {
    match command {
        Command::Status => {
            let s = status::gather(ctx)?;
            ctx.out.report(&s, status::render)
        }
        Command::Cleanup(a) => deploy::cleanup(ctx, a.dry_run),
        Command::Upgrade(a) => deploy::upgrade(ctx, a.version, a.dry_run, a.no_reboot),
        Command::Confirm(a) => deploy::confirm(ctx, a.no_reboot),
        Command::Revert(a) => deploy::revert(ctx, a.no_reboot),
        Command::Init(a) => deploy::init(ctx, &a.version, a.host_uuid),
        Command::GrubEntries => deploy::grub_entries(ctx),
        Command::Completions(_) | Command::Man => unreachable!("handled before loading config"),
    }
}
