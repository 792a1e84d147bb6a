//! The image server under failure and abuse: polling during builds, diffs nobody should build,
//! failed builds, slow source checks, idle connections and internal errors. The real server and
//! real HTTP over 127.0.0.1 (see `common/server.rs`).

#[path = "common/server.rs"]
mod server;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use server::{start_with, v, wait_for, Fixture, Setup};
use upgradectl::server::{build, Tuning};

/// Polls `name`'s descriptor from `clients` threads at once until each got it.
fn poll_from_many(f: &Fixture, name: &str, clients: usize) {
    std::thread::scope(|scope| {
        for _ in 0..clients {
            scope.spawn(|| f.descriptor(name));
        }
    });
}

/// Asks for each of `names` with `ask`, each from a thread of its own, and runs `during`
/// meanwhile; returns when all are done.
fn ask_at_once(f: &Fixture, names: &[&str], ask: fn(&Fixture, &str), during: impl FnOnce()) {
    std::thread::scope(|scope| {
        for name in names {
            scope.spawn(move || ask(f, name));
        }
        during();
    });
}

/// A server with releases 1.0 and 2.0 whose sends take `delay` and `has` takes `has_delay`.
fn slow_source(delay: Duration, has_delay: Duration) -> Fixture {
    start_with(Setup {
        delay,
        has_delay,
        repo: true,
        ..Setup::default()
    })
}

/// A server with releases 1.0, 2.0 and 3.0 (small streams) and a diff window of `window`.
fn three_releases(window: usize) -> Fixture {
    start_with(Setup {
        versions: vec!["1.0", "2.0", "3.0"],
        full_size: 2 << 20,
        diff_size: 1 << 20,
        tuning: Tuning {
            diff_window: window,
            retry_after: 1,
            zstd_ref_level: 3,
            ..Tuning::default()
        },
        ..Setup::default()
    })
}

#[test]
fn polling_during_a_build_never_starts_a_second_build() {
    // A slow `has` keeps requests between "is it built?" and "start a build" while the build
    // finishes: the window in which a second build used to start.
    let f = slow_source(Duration::from_millis(400), Duration::from_millis(300));
    poll_from_many(&f, "1.0-to-2.0", 8);
    let first = std::fs::read(f.root.join("store/artifacts/1.0-to-2.0.descriptor")).unwrap();
    // Requests that saw "not built" have answered; a build they started would be running now.
    wait_for("builds to finish", Duration::from_secs(30), || {
        f.server.builds_in_progress() == 0
    });
    assert_eq!(f.server.builds_started(), 1, "one build per artifact, ever");
    let now = std::fs::read(f.root.join("store/artifacts/1.0-to-2.0.descriptor")).unwrap();
    assert_eq!(first, now);
}

#[test]
fn a_build_never_replaces_a_complete_artifact() {
    let f = start_with(Setup::default());
    let store = &f.server.store;
    let build_full = || {
        build::build(
            store,
            f.source.as_ref(),
            None,
            &v("1.0"),
            f.server.tuning.zstd_ref(),
        )
    };
    build_full().unwrap();
    let inode = |p| std::fs::metadata(p).unwrap().ino();
    let (artifact, descriptor) = (
        store.artifact_path("full-1.0"),
        store.descriptor_path("full-1.0"),
    );
    let before = (inode(&artifact), inode(&descriptor));
    let err = build_full().unwrap_err();
    assert!(format!("{err:#}").contains("already built"), "{err:#}");
    assert_eq!(before, (inode(&artifact), inode(&descriptor)));
}

#[test]
fn diffs_from_outside_the_window_are_refused_naming_the_full_stream() {
    let f = three_releases(1);
    let (status, _, body) = f.get("/v1/artifacts/1.0-to-3.0.descriptor");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("full-3.0"), "{body}");
    // The box's client sees that 404 as "no such artifact", which sends it to the full stream.
    let client = upgradectl::appliance::prepare::fetch::client(&server::limits()).unwrap();
    let err = upgradectl::appliance::prepare::fetch::get_capped(
        &client,
        &f.url("/v1/artifacts/1.0-to-3.0.descriptor"),
        "1.0-to-3.0",
        upgradectl::core::manifest::MAX_DESCRIPTOR_BYTES,
    )
    .unwrap_err();
    assert!(
        upgradectl::appliance::prepare::fetch::is_not_found(&err),
        "{err:#}"
    );
    let (status, _, body) = f.get("/v1/artifacts/2.0-to-3.0.descriptor");
    assert_eq!(status, 503, "{body}");
    f.descriptor("2.0-to-3.0");
    assert_eq!(f.server.builds_started(), 1, "only the diff in the window");
}

#[test]
fn builds_run_one_at_a_time_by_default() {
    let f = slow_source(Duration::from_millis(300), Duration::ZERO);
    let names = ["full-1.0", "full-2.0", "1.0-to-2.0"];
    ask_at_once(&f, &names, |f, name| drop(f.descriptor(name)), || {});
    assert_eq!(f.server.builds_started(), 3);
    assert_eq!(f.source.max_running.load(Ordering::SeqCst), 1);
}

#[test]
fn a_failed_build_is_not_retried_before_its_backoff() {
    // 1.0-to-3.0 is in the window but its stream does not exist: the build fails.
    let f = three_releases(2);
    let (status, retry, _) = f.get("/v1/artifacts/1.0-to-3.0.descriptor");
    assert_eq!((status, retry), (503, Some(1)));
    wait_for("the build to fail", Duration::from_secs(30), || {
        f.server.builds_in_progress() == 0
    });
    for _ in 0..3 {
        let (status, retry, body) = f.get("/v1/artifacts/1.0-to-3.0.descriptor");
        assert_eq!(status, 503, "{body}");
        let retry = retry.expect("Retry-After");
        assert!((50..=60).contains(&retry), "Retry-After {retry}");
    }
    assert_eq!(f.server.builds_started(), 1, "no retry during the backoff");
}

#[test]
fn slow_source_checks_do_not_stall_other_requests() {
    let f = slow_source(Duration::ZERO, Duration::from_secs(2));
    let names = ["full-1.0", "full-2.0", "1.0-to-2.0", "full-1.0"];
    let get = |f: &Fixture, name: &str| drop(f.get(&format!("/v1/artifacts/{name}")));
    ask_at_once(&f, &names, get, || {
        wait_for("source checks", Duration::from_secs(10), || {
            f.source.has_calls.load(Ordering::SeqCst) >= 2
        });
        let started = Instant::now();
        let (status, _, _) = f.get("/v1/metadata/timestamp.json");
        assert_eq!(status, 200);
        let took = started.elapsed();
        eprintln!("the timestamp while source checks block: {took:?}");
        assert!(took < Duration::from_secs(1), "the timestamp took {took:?}");
    });
}

/// Whether the server closed `conn` before `deadline` (EOF or reset).
fn closed_by(mut conn: &TcpStream, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 64];
    match conn.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// A server closing idle connections after 1 s with `max_connections` slots, `idle` idle
/// connections to it, and how long the repository's timestamp took then.
fn with_idle_connections(max_connections: usize, idle: usize) -> (Vec<TcpStream>, Duration) {
    let f = start_with(Setup {
        tuning: Tuning {
            idle_timeout: Duration::from_secs(1),
            max_connections,
            ..Tuning::default()
        },
        repo: true,
        ..Setup::default()
    });
    let idle: Vec<TcpStream> = (0..idle)
        .map(|_| TcpStream::connect(f.addr).unwrap())
        .collect();
    let started = Instant::now();
    let (status, _, _) = f.get("/v1/metadata/timestamp.json");
    assert_eq!(status, 200);
    let took = started.elapsed();
    eprintln!(
        "the timestamp with {} idle connections open: {took:?}",
        idle.len()
    );
    (idle, took)
}

/// How many of `conns` the server left open for 15 s.
fn left_open(conns: &[TcpStream]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    conns.iter().filter(|c| !closed_by(c, deadline)).count()
}

#[test]
fn idle_connections_are_closed_and_do_not_starve_others() {
    // The server raises it too, but the clients here are made before it runs.
    let hard = upgradectl::sys::rlimit::raise_nofile().unwrap();
    assert!(hard >= 4500, "RLIMIT_NOFILE hard limit {hard} is too low");
    let (idle, took) = with_idle_connections(Tuning::default().max_connections, 2000);
    assert!(took < Duration::from_secs(2), "the timestamp took {took:?}");
    assert_eq!(
        left_open(&idle),
        0,
        "idle connections the server never closed"
    );
}

#[test]
fn connections_beyond_the_cap_wait_for_a_slot() {
    let (idle, took) = with_idle_connections(10, 10);
    assert!(
        took >= Duration::from_millis(500),
        "answered in {took:?} with every slot taken by an idle connection"
    );
    assert_eq!(left_open(&idle), 0);
}

#[test]
fn internal_errors_answer_a_short_message_without_details() {
    let f = start_with(Setup::default());
    let releases = f.root.join("store/releases.json");
    std::fs::remove_file(&releases).unwrap();
    std::fs::create_dir(&releases).unwrap();
    let (status, _, body) = f.get("/v1/artifacts/1.0-to-2.0.descriptor");
    assert_eq!(status, 500);
    assert_eq!(body, "internal server error\n");
}
