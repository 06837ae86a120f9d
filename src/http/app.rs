//! The router: every route and the layers around them. Handlers live next to what they
//! serve (`page`, `upgrade`, `metrics`); this module only assembles them.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode},
    routing::{any, get},
};
use tower_http::set_header::SetResponseHeaderLayer;

use super::{page, state::AppState, upgrade};
use crate::metrics::{self, Metrics};

/// All routes. `/ws` takes any method: HTTP/1.1 upgrades arrive as GET and HTTP/2 ones
/// (RFC 8441) as CONNECT, and the handler answers other methods with 405.
pub(crate) fn router(state: AppState) -> Router {
    let served_by = HeaderValue::from_str(&state.settings.instance_name)
        .expect("invariant: Config::into_settings checked the instance name");
    let metrics_here = state.settings.metrics_addr.is_none();
    let metrics = Arc::clone(&state.metrics);
    let router = Router::new()
        .route("/", get(page::index))
        .route("/ws", any(upgrade::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let router = if metrics_here {
        router.route("/metrics", get(metrics::handler).with_state(metrics))
    } else {
        router
    };
    router
        .with_state(state)
        // On every response, the 101 of an upgrade included.
        .layer(SetResponseHeaderLayer::overriding(SERVED_BY, served_by))
}

/// The router of a separate metrics listener (`--metrics-listen`): `/metrics` only.
pub(crate) fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::handler))
        .with_state(metrics)
}

/// The response header that names the instance that answered.
pub(crate) const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

/// `GET /healthz`: the process is alive and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: ready for new connections; 503 from the moment a drain begins, so
/// that load balancers stop sending new clients here.
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
