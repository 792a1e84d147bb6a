//! Building an artifact: the send stream of a version (incremental from another), compressed
//! as xz in independent blocks on all cores, hashed per chunk, and its descriptor written
//! (the online artifacts role lists both: `server::repo_sync`).

use std::fs::File;
use std::io::BufWriter;

use anyhow::{bail, Context, Result};

use super::artifacts::Store;
use super::source::StreamSource;
use crate::core::hashing::{HashingWriter, CHUNK_SIZE};
use crate::core::manifest::{artifact_name, Descriptor, Encoding};
use crate::core::version::Version;
use crate::sys::fsutil::{publish_new, write_new};

/// xz block size: blocks are independent, so boxes decompress them on all cores.
const XZ_BLOCK: u64 = 8 << 20;

/// Builds `artifact_name(from, to)` into the store: the stream into a temp file of its own,
/// published under its name only if nothing is there, then its descriptor the same way. A
/// complete artifact is never rebuilt or replaced: boxes may be downloading it.
pub fn build(
    store: &Store,
    source: &dyn StreamSource,
    from: Option<&Version>,
    to: &Version,
) -> Result<()> {
    let name = artifact_name(from, to);
    if store.is_built(&name) {
        bail!("{name} is already built; a built artifact is never replaced");
    }
    store.note_build_started();
    let started = std::time::Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(store.artifacts_dir())
        .with_context(|| format!("creating a temp file for {name}"))?;
    let (size, sha256, chunks) =
        compress(source, from, to, tmp.as_file()).with_context(|| format!("building {name}"))?;
    tmp.as_file().sync_all()?;
    store.remove_incomplete(&name)?;
    publish_new(tmp, &store.artifact_path(&name))?;
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
    write_new(
        &store.descriptor_path(&name),
        &serde_json::to_vec(&descriptor)?,
        0o644,
    )?;
    tracing::info!(
        "built {name}: {size} bytes in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the xz of the stream into `file`; returns its size, sha256 and chunk hashes.
fn compress(
    source: &dyn StreamSource,
    from: Option<&Version>,
    to: &Version,
    file: &File,
) -> Result<(u64, String, Vec<String>)> {
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
    source.send(from, to, &mut xz)?;
    let hashing = xz.finish().context("finishing xz")?;
    let size = hashing.written;
    let (writer, sha256, chunks) = hashing.finish();
    writer.into_inner().map_err(|e| e.into_error())?;
    Ok((size, sha256, chunks))
}
