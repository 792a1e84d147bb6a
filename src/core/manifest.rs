//! What the box learns from the repository, as documents it validates: the manifest of a
//! channel (its releases as the box is offered them), the descriptor of each built artifact,
//! and the names of artifacts. Their signatures are TUF's (`appliance::trust`).

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::core::version::Version;
use crate::error::refused;

/// The release channels a box can follow.
pub const CHANNELS: [&str; 4] = ["stable", "candidate", "beta", "edge"];

/// Smallest chunk a descriptor may verify in.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;
/// Largest chunk a descriptor may verify in (the box holds one chunk in memory).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Most chunks a descriptor may list: 256 GiB in the server's 4 MiB chunks.
pub const MAX_CHUNKS: u64 = 1 << 16;
/// Largest artifact or image accepted: 1 TiB.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Most releases a manifest may list.
pub const MAX_RELEASES: usize = 1024;
/// How far in the future a document's `issued` may be (clock skew between server and box).
pub const MAX_CLOCK_SKEW: u64 = 300;
/// Longest artifact name in a descriptor.
const MAX_NAME_LEN: usize = 160;

/// Largest manifest accepted: `MAX_RELEASES` releases of at most 512 bytes of JSON each (a
/// 64-byte version, a 64-hex digest and the field names) and 16 KiB for the rest.
pub const MAX_MANIFEST_BYTES: u64 = MAX_RELEASES as u64 * 512 + (16 << 10);

/// Largest descriptor accepted: `MAX_CHUNKS` digests of 67 bytes of JSON each (64 hex, quotes
/// and a comma) plus 16 KiB of other fields (about 4.2 MiB).
pub const MAX_DESCRIPTOR_BYTES: u64 = MAX_CHUNKS * 67 + (16 << 10);

/// Size and sha256 of a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub size: u64,
    pub sha256: String,
}

/// One release on a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub version: Version,
    /// Percentage of boxes (by stable bucket) that may take it.
    pub rollout: u8,
    pub paused: bool,
    /// The exported ext4 image file, checked end to end by the box.
    pub image: Blob,
}

/// A channel's releases as a box is offered them, built from the TUF repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub channel: String,
    /// Unix seconds.
    pub issued: u64,
    pub expires: u64,
    pub releases: Vec<Release>,
}

/// How an artifact's stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// xz in independent blocks (multi-threaded decoding).
    Xz,
    /// One zstd frame compressed against the whole block device of the base version's zvol
    /// snapshot as a prefix (`sys::refcodec`): a diff only. Its decoder allocates
    /// 2^`window_log` bytes at most.
    ZstdRef,
}

/// The descriptor of a built artifact (a full stream or an incremental diff), written when
/// the server builds it and listed as a target of the online artifacts role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    pub name: String,
    pub from: Option<Version>,
    pub to: Version,
    pub encoding: Encoding,
    /// `zstd-ref`: log2 of the window the largest frame states, which is the most its decoder
    /// allocates in memory (a box whose memory is below it decodes such frames on disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_log: Option<u32>,
    /// `zstd-ref`: the decoded length of the largest frame, at most 2^`window_log`: what a box
    /// decoding it on disk sets aside (servers before it did not state it: 2^`window_log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_bytes: Option<u64>,
    /// The compressed file as served.
    pub size: u64,
    pub sha256: String,
    /// sha256 of each `chunk_size` piece, so every piece is verified before it is used.
    pub chunk_size: u64,
    pub chunks: Vec<String>,
}

/// Whether `s` is a sha256 digest as documents carry it: 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Blob {
    /// Refuses a size of 0 or above `MAX_BLOB_SIZE`, or a digest that is not 64 lowercase hex.
    pub fn validate(&self, what: &str) -> Result<()> {
        if !(1..=MAX_BLOB_SIZE).contains(&self.size) {
            return Err(refused(format!(
                "{what}: size {} is not within 1..={MAX_BLOB_SIZE}",
                self.size
            )));
        }
        check_digest(&self.sha256, what)
    }
}

fn check_digest(digest: &str, what: &str) -> Result<()> {
    if !is_sha256_hex(digest) {
        return Err(refused(format!(
            "{what}: sha256 {:?} is not 64 lowercase hex digits",
            digest.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

impl Release {
    /// Refuses a rollout above 100 or an invalid image blob.
    pub fn validate(&self) -> Result<()> {
        let what = format!("release {}", self.version);
        if self.rollout > 100 {
            return Err(refused(format!(
                "{what}: rollout {} is above 100",
                self.rollout
            )));
        }
        self.image.validate(&format!("{what} image"))
    }
}

impl Manifest {
    /// Refuses a manifest that cannot be true: unknown channel, issued in the future (beyond
    /// `MAX_CLOCK_SKEW` of `now`), expiring before it was issued, too many releases, the same
    /// version twice, or an invalid release. Called right after the signature is verified.
    pub fn validate(&self, now: u64) -> Result<()> {
        if !CHANNELS.contains(&self.channel.as_str()) {
            return Err(refused(format!(
                "manifest: unknown channel {:?}",
                self.channel.chars().take(64).collect::<String>()
            )));
        }
        check_times(self.issued, self.expires, now)?;
        if self.releases.len() > MAX_RELEASES {
            return Err(refused(format!(
                "manifest: {} releases, at most {MAX_RELEASES} accepted",
                self.releases.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.releases {
            if !seen.insert(&r.version) {
                return Err(refused(format!(
                    "manifest: version {} listed twice",
                    r.version
                )));
            }
            r.validate()?;
        }
        Ok(())
    }
}

fn check_times(issued: u64, expires: u64, now: u64) -> Result<()> {
    if issued > now.saturating_add(MAX_CLOCK_SKEW) {
        return Err(refused(format!(
            "manifest: issued {}s in the future (clock skew above {MAX_CLOCK_SKEW}s)",
            issued - now
        )));
    }
    if expires <= issued {
        return Err(refused(format!(
            "manifest: expires ({expires}) is not after issued ({issued})"
        )));
    }
    Ok(())
}

impl Descriptor {
    /// Refuses a descriptor that cannot be true: a name that is not the artifact name of
    /// `from`/`to`, a size outside 1..=`MAX_BLOB_SIZE`, a chunk size outside
    /// `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`, a chunk count other than ceil(size/chunk_size), or a
    /// digest that is not 64 lowercase hex. Called right after the signature is verified.
    pub fn validate(&self) -> Result<()> {
        let shown: String = self.name.chars().take(MAX_NAME_LEN).collect();
        let what = format!("descriptor {shown:?}");
        if self.name.len() > MAX_NAME_LEN
            || parse_artifact_name(&self.name) != Some((self.from.clone(), self.to.clone()))
        {
            return Err(refused(format!(
                "{what}: the name does not match from {:?} to {}",
                self.from, self.to
            )));
        }
        Blob {
            size: self.size,
            sha256: self.sha256.clone(),
        }
        .validate(&what)?;
        match (self.encoding, self.window_log, self.frame_bytes, &self.from) {
            (Encoding::Xz, None, None, _) => {}
            (Encoding::ZstdRef, Some(w), n, Some(_))
                if (10..=31).contains(&w) && n.is_none_or(|n| n <= 1 << w) => {}
            (encoding, window_log, frame_bytes, from) => {
                return Err(refused(format!(
                    "{what}: encoding {encoding:?} with window_log {window_log:?}, frame_bytes \
                     {frame_bytes:?} and from {from:?} (zstd-ref is a diff's, with a window_log \
                     within 10..=31 and frame_bytes at most 2^window_log; xz has neither)"
                )))
            }
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(refused(format!(
                "{what}: chunk_size {} is not within {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        let expected = self.size.div_ceil(self.chunk_size);
        if self.chunks.len() as u64 != expected || expected > MAX_CHUNKS {
            return Err(refused(format!(
                "{what}: {} chunk digests for {} bytes in chunks of {} (expected {expected}, \
                 at most {MAX_CHUNKS})",
                self.chunks.len(),
                self.size,
                self.chunk_size
            )));
        }
        for (i, c) in self.chunks.iter().enumerate() {
            check_digest(c, &format!("{what} chunk {i}"))?;
        }
        Ok(())
    }
}

/// The descriptor of artifact `name` from `bytes` that a TUF target's signed length and sha256
/// already verified (the online artifacts role listed them): parsed, validated, and refused
/// when it describes another artifact (its name also fixes `from` and `to`).
pub fn descriptor_of_verified_target(bytes: &[u8], name: &str) -> Result<Descriptor> {
    let d: Descriptor = serde_json::from_slice(bytes)
        .map_err(|e| refused(format!("the descriptor of {name}: {e}")))?;
    checked_descriptor(d, name)
}

fn checked_descriptor(d: Descriptor, name: &str) -> Result<Descriptor> {
    d.validate()?;
    if d.name != name {
        return Err(refused(format!(
            "the descriptor of {name} describes {:?}",
            d.name
        )));
    }
    Ok(d)
}

/// Artifact name: `full-2.0` or `1.0-to-2.0` (its descriptor says how it is encoded).
pub fn artifact_name(from: Option<&Version>, to: &Version) -> String {
    match from {
        Some(f) => format!("{f}-to-{to}"),
        None => format!("full-{to}"),
    }
}

/// Parses an artifact name back; `None` for anything else (never a path).
pub fn parse_artifact_name(stem: &str) -> Option<(Option<Version>, Version)> {
    if let Some(to) = stem.strip_prefix("full-") {
        return Some((None, to.parse().ok()?));
    }
    let (from, to) = stem.split_once("-to-")?;
    let (from, to): (Version, Version) = (from.parse().ok()?, to.parse().ok()?);
    (from < to).then_some((Some(from), to))
}

#[cfg(test)]
pub(crate) mod testdata {
    //! Documents for the tests of this module and of `core::plan`.
    use super::*;

    pub fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    pub fn rel(ver: &str, rollout: u8, paused: bool) -> Release {
        Release {
            version: v(ver),
            rollout,
            paused,
            image: Blob {
                size: 1,
                sha256: "00".into(),
            },
        }
    }

    pub fn manifest() -> Manifest {
        Manifest {
            channel: "stable".into(),
            issued: 100,
            expires: 1000,
            releases: vec![
                rel("1.0", 100, false),
                rel("2.0", 100, false),
                rel("3.0", 10, false),
                rel("4.0", 100, true),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdata::*;
    use super::*;
    use crate::error::Error;

    #[test]
    fn artifact_names() {
        assert_eq!(artifact_name(Some(&v("1.0")), &v("2.0")), "1.0-to-2.0");
        assert_eq!(
            parse_artifact_name("1.0-to-2.0"),
            Some((Some(v("1.0")), v("2.0")))
        );
        assert_eq!(parse_artifact_name("full-2.0"), Some((None, v("2.0"))));
        for bad in [
            "../x",
            "2.0-to-1.0",
            "full-",
            "1.0-to-2.0.xz",
            "1.0-to-2.0.descriptor",
            "full-2.0.no-diff",
            "a-to-b",
        ] {
            assert_eq!(parse_artifact_name(bad), None, "{bad}");
        }
    }

    fn descriptor() -> Descriptor {
        let size = 9 << 20;
        Descriptor {
            name: "1.0-to-2.0".into(),
            from: Some(v("1.0")),
            to: v("2.0"),
            encoding: Encoding::Xz,
            window_log: None,
            frame_bytes: None,
            size,
            sha256: "a".repeat(64),
            chunk_size: 4 << 20,
            chunks: vec!["b".repeat(64); 3],
        }
    }

    /// A word the refusal must contain, and the edit that makes a document invalid.
    type Edit<T> = (&'static str, fn(&mut T));

    fn refusal(r: Result<()>) -> String {
        let err = r.expect_err("accepted");
        assert!(
            matches!(err.downcast_ref::<Error>(), Some(Error::Refused(_))),
            "{err:#}"
        );
        format!("{err:#}")
    }

    #[test]
    fn descriptor_validation_refuses_every_impossible_field() {
        descriptor().validate().unwrap();
        let mut zstd_ref = descriptor();
        zstd_ref.encoding = Encoding::ZstdRef;
        zstd_ref.window_log = Some(28);
        zstd_ref.validate().unwrap();
        zstd_ref.frame_bytes = Some(1 << 28);
        zstd_ref.validate().unwrap();
        let cases: [Edit<Descriptor>; 18] = [
            ("window_log", |d| d.window_log = Some(28)),
            ("window_log", |d| d.encoding = Encoding::ZstdRef),
            ("window_log", |d| {
                d.encoding = Encoding::ZstdRef;
                d.window_log = Some(32)
            }),
            ("frame_bytes", |d| d.frame_bytes = Some(1)),
            ("frame_bytes", |d| {
                (d.encoding, d.window_log) = (Encoding::ZstdRef, Some(20));
                d.frame_bytes = Some((1 << 20) + 1)
            }),
            ("zstd-ref is a diff's", |d| {
                (d.encoding, d.window_log) = (Encoding::ZstdRef, Some(20));
                (d.name, d.from) = ("full-2.0".into(), None)
            }),
            ("chunk_size", |d| d.chunk_size = 0),
            ("chunk_size", |d| d.chunk_size = 1 << 62),
            ("chunk_size", |d| d.chunk_size = MIN_CHUNK_SIZE - 1),
            ("chunk digests", |d| d.chunks.pop().map(drop).unwrap_or(())),
            ("chunk digests", |d| d.chunks.push("c".repeat(64))),
            ("size", |d| d.size = 0),
            ("size", |d| d.size = MAX_BLOB_SIZE + 1),
            ("sha256", |d| d.sha256 = "A".repeat(64)),
            ("sha256", |d| d.sha256 = "a".repeat(63)),
            ("chunk 1", |d| d.chunks[1] = "xyz".into()),
            ("name", |d| d.name = "full-2.0".into()),
            ("name", |d| d.to = v("0.5")),
        ];
        for (word, edit) in cases {
            let mut d = descriptor();
            edit(&mut d);
            let msg = refusal(d.validate());
            assert!(msg.contains(word), "{word}: {msg}");
        }
    }

    #[test]
    fn manifest_validation_refuses_every_impossible_field() {
        let mut m = manifest();
        for r in &mut m.releases {
            r.image.sha256 = "0".repeat(64);
        }
        m.validate(500).unwrap();
        let cases: [Edit<Manifest>; 7] = [
            ("future", |m| m.issued = 500 + MAX_CLOCK_SKEW + 1),
            ("not after issued", |m| m.expires = m.issued),
            ("channel", |m| m.channel = "nightly".into()),
            ("rollout", |m| m.releases[0].rollout = 101),
            ("size", |m| m.releases[0].image.size = 0),
            ("sha256", |m| m.releases[0].image.sha256 = "00".into()),
            ("twice", |m| m.releases[1].version = v("1.0")),
        ];
        for (word, edit) in cases {
            let mut bad = m.clone();
            edit(&mut bad);
            let msg = refusal(bad.validate(500));
            assert!(msg.contains(word), "{word}: {msg}");
        }
    }

    #[test]
    fn body_caps_hold_the_largest_valid_documents() {
        let mut d = descriptor();
        d.chunk_size = MIN_CHUNK_SIZE;
        d.size = MAX_CHUNKS * MIN_CHUNK_SIZE;
        d.chunks = vec!["f".repeat(64); MAX_CHUNKS as usize];
        d.validate().unwrap();
        let json = serde_json::to_vec(&d).unwrap();
        assert!(json.len() as u64 <= MAX_DESCRIPTOR_BYTES, "{}", json.len());
        let long = v(&["9999999999"; 5].join("."));
        let mut m = manifest();
        m.releases = (0..MAX_RELEASES)
            .map(|i| Release {
                version: format!("{long}.{i}").parse().unwrap(),
                rollout: 100,
                paused: false,
                image: Blob {
                    size: MAX_BLOB_SIZE,
                    sha256: "f".repeat(64),
                },
            })
            .collect();
        m.validate(500).unwrap();
        let json = serde_json::to_vec(&m).unwrap();
        assert!(json.len() as u64 <= MAX_MANIFEST_BYTES, "{}", json.len());
    }
}
