//! ed25519 signing of box reports: a box's identity key signs each report it sends in an
//! envelope, which the server opens with the key it enrolled (`fleet::intake`). Releases and
//! artifacts are signed with TUF instead (`core::tuf`).

use anyhow::{Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::Error;

pub const PUBLIC_PREFIX: &str = "ed25519:";

/// A signed document: the exact payload bytes and signatures over them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// base64 of the JSON payload; verified as bytes, parsed only after verification.
    pub payload: String,
    pub signatures: Vec<SignatureEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// The signer's public key, `ed25519:<base64>`.
    pub key: String,
    pub sig: String,
}

/// Formats a public key as `fleet enroll` takes it: `ed25519:<base64>`.
pub fn public_key_string(key: &VerifyingKey) -> String {
    format!("{PUBLIC_PREFIX}{}", B64.encode(key.as_bytes()))
}

pub fn parse_public_key(s: &str) -> Result<VerifyingKey> {
    let b64 = s
        .trim()
        .strip_prefix(PUBLIC_PREFIX)
        .with_context(|| format!("public key {s:?} does not start with {PUBLIC_PREFIX}"))?;
    let bytes: [u8; 32] = B64
        .decode(b64)
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("public key {s:?} is not 32 bytes of base64"))?;
    VerifyingKey::from_bytes(&bytes).with_context(|| format!("public key {s:?} is invalid"))
}

/// Signs a payload.
pub fn seal<T: Serialize>(value: &T, key: &SigningKey) -> Result<Envelope> {
    let payload = serde_json::to_vec(value)?;
    Ok(Envelope {
        signatures: vec![SignatureEntry {
            key: public_key_string(&key.verifying_key()),
            sig: B64.encode(key.sign(&payload).to_bytes()),
        }],
        payload: B64.encode(payload),
    })
}

/// Verifies that a trusted key signed the payload, then parses it.
pub fn open<T: DeserializeOwned>(
    envelope: &Envelope,
    trusted: &[VerifyingKey],
    what: &str,
) -> Result<T> {
    let invalid = |m: String| anyhow::Error::from(Error::SignatureInvalid(format!("{what}: {m}")));
    if trusted.is_empty() {
        return Err(invalid("no trusted public key".into()));
    }
    let payload = B64
        .decode(&envelope.payload)
        .map_err(|_| invalid("payload is not base64".into()))?;
    let ok = envelope.signatures.iter().any(|s| {
        let Ok(key) = parse_public_key(&s.key) else {
            return false;
        };
        let Some(sig) = B64
            .decode(&s.sig)
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok())
        else {
            return false;
        };
        trusted.contains(&key) && key.verify(&payload, &sig).is_ok()
    });
    if !ok {
        return Err(invalid("not signed by a trusted key".into()));
    }
    parse_payload(&payload, what)
}

/// Signed but unusable (a bad version, a missing field): refused input, like any bad input.
fn parse_payload<T: DeserializeOwned>(payload: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(payload)
        .map_err(|e| Error::Refused(format!("{what}: malformed payload: {e}")).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        let env = seal(&vec![1, 2, 3], &key).unwrap();
        let v: Vec<i32> = open(&env, &[key.verifying_key()], "t").unwrap();
        assert_eq!(v, [1, 2, 3]);
        assert!(open::<Vec<i32>>(&env, &[other.verifying_key()], "t").is_err());
        let mut bad = env.clone();
        bad.payload = B64.encode(b"[1,2,4]");
        let err = open::<Vec<i32>>(&bad, &[key.verifying_key()], "manifest").unwrap_err();
        assert!(matches!(
            err.downcast_ref::<Error>(),
            Some(Error::SignatureInvalid(_))
        ));
        assert!(open::<Vec<i32>>(&env, &[], "t").is_err());
    }

    #[test]
    fn a_signed_payload_that_does_not_parse_is_refused_input() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let env = seal(&serde_json::json!({"v": "1.0-rc1"}), &key).unwrap();
        #[derive(Debug, Deserialize)]
        struct Doc {
            #[allow(dead_code)]
            v: crate::core::version::Version,
        }
        let err = open::<Doc>(&env, &[key.verifying_key()], "doc").unwrap_err();
        assert_eq!(
            crate::error::classify(&err).0,
            crate::error::Exit::Refused,
            "{err:#}"
        );
        assert!(format!("{err:#}").contains("1.0-rc1"), "{err:#}");
    }
}
