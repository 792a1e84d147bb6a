//! Where everything lives, under one root (`--root`, default `/`), so the whole flow runs
//! against a temp directory in tests.

use std::path::{Path, PathBuf};

/// The root everything is resolved against, and the host partition's mount point under it.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    host: PathBuf,
}

/// Joins an absolute path like `/etc/x` under `root`.
pub fn under(root: &Path, abs: impl AsRef<Path>) -> PathBuf {
    let abs = abs.as_ref();
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

impl Layout {
    pub fn new(root: &Path, host_mount: &Path) -> Layout {
        Layout {
            root: root.to_owned(),
            host: under(root, host_mount),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A path of the running image (`/etc/hostname` → `<root>/etc/hostname`).
    pub fn in_root(&self, abs: impl AsRef<Path>) -> PathBuf {
        under(&self.root, abs)
    }

    /// The host partition's mount point.
    pub fn host(&self) -> &Path {
        &self.host
    }

    pub fn images_dir(&self) -> PathBuf {
        self.host.join("images")
    }

    pub fn grub_dir(&self) -> PathBuf {
        self.host.join("boot/grub")
    }

    pub fn grub_cfg(&self) -> PathBuf {
        self.grub_dir().join("grub.cfg")
    }

    pub fn grubenv(&self) -> PathBuf {
        self.grub_dir().join("grubenv")
    }

    /// upgradectl's state directory on the host partition.
    pub fn state_dir(&self) -> PathBuf {
        self.host.join("var/lib/upgradectl")
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir().join("state.json")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.state_dir().join("lock")
    }

    /// What the initramfs wrote about the last boot (persistent).
    pub fn boot_report(&self) -> PathBuf {
        self.state_dir().join("boot-report")
    }

    /// What the initramfs wrote about this boot (gone at the next boot).
    pub fn run_boot_report(&self) -> PathBuf {
        self.in_root("/run/upgradectl/boot-report")
    }

    /// The box-specific configuration override on the host partition.
    pub fn host_config(&self) -> PathBuf {
        self.state_dir().join("upgradectl.toml")
    }

    /// Downloads in progress and the diff cache of the box.
    pub fn downloads_dir(&self) -> PathBuf {
        self.state_dir().join("downloads")
    }

    /// Reports not yet acknowledged by the server (`appliance::report`).
    pub fn reports_dir(&self) -> PathBuf {
        self.state_dir().join("reports")
    }

    /// The reboot slot this box may hold on a FleetLock server (`appliance::rebootlock`).
    pub fn reboot_lock(&self) -> PathBuf {
        self.state_dir().join("reboot-lock.json")
    }

    /// The box's identity key for the fleet (secret, 0600; `appliance::identity`).
    pub fn identity_key(&self) -> PathBuf {
        self.state_dir().join("identity.key")
    }

    pub fn proc_cmdline(&self) -> PathBuf {
        self.in_root("/proc/cmdline")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_is_under_the_root() {
        let l = Layout::new(Path::new("/tmp/t"), Path::new("/host"));
        assert_eq!(l.images_dir(), Path::new("/tmp/t/host/images"));
        assert_eq!(
            l.state_file(),
            Path::new("/tmp/t/host/var/lib/upgradectl/state.json")
        );
        assert_eq!(l.in_root("/etc/hostname"), Path::new("/tmp/t/etc/hostname"));
        assert_eq!(l.proc_cmdline(), Path::new("/tmp/t/proc/cmdline"));
    }
}
