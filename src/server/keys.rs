//! The server's key files: a new key pair (`keygen`) and loading the secret key.

use std::path::Path;

use anyhow::{Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::SigningKey;

use crate::core::sign::public_key_string;
use crate::sys::fsutil::atomic_write;

/// Writes a new key pair: `<dir>/upgradectl.key` (secret, 0600) and `<dir>/upgradectl.pub`.
pub fn keygen(dir: &Path) -> Result<String> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let secret = dir.join("upgradectl.key");
    anyhow::ensure!(
        !secret.exists(),
        "{} exists; refusing to overwrite a key",
        secret.display()
    );
    atomic_write(
        &secret,
        format!("{}\n", B64.encode(key.to_bytes())).as_bytes(),
        0o600,
    )?;
    let public = public_key_string(&key.verifying_key());
    atomic_write(
        &dir.join("upgradectl.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    Ok(public)
}

pub fn load_secret(path: &Path) -> Result<SigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    let bytes: [u8; 32] = B64
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{} is not an upgradectl secret key", path.display()))?;
    Ok(SigningKey::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sign::parse_public_key;

    #[test]
    fn keygen_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let public = keygen(dir.path()).unwrap();
        let secret = load_secret(&dir.path().join("upgradectl.key")).unwrap();
        assert_eq!(parse_public_key(&public).unwrap(), secret.verifying_key());
        assert!(keygen(dir.path()).is_err(), "never overwrites");
    }
}
