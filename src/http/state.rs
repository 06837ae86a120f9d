//! What every handler and connection task shares ([`AppState`]), and the facts about a
//! connection that the accept loop attaches to each request ([`PeerAddr`], [`TlsInfo`]).
//! Both the router and the WebSocket upgrade read these; neither owns them.

use std::{net::SocketAddr, sync::Arc};

use crate::ws::driver::Budget;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::limits::ConnectionLimits;
use crate::{
    config::Settings,
    metrics::{EchoCounters, Metrics},
    ws::echo::EchoConfig,
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
    /// What every WebSocket connection shares: limits, deadlines, ids.
    pub(crate) echo: Arc<EchoConfig>,
    /// Cancelled when shutdown begins; every echo loop watches it.
    pub(crate) shutdown: CancellationToken,
    /// Tracks every connection task, so that shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Caps on open WebSockets. An admission is moved into the connection's task and
    /// frees its place when the task ends.
    pub(crate) limits: Arc<ConnectionLimits>,
    /// The buffer budget in bytes, shared by every WebSocket (see `ws::driver`).
    pub(crate) budget: Budget,
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
            echo: Arc::new(EchoConfig::new(&settings)),
            limits: Arc::new(ConnectionLimits::new(
                settings.max_connections,
                settings.max_connections_per_ip,
            )),
            budget: Budget::new(settings.buffer_budget),
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
