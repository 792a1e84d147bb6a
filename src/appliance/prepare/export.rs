//! Exporting a received image (a zvol snapshot device) to a sparse image file, verified end to
//! end against the signed digest.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::core::manifest::Blob;
use crate::error::Error;

const BLOCK: usize = 1 << 20;

/// Copies `device` to `dest`, leaving holes for all-zero blocks, hashing everything on a second
/// core while the copy goes on; fsyncs. Fails with `ChecksumMismatch` (and removes `dest`)
/// when the content is not `expected`.
pub fn export(device: &Path, dest: &Path, expected: &Blob) -> Result<()> {
    let ctx = || format!("exporting {} to {}", device.display(), dest.display());
    let mut src = File::open(device).with_context(ctx)?;
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)
        .with_context(ctx)?;
    // Blocks go to the hasher and come back to be refilled: no allocation per block.
    let (to_hash, hash_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(4);
    let (to_fill, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..6 {
        to_fill.send(vec![0u8; BLOCK]).expect("receiver alive");
    }
    let hasher = std::thread::spawn(move || {
        let mut hash = Sha256::new();
        for (buf, n) in hash_rx {
            hash.update(&buf[..n]);
            if to_fill.send(buf).is_err() {
                break;
            }
        }
        hex::encode(hash.finalize())
    });
    let mut total: u64 = 0;
    let copied: Result<()> = (|| loop {
        let mut buf = free_rx.recv().context("hasher stopped")?;
        let n = read_full(&mut src, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let block = &buf[..n];
        if is_zero(block) {
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(block)?;
        }
        total += n as u64;
        to_hash.send((buf, n)).context("hasher stopped")?;
    })();
    drop(to_hash);
    let actual = hasher.join().expect("hasher thread");
    copied.with_context(ctx)?;
    out.set_len(total).with_context(ctx)?;
    out.sync_all().with_context(ctx)?;
    if total != expected.size || actual != expected.sha256 {
        let _ = std::fs::remove_file(dest);
        return Err(Error::ChecksumMismatch {
            what: format!(
                "exported image {} ({total} bytes, signed {})",
                dest.display(),
                expected.size
            ),
            expected: expected.sha256.clone(),
            actual,
        }
        .into());
    }
    Ok(())
}

fn is_zero(block: &[u8]) -> bool {
    let words = block.chunks_exact(16);
    let tail = words.remainder();
    words
        .map(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")))
        .all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        let mut data = vec![0u8; 8 << 20];
        data[3 << 20..(3 << 20) + 5].copy_from_slice(b"hello");
        std::fs::write(&dev, &data).unwrap();
        let blob = Blob {
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(&data)),
        };
        let dest = dir.path().join("out.img");
        export(&dev, &dest, &blob).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        assert!(
            std::fs::metadata(&dest).unwrap().blocks() * 512 <= 2 << 20,
            "holes were written"
        );
        let wrong = Blob {
            size: blob.size,
            sha256: "00".repeat(32),
        };
        let err = export(&dev, &dest, &wrong).unwrap_err();
        assert!(matches!(
            err.downcast_ref::<Error>(),
            Some(Error::ChecksumMismatch { .. })
        ));
        assert!(!dest.exists(), "a bad export is removed");
    }
}
