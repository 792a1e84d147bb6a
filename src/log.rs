//! Logging on stderr: the level from `-v`/`-q` (or `UPGRADECTL_LOG`/`RUST_LOG`), and the
//! journal's format when stderr is the journal (sd-daemon level prefixes, no timestamps).

use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

/// Sets up the global subscriber: warnings and errors always, info unless `-q`, debug with
/// `-v`, trace with `-vv`; `-qq` leaves errors only. A filter in `UPGRADECTL_LOG` (or, if that
/// is unset, `RUST_LOG`) overrides the flags.
pub fn init(verbose: u8, quiet: u8) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UPGRADECTL_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| level(verbose, quiet).into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No timestamps anywhere: journald adds its own, and a terminal needs none.
        .without_time();
    if stderr_is_journal() {
        // The level goes in the prefix, which journald turns into the priority; no colours
        // (the journal would keep the escape codes).
        builder
            .with_ansi(false)
            .event_format(Journal(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false),
            ))
            .init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// The filter for `-v` and `-q` counted on the command line (`-v -q` cancel out).
pub fn level(verbose: u8, quiet: u8) -> &'static str {
    match i16::from(verbose) - i16::from(quiet) {
        ..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    }
}

/// `<3>` and so on (sd-daemon(3)) when stderr is the journal, empty otherwise: for lines
/// written on stderr outside `tracing`, such as the final error message.
pub fn prefix(level: Level) -> String {
    if stderr_is_journal() {
        format!("<{}>", priority(level))
    } else {
        String::new()
    }
}

/// The syslog priority journald files a line under.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether stderr is connected to the journal: systemd sets `JOURNAL_STREAM` to the device and
/// inode numbers of the stream it gives a service (systemd.exec(5)); they must be stderr's own,
/// since stderr may have been redirected elsewhere by a child of the service.
pub fn stderr_is_journal() -> bool {
    static IS: OnceLock<bool> = OnceLock::new();
    *IS.get_or_init(|| {
        let Some(expected) = std::env::var("JOURNAL_STREAM")
            .ok()
            .and_then(|v| parse_journal_stream(&v))
        else {
            return false;
        };
        stderr_dev_ino().is_some_and(|actual| actual == expected)
    })
}

/// `DEV:INODE`, both decimal.
fn parse_journal_stream(v: &str) -> Option<(u64, u64)> {
    let (dev, ino) = v.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

fn stderr_dev_ino() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let m = std::fs::File::from(fd).metadata().ok()?;
    Some((m.dev(), m.ino()))
}

/// The default line with the level as an sd-daemon prefix in front instead of as a word.
struct Journal<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journal<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer.by_ref(), event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_pick_the_level() {
        assert_eq!(level(0, 0), "info");
        assert_eq!(level(1, 0), "debug");
        assert_eq!(level(2, 0), "trace");
        assert_eq!(level(9, 0), "trace");
        assert_eq!(level(0, 1), "warn");
        assert_eq!(level(0, 2), "error");
        assert_eq!(level(0, 9), "error");
        assert_eq!(level(1, 1), "info");
    }

    #[test]
    fn journal_stream_is_dev_colon_inode() {
        assert_eq!(parse_journal_stream("8:123456"), Some((8, 123456)));
        for bad in ["", "8", "8:", ":1", "a:1", "8:1:2", "-1:2"] {
            assert_eq!(parse_journal_stream(bad), None, "{bad}");
        }
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        let p: Vec<_> = [
            Level::ERROR,
            Level::WARN,
            Level::INFO,
            Level::DEBUG,
            Level::TRACE,
        ]
        .into_iter()
        .map(priority)
        .collect();
        assert_eq!(p, [3, 4, 6, 7, 7]);
    }
}
