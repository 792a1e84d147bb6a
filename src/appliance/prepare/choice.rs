//! Which artifact a box takes: the diff from its base, or the full stream, before the download
//! and again after a verified diff failed to receive.

use anyhow::Result;

use crate::core::manifest::Descriptor;
use crate::core::version::Version;

use super::{fetch, receive};

/// The artifact to take: the diff from `base` when the server has one, else the full stream. A
/// server that builds no diff from this base (outside its window, or a full stream that is not
/// larger) says 404. A `zstd-ref` diff whose frames are longer than `max_memory` is decoded on
/// the host partition: taken when `fits` says it has room (`host_bytes`), else the full stream.
pub(super) fn choose_artifact(
    descriptor_of: &dyn Fn(Option<&Version>) -> Result<Descriptor>,
    base: Option<&Version>,
    max_memory: u64,
    fits: &dyn Fn(&Descriptor) -> Result<bool>,
) -> Result<(Option<Version>, Descriptor)> {
    let Some(base) = base else {
        return Ok((None, descriptor_of(None)?));
    };
    match descriptor_of(Some(base)) {
        Err(e) if fetch::is_not_found(&e) => {
            tracing::warn!("no diff from {base}: {e:#}; taking the full stream");
        }
        Err(e) => return Err(e),
        Ok(d) => {
            let on_disk = receive::disk_bytes(&d, max_memory);
            if on_disk == 0 || fits(&d)? {
                return Ok((Some(base.clone()), d));
            }
            tracing::warn!(
                "{}: its frames need {on_disk} bytes on disk to decode (longer than \
                 download.max_decoder_mib = {} MiB) and the host partition has no room for them; \
                 taking the full stream",
                d.name,
                max_memory >> 20
            );
        }
    }
    Ok((None, descriptor_of(None)?))
}

/// What taking `d` writes on the host partition at most: `to_download` bytes of the artifact,
/// then the larger of the frame decoded on disk (during the receive: `receive::disk_bytes`) and
/// the image (exported after it, the download still there).
pub(super) fn host_bytes(
    d: &Descriptor,
    to_download: u64,
    image_size: u64,
    max_memory: u64,
) -> u64 {
    to_download + image_size.max(receive::disk_bytes(d, max_memory))
}

/// Whether the full stream is the way on after a verified diff failed to receive. The diff
/// does not apply to the box's base: decoded against other bytes (its frame checksum fails:
/// `refcodec::ReferenceMismatch`), or a base `zfs receive` does not take as the stream's
/// source (a pool the factory seeded otherwise than from the server's stream: another
/// snapshot GUID, the same version). Retrying the diff fails the same way on every run, so the
/// box would never upgrade; the full stream needs no base, and the next diffs start from it.
/// A local failure (the pool full) goes the same way: the full stream replaces the zvol and
/// its snapshots. A refusal does not: the artifact is not acceptable in any encoding.
pub(super) fn full_stream_may_help(receive_error: &anyhow::Error) -> bool {
    crate::error::classify(receive_error).0 != crate::error::Exit::Refused
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::{artifact_name, Encoding};

    fn descriptor(from: Option<&str>, window_log: Option<u32>) -> Descriptor {
        let to: Version = "2.0".parse().unwrap();
        let from: Option<Version> = from.map(|f| f.parse().unwrap());
        Descriptor {
            name: artifact_name(from.as_ref(), &to),
            from,
            to,
            encoding: if window_log.is_some() {
                Encoding::ZstdRef
            } else {
                Encoding::Xz
            },
            window_log,
            frame_bytes: window_log.map(|w| 3 << (w - 2)),
            size: 1,
            sha256: "0".repeat(64),
            chunk_size: 1 << 20,
            chunks: vec!["0".repeat(64)],
        }
    }

    /// `choose_artifact` over a server that answers the diff with `diff` and has a full stream,
    /// on a host partition with room for `room` bytes.
    fn choose_in(
        base: Option<&str>,
        diff: impl Fn() -> Result<Descriptor>,
        max_memory: u64,
        room: u64,
    ) -> Result<(Option<Version>, String)> {
        let asked = |b: Option<&Version>| match b {
            Some(_) => diff(),
            None => Ok(descriptor(None, None)),
        };
        let base: Option<Version> = base.map(|b| b.parse().unwrap());
        let fits = |d: &Descriptor| Ok(host_bytes(d, d.size, 0, max_memory) <= room);
        choose_artifact(&asked, base.as_ref(), max_memory, &fits).map(|(b, d)| (b, d.name))
    }

    fn choose(
        base: Option<&str>,
        diff: impl Fn() -> Result<Descriptor>,
        max_memory: u64,
    ) -> Result<(Option<Version>, String)> {
        choose_in(base, diff, max_memory, u64::MAX)
    }

    #[test]
    fn the_box_takes_the_diff_unless_the_server_has_none_or_it_needs_more_room() {
        let mib = 1u64 << 20;
        let v = |s: &str| Some(s.parse::<Version>().unwrap());
        let full = (None, "full-2.0".to_owned());
        let diff = (v("1.0"), "1.0-to-2.0".to_owned());
        assert_eq!(choose(None, || unreachable!(), 256 * mib).unwrap(), full);
        let xz_diff = || Ok(descriptor(Some("1.0"), None));
        assert_eq!(choose(Some("1.0"), xz_diff, 256 * mib).unwrap(), diff);
        // zstd-ref: its window against the limit (256 MiB = 2^28).
        let window = |w| move || Ok(descriptor(Some("1.0"), Some(w)));
        assert_eq!(choose(Some("1.0"), window(28), 256 * mib).unwrap(), diff);
        // Frames above it are decoded on disk (the largest, 384 MiB, beside the 1-byte diff):
        // taken when the host partition has room for them, else the full stream.
        assert_eq!(choose(Some("1.0"), window(29), 256 * mib).unwrap(), diff);
        let on_disk = 384 * mib + 1;
        assert_eq!(
            choose_in(Some("1.0"), window(29), 256 * mib, on_disk).unwrap(),
            diff
        );
        assert_eq!(
            choose_in(Some("1.0"), window(29), 256 * mib, on_disk - 1).unwrap(),
            full
        );
        // Within memory, the disk is not asked.
        assert_eq!(
            choose_in(Some("1.0"), window(29), 512 * mib, 0).unwrap(),
            diff
        );
        // No diff from this base (outside the window, or not smaller than the full stream).
        let not_found = || {
            Err(fetch::HttpError {
                url: "u".into(),
                status: 404,
                body: "take full-2.0".into(),
            }
            .into())
        };
        assert_eq!(choose(Some("1.0"), not_found, 256 * mib).unwrap(), full);
        // Anything else is not a reason to download a whole image instead.
        let refused = || Err(crate::error::refused("bad descriptor"));
        assert!(choose(Some("1.0"), refused, 256 * mib).is_err());
    }

    #[test]
    fn a_diff_that_does_not_receive_sends_the_box_to_the_full_stream_unless_refused() {
        // zfs receive refusing a base of another GUID: before, only a failed frame checksum
        // did, and a box whose pool the factory seeded by copying never upgraded.
        let not_its_source = anyhow::anyhow!(
            "cannot receive incremental stream: most recent snapshot of box/upgradectl/image \
             does not match incremental source"
        )
        .context("zfs receive -s -F box/upgradectl/image failed (exit 1)");
        assert!(full_stream_may_help(&not_its_source));
        let mismatch =
            anyhow::Error::from(crate::sys::refcodec::ReferenceMismatch).context("decompressing");
        assert!(full_stream_may_help(&mismatch));
        let refused = crate::error::refused("the frame needs a window larger than the limit");
        assert!(!full_stream_may_help(&refused.context("receiving")));
    }
}
