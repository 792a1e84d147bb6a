//! The binary's logs on stderr: in the journal (stderr is the stream `JOURNAL_STREAM` names)
//! each line carries its sd-daemon priority prefix and no timestamp; elsewhere the human
//! format. `-q` hides info lines, `-qq` warnings too, `-v` shows debug lines; none of them
//! touches stdout's JSON, the final error message or the exit code.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use common::{HostRoot, CONFIG};

/// A server is configured but the box has no identity key: each verb that spools a report logs
/// "no identity key" at info, and nothing goes over the network.
fn config() -> String {
    format!("box_id = \"serial-1\"\nserver = \"http://127.0.0.1:9\"\n{CONFIG}")
}

/// The box booted into 2.0 on trial, before `confirm --no-reboot`, which runs the health check
/// (a tool run, logged at debug), spools a report, then logs at info that it cannot send it.
fn on_trial() -> HostRoot {
    let h = HostRoot::with_prepared("2.0");
    h.set_config(&config());
    h.run(&["upgrade", "--no-reboot"]).expect(0);
    h.grub_reboot();
    h
}

/// Runs `cmd` with stderr a file; `journal` says whether `JOURNAL_STREAM` names that file
/// (as systemd does for a service whose stderr is the journal) or another one (as when a
/// service's child had its stderr redirected). Returns the exit code and stderr.
fn run_with_stderr_file(h: &HostRoot, mut cmd: Command, journal: bool) -> (i32, String) {
    let path = h.root().join("stderr.log");
    let other = h.root().join("other.log");
    let file = std::fs::File::create(&path).unwrap();
    std::fs::File::create(&other).unwrap();
    let named = std::fs::metadata(if journal { &path } else { &other }).unwrap();
    let status = cmd
        .env("JOURNAL_STREAM", format!("{}:{}", named.dev(), named.ino()))
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .status()
        .unwrap();
    (
        status.code().unwrap(),
        std::fs::read_to_string(path).unwrap(),
    )
}

/// Something that looks like a time of day or a date, as the default format prints.
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.windows(8).any(|w| {
        let d = |i: usize| w[i].is_ascii_digit();
        (d(0) && d(1) && w[2] == b':' && d(3) && d(4) && w[5] == b':' && d(6) && d(7))
            || (d(0) && d(1) && d(2) && d(3) && w[4] == b'-' && d(5) && d(6) && w[7] == b'-')
    })
}

#[test]
fn in_the_journal_every_line_has_its_priority_and_no_timestamp() {
    let h = on_trial();
    let (code, err) = run_with_stderr_file(&h, h.command(&["-v", "confirm", "--no-reboot"]), true);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| l.starts_with(p)),
            "no priority prefix: {l:?}\n{err}"
        );
        assert!(!has_timestamp(l), "timestamp: {l:?}");
        assert!(
            !l.contains("INFO") && !l.contains("DEBUG"),
            "level word: {l:?}"
        );
        assert!(!l.contains('\x1b'), "colour codes: {l:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("no identity key")),
        "{err}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<7>") && l.contains("running")),
        "{err}"
    );

    // The final error message is an error to journald too; the exit code is kept.
    h.set_config("no_such_key = 1\n");
    let (code, err) = run_with_stderr_file(&h, h.command(&["status"]), true);
    assert_eq!(code, 2, "{err}");
    let last = err.lines().last().unwrap();
    assert!(last.starts_with("<3>error: "), "{err}");
}

#[test]
fn journal_stream_naming_another_file_is_not_the_journal() {
    let h = on_trial();
    let (code, err) = run_with_stderr_file(&h, h.command(&["-v", "confirm", "--no-reboot"]), false);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("<6>") && !err.contains("<7>"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("INFO") && l.contains("no identity key")),
        "{err}"
    );
    assert!(err.lines().any(|l| l.contains("DEBUG")), "{err}");
    assert!(!err.lines().any(has_timestamp), "{err}");
}

#[test]
fn quiet_hides_info_and_verbose_shows_debug() {
    // Default: info, no debug.
    let h = on_trial();
    let r = h.run(&["confirm", "--no-reboot"]).expect(0);
    assert!(r.stderr.contains("no identity key"), "{}", r.stderr);
    assert!(!r.stderr.contains("DEBUG"), "{}", r.stderr);

    // -q: no info line, and stdout's JSON report is whole.
    let h = on_trial();
    let r = common::run_command(h.command(&["-q", "confirm", "--no-reboot"])).expect(0);
    assert!(!r.stderr.contains("no identity key"), "{}", r.stderr);
    assert_eq!(r.last()["outcome"], "confirmed", "{}", r.stdout);

    // -v: debug lines (every tool run).
    let h = on_trial();
    let r = common::run_command(h.command(&["-v", "confirm", "--no-reboot"])).expect(0);
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains("DEBUG") && l.contains("running")),
        "{}",
        r.stderr
    );

    // A warning: shown under -q, hidden under -qq; the error and its exit code under -qq.
    let reports = h.host("var/lib/upgradectl/reports");
    std::fs::write(reports.join("garbage.json"), "not a report").unwrap();
    let r = common::run_command(h.command(&["-q", "status"])).expect(0);
    assert!(
        r.stderr.contains("unreadable spooled report"),
        "{}",
        r.stderr
    );
    let r = common::run_command(h.command(&["-qq", "status"])).expect(0);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    h.set_config("no_such_key = 1\n");
    let r = common::run_command(h.command(&["-qq", "status"])).expect(2);
    assert_eq!(r.error()["exit"], 2);
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
}
