//! `POST /v1/reports`: a box's signed report into the fleet database (`fleet::intake`).
//! `201` stored, `200` stored before (a resend), `400` malformed or stale, `403` not signed by
//! an enrolled box, `413` over `MAX_REPORT_BYTES`, `500` the database failed. The answer
//! comes only once the report is durable (see `fleet::store`).

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::Router;

use super::respond::{error, internal, with_db};
use crate::core::report::MAX_REPORT_BYTES;
use crate::fleet::intake::{self, Receipt, Refusal};
use crate::fleet::store::Db;
use crate::sys::clock::now;

/// The report route over the fleet database.
pub fn router(db: Arc<Mutex<Db>>) -> Router {
    Router::new()
        .route("/v1/reports", post(post_report))
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .with_state(db)
}

async fn post_report(State(db): State<Arc<Mutex<Db>>>, body: Bytes) -> Response {
    let result = with_db(db, move |db| Ok(intake::receive(db, &body, now()))).await;
    match result {
        Ok(Ok(Receipt::Stored)) => error(StatusCode::CREATED, "stored".into()),
        Ok(Ok(Receipt::Duplicate)) => error(StatusCode::OK, "stored before".into()),
        Ok(Err(Refusal::Malformed(m))) => error(StatusCode::BAD_REQUEST, m),
        Ok(Err(Refusal::Forbidden(m))) => {
            tracing::warn!("refused a report: {m}");
            error(StatusCode::FORBIDDEN, m)
        }
        Ok(Err(Refusal::Internal(e))) | Err(e) => internal("storing a report", e),
    }
}
