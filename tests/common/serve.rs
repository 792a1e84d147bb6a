//! The real `upgradectl serve` binary on 127.0.0.1 over a store directory, for tests of what
//! a server process keeps across restarts; killed when dropped.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `upgradectl serve`.
pub struct Serve {
    child: Child,
    pub base: String,
}

/// A free port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A TUF repository as the release manager makes it (`DIR/repo`, the offline keys in
/// `DIR/keys`) and the server's share of its keys (`DIR/online-keys`); returns `dir`.
pub fn repository(dir: &Path) -> PathBuf {
    let o = upgradectl::server::tuf_repo::InitOptions {
        root_keys: 1,
        root_threshold: 1,
    };
    upgradectl::server::tuf_repo::init(&dir.join("repo"), &dir.join("keys"), &o).unwrap();
    std::fs::create_dir_all(dir.join("online-keys")).unwrap();
    for role in ["snapshot", "timestamp", "rollout", "artifacts"] {
        let key = format!("{role}.1.pk8");
        std::fs::copy(
            dir.join("keys").join(&key),
            dir.join("online-keys").join(&key),
        )
        .unwrap();
    }
    dir.to_owned()
}

/// `upgradectl serve --store STORE` publishing the repository of `repository(dir)` on
/// 127.0.0.1:`port`, no stdin or stdout.
pub fn command(store: &Path, repo: &Path, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_upgradectl"));
    c.args(["serve", "--zvol", "none/image", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--store")
        .arg(store)
        .arg("--repo")
        .arg(repo.join("repo"))
        .arg("--repo-keys")
        .arg(repo.join("online-keys"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

impl Serve {
    /// Starts `upgradectl serve --store STORE` with the repository of `repository(dir)` on
    /// `port` with `extra` options and waits until it accepts connections.
    pub fn start(store: &Path, repo: &Path, port: u16, extra: &[&str]) -> Serve {
        let child = command(store, repo, port)
            .args(extra)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "the server never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Serve {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
