//! [`run`]: accepts connections on a listener the caller has bound, serves HTTP/1.1 and
//! HTTP/2 on each, in plain text (h2c by prior knowledge) or over TLS (h2 by ALPN), and
//! drains everything on shutdown.
//!
//! We own the accept loop, rather than calling `axum::serve`, for what a public echo
//! server needs before a request reaches the router: a deadline for request headers
//! (slowloris), `TCP_NODELAY` (echoes are small and latency-bound), the peer address for
//! logs, HTTP/2 extended CONNECT (RFC 8441), and a drain that covers upgraded sockets.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::Request, http::Response};
use futures_util::{FutureExt, future::maybe_done};
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
/// With `settings.tls`, every connection on it speaks TLS first.
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
    let tls = settings
        .tls
        .as_ref()
        .map(|tls| tls.acceptor(handshake_timeout));
    let certificate = settings
        .tls
        .as_ref()
        .map(|tls| (tls.fingerprint(), tls.is_self_signed()));
    let state = AppState::new(settings, token.clone(), tracker.clone());
    let router = app::router(state);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout);
    // RFC 8441 §3: SETTINGS_ENABLE_CONNECT_PROTOCOL, without which clients never send
    // an extended CONNECT, so WebSockets over HTTP/2 depend on this one call.
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    let builder = Arc::new(builder);

    // Poll `shutdown` once before announcing the address. `shutdown_signal` installs
    // its handlers on first poll; a supervisor (or test) that sends SIGTERM as soon as
    // it reads the listening line would otherwise meet the default action, and the
    // process would die instead of draining (seen as a flaky idle-SIGTERM test).
    // `maybe_done` keeps the outcome, so the loop below may poll it again.
    let shutdown = maybe_done(shutdown);
    tokio::pin!(shutdown);
    let _ = shutdown.as_mut().now_or_never();

    let (http, ws) = if tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    info!(url = %format!("{http}://{local}/"), websocket = %format!("{ws}://{local}/ws"), "ws_echo listening");
    if let Some((sha256, self_signed)) = certificate {
        info!(%sha256, self_signed, "TLS certificate");
    }
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
        let connection = Connection {
            builder: Arc::clone(&builder),
            router: router.clone(),
            token: token.clone(),
            peer,
        };
        // The one branch between plain and TLS. The TLS handshake runs here, in the
        // connection's task, so the loop is already back at `accept`.
        match tls.clone() {
            None => tracker.spawn(connection.serve(TokioIo::new(stream))),
            Some(tls) => tracker.spawn(async move {
                let handshake = tokio::select! {
                    handshake = tls.accept(stream) => handshake,
                    () = connection.token.cancelled() => return,
                };
                match handshake {
                    Ok(stream) => connection.serve(TokioIo::new(stream)).await,
                    Err(error) => debug!(%peer, %error, "TLS handshake failed"),
                }
            }),
        };
    }

    let remaining = shutdown::drain(&token, &tracker, deadline).await;
    info!(remaining, "ws_echo stopped");
    Ok(())
}

/// One accepted connection, before its HTTP is served. Built by the accept loop and
/// moved into the connection's task.
struct Connection {
    /// hyper-util's HTTP/1.1 + HTTP/2 server settings, shared by every connection.
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// The router; a clone per connection is a reference count.
    router: Router,
    /// Cancelled at shutdown: the connection finishes its request in flight and closes.
    token: CancellationToken,
    /// The client's address, for logs and the `PeerAddr` request extension.
    peer: SocketAddr,
}

impl Connection {
    /// Serves HTTP on `io`, plain TCP or TLS alike, until the client leaves or shutdown
    /// closes it. Upgraded WebSockets live on in their own tasks.
    async fn serve<I>(self, io: I)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let Self {
            builder,
            router,
            token,
            peer,
        } = self;
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(PeerAddr(peer));
            router.clone().oneshot(request)
        });
        let connection = builder.serve_connection_with_upgrades(io, service);
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
    }
}

/// Logs an accept error. None of them stops the server: they concern one connection
/// (reset before accept) or pass when connections close (out of file descriptors).
fn accept_error(error: &io::Error) {
    warn!(%error, "accept failed");
}

/// Type check: the router's responses are what hyper serves.
const _: fn(Response<axum::body::Body>) = |_| {};
