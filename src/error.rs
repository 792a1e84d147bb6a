//! Errors a caller branches on, and the documented exit codes they map to.

use std::time::Duration;

/// Exit codes: stable, documented in the README, relied on by the check-in agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The operation was done.
    Done = 0,
    /// It failed (I/O, a tool failed, health checks failed...).
    Failed = 1,
    /// The input was refused: bad version, bad config, bad signature, illegal state for the verb.
    Refused = 2,
    /// Nothing to do (already up to date, nothing to confirm, nothing to clean up).
    NothingToDo = 3,
    /// The server is building what we asked for: come back later.
    ComeBackLater = 4,
    /// Another upgradectl holds the lock.
    Locked = 5,
    /// Not enough free space, even after cleaning up.
    NoSpace = 6,
    /// Not now: outside the maintenance window, the box is busy, or the fleet's reboot lock is
    /// held by other boxes. Nothing was armed; the timer tries again.
    NotNow = 7,
}

/// A configuration file that cannot be used. Always refused input.
#[derive(Debug, thiserror::Error)]
#[error("bad configuration in {}: {message}", file.display())]
pub struct ConfigError {
    pub file: std::path::PathBuf,
    pub message: String,
}

/// An error with a meaning beyond "failed".
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NothingToDo(String),
    #[error("the server is preparing {what}; come back in {}s", retry_after.as_secs())]
    ComeBackLater { what: String, retry_after: Duration },
    #[error("another upgradectl is running (lock {lock} held{})", holder.as_deref().map(|h| format!(" by {h}")).unwrap_or_default())]
    Locked {
        lock: String,
        holder: Option<String>,
    },
    #[error("not enough space on {path}: need {need} bytes, {free} free even after cleaning up")]
    NoSpace { path: String, need: u64, free: u64 },
    /// A tool or a write ran out of space (`No space left on device`).
    #[error("{0}")]
    DiskFull(String),
    #[error("{what}: expected sha256 {expected}, got {actual}")]
    ChecksumMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    SignatureInvalid(String),
    /// Not switching now (window, busy, reboot lock); nothing was changed.
    #[error("{0}")]
    NotNow(String),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Refused(_) | Error::SignatureInvalid(_) => Exit::Refused,
            Error::NothingToDo(_) => Exit::NothingToDo,
            Error::ComeBackLater { .. } => Exit::ComeBackLater,
            Error::Locked { .. } => Exit::Locked,
            Error::NoSpace { .. } | Error::DiskFull(_) => Exit::NoSpace,
            Error::ChecksumMismatch { .. } => Exit::Failed,
            Error::NotNow(_) => Exit::NotNow,
        }
    }

    /// A short stable name for JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Refused(_) => "refused",
            Error::NothingToDo(_) => "nothing-to-do",
            Error::ComeBackLater { .. } => "come-back-later",
            Error::Locked { .. } => "locked",
            Error::NoSpace { .. } | Error::DiskFull(_) => "no-space",
            Error::ChecksumMismatch { .. } => "checksum-mismatch",
            Error::SignatureInvalid(_) => "signature-invalid",
            Error::NotNow(_) => "not-now",
        }
    }
}

/// Shorthand for refusing input.
pub fn refused(msg: impl Into<String>) -> anyhow::Error {
    Error::Refused(msg.into()).into()
}

/// The exit code and kind for any error chain: the first typed error in the chain decides;
/// a bad version or config anywhere in the chain is refused input; a full disk anywhere
/// (ENOSPC, EDQUOT) is "no space", whichever tool or write hit it.
pub fn classify(err: &anyhow::Error) -> (Exit, &'static str) {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<Error>() {
            return (e.exit(), e.kind());
        }
        if cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|e| e == nix::libc::ENOSPC || e == nix::libc::EDQUOT)
        {
            return (Exit::NoSpace, "no-space");
        }
        if cause
            .downcast_ref::<crate::core::version::VersionError>()
            .is_some()
            || cause.downcast_ref::<ConfigError>().is_some()
        {
            return (Exit::Refused, "refused");
        }
    }
    (Exit::Failed, "failed")
}
