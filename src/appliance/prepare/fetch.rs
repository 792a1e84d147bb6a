//! HTTP for the box: asking for descriptors (the server builds on demand), and artifact downloads that resume
//! (Range into a `.partial`), verify every chunk as it arrives (publishing the verified length
//! for `stream`, which feeds the receive meanwhile), and give up on a stalled server.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::blocking::{Client, Response};
use reqwest::header::{RANGE, RETRY_AFTER};
use reqwest::StatusCode;

use sha2::{Digest, Sha256};

use crate::core::hashing::{sha256_file, sha256_hex, ChunkHasher};
use crate::core::manifest::Descriptor;
use crate::error::Error;

use super::stream::Verified;

/// Limits of a download.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Give up when fewer than `min_speed` bytes/s arrive over this window.
    pub stall: Duration,
    pub min_speed: u64,
}

pub fn client(limits: &Limits) -> Result<Client> {
    Client::builder()
        .connect_timeout(Duration::from_secs(30))
        // The blocking client applies this to each read: a server silent for a whole stall
        // window fails the read; slower trickles are caught by the speed check in `download`.
        .timeout(limits.stall)
        .user_agent(concat!("upgradectl/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("creating the HTTP client")
}

/// GETs `url`; "come back later" (503/202 + Retry-After) becomes `Error::ComeBackLater`.
fn get(client: &Client, url: &str, what: &str) -> Result<Response> {
    let resp = client
        .get(url)
        .send()
        .with_context(|| format!("GET {url}"))?;
    check(resp, url, what)
}

/// Longest "come back later" a server can ask for, in seconds; longer values are cut to it.
pub const MAX_RETRY_AFTER: u64 = 3600;
/// Retry-After when the server gives none or an unreadable one.
const DEFAULT_RETRY_AFTER: u64 = 30;
/// Most bytes of an error response read.
pub const MAX_ERROR_BODY: u64 = 4 << 10;
/// Most bytes of an error response shown in a message.
const SHOWN_ERROR_BODY: usize = 300;

/// Seconds to come back after, from a Retry-After header, within 1..=`MAX_RETRY_AFTER`.
pub fn retry_after_secs(header: Option<&str>) -> u64 {
    header
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_RETRY_AFTER)
        .clamp(1, MAX_RETRY_AFTER)
}

fn check(resp: Response, url: &str, what: &str) -> Result<Response> {
    let status = resp.status();
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::ACCEPTED {
        let header = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok());
        return Err(Error::ComeBackLater {
            what: what.to_owned(),
            retry_after: Duration::from_secs(retry_after_secs(header)),
        }
        .into());
    }
    if !status.is_success() {
        let body = read_capped(resp, MAX_ERROR_BODY).unwrap_or_else(|e| match e {
            Capped::TooLarge(prefix) => prefix,
            Capped::Io(_) => Vec::new(),
        });
        return Err(HttpError {
            url: url.to_owned(),
            status: status.as_u16(),
            body: shown(&body),
        }
        .into());
    }
    Ok(resp)
}

/// An answer that is neither a success nor "come back later".
#[derive(Debug, thiserror::Error)]
#[error("GET {url}: {status}: {body}")]
pub struct HttpError {
    pub url: String,
    pub status: u16,
    /// The start of the body, one line.
    pub body: String,
}

/// Whether the server said it has no such thing (404) anywhere in `err`'s chain.
pub fn is_not_found(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<HttpError>()
            .is_some_and(|h| h.status == 404)
    })
}

/// At most `SHOWN_ERROR_BODY` bytes of `body` as one trimmed line, cut on a UTF-8 boundary.
fn shown(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.len() <= SHOWN_ERROR_BODY {
        return text.replace(['\n', '\r'], " ");
    }
    let mut end = SHOWN_ERROR_BODY;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", text[..end].replace(['\n', '\r'], " "))
}

/// Why a capped read stopped.
enum Capped {
    /// The body is longer than the cap; here are its first `cap` bytes.
    TooLarge(Vec<u8>),
    Io(std::io::Error),
}

/// Reads a whole body of at most `cap` bytes, never more into memory.
fn read_capped(resp: Response, cap: u64) -> std::result::Result<Vec<u8>, Capped> {
    let mut body = Vec::new();
    resp.take(cap + 1)
        .read_to_end(&mut body)
        .map_err(Capped::Io)?;
    if body.len() as u64 > cap {
        body.truncate(cap as usize);
        return Err(Capped::TooLarge(body));
    }
    Ok(body)
}

/// The body of `url`, at most `max_bytes` of it: a larger one is refused unread (hostile or
/// broken server). What the body says is trusted only once verified elsewhere.
pub fn get_capped(client: &Client, url: &str, what: &str, max_bytes: u64) -> Result<Vec<u8>> {
    let resp = get(client, url, what)?;
    read_capped(resp, max_bytes).map_err(|e| match e {
        Capped::TooLarge(_) => anyhow::Error::from(Error::Refused(format!(
            "{what} from {url} is larger than {max_bytes} bytes; refusing it"
        ))),
        Capped::Io(e) => anyhow::Error::from(e).context(format!("reading {url}")),
    })
}

/// Progress callback: bytes done, bytes in all.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// What a download did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fetched {
    /// Bytes that crossed the wire in this run.
    pub downloaded: u64,
    /// Bytes already verified from an earlier run.
    pub resumed: u64,
}

/// Downloads `url` to `dest`, verified against the signed descriptor. Resumes a `.partial`
/// left by an interrupted run after re-verifying its complete chunks. Returns at once when
/// `dest` is already complete and verified.
pub fn download(
    client: &Client,
    url: &str,
    dest: &Path,
    d: &Descriptor,
    limits: &Limits,
    progress: Progress,
) -> Result<Fetched> {
    download_watched(client, url, dest, d, limits, progress, None)
}

/// [`download`], publishing to `watch` the file and each verified prefix of it as it grows,
/// for a reader that streams the artifact while it downloads (`prepare::stream`). All but the
/// last chunk are published here; the caller publishes the end (`Verified::complete`) once
/// this returned Ok, i.e. once the whole sha256 matched, or the failure.
pub fn download_watched(
    client: &Client,
    url: &str,
    dest: &Path,
    d: &Descriptor,
    limits: &Limits,
    progress: Progress,
    watch: Option<&Verified>,
) -> Result<Fetched> {
    d.validate()?;
    if complete_and_verified(dest, d)? {
        if let Some(watch) = watch {
            let file = File::open(dest).with_context(|| format!("opening {}", dest.display()))?;
            watch.opened(&file, before_last_chunk(d, d.size))?;
        }
        return Ok(Fetched {
            downloaded: 0,
            resumed: d.size,
        });
    }
    let partial = partial_path(dest);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    // The whole file's sha256, computed as its bytes are verified or arrive rather than by
    // reading the file again at the end (which held back the last chunk, and so the end of the
    // receive, for a whole pass over the artifact: bench/box-pipeline).
    let mut whole = Sha256::new();
    let verified = verified_prefix(&mut file, d, &mut whole)?;
    file.set_len(verified)?;
    file.seek(SeekFrom::Start(verified))?;
    if let Some(watch) = watch {
        watch.opened(&file, before_last_chunk(d, verified))?;
    }
    let mut fetched = Fetched {
        downloaded: 0,
        resumed: verified,
    };
    if verified < d.size {
        let mut req = client.get(url);
        if verified > 0 {
            req = req.header(RANGE, format!("bytes={verified}-"));
        }
        let resp = check(
            req.send().with_context(|| format!("GET {url}"))?,
            url,
            &d.name,
        )?;
        if verified > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            anyhow::bail!(
                "GET {url}: the server ignored the Range request ({})",
                resp.status()
            );
        }
        let mut chunk_verified = |len: u64| -> Result<()> {
            match watch {
                Some(watch) => {
                    watch.advance(before_last_chunk(d, len));
                    watch.check_receiving()
                }
                None => Ok(()),
            }
        };
        fetched.downloaded = stream_chunks(
            resp,
            &mut file,
            verified,
            url,
            d,
            limits,
            progress,
            &mut chunk_verified,
            &mut whole,
        )?;
    }
    let actual = hex::encode(whole.finalize());
    if actual != d.sha256 {
        drop(file);
        let _ = std::fs::remove_file(&partial);
        return Err(Error::ChecksumMismatch {
            what: url.to_string(),
            expected: d.sha256.clone(),
            actual,
        }
        .into());
    }
    // The caller releases the last chunk to the reader (`Verified::end`) once this returns:
    // the receive never completes before the download is durable and in place, so a failure
    // after the download (`prepare::downloaded`) still stops the receive.
    file.sync_all()?;
    drop(file);
    std::fs::rename(&partial, dest)?;
    crate::sys::fsutil::fsync_dir(dest.parent().unwrap_or(Path::new(".")))?;
    Ok(fetched)
}

/// `verified` without the last chunk: that one is released to a streaming reader only with the
/// whole-file sha256 (`Verified::complete`), so the decoder can never finish on bytes that
/// only their chunk digest vouched for.
fn before_last_chunk(d: &Descriptor, verified: u64) -> u64 {
    let last_start = (d.chunks.len() as u64).saturating_sub(1) * d.chunk_size;
    verified.min(last_start)
}

/// Where the download of `dest` grows until it is complete and verified.
pub fn partial_path(dest: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", dest.display()))
}

/// Whether `dest` holds the whole artifact with the signed sha256. A file of the right size with
/// the wrong digest (rot, a bad disk, an edit) is deleted so that it is fetched again.
fn complete_and_verified(dest: &Path, d: &Descriptor) -> Result<bool> {
    if !dest.is_file() || std::fs::metadata(dest)?.len() != d.size {
        return Ok(false);
    }
    if sha256_file(dest)? == d.sha256 {
        return Ok(true);
    }
    tracing::warn!(
        "{} does not match its signed sha256; fetching it again",
        dest.display()
    );
    std::fs::remove_file(dest).with_context(|| format!("removing {}", dest.display()))?;
    Ok(false)
}

/// Length of the prefix of `file` made of whole chunks that match the descriptor; their
/// bytes go into `whole`.
fn verified_prefix(file: &mut File, d: &Descriptor, whole: &mut Sha256) -> Result<u64> {
    let len = file.metadata()?.len().min(d.size);
    let mut buf = vec![0u8; d.chunk_size as usize];
    let mut good = 0;
    file.seek(SeekFrom::Start(0))?;
    for expected in &d.chunks {
        let want = d.chunk_size.min(d.size - good);
        if good + want > len {
            break;
        }
        file.read_exact(&mut buf[..want as usize])?;
        if &sha256_hex(&buf[..want as usize]) != expected {
            break;
        }
        whole.update(&buf[..want as usize]);
        good += want;
    }
    Ok(good)
}

/// Streams the body into `file` from `offset`, checking each chunk against the descriptor
/// as it completes, the total length, and the transfer speed. `chunk_verified` hears the
/// length of the verified prefix after each good chunk; its error stops the download there.
/// Every byte written also goes into `whole` (meaningful only when this returns `Ok`).
#[allow(clippy::too_many_arguments)]
fn stream_chunks(
    mut resp: Response,
    file: &mut File,
    offset: u64,
    url: &str,
    d: &Descriptor,
    limits: &Limits,
    progress: Progress,
    chunk_verified: &mut dyn FnMut(u64) -> Result<()>,
    whole: &mut Sha256,
) -> Result<u64> {
    let mut pos = offset;
    let mut chunks = ChunkHasher::new(d.chunk_size);
    let mut index = (offset / d.chunk_size) as usize;
    let mut buf = vec![0u8; 256 << 10];
    let mut window_start = Instant::now();
    let mut window_bytes = 0u64;
    // A chunk whose digest does not match the descriptor: cut the file back to its start.
    let mut verify = |file: &mut File, index: &mut usize, actual: String| -> Result<()> {
        let expected = d.chunks.get(*index);
        if expected != Some(&actual) {
            file.set_len(*index as u64 * d.chunk_size)?;
            return Err(Error::ChecksumMismatch {
                what: format!("{url} chunk {index}"),
                expected: expected.cloned().unwrap_or_default(),
                actual,
            }
            .into());
        }
        *index += 1;
        let verified = *index as u64 * d.chunk_size;
        if let Err(e) = chunk_verified(verified) {
            // The file may hold bytes of the next chunk already: keep what is verified.
            file.set_len(verified.min(d.size))?;
            return Err(e);
        }
        Ok(())
    };
    loop {
        let n = match resp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                file.set_len(pos - pos % d.chunk_size)?;
                return Err(e).with_context(|| format!("downloading {url} at byte {pos}"));
            }
        };
        if pos + n as u64 > d.size {
            file.set_len(pos - pos % d.chunk_size)?;
            anyhow::bail!("{url} is longer than the {} bytes signed", d.size);
        }
        let data = &buf[..n];
        file.write_all(data)?;
        whole.update(data);
        pos += n as u64;
        chunks.update(data, |actual| verify(file, &mut index, actual))?;
        window_bytes += n as u64;
        progress(pos, d.size);
        if window_start.elapsed() >= limits.stall {
            let speed = window_bytes / window_start.elapsed().as_secs().max(1);
            if speed < limits.min_speed {
                file.set_len(pos - pos % d.chunk_size)?;
                anyhow::bail!(
                    "{url}: transfer stalled ({speed} B/s for {}s, minimum {} B/s)",
                    limits.stall.as_secs(),
                    limits.min_speed
                );
            }
            window_start = Instant::now();
            window_bytes = 0;
        }
    }
    if pos != d.size {
        file.set_len(pos - pos % d.chunk_size)?;
        anyhow::bail!(
            "{url} ended after {pos} bytes, {} signed; rerun to resume",
            d.size
        );
    }
    if let Some(last) = chunks.finish() {
        verify(file, &mut index, last)?;
    }
    Ok(pos - offset)
}
