//! `GET /ws`: checks the upgrade, answers it, and runs the connection in a task of its
//! own: the protocol core (`ws::connection`) driven by `ws::driver` with the echo
//! policy (`ws::echo`), one span and one closing log line per connection.

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use std::sync::Arc;

use hyper_util::{rt::TokioIo, server::conn::auto};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use super::{
    hello,
    limits::{Admission, Full},
    state::{AppState, PeerAddr},
    tcp::{Active, Slot},
};
use crate::{
    metrics::{HandshakeResult, Limit, Side},
    ws::{
        connection::{Kind, Receiver, Sender},
        deflate::Params,
        driver::{Driver, Ending, Transport},
        echo::Echo,
        handshake,
        outbox::Payload,
    },
};

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
    let on_upgrade = hyper::upgrade::on(&mut request);
    let mut accepted = accepted;
    let response = accepted.response();
    accepted.forget_accept_key();
    let id = state.echo.next_id();
    let greeting = hello::requested(request.uri().query())
        .then(|| hello::message(&request, peer, &accepted, id, &state.settings.instance_name));
    let span = info_span!("ws", id, peer = %peer.map_or_else(|| "-".into(), |p| p.to_string()), http_version = ?request.version());
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
                accepted,
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
            accepted,
            greeting,
            state.clone(),
            (admission, in_progress),
            span,
        ));
    }
    response
}

/// Runs one WebSocket to its end and logs the result. Its log lines are written in
/// `span`, which is `Span::none()` when the whole task runs in the connection's span.
async fn serve(
    on_upgrade: hyper::upgrade::OnUpgrade,
    accepted: handshake::Accepted,
    greeting: Option<String>,
    state: AppState,
    places: (Admission, Option<Active>),
    span: Span,
) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            span.in_scope(|| debug!(%error, "upgrade did not complete"));
            return;
        }
    };
    // Holding them keeps this connection's places under the caps.
    let _places = places;
    let started = Instant::now();
    // Only what the connection needs from here on is kept (the task carries every
    // local that lives across its awaits, for its whole life).
    let handshake::Accepted {
        subprotocol,
        extensions,
        ..
    } = accepted;
    let deflate = extensions.map(|agreed| agreed.params);
    let compressed = deflate.is_some();
    span.in_scope(|| {
        info!(
            subprotocol = subprotocol.as_deref().unwrap_or("-"),
            compressed, "connection opened"
        );
    });
    state.metrics.connections_open.inc();
    let mut echo = Echo::new(&state.counters, compressed);
    // A plain TCP connection (HTTP/1.1) is driven on the socket itself, without the
    // two rewind layers and the trait object that hyper and hyper-util wrap an upgraded
    // stream in: echo_load W1, ~400 fewer instructions per echo. TLS and HTTP/2
    // streams, and the in-memory streams of tests, keep the wrapper.
    let ending = match auto::upgrade::downcast::<TokioIo<TcpStream>>(upgraded) {
        Ok(parts) => {
            let early = parts.read_buf;
            drive(
                parts.io.into_inner(),
                &early,
                &state,
                deflate,
                greeting,
                &mut echo,
            )
            .await
        }
        Err(upgraded) => {
            drive(
                TokioIo::new(upgraded),
                &[],
                &state,
                deflate,
                greeting,
                &mut echo,
            )
            .await
        }
    };
    state.metrics.connections_open.dec();
    let stats = std::mem::take(&mut echo.stats);
    drop(echo);
    let duration_ms = started.elapsed().as_millis() as u64;
    let subprotocol = subprotocol.as_deref().unwrap_or("-");
    let (code, how, detail) = match &ending {
        Ending::ClientClosed(code) => (*code, "client closed", String::new()),
        Ending::ServerClosed(code, reason, _) => (*code, "server closed", (*reason).to_owned()),
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

/// Runs the connection on `io` with the echo policy; `early` holds what the client sent
/// right after its handshake, read before the upgrade completed.
async fn drive<S: Transport>(
    io: S,
    early: &[u8],
    state: &AppState,
    deflate: Option<Params>,
    greeting: Option<String>,
    echo: &mut Echo<'_>,
) -> Ending {
    let config = &state.echo;
    let mut driver = Driver::new(
        io,
        &state.metrics,
        deflate.is_some().then_some(&state.counters.deflate_wire),
        Receiver::new(config.limits(), deflate),
        Sender::new(deflate),
        config.rules(),
        &state.budget,
    );
    // The greeting, when asked for, goes out before any echo.
    if let Some(greeting) = greeting {
        let (sender, outbox) = driver.sending();
        sender.message(Kind::Text, Payload::Slice(greeting.as_bytes()), outbox);
    }
    if !early.is_empty() {
        driver.receive_early(early, echo);
    }
    driver.run(echo, &state.shutdown).await
}
