//! Boxes of the fleet for the tests of the server's fleet side: enrolled identities and their
//! signed reports, posted over real HTTP.
//!
//! Used by `tests/fleet_reports.rs`, `tests/dashboard.rs` and `tests/fleet_durability.rs` as
//! `#[path = "common/fleet.rs"]`.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::time::Duration;

use ed25519_dalek::SigningKey;
use upgradectl::core::report::{new_id, Outcome, Report};
use upgradectl::core::sign::{public_key_string, seal};
use upgradectl::fleet::store::{Db, Enrolled};
use upgradectl::sys::clock::now;

/// Box `i` (`box-{i}`, key from the seed `[i; 32]`), enrolled in `group`; its key.
pub fn enroll(db: &Db, i: u8, group: &str) -> SigningKey {
    let key = SigningKey::from_bytes(&[i; 32]);
    let b = Enrolled {
        box_id: format!("box-{i}"),
        public_key: public_key_string(&key.verifying_key()),
        group: group.into(),
    };
    db.enroll(&b, now()).unwrap();
    key
}

/// Box `i`'s report of `outcome` going from 1.0 to `to`, sent now.
pub fn report(i: u8, to: &str, outcome: Outcome) -> Report {
    Report {
        id: new_id(),
        box_id: format!("box-{i}"),
        group: "zone-a".into(),
        sent: now(),
        from: Some("1.0".parse().unwrap()),
        to: Some(to.parse().unwrap()),
        outcome,
        failed_check: outcome.is_failure().then(|| "web".into()),
        boot_report: None,
        started: now() - 3,
        seconds: 3.0,
    }
}

/// `r` sealed with `key`, as the box posts it.
pub fn signed(r: &Report, key: &SigningKey) -> Vec<u8> {
    serde_json::to_vec(&seal(r, key).unwrap()).unwrap()
}

/// A client for posting reports (10 s timeout).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// POSTs `body` to `url` (the server's `/v1/reports`); the status.
pub fn post(url: &str, body: Vec<u8>) -> u16 {
    client()
        .post(url)
        .body(body)
        .send()
        .unwrap()
        .status()
        .as_u16()
}
