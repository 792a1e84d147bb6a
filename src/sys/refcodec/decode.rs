//! The decoding side of `zstd-ref`: the box's, in memory or on disk (see `sys::refcodec`'s note).

use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use zstd::stream::raw::{DParameter, InBuffer, Operation, OutBuffer};
use zstd::zstd_safe;

use super::{Reference, WINDOW_LOG_MAX, WINDOW_LOG_MIN};

/// What a decoder may spend on one frame.
#[derive(Debug, Clone)]
pub struct Limits {
    /// log2 of the largest buffer allocated in memory (a frame's window).
    pub max_window_log: u32,
    /// Where a frame stating a length above `2^max_window_log` is decoded instead: see
    /// [`OnDisk`]. `None`: such a frame is refused.
    pub on_disk: Option<OnDisk>,
}

impl Limits {
    /// Frames in memory only, within `2^max_window_log` bytes.
    pub fn memory(max_window_log: u32) -> Self {
        Self {
            max_window_log,
            on_disk: None,
        }
    }
}

/// A frame longer than the decoder's memory, decoded into a file-backed buffer: an unnamed file
/// in `dir` (`O_TMPFILE`: a kill or a power cut leaves nothing behind), its blocks reserved
/// before the first byte is written (a full disk is an error, never a `SIGBUS` on the mapping),
/// mapped and given to zstd as its output (`ZSTD_d_stableOutBuffer`: the decoder then allocates
/// no window of its own, it reads its history back from the mapping). Each decoded piece goes
/// on to `out` as it appears. Anonymous memory stays at zstd's input block; the frame's pages
/// are page cache, which the kernel writes back and drops under pressure.
#[derive(Debug, Clone)]
pub struct OnDisk {
    pub dir: std::path::PathBuf,
    /// The longest frame taken this way: what the caller set aside on `dir`'s filesystem.
    pub max_bytes: u64,
}

/// Decompresses the frames made by [`super::encode`] or [`super::encode_frames`] against the
/// same `reference` into `out`, each frame against the whole reference. A frame whose window
/// exceeds `2^limits.max_window_log` bytes is decoded on disk when it states a length within
/// `limits.on_disk` ([`OnDisk`]), else refused before any allocation; a frame decoded against
/// a different reference fails its checksum (see `sys::refcodec`'s note on `out`).
pub fn decode(
    mut input: impl Read,
    reference: &Path,
    mut out: impl Write,
    limits: &Limits,
) -> Result<()> {
    let max_window_log = limits.max_window_log;
    if !(WINDOW_LOG_MIN..=WINDOW_LOG_MAX).contains(&max_window_log) {
        bail!("max_window_log {max_window_log} is outside zstd's range {WINDOW_LOG_MIN}..={WINDOW_LOG_MAX}");
    }
    let reference_path = reference;
    let reference = Reference::open(reference_path)?;
    let limit = || {
        format!(
            "decompressing against reference {} (window limit max_window_log = {max_window_log}, {} MiB)",
            reference_path.display(),
            (1u64 << max_window_log) >> 20
        )
    };
    let mut frames = Frames {
        input: &mut input,
        buf: vec![0u8; 1 << 17],
        start: 0,
        end: 0,
        eof: false,
    };
    let mut decoded = vec![0u8; 1 << 17];
    let mut count = 0u64;
    while frames.more().context("reading the compressed input")? {
        // The prefix serves one frame: each frame gets a decoder of its own.
        let mut raw = zstd::stream::raw::Decoder::with_ref_prefix(reference.bytes())
            .context("creating the zstd decoder with the reference prefix")?;
        let on_disk = match frames.content_size().context("reading a frame's header")? {
            Some(len) if len > 1 << max_window_log => match &limits.on_disk {
                Some(disk) if len <= disk.max_bytes => Some((disk, len)),
                disk => {
                    return Err(crate::error::refused(format!(
                        "the frame decodes to {len} bytes, above the decoder's memory \
                         (2^{max_window_log} bytes) and the {} bytes set aside on disk",
                        disk.as_ref().map_or(0, |d| d.max_bytes)
                    )))
                    .with_context(|| format!("frame {count}"))
                    .with_context(limit);
                }
            },
            _ => None,
        };
        let decoded_frame = match on_disk {
            None => raw
                .set_parameter(DParameter::WindowLogMax(max_window_log))
                .and_then(|()| frames.decode_frame(&mut raw, &mut decoded, false, &mut out)),
            Some((disk, len)) => {
                let mut map = disk_buffer(&disk.dir, len)
                    .with_context(|| format!("frame {count}"))
                    .with_context(limit)?;
                // The history is the mapping: zstd allocates no window whatever the frame
                // states, so any window it knows is accepted (the frame's length bounds it).
                raw.set_parameter(DParameter::StableOutBuffer(true))
                    .and_then(|()| raw.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX)))
                    .and_then(|()| frames.decode_frame(&mut raw, &mut map, true, &mut out))
            }
        };
        decoded_frame
            .map_err(|e| explain(e, max_window_log))
            .with_context(|| format!("frame {count}"))
            .with_context(limit)?;
        count += 1;
    }
    if count == 0 {
        bail!("{}: the input holds no zstd frame", limit());
    }
    out.flush().context("flushing the decompressed output")?;
    Ok(())
}

/// A file-backed buffer of `len` bytes in `dir`, its blocks reserved: [`OnDisk`]. A full disk
/// is ENOSPC here (no space, exit 6), before anything is decoded.
fn disk_buffer(dir: &Path, len: u64) -> Result<memmap2::MmapMut> {
    use std::os::fd::AsRawFd;
    let what = || format!("a buffer of {len} bytes in {}", dir.display());
    let file = tempfile::tempfile_in(dir).with_context(|| format!("creating {}", what()))?;
    let size = i64::try_from(len).context("a frame longer than a file can be")?;
    nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, size)
        .map_err(io::Error::from)
        .with_context(|| format!("reserving the blocks of {}", what()))?;
    // SAFETY: the file is unnamed and ours alone: nothing else maps, truncates or writes it.
    unsafe { memmap2::MmapMut::map_mut(&file) }.with_context(|| format!("mapping {}", what()))
}

/// The compressed input, read in blocks and cut at frame ends (what a frame's decoder did not
/// consume is the next frame's start).
struct Frames<'a, R> {
    input: &'a mut R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> Frames<'_, R> {
    /// Reads more input after what the buffer holds (its unread part moved to its start).
    fn read_more(&mut self) -> io::Result<()> {
        self.buf.copy_within(self.start..self.end, 0);
        (self.start, self.end) = (0, self.end - self.start);
        match self.input.read(&mut self.buf[self.end..]) {
            Ok(0) => self.eof = true,
            Ok(n) => self.end += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn fill(&mut self) -> io::Result<()> {
        while self.start == self.end && !self.eof {
            self.read_more()?;
        }
        Ok(())
    }

    /// Whether another frame starts here.
    fn more(&mut self) -> io::Result<bool> {
        self.fill()?;
        Ok(self.start < self.end)
    }

    /// The decoded length the next frame states, if it states one; `None` also for what is not
    /// a frame's header (the decoder then names what is wrong).
    fn content_size(&mut self) -> io::Result<Option<u64>> {
        // A frame's header is at most 18 bytes: have them in the buffer together.
        const HEADER_MAX: usize = 18;
        while self.end - self.start < HEADER_MAX && !self.eof {
            self.read_more()?;
        }
        Ok(zstd_safe::get_frame_content_size(&self.buf[self.start..self.end]).unwrap_or(None))
    }

    /// Decodes one frame into `out` through `buf`, consuming exactly its bytes. `stable`: `buf`
    /// is the frame's whole length and zstd's history ([`OnDisk`]), each call continuing where
    /// the last one ended; otherwise zstd keeps its own window and every call reuses `buf`.
    fn decode_frame(
        &mut self,
        raw: &mut zstd::stream::raw::Decoder<'_>,
        buf: &mut [u8],
        stable: bool,
        out: &mut impl Write,
    ) -> io::Result<()> {
        let mut pos = 0;
        loop {
            self.fill()?;
            let mut input = InBuffer::around(&self.buf[self.start..self.end]);
            let start = if stable { pos } else { 0 };
            let mut output = OutBuffer::around_pos(&mut *buf, start);
            // 0: the frame is decoded, checked and flushed.
            let hint = raw.run(&mut input, &mut output)?;
            let (consumed, end) = (input.pos(), output.pos());
            self.start += consumed;
            out.write_all(&buf[start..end])?;
            pos = end;
            if hint == 0 {
                return Ok(());
            }
            if self.eof && consumed == 0 && end == start {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the input ends inside a frame",
                ));
            }
        }
    }
}

/// Decoded bytes that fail the frame's checksum: the reference is not the one the frame was
/// made against (or the frame is corrupt). Find it in an error chain with `downcast_ref`.
#[derive(Debug, thiserror::Error)]
#[error(
    "the decompressed bytes fail the frame's checksum: the reference is not the one the frame \
     was made against (or the frame is corrupt)"
)]
pub struct ReferenceMismatch;

/// zstd's own words for the two failures a caller must tell apart, made specific.
fn explain(e: io::Error, max_window_log: u32) -> anyhow::Error {
    let text = e.to_string();
    let name = |code: zstd_safe::zstd_sys::ZSTD_ErrorCode| {
        // zstd returns an error as the code's negation in a size_t.
        zstd_safe::get_error_name(0usize.wrapping_sub(code as usize))
    };
    let window_too_large =
        name(zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_frameParameter_windowTooLarge);
    let checksum = name(zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_checksum_wrong);
    // The typed errors are the roots of their chains, where `error::classify` and
    // `downcast_ref` find them under any context a caller adds.
    if text == window_too_large {
        crate::error::refused(format!(
            "the frame needs a window larger than the limit max_window_log = {max_window_log} \
             (2^{max_window_log} bytes); refused before allocating ({text})"
        ))
    } else if text == checksum {
        ReferenceMismatch.into()
    } else {
        e.into()
    }
}
