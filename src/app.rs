//! The router and the state every handler shares. Handlers live next to what they serve
//! (`page`, `echo`); this module only assembles them.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{HeaderName, HeaderValue, StatusCode},
    routing::{any, get},
};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::{
    config::Settings,
    echo,
    limits::ConnectionLimits,
    metrics::{self, EchoCounters, Metrics},
    page,
};

/// State shared by every handler and every connection task: one reference count, so
/// that each of tens of thousands of idle WebSocket tasks holds one pointer, not a
/// dozen. Fields are reached through `Deref`.
#[derive(Clone, Debug)]
pub(crate) struct AppState(Arc<SharedState>);

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// What [`AppState`] shares. Created once by `Server::new`.
#[derive(Debug)]
pub(crate) struct SharedState {
    /// The settings the server was started with.
    pub(crate) settings: Arc<Settings>,
    /// Engine configuration, shared by every WebSocket.
    pub(crate) echo: Arc<echo::EchoConfig>,
    /// Cancelled when shutdown begins; every echo loop watches it.
    pub(crate) shutdown: CancellationToken,
    /// Tracks every connection task, so that shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Caps on open WebSockets. An admission is moved into the connection's task and
    /// frees its place when the task ends.
    pub(crate) limits: Arc<ConnectionLimits>,
    /// The read budget in bytes, shared by every WebSocket (see `frame_guard`).
    pub(crate) read_budget: Arc<Semaphore>,
    /// This server's metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// Message counter handles, resolved once.
    pub(crate) counters: Arc<EchoCounters>,
}

impl AppState {
    /// State for a server with `settings`, drained through `shutdown` and `tracker`.
    pub(crate) fn new(
        settings: Settings,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        Self(Arc::new(SharedState {
            counters: Arc::new(EchoCounters::new(&metrics)),
            metrics,
            echo: Arc::new(echo::EchoConfig::new(&settings)),
            limits: Arc::new(ConnectionLimits::new(
                settings.max_connections,
                settings.max_connections_per_ip,
            )),
            read_budget: Arc::new(Semaphore::new(settings.buffer_budget)),
            settings: Arc::new(settings),
            shutdown,
            tracker,
        }))
    }
}

/// The client's address, inserted into every request by the server's accept loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

/// What the TLS handshake settled, inserted into every request of a TLS connection.
#[derive(Clone, Debug)]
pub(crate) struct TlsInfo {
    /// The protocol version, such as `TLSv1_3`.
    pub(crate) protocol: String,
    /// The ALPN protocol, such as `h2`.
    pub(crate) alpn: Option<String>,
    /// The server name the client asked for (SNI).
    pub(crate) server_name: Option<String>,
}

/// All routes. `/ws` takes any method: HTTP/1.1 upgrades arrive as GET and HTTP/2 ones
/// (RFC 8441) as CONNECT, and the handler answers other methods with 405.
pub(crate) fn router(state: AppState) -> Router {
    let served_by = HeaderValue::from_str(&state.settings.instance_name)
        .expect("invariant: Config::into_settings checked the instance name");
    let metrics_here = state.settings.metrics_addr.is_none();
    let metrics = Arc::clone(&state.metrics);
    let router = Router::new()
        .route("/", get(page::index))
        .route("/ws", any(echo::upgrade))
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
