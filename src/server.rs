//! [`run`]: accepts connections on a listener the caller has bound, serves HTTP/1.1 and
//! HTTP/2 (h2c) on each, and drains everything on shutdown.
//!
//! We own the accept loop, rather than calling `axum::serve`, for what a public echo
//! server needs before a request reaches the router: a deadline for request headers
//! (slowloris), `TCP_NODELAY` (echoes are small and latency-bound), the peer address for
//! logs, HTTP/2 extended CONNECT (RFC 8441), and a drain that covers upgraded sockets.

use std::{future::Future, io, time::Duration};

use axum::{extract::Request, http::Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::{
    Error,
    app::{self, AppState, PeerAddr},
    config::Settings,
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
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let deadline = settings.shutdown_timeout;
    let handshake_timeout = settings.handshake_timeout;
    let state = AppState::new(settings, token.clone(), tracker.clone());
    let router = app::router(state);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();

    info!(url = %format!("http://{local}/"), websocket = %format!("ws://{local}/ws"), "ws_echo listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_error(&error);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(PeerAddr(peer));
            router.clone().oneshot(request)
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let token = token.clone();
        tracker.spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = token.cancelled() => {
                    // Finish the request in flight, then close; idle keep-alive
                    // connections close at once.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                debug!(%peer, %error, "HTTP connection ended with an error");
            }
        });
    }

    let remaining = shutdown::drain(&token, &tracker, deadline).await;
    info!(remaining, "ws_echo stopped");
    Ok(())
}

/// Logs an accept error. None of them stops the server: they concern one connection
/// (reset before accept) or pass when connections close (out of file descriptors).
fn accept_error(error: &io::Error) {
    warn!(%error, "accept failed");
}

/// Type check: the router's responses are what hyper serves.
const _: fn(Response<axum::body::Body>) = |_| {};
