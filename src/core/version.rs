//! Image versions: dotted numerals such as `415.0`, ordered numerically part by part.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest version string accepted; anything longer is refused as absurd.
const MAX_LEN: usize = 64;
/// Most dotted parts accepted.
const MAX_PARTS: usize = 8;

/// Why a string is not a version. The message names the offending input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid version {input:?}: {reason} (expected dotted numbers such as 415.0)")]
pub struct VersionError {
    input: String,
    reason: &'static str,
}

/// An image version. Equal versions have equal text: `1.0` and `1.00` are both refused
/// ambiguity-wise by forbidding leading zeros, so text and order always agree.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Version {
    text: String,
    parts: Vec<u64>,
}

impl Version {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// File name of this version's image: `415.0.img`.
    pub fn image_file_name(&self) -> String {
        format!("{}.img", self.text)
    }

    /// GRUB menu entry id: `upgradectl-415.0`.
    pub fn grub_id(&self) -> String {
        format!("upgradectl-{}", self.text)
    }

    /// Parses an image file name such as `415.0.img`; other names give `None`.
    pub fn from_image_file_name(name: &str) -> Option<Version> {
        name.strip_suffix(".img")?.parse().ok()
    }
}

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| VersionError {
            input: s.chars().take(MAX_LEN + 16).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(fail("empty"));
        }
        if s.len() > MAX_LEN {
            return Err(fail("too long"));
        }
        if s.contains(['/', '\\']) {
            return Err(fail("path separators are not allowed"));
        }
        let mut parts = Vec::new();
        for part in s.split('.') {
            if part.is_empty() {
                return Err(fail("empty part"));
            }
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(fail("only digits and dots are allowed"));
            }
            if part.len() > 1 && part.starts_with('0') {
                return Err(fail("leading zero"));
            }
            let n = part.parse::<u64>().map_err(|_| fail("number too large"))?;
            parts.push(n);
        }
        if parts.len() > MAX_PARTS {
            return Err(fail("too many parts"));
        }
        Ok(Version {
            text: s.to_owned(),
            parts,
        })
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        // Missing trailing parts count as zero, but `1` and `1.0` still differ (by length) so
        // that Ord agrees with Eq.
        let n = self.parts.len().max(other.parts.len());
        (0..n)
            .map(|i| {
                let a = self.parts.get(i).copied().unwrap_or(0);
                let b = other.parts.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|o| o.is_ne())
            .unwrap_or_else(|| self.parts.len().cmp(&other.parts.len()))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({})", self.text)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn orders_numerically() {
        assert!(v("9.0") < v("10.0"));
        assert!(v("10.0") < v("415.1"));
        assert!(v("415.0") < v("415.1"));
        assert!(v("2") < v("2.0"));
        assert!(v("2.0") < v("2.0.1"));
        let mut list = [v("415.1"), v("9.0"), v("10.0"), v("10.0.0")];
        list.sort();
        let texts: Vec<_> = list.iter().map(|v| v.as_str()).collect();
        assert_eq!(texts, ["9.0", "10.0", "10.0.0", "415.1"]);
    }

    #[test]
    fn refuses_bad_input() {
        for bad in [
            "",
            ".",
            "1.",
            ".1",
            "1..2",
            "../1",
            "1/2",
            "a.b",
            "1.0-rc1",
            " 1.0",
            "01.0",
            "99999999999999999999999.0",
            "1.2.3.4.5.6.7.8.9",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} was accepted");
        }
        let err = "../1".parse::<Version>().unwrap_err().to_string();
        assert!(err.contains("path separators"), "{err}");
        let long = "1.".repeat(40) + "1";
        let err = long.parse::<Version>().unwrap_err().to_string();
        assert!(err.contains("too long"), "{err}");
    }

    #[test]
    fn image_names_round_trip() {
        assert_eq!(v("415.0").image_file_name(), "415.0.img");
        assert_eq!(Version::from_image_file_name("415.0.img"), Some(v("415.0")));
        assert_eq!(Version::from_image_file_name(".415.0.img.partial"), None);
        assert_eq!(Version::from_image_file_name("lost+found"), None);
    }
}
