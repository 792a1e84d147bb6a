//! The encoding side of `zstd-ref`: the server's (see `sys::refcodec`'s note).

use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use zstd::stream::raw::CParameter;

use super::{encode_window_log, window_log_for, Reference};

/// Compresses `input` into `out` as one zstd frame at `level`, with `reference`'s content as
/// the prefix. Long-distance matching, frame checksum, one thread: zstd's worker threads cut
/// the input into jobs and cost both bytes and time against a large prefix (bench/
/// delta-encodings' kernel update, level 15: 43.2 MB in 29.9 s on one thread, 47.6 MB in
/// 46.5 s with two workers).
/// The input's length is unknown: the window covers twice the reference, and the decoder will
/// allocate a buffer of the whole window; prefer [`encode_frames`] when the length is known.
pub fn encode(
    mut input: impl Read,
    reference: &Path,
    mut out: impl Write,
    level: i32,
) -> Result<()> {
    let reference = Reference::open(reference)?;
    let window_log = encode_window_log(reference.bytes().len() as u64);
    encode_frame(
        &mut input,
        None,
        window_log,
        reference.bytes(),
        &mut out,
        level,
    )?;
    out.flush().context("flushing the compressed output")
}

/// [`encode`] for an input of exactly `input_len` bytes (a different length fails), as frames
/// of at most `frame_len` bytes of input each, every one against the whole reference. Each
/// frame states its length, so it is "single segment": the decoder's buffer is that length
/// (see `sys::refcodec`'s note), and the largest frame bounds what a box allocates whatever the
/// stream's length: [`frames_window_log`]. Matches between frames are lost, matches into the
/// reference are not (bench/diff-size's kernel update, 546 MB: 64 MiB frames 0.8% larger than
/// one frame). Each frame loads the prefix again: its share of the build time.
pub fn encode_frames(
    mut input: impl Read,
    input_len: u64,
    frame_len: u64,
    reference: &Path,
    mut out: impl Write,
    level: i32,
) -> Result<()> {
    if frame_len == 0 {
        bail!("a zstd-ref frame must hold at least one byte");
    }
    let reference = Reference::open(reference)?;
    let prefix = reference.bytes();
    let mut remaining = input_len;
    loop {
        let len = remaining.min(frame_len);
        let window_log = window_log_for((prefix.len() as u64).saturating_add(len));
        encode_frame(&mut input, Some(len), window_log, prefix, &mut out, level)?;
        remaining -= len;
        if remaining == 0 {
            break;
        }
    }
    if input.read(&mut [0u8])? != 0 {
        bail!("the input is longer than the {input_len} bytes stated");
    }
    out.flush().context("flushing the compressed output")
}

/// The window log a decoder of [`encode_frames`]' output needs: that of its largest frame.
pub fn frames_window_log(input_len: u64, frame_len: u64) -> u32 {
    window_log_for(input_len.min(frame_len))
}

/// One frame against `prefix`: `len` bytes of `input` (all of it when `None`).
fn encode_frame(
    input: &mut impl Read,
    len: Option<u64>,
    window_log: u32,
    prefix: &[u8],
    out: &mut impl Write,
    level: i32,
) -> Result<()> {
    let mut raw = zstd::stream::raw::Encoder::with_ref_prefix(level, prefix)
        .context("creating the zstd encoder with the reference prefix")?;
    for param in [
        CParameter::WindowLog(window_log),
        CParameter::EnableLongDistanceMatching(true),
        CParameter::ChecksumFlag(true),
    ] {
        raw.set_parameter(param)
            .with_context(|| format!("setting zstd parameter {param:?}"))?;
    }
    raw.set_pledged_src_size(len)
        .context("stating the input's length to zstd")?;
    let mut encoder = zstd::stream::write::Encoder::with_encoder(out, raw);
    let copied = match len {
        Some(len) => copy(input.take(len), &mut encoder),
        None => copy(input, &mut encoder),
    }
    .context("compressing against the reference")?;
    if len.is_some_and(|len| copied != len) {
        bail!("the input ended after {copied} bytes of a frame of {len:?}");
    }
    encoder.finish().context("finishing the zstd frame")?;
    Ok(())
}

/// `io::copy` that keeps reading through `Interrupted` (as it does) and names the side that
/// failed: a read error is the input's, a write error the codec's or the output's.
fn copy(mut input: impl Read, out: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 17];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
}
