//! Streaming a download into the receive: the downloading side publishes how many bytes of the
//! artifact file are verified, and a [`VerifiedReader`] reads the file up to there and no
//! further, so decompression and `zfs receive` overlap the download without ever seeing a byte
//! whose chunk did not match the signed descriptor.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::{Context, Result};

/// The download stopped before the artifact was whole and verified; the reader's error. Its
/// text is the download's error, which the caller reports instead (it is the cause).
#[derive(Debug, thiserror::Error)]
#[error("the download stopped: {0}")]
pub struct DownloadStopped(pub String);

/// Whether `err` comes from a [`VerifiedReader`] whose download stopped (anywhere in the
/// chain, also inside the `io::Error` a decoder passed on).
pub fn is_download_stopped(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<DownloadStopped>().is_some()
            || c.downcast_ref::<io::Error>()
                .and_then(|e| e.get_ref())
                .is_some_and(|inner| inner.downcast_ref::<DownloadStopped>().is_some())
    })
}

/// The receive reading the download failed, so the download stopped at its next verified
/// chunk (what it verified is kept for a later run). The receive's error is the one to report.
#[derive(Debug, thiserror::Error)]
#[error("the receive stopped: {0}")]
pub struct ReceiveStopped(pub String);

/// Runs `download` here and `receive` on a thread beside it, over one [`Verified`]: the
/// receive reads only what the download verified, and the download stops at its next chunk
/// once the receive failed (a zfs error, a refused frame) instead of fetching bytes nobody
/// will read. `download` publishes its end (`complete` or `fail`); if it returns without one,
/// the reader sees a failure. Returns both results.
pub fn overlap<T>(
    download: impl FnOnce(&Verified) -> Result<T>,
    receive: impl FnOnce(VerifiedReader<'_>) -> Result<()> + Send,
) -> (Result<T>, Result<()>) {
    let verified = Verified::new();
    std::thread::scope(|s| {
        let receiving = s.spawn(|| {
            let received = receive(verified.reader());
            if let Err(e) = &received {
                verified.receive_failed(&format!("{e:#}"));
            }
            received
        });
        let fetched = {
            let _end = verified.end_on_drop();
            download(&verified)
        };
        let received = receiving
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (fetched, received)
    })
}

/// How a download ended, as the reader sees it.
#[derive(Debug, Clone)]
enum End {
    /// Whole and verified: every byte up to `verified` is the artifact, and nothing follows.
    Complete,
    Failed(String),
}

#[derive(Debug, Default)]
struct Inner {
    /// The file the artifact grows in (shared with the download; read with `read_at`, so the
    /// download's own file position is never moved).
    file: Option<Arc<File>>,
    /// Bytes from the start of `file` that are verified.
    verified: u64,
    end: Option<End>,
    /// Why the receive reading the download failed, once it did.
    receive_failed: Option<String>,
}

/// Progress of one download shared between the downloading thread and the reader: a mutex and
/// a condition variable, so a waiting reader sleeps until the download says something.
#[derive(Debug, Default)]
pub struct Verified {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Verified {
    pub fn new() -> Verified {
        Verified::default()
    }

    /// Locks the state; a poisoned lock (a thread panicked while holding it) still holds
    /// consistent numbers: each update is a single assignment.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Inner)) {
        let mut inner = self.lock();
        if inner.end.is_none() {
            f(&mut inner);
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// The download writes `file`; its first `verified` bytes are already good (a resumed
    /// download, or a complete one found on disk). Published before any byte of it is read.
    pub fn opened(&self, file: &File, verified: u64) -> Result<()> {
        let file = Arc::new(file.try_clone().context("sharing the download's file")?);
        self.update(|inner| {
            inner.file = Some(file);
            inner.verified = verified;
        });
        Ok(())
    }

    /// The first `verified` bytes of the file are whole chunks that match the descriptor.
    /// Never moves back: a download only cuts bytes beyond what it verified.
    pub fn advance(&self, verified: u64) {
        self.update(|inner| inner.verified = inner.verified.max(verified));
    }

    /// The whole artifact, `size` bytes, matched its signed sha256: the reader may take the
    /// rest and then sees the end.
    pub fn complete(&self, size: u64) {
        self.update(|inner| {
            inner.verified = size;
            inner.end = Some(End::Complete);
        });
    }

    /// The download failed: a waiting reader gets `DownloadStopped` with `why`.
    pub fn fail(&self, why: &str) {
        self.update(|inner| inner.end = Some(End::Failed(why.to_owned())));
    }

    /// Publishes how the download of a `size`-byte artifact ended (`complete` or `fail`) and
    /// hands its result on.
    pub fn end<T>(&self, download: Result<T>, size: u64) -> Result<T> {
        match &download {
            Ok(_) => self.complete(size),
            Err(e) => self.fail(&format!("{e:#}")),
        }
        download
    }

    /// The receive failed (`why`): the download stops at its next verified chunk.
    pub fn receive_failed(&self, why: &str) {
        self.lock()
            .receive_failed
            .get_or_insert_with(|| why.to_owned());
    }

    /// `ReceiveStopped` once the receive failed: the download's check after each chunk.
    pub fn check_receiving(&self) -> Result<()> {
        match &self.lock().receive_failed {
            Some(why) => Err(ReceiveStopped(why.clone()).into()),
            None => Ok(()),
        }
    }

    /// Fails the download when dropped before it ended, whatever stopped it (an early return,
    /// a panic): a reader must never wait for bytes nobody will verify.
    pub fn end_on_drop(&self) -> EndOnDrop<'_> {
        EndOnDrop(self)
    }

    /// A reader of the verified bytes from the start of the file.
    pub fn reader(&self) -> VerifiedReader<'_> {
        VerifiedReader {
            shared: self,
            pos: 0,
        }
    }

    /// Blocks until bytes beyond `pos` are verified or the download ended: the file and how
    /// far it may be read, `None` at the end of a complete download, an error once it failed.
    fn wait_beyond(&self, pos: u64) -> io::Result<Option<(Arc<File>, u64)>> {
        let mut inner = self.lock();
        loop {
            // A failure first, even with verified bytes left: the receive is lost anyway, and
            // the sooner it stops the sooner the download's error is reported.
            if let Some(End::Failed(why)) = &inner.end {
                return Err(io::Error::other(DownloadStopped(why.clone())));
            }
            if inner.verified > pos {
                if let Some(file) = &inner.file {
                    return Ok(Some((file.clone(), inner.verified)));
                }
            }
            if let Some(End::Complete) = inner.end {
                return Ok(None);
            }
            inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// See [`Verified::end_on_drop`].
pub struct EndOnDrop<'a>(&'a Verified);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        self.0
            .fail("the download ended without saying whether it succeeded");
    }
}

/// Reads the artifact file as the download verifies it: never a byte beyond the verified
/// length; blocks while the download is behind; `Ok(0)` only once the download is complete and
/// verified whole; `DownloadStopped` once it failed.
pub struct VerifiedReader<'a> {
    shared: &'a Verified,
    pos: u64,
}

impl Read for VerifiedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let Some((file, verified)) = self.shared.wait_beyond(self.pos)? else {
            return Ok(0);
        };
        let want = (verified - self.pos).min(buf.len() as u64) as usize;
        let n = file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            // Verified bytes are on disk: a shorter file was changed under the download.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the download file ends at byte {} though {verified} bytes were verified",
                    self.pos
                ),
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::mpsc;

    use super::*;

    /// A file holding `data` and a second handle to it, as the download has them.
    fn file_with(data: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        f.flush().unwrap();
        let handle = f.reopen().unwrap();
        (f, handle)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Reads in a thread of its own, sending what each read returned (bytes or the error
    /// text), until the end or an error.
    fn spawn_reader<'s>(
        s: &'s std::thread::Scope<'s, '_>,
        shared: &'s Verified,
        tx: mpsc::Sender<std::result::Result<Vec<u8>, String>>,
    ) {
        s.spawn(move || {
            let mut r = shared.reader();
            let mut buf = vec![0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(n) => {
                        tx.send(Ok(buf[..n].to_vec())).unwrap();
                        if n == 0 {
                            return;
                        }
                    }
                    Err(e) => {
                        tx.send(Err(e.to_string())).unwrap();
                        return;
                    }
                }
            }
        });
    }

    /// Everything the reader returns until it has `len` bytes in all; none may be an error or
    /// the end.
    fn take(rx: &mpsc::Receiver<std::result::Result<Vec<u8>, String>>, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < len {
            let bytes = rx.recv().unwrap().unwrap();
            assert!(!bytes.is_empty(), "end after {} bytes", got.len());
            got.extend(bytes);
        }
        got
    }

    #[test]
    fn reads_only_verified_bytes_in_order_and_ends_only_after_completion() {
        let all = data(50_000);
        // The whole file is on disk from the start: only what is published may come out.
        let (_tmp, file) = file_with(&all);
        let shared = Verified::new();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            spawn_reader(s, &shared, tx);
            shared.opened(&file, 0).unwrap();
            let mut got = Vec::new();
            // The same length twice: nothing new to read.
            for verified in [10_000usize, 10_000, 25_000, 40_000] {
                shared.advance(verified as u64);
                got.extend(take(&rx, verified - got.len()));
                assert_eq!(got.len(), verified, "never beyond the verified length");
                // Nothing more until more is verified, and no end.
                assert!(rx.try_recv().is_err());
            }
            assert_eq!(got, all[..40_000]);
            shared.complete(all.len() as u64);
            got.extend(take(&rx, all.len() - got.len()));
            assert_eq!(got, all, "the file's exact bytes, in order");
            assert_eq!(
                rx.recv().unwrap().unwrap(),
                b"",
                "the end, after completion"
            );
        });
    }

    #[test]
    fn waits_and_never_ends_before_completion() {
        let all = data(5_000);
        let (_tmp, file) = file_with(&all);
        let shared = Verified::new();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            spawn_reader(s, &shared, tx);
            // Opened with everything verified but not complete: all bytes, and then it waits.
            shared.opened(&file, all.len() as u64).unwrap();
            assert_eq!(take(&rx, all.len()), all);
            assert!(
                rx.recv_timeout(std::time::Duration::from_millis(100))
                    .is_err(),
                "no end before the download says it is complete"
            );
            shared.complete(all.len() as u64);
            assert_eq!(rx.recv().unwrap().unwrap(), b"");
        });
    }

    #[test]
    fn a_failed_download_is_an_error_for_the_reader() {
        let all = data(20_000);
        let (_tmp, file) = file_with(&all);
        let shared = Verified::new();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            spawn_reader(s, &shared, tx);
            shared.opened(&file, 8_000).unwrap();
            assert_eq!(take(&rx, 8_000), all[..8_000]);
            shared.fail("chunk 1 does not match");
            let err = rx.recv().unwrap().unwrap_err();
            assert!(err.contains("chunk 1 does not match"), "{err}");
            // What the download says after it failed changes nothing.
            shared.complete(all.len() as u64);
        });
        // A reader still behind gets the error at once, not the verified bytes it has left.
        let err = shared.reader().read(&mut [0u8; 16]).unwrap_err();
        let err = anyhow::Error::from(err).context("decompressing");
        assert!(is_download_stopped(&err), "{err:#}");
    }

    #[test]
    fn a_resumed_prefix_is_readable_at_once() {
        let all = data(30_000);
        let (_tmp, file) = file_with(&all);
        let shared = Verified::new();
        shared.opened(&file, 12_000).unwrap();
        // No other thread: the verified prefix does not wait for anything.
        let mut r = shared.reader();
        let mut got = vec![0u8; 12_000];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got, all[..12_000]);
        shared.complete(all.len() as u64);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, all[12_000..]);
    }

    #[test]
    fn a_download_dropped_before_it_ended_fails_its_reader() {
        let shared = Verified::new();
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            spawn_reader(s, &shared, tx);
            let guard = shared.end_on_drop();
            drop(guard);
            let err = rx.recv().unwrap().unwrap_err();
            assert!(err.contains("without saying"), "{err}");
        });
        // After a completion, the guard changes nothing.
        let (_tmp, file) = file_with(b"abc");
        let done = Verified::new();
        done.opened(&file, 0).unwrap();
        let guard = done.end_on_drop();
        done.complete(3);
        drop(guard);
        let mut out = Vec::new();
        done.reader().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
    }
}
