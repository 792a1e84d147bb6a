//! What every box verb works with: the layout, the configuration, the output, the lock, the
//! state, and the two things every verb ends with (recording the outcome, rebooting).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::appliance::bootinfo::Booted;
use crate::appliance::config::Config;
use crate::appliance::paths::Layout;
use crate::appliance::state::State;
use crate::core::version::Version;
use crate::error::refused;
use crate::output::Output;
use crate::sys::clock::now;
use crate::sys::cmd::Cmd;
use crate::sys::lock::Lock;

/// Everything a verb works with.
pub struct Ctx {
    pub layout: Layout,
    pub config: Config,
    pub out: Output,
    /// Wait for the lock instead of failing at once.
    pub wait: bool,
}

impl Ctx {
    pub fn lock(&self) -> Result<Lock> {
        Lock::acquire(&self.layout.lock_file(), self.wait)
    }

    pub fn load_state(&self) -> Result<State> {
        State::load(&self.layout.state_file())
    }

    pub fn booted(&self) -> Result<Booted> {
        Booted::detect(&self.layout)
    }

    /// The running image; refused when the box did not boot one.
    pub fn booted_version(&self) -> Result<Version> {
        Ctx::image_of(&self.booted()?)
    }

    /// The image `boot` runs; refused when it runs none.
    pub fn image_of(boot: &Booted) -> Result<Version> {
        boot.version.clone().ok_or_else(|| {
            refused("this system was not booted from an upgradectl image (no upgradectl.image= on the kernel command line)")
        })
    }

    /// Where the hashes of the files image `v` shipped with are kept (migration's baseline).
    pub fn baseline_path(&self, v: &Version) -> PathBuf {
        self.layout
            .state_dir()
            .join("baseline")
            .join(format!("{v}.json"))
    }

    /// Where the account databases image `v` shipped with are kept (their merge's base; 0600:
    /// they may hold password hashes).
    pub fn shipped_accounts_path(&self, v: &Version) -> PathBuf {
        self.baseline_path(v).with_extension("accounts.json")
    }

    /// Saves the state with the outcome of `verb` recorded.
    pub fn finish<T>(&self, state: &mut State, verb: &str, result: Result<T>) -> Result<T> {
        let summary = result
            .as_ref()
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e:#}"));
        state.record(verb, &summary, now());
        state.save(&self.layout.state_file())?;
        result
    }

    /// Whether upgradectl works on the running system (`--root /`), not on a box in a
    /// directory (tests, provisioning): only then does it reboot or ask systemd.
    pub fn live(&self) -> bool {
        self.layout.root() == Path::new("/")
    }

    /// Reboots into `target` (GRUB is already set up for it). Under `--root DIR` other than `/`
    /// upgradectl works on a box that is not the running system: the reboot is only reported.
    pub fn reboot(&mut self, target: &Version) -> Result<()> {
        if !self.live() {
            return self.out.event(
                "reboot-skipped",
                &serde_json::json!({"into": target, "root": self.layout.root()}),
                &format!(
                    "not rebooting: {} is not the running system; the next boot is {target}",
                    self.layout.root().display()
                ),
            );
        }
        self.out.event(
            "reboot",
            &serde_json::json!({"into": target}),
            &format!("rebooting into {target}"),
        )?;
        Cmd::new("systemctl")
            .arg("reboot")
            .run()
            .context("rebooting")
    }
}
