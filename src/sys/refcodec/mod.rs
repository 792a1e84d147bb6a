//! The reference-compressed diff encoding: zstd with the base image as a read-only prefix.
//!
//! The server compresses a stream (a ZFS incremental) with zstd, the whole content of the base
//! version's image given as a reference prefix (zstd's "patch-from"): anything in the stream
//! that is also somewhere in the base image costs a match, not its bytes. The box holds exactly
//! the same base bytes and decompresses against them. Both sides map the reference read-only.
//!
//! A sequence of zstd frames (one or more), each against the whole reference, with
//! long-distance matching, a window covering reference and frame (at most 2^31 bytes), and the
//! frame checksum: decoding against a different reference fails at the end of the first frame
//! it touches instead of passing wrong bytes off as right. Bytes already written to `out`
//! before that failure are wrong: the caller discards them (aborts the receive). The frames say
//! nothing of how many follow: an input cut at a frame's end decodes to a prefix of the
//! stream, so the caller decodes only a whole, verified artifact (the box: its length and
//! sha256 are signed; `zfs receive` also refuses a stream without its end).
//!
//! Memory on the decoding side: each frame states its window, and [`decode`] refuses a frame
//! whose window exceeds `max_window_log` before allocating anything. Otherwise the decoder
//! allocates a buffer of the window's size, or of the frame's length when the frame states it
//! ([`encode_frames`]) and that is smaller, and fills it with the decoded output; the reference
//! is mapped, its pages read on demand from the page cache. A sized frame shorter than its
//! window is written "single segment": its stated window is its length (zstd's decoder does not
//! count the prefix against the window), so `max_window_log` then bounds the frame's length,
//! which is exactly the buffer the decoder allocates; the server's frame length bounds it for
//! streams of any length. A frame longer than that may be decoded on disk instead ([`OnDisk`]):
//! a file-backed buffer of the frame's length, about 1 MB of anonymous memory whatever the
//! frame (measured on the 546 MB kernel update of bench/diff-size: docs/protocol.md).

mod decode;
mod encode;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};
use memmap2::{Mmap, MmapOptions};

pub use decode::{decode, Limits, OnDisk, ReferenceMismatch};
pub use encode::{encode, encode_frames, frames_window_log};

/// zstd's smallest window and largest on 64-bit targets.
const WINDOW_LOG_MIN: u32 = 10;
pub const WINDOW_LOG_MAX: u32 = 31;
/// The window never goes below this: it is what zstd itself picks for high levels on an input
/// of unknown size (8 MiB), so a small reference does not cost compression on the stream itself.
const WINDOW_LOG_FLOOR: u32 = 23;

/// The window log (log2 of the window size) that covers `total_bytes` of history: the smallest
/// `w` with `2^w >= total_bytes`, within zstd's bounds [10, 31]. Beyond 2^31 the far start of
/// the reference falls out of the window: still correct, only those matches are lost.
pub fn window_log_for(total_bytes: u64) -> u32 {
    let needed = match total_bytes {
        0 | 1 => 0,
        n => 64 - (n - 1).leading_zeros(),
    };
    needed.clamp(WINDOW_LOG_MIN, WINDOW_LOG_MAX)
}

/// The window [`encode`] uses for a reference of `reference_len` bytes: reference plus a stream
/// up to the reference's size (a diff of it is smaller). A longer stream still round-trips; its
/// far matches into the reference's start may be lost.
pub fn encode_window_log(reference_len: u64) -> u32 {
    window_log_for(reference_len.saturating_mul(2)).max(WINDOW_LOG_FLOOR)
}

/// The reference file mapped read-only (an empty file is an empty slice: mmap refuses length 0).
struct Reference {
    map: Option<Mmap>,
}

impl Reference {
    fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).with_context(|| format!("opening reference {}", path.display()))?;
        // A block device (a zvol snapshot) has no length in its metadata: its end has one.
        let len = (&file)
            .seek(SeekFrom::End(0))
            .with_context(|| format!("reading the size of reference {}", path.display()))?;
        if len == 0 {
            return Ok(Self { map: None });
        }
        let len = usize::try_from(len).context("a reference larger than the address space")?;
        // SAFETY: the mapping is read-only and lives as long as the codec using it. The caller
        // hands in a reference nobody writes while we read it (a snapshot, a published image);
        // if one did, zstd would read changed bytes and the frame checksum would catch it.
        let map = unsafe { MmapOptions::new().len(len).map(&file) }
            .with_context(|| format!("mapping reference {}", path.display()))?;
        #[cfg(unix)]
        {
            // Read once, front to back, by zstd's matching: a hint, failure costs nothing.
            let _ = map.advise(memmap2::Advice::Sequential);
        }
        Ok(Self { map: Some(map) })
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, RngCore, SeedableRng};
    use std::io::Cursor;
    use zstd::zstd_safe;

    fn write_ref(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn enc(input: &[u8], reference: &Path, level: i32) -> Vec<u8> {
        let mut out = Vec::new();
        encode(Cursor::new(input), reference, &mut out, level).unwrap();
        out
    }

    fn dec(frame: &[u8], reference: &Path, max_window_log: u32) -> Result<Vec<u8>> {
        dec_with(frame, reference, &Limits::memory(max_window_log))
    }

    fn dec_with(frame: &[u8], reference: &Path, limits: &Limits) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        decode(Cursor::new(frame), reference, &mut out, limits)?;
        Ok(out)
    }

    /// Frames above 2^`max_window_log` decoded in `dir`, up to `max_bytes`.
    fn on_disk(max_window_log: u32, dir: &Path, max_bytes: u64) -> Limits {
        Limits {
            max_window_log,
            on_disk: Some(OnDisk {
                dir: dir.to_owned(),
                max_bytes,
            }),
        }
    }

    fn is_empty_dir(dir: &Path) -> bool {
        std::fs::read_dir(dir).unwrap().next().is_none()
    }

    /// Incompressible on its own (random), so only the reference can make it small.
    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
        bytes
    }

    /// `base` with `edits` scattered runs of 1..64 random bytes overwritten.
    fn edited(base: &[u8], edits: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut new = base.to_vec();
        for _ in 0..edits {
            let len = rng.gen_range(1..64);
            let at = rng.gen_range(0..new.len() - len);
            rng.fill_bytes(&mut new[at..at + len]);
        }
        new
    }

    #[test]
    fn window_log_for_covers_the_bytes_within_zstd_bounds() {
        assert_eq!(window_log_for(0), 10);
        assert_eq!(window_log_for(1024), 10);
        assert_eq!(window_log_for(1025), 11);
        assert_eq!(window_log_for(1 << 30), 30);
        assert_eq!(window_log_for((1 << 30) + 1), 31);
        assert_eq!(window_log_for(u64::MAX), 31);
        for n in [1u64, 5000, 123_456_789, 3 << 29] {
            let w = window_log_for(n);
            assert!(
                1u64 << w >= n && (w == 10 || 1u64 << (w - 1) < n),
                "{n} -> {w}"
            );
        }
    }

    /// A reference of `len` random bytes, its edited successor, and that encoded against it.
    struct Case {
        dir: tempfile::TempDir,
        reference: std::path::PathBuf,
        base: Vec<u8>,
        new: Vec<u8>,
        frame: Vec<u8>,
        window_log: u32,
    }

    fn case(len: usize, edits: usize, seed: u64, level: i32) -> Case {
        let dir = tempfile::tempdir().unwrap();
        let base = random(len, seed);
        let new = edited(&base, edits, seed + 1);
        let reference = write_ref(&dir, "base", &base);
        let frame = enc(&new, &reference, level);
        let window_log = encode_window_log(base.len() as u64);
        Case {
            dir,
            reference,
            base,
            new,
            frame,
            window_log,
        }
    }

    #[test]
    fn round_trip_with_scattered_edits_is_far_smaller_than_plain_zstd() {
        let c = case(4 << 20, 200, 1, 3);
        assert_eq!(dec(&c.frame, &c.reference, c.window_log).unwrap(), c.new);

        let plain = zstd::encode_all(Cursor::new(&c.new), 3).unwrap();
        // 200 edits of < 64 random bytes: at most ~13 KB of news, against 4 MiB without the
        // reference. Demand a factor of 50 at least.
        assert!(
            c.frame.len() * 50 < plain.len(),
            "against the reference {} bytes, plain zstd {} bytes",
            c.frame.len(),
            plain.len()
        );
    }

    #[test]
    fn a_frame_needing_a_larger_window_than_the_limit_is_refused_naming_it() {
        let c = case(5 << 20, 10, 3, 1);
        // 5 MiB reference: a 16 MiB window at least (24 with the floor of 23 and 2x).
        assert_eq!(c.window_log, 24);
        let err = format!("{:#}", dec(&c.frame, &c.reference, 20).unwrap_err());
        assert!(err.contains("max_window_log = 20"), "{err}");
        assert!(err.contains("window larger than the limit"), "{err}");
        assert_eq!(dec(&c.frame, &c.reference, 24).unwrap(), c.new);
    }

    #[test]
    fn decoding_against_a_different_reference_fails() {
        let c = case(1 << 20, 50, 5, 3);
        // Same size, a few bytes differ: the worst case, zstd finds nothing odd but the sum.
        let other = write_ref(&c.dir, "other", &edited(&c.base, 5, 7));
        let err = format!("{:#}", dec(&c.frame, &other, c.window_log).unwrap_err());
        assert!(err.contains("checksum"), "{err}");
        // Wholly different content, different size.
        let other = write_ref(&c.dir, "random", &random(1 << 19, 8));
        assert!(dec(&c.frame, &other, c.window_log).is_err());
        // No reference at all.
        let empty = write_ref(&c.dir, "empty", b"");
        assert!(dec(&c.frame, &empty, c.window_log).is_err());
    }

    #[test]
    fn a_sized_frame_states_its_length_and_a_wrong_length_fails() {
        let c = case(1 << 20, 30, 13, 3);
        let len = c.new.len() as u64;
        let mut sized = Vec::new();
        encode_frames(Cursor::new(&c.new), len, len, &c.reference, &mut sized, 3).unwrap();
        assert_eq!(
            zstd_safe::get_frame_content_size(&sized).ok(),
            Some(Some(len))
        );
        assert_eq!(zstd_safe::get_frame_content_size(&c.frame).ok(), Some(None));
        // Reference plus input, 2 MiB: a window of 2^21, where the unsized frame needs 2^23.
        assert_eq!(dec(&sized, &c.reference, 21).unwrap(), c.new);
        assert!(dec(&c.frame, &c.reference, 21).is_err());

        let err = encode_frames(
            Cursor::new(&c.new),
            len + 1,
            len + 1,
            &c.reference,
            Vec::new(),
            3,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("input ended after"), "{err:#}");
        let err = encode_frames(
            Cursor::new(&c.new),
            len - 1,
            len,
            &c.reference,
            Vec::new(),
            3,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("longer than"), "{err:#}");
    }

    /// `c`'s new content in frames of `frame_len` against its reference (level 3).
    fn framed(c: &Case, frame_len: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let len = c.new.len() as u64;
        encode_frames(
            Cursor::new(&c.new),
            len,
            frame_len,
            &c.reference,
            &mut out,
            3,
        )
        .unwrap();
        out
    }

    /// A stream cut into frames: each frame's buffer, not the stream's, is the limit; every
    /// frame matches the whole reference (the stream's far end too); a reference that differs
    /// only under a later frame still fails.
    #[test]
    fn frames_bound_the_decoders_buffer_and_each_matches_the_whole_reference() {
        let c = case(4 << 20, 200, 21, 3);
        let len = c.new.len() as u64;
        let framed = framed(&c, 1 << 20);
        assert_eq!(frames_window_log(len, 1 << 20), 20);
        assert_eq!(dec(&framed, &c.reference, 20).unwrap(), c.new);
        assert!(dec(&framed, &c.reference, 19).is_err(), "a frame is 2^20");
        // Four frames of random data against the reference: as small as one frame, give or
        // take the frames' headers and checksums.
        let mut one = Vec::new();
        encode_frames(Cursor::new(&c.new), len, len, &c.reference, &mut one, 3).unwrap();
        assert!(
            framed.len() < one.len() + 256,
            "4 frames {} bytes, one frame {} bytes",
            framed.len(),
            one.len()
        );
        assert!(
            dec(&one, &c.reference, 20).is_err(),
            "one frame is the stream's length"
        );
        // The reference differs only where the last frame matches it.
        let mut late = c.base.clone();
        let n = late.len();
        late[n - 100..].iter_mut().for_each(|b| *b ^= 0xff);
        let late = write_ref(&c.dir, "late", &late);
        let err = dec(&framed, &late, 20).unwrap_err();
        assert!(err.chain().any(|e| e.is::<ReferenceMismatch>()), "{err:#}");
        assert!(format!("{err:#}").contains("frame 3"), "{err:#}");
    }

    /// Bytes after the last frame are refused, naming the frame they would be; an input cut
    /// at a frame's end decodes to a prefix of the stream (the module's note: callers decode
    /// only a whole, verified artifact).
    /// A frame longer than the decoder's memory is decoded through an unnamed file: the stream
    /// comes out whole, frames within memory beside it stay in memory, and no file is left.
    #[test]
    fn frames_longer_than_memory_decode_on_disk_and_leave_nothing() {
        let c = case(3 << 20, 200, 31, 3);
        let scratch = tempfile::tempdir().unwrap();
        // 1.5 MiB, 1.5 MiB and the rest: two frames above 2^20, one below.
        let three = framed(&c, 3 << 19);
        let len = c.new.len() as u64;
        assert!(dec(&three, &c.reference, 20).is_err(), "above memory");
        let limits = on_disk(20, scratch.path(), len);
        assert_eq!(dec_with(&three, &c.reference, &limits).unwrap(), c.new);
        assert!(is_empty_dir(scratch.path()));
        // One frame of the whole stream, 3 MiB through the file.
        let one = framed(&c, len);
        assert_eq!(dec_with(&one, &c.reference, &limits).unwrap(), c.new);
        // Another reference: the checksum still says so, on disk.
        let other = write_ref(&c.dir, "other", &edited(&c.base, 1, 33));
        let err = dec_with(&one, &other, &limits).unwrap_err();
        assert!(err.downcast_ref::<ReferenceMismatch>().is_some(), "{err:#}");
        assert!(is_empty_dir(scratch.path()));
    }

    /// A frame whose header states another length than it decodes to (a hostile or corrupt
    /// artifact): decoded on disk into a buffer of the stated length, it fails (zstd checks the
    /// length, and never writes past the buffer), and no file is left.
    #[test]
    fn a_frame_lying_about_its_length_fails_on_disk() {
        let c = case(2 << 20, 20, 39, 3);
        let scratch = tempfile::tempdir().unwrap();
        let len = c.new.len() as u64;
        let one = framed(&c, len);
        // A one-segment frame of 2 MiB: magic (4), descriptor (1), its length in 4 bytes.
        assert_eq!(one[4] >> 6, 2, "a 4-byte content size");
        for stated in [len - 4096, len + 4096] {
            let mut lying = one.clone();
            lying[5..9].copy_from_slice(&u32::try_from(stated).unwrap().to_le_bytes());
            assert_eq!(
                zstd_safe::get_frame_content_size(&lying).ok(),
                Some(Some(stated))
            );
            let limits = on_disk(20, scratch.path(), 4 << 20);
            let err = dec_with(&lying, &c.reference, &limits).unwrap_err();
            assert!(format!("{err:#}").contains("frame 0"), "{err:#}");
            assert!(is_empty_dir(scratch.path()));
        }
    }

    /// A frame longer than what the caller set aside on disk is refused from its header, before
    /// a byte is written anywhere.
    #[test]
    fn a_frame_longer_than_the_room_set_aside_is_refused_before_decoding() {
        let c = case(2 << 20, 20, 35, 3);
        let scratch = tempfile::tempdir().unwrap();
        let one = framed(&c, c.new.len() as u64);
        let mut out = Vec::new();
        let limits = on_disk(20, scratch.path(), c.new.len() as u64 - 1);
        let err = decode(Cursor::new(&one), &c.reference, &mut out, &limits).unwrap_err();
        assert_eq!(
            crate::error::classify(&err).0,
            crate::error::Exit::Refused,
            "{err:#}"
        );
        let text = format!("{err:#}");
        assert!(
            text.contains("frame 0") && text.contains("set aside"),
            "{text}"
        );
        assert!(out.is_empty() && is_empty_dir(scratch.path()));
    }

    /// A disk without room for the frame: "no space" (exit 6) when its blocks are reserved,
    /// before anything is decoded, never a SIGBUS on the mapping. A real full filesystem (a
    /// tmpfs of 1 MiB): needs root, as the rest of the suite.
    #[test]
    fn a_disk_without_room_for_the_frame_is_no_space_before_decoding() {
        use nix::mount::{mount, umount, MsFlags};
        let c = case(2 << 20, 20, 37, 3);
        let scratch = tempfile::tempdir().unwrap();
        mount(
            Some("tmpfs"),
            scratch.path(),
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m"),
        )
        .expect("mounting a 1 MiB tmpfs (the tests run as root)");
        let one = framed(&c, c.new.len() as u64);
        let mut out = Vec::new();
        let limits = on_disk(20, scratch.path(), 1 << 30);
        let r = decode(Cursor::new(&one), &c.reference, &mut out, &limits);
        let left = is_empty_dir(scratch.path());
        umount(scratch.path()).unwrap();
        let err = r.unwrap_err();
        assert_eq!(
            crate::error::classify(&err).0,
            crate::error::Exit::NoSpace,
            "{err:#}"
        );
        assert!(out.is_empty() && left);
    }

    #[test]
    fn bytes_after_the_frames_fail_and_a_cut_at_a_frame_end_is_a_prefix() {
        let c = case(1 << 20, 20, 23, 3);
        let framed = framed(&c, 1 << 18);
        let mut trailing = framed.clone();
        trailing.extend_from_slice(b"not a frame");
        let err = format!("{:#}", dec(&trailing, &c.reference, 20).unwrap_err());
        assert!(err.contains("frame 4"), "{err}");
        let first = zstd_safe::find_frame_compressed_size(&framed).unwrap();
        assert_eq!(
            dec(&framed[..first], &c.reference, 20).unwrap(),
            c.new[..1 << 18]
        );
    }

    #[test]
    fn a_truncated_frame_fails() {
        let c = case(1 << 18, 20, 9, 3);
        let err = dec(&c.frame[..c.frame.len() - 3], &c.reference, 31).unwrap_err();
        assert!(format!("{err:#}").contains("decompressing against reference"));
    }

    #[test]
    fn empty_input_and_empty_reference_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let base = write_ref(&dir, "base", &random(1 << 16, 11));
        let empty = write_ref(&dir, "empty", b"");
        for reference in [&base, &empty] {
            let frame = enc(b"", reference, 3);
            assert!(!frame.is_empty());
            assert_eq!(dec(&frame, reference, 31).unwrap(), b"");
        }
        let frame = enc(b"no reference", &empty, 3);
        assert_eq!(dec(&frame, &empty, 23).unwrap(), b"no reference");
    }

    #[test]
    fn a_missing_reference_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = encode(Cursor::new(b"x"), &missing, Vec::new(), 3).unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
        let err = dec(b"x", &missing, 31).unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
        assert!(dec(b"", &missing, 32).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn round_trips_any_input_against_any_reference(
            base in proptest::collection::vec(any::<u8>(), 0..20_000),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..40),
            tail in proptest::collection::vec(any::<u8>(), 0..2_000),
            level in 1i32..=19,
            frame_len in 1u64..30_000,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let reference = write_ref(&dir, "base", &base);
            let mut new = base.clone();
            if !new.is_empty() {
                for (at, byte) in &edits {
                    let i = at.index(new.len());
                    new[i] = *byte;
                }
            }
            new.extend_from_slice(&tail);
            let frame = enc(&new, &reference, level);
            let window_log = encode_window_log(base.len() as u64);
            prop_assert_eq!(&dec(&frame, &reference, window_log).unwrap(), &new);
            let mut sized = Vec::new();
            let len = new.len() as u64;
            encode_frames(Cursor::new(&new), len, frame_len, &reference, &mut sized, level)
                .unwrap();
            let window_log = frames_window_log(len, frame_len);
            prop_assert_eq!(dec(&sized, &reference, window_log).unwrap(), new);
        }
    }
}
