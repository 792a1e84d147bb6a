//! Building an artifact: the send stream of a version (incremental from another), compressed
//! as xz in independent blocks on all cores, hashed per chunk, and its descriptor signed.

use std::fs::File;
use std::io::{BufWriter, Write};

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;

use super::store::Store;
use crate::fsutil::atomic_write;
use crate::hashing::{HashingWriter, CHUNK_SIZE};
use crate::manifest::{artifact_name, Descriptor, Encoding};
use crate::sign;
use crate::version::Version;
use crate::zfs;

/// xz block size: blocks are independent, so boxes decompress them on all cores.
const XZ_BLOCK: u64 = 8 << 20;

/// Where send streams come from.
pub trait StreamSource: Send + Sync {
    /// Writes the uncompressed stream of `to`, incremental from `from`, into `out`.
    fn send(&self, from: Option<&Version>, to: &Version, out: &mut dyn Write) -> Result<()>;
    /// Whether the source holds version `v`.
    fn has(&self, v: &Version) -> Result<bool>;
}

/// The real source: snapshots of the server's image zvol.
pub struct ZfsSource {
    pub zvol: String,
}

impl StreamSource for ZfsSource {
    fn send(&self, from: Option<&Version>, to: &Version, out: &mut dyn Write) -> Result<()> {
        let cmd = zfs::send_cmd(&self.zvol, from, to);
        let mut child = cmd
            .to_command()
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", cmd.display()))?;
        let mut stdout = child.stdout.take().expect("piped");
        let copied = std::io::copy(&mut stdout, out);
        let output = child.wait_with_output()?;
        crate::cmd::check_status(&cmd, &output)?;
        copied.with_context(|| format!("reading {}", cmd.display()))?;
        Ok(())
    }

    fn has(&self, v: &Version) -> Result<bool> {
        Ok(zfs::snapshots(&self.zvol)?.contains(v))
    }
}

/// Builds `artifact_name(from, to)` into the store; the descriptor is written last.
pub fn build(
    store: &Store,
    source: &dyn StreamSource,
    key: &SigningKey,
    from: Option<&Version>,
    to: &Version,
) -> Result<()> {
    store.note_build_started();
    let name = artifact_name(from, to);
    let started = std::time::Instant::now();
    let final_path = store.artifact_path(&name);
    let tmp = final_path.with_file_name(format!(".{name}.tmp"));
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let hashing = HashingWriter::new(BufWriter::new(file), CHUNK_SIZE);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads)
        .block_size(XZ_BLOCK)
        .preset(6)
        .check(liblzma::stream::Check::Crc64)
        .encoder()
        .context("creating the xz encoder")?;
    let mut xz = liblzma::write::XzEncoder::new_stream(hashing, stream);
    source
        .send(from, to, &mut xz)
        .with_context(|| format!("building {name}"))?;
    let hashing = xz.finish().context("finishing xz")?;
    let size = hashing.written;
    let (writer, sha256, chunks) = hashing.finish();
    let file = writer.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &final_path)?;
    let descriptor = Descriptor {
        name: name.clone(),
        from: from.cloned(),
        to: to.clone(),
        encoding: Encoding::Xz,
        size,
        sha256,
        chunk_size: CHUNK_SIZE,
        chunks,
    };
    let env = sign::seal(&descriptor, key)?;
    atomic_write(
        &store.descriptor_path(&name),
        &serde_json::to_vec(&env)?,
        0o644,
    )?;
    tracing::info!(
        "built {name}: {size} bytes in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
