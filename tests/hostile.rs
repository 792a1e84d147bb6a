//! A hostile or broken server, over real HTTP on 127.0.0.1: huge Retry-After values, endless
//! bodies, huge error pages. The server here is a stub that answers one canned response per
//! connection, because the real server never misbehaves this way.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use upgradectl::appliance::prepare::fetch::{self, Limits};
use upgradectl::core::manifest::MAX_DESCRIPTOR_BYTES;

/// Serves `response` (status line, headers, then `body`) to every connection; returns the
/// base URL.
fn stub(head: &'static str, body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = write!(
                conn,
                "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body);
        }
    });
    format!("http://{addr}")
}

fn limits() -> Limits {
    Limits {
        stall: Duration::from_secs(10),
        min_speed: 1,
    }
}

#[test]
fn absurd_retry_after_does_not_crash_prepare_wait() {
    // The repository's server says "come back later" with a Retry-After no sleep can take.
    let url = stub(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 18446744073709551615",
        Vec::new(),
    );
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/upgradectl");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(root.path().join("host")).unwrap();
    let (repo, keys) = (root.path().join("repo"), root.path().join("keys"));
    let o = upgradectl::server::tuf_repo::InitOptions {
        root_keys: 1,
        root_threshold: 1,
    };
    upgradectl::server::tuf_repo::init(&repo, &keys, &o).unwrap();
    std::fs::copy(repo.join("metadata/1.root.json"), etc.join("root.json")).unwrap();
    std::fs::write(
        etc.join("upgradectl.toml"),
        format!(
            "server = \"{url}\"\nbox_id = \"b\"\n[trust]\nroot = \"/etc/upgradectl/root.json\"\n\
             [download]\nmax_wait_seconds = 60\n"
        ),
    )
    .unwrap();
    let out = Command::new(assert_cmd::cargo::cargo_bin("upgradectl"))
        .arg("--root")
        .arg(root.path())
        .args(["--json", "prepare", "--wait"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(4),
        "come back later, not a panic; stderr: {stderr}\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("metadata"), "{stderr}");
}

#[test]
fn retry_after_is_clamped() {
    let url = stub(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 99999999",
        Vec::new(),
    );
    let client = fetch::client(&limits()).unwrap();
    let err = fetch::get_capped(&client, &url, "m", MAX_DESCRIPTOR_BYTES).unwrap_err();
    match err.downcast_ref::<upgradectl::error::Error>() {
        Some(upgradectl::error::Error::ComeBackLater { retry_after, .. }) => {
            assert_eq!(retry_after.as_secs(), fetch::MAX_RETRY_AFTER)
        }
        _ => panic!("{err:#}"),
    }
}

#[test]
fn oversized_descriptor_is_refused_before_parsing() {
    // A valid-looking descriptor padded past the cap: without a cap it would be read whole.
    let mut body = br#"{"name": "full-1.0"}"#.to_vec();
    body.resize(body.len() + MAX_DESCRIPTOR_BYTES as usize + 1, b' ');
    let url = stub("HTTP/1.1 200 OK", body);
    let client = fetch::client(&limits()).unwrap();
    let err = fetch::get_capped(&client, &url, "the descriptor", MAX_DESCRIPTOR_BYTES).unwrap_err();
    assert!(format!("{err:#}").contains("larger than"), "{err:#}");
    assert_eq!(
        upgradectl::error::classify(&err).0,
        upgradectl::error::Exit::Refused
    );
}

#[test]
fn huge_error_body_is_cut_to_a_short_utf8_line() {
    // Multi-byte characters everywhere, so a cut at a byte count would split one.
    let body = "é".repeat(1 << 20).into_bytes();
    let url = stub("HTTP/1.1 404 Not Found", body);
    let client = fetch::client(&limits()).unwrap();
    let err = fetch::get_capped(&client, &url, "m", MAX_DESCRIPTOR_BYTES).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.len() < 1024, "{} bytes of error", msg.len());
    assert!(msg.contains("404") && msg.contains('é'), "{msg}");
}
