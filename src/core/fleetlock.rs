//! The FleetLock protocol's documents and names (as Zincati, Typhoon and airlock speak it):
//! `POST /v1/pre-reboot` takes one of a group's reboot slots for a node, `POST
//! /v1/steady-state` gives it back; both carry the header `fleet-lock-protocol: true` and the
//! body `{"client_params": {"node_uuid", "group"}}`, and answer 200 or an error body
//! `{"kind", "value"}`.

use serde::{Deserialize, Serialize};

/// The header every FleetLock request carries (value `true`).
pub const HEADER: &str = "fleet-lock-protocol";
/// Takes a reboot slot.
pub const PRE_REBOOT: &str = "/v1/pre-reboot";
/// Gives the slot back.
pub const STEADY_STATE: &str = "/v1/steady-state";
/// The group of a box that names none.
pub const DEFAULT_GROUP: &str = "default";
/// Longest node_uuid or group accepted.
pub const MAX_NAME: usize = 128;

/// Who asks: the node and its group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientParams {
    pub node_uuid: String,
    pub group: String,
}

/// A request's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client_params: ClientParams,
}

/// A failed request's body: `kind` is stable, `value` says why in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: String,
    pub value: String,
}

/// Why a name (node_uuid, group) is refused, if it is: 1..=`MAX_NAME` bytes of letters,
/// digits, `.`, `_`, `-` or `:`.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if ok {
        return Ok(());
    }
    Err(format!(
        "{what}: {name:?} is not 1..={MAX_NAME} letters, digits, '.', '_', '-' or ':'"
    ))
}

/// Parses and checks a request body.
pub fn parse_request(body: &[u8]) -> Result<ClientParams, String> {
    let r: Request =
        serde_json::from_slice(body).map_err(|e| format!("not a FleetLock request: {e}"))?;
    check_name("node_uuid", &r.client_params.node_uuid)?;
    check_name("group", &r.client_params.group)?;
    Ok(r.client_params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_names_are_refused() {
        let ok = br#"{"client_params": {"node_uuid": "abc-1", "group": "default"}}"#;
        let p = parse_request(ok).unwrap();
        assert_eq!(
            (p.node_uuid.as_str(), p.group.as_str()),
            ("abc-1", "default")
        );
        for bad in [
            &br#"{"client_params": {"node_uuid": "", "group": "g"}}"#[..],
            br#"{"client_params": {"node_uuid": "a b", "group": "g"}}"#,
            br#"{"client_params": {"node_uuid": "a"}}"#,
            br#"{"node_uuid": "a", "group": "g"}"#,
            b"nonsense",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = "x".repeat(MAX_NAME + 1);
        assert!(check_name("group", &long).is_err());
        assert!(check_name("group", &long[1..]).is_ok());
    }
}
