//! Receiving a verified artifact: decompress (xz on all cores, or zstd against the base
//! snapshot) into `zfs receive`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};

use crate::core::manifest::{Descriptor, Encoding};
use crate::core::version::Version;
use crate::sys::{refcodec, zfs};

use super::stream;

/// Decompresses the verified artifact read from `input` (the local file, or a
/// `stream::VerifiedReader` of it while it downloads), in at most `max_memory` bytes (and
/// `on_disk`: [`decompress`]), into `zfs receive -s -F`: xz on all cores, or `zstd-ref` against
/// the block device of the base snapshot (mapped read-only). A receive left half done by an
/// interruption is aborted first: the artifact is local and verified (or resumes per chunk), so
/// receiving it again from its start costs no download.
pub fn receive(
    input: impl Read,
    encoding: Encoding,
    zvol: &str,
    base: Option<&Version>,
    to: &Version,
    max_memory: u64,
    on_disk: Option<refcodec::OnDisk>,
) -> Result<()> {
    if zfs::snapshots(zvol)?.contains(to) {
        return Ok(());
    }
    if let Some((parent, _)) = zvol.rsplit_once('/') {
        zfs::ensure_filesystem(parent)?;
    }
    if zfs::exists(zvol)? {
        zfs::abort_receive(zvol)?;
        if base.is_none() {
            // A full stream replaces the zvol: its old snapshots (diff bases) go with it. The
            // image files on the host partition do not depend on them.
            tracing::warn!("replacing {zvol} with a full stream of {to}");
            zfs::destroy_recursive(zvol)?;
        }
    } else if base.is_some() {
        anyhow::bail!("{zvol} does not exist; an incremental stream needs its base");
    }
    let reference = match (encoding, base) {
        (Encoding::ZstdRef, Some(base)) => Some(zfs::snapshot_device(zvol, base)?),
        (Encoding::ZstdRef, None) => anyhow::bail!("a zstd-ref stream needs a base snapshot"),
        (Encoding::Xz, _) => None,
    };
    let cmd = zfs::receive_cmd(zvol);
    let mut child = cmd
        .to_command()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cmd.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let copied = decompress(input, reference, &mut stdin, max_memory, on_disk);
    drop(stdin);
    if let Err(e) = &copied {
        // A refusal, a wrong reference or a download that stopped, before the receive's own
        // error (it saw its input end early) hides why. zfs receive -s keeps a resume token:
        // aborted on the next try.
        if crate::error::classify(e).0 == crate::error::Exit::Refused
            || e.downcast_ref::<refcodec::ReferenceMismatch>().is_some()
            || stream::is_download_stopped(e)
        {
            let _ = child.kill();
            let _ = child.wait();
            return copied;
        }
    }
    let output = child.wait_with_output()?;
    crate::sys::cmd::check_status(&cmd, &output)?;
    copied
}

/// Decompresses `input` into `out`: xz when there is no reference, else `zstd-ref` against it;
/// in at most `max_memory` bytes of memory (more is refused, exit 2), except a `zstd-ref` frame
/// longer than that and within `on_disk`, decoded through a file there (`refcodec::OnDisk`).
pub fn decompress(
    input: impl Read,
    reference: Option<PathBuf>,
    out: &mut impl Write,
    max_memory: u64,
    on_disk: Option<refcodec::OnDisk>,
) -> Result<()> {
    match reference {
        None => {
            let mut xz = xz_reader(input, max_memory)?;
            let copied = std::io::copy(&mut xz, out).and_then(|_| out.flush());
            if let Err(e) = &copied {
                if let Some(refusal) = memory_refusal(e, max_memory) {
                    return Err(refusal);
                }
            }
            copied.context("decompressing")?;
            Ok(())
        }
        Some(reference) => refcodec::decode(
            std::io::BufReader::new(input),
            &reference,
            out,
            &refcodec::Limits {
                max_window_log: max_window_log(max_memory),
                on_disk,
            },
        ),
    }
}

/// What decoding `d` needs on disk, beside its download, on a box with `max_memory` bytes for
/// its decoder: a `zstd-ref` frame longer than that is decoded through a file
/// (`refcodec::OnDisk`) as long as the largest frame; nothing otherwise.
pub fn disk_bytes(d: &Descriptor, max_memory: u64) -> u64 {
    match d.window_log {
        Some(w) if w > max_window_log(max_memory) => d.frame_bytes.unwrap_or(1 << w),
        _ => 0,
    }
}

/// Where a box with `max_memory` bytes for its decoder decodes `d`'s frames that are longer:
/// a file in `dir`, as long as [`disk_bytes`]; `None` when every frame fits in memory.
pub fn on_disk(d: &Descriptor, max_memory: u64, dir: &Path) -> Option<refcodec::OnDisk> {
    Some(disk_bytes(d, max_memory))
        .filter(|&n| n > 0)
        .map(|max_bytes| refcodec::OnDisk {
            dir: dir.to_owned(),
            max_bytes,
        })
}

/// The largest zstd window that fits `max_memory` bytes: log2, within zstd's range.
pub fn max_window_log(max_memory: u64) -> u32 {
    (63 - max_memory.max(1).leading_zeros()).clamp(10, refcodec::WINDOW_LOG_MAX)
}

/// A decoder that stopped at the memory limit, as refused input (exit 2).
pub fn memory_refusal(e: &std::io::Error, max_memory: u64) -> Option<anyhow::Error> {
    let inner = e.get_ref()?.downcast_ref::<liblzma::stream::Error>()?;
    matches!(inner, liblzma::stream::Error::MemLimit).then(|| {
        crate::error::refused(format!(
            "the artifact needs more than {} MiB to decompress (download.max_decoder_mib)",
            max_memory >> 20
        ))
    })
}

/// Decompresses xz on all cores (the server writes independent blocks for this), in at most
/// `max_memory` bytes: fewer threads when they would take more, an error when even one would.
pub fn xz_reader<R: Read>(
    input: R,
    max_memory: u64,
) -> Result<liblzma::read::XzDecoder<std::io::BufReader<R>>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads)
        .memlimit_threading(max_memory)
        .memlimit_stop(max_memory)
        .decoder()
        .context("creating the xz decoder")?;
    Ok(liblzma::read::XzDecoder::new_stream(
        std::io::BufReader::new(input),
        stream,
    ))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rand::RngCore;

    use super::*;

    /// xz at preset 9: its 64 MiB dictionary is what a decoder must allocate.
    fn xz9(data: &[u8]) -> Vec<u8> {
        let stream =
            liblzma::stream::Stream::new_easy_encoder(9, liblzma::stream::Check::Crc64).unwrap();
        let mut enc = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn the_zstd_window_is_the_largest_that_fits_the_limit() {
        assert_eq!(max_window_log(256 << 20), 28);
        assert_eq!(max_window_log((256 << 20) + 1), 28);
        assert_eq!(max_window_log((256 << 20) - 1), 27);
        assert_eq!(max_window_log(16 << 20), 24);
        assert_eq!(max_window_log(64 << 30), 31);
        assert_eq!(max_window_log(0), 10);
    }

    #[test]
    fn a_zstd_ref_frame_needing_more_than_the_limit_is_refused_and_a_wrong_base_named() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        // Random: the only match for any of it is at the same place in the base.
        let mut data = vec![0u8; 3 << 20];
        <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1).fill_bytes(&mut data);
        std::fs::write(&base, &data).unwrap();
        let mut new = data.clone();
        new[1000..1100].fill(7);
        let mut frame = Vec::new();
        let len = new.len() as u64;
        refcodec::encode_frames(&new[..], len, len, &base, &mut frame, 3).unwrap();
        let mut out = Vec::new();
        decompress(&frame[..], Some(base.clone()), &mut out, 256 << 20, None).unwrap();
        assert_eq!(out, new);
        // The frame states its 3 MiB: a 2 MiB limit refuses it before decoding.
        let err = decompress(
            &frame[..],
            Some(base.clone()),
            &mut Vec::new(),
            2 << 20,
            None,
        )
        .unwrap_err();
        assert_eq!(
            crate::error::classify(&err).0,
            crate::error::Exit::Refused,
            "{err:#}"
        );
        let other = dir.path().join("other");
        let mut wrong = data.clone();
        wrong[2 << 20] ^= 1;
        std::fs::write(&other, &wrong).unwrap();
        let err =
            decompress(&frame[..], Some(other), &mut Vec::new(), 256 << 20, None).unwrap_err();
        assert!(
            err.downcast_ref::<refcodec::ReferenceMismatch>().is_some(),
            "{err:#}"
        );
    }

    #[test]
    fn an_artifact_needing_more_memory_than_the_limit_is_refused() {
        let data = b"a small stream with a large dictionary".repeat(100);
        let xz = xz9(&data);
        let mut out = Vec::new();
        xz_reader(&xz[..], 256 << 20)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data, "within the default limit");
        let err = xz_reader(&xz[..], 32 << 20)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        let refusal = memory_refusal(&err, 32 << 20).expect("a memory refusal");
        assert_eq!(
            crate::error::classify(&refusal).0,
            crate::error::Exit::Refused
        );
        assert!(format!("{refusal:#}").contains("32 MiB"), "{refusal:#}");
    }
}
