//! The box's delivery pipeline against the shell's on real artifacts, into real `zfs receive`,
//! for bench/box-pipeline (issue 10: "box pipeline ≥ 1.0x the shell pipeline's throughput").
//!
//!   box-pipeline build STORE STREAMS [FROM] TO
//!       builds artifact `full-TO` or `FROM-to-TO` into STORE with the server's build code
//!       (server::build, default tuning), from STREAMS/full-V (full send streams),
//!       STREAMS/A-to-B (incremental ones) and STREAMS/ref-V (a snapshot's bytes: what
//!       `zstd-ref` is compressed against); prints what it built and in how long.
//!   box-pipeline compare STORE DATASET SCRATCH ROUNDS FULL DIFF
//!       serves STORE (the server's HTTP code), then receives artifact FULL into DATASET and
//!       DIFF onto it, ROUNDS times each way: the box's pipeline as `prepare` runs it
//!       (download into SCRATCH with chunk verification, decoding and `zfs receive`
//!       overlapping: `stream::overlap`, `receive::receive`) and the shell's (`curl | xz -dc |
//!       zfs receive`; `curl | zstd -dc --patch-from | zfs receive`, which cannot read the
//!       snapshot's block device, so with the copy of it to a file it needs, and without).
//!       With GUIDS=FILE (lines `VERSION GUID`, the server's snapshots) every receive is
//!       checked to hold the server's snapshot.
//!
//! ZFS runs only in the VM tier's guest: bench/box-pipeline runs this there.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use upgradectl::appliance::prepare::{fetch, receive, stream};
use upgradectl::core::manifest::{descriptor_of_verified_target, Descriptor};
use upgradectl::core::version::Version;
use upgradectl::server::{build, Server, Store, StreamSource, Tuning};
use upgradectl::sys::zfs;

/// The decoder limit of a box with the default configuration (`download.max_decoder_mib`).
const BOX_MAX_DECODER: u64 = 256 << 20;

/// Streams from files, as named in the module's note.
struct FileSource(PathBuf);

impl FileSource {
    fn path(&self, name: String) -> PathBuf {
        self.0.join(name)
    }
}

impl StreamSource for FileSource {
    fn send(&self, from: Option<&Version>, to: &Version, out: &mut dyn Write) -> Result<()> {
        let name = match from {
            Some(from) => format!("{from}-to-{to}"),
            None => format!("full-{to}"),
        };
        let path = self.path(name);
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        std::io::copy(&mut file, out)?;
        Ok(())
    }
    fn has(&self, v: &Version) -> Result<bool> {
        Ok(self.path(format!("full-{v}")).exists())
    }
    fn reference(&self, v: &Version) -> Result<PathBuf> {
        Ok(self.path(format!("ref-{v}")))
    }
    fn full_len(&self, v: &Version) -> Result<u64> {
        Ok(std::fs::metadata(self.path(format!("full-{v}")))?.len())
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["build", store, streams, to] => build_one(store, streams, None, to),
        ["build", store, streams, from, to] => build_one(store, streams, Some(from), to),
        ["compare", store, dataset, scratch, rounds, full, diff] => {
            compare(store, dataset, scratch, rounds.parse()?, full, diff)
        }
        _ => bail!(
            "usage: box-pipeline build STORE STREAMS [FROM] TO\n       \
             box-pipeline compare STORE DATASET SCRATCH ROUNDS FULL DIFF"
        ),
    }
}

fn build_one(store: &str, streams: &str, from: Option<&str>, to: &str) -> Result<()> {
    let store = Store::open(Path::new(store))?;
    let from: Option<Version> = from.map(str::parse).transpose()?;
    let to: Version = to.parse()?;
    let started = Instant::now();
    let built = build::build(
        &store,
        &FileSource(streams.into()),
        from.as_ref(),
        &to,
        Tuning::default().zstd_ref(),
    )?;
    let secs = started.elapsed().as_secs_f64();
    let Some(name) = built else {
        println!("not built: no smaller than the full stream ({secs:.1} s)");
        return Ok(());
    };
    let d = descriptor(&store, &name)?;
    println!(
        "built {name}: {} bytes as {:?}, window_log {:?}, in {secs:.1} s",
        d.size, d.encoding, d.window_log
    );
    Ok(())
}

/// The descriptor the server wrote for `name` (a box takes it from the signed listing).
fn descriptor(store: &Store, name: &str) -> Result<Descriptor> {
    let bytes = std::fs::read(store.descriptor_path(name))?;
    descriptor_of_verified_target(&bytes, name)
}

fn compare(
    store: &str,
    dataset: &str,
    scratch: &str,
    rounds: usize,
    full: &str,
    diff: &str,
) -> Result<()> {
    let store = Store::open(Path::new(store))?;
    let (full, diff) = (descriptor(&store, full)?, descriptor(&store, diff)?);
    let base = diff.from.clone().context("DIFF is not a diff")?;
    ensure!(full.to == base, "FULL must be the diff's base, {base}");
    for d in [&full, &diff] {
        // The server's reads come from the page cache in every round alike.
        std::fs::read(store.artifact_path(&d.name))?;
    }
    let guids = match std::env::var_os("GUIDS") {
        Some(path) => read_guids(Path::new(&path))?,
        None => HashMap::new(),
    };
    let server = Server::new(
        store,
        Arc::new(FileSource(PathBuf::new())),
        Tuning::default(),
    );
    let addr = upgradectl::server::spawn_local(Arc::new(server))?;
    let url = |d: &Descriptor| format!("http://{addr}/v1/artifacts/{}", d.name);
    let scratch = Path::new(scratch);
    let received = |v: &Version| check_received(dataset, v, &guids);
    let receive_cmd = format!("zfs receive -s -F {dataset}");

    let mut times: Vec<(String, Vec<f64>)> = Vec::new();
    let mut record = |what: &str, secs: f64| {
        println!("  {what}: {secs:.2} s");
        match times.iter_mut().find(|(w, _)| w == what) {
            Some((_, all)) => all.push(secs),
            None => times.push((what.to_owned(), vec![secs])),
        }
    };
    let fresh = || -> Result<()> {
        if zfs::exists(dataset)? {
            zfs::destroy_recursive(dataset)?;
        }
        Ok(())
    };
    let rollback = || sh(&format!("zfs rollback -r {dataset}@{base}"));
    let reference_file = scratch.join(format!("ref-{base}"));
    for round in 1..=rounds {
        println!("round {round}");
        fresh()?;
        record(
            "full: box",
            box_pipeline(&url(&full), &full, scratch, dataset)?,
        );
        received(&full.to)?;
        for xz in ["xz -dc", "xz -T0 -dc"] {
            fresh()?;
            let cmd = format!("curl -sf {} | {xz} | {receive_cmd}", url(&full));
            record(&format!("full: curl | {xz} | zfs receive"), sh(&cmd)?);
            received(&full.to)?;
        }

        record(
            "diff: box",
            box_pipeline(&url(&diff), &diff, scratch, dataset)?,
        );
        received(&diff.to)?;
        rollback()?;
        let device = zfs::snapshot_device(dataset, &base)?;
        let copy = format!(
            "dd if={} of={} bs=1M status=none",
            device.display(),
            reference_file.display()
        );
        let zstd = format!(
            "curl -sf {} | zstd -dc --long=31 --memory=2048MB --patch-from={} | {receive_cmd}",
            url(&diff),
            reference_file.display()
        );
        record(
            "diff: copy base to a file; curl | zstd --patch-from | zfs receive",
            sh(&format!("{copy} && {zstd}"))?,
        );
        received(&diff.to)?;
        rollback()?;
        record(
            "diff: curl | zstd --patch-from | zfs receive (base already a file)",
            sh(&zstd)?,
        );
        received(&diff.to)?;
        std::fs::remove_file(&reference_file)?;
        rollback()?;
    }

    // The box's row of each artifact comes first; the shell's rows are compared with it.
    println!("\n{rounds} round(s): median and fastest; box = the shell's median over the box's");
    let median = |all: &[f64]| {
        let mut all = all.to_vec();
        all.sort_by(f64::total_cmp);
        let mid = all.len() / 2;
        if all.len() % 2 == 1 {
            all[mid]
        } else {
            (all[mid - 1] + all[mid]) / 2.0
        }
    };
    let mut boxed = 0.0;
    for (what, all) in &times {
        let (m, fastest) = (
            median(all),
            all.iter().copied().fold(f64::INFINITY, f64::min),
        );
        let speedup = if what.ends_with(": box") {
            boxed = m;
            String::new()
        } else {
            format!("   box {:.2}x", m / boxed)
        };
        println!("{what:<72} {m:>7.2} s (fastest {fastest:.2} s){speedup}");
    }
    Ok(())
}

/// The box's pipeline on one artifact: download into `scratch` (chunk verification), decode
/// and `zfs receive` reading only verified bytes as they arrive. Seconds.
fn box_pipeline(url: &str, d: &Descriptor, scratch: &Path, dataset: &str) -> Result<f64> {
    let dest = scratch.join(&d.name);
    for stale in [dest.clone(), fetch::partial_path(&dest)] {
        let _ = std::fs::remove_file(stale);
    }
    let limits = fetch::Limits {
        stall: Duration::from_secs(60),
        min_speed: 1,
    };
    // As `prepare`: frames longer than the box's decoder memory are decoded through a file.
    let on_disk = receive::on_disk(d, BOX_MAX_DECODER, scratch);
    let started = Instant::now();
    let client = fetch::client(&limits)?;
    let (fetched, received) = stream::overlap(
        |verified| {
            let r = fetch::download_watched(
                &client,
                url,
                &dest,
                d,
                &limits,
                &mut |_, _| {},
                Some(verified),
            );
            verified.end(r, d.size)
        },
        |input| {
            receive::receive(
                input,
                d.encoding,
                dataset,
                d.from.as_ref(),
                &d.to,
                BOX_MAX_DECODER,
                on_disk.clone(),
            )
        },
    );
    fetched?;
    received?;
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_file(&dest)?;
    Ok(secs)
}

/// Runs `cmd` with bash (pipefail); seconds.
fn sh(cmd: &str) -> Result<f64> {
    let started = Instant::now();
    let status = Command::new("bash")
        .args(["-o", "pipefail", "-c", cmd])
        .status()
        .with_context(|| format!("running {cmd}"))?;
    ensure!(status.success(), "{cmd}: {status}");
    Ok(started.elapsed().as_secs_f64())
}

fn read_guids(path: &Path) -> Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(v, g)| (v.to_owned(), g.trim().to_owned()))
        .collect())
}

/// `dataset@v` exists, and is the server's snapshot when its GUID is known.
fn check_received(dataset: &str, v: &Version, guids: &HashMap<String, String>) -> Result<()> {
    let out = Command::new("zfs")
        .args([
            "get",
            "-Hp",
            "-o",
            "value",
            "guid",
            &format!("{dataset}@{v}"),
        ])
        .output()?;
    ensure!(out.status.success(), "{dataset}@{v} was not received");
    let guid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if let Some(want) = guids.get(&v.to_string()) {
        ensure!(
            &guid == want,
            "{dataset}@{v} has GUID {guid}, the server's {want}"
        );
    }
    Ok(())
}
