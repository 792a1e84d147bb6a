//! `sys::refcodec` from the shell, for bench/delta-encodings: stdin to stdout (a regular
//! file on stdin is encoded in frames as the server cuts them, each stating its length; of
//! `FRAME_MIB` MiB if set, else the server's default).
//!
//!   refcodec encode REFERENCE [LEVEL]           (level default 19)
//!   refcodec decode REFERENCE [MAX_WINDOW_LOG]  (default 31; with `ON_DISK=DIR`, a frame
//!                                               longer than that is decoded through a file in
//!                                               DIR, as a box does: `refcodec::OnDisk`)

use std::fs::File;
use std::io::{stdin, stdout, BufWriter};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{bail, Context, Result};
use upgradectl::sys::refcodec;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (verb, reference, number) = match args.as_slice() {
        [verb, reference] => (verb.as_str(), reference, None),
        [verb, reference, number] => (verb.as_str(), reference, Some(number)),
        _ => bail!("usage: refcodec encode|decode REFERENCE [LEVEL|MAX_WINDOW_LOG] <in >out"),
    };
    let reference = Path::new(reference);
    let out = BufWriter::with_capacity(1 << 20, stdout().lock());
    match verb {
        "encode" => {
            let level = number.map_or(Ok(19), |n| n.parse()).context("level")?;
            // A regular file on stdin has a length: frames as the server cuts them, each
            // stating its length (see encode_frames).
            let len = File::from(stdin().as_fd().try_clone_to_owned()?)
                .metadata()
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            let frame = match std::env::var("FRAME_MIB") {
                Ok(mib) => mib.parse::<u64>().context("FRAME_MIB")? << 20,
                Err(_) => upgradectl::server::http::DEFAULT_ZSTD_REF_FRAME,
            };
            match len {
                Some(len) => {
                    refcodec::encode_frames(stdin().lock(), len, frame, reference, out, level)
                }
                None => refcodec::encode(stdin().lock(), reference, out, level),
            }
        }
        "decode" => {
            let max = number
                .map_or(Ok(31), |n| n.parse())
                .context("max_window_log")?;
            let on_disk = std::env::var_os("ON_DISK").map(|dir| refcodec::OnDisk {
                dir: dir.into(),
                max_bytes: 1 << refcodec::WINDOW_LOG_MAX,
            });
            let limits = refcodec::Limits {
                max_window_log: max,
                on_disk,
            };
            refcodec::decode(stdin().lock(), reference, out, &limits)
        }
        other => bail!("unknown verb {other:?}: encode or decode"),
    }
}
