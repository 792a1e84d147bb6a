//! sha256 while streaming: whole-file digests and per-chunk digests, composable as a writer.

use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Size of the pieces each artifact is verified in.
pub const CHUNK_SIZE: u64 = 4 << 20;

/// sha256 of a byte slice, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Hashes a stream in fixed-size chunks: feed it bytes, get each chunk's digest (hex) as the
/// chunk completes; `finish` gives the digest of a last, shorter chunk.
pub struct ChunkHasher {
    chunk: Sha256,
    in_chunk: u64,
    chunk_size: u64,
}

impl ChunkHasher {
    pub fn new(chunk_size: u64) -> Self {
        assert!(chunk_size > 0, "chunk size 0");
        ChunkHasher {
            chunk: Sha256::new(),
            in_chunk: 0,
            chunk_size,
        }
    }

    /// Feeds `data`; calls `completed` with the digest of each chunk it completes, in order.
    pub fn update<E>(
        &mut self,
        mut data: &[u8],
        mut completed: impl FnMut(String) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            let take = ((self.chunk_size - self.in_chunk) as usize).min(data.len());
            self.chunk.update(&data[..take]);
            self.in_chunk += take as u64;
            data = &data[take..];
            if self.in_chunk == self.chunk_size {
                self.in_chunk = 0;
                completed(hex::encode(self.chunk.finalize_reset()))?;
            }
        }
        Ok(())
    }

    /// The digest of the bytes fed since the last complete chunk, if any.
    pub fn finish(self) -> Option<String> {
        (self.in_chunk > 0).then(|| hex::encode(self.chunk.finalize()))
    }
}

/// Wraps a writer; hashes everything written, as a whole and per chunk.
pub struct HashingWriter<W> {
    inner: W,
    whole: Sha256,
    chunker: ChunkHasher,
    pub chunks: Vec<String>,
    pub written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W, chunk_size: u64) -> Self {
        HashingWriter {
            inner,
            whole: Sha256::new(),
            chunker: ChunkHasher::new(chunk_size),
            chunks: Vec::new(),
            written: 0,
        }
    }

    /// The inner writer, the whole digest and the chunk digests.
    pub fn finish(mut self) -> (W, String, Vec<String>) {
        self.chunks.extend(self.chunker.finish());
        (self.inner, hex::encode(self.whole.finalize()), self.chunks)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.whole.update(&buf[..n]);
        let chunks = &mut self.chunks;
        self.chunker.update(&buf[..n], |d| -> io::Result<()> {
            chunks.push(d);
            Ok(())
        })?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 of a reader's whole content.
pub fn sha256_reader(mut r: impl Read) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    sha256_reader(f).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_and_whole_digests() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = HashingWriter::new(Vec::new(), 4096);
        for piece in data.chunks(777) {
            w.write_all(piece).unwrap();
        }
        let (out, whole, chunks) = w.finish();
        assert_eq!(out, data);
        assert_eq!(whole, hex::encode(Sha256::digest(&data)));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2], hex::encode(Sha256::digest(&data[8192..])));
    }
}
