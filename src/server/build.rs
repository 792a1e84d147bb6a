//! Building an artifact: the send stream of a version (incremental from another), compressed,
//! hashed per chunk, and its descriptor written (the online artifacts role lists both:
//! `server::repo_sync`).
//!
//! A full stream is xz in independent blocks on all cores. A diff is compressed both as xz and
//! as `zstd-ref` (zstd against the base snapshot's whole block device, which every box holding
//! the base has byte for byte: `sys::refcodec`), and the smaller is kept. A diff that is not
//! smaller than the target's full stream (a major upgrade rewrites most blocks; the full
//! stream's size as built, else estimated) is not published: a record says so, and boxes
//! asking for it are told to take the full stream.

use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, Write};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tempfile::NamedTempFile;

use super::artifacts::Store;
use super::source::StreamSource;
use crate::core::hashing::{HashingWriter, CHUNK_SIZE};
use crate::core::manifest::{artifact_name, Descriptor, Encoding};
use crate::core::version::Version;
use crate::sys::fsutil::{publish_new, write_new};
use crate::sys::refcodec;

/// xz block size: blocks are independent, so boxes decompress them on all cores.
const XZ_BLOCK: u64 = 8 << 20;

/// One compressed candidate: its temp file and descriptor fields.
struct Candidate {
    tmp: NamedTempFile,
    encoding: Encoding,
    /// `zstd-ref`: the window and decoded length of the largest frame.
    frames: Option<(u32, u64)>,
    size: u64,
    sha256: String,
    chunks: Vec<String>,
    seconds: f64,
}

/// How a diff's `zstd-ref` candidate is compressed (the server's `Tuning`).
#[derive(Debug, Clone, Copy)]
pub struct ZstdRef {
    /// zstd's level.
    pub level: i32,
    /// Most bytes of stream per frame: the buffer a box's decoder allocates.
    pub frame_len: u64,
}

/// Builds `artifact_name(from, to)` into the store: each stream into a temp file of its own,
/// published under its name only if nothing is there, then its descriptor the same way. A
/// complete artifact is never rebuilt or replaced: boxes may be downloading it. Returns the
/// artifact published: none for a diff recorded as not smaller.
pub fn build(
    store: &Store,
    source: &dyn StreamSource,
    from: Option<&Version>,
    to: &Version,
    zstd_ref: ZstdRef,
) -> Result<Option<String>> {
    let name = artifact_name(from, to);
    if store.is_built(&name) {
        bail!("{name} is already built; a built artifact is never replaced");
    }
    store.note_build_started();
    let started = Instant::now();
    let Some(from) = from else {
        let xz = xz_candidate(store, &name, &mut |out| source.send(None, to, out))?;
        publish(store, &name, None, to, xz)?;
        return Ok(Some(name));
    };

    // The stream once, into a file: both encoders read it, and zstd states its length (its
    // decoder then allocates the stream's length, not the whole window).
    let mut stream = temp(store, &name, "stream")?;
    {
        let mut out = BufWriter::new(stream.as_file_mut());
        source
            .send(Some(from), to, &mut out)
            .with_context(|| format!("sending {name}"))?;
        out.flush()?;
    }
    let stream_len = stream.as_file().metadata()?.len();
    let xz = xz_candidate(store, &name, &mut |out| {
        let mut input = reopen(&stream)?;
        std::io::copy(&mut input, out).context("reading the spooled stream")?;
        Ok(())
    })?;
    // zstd-ref is an optimisation, never a condition of delivery: a server that cannot read
    // the base's snapshot device (a unit without access to it, the snapshot gone) serves xz.
    let zstd = source.reference(from).and_then(|reference| {
        zstd_candidate(store, &name, &stream, stream_len, &reference, zstd_ref)
    });
    let zstd = match zstd {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("{name}: no zstd-ref candidate, serving xz: {e:#}");
            None
        }
    };
    drop(stream);
    // The full stream as built, or if it is not (it costs a whole image's compression, which
    // no box may need): its uncompressed length at the ratio xz reached on the diff.
    let full = artifact_name(None, to);
    let (full_size, full_is) = if store.is_built(&full) {
        (store.artifact_size(&full)?, "built")
    } else {
        let len = source.full_len(to)?;
        let ratio = xz.size as f64 / stream_len.max(1) as f64;
        ((len as f64 * ratio) as u64, "estimated")
    };
    let zstd_said = match &zstd {
        Some(z) => format!("{} bytes in {:.1}s", z.size, z.seconds),
        None => "none".to_owned(),
    };
    tracing::info!(
        "{name}: stream {stream_len} bytes; xz {} bytes in {:.1}s, zstd-ref (level {}, frames \
         of {} MiB) {zstd_said}; full stream {full_size} bytes ({full_is})",
        xz.size,
        xz.seconds,
        zstd_ref.level,
        zstd_ref.frame_len >> 20,
    );
    // Decoding against the base costs the box a buffer of the stream's length and one core:
    // worth it when it saves at least 1% of the download (on noise the two tie within bytes).
    let best = match zstd {
        Some(zstd) if zstd.size * 100 < xz.size * 99 => zstd,
        _ => xz,
    };
    if best.size >= full_size {
        let record = serde_json::json!({
            "diff": name, "smallest": best.encoding, "diff_size": best.size,
            "full_size": full_size, "full_size_is": full_is,
        });
        write_new(
            &store.not_smaller_path(&name),
            &serde_json::to_vec(&record)?,
            0o644,
        )?;
        tracing::info!(
            "{name}: {} bytes, not smaller than {full} ({full_size}, {full_is}): boxes take \
             the full stream",
            best.size
        );
        return Ok(None);
    }
    publish(store, &name, Some(from), to, best)?;
    tracing::info!("built {name} in {:.1}s", started.elapsed().as_secs_f64());
    Ok(Some(name))
}

/// Publishes a candidate as artifact `name`, then its descriptor.
fn publish(
    store: &Store,
    name: &str,
    from: Option<&Version>,
    to: &Version,
    c: Candidate,
) -> Result<()> {
    c.tmp.as_file().sync_all()?;
    store.remove_incomplete(name)?;
    publish_new(c.tmp, &store.artifact_path(name))?;
    let descriptor = Descriptor {
        name: name.to_owned(),
        from: from.cloned(),
        to: to.clone(),
        encoding: c.encoding,
        window_log: c.frames.map(|(w, _)| w),
        frame_bytes: c.frames.map(|(_, n)| n),
        size: c.size,
        sha256: c.sha256,
        chunk_size: CHUNK_SIZE,
        chunks: c.chunks,
    };
    write_new(
        &store.descriptor_path(name),
        &serde_json::to_vec(&descriptor)?,
        0o644,
    )
}

fn temp(store: &Store, name: &str, what: &str) -> Result<NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(&format!(".{what}.tmp"))
        .tempfile_in(store.artifacts_dir())
        .with_context(|| format!("creating a temp file for {name}"))
}

/// A reader of the spooled stream from its start (a handle of its own).
fn reopen(stream: &NamedTempFile) -> Result<BufReader<File>> {
    let mut file = stream.reopen().context("reopening the spooled stream")?;
    file.rewind()?;
    Ok(BufReader::with_capacity(1 << 20, file))
}

/// The stream `send` writes, as xz in independent blocks on all cores.
fn xz_candidate(
    store: &Store,
    name: &str,
    send: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
) -> Result<Candidate> {
    let started = Instant::now();
    let tmp = temp(store, name, "xz")?;
    let hashing = HashingWriter::new(BufWriter::new(tmp.as_file().try_clone()?), CHUNK_SIZE);
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
    send(&mut xz).with_context(|| format!("building {name} (xz)"))?;
    let hashing = xz.finish().context("finishing xz")?;
    candidate(tmp, hashing, Encoding::Xz, None, started)
}

/// The candidate `hashing` wrote into `tmp`, flushed.
fn candidate(
    tmp: NamedTempFile,
    hashing: HashingWriter<BufWriter<File>>,
    encoding: Encoding,
    frames: Option<(u32, u64)>,
    started: Instant,
) -> Result<Candidate> {
    let size = hashing.written;
    let (writer, sha256, chunks) = hashing.finish();
    writer.into_inner().map_err(|e| e.into_error())?;
    Ok(Candidate {
        tmp,
        encoding,
        frames,
        size,
        sha256,
        chunks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The spooled stream compressed against `reference` (`zstd-ref`).
fn zstd_candidate(
    store: &Store,
    name: &str,
    stream: &NamedTempFile,
    stream_len: u64,
    reference: &std::path::Path,
    params: ZstdRef,
) -> Result<Candidate> {
    let started = Instant::now();
    let tmp = temp(store, name, "zstd")?;
    let mut hashing = HashingWriter::new(BufWriter::new(tmp.as_file().try_clone()?), CHUNK_SIZE);
    refcodec::encode_frames(
        reopen(stream)?,
        stream_len,
        params.frame_len,
        reference,
        &mut hashing,
        params.level,
    )
    .with_context(|| format!("building {name} (zstd-ref against {})", reference.display()))?;
    // The window the largest frame states: the decoder's buffer (single segment: its length).
    let largest = stream_len.min(params.frame_len);
    let frames = (
        refcodec::frames_window_log(stream_len, params.frame_len),
        largest,
    );
    candidate(tmp, hashing, Encoding::ZstdRef, Some(frames), started)
}
