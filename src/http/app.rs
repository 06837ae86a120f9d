//! The router: every route and the layers around them. Handlers live next to what they
//! serve (`page`, `upgrade`, `metrics`); this module only assembles them.

use std::sync::Arc;

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use tower_http::set_header::SetResponseHeaderLayer;

use super::{page, state::AppState, upgrade};
use crate::metrics::{self, Metrics};

/// All routes. `/ws` takes any method: HTTP/1.1 upgrades arrive as GET and HTTP/2 ones
/// (RFC 8441) as CONNECT, and the handler answers other methods with 405. `/` serves
/// the page, and upgrades a WebSocket handshake too: clients pointed at the root, as
/// people do with public echo services, work.
pub(crate) fn router(state: AppState) -> Router {
    let served_by = HeaderValue::from_str(&state.settings.instance_name)
        .expect("invariant: Config::into_settings checked the instance name");
    let metrics_here = state.settings.metrics_addr.is_none();
    let metrics = Arc::clone(&state.metrics);
    let router = Router::new()
        .route("/", any(root))
        .route("/ws", any(upgrade::upgrade))
        .route("/controls", get(controls))
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

/// `/`: a WebSocket handshake (`Upgrade: websocket`, or HTTP/2's CONNECT) upgrades as on
/// `/ws`; GET and HEAD get the page; other methods 405.
async fn root(state: State<AppState>, request: Request) -> Response {
    let websocket = request
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("websocket"));
    // Other upgrades (`Upgrade: h2c` from `curl --http2`) get the page.
    if request.method() == Method::CONNECT || websocket {
        return upgrade::upgrade(state, request).await;
    }
    match *request.method() {
        Method::GET | Method::HEAD => page::index().await.into_response(),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "use GET\n",
        )
            .into_response(),
    }
}

/// `GET /controls`: the test controls a client may put in the WebSocket URL, their
/// ranges and the operator's ceilings, as JSON.
async fn controls(State(state): State<AppState>) -> impl IntoResponse {
    let description = crate::ws::controls::describe(state.echo.ceilings());
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{description:#}\n"),
    )
}

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
