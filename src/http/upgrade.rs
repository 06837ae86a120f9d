//! `GET /ws` (and a WebSocket handshake to `/`): checks the upgrade and the test
//! controls in its query string, answers it, and runs the connection in a task of its
//! own: the protocol core (`ws::connection`) driven by `ws::driver` with the echo
//! policy (`ws::echo`), one span and one closing log line per connection.

use axum::{
    extract::{Request, State},
    http::{HeaderName, HeaderValue, StatusCode, Version, header},
    response::{IntoResponse, Response},
};
use std::sync::Arc;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use super::{
    h2::{OnTunnel, Tunnel},
    hello,
    limits::{Admission, Full},
    preface::Rewind,
    state::{AppState, PeerAddr},
    tcp::{Active, Slot},
};
use crate::{
    metrics::{HandshakeResult, Limit, Side},
    ws::{
        connection::{Kind, Receiver, Sender},
        controlled::Controlled,
        controls::{Controls, Fault},
        deflate::Params,
        driver::{Driver, Ending, Rules, Transport},
        echo::Echo,
        handshake,
        outbox::Payload,
    },
};

/// The response header that lists the test controls in effect.
pub(crate) const CONTROLS_HEADER: HeaderName = HeaderName::from_static("x-ws-echo-controls");

/// The subprotocol the `unrequested-subprotocol` fault selects.
const UNREQUESTED_SUBPROTOCOL: &str = "ws-echo-unrequested";

/// The test controls of one connection and their normalised summary (for the header,
/// the greeting and the log). Boxed: most connections have none.
struct Asked {
    controls: Controls,
    summary: String,
}

/// `GET /ws` (and HTTP/2 `CONNECT /ws`): checks the handshake, then hands the upgraded
/// connection to [`serve`] on the shared task tracker.
pub(crate) async fn upgrade(State(state): State<AppState>, mut request: Request) -> Response {
    let peer = request.extensions().get::<PeerAddr>().map(|peer| peer.0);
    let metrics = &state.metrics;
    let accepted = match handshake::accept(&request, &state.settings) {
        Ok(accepted) => accepted,
        Err(rejection @ handshake::Rejection::ForbiddenOrigin) => {
            metrics.handshake(HandshakeResult::ForbiddenOrigin);
            metrics.limit_drop(Limit::Origin);
            let origin = request
                .headers()
                .get(header::ORIGIN)
                .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned());
            info!(peer = ?peer, origin = origin.as_deref().unwrap_or("-"), "handshake refused: origin not in --allowed-origin");
            return rejection.into_response();
        }
        Err(rejection) => {
            metrics.handshake(match rejection {
                handshake::Rejection::MethodNotAllowed => HandshakeResult::MethodNotAllowed,
                handshake::Rejection::NotAnUpgrade => HandshakeResult::NotAnUpgrade,
                handshake::Rejection::OldHttpVersion => HandshakeResult::OldHttpVersion,
                handshake::Rejection::MissingHost => HandshakeResult::MissingHost,
                handshake::Rejection::UnexpectedBody => HandshakeResult::UnexpectedBody,
                handshake::Rejection::UnsupportedVersion => HandshakeResult::UnsupportedVersion,
                handshake::Rejection::BadKey => HandshakeResult::BadKey,
                handshake::Rejection::BadSubprotocol => HandshakeResult::BadSubprotocol,
                handshake::Rejection::ForbiddenOrigin => HandshakeResult::ForbiddenOrigin,
            });
            debug!(peer = ?peer, reason = rejection.reason(), "handshake refused");
            return rejection.into_response();
        }
    };
    let controls = match Controls::parse(request.uri().query(), state.echo.ceilings()) {
        Ok(controls) => controls,
        Err(bad) => {
            metrics.handshake(HandshakeResult::BadControl);
            debug!(peer = ?peer, %bad, "handshake refused: bad test control");
            return (StatusCode::BAD_REQUEST, format!("{bad}\n")).into_response();
        }
    };
    if let Some(status) = controls.status {
        metrics.handshake(HandshakeResult::StatusControl);
        metrics.control_used("status");
        let status = StatusCode::from_u16(status)
            .expect("invariant: Controls::parse keeps status within 400-599");
        return (
            status,
            format!(
                "refused with {} on request (status control)\n",
                status.as_u16()
            ),
        )
            .into_response();
    }
    if controls.fault == Some(Fault::BadAccept) && request.version() != Version::HTTP_11 {
        metrics.handshake(HandshakeResult::BadControl);
        return (
            StatusCode::BAD_REQUEST,
            "fault: bad-accept needs HTTP/1.1 (an HTTP/2 WebSocket has no Sec-WebSocket-Accept)\n",
        )
            .into_response();
    }
    if state.shutdown.is_cancelled() {
        metrics.handshake(HandshakeResult::Draining);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "shutting down\n",
        )
            .into_response();
    }
    let admission = match state.limits.admit(peer.map(|peer| peer.ip())) {
        Ok(admission) => admission,
        Err(Full::Server) => {
            metrics.handshake(HandshakeResult::ServerFull);
            metrics.limit_drop(Limit::Connections);
            warn!(peer = ?peer, limit = state.limits.max(), "connection limit reached");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                "too many open WebSockets; retry shortly\n",
            )
                .into_response();
        }
        Err(Full::Address) => {
            metrics.handshake(HandshakeResult::AddressFull);
            metrics.limit_drop(Limit::ConnectionsPerIp);
            warn!(peer = ?peer, "per-address connection limit reached");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                "too many open WebSockets from this address\n",
            )
                .into_response();
        }
    };
    metrics.handshake(HandshakeResult::Accepted);
    // The WebSocket keeps its TCP connection's place under the cap and, on HTTP/2,
    // keeps the connection from being closed as idle.
    let in_progress = request.extensions().get::<Arc<Slot>>().map(Slot::active);
    // HTTP/2 streams come from our own server (`http::h2`), HTTP/1.1 upgrades from hyper.
    let on_upgrade = match request.extensions_mut().remove::<OnTunnel>() {
        Some(tunnel) => Upgrade::Http2(tunnel),
        None => Upgrade::Http1(hyper::upgrade::on(&mut request)),
    };
    let mut accepted = accepted;
    let mut response = accepted.response();
    accepted.forget_accept_key();
    let asked = (!controls.is_empty()).then(|| {
        let summary = controls.summary();
        for name in controls.names() {
            metrics.control_used(name);
        }
        if let Ok(value) = HeaderValue::from_str(&summary) {
            response.headers_mut().insert(CONTROLS_HEADER, value);
        }
        match controls.fault {
            Some(Fault::BadAccept) => {
                // Base64 of twenty zero bytes: never the SHA-1 of a key and the GUID.
                let wrong = HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
                response
                    .headers_mut()
                    .insert(header::SEC_WEBSOCKET_ACCEPT, wrong);
            }
            Some(Fault::UnrequestedSubprotocol) => {
                let unrequested = HeaderValue::from_static(UNREQUESTED_SUBPROTOCOL);
                response
                    .headers_mut()
                    .insert(header::SEC_WEBSOCKET_PROTOCOL, unrequested);
            }
            _ => {}
        }
        Box::new(Asked { controls, summary })
    });
    let id = state.echo.next_id();
    let greeting = hello::requested(request.uri().query()).then(|| {
        let summary = asked.as_ref().map_or("", |asked| asked.summary.as_str());
        hello::message(
            &request,
            peer,
            &accepted,
            id,
            &state.settings.instance_name,
            (summary, state.settings.controls),
        )
    });
    let span = info_span!("ws", id, peer = %peer.map_or_else(|| "-".into(), |p| p.to_string()), http_version = ?request.version());
    // Only what the connection needs from here on goes into its task: an async fn
    // keeps its arguments for its whole life.
    let handshake::Accepted {
        subprotocol,
        extensions,
        ..
    } = accepted;
    let deflate = extensions.map(|agreed| agreed.params);
    // One async fn is the whole task: an `async` block around a call would keep a
    // second slot for every value it moves in, per idle connection.
    //
    // Entering a span costs ~290 instructions per poll (the registry's span stack and
    // the filter's bookkeeping), a tenth of an echo (callgrind W1). Past the handshake
    // the loop and the engine log only at debug and trace levels, so unless one of
    // those is on anywhere, the task runs outside its span and enters it only for its
    // own log lines; the output is the same.
    if tracing::level_filters::LevelFilter::current() >= tracing::Level::DEBUG {
        state.tracker.spawn(
            serve(
                on_upgrade,
                (subprotocol, deflate, asked),
                greeting,
                state.clone(),
                (admission, in_progress),
                Span::none(),
            )
            .instrument(span),
        );
    } else {
        state.tracker.spawn(serve(
            on_upgrade,
            (subprotocol, deflate, asked),
            greeting,
            state.clone(),
            (admission, in_progress),
            span,
        ));
    }
    response
}

/// Where the connection's stream will come from once the answer is sent.
enum Upgrade {
    Http1(OnUpgrade),
    Http2(OnTunnel),
}

/// The stream a WebSocket runs on.
enum Stream {
    Http1(Upgraded),
    Http2(Tunnel),
}

/// Runs one WebSocket to its end and logs the result. Its log lines are written in
/// `span`, which is `Span::none()` when the whole task runs in the connection's span.
async fn serve(
    on_upgrade: Upgrade,
    (subprotocol, deflate, asked): (Option<String>, Option<Params>, Option<Box<Asked>>),
    greeting: Option<String>,
    state: AppState,
    // Held for the task's life: they keep this connection's places under the caps.
    _places: (Admission, Option<Active>),
    span: Span,
) {
    let upgraded = match on_upgrade {
        Upgrade::Http1(on_upgrade) => match on_upgrade.await {
            Ok(upgraded) => Stream::Http1(upgraded),
            Err(error) => {
                span.in_scope(|| debug!(%error, "upgrade did not complete"));
                return;
            }
        },
        Upgrade::Http2(on_tunnel) => match on_tunnel.stream().await {
            Some(tunnel) => Stream::Http2(tunnel),
            None => {
                span.in_scope(|| debug!("HTTP/2 stream gone before the upgrade completed"));
                return;
            }
        },
    };
    let started = Instant::now();
    let compressed = deflate.is_some();
    span.in_scope(|| {
        info!(
            subprotocol = subprotocol.as_deref().unwrap_or("-"),
            compressed,
            controls = asked.as_ref().map_or("-", |asked| asked.summary.as_str()),
            "connection opened"
        );
    });
    state.metrics.connections_open.inc();
    let mut echo = Echo::new(&state.counters, compressed);
    // The connection's own rules when a control changes them (`ping`, `read_rate`).
    let mut rules = None;
    if let Some(asked) = asked.filter(|asked| asked.controls.shape_the_connection()) {
        let controls = asked.controls;
        rules = Some(Box::new(
            state
                .echo
                .rules()
                .with_controls(controls.ping, controls.read_rate),
        ));
        echo = echo.with_controls(Controlled::new(
            controls,
            compressed,
            Instant::now(),
            id_seed(),
        ));
    }
    let rules = rules.as_deref().unwrap_or(state.echo.rules());
    // A plain TCP connection (HTTP/1.1) is driven on the socket itself (behind the
    // rewind layer of its first bytes), without the trait object that hyper wraps an
    // upgraded stream in: echo_load W1, ~400 fewer instructions per echo. So is
    // HTTP/1.1 over TLS, on its TLS stream, and HTTP/2 on its own stream.
    let setup = Setup {
        state: &state,
        rules,
        deflate,
        greeting,
        echo: &mut echo,
    };
    let ending = match upgraded {
        Stream::Http1(upgraded) => match upgraded.downcast::<TokioIo<Rewind<TcpStream>>>() {
            Ok(parts) => drive(parts.io.into_inner(), parts.read_buf, setup).await,
            // Boxed: a task is as large as its largest await, and what a match looks at
            // lives across the awaits of its arms; a TLS stream is kilobytes (echo_load
            // W4: 23.0 KiB per idle connection with this inline, 18.0 with only its
            // drive boxed).
            Err(upgraded) => Box::pin(drive_tls_or_other(upgraded, setup)).await,
        },
        Stream::Http2(tunnel) => Box::pin(drive(tunnel, Bytes::new(), setup)).await,
    };
    state.metrics.connections_open.dec();
    let stats = std::mem::take(&mut echo.stats);
    drop(echo);
    let duration_ms = started.elapsed().as_millis() as u64;
    let subprotocol = subprotocol.as_deref().unwrap_or("-");
    let (code, how, detail) = match &ending {
        Ending::ClientClosed(code) => (*code, "client closed", String::new()),
        Ending::ServerClosed(code, reason, _) => (*code, "server closed", reason.to_string()),
        Ending::ProtocolError(violation) => (
            violation.close_code(),
            "protocol error",
            violation.reason().to_owned(),
        ),
        Ending::Dropped(reason) => (1006, "dropped", reason.clone()),
    };
    let side = match &ending {
        Ending::ClientClosed(_) => Side::Client,
        Ending::ServerClosed(..) | Ending::ProtocolError(..) => Side::Server,
        Ending::Dropped(_) => Side::None,
    };
    state.metrics.close(side, code);
    match &ending {
        Ending::ServerClosed(_, _, Some(limit)) => state.metrics.limit_drop(*limit),
        Ending::ProtocolError(violation) if violation.close_code() == 1009 => {
            state.metrics.limit_drop(Limit::MessageSize);
        }
        _ => {}
    }
    span.in_scope(|| {
        info!(
            duration_ms,
            messages_in = stats.messages_in,
            bytes_in = stats.bytes_in,
            messages_out = stats.messages_out,
            bytes_out = stats.bytes_out,
            close_code = code,
            subprotocol,
            compressed,
            detail = %detail,
            "connection closed: {how}"
        );
    });
}

/// Runs an HTTP/1.1 connection that is not plain TCP. On the TLS port it is driven on
/// the TLS stream itself, which knows its socket (a client that leaves while waiting
/// is noticed; `drop` resets); any other stream (`Server::spawn_connection`) keeps
/// hyper's wrapper.
async fn drive_tls_or_other(upgraded: Upgraded, setup: Setup<'_, '_, '_>) -> Ending {
    match upgraded.downcast::<TokioIo<Rewind<TlsStream<TcpStream>>>>() {
        Ok(parts) => drive(parts.io.into_inner(), parts.read_buf, setup).await,
        Err(upgraded) => drive(TokioIo::new(upgraded), Bytes::new(), setup).await,
    }
}

/// What [`drive`] runs a connection with, whatever its stream.
struct Setup<'s, 'e, 'c> {
    state: &'s AppState,
    /// The shared rules, or the connection's own when a control changes them.
    rules: &'s Rules,
    deflate: Option<Params>,
    greeting: Option<String>,
    echo: &'e mut Echo<'c>,
}

/// Runs the connection on `io` with the echo policy; `early` holds what the client sent
/// right after its handshake, read before the upgrade completed.
async fn drive<S: Transport>(io: S, early: Bytes, setup: Setup<'_, '_, '_>) -> Ending {
    let Setup {
        state,
        rules,
        deflate,
        greeting,
        echo,
    } = setup;
    let config = &state.echo;
    let mut driver = Driver::new(
        io,
        &state.metrics,
        deflate.is_some().then_some(&state.counters.deflate_wire),
        Receiver::new(config.limits(), deflate),
        Sender::new(deflate),
        rules,
        &state.budget,
    );
    // The greeting, when asked for, goes out before any echo.
    if let Some(greeting) = greeting {
        let (sender, outbox) = driver.sending();
        sender.message(Kind::Text, Payload::Slice(greeting.as_bytes()), outbox);
    }
    if !early.is_empty() {
        driver.receive_early(&early, echo);
    }
    // Released before the connection settles in: `early` is a view of hyper's whole
    // read buffer, which it would otherwise keep for the connection's life (echo_load
    // W4: 16.5 KiB per idle connection with it held, ~4 without).
    drop(early);
    driver.run(echo, &state.shutdown).await
}

/// A seed for a connection's jitter: the clock's nanoseconds, different enough between
/// connections for delays that only need to look random.
fn id_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |elapsed| elapsed.as_nanos() as u64)
}
