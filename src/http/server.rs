//! [`run`]: accepts connections on a listener the caller has bound, serves HTTP/1.1 and
//! HTTP/2 (h2c) on each, and drains everything on shutdown.
//!
//! We own the accept loop, rather than calling `axum::serve`, for what a public echo
//! server needs before a request reaches the router: a deadline for request headers
//! (slowloris), `TCP_NODELAY` (echoes are small and latency-bound), the peer address for
//! logs, HTTP/2 extended CONNECT (RFC 8441), and a drain that covers upgraded sockets.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::Request,
    http::{HeaderValue, StatusCode},
    response::IntoResponse,
};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::Notify,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use super::{
    app, h2,
    preface::{self, Http},
    state::{AppState, PeerAddr, TlsInfo},
    tcp::{Slot, TcpCap},
    tls,
};
use crate::{
    Error,
    config::Settings,
    metrics::{Limit, Metrics},
    shutdown,
};

/// How long to pause accepting after an error such as "too many open files", so that
/// the loop does not spin while connections close.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Serves ws_echo on `listener` until `shutdown` completes, then drains: new connections
/// are refused, open WebSockets echo what they have received, get Close 1001, and are
/// given up to `settings.shutdown_timeout` to close.
///
/// The listener's own address is served; `settings.addr` is only where `main` binds.
///
/// # Errors
///
/// [`Error::Io`] if the listener's address cannot be read. Errors on single connections
/// end those connections and are logged; they never stop the server.
///
/// # Example
///
/// A server on an ephemeral port that stops when a channel fires:
///
/// ```no_run
/// # async fn example() -> Result<(), ws_echo::Error> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let server = tokio::spawn(ws_echo::run(listener, ws_echo::Settings::default(), async {
///     let _ = stopped.await;
/// }));
/// // ... connect clients to ws://{addr}/ws ...
/// let _ = stop.send(());
/// server.await.expect("server task")?;
/// # Ok(())
/// # }
/// ```
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let local = listener.local_addr()?;
    let metrics_addr = settings.metrics_addr;
    let server = Server::new(settings);
    if let Some(addr) = metrics_addr {
        server.serve_metrics(TcpListener::bind(addr).await?)?;
    }
    let (http, ws) = if server.tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let runtime = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current-thread",
        _ => "multi-thread",
    };
    info!(url = %format!("{http}://{local}/"), websocket = %format!("{ws}://{local}/ws"), runtime, max_tcp_connections = server.tcp.max(), "ws_echo listening");
    if let Some((sha256, self_signed)) = &server.certificate {
        info!(%sha256, self_signed, "TLS certificate");
    }
    // Serve until the shutdown signal, then keep accepting while the drain runs: a
    // connection that arrives during the drain gets a prompt answer (503 from /readyz
    // and for upgrades) instead of hanging until the process exits, and proxies fail
    // over at once.
    let drain = async {
        shutdown.await;
        server.drain().await
    };
    tokio::pin!(drain);
    let remaining = loop {
        let (stream, peer) = tokio::select! {
            biased;
            remaining = &mut drain => break remaining,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_error(&error);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some(slot) = server.tcp.admit(&server.metrics) else {
            warn!(%peer, limit = server.tcp.max(), "TCP connection limit reached");
            server
                .tcp
                .refuse(stream, server.tls.is_some(), &server.metrics);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        server.spawn_tcp(stream, peer, slot);
    };
    info!(remaining, "ws_echo stopped");
    Ok(())
}

/// One server's shared machinery: the router, the HTTP builder, and the drain.
///
/// [`run`] is the usual way in. `Server` serves connections accepted elsewhere: tests
/// and fuzzing drive it over in-memory streams, and an embedder can feed it its own
/// transport.
///
/// # Example
///
/// ```no_run
/// # async fn example() {
/// let server = ws_echo::Server::new(ws_echo::Settings::default());
/// let (client, server_side) = tokio::io::duplex(64 * 1024);
/// server.spawn_connection(server_side, "127.0.0.1:9".parse().unwrap());
/// // ... speak HTTP and WebSocket over `client` ...
/// # drop(client);
/// server.drain().await;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Server {
    /// The router with its state; cloned into each connection's service.
    router: axum::Router,
    /// HTTP/1.1 settings shared by every connection.
    builder: http1::Builder,
    /// The same, without keep-alive: connections accepted during the drain get one
    /// answer (a 503 for upgrades and `/readyz`) and are closed.
    draining_builder: http1::Builder,
    /// HTTP/2 connections get the WebSockets' keepalive: a peer that vanished without
    /// a FIN is found by its unanswered PING.
    keepalive: Option<h2::Keepalive>,
    /// Cancelled when the drain begins.
    token: CancellationToken,
    /// Every HTTP connection and every WebSocket runs in here.
    tracker: TaskTracker,
    /// How long [`Server::drain`] waits.
    deadline: Duration,
    /// How long a new connection has to deliver its first request's headers, and how
    /// long a connection with nothing in progress stays open.
    handshake_timeout: Duration,
    /// The cap on TCP connections.
    tcp: Arc<TcpCap>,
    /// The metrics of this server, shared with the router's state.
    metrics: Arc<Metrics>,
    /// TLS for every TCP connection, when configured.
    tls: Option<tls::Acceptor>,
    /// The certificate's SHA-256 and whether it was generated, for the startup log.
    certificate: Option<(String, bool)>,
    /// `X-Served-By` for the one answer that does not go through the router: plain HTTP
    /// on the TLS port.
    served_by: HeaderValue,
}

impl Server {
    /// A server with `settings`, serving nothing yet.
    pub fn new(settings: Settings) -> Self {
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let deadline = settings.shutdown_timeout;
        let handshake_timeout = settings.handshake_timeout;
        let tls = settings
            .tls
            .as_ref()
            .map(|tls| tls.acceptor(handshake_timeout));
        let certificate = settings
            .tls
            .as_ref()
            .map(|tls| (tls.fingerprint(), tls.is_self_signed()));
        let tcp = Arc::new(TcpCap::new(
            settings
                .max_tcp_connections
                .unwrap_or_else(super::tcp::default_cap),
        ));
        let served_by = HeaderValue::from_str(&settings.instance_name)
            .expect("invariant: Config::into_settings checked the instance name");
        let (ping_interval, ping_timeout) = (settings.ping_interval, settings.ping_timeout);
        let state = AppState::new(settings, token.clone(), tracker.clone());
        let metrics = Arc::clone(&state.metrics);
        let router = app::router(state);
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(handshake_timeout)
            // A client may send its whole request and shut down its write side while it
            // waits (`nc -N`, some proxies). Without this, hyper takes that EOF for a
            // vanished client and closes without answering whenever it reads before the
            // answer is ready: most such requests to the binary got nothing. The cost is
            // that a client gone during a request is noticed only when the answer is
            // written, and every answer here is immediate (an upgrade hands the socket
            // on with its 101). Header deadlines, keep-alive and the drain are unchanged:
            // an EOF between requests still closes the connection.
            .half_close(true);
        let keepalive = ping_interval.map(|interval| h2::Keepalive {
            interval,
            timeout: ping_timeout,
        });
        let mut draining_builder = builder.clone();
        draining_builder.keep_alive(false);
        Self {
            router,
            builder,
            draining_builder,
            keepalive,
            token,
            tracker,
            deadline,
            handshake_timeout,
            tcp,
            metrics,
            tls,
            certificate,
            served_by,
        }
    }

    /// Serves HTTP (and WebSockets upgraded from it) on `io` in a task of its own.
    /// `peer` is the address logged and used for per-address limits.
    pub fn spawn_connection<I>(&self, io: I, peer: SocketAddr)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let slot = Slot::new(None, Arc::clone(&self.metrics));
        self.tracker.spawn(self.serve_http(io, peer, None, slot));
    }

    /// Serves an accepted TCP connection: TLS first when configured, then HTTP. The TLS
    /// handshake runs in the connection's own task, so the accept loop is already back
    /// at `accept`, and under the handshake timeout.
    fn spawn_tcp(&self, stream: TcpStream, peer: SocketAddr, slot: Arc<Slot>) {
        let Some(tls) = self.tls.clone() else {
            self.tracker
                .spawn(self.serve_http(stream, peer, None, slot));
            return;
        };
        let server = self.clone();
        self.tracker.spawn(async move {
            let handshake = tokio::select! {
                handshake = tls.accept(stream) => handshake,
                () = server.token.cancelled() => return,
            };
            match handshake {
                Ok(tls::Accepted::NotTls { stream, deadline }) => {
                    debug!(%peer, "plain HTTP on the TLS port; answering 400");
                    let answer = answer_plain_http(stream, server.served_by.clone());
                    tokio::select! {
                        answered = tokio::time::timeout_at(deadline, answer) => {
                            if let Ok(Err(error)) = answered {
                                debug!(%peer, %error, "plain HTTP on the TLS port ended with an error");
                            }
                        }
                        () = server.token.cancelled() => {}
                    }
                }
                Ok(tls::Accepted::Tls(stream)) => {
                    let (_, session) = stream.get_ref();
                    let info = TlsInfo {
                        protocol: session
                            .protocol_version()
                            .map_or_else(String::new, |v| format!("{v:?}")),
                        alpn: session
                            .alpn_protocol()
                            .map(|p| String::from_utf8_lossy(p).into_owned()),
                        server_name: session.server_name().map(str::to_owned),
                    };
                    server.serve_http(stream, peer, Some(info), slot).await;
                }
                Err(error) => debug!(%peer, %error, "TLS handshake failed"),
            }
        });
    }

    /// HTTP/1.1 and HTTP/2 on `io` until the client leaves, the first request does not
    /// come in time, or the drain closes it. Upgraded WebSockets live on in their own
    /// tasks.
    fn serve_http<I>(
        &self,
        io: I,
        peer: SocketAddr,
        tls: Option<TlsInfo>,
        slot: Arc<Slot>,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Set when the first request's headers are in. hyper's own header timeout starts
        // only once the protocol is known, and telling HTTP/1.1 from HTTP/2 waits for
        // bytes without limit, so a silent connection would be held forever.
        let first_request = Arc::new(Notify::new());
        let answer = Answer {
            router: self.router.clone(),
            first_request: Arc::clone(&first_request),
            slot: Arc::clone(&slot),
            peer,
            tls,
        };
        // A connection accepted during the drain is not cut by it (it would be closed
        // before its request is read); its HTTP/1.1 builder closes it after one answer
        // instead.
        let draining = self.token.is_cancelled();
        let builder = if draining {
            self.draining_builder.clone()
        } else {
            self.builder.clone()
        };
        let keepalive = self.keepalive;
        let token = self.token.clone();
        let handshake_timeout = self.handshake_timeout;
        let metrics = Arc::clone(&self.metrics);
        async move {
            // The connection's place under the TCP cap lasts as long as this task, or
            // longer in a WebSocket upgraded from it.
            let slot = slot;
            let handshake_deadline = async {
                if tokio::time::timeout(handshake_timeout, first_request.notified())
                    .await
                    .is_ok()
                {
                    std::future::pending::<()>().await;
                }
            };
            // Why the connection should end, whatever its protocol.
            let stopping = async {
                let why = tokio::select! {
                    // The handshake deadline is older than the idle one and fires first.
                    biased;
                    () = handshake_deadline => EndOf::HandshakeTimeout,
                    // No request and no WebSocket in progress (HTTP/2 connections, which
                    // hyper's header timeout does not cover, and HTTP/1.1 keep-alive).
                    () = slot.idle_for(handshake_timeout) => EndOf::Idle,
                    // Finish the request in flight, then close; idle keep-alive
                    // connections close at once.
                    () = token.cancelled(), if !draining => EndOf::Drain,
                };
                match why {
                    EndOf::HandshakeTimeout => {
                        debug!(%peer, "no request headers within the handshake timeout; closing");
                        metrics.limit_drop(Limit::HandshakeTimeout);
                    }
                    EndOf::Idle => {
                        debug!(%peer, "HTTP connection idle; closing");
                        metrics.limit_drop(Limit::HttpIdle);
                    }
                    EndOf::Drain => {}
                }
                why
            };
            tokio::pin!(stopping);
            let (http, io) = tokio::select! {
                biased;
                sniffed = preface::sniff(io) => match sniffed {
                    Ok(sniffed) => sniffed,
                    Err(error) => {
                        debug!(%peer, %error, "HTTP connection ended before its first request");
                        return;
                    }
                },
                _ = &mut stopping => return,
            };
            let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match http {
                Http::One => {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let answered = answer.call(request.map(axum::body::Body::new));
                        async move { Ok::<_, std::convert::Infallible>(answered.await) }
                    });
                    let connection = builder
                        .serve_connection(TokioIo::new(io), service)
                        .with_upgrades();
                    tokio::pin!(connection);
                    tokio::select! {
                        result = connection.as_mut() => result.map_err(Into::into),
                        why = &mut stopping => {
                            if why == EndOf::HandshakeTimeout {
                                return;
                            }
                            connection.as_mut().graceful_shutdown();
                            connection.await.map_err(Into::into)
                        }
                    }
                }
                Http::Two => {
                    let stop = async {
                        match stopping.await {
                            EndOf::HandshakeTimeout => h2::Stop::Now,
                            EndOf::Idle | EndOf::Drain => h2::Stop::Gracefully,
                        }
                    };
                    h2::serve(io, |request| answer.call(request), stop, keepalive)
                        .await
                        .map_err(Into::into)
                }
            };
            if let Err(error) = result {
                debug!(%peer, %error, "HTTP connection ended with an error");
            }
        }
    }

    /// Serves `/metrics` alone on `listener` until the drain begins.
    fn serve_metrics(&self, listener: TcpListener) -> io::Result<()> {
        info!(url = %format!("http://{}/metrics", listener.local_addr()?), "metrics listening");
        let router = app::metrics_router(Arc::clone(&self.metrics));
        let stop = self.token.clone().cancelled_owned();
        self.tracker.spawn(async move {
            if let Err(error) = axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
            {
                warn!(%error, "metrics listener failed");
            }
        });
        Ok(())
    }

    /// Begins the drain and waits for it: no new WebSockets, Close 1001 to open ones,
    /// then up to the shutdown timeout for them to close. Returns how many connections
    /// were still open at the deadline.
    pub async fn drain(&self) -> usize {
        shutdown::drain(&self.token, &self.tracker, self.deadline).await
    }
}

/// Answers plain HTTP that arrived on the TLS port: whatever the request, 400 with a
/// pointer to https:// and wss://, then the connection closes. hyper reads the request
/// first: closing with it unread would reset the connection, and the client might lose
/// the answer.
async fn answer_plain_http(stream: TcpStream, served_by: HeaderValue) -> hyper::Result<()> {
    let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
        let response = (
            StatusCode::BAD_REQUEST,
            [(app::SERVED_BY, served_by.clone())],
            "This port speaks TLS only: use https:// for the page and wss:// for WebSockets, \
             on the same host and port.\n",
        )
            .into_response();
        std::future::ready(Ok::<_, std::convert::Infallible>(response))
    });
    hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

/// Why an HTTP connection is closed from our side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndOf {
    /// No request headers within the handshake timeout: closed at once.
    HandshakeTimeout,
    /// Nothing in progress for the handshake timeout: closed gracefully.
    Idle,
    /// The drain began: closed gracefully.
    Drain,
}

/// Answers a connection's requests, HTTP/1.1 or HTTP/2, through the router, with what
/// the router needs to know about the connection.
struct Answer {
    router: axum::Router,
    /// Notified at each request: the first one meets the handshake deadline.
    first_request: Arc<Notify>,
    /// The connection's place under the TCP cap, busy while a request is answered.
    slot: Arc<Slot>,
    peer: SocketAddr,
    tls: Option<TlsInfo>,
}

impl Answer {
    fn call(
        &self,
        mut request: Request,
    ) -> impl Future<Output = axum::response::Response> + Send + use<> {
        self.first_request.notify_one();
        // In progress until its answer is ready; a WebSocket upgraded from it takes its
        // own mark (`http::upgrade`).
        let in_progress = self.slot.active();
        request.extensions_mut().insert(PeerAddr(self.peer));
        request.extensions_mut().insert(Arc::clone(&self.slot));
        if let Some(tls) = &self.tls {
            request.extensions_mut().insert(tls.clone());
        }
        let answer = self.router.clone().oneshot(request);
        async move {
            let Ok(answer) = answer.await;
            drop(in_progress);
            answer
        }
    }
}

/// Logs an accept error. None of them stops the server: they concern one connection
/// (reset before accept) or pass when connections close (out of file descriptors).
fn accept_error(error: &io::Error) {
    warn!(%error, "accept failed");
}
