//! A box in a temp directory for the host integration tests: a running image tree at ROOT, the
//! host partition at ROOT/host with real ext4 image files (`mkfs.ext4 -d`), a kernel command
//! line in ROOT/proc/cmdline, upgradectl's configuration, and helpers that drive the real
//! binary with `--root ROOT --json` and inspect what it wrote with the real tools
//! (`grub-editenv`, `grub-script-check`, `mount -o loop,ro`, `e2fsck`).
//!
//! Needs root (loop devices, chown) and grub-common, e2fsprogs, util-linux.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{lchown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Host partition UUID on the fake kernel command line.
pub const HOST_UUID: &str = "0f4d5a1e-1234-4c5b-9a3d-2f0e7d1c6b5a";

/// Owner given to the box's netplan file, to see that ownership survives migration.
pub const NETPLAN_UID: u32 = 1234;
pub const NETPLAN_GID: u32 = 5678;

/// The configuration every test starts with: the usual migration paths and one passing check.
pub const CONFIG: &str = r#"
[grub]
kernel_args = "console=ttyS0,115200"
panic_seconds = 7

[migrate]
paths = ["/etc/hostname", "/etc/ssh/ssh_host_*", "/etc/netplan", "/etc/upgradectl/box.toml", "/etc/not-there"]

[[health]]
name = "always"
command = ["true"]
timeout_seconds = 5
"#;

/// The account databases every image ships and the running tree starts with.
pub const ACCOUNTS: [(&str, &str); 4] = [
    (
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
    ),
    ("etc/group", "root:x:0:\nshadow:x:42:\nsudo:x:27:\n"),
    (
        "etc/shadow",
        "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
    ),
    ("etc/gshadow", "root:*::\nshadow:*::\nsudo:*::\n"),
];

/// The group that owns /etc/shadow and /etc/gshadow (Debian's `shadow`).
pub const SHADOW_GID: u32 = 42;

/// Writes `ACCOUNTS` under `root` as Debian has them: passwd and group 0644 root:root, shadow and
/// gshadow 0640 root:shadow.
pub fn write_accounts(root: &Path) {
    for (rel, text) in ACCOUNTS {
        let p = root.join(rel);
        fs::write(&p, text).unwrap();
        let secret = rel.contains("shadow");
        let mode = if secret { 0o640 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        lchown(&p, Some(0), Some(if secret { SHADOW_GID } else { 0 })).unwrap();
    }
}

pub struct HostRoot {
    dir: tempfile::TempDir,
    /// The ext4 filesystem file mounted at ROOT/host, when the host partition is a real one.
    host_disk: Option<PathBuf>,
}

/// What one invocation did: exit code, every JSON line of stdout, stderr.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub lines: Vec<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The final JSON line: the verb's report or `{"error": ...}`.
    pub fn last(&self) -> &Value {
        self.lines
            .last()
            .unwrap_or_else(|| panic!("no JSON on stdout; stderr: {}", self.stderr))
    }

    /// Asserts the exit code, showing everything on failure.
    #[track_caller]
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// The error object of a failed JSON run.
    #[track_caller]
    pub fn error(&self) -> &Value {
        let e = &self.last()["error"];
        assert!(e.is_object(), "no error object in {}", self.stdout);
        e
    }
}

/// Runs `cmd` (from `HostRoot::command`, say, after changing it).
pub fn run_command(mut cmd: Command) -> Run {
    from_output(cmd.output().unwrap())
}

fn from_output(out: Output) -> Run {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines = stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line {l:?} is not JSON: {e}"))
        })
        .collect();
    Run {
        code: out.status.code().expect("not killed by a signal"),
        lines,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a tool and panics with its stderr when it fails.
#[track_caller]
pub fn tool(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("starting {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh temp directory for a box.
fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("upgradectl-host-")
        .tempdir()
        .unwrap()
}

/// Formats the file `disk` as a host partition: ext4 with 4 KiB blocks as on a real host
/// partition (GRUB 2.06 cannot read a file that starts with a hole, which a 1 KiB-block
/// filesystem gives any ext4 image).
pub fn mkfs_host(disk: &Path) {
    tool(&[
        "mkfs.ext4",
        "-q",
        "-F",
        "-b",
        "4096",
        disk.to_str().unwrap(),
    ]);
}

/// Builds an ext4 image file of `mib` MiB from the directory `src`.
pub fn mkfs(src: &Path, image: &Path, mib: u32) {
    tool(&[
        "mkfs.ext4",
        "-q",
        "-F",
        "-d",
        src.to_str().unwrap(),
        image.to_str().unwrap(),
        &format!("{mib}M"),
    ]);
}

impl HostRoot {
    /// A box provisioned with image 1.0 (booted) and image 2.0 on disk but not registered.
    /// `init` has not run yet.
    pub fn new() -> HostRoot {
        HostRoot::build(tempdir(), None)
    }

    /// Like `new`, with the host partition a real ext4 filesystem (a file on a loop device,
    /// mounted at ROOT/host), so that what GRUB would read can be compared with what Linux
    /// reads: see `grub_reads`. The setup itself is checkpointed (unmount and mount again).
    pub fn on_ext4() -> HostRoot {
        let dir = tempdir();
        let disk = dir.path().join("host.disk");
        fs::write(&disk, b"").unwrap();
        tool(&["truncate", "-s", "256M", disk.to_str().unwrap()]);
        mkfs_host(&disk);
        HostRoot::build(dir, Some(disk))
    }

    /// Like `on_ext4`, on a host partition file the caller provides, already formatted as
    /// ext4 (`mkfs_host`): for instance a file served by a FUSE filesystem that logs writes.
    pub fn on_host_disk(disk: &Path) -> HostRoot {
        HostRoot::build(tempdir(), Some(disk.to_owned()))
    }

    /// A box around an existing, provisioned host partition file: the running tree and the
    /// configuration at ROOT, `disk` mounted at ROOT/host (`mount -o loop`). Nothing is
    /// written to the host partition; it is unmounted on drop.
    pub fn attach(disk: &Path) -> HostRoot {
        let h = HostRoot {
            dir: tempdir(),
            host_disk: Some(disk.to_owned()),
        };
        fs::create_dir_all(h.host("")).unwrap();
        h.share_mount_point();
        h.mount_host();
        h.write_running_tree();
        h.set_config(CONFIG);
        h
    }

    fn build(dir: tempfile::TempDir, host_disk: Option<PathBuf>) -> HostRoot {
        let on_ext4 = host_disk.is_some();
        let h = HostRoot { dir, host_disk };
        if on_ext4 {
            fs::create_dir_all(h.host("")).unwrap();
            h.share_mount_point();
            h.mount_host();
        }
        h.write_running_tree();
        fs::create_dir_all(h.host("images")).unwrap();
        h.add_image("1.0");
        h.add_image("2.0");
        h.boot("1.0");
        h.set_config(CONFIG);
        if on_ext4 {
            h.remount_host();
        }
        h
    }

    /// Unmounts the host partition and mounts it again: everything written so far is at its
    /// home location (the unmount checkpoints the journal), as GRUB would read it.
    pub fn remount_host(&self) {
        umount_retrying(&self.host(""));
        self.mount_host();
    }

    fn mount_host(&self) {
        let disk = self.host_disk.as_ref().expect("the host partition is ext4");
        tool(&[
            "mount",
            "-o",
            "loop",
            disk.to_str().unwrap(),
            self.host("").to_str().unwrap(),
        ]);
    }

    /// Makes the host mount point a shared mount of its own (a bind onto itself), as mounts
    /// are under systemd. An upgradectl of a test running in parallel holds a copy of every
    /// mount in its private namespace (a slave), and an unmount reaches that copy only when the
    /// unmounted filesystem's parent mount is shared. Without it `remount_host` would leave the
    /// filesystem alive there: no checkpoint, and a second instance on the same disk.
    fn share_mount_point(&self) {
        let at = self.host("");
        let at = at.to_str().unwrap();
        tool(&["mount", "--bind", at, at]);
        tool(&["mount", "--make-shared", at]);
    }

    /// A file of the host partition as GRUB reads it: through GRUB's own ext4 driver
    /// (`grub-fstest`) on the disk's blocks as they are now, without replaying the journal
    /// (GRUB cannot). `None` when GRUB does not find the file.
    pub fn grub_reads(&self, rel: &str) -> Option<Vec<u8>> {
        let disk = self.host_disk.as_ref().expect("the host partition is ext4");
        let out = tempfile::NamedTempFile::new().unwrap();
        let status = Command::new("grub-fstest")
            .arg(disk)
            .args(["cp", &format!("/{}", rel.trim_start_matches('/'))])
            .arg(out.path())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("running grub-fstest");
        status.success().then(|| fs::read(out.path()).unwrap())
    }

    /// Asserts that GRUB reads each of the host partition's files `rels` exactly as Linux does.
    #[track_caller]
    pub fn assert_grub_sees(&self, rels: &[&str], after: &str) {
        for rel in rels {
            let linux = fs::read(self.host(rel)).unwrap();
            match self.grub_reads(rel) {
                None => panic!("after {after}: GRUB does not find {rel} on the host partition"),
                Some(grub) => assert!(
                    grub == linux,
                    "after {after}: GRUB reads {rel} differently from Linux ({} vs {} bytes)",
                    grub.len(),
                    linux.len()
                ),
            }
        }
    }

    /// A box after `init --version 1.0`.
    pub fn provisioned() -> HostRoot {
        let h = HostRoot::new();
        h.run(&["init", "--version", "1.0"]).expect(0);
        h
    }

    /// A provisioned box with 2.0 registered as prepared (the state file is serde JSON; this is
    /// what `prepare` leaves behind).
    pub fn with_prepared(v: &str) -> HostRoot {
        let h = HostRoot::provisioned();
        h.register_prepared(v);
        h
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `ROOT/<rel>`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel.trim_start_matches('/'))
    }

    /// `ROOT/host/<rel>`: the host partition.
    pub fn host(&self, rel: &str) -> PathBuf {
        self.root().join("host").join(rel.trim_start_matches('/'))
    }

    pub fn image(&self, v: &str) -> PathBuf {
        self.host(&format!("images/{v}.img"))
    }

    pub fn grubenv_path(&self) -> PathBuf {
        self.host("boot/grub/grubenv")
    }

    pub fn grub_cfg(&self) -> String {
        fs::read_to_string(self.host("boot/grub/grub.cfg")).unwrap()
    }

    pub fn state_path(&self) -> PathBuf {
        self.host("var/lib/upgradectl/state.json")
    }

    /// The running image's files: what migration copies from.
    fn write_running_tree(&self) {
        let p = |r: &str| self.path(r);
        for d in ["etc/ssh", "etc/netplan", "etc/upgradectl", "proc", "run"] {
            fs::create_dir_all(p(d)).unwrap();
        }
        fs::write(p("etc/hostname"), "box-17\n").unwrap();
        xattr::set(p("etc/hostname"), "user.origin", b"box-17").unwrap();
        fs::write(p("etc/ssh/ssh_host_ed25519_key"), "PRIVATE KEY OF BOX 17\n").unwrap();
        fs::set_permissions(
            p("etc/ssh/ssh_host_ed25519_key"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::write(
            p("etc/ssh/ssh_host_ed25519_key.pub"),
            "PUBLIC KEY OF BOX 17\n",
        )
        .unwrap();
        fs::write(p("etc/ssh/sshd_config"), "# not migrated\n").unwrap();
        fs::write(p("etc/netplan/10-box.yaml"), "network: {version: 2}\n").unwrap();
        fs::set_permissions(
            p("etc/netplan/10-box.yaml"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        lchown(
            p("etc/netplan/10-box.yaml"),
            Some(NETPLAN_UID),
            Some(NETPLAN_GID),
        )
        .unwrap();
        symlink("10-box.yaml", p("etc/netplan/current.yaml")).unwrap();
        fs::write(p("etc/upgradectl/box.toml"), "serial = \"B17\"\n").unwrap();
        write_accounts(self.root());
    }

    /// Builds `images/<v>.img` as the image build would: a fresh /etc, an empty /host.
    pub fn add_image(&self, v: &str) -> PathBuf {
        self.add_image_with(v, |_| {})
    }

    /// Like `add_image`, with `edit` changing the image's tree (given its root) before mkfs.
    pub fn add_image_with(&self, v: &str, edit: impl FnOnce(&Path)) -> PathBuf {
        let src = tempfile::tempdir().unwrap();
        let s = |r: &str| src.path().join(r);
        for d in ["etc/ssh", "etc/netplan", "host", "boot"] {
            fs::create_dir_all(s(d)).unwrap();
        }
        fs::write(s("etc/hostname"), format!("factory-{v}\n")).unwrap();
        fs::write(s("etc/os-release"), format!("VERSION_ID={v}\n")).unwrap();
        fs::write(s("etc/netplan/01-default.yaml"), "dhcp: true\n").unwrap();
        fs::write(s("etc/ssh/sshd_config"), format!("# image {v}\n")).unwrap();
        write_accounts(src.path());
        edit(src.path());
        // mkfs.ext4 zeroes its journal with FALLOC_FL_ZERO_RANGE: unwritten extents, which
        // GRUB's ext4 driver reads as whatever the disk holds there (Linux reads zeros). The
        // box's images come from a sparse export (holes, never unwritten extents): copy the
        // same way.
        let built = tempfile::NamedTempFile::new().unwrap();
        mkfs(src.path(), built.path(), 16);
        let img = self.image(v);
        tool(&[
            "cp",
            "--sparse=always",
            built.path().to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        img
    }

    /// What GRUB put on the kernel command line when it booted `v`.
    pub fn boot(&self, v: &str) {
        fs::write(
            self.path("proc/cmdline"),
            format!(
                "BOOT_IMAGE=(loop)/vmlinuz root=UUID={HOST_UUID} rw upgradectl.image=/images/{v}.img panic=10\n"
            ),
        )
        .unwrap();
    }

    /// The initramfs's report of this boot (ROOT/run/upgradectl/boot-report).
    pub fn boot_report(&self, requested: &str, booted: &str, reason: &str) {
        self.boot_report_as(requested, booted, reason, false)
    }

    /// The same, `redirected`: the failure was in the boot before, whose initramfs rebooted
    /// into the fallback's own entry.
    pub fn boot_report_as(&self, requested: &str, booted: &str, reason: &str, redirected: bool) {
        let fallback = u8::from(requested != booted);
        let redirected = u8::from(redirected);
        let text = format!(
            "requested=/images/{requested}.img\nbooted=/images/{booted}.img\nfallback={fallback}\nredirected={redirected}\nreason={reason}\nfsck=0\n"
        );
        fs::create_dir_all(self.path("run/upgradectl")).unwrap();
        fs::write(self.path("run/upgradectl/boot-report"), &text).unwrap();
        fs::create_dir_all(self.host("var/lib/upgradectl")).unwrap();
        fs::write(self.host("var/lib/upgradectl/boot-report"), &text).unwrap();
    }

    /// Simulates the reboot the way GRUB runs our grub.cfg: a set `upgradectl_redirect` is
    /// booted once and cleared, else a set `next_entry` is booted once, else the default is
    /// boot-counted (`count_default_boot`); a `next_entry` is
    /// recorded in `upgradectl_attempted` and cleared (`save_env`). Returns the entry booted.
    pub fn grub_reboot(&self) -> String {
        let env = self.grubenv();
        let cfg = self.grub_cfg();
        let redirect = env.get("upgradectl_redirect").filter(|e| !e.is_empty());
        let entry = match env.get("next_entry").filter(|e| !e.is_empty()) {
            _ if redirect.is_some() => {
                // Before a trial: the initramfs of the boot before sent GRUB here.
                assert!(cfg.contains(
                    "if [ -n \"${upgradectl_redirect}\" ]; then\n  set default=\"${upgradectl_redirect}\"\n  set upgradectl_redirect=\n  save_env upgradectl_redirect\nelif [ -n \"${next_entry}\" ]"
                ));
                let env = self.grubenv_path();
                tool(&[
                    "grub-editenv",
                    env.to_str().unwrap(),
                    "unset",
                    "upgradectl_redirect",
                ]);
                redirect.unwrap().clone()
            }
            Some(next) => {
                // The grub.cfg must really do this, or the simulation is a lie.
                assert!(cfg.contains("set upgradectl_attempted=\"${next_entry}\""));
                assert!(cfg.contains("save_env next_entry upgradectl_attempted"));
                let env = self.grubenv_path();
                let env = env.to_str().unwrap();
                tool(&["grub-editenv", env, "unset", "next_entry"]);
                tool(&[
                    "grub-editenv",
                    env,
                    "set",
                    &format!("upgradectl_attempted={next}"),
                ]);
                next.clone()
            }
            None => {
                let default = cfg
                    .lines()
                    .find_map(|l| l.strip_prefix("set default=\""))
                    .and_then(|l| l.strip_suffix('"'))
                    .expect("grub.cfg sets a default")
                    .to_owned();
                self.count_default_boot(&cfg, &env).unwrap_or(default)
            }
        };
        self.boot(entry.strip_prefix("upgradectl-").expect("our entry id"));
        let _ = fs::remove_file(self.path("run/upgradectl/boot-report"));
        entry
    }

    /// Boot counting as grub.cfg spells it out: below the limit the count goes up (saved) and
    /// the default boots (`None`); at the limit the entry it names boots instead.
    fn count_default_boot(&self, cfg: &str, env: &BTreeMap<String, String>) -> Option<String> {
        let at_limit = "  if [ \"${upgradectl_boots}\" = 3 ]; then\n    set default=\"";
        let start = cfg.find(at_limit)? + at_limit.len();
        assert!(cfg.contains("    set upgradectl_boots=1\n  fi\n  save_env upgradectl_boots\n"));
        let count = env.get("upgradectl_boots").map(String::as_str);
        let next = match count {
            Some("3") => return Some(cfg[start..].split('"').next().unwrap().to_owned()),
            Some("2") => "3",
            Some("1") => "2",
            _ => "1",
        };
        let env = self.grubenv_path();
        tool(&[
            "grub-editenv",
            env.to_str().unwrap(),
            "set",
            &format!("upgradectl_boots={next}"),
        ]);
        None
    }

    /// `grub-editenv grubenv list`, parsed.
    pub fn grubenv(&self) -> BTreeMap<String, String> {
        tool(&[
            "grub-editenv",
            self.grubenv_path().to_str().unwrap(),
            "list",
        ])
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Asserts that grub.cfg is valid GRUB script and names the given entries, in order.
    #[track_caller]
    pub fn assert_menu(&self, entries: &[&str]) {
        tool(&[
            "grub-script-check",
            self.host("boot/grub/grub.cfg").to_str().unwrap(),
        ]);
        let ids: Vec<String> = self
            .grub_cfg()
            .lines()
            .filter(|l| l.starts_with("menuentry "))
            .map(|l| {
                l.split("--id ")
                    .nth(1)
                    .unwrap()
                    .trim_end_matches(" {")
                    .to_owned()
            })
            .collect();
        let want: Vec<String> = entries.iter().map(|v| format!("upgradectl-{v}")).collect();
        assert_eq!(ids, want, "menu entries in\n{}", self.grub_cfg());
    }

    /// The default entry grub.cfg sets.
    pub fn grub_default(&self) -> Option<String> {
        self.grub_cfg()
            .lines()
            .find_map(|l| l.strip_prefix("set default=\"upgradectl-"))
            .map(|l| l.trim_end_matches('"').to_owned())
    }

    pub fn set_config(&self, text: &str) {
        fs::write(self.path("etc/upgradectl/upgradectl.toml"), text).unwrap();
    }

    /// Replaces the health checks with one that exits 3.
    pub fn fail_health(&self) {
        self.set_config(&CONFIG.replace(
            "command = [\"true\"]",
            "command = [\"sh\", \"-c\", \"echo sshd is down >&2; exit 3\"]",
        ));
    }

    pub fn state(&self) -> Value {
        serde_json::from_slice(&fs::read(self.state_path()).unwrap()).unwrap()
    }

    pub fn write_state(&self, state: &Value) {
        fs::create_dir_all(self.state_path().parent().unwrap()).unwrap();
        fs::write(self.state_path(), serde_json::to_vec_pretty(state).unwrap()).unwrap();
    }

    /// What `prepare` records for a complete, verified image.
    pub fn register_prepared(&self, v: &str) {
        let mut s = self.state();
        s["images"][v] = serde_json::json!({"state": "prepared"});
        s["prepared"] = v.into();
        self.write_state(&s);
    }

    /// `upgradectl --root ROOT --json ARGS`, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin("upgradectl"));
        c.arg("--root").arg(self.root()).arg("--json").args(args);
        // The log level is the flags' (and the default), and stderr is never the journal.
        for var in ["UPGRADECTL_LOG", "RUST_LOG", "JOURNAL_STREAM"] {
            c.env_remove(var);
        }
        c
    }

    /// Runs `upgradectl --root ROOT --json ARGS`.
    pub fn run(&self, args: &[&str]) -> Run {
        run_command(self.command(args))
    }

    /// Runs `upgradectl --root ROOT --json ARGS` with these environment variables set.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.command(args);
        c.envs(env.iter().copied());
        from_output(c.output().unwrap())
    }

    /// Runs `upgradectl --root ROOT --json ARGS` with fail points armed (`FAILPOINTS`, see
    /// `sys::faults`). Returns the exit code, `None` when the process was killed.
    pub fn run_faulty(&self, args: &[&str], failpoints: &str) -> (Option<i32>, String) {
        let out = self
            .command(args)
            .env("FAILPOINTS", failpoints)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// Asserts what must hold after any interruption, however it came: `status` works, the
    /// lock is free, no image is attached to a loop device or mounted (a killed process's
    /// private mount namespace may take a moment to go), grubenv and grub.cfg are valid, and
    /// every image GRUB can boot is a clean ext4 filesystem.
    #[track_caller]
    pub fn assert_consistent(&self, after: &str) {
        let status = self.run(&["status"]);
        assert_eq!(
            status.code, 0,
            "after {after}: status fails: {}",
            status.stdout
        );
        let lock = self.run(&["cleanup", "--dry-run"]);
        assert_ne!(lock.code, 5, "after {after}: the lock is still held");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for entry in fs::read_dir(self.host("images")).unwrap() {
            let img = entry.unwrap().path();
            loop {
                let held = tool(&["losetup", "-j", img.to_str().unwrap()]);
                if held.trim().is_empty() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "after {after}: {} is still attached: {held}",
                    img.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains("upgradectl-mnt-"),
            "after {after}: a mount leaked:\n{mounts}"
        );
        self.grubenv();
        tool(&[
            "grub-script-check",
            self.host("boot/grub/grub.cfg").to_str().unwrap(),
        ]);
        for v in self.menu_versions() {
            let img = self.image(&v);
            let out = Command::new("e2fsck")
                .args(["-fn", img.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "after {after}: image {v} in GRUB's menu is not clean: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }

    /// The versions grub.cfg has entries for.
    pub fn menu_versions(&self) -> Vec<String> {
        self.grub_cfg()
            .lines()
            .filter_map(|l| l.split("--id upgradectl-").nth(1))
            .map(|l| l.trim_end_matches(" {").to_owned())
            .collect()
    }

    pub fn status(&self) -> Value {
        self.run(&["status"]).expect(0).last().clone()
    }

    /// Mounts an image read-only (through `mount -o loop,ro`, not upgradectl's code).
    pub fn mount_ro(&self, v: &str) -> RoMount {
        let dir = tempfile::tempdir().unwrap();
        tool(&[
            "mount",
            "-t",
            "ext4",
            "-o",
            "loop,ro",
            self.image(v).to_str().unwrap(),
            dir.path().to_str().unwrap(),
        ]);
        RoMount { dir }
    }

    /// Asserts the image file is a clean ext4 filesystem that no loop device holds any more.
    #[track_caller]
    pub fn assert_image_released(&self, v: &str) {
        let img = self.image(v);
        let held = tool(&["losetup", "-j", img.to_str().unwrap()]);
        assert!(held.trim().is_empty(), "still attached: {held}");
        tool(&["e2fsck", "-fn", img.to_str().unwrap()]);
    }
}

/// A read-only mount for looking into an image; unmounted on drop.
pub struct RoMount {
    dir: tempfile::TempDir,
}

impl RoMount {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel.trim_start_matches('/'))
    }
}

impl Drop for RoMount {
    fn drop(&mut self) {
        umount_retrying(self.dir.path());
    }
}

impl Drop for HostRoot {
    fn drop(&mut self) {
        if self.host_disk.is_some() {
            // The host partition, then the shared bind under it.
            umount_retrying(&self.host(""));
            umount_retrying(&self.host(""));
        }
    }
}

/// Unmounts `path`. A child spawned by a parallel test may briefly hold a descriptor inherited
/// from this process (between fork and exec): retry, then detach lazily, never leak.
pub fn umount_retrying(path: &Path) {
    for _ in 0..20 {
        let ok = Command::new("umount")
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = Command::new("umount").arg("-l").arg(path).status();
}
