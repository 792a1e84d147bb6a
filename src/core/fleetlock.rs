//! The FleetLock protocol's documents and names (as Zincati, Typhoon and airlock speak it):
//! `POST /v1/pre-reboot` takes one of a group's reboot slots for a node, `POST
//! /v1/steady-state` gives it back; both carry the header `fleet-lock-protocol: true` and the
//! body `{"client_params": {"node_uuid", "group"}}`, and answer 200 or an error body
//! `{"kind", "value"}`.

use serde::{Deserialize, Serialize};

use crate::core::report::check_label;

/// The header every FleetLock request carries (value `true`).
pub const HEADER: &str = "fleet-lock-protocol";
/// Takes a reboot slot.
pub const PRE_REBOOT: &str = "/v1/pre-reboot";
/// Gives the slot back.
pub const STEADY_STATE: &str = "/v1/steady-state";
/// The group of a box that names none.
pub const DEFAULT_GROUP: &str = "default";
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

/// Parses and checks a request body: node_uuid and group are labels as box ids are
/// (`core::report::check_label`: 1..=`MAX_LABEL` printable ASCII characters).
pub fn parse_request(body: &[u8]) -> Result<ClientParams, String> {
    let r: Request =
        serde_json::from_slice(body).map_err(|e| format!("not a FleetLock request: {e}"))?;
    let check = |what, s| check_label(what, s, false).map_err(|e| e.to_string());
    check("node_uuid", &r.client_params.node_uuid)?;
    check("group", &r.client_params.group)?;
    Ok(r.client_params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::report::MAX_LABEL;

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
        let params =
            |n: &str| format!(r#"{{"client_params": {{"node_uuid": "{n}", "group": "g"}}}}"#);
        let long = "x".repeat(MAX_LABEL + 1);
        assert!(parse_request(params(&long).as_bytes()).is_err());
        assert!(parse_request(params(&long[1..]).as_bytes()).is_ok());
    }
}
