//! One upgradectl at a time on a box: an exclusive flock on the host partition.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};

use crate::error::Error;

/// Held for the life of an operation; released on drop (and by the kernel if we die).
pub struct Lock {
    _flock: Flock<File>,
}

/// How long `--wait` waits for the lock at most.
const MAX_WAIT: Duration = Duration::from_secs(3600);

impl Lock {
    /// Takes the lock; fails with `Locked` at once, or waits when `wait` is set.
    pub fn acquire(path: &Path, wait: bool) -> Result<Lock> {
        std::fs::create_dir_all(path.parent().expect("lock has a parent"))
            .with_context(|| format!("creating {}", path.display()))?;
        let start = Instant::now();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut flock) => {
                    // Record the holder for the next caller's message.
                    flock.set_len(0)?;
                    flock.rewind()?;
                    write!(flock, "pid {}", std::process::id())?;
                    return Ok(Lock { _flock: flock });
                }
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    file = f;
                    if !wait || start.elapsed() > MAX_WAIT {
                        let mut holder = String::new();
                        let _ = file.read_to_string(&mut holder);
                        return Err(Error::Locked {
                            lock: path.display().to_string(),
                            holder: Some(holder).filter(|h| !h.is_empty()),
                        }
                        .into());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err((_, e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_caller_is_refused_until_release() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let first = Lock::acquire(&p, false).unwrap();
        let err = Lock::acquire(&p, false).err().unwrap();
        assert!(matches!(
            err.downcast_ref::<Error>(),
            Some(Error::Locked { .. })
        ));
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        Lock::acquire(&p, false).unwrap();
    }
}
