//! Every crash state of the host partition during a switch, CrashMonkey-style, without
//! device-mapper: a power cut at any point of `init`, `upgrade`, `confirm` and `revert` leaves
//! a box that GRUB boots and that the next upgradectl run completes on.
//!
//! The host partition's disk is a file `disk` served by a tiny FUSE filesystem (`RecordingFs`)
//! that keeps it in memory and logs every write (offset, bytes) and every fsync in the order
//! they arrive. The file is attached to a loop device (buffered: the loop driver turns the ext4
//! filesystem's flushes and FUA writes into fsyncs of the file) and mounted at ROOT/host; the
//! real binary runs on that box. FUSE's writeback cache is off (we never ask for it), so each
//! write reaches the log before the syscall that made it returns; `log_order_is_the_disk_order`
//! checks that assumption.
//!
//! A crash state is the disk before the operation plus the writes logged up to a cut. The
//! model is a disk with a volatile write cache: everything before the last fsync is durable,
//! any subset of the writes since may have reached the platter. Every fsync boundary is
//! checked; between two fsyncs, random subsets of the writes since the last one (seeded, the
//! seed printed). `CRASH_STATES=N` raises the number of states (default: a CI sample);
//! `CRASH_SEED=S` replays a run. The invariants are in `docs/boot-chain.md` ("Crash states").

mod common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

use common::{mkfs_host, umount_retrying, HostRoot};

/// Size of the host partition: small, so that each crash state is quick to build.
const DISK_BYTES: u64 = 80 << 20;

/// When `CRASH_STATES` is not set (CI): this many fsync boundaries, evenly spaced over the
/// operations, then sampled subsets up to `CI_STATES` in all. `CRASH_STATES=N` checks every
/// boundary, then subsets up to N in all.
const CI_BOUNDARIES: usize = 48;
const CI_STATES: usize = 64;

/// Seed of the subset sampling when `CRASH_SEED` is not set.
const DEFAULT_SEED: u64 = 0x0c2a_5eed;

const ROOT_INO: u64 = 1;
const DISK_INO: u64 = 2;
const TTL: Duration = Duration::from_secs(3600);

/// One request that reached the disk file, in arrival order.
#[derive(Clone, Debug)]
enum Event {
    Write { offset: u64, bytes: Vec<u8> },
    Fsync,
}

/// The disk's current bytes and everything that happened to it.
struct Disk {
    data: Vec<u8>,
    log: Vec<Event>,
}

/// The FUSE filesystem: a root directory holding one file, `disk`.
struct RecordingFs {
    disk: Arc<Mutex<Disk>>,
}

impl RecordingFs {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap()
    }
}

/// Attributes of the root directory or of `disk`.
fn attr(ino: u64) -> FileAttr {
    let (kind, perm, size) = match ino {
        ROOT_INO => (FileType::Directory, 0o755, 0),
        _ => (FileType::RegularFile, 0o600, DISK_BYTES),
    };
    FileAttr {
        ino,
        size,
        blocks: size / 512,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for RecordingFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT_INO && name == "disk" {
            reply.entry(&TTL, &attr(DISK_INO), 0);
        } else {
            reply.error(nix::libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        reply.attr(&TTL, &attr(ino));
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let disk = self.disk();
        let start = (offset as usize).min(disk.data.len());
        let end = (start + size as usize).min(disk.data.len());
        reply.data(&disk.data[start..end]);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut disk = self.disk();
        let start = offset as usize;
        if start + data.len() > disk.data.len() {
            return reply.error(nix::libc::ENOSPC);
        }
        disk.data[start..start + data.len()].copy_from_slice(data);
        disk.log.push(Event::Write {
            offset: offset as u64,
            bytes: data.to_vec(),
        });
        reply.written(data.len() as u32);
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        self.disk().log.push(Event::Fsync);
        reply.ok();
    }

    /// A close, not a durability point: nothing to log.
    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }
}

/// The FUSE mount serving `disk`; unmounted on drop.
struct ServedDisk {
    disk: Arc<Mutex<Disk>>,
    dir: tempfile::TempDir,
    _session: fuser::BackgroundSession,
}

impl ServedDisk {
    /// Formats a host partition in a plain file and serves its bytes at `<mount>/disk`.
    fn new() -> ServedDisk {
        let plain = tempfile::NamedTempFile::new().unwrap();
        plain.as_file().set_len(DISK_BYTES).unwrap();
        mkfs_host(plain.path());
        let disk = Arc::new(Mutex::new(Disk {
            data: fs::read(plain.path()).unwrap(),
            log: Vec::new(),
        }));
        let dir = tempfile::tempdir().unwrap();
        let fs = RecordingFs { disk: disk.clone() };
        let options = [MountOption::FSName("crash-states".into()), MountOption::RW];
        let session = fuser::spawn_mount2(fs, dir.path(), &options).expect("mounting FUSE");
        ServedDisk {
            disk,
            dir,
            _session: session,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("disk")
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap()
    }

    /// The log's length: the index of the next event.
    fn cursor(&self) -> usize {
        self.lock().log.len()
    }

    /// The disk's bytes now, and the log emptied: the base of every crash state.
    fn snapshot(&self) -> Vec<u8> {
        let mut disk = self.lock();
        disk.log.clear();
        disk.data.clone()
    }
}

/// `sync -f`: the filesystem at `path` writes and flushes everything it holds.
fn syncfs(path: &Path) {
    common::tool(&["sync", "-f", path.to_str().unwrap()]);
}

/// The assumption the whole test rests on: a write and fsync on the mounted filesystem reach
/// the log before `fsync` returns, the data write before an fsync (no writeback cache, no
/// reordering behind our back).
fn assert_log_order_is_disk_order(h: &HostRoot, served: &ServedDisk) {
    syncfs(&h.host(""));
    let from = served.cursor();
    let marker: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let file = File::create(h.host("crash-marker")).unwrap();
    file.write_all_at(&marker, 0).unwrap();
    file.sync_all().unwrap();
    let log = served.lock().log[from..].to_vec();
    let write = log
        .iter()
        .position(
            |e| matches!(e, Event::Write { bytes, .. } if bytes.windows(4096).any(|w| w == marker)),
        )
        .expect("the marker's data write is in the log when fsync returns");
    assert!(
        log[write..].iter().any(|e| matches!(e, Event::Fsync)),
        "no fsync logged after the marker's data write: {} events",
        log.len()
    );
}

/// One upgradectl invocation whose crash states are checked.
struct Op {
    name: &'static str,
    args: &'static [&'static str],
    /// The image the box runs during the operation (its kernel command line).
    booted: &'static str,
    /// `init` starts from a box GRUB cannot boot yet (no grub.cfg): until grub.cfg exists,
    /// there is nothing for GRUB to boot, before as after the cut.
    provisioning: bool,
    /// The log range of the operation: `[start, end)`.
    start: usize,
    end: usize,
}

/// Runs the operation on the recorded box, then `sync -f`: every write it caused is logged.
fn record(
    h: &HostRoot,
    served: &ServedDisk,
    name: &'static str,
    args: &'static [&'static str],
    booted: &'static str,
) -> Op {
    let start = served.cursor();
    h.run(args).expect(0);
    syncfs(&h.host(""));
    Op {
        name,
        args,
        booted,
        provisioning: name == "init",
        start,
        end: served.cursor(),
    }
}

/// Runs the switch on a box whose host partition is the recorded disk. Returns the disk as it
/// was before the first operation and the operations.
fn record_switch(served: &ServedDisk) -> (Vec<u8>, Vec<Op>) {
    let h = HostRoot::on_host_disk(&served.path());
    assert_log_order_is_disk_order(&h, served);
    h.remount_host();
    let base = served.snapshot();
    let mut ops = vec![record(
        &h,
        served,
        "init",
        &["init", "--version", "1.0"],
        "1.0",
    )];
    h.register_prepared("2.0");
    syncfs(&h.host(""));
    ops.push(record(
        &h,
        served,
        "upgrade",
        &["upgrade", "--no-reboot"],
        "1.0",
    ));
    // GRUB's save_env writes the environment block in place: at home, no journal.
    h.grub_reboot();
    h.remount_host();
    ops.push(record(
        &h,
        served,
        "confirm",
        &["confirm", "--no-reboot"],
        "2.0",
    ));
    ops.push(record(
        &h,
        served,
        "revert",
        &["revert", "--no-reboot"],
        "2.0",
    ));
    drop(h);
    (base, ops)
}

/// A disk after a power cut: every write before log index `durable`, plus the writes `extra`
/// (indices after `durable`, before the next fsync) that made it out of the volatile cache.
struct CrashState {
    op: usize,
    durable: usize,
    extra: Vec<usize>,
}

/// The fsync boundaries of an operation: its start, each fsync, its end.
fn boundaries(log: &[Event], op: &Op) -> Vec<usize> {
    let mut b = vec![op.start];
    b.extend((op.start..op.end).filter(|&i| matches!(log[i], Event::Fsync)));
    b.push(op.end);
    b.dedup();
    b
}

/// The crash states to check: every fsync boundary of every operation, then random subsets of
/// the writes between two boundaries, round-robin over those epochs, until `budget` states.
fn plan(log: &[Event], ops: &[Op], budget: Budget, rng: &mut StdRng) -> Vec<CrashState> {
    let mut states = Vec::new();
    let mut epochs = Vec::new();
    for (o, op) in ops.iter().enumerate() {
        let b = boundaries(log, op);
        states.extend(b.iter().map(|&d| CrashState {
            op: o,
            durable: d,
            extra: vec![],
        }));
        for pair in b.windows(2) {
            let writes: Vec<usize> = (pair[0]..pair[1])
                .filter(|&i| matches!(log[i], Event::Write { .. }))
                .collect();
            if writes.len() > 1 {
                epochs.push((o, pair[0], writes));
            }
        }
    }
    dedup_boundaries(log, &mut states);
    spread(&mut states, budget.boundaries);
    let mut next = 0;
    while states.len() < budget.states && !epochs.is_empty() {
        let (op, durable, writes) = &epochs[next % epochs.len()];
        let keep: f64 = rng.gen_range(0.05..0.95);
        let extra = writes
            .iter()
            .copied()
            .filter(|_| rng.gen_bool(keep))
            .collect();
        states.push(CrashState {
            op: *op,
            durable: *durable,
            extra,
        });
        next += 1;
    }
    states
}

/// How many crash states to check.
struct Budget {
    /// At most this many fsync boundaries, evenly spaced.
    boundaries: usize,
    /// In all, with the sampled subsets.
    states: usize,
}

impl Budget {
    /// `CRASH_STATES=N`: every boundary and N states in all; else the CI sample.
    fn from_env() -> Budget {
        match env_number("CRASH_STATES") {
            Some(n) => Budget {
                boundaries: usize::MAX,
                states: n as usize,
            },
            None => Budget {
                boundaries: CI_BOUNDARIES,
                states: CI_STATES,
            },
        }
    }
}

/// Keeps `cap` of the states, evenly spaced, the first and the last among them.
fn spread(states: &mut Vec<CrashState>, cap: usize) {
    let len = states.len();
    if len <= cap || cap < 2 {
        return;
    }
    let keep: Vec<usize> = (0..cap).map(|i| i * (len - 1) / (cap - 1)).collect();
    let mut i = 0;
    states.retain(|_| {
        i += 1;
        keep.contains(&(i - 1))
    });
}

/// Drops the boundary states whose disk is the one before: no write since (consecutive fsyncs).
fn dedup_boundaries(log: &[Event], states: &mut Vec<CrashState>) {
    let writes_before = |d: usize| {
        log[..d]
            .iter()
            .filter(|e| matches!(e, Event::Write { .. }))
            .count()
    };
    states.dedup_by_key(|s| writes_before(s.durable));
}

/// Writes `data` at `offset` of `disk`.
fn apply(disk: &mut [u8], event: &Event) {
    if let Event::Write { offset, bytes } = event {
        let o = *offset as usize;
        disk[o..o + bytes.len()].copy_from_slice(bytes);
    }
}

/// Builds the crash state's disk file at `out` (sparse: zero blocks are holes).
fn materialize(base: &[u8], log: &[Event], state: &CrashState, out: &Path) {
    let mut disk = base.to_vec();
    log[..state.durable]
        .iter()
        .for_each(|e| apply(&mut disk, e));
    state.extra.iter().for_each(|&i| apply(&mut disk, &log[i]));
    let _ = fs::remove_file(out);
    let file = File::create(out).unwrap();
    file.set_len(disk.len() as u64).unwrap();
    for (n, block) in disk.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            file.write_all_at(block, n as u64 * 4096).unwrap();
        }
    }
}

/// Runs a tool; its stdout, or a message naming it and its output.
fn run(argv: &[&str]) -> Result<String, String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("starting {argv:?}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{argv:?} exits {:?}: {text}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Copies `/rel` out of the disk file with GRUB's own ext4 driver (no journal replay).
fn grub_cp(disk: &Path, rel: &str, out: &Path) -> Result<(), String> {
    let d = disk.to_str().unwrap();
    run(&["grub-fstest", d, "cp", rel, out.to_str().unwrap()]).map(drop)
}

/// The entry GRUB boots: `next_entry` when set, else grub.cfg's default.
fn grub_entry(env: &str, cfg: &str) -> Result<String, String> {
    let next = env
        .lines()
        .find_map(|l| l.strip_prefix("next_entry="))
        .filter(|e| !e.is_empty());
    let default = || {
        cfg.lines()
            .find_map(|l| l.strip_prefix("set default=\""))
            .and_then(|l| l.strip_suffix('"'))
    };
    next.or_else(default)
        .map(str::to_owned)
        .ok_or_else(|| format!("no entry to boot in grubenv {env:?} or grub.cfg"))
}

/// Invariant 1, as GRUB sees the disk: grub.cfg and grubenv are valid and the entry GRUB boots
/// names an image whose bytes form a clean ext4 filesystem.
fn check_grub_view(disk: &Path, op: &Op, scratch: &Path) -> Result<(), String> {
    let cfg_out = scratch.join("grub.cfg");
    if let Err(e) = grub_cp(disk, "/boot/grub/grub.cfg", &cfg_out) {
        return if op.provisioning { Ok(()) } else { Err(e) };
    }
    run(&["grub-script-check", cfg_out.to_str().unwrap()])?;
    let env_out = scratch.join("grubenv");
    grub_cp(disk, "/boot/grub/grubenv", &env_out)?;
    let len = fs::metadata(&env_out).unwrap().len();
    if len != 1024 {
        return Err(format!("GRUB reads a grubenv of {len} bytes"));
    }
    let env = run(&["grub-editenv", env_out.to_str().unwrap(), "list"])?;
    let cfg = fs::read_to_string(&cfg_out).map_err(|e| e.to_string())?;
    let entry = grub_entry(&env, &cfg)?;
    if !cfg.contains(&format!("--id {entry} {{")) {
        return Err(format!(
            "GRUB boots {entry}, which grub.cfg has no entry for"
        ));
    }
    let version = entry.strip_prefix("upgradectl-").ok_or("not our entry")?;
    let img = scratch.join("boot.img");
    grub_cp(disk, &format!("/images/{version}.img"), &img)?;
    let checked = run(&["e2fsck", "-fn", img.to_str().unwrap()]);
    fs::remove_file(&img).unwrap();
    checked
        .map(drop)
        .map_err(|e| format!("GRUB boots {entry}: {e}"))
}

/// Mounts the disk once (Linux replays the journal), unmounts it, and `e2fsck -fn` must find
/// it clean.
fn replay_and_fsck(disk: &Path) -> Result<(), String> {
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    run(&[
        "mount",
        "-t",
        "ext4",
        "-o",
        "loop",
        disk.to_str().unwrap(),
        m,
    ])?;
    umount_retrying(mnt.path());
    run(&["e2fsck", "-fn", disk.to_str().unwrap()]).map(drop)
}

/// Invariant 2, as Linux sees the disk: clean after journal replay; on a box with that host
/// partition `status` works, state.json parses, and the next run completes (exits 0, done, or
/// 3, nothing to do; or `confirm`'s documented rollback, exit 1 with outcome
/// `trial-did-not-boot`): `init` again during provisioning, else the reboot GRUB does
/// (`grub_reboot`: a set `next_entry` is booted once) and `confirm`, as the box's
/// `upgradectl-confirm.service` runs it at every boot. (The reboot is simulated on the
/// replayed disk: GRUB's in-place `save_env` before the replay is not modelled.) Then the box
/// is settled: `confirm` once
/// more exits 3 (nothing to do), `init` once more exits 0 again.
fn check_linux_view(disk: &Path, op: &Op) -> Result<(), String> {
    replay_and_fsck(disk)?;
    let h = HostRoot::attach(disk);
    h.boot(op.booted);
    let next: &[&str] = if op.provisioning {
        op.args
    } else {
        h.grub_reboot();
        &["confirm", "--no-reboot"]
    };
    let status = h.run(&["status"]);
    if status.code != 0 {
        return Err(format!("status exits {}: {}", status.code, status.stdout));
    }
    match fs::read(h.state_path()) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .map(drop)
            .map_err(|e| format!("state.json does not parse: {e}"))?,
        Err(_) if op.provisioning => {}
        Err(e) => return Err(format!("state.json: {e}")),
    }
    let again = h.run(next);
    let rolled_back = again.code == 1
        && again
            .lines
            .iter()
            .any(|l| l["outcome"] == "trial-did-not-boot");
    if !matches!(again.code, 0 | 3) && !rolled_back {
        return Err(format!(
            "{next:?} exits {}: {}{}",
            again.code, again.stdout, again.stderr
        ));
    }
    // The box is settled: `confirm` once more has nothing to do; `init` is idempotent.
    let settled = h.run(next);
    match (settled.code, op.provisioning) {
        (3, _) | (0, true) => Ok(()),
        (c, _) => Err(format!(
            "{next:?} a second time exits {c}: {}",
            settled.stdout
        )),
    }
}

/// Runs a check; a panic (a helper's assertion) is a failure of this state, not of the test.
fn catching(f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(format!("panicked: {:?}", p.downcast_ref::<String>())))
}

/// Builds the crash state and checks both views; the failure names the state.
fn check(base: &[u8], log: &[Event], ops: &[Op], s: &CrashState, dir: &Path) -> Result<(), String> {
    let disk = dir.join("crash.disk");
    materialize(base, log, s, &disk);
    let op = &ops[s.op];
    catching(|| check_grub_view(&disk, op, dir))
        .map_err(|e| format!("GRUB view: {e}"))
        .and_then(|()| {
            catching(|| check_linux_view(&disk, op)).map_err(|e| format!("Linux view: {e}"))
        })
        .map_err(|e| {
            format!(
                "{} cut after event {} of [{}, {}) (+{} volatile writes {:?}): {e}",
                op.name,
                s.durable,
                op.start,
                op.end,
                s.extra.len(),
                s.extra
            )
        })
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().expect(name))
}

#[test]
fn every_crash_state_of_a_switch_boots_and_recovers() {
    let started = Instant::now();
    let served = ServedDisk::new();
    let (base, ops) = record_switch(&served);
    let log = served.lock().log.clone();
    let seed = env_number("CRASH_SEED").unwrap_or(DEFAULT_SEED);
    let states = plan(
        &log,
        &ops,
        Budget::from_env(),
        &mut StdRng::seed_from_u64(seed),
    );
    let fsyncs = log.iter().filter(|e| matches!(e, Event::Fsync)).count();
    eprintln!(
        "crash states: {} events ({fsyncs} fsyncs) in {}; seed {seed}; checking {} states",
        log.len(),
        ops.iter()
            .map(|o| format!("{} [{}, {})", o.name, o.start, o.end))
            .collect::<Vec<_>>()
            .join(", "),
        states.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let failures: Vec<String> = states
        .iter()
        .filter_map(|s| check(&base, &log, &ops, s, dir.path()).err())
        .collect();
    eprintln!(
        "crash states: {} checked, {} failed, in {:.1} s",
        states.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} crash states fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
