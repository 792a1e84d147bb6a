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

/// Writes a server signing key into `dir` (as `keygen` would) and returns its path.
pub fn server_key(dir: &Path) -> PathBuf {
    use base64::Engine;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let path = dir.join("upgradectl.key");
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.to_bytes());
    std::fs::write(&path, b64).unwrap();
    path
}

/// `upgradectl serve --store STORE --key KEY` on 127.0.0.1:`port`, no stdin or stdout.
pub fn command(store: &Path, key: &Path, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_upgradectl"));
    c.args(["serve", "--zvol", "none/image", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--store")
        .arg(store)
        .arg("--key")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

impl Serve {
    /// Starts `upgradectl serve --store STORE --key KEY` on `port` with `extra` options and
    /// waits until it accepts connections.
    pub fn start(store: &Path, key: &Path, port: u16, extra: &[&str]) -> Serve {
        let child = command(store, key, port)
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
