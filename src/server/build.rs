//! Building an artifact: the send stream of a version (incremental from another), compressed
//! as xz in independent blocks on all cores, hashed per chunk, and its descriptor signed.

use std::fs::File;
use std::io::BufWriter;

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;

use super::artifacts::Store;
use super::source::StreamSource;
use crate::core::hashing::{HashingWriter, CHUNK_SIZE};
use crate::core::manifest::{artifact_name, Descriptor, Encoding};
use crate::core::sign;
use crate::core::version::Version;
use crate::sys::fsutil::atomic_write;

/// xz block size: blocks are independent, so boxes decompress them on all cores.
const XZ_BLOCK: u64 = 8 << 20;

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
