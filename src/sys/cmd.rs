//! The one way to run external tools (`zfs`, `grub-editenv`, `e2fsck`, `mount`...): stdin
//! closed, output captured, and a failure becomes an error naming the argv and stderr's tail.

use std::ffi::{OsStr, OsString};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// How much of stderr an error message carries.
const STDERR_TAIL: usize = 800;

/// A command line being built.
#[derive(Debug, Clone)]
pub struct Cmd {
    argv: Vec<OsString>,
    /// Exit codes that count as success besides 0 (e2fsck's 1 = "errors corrected").
    ok_codes: Vec<i32>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            argv: vec![program.as_ref().to_owned()],
            ok_codes: vec![0],
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.argv.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.argv
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Also accept these exit codes as success.
    pub fn ok_codes(mut self, codes: &[i32]) -> Self {
        self.ok_codes.extend_from_slice(codes);
        self
    }

    /// The argv as one printable line, for messages.
    pub fn display(&self) -> String {
        self.argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A `std::process::Command` with stdin closed, for callers that stream stdout/stdin
    /// themselves (e.g. `zfs send | ...`). Errors must still be reported with [`Cmd::display`].
    /// Every tool run goes through here, and is logged at debug.
    pub fn to_command(&self) -> Command {
        tracing::debug!(cmd = %self.display(), "running");
        let mut c = Command::new(&self.argv[0]);
        c.args(&self.argv[1..]).stdin(Stdio::null());
        c
    }

    /// Runs to completion, capturing stdout and stderr, whatever the exit code.
    pub fn capture(&self) -> Result<Output> {
        self.to_command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("starting {}", self.display()))
    }

    /// Runs to completion; returns the output when the exit code is accepted.
    pub fn output(&self) -> Result<Output> {
        let out = self.capture()?;
        check_status(self, &out)?;
        Ok(out)
    }

    /// Runs and returns the exit code, whatever it is (callers that branch on it).
    pub fn code(&self) -> Result<i32> {
        let out = self.capture()?;
        out.status
            .code()
            .with_context(|| format!("{} was killed by a signal", self.display()))
    }

    /// Runs and returns stdout as text.
    pub fn stdout(&self) -> Result<String> {
        let out = self.output()?;
        String::from_utf8(out.stdout)
            .with_context(|| format!("{}: output is not UTF-8", self.display()))
    }

    pub fn run(&self) -> Result<()> {
        self.output().map(drop)
    }
}

/// Turns an unaccepted exit status into an error carrying argv and the tail of stderr.
pub fn check_status(cmd: &Cmd, out: &Output) -> Result<()> {
    match out.status.code() {
        Some(c) if cmd.ok_codes.contains(&c) => Ok(()),
        code => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail = tail_chars(stderr.trim(), STDERR_TAIL);
            let how = code.map_or("was killed by a signal".to_owned(), |c| {
                format!("exited with {c}")
            });
            let msg = match tail {
                "" => format!("{} {how}", cmd.display()),
                tail => format!("{} {how}: {tail}", cmd.display()),
            };
            if stderr.contains("No space left on device") || stderr.contains("out of space") {
                return Err(crate::error::Error::DiskFull(msg).into());
            }
            bail!(msg)
        }
    }
}

/// Whether `program` is an executable file on `PATH`.
pub fn installed(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The last `max` bytes of `s` or fewer, cut at a character boundary.
fn tail_chars(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_non_ascii_stderr_is_cut_at_a_character_boundary() {
        let err = Cmd::new("sh")
            .args([
                "-c",
                "{ for i in $(seq 600); do printf 'é'; done; printf a; } >&2; exit 1",
            ])
            .run()
            .unwrap_err();
        assert!(err.to_string().ends_with("éa"), "{err}");
    }

    #[test]
    fn a_tool_out_of_space_is_no_space() {
        let err = Cmd::new("sh")
            .args([
                "-c",
                "echo 'cannot receive: No space left on device' >&2; exit 1",
            ])
            .run()
            .unwrap_err();
        assert_eq!(crate::error::classify(&err).0, crate::error::Exit::NoSpace);
    }

    #[test]
    fn failure_names_argv_and_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo boom >&2; exit 3"])
            .run()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sh -c echo boom >&2; exit 3 exited with 3: boom"),
            "{err}"
        );
    }

    #[test]
    fn accepted_codes_and_stdout() {
        assert_eq!(
            Cmd::new("sh").args(["-c", "echo hi"]).stdout().unwrap(),
            "hi\n"
        );
        Cmd::new("sh")
            .args(["-c", "exit 1"])
            .ok_codes(&[1])
            .run()
            .unwrap();
        assert!(Cmd::new("/nonexistent/tool").run().is_err());
    }
}
