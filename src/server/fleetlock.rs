//! The FleetLock routes (`fleet::fleetlock`): `POST /v1/pre-reboot` takes a reboot slot,
//! `POST /v1/steady-state` gives it back. Both need the header `fleet-lock-protocol: true`;
//! `200` done, else a JSON `{"kind", "value"}`: `400` `bad_request` (no header, a malformed
//! body), `403` `not_enrolled`, `409` `failed_lock` (every slot held, or one of another group
//! held), `500` `internal`.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use super::respond::with_db;
use crate::core::fleetlock::{self as protocol, ClientParams, ErrorBody};
use crate::fleet::fleetlock::{self, Refusal};
use crate::fleet::semaphore::Slots;
use crate::fleet::store::Db;
use crate::sys::clock::now;

/// Largest request body accepted.
const MAX_BODY: usize = 4096;

#[derive(Clone)]
struct Lock {
    db: Arc<Mutex<Db>>,
    slots: Arc<Slots>,
}

/// The FleetLock routes over the fleet database, with `slots` per group.
pub fn router(db: Arc<Mutex<Db>>, slots: Slots) -> Router {
    let state = Lock {
        db,
        slots: Arc::new(slots),
    };
    Router::new()
        .route(protocol::PRE_REBOOT, post(pre_reboot))
        .route(protocol::STEADY_STATE, post(steady_state))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn answer(status: StatusCode, kind: &str, value: String) -> Response {
    let body = ErrorBody {
        kind: kind.into(),
        value,
    };
    (status, axum::Json(body)).into_response()
}

/// The request's parameters, or why it is a bad request.
fn params(headers: &HeaderMap, body: &[u8]) -> Result<ClientParams, String> {
    let flagged = headers
        .get(protocol::HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if !flagged {
        return Err(format!("missing header {}: true", protocol::HEADER));
    }
    protocol::parse_request(body)
}

/// Runs `f` on the database off the runtime and answers its outcome.
async fn run(
    lock: Lock,
    headers: HeaderMap,
    body: Bytes,
    f: fn(&Db, &ClientParams, &Slots) -> Result<String, Refusal>,
) -> Response {
    let p = match params(&headers, &body) {
        Ok(p) => p,
        Err(msg) => return answer(StatusCode::BAD_REQUEST, "bad_request", msg),
    };
    let slots = lock.slots.clone();
    let result = with_db(lock.db, move |db| Ok(f(db, &p, &slots))).await;
    match result {
        Ok(Ok(msg)) => answer(StatusCode::OK, "ok", msg),
        Ok(Err(e @ Refusal::NotEnrolled(_))) => {
            tracing::warn!("refused a reboot lock request: {e}");
            answer(StatusCode::FORBIDDEN, "not_enrolled", e.to_string())
        }
        Ok(Err(e @ (Refusal::Full { .. } | Refusal::OtherGroup { .. }))) => {
            answer(StatusCode::CONFLICT, "failed_lock", e.to_string())
        }
        Ok(Err(Refusal::Internal(e))) | Err(e) => {
            tracing::error!("reboot lock: {e:#}");
            let msg = "internal server error".to_owned();
            answer(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
        }
    }
}

async fn pre_reboot(State(lock): State<Lock>, headers: HeaderMap, body: Bytes) -> Response {
    run(lock, headers, body, |db, p, slots| {
        fleetlock::pre_reboot(db, p, slots, now())?;
        Ok(format!(
            "{} holds a reboot slot of {}",
            p.node_uuid, p.group
        ))
    })
    .await
}

async fn steady_state(State(lock): State<Lock>, headers: HeaderMap, body: Bytes) -> Response {
    run(lock, headers, body, |db, p, _| {
        fleetlock::steady_state(db, p)?;
        Ok(format!("{} holds no reboot slot", p.node_uuid))
    })
    .await
}
