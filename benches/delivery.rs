//! Delivery benchmark: upgradectl's code against the plain shell equivalent on the same data,
//! in the same run. `cargo bench --bench delivery` (as root is not needed).
//!
//! - sha256 of 1 GiB: `hashing::sha256_file` vs `sha256sum`;
//! - sparse export of an ext4 image of /usr/bin: `export::export` vs `dd bs=1M conv=sparse` (+ sha256sum
//!   for the same end-to-end check), and the allocated size of both results;
//! - the box pipeline, as `prepare` runs it (download, chunk verification and decompression
//!   overlapping; ZFS receive runs in the VM tier), into /dev/null:
//!   - a full stream (xz, multi-threaded decode) vs `curl | xz -dc`;
//!   - a diff as `zstd-ref` (an edited copy of that image compressed against the image itself,
//!     as the server builds one against the base snapshot) vs `curl | zstd -dc --patch-from`;
//!     with both encodings' sizes.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use upgradectl::core::manifest::{Blob, Release};
use upgradectl::core::version::Version;
use upgradectl::server::artifacts::StoredRelease;
use upgradectl::server::{Server, Store, StreamSource};

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

fn sh(cmd: &str) -> f64 {
    let (status, secs) = time(|| {
        Command::new("bash")
            .args(["-c", cmd])
            .stdout(Stdio::null())
            .status()
            .unwrap()
    });
    assert!(status.success(), "{cmd}");
    secs
}

fn row(what: &str, ours: f64, theirs: f64, unit_bytes: u64) {
    let mb = unit_bytes as f64 / 1e6;
    println!(
        "{what:<44} upgradectl {:>7.3}s ({:>7.0} MB/s)   shell {:>7.3}s ({:>7.0} MB/s)   speedup {:.2}x",
        ours,
        mb / ours,
        theirs,
        mb / theirs,
        theirs / ours
    );
}

/// Streams of a directory of files, for the server (ZFS runs in the VM tier).
struct FileSource(std::path::PathBuf);
impl StreamSource for FileSource {
    fn send(&self, _: Option<&Version>, to: &Version, out: &mut dyn Write) -> anyhow::Result<()> {
        std::io::copy(
            &mut std::fs::File::open(self.0.join(format!("full-{to}")))?,
            out,
        )?;
        Ok(())
    }
    fn has(&self, _: &Version) -> anyhow::Result<bool> {
        Ok(true)
    }
    fn reference(&self, v: &Version) -> anyhow::Result<std::path::PathBuf> {
        Ok(self.0.join(format!("full-{v}")))
    }
    fn full_len(&self, v: &Version) -> anyhow::Result<u64> {
        Ok(std::fs::metadata(self.0.join(format!("full-{v}")))?.len())
    }
}

fn main() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();

    // sha256
    let big = d.join("big");
    sh(&format!("head -c 1G /dev/urandom > {}", big.display()));
    sh(&format!("cat {} > /dev/null", big.display())); // warm the page cache
    let (ours, t_ours) = time(|| upgradectl::core::hashing::sha256_file(&big).unwrap());
    let out = Command::new("sha256sum").arg(&big).output().unwrap();
    let (_, t_sh) = time(|| Command::new("sha256sum").arg(&big).output().unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&ours));
    row("sha256 of 1 GiB", t_ours, t_sh, 1 << 30);
    std::fs::remove_file(&big).unwrap();

    // sparse export of a real ext4 image (the files of /usr/bin, about a third full)
    let img = d.join("src.img");
    sh(&format!("mkfs.ext4 -q -F -d /usr/bin {} 1G", img.display()));
    sh(&format!("cat {} > /dev/null", img.display()));
    let sha = upgradectl::core::hashing::sha256_file(&img).unwrap();
    let size = std::fs::metadata(&img).unwrap().len();
    let blob = Blob { size, sha256: sha };
    let ours_out = d.join("ours.img");
    let (_, t_ours) =
        time(|| upgradectl::appliance::prepare::export::export(&img, &ours_out, &blob).unwrap());
    let dd_out = d.join("dd.img");
    let t_sh = sh(&format!(
        "dd if={0} of={1} bs=1M conv=sparse,fsync status=none && sha256sum {1}",
        img.display(),
        dd_out.display()
    ));
    row(
        "sparse export + end-to-end sha256 (1 GiB)",
        t_ours,
        t_sh,
        size,
    );
    let dd_only = d.join("dd-only.img");
    let t_dd = sh(&format!(
        "dd if={} of={} bs=1M conv=sparse,fsync status=none",
        img.display(),
        dd_only.display()
    ));
    row(
        "sparse export, ours (with sha256) vs dd alone",
        t_ours,
        t_dd,
        size,
    );
    let alloc = |p: &Path| (std::fs::metadata(p).unwrap().blocks() * 512) >> 20;
    let used: u64 = String::from_utf8(
        Command::new("du")
            .args(["-sm", "/usr/bin"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .split_whitespace()
    .next()
    .unwrap()
    .parse()
    .unwrap();
    println!(
        "{:<44} upgradectl {} MiB, dd {} MiB allocated (files: {used} MiB, image: {} MiB)",
        "exported image size on disk",
        alloc(&ours_out),
        alloc(&dd_out),
        size >> 20
    );

    // the box pipeline: a served artifact, downloaded, verified, decompressed
    let streams = d.join("streams");
    std::fs::create_dir_all(&streams).unwrap();
    std::fs::copy(&img, streams.join("full-2.0")).unwrap();
    std::fs::copy(&img, streams.join("full-1.0")).unwrap();
    let store = Store::open(&d.join("store")).unwrap();
    let v: Version = "2.0".parse().unwrap();
    store
        .save_releases(&[StoredRelease {
            channel: "stable".into(),
            release: Release {
                version: v.clone(),
                rollout: 100,
                paused: false,
                image: blob.clone(),
            },
        }])
        .unwrap();
    let build_start = Instant::now();
    upgradectl::server::build::build(
        &store,
        &FileSource(streams.clone()),
        None,
        &v,
        upgradectl::server::Tuning::default().zstd_ref(),
    )
    .unwrap();
    let build_secs = build_start.elapsed().as_secs_f64();
    let artifact = store.artifact_path("full-2.0");
    let xz_size = std::fs::metadata(&artifact).unwrap().len();
    println!(
        "{:<44} {build_secs:.1}s, {} MiB -> {} MiB xz",
        "server: build full stream (xz, all cores)",
        size >> 20,
        xz_size >> 20
    );
    let server = Arc::new(Server::new(
        store,
        Arc::new(FileSource(streams)),
        upgradectl::server::Tuning::default(),
    ));
    let addr = upgradectl::server::spawn_local(server).unwrap();
    let base = d.join("streams/full-1.0");
    let full = box_pipeline(addr, d, "full-2.0", None);
    let t_sh = sh(&format!("curl -sf {} | xz -dc > /dev/null", full.url));
    row(
        "box: full stream (xz) vs curl|xz -dc",
        full.secs,
        t_sh,
        size,
    );

    // A diff: 2.0 is 1.0 with 64 MiB of other bytes (libraries) written over it at 256 spread
    // places; its stream is compressed against 1.0 as the reference.
    let mut edited = std::fs::read(&base).unwrap();
    let lib = library_bytes(64 << 20);
    for i in 0..256usize {
        let (from, len) = (((i * 256) << 10) % (lib.len() - (256 << 10)), 256 << 10);
        let at = (i * 7919 * 4096) % (edited.len() - len);
        edited[at..at + len].copy_from_slice(&lib[from..from + len]);
    }
    std::fs::write(d.join("streams/full-2.0"), &edited).unwrap();
    drop(edited);
    let one: Version = "1.0".parse().unwrap();
    let built = upgradectl::server::build::build(
        &Store::open(&d.join("store")).unwrap(),
        &FileSource(d.join("streams")),
        Some(&one),
        &v,
        upgradectl::server::Tuning::default().zstd_ref(),
    )
    .unwrap();
    assert_eq!(built.as_deref(), Some("1.0-to-2.0"));
    let diff = box_pipeline(addr, d, "1.0-to-2.0", Some(base.clone()));
    let t_sh = sh(&format!(
        "curl -sf {} | zstd -dc --long=31 --memory=2048MB --patch-from={} > /dev/null",
        diff.url,
        base.display()
    ));
    row(
        "box: diff (zstd-ref) vs curl|zstd --patch-from",
        diff.secs,
        t_sh,
        size,
    );
    println!(
        "{:<44} {} KiB, encoding {} (the edits: {} KiB of libraries)",
        "diff size",
        diff.size >> 10,
        diff.encoding,
        64 << 10
    );
}

/// What the box pipeline did with one artifact.
struct Pipeline {
    url: String,
    secs: f64,
    size: u64,
    encoding: String,
}

/// Downloads artifact `name` from the server at `addr` and decompresses it as `prepare` does
/// (`stream::overlap`: the decoder reads verified chunks while the download runs), against
/// `reference` for `zstd-ref`, into a sink.
fn box_pipeline(
    addr: std::net::SocketAddr,
    d: &Path,
    name: &str,
    reference: Option<std::path::PathBuf>,
) -> Pipeline {
    use upgradectl::appliance::prepare::{fetch, receive, stream};
    let url = format!("http://{addr}/v1/artifacts/{name}");
    let desc = upgradectl::core::manifest::descriptor_of_verified_target(
        &std::fs::read(d.join(format!("store/artifacts/{name}.descriptor"))).unwrap(),
        name,
    )
    .unwrap();
    let limits = fetch::Limits {
        stall: Duration::from_secs(30),
        min_speed: 1,
    };
    let dest = d.join(format!("dl-{name}"));
    let (_, secs) = time(|| {
        let client = fetch::client(&limits).unwrap();
        let (fetched, decoded) = stream::overlap(
            |verified| {
                let r = fetch::download_watched(
                    &client,
                    &url,
                    &dest,
                    &desc,
                    &limits,
                    &mut |_, _| {},
                    Some(verified),
                );
                verified.end(r, desc.size)
            },
            |input| receive::decompress(input, reference, &mut std::io::sink(), 2 << 30, None),
        );
        fetched.unwrap();
        decoded.unwrap();
    });
    Pipeline {
        url,
        secs,
        size: desc.size,
        encoding: format!("{:?}", desc.encoding),
    }
}

/// `len` bytes of the shared libraries under /usr/lib (real machine code and data, as an
/// update brings), files concatenated.
fn library_bytes(len: usize) -> Vec<u8> {
    let out = Command::new("find")
        .args(["/usr/lib", "-type", "f", "-name", "*.so*", "-size", "+256k"])
        .output()
        .unwrap();
    let mut bytes = Vec::with_capacity(len);
    for file in String::from_utf8_lossy(&out.stdout).lines() {
        if bytes.len() >= len {
            break;
        }
        if let Ok(data) = std::fs::read(file) {
            bytes.extend_from_slice(&data);
        }
    }
    assert!(
        bytes.len() >= len,
        "only {} bytes of libraries",
        bytes.len()
    );
    bytes.truncate(len);
    bytes
}
