//! The box's identity for the fleet: its id (`box_id`, default `/etc/machine-id`), its group,
//! and its ed25519 key on the host partition (`identity.key`, 0600), created once at
//! provisioning and kept across image switches; reports are signed with it.

use anyhow::{Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::SigningKey;

use crate::appliance::ctx::Ctx;
use crate::appliance::paths::Layout;
use crate::sys::fsutil::write_new;

/// The box's id: `box_id` from the configuration, else the one kept on the host partition
/// (`box-id` in the state directory), else `/etc/machine-id` (trimmed), kept there at its first
/// use: each image has its own machine-id, and the box must stay the same box across image
/// switches (its enrolled identity, its rollout bucket).
pub fn box_id(ctx: &Ctx) -> Result<String> {
    if let Some(id) = &ctx.config.box_id {
        return Ok(id.trim().to_owned());
    }
    let kept = ctx.layout.state_dir().join("box-id");
    if let Ok(id) = std::fs::read_to_string(&kept) {
        if !id.trim().is_empty() {
            return Ok(id.trim().to_owned());
        }
    }
    let path = ctx.layout.in_root("/etc/machine-id");
    let id = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} for the box id (or set box_id)", path.display()))?;
    let id = id.trim().to_owned();
    // Kept once; a host partition that cannot take it now is asked again next time.
    let stored = std::fs::create_dir_all(ctx.layout.state_dir())
        .map_err(anyhow::Error::from)
        .and_then(|()| write_new(&kept, format!("{id}\n").as_bytes(), 0o644));
    if let Err(e) = stored {
        if !kept.exists() {
            tracing::debug!("keeping the box id in {}: {e:#}", kept.display());
        }
    }
    Ok(id)
}

/// The box's key, if it was created.
pub fn load(layout: &Layout) -> Result<Option<SigningKey>> {
    let path = layout.identity_key();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let bytes: [u8; 32] = B64
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{} is not an ed25519 secret key", path.display()))?;
    Ok(Some(SigningKey::from_bytes(&bytes)))
}

/// The box's key, created now if it has none (never replaced: enrollment names it).
pub fn load_or_create(layout: &Layout) -> Result<SigningKey> {
    if let Some(key) = load(layout)? {
        return Ok(key);
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let text = format!("{}\n", B64.encode(key.to_bytes()));
    write_new(&layout.identity_key(), text.as_bytes(), 0o600)
        .context("creating the box's identity key")?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_created_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path(), std::path::Path::new("/host"));
        assert!(load(&layout).unwrap().is_none());
        let key = load_or_create(&layout).unwrap();
        let again = load_or_create(&layout).unwrap();
        assert_eq!(key.to_bytes(), again.to_bytes());
        let mode = std::fs::metadata(layout.identity_key())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(layout.identity_key(), "garbage").unwrap();
        assert!(load(&layout).is_err());
    }
}
