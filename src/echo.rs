//! `GET /ws`: the upgrade and the per-connection echo loop.
//!
//! This is the only module that knows the WebSocket engine (yawc 0.5). The handshake is
//! decided in `handshake` and answered by us; the upgraded stream goes through
//! `frame_guard` and is then handed to the engine with the extension string both sides
//! agreed to. We drive the engine at its frame level (`Streaming`): it parses and
//! unmasks frames, inflates and deflates, answers Pings, echoes Close, and sends the
//! right Close for every frame-level error. Its message level is not used, because it
//! fails on invalid text or fragments without sending any Close; `assembly` does that
//! part instead.
//!
//! On uncompressed connections most echoes never reach this loop: the frame guard
//! echoes whole small messages where it reads them (`fast_echo`), and the loop puts the
//! echoes of the messages the engine delivers in the same output queue, behind them.
//!
//! The loop writes echoes without flushing while more input is already buffered, and
//! flushes once when the next read would wait: one `write` per wake-up instead of one
//! per message, the lever for pipelined traffic. When the client does not read, the
//! engine's write buffer reaches `write_buffer_limit`, the pending echo cannot be
//! queued, and the loop stops reading that client: TCP backpressure, bounded memory.

use std::{
    future::poll_fn,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
    time::Duration,
};

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::{FutureExt, SinkExt};
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{Instrument, Span, debug, info, info_span, trace, warn};
use yawc::{
    CompressionLevel, DeflatePool, Frame, OpCode, Options, Role, WebSocket, WebSocketError,
    close::CloseCode, streaming::Streaming,
};

use crate::{
    app::{AppState, PeerAddr},
    assembly::{Assembler, Failure, Kind, Part},
    config::Settings,
    fast_echo::Echoed,
    frame_guard::{self, GuardHandle, Lane},
    handshake, hello,
    limits::{Admission, Full},
    metrics::{EchoCounters, HandshakeResult, Limit, Metrics, Side},
    waits::{Waits, Woken},
};

/// Longest text payload shown in a debug log line; longer ones are shortened.
const LOGGED_TEXT_CHARS: usize = 64;

/// Initial (and resting) size of each connection's read buffer, in bytes. Every idle
/// connection holds it, and the engine shrinks back to it after a larger frame, so it
/// trades idle memory against reads per large message. Measured with
/// `cargo bench --bench echo_load -- --quick W4 W2` (2026-11-25, after the task-size
/// fixes in this file): 256 B gave 3.71 KiB per idle connection and W2 at 0.70x the
/// baseline's CPU per message; 384 B gives 3.88 KiB and 0.65x; 512 B about 3.96 KiB.
const READ_BUFFER_CAPACITY: usize = 384;

/// Engine settings shared by every connection: built once from [`Settings`].
#[derive(Debug)]
pub(crate) struct EchoConfig {
    /// Options handed to each new WebSocket; cloning shares the deflate pool.
    options: Options,
    /// Connection ids for logs, counted from 1.
    next_id: AtomicU64,
}

impl EchoConfig {
    /// Engine options for `settings`. The two engine defaults that are unsafe for a
    /// server are set explicitly: UTF-8 validation of text (off by default) and the size
    /// limits (64 MiB frames and 128 MiB messages by default).
    pub(crate) fn new(settings: &Settings) -> Self {
        let mut options = Options::default()
            .with_utf8()
            // The engine refuses a frame whose length (or inflated length) is >= this,
            // and we allow equal. Messages are limited by `assembly`.
            .with_max_payload_read(settings.max_frame_size.saturating_add(1))
            .with_backpressure_boundary(settings.write_buffer_limit)
            // No write buffer until the first echo: the engine's 8 KiB default sat
            // unused in every idle connection. The buffer grows to the size echoes need
            // and keeps it (up to the backpressure boundary), so busy connections do not
            // pay for this. echo_load W4: 14.4 -> 8.4 KiB RSS per idle connection at
            // 10,000; W1-W3 CPU per message unchanged (benches/README.md).
            .with_write_buffer_capacity(0)
            // The read buffer is also the size of each read, and yawc shrinks it back
            // to this after every larger frame, so this trades idle memory against
            // reads of big messages. echo_load, 8 KiB -> 512 B: W4 7.30 -> 3.81 KiB
            // RSS per idle connection at 10,000; W2 (16 KiB) CPU per message +5%
            // (8.33 -> 8.79 us), W1, W1p, W3 unchanged. 512 B holds a 16-deep
            // pipeline of small messages in one read (W1p).
            .with_read_buffer_capacity(READ_BUFFER_CAPACITY)
            .without_compression();
        if settings.compression.enabled {
            options = options
                .with_compression_level(CompressionLevel::new(settings.compression.level))
                .with_compression_threshold(settings.compression.threshold)
                // Compressor state is taken from the pool for one message at a time
                // (we always answer server_no_context_takeover), so idle connections
                // hold none. Capacity: one per core is all that can be busy at once.
                .with_deflate_pool(DeflatePool::new(
                    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2,
                ));
        }
        Self {
            options,
            next_id: AtomicU64::new(1),
        }
    }

    #[cfg(test)]
    fn options(&self) -> &Options {
        &self.options
    }
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
    let on_upgrade = hyper::upgrade::on(&mut request);
    let mut accepted = accepted;
    let response = accepted.response();
    accepted.forget_accept_key();
    let id = state.echo.next_id.fetch_add(1, Ordering::Relaxed);
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
                admission,
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
            admission,
            span,
        ));
    }
    response
}

/// Counts of one connection, for its closing log line.
#[derive(Debug, Default)]
struct Stats {
    messages_in: u64,
    bytes_in: u64,
    messages_out: u64,
    bytes_out: u64,
}

/// How a connection ended.
#[derive(Debug)]
enum Ending {
    /// The client sent Close; its code (1005 when it gave none) was echoed.
    ClientClosed(u16),
    /// The server sent Close with this code and the handshake finished or timed out;
    /// `Some` limit when a limit made it close.
    ServerClosed(u16, &'static str, Option<Limit>),
    /// The engine refused the client's input and sent this close code.
    ProtocolError(u16, String),
    /// The TCP connection ended without a closing handshake.
    Dropped(String),
}

/// Runs one WebSocket to its end and logs the result. Its log lines are written in
/// `span`, which is `Span::none()` when the whole task runs in the connection's span.
async fn serve(
    on_upgrade: hyper::upgrade::OnUpgrade,
    accepted: handshake::Accepted,
    greeting: Option<String>,
    state: AppState,
    admission: Admission,
    span: Span,
) {
    let io = match on_upgrade.await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(error) => {
            span.in_scope(|| debug!(%error, "upgrade did not complete"));
            return;
        }
    };
    // Holding the admission keeps this connection's place under the caps.
    let _admission = admission;
    let started = Instant::now();
    let compressed = accepted.extensions.is_some();
    let wire_counters = compressed.then(|| frame_guard::WireCounters {
        read: state.counters.deflate_in.1.clone(),
        written: state.counters.deflate_out.1.clone(),
    });
    // Uncompressed connections echo whole small messages in the guard (`fast_echo`),
    // except at debug level, where every message is logged here.
    let lane = (!compressed && !tracing::enabled!(tracing::Level::DEBUG)).then(|| Lane {
        max_payload: state
            .settings
            .max_frame_size
            .min(state.settings.max_message_size),
        write_limit: state.settings.write_buffer_limit,
    });
    let uses_queue = lane.is_some();
    let (io, guard) = frame_guard::guard(io, Arc::clone(&state.read_budget), wire_counters, lane);
    let mut ws = match WebSocket::from_stream_with_extensions(
        io,
        Role::Server,
        accepted.extensions.as_deref(),
        state.echo.options.clone(),
    ) {
        Ok(ws) => ws.into_streaming(),
        Err(error) => {
            // Unreachable with our own negotiation: the options enable compression
            // whenever we agree to it. Logged, not panicked, all the same.
            span.in_scope(|| warn!(%error, "engine refused the negotiated extensions"));
            return;
        }
    };
    span.in_scope(|| {
        info!(
            subprotocol = accepted.subprotocol.as_deref().unwrap_or("-"),
            compressed, "connection opened"
        );
    });
    let mut stats = Stats::default();
    state.metrics.connections_open.inc();
    // The loop is built inside a block: rustc keeps the slot of a local that was
    // borrowed (the field assignment borrows it) across an await until its scope ends,
    // even after the value has moved, and the connection would carry a dead copy of
    // the loop for its whole life (232 bytes; echo_load W4).
    let ending = {
        let mut echo_loop = EchoLoop::new(
            &state.settings,
            guard,
            &state.metrics,
            &state.counters,
            compressed,
            uses_queue,
        );
        // The greeting, when asked for, goes out before any echo.
        echo_loop.pending = greeting.map(Frame::text);
        echo_loop.run(&mut ws, &mut stats, &state.shutdown)
    }
    .await;
    state.metrics.connections_open.dec();
    let duration_ms = started.elapsed().as_millis() as u64;
    let subprotocol = accepted.subprotocol.as_deref().unwrap_or("-");
    let (code, how, detail) = match &ending {
        Ending::ClientClosed(code) => (*code, "client closed", String::new()),
        Ending::ServerClosed(code, reason, _) => (*code, "server closed", (*reason).to_owned()),
        Ending::ProtocolError(code, reason) => (*code, "protocol error", reason.clone()),
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
        Ending::ProtocolError(1009, _) => state.metrics.limit_drop(Limit::MessageSize),
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

/// What the loop does after a frame.
enum Next {
    /// Read on (a data frame was taken, its echo is pending if it finished a message).
    Continue,
    /// A control frame, handled by `on_control_frame`.
    Control(Frame),
    /// `assembly` refused the message: close with this code and reason.
    Refuse(Failure),
}

/// What woke the echo loop.
enum Event {
    /// The engine produced a frame or an error.
    Frame(Result<Frame, WebSocketError>),
    /// Writing or flushing failed: the peer is gone.
    WriteFailed(WebSocketError),
    /// The frame guard stopped the stream.
    Refused(frame_guard::Refusal),
    /// Shutdown began.
    Shutdown,
    /// The keepalive or idle timer fired.
    Timer,
}

impl From<Woken> for Event {
    fn from(woken: Woken) -> Self {
        match woken {
            Woken::Shutdown => Event::Shutdown,
            Woken::Timer => Event::Timer,
        }
    }
}

/// The state of one connection's echo loop.
struct EchoLoop<'a> {
    settings: &'a Settings,
    /// Keepalive counters and the ping round-trip histogram.
    metrics: &'a Metrics,
    /// Message counters, resolved once per server.
    counters: &'a EchoCounters,
    /// Whether permessage-deflate was negotiated (for the compression-ratio counters).
    compressed: bool,
    /// Whether data echoes go to the guard's output queue (uncompressed connections,
    /// see `fast_echo`) instead of the engine's write buffer.
    uses_queue: bool,
    /// The frame guard's refusals and the read budget.
    guard: GuardHandle,
    /// Reassembles fragmented messages and validates text.
    assembler: Assembler,
    /// An echo (or ping) that did not fit in the write buffer yet. While it waits, the
    /// loop reads nothing more from the client: that is the backpressure.
    pending: Option<Frame>,
    /// Frames were queued since the last flush.
    unflushed: bool,
    /// Since when `pending` has been waiting for a client that does not read.
    stalled_since: Option<Instant>,
    /// When the last message arrived, for the idle timeout.
    last_message: Instant,
    /// When the next keepalive ping is due.
    next_ping: Option<Instant>,
    /// The outstanding ping: its payload and when it was sent.
    awaiting_pong: Option<(u64, Instant)>,
    /// Pings sent so far; the next ping's payload.
    pings_sent: u64,
    /// Echoes counted here and not yet added to the shared metrics.
    unpublished: Unpublished,
}

/// Whatever way the loop ends, its last echoes are counted.
impl Drop for EchoLoop<'_> {
    fn drop(&mut self) {
        self.publish_counts();
    }
}

/// Message and byte counts of one connection that the shared counters have not seen
/// yet, indexed by [`Kind`] (text, binary).
///
/// The shared counters are atomics that every connection adds to: four locked adds per
/// echo, cheap in instructions but not in cycles, and each moves a cache line between
/// cores when connections run on several. The echo loop adds up its echoes here and
/// publishes them once per wake-up, before the flush that sends those echoes, so a
/// client that has its echo can already read it in `/metrics`.
#[derive(Debug, Default)]
struct Unpublished {
    messages: [u32; 2],
    bytes: [u64; 2],
}

impl Unpublished {
    fn add(&mut self, kind: Kind, messages: u64, bytes: u64) {
        let index = match kind {
            Kind::Text => 0,
            Kind::Binary => 1,
        };
        // Published at least once per wake-up, which reads at most the read buffer.
        self.messages[index] += messages as u32;
        self.bytes[index] += bytes;
    }

    /// Adds the counts to the shared counters and starts again from zero.
    fn publish(&mut self, counters: &EchoCounters, compressed: bool) {
        let [text, binary] = std::mem::take(&mut self.messages);
        if text == 0 && binary == 0 {
            return;
        }
        let [text_bytes, binary_bytes] = std::mem::take(&mut self.bytes);
        for (messages, bytes, counted_in, counted_out) in [
            (text, text_bytes, &counters.text_in, &counters.text_out),
            (
                binary,
                binary_bytes,
                &counters.binary_in,
                &counters.binary_out,
            ),
        ] {
            if messages > 0 {
                counted_in.messages.inc_by(u64::from(messages));
                counted_in.bytes.inc_by(bytes);
                counted_out.messages.inc_by(u64::from(messages));
                counted_out.bytes.inc_by(bytes);
            }
        }
        if compressed {
            counters.deflate_in.0.inc_by(text_bytes + binary_bytes);
            counters.deflate_out.0.inc_by(text_bytes + binary_bytes);
        }
    }
}

impl<'a> EchoLoop<'a> {
    fn new(
        settings: &'a Settings,
        guard: GuardHandle,
        metrics: &'a Metrics,
        counters: &'a EchoCounters,
        compressed: bool,
        uses_queue: bool,
    ) -> Self {
        let now = Instant::now();
        Self {
            settings,
            metrics,
            counters,
            compressed,
            uses_queue,
            guard,
            assembler: Assembler::new(settings.max_message_size),
            pending: None,
            unflushed: false,
            stalled_since: None,
            last_message: now,
            next_ping: settings.ping_interval.map(|interval| now + interval),
            awaiting_pong: None,
            pings_sent: 0,
            unpublished: Unpublished::default(),
        }
    }

    /// Adds the echoes counted since the last call to the shared metrics.
    fn publish_counts(&mut self) {
        self.unpublished.publish(self.counters, self.compressed);
    }

    /// Counts what the guard echoed in its fast lane since the last call. Returns
    /// whether echoes wait in the guard's queue, and whether the guard stopped reading
    /// because the client does not take them.
    fn take_lane_echoes(&mut self, stats: &mut Stats) -> (bool, bool) {
        if !self.uses_queue {
            return (false, false);
        }
        let (echoed, queued, stalled) = self.guard.take_echoed();
        let Echoed { text, binary } = echoed;
        for (kind, (messages, bytes)) in [(Kind::Text, text), (Kind::Binary, binary)] {
            if messages > 0 {
                self.count_echoes(stats, kind, messages, bytes);
            }
        }
        (queued, stalled)
    }

    /// Counts `messages` echoed messages of `kind` carrying `bytes` payload bytes, for
    /// the closing log line and the metrics, and notes the activity for the idle timeout.
    fn count_echoes(&mut self, stats: &mut Stats, kind: Kind, messages: u64, bytes: u64) {
        stats.messages_in += messages;
        stats.bytes_in += bytes;
        stats.messages_out += messages;
        stats.bytes_out += bytes;
        self.unpublished.add(kind, messages, bytes);
        if self.settings.idle_timeout.is_some() {
            // Reading the clock costs ~40 instructions per echo; only the idle timeout
            // needs it.
            self.last_message = Instant::now();
        }
    }

    /// Starts the stall timeout, if one is set and not already running: the client does
    /// not take its echoes, so the loop has stopped reading from it.
    fn note_stall(&mut self, waits: &mut Waits<'_, '_>) {
        if self.stalled_since.is_none() && self.settings.stall_timeout.is_some() {
            trace!("client is not reading its echoes; reading paused");
            self.stalled_since = Some(Instant::now());
            waits.reset_timer(self.next_deadline());
        }
    }

    /// Hands `pending` to the guard's queue (data echoes of an uncompressed connection)
    /// or to the engine. Pending, with `pending` kept, while there is no room.
    fn poll_send_pending<S>(
        &mut self,
        ws: &mut Streaming<S>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<(), WebSocketError>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let kind = match self.pending.as_ref().map(Frame::opcode) {
            None => return Poll::Ready(Ok(())),
            Some(OpCode::Text) => Some(Kind::Text),
            Some(OpCode::Binary) => Some(Kind::Binary),
            Some(_) => None,
        };
        // Pongs the engine owes go out first (`poll_ready` writes them), as they would
        // if the echo went through the engine: a Ping that came before the end of this
        // message is answered before its echo (Autobahn 5.x). Pending with `pending`
        // kept while there is no room.
        if let Err(error) = std::task::ready!(ws.poll_ready_unpin(cx)) {
            return Poll::Ready(Err(error));
        }
        let frame = self
            .pending
            .take()
            .expect("invariant: checked to be Some above, and nothing took it since");
        match kind {
            Some(kind) if self.uses_queue => {
                let limit = self.settings.write_buffer_limit;
                loop {
                    if self.guard.queue_message(kind, frame.payload(), limit) {
                        return Poll::Ready(Ok(()));
                    }
                    // The queue is full: flushing the engine's stream writes it out.
                    match ws.poll_flush_unpin(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                        Poll::Pending => {
                            self.pending = Some(frame);
                            return Poll::Pending;
                        }
                    }
                }
            }
            _ => Poll::Ready(ws.start_send_unpin(frame)),
        }
    }

    /// The earliest instant a timer needs the loop's attention.
    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let pong = self
            .awaiting_pong
            .map(|(_, sent)| sent + self.settings.ping_timeout);
        let idle = self
            .settings
            .idle_timeout
            .map(|idle| self.last_message + idle);
        let stall = self
            .stalled_since
            .zip(self.settings.stall_timeout)
            .map(|(since, limit)| since + limit);
        [self.next_ping, pong, idle, stall]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(far)
    }

    async fn run<S>(
        mut self,
        ws: &mut Streaming<S>,
        stats: &mut Stats,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Ending
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let ending = self.echo_until_the_end(ws, stats, shutdown).await;
        // What the guard echoed in the last reads, such as those before a Close.
        self.take_lane_echoes(stats);
        ending
    }

    async fn echo_until_the_end<S>(
        &mut self,
        ws: &mut Streaming<S>,
        stats: &mut Stats,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Ending
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let timer = sleep_until(self.next_deadline());
        tokio::pin!(timer);
        let mut waits = Waits::new(shutdown, cancelled, timer);
        // A task is as large as its largest await, for all of its life. The closing
        // paths (`Box::pin` here and in `on_frame` and `on_timer`) are boxed so that
        // their state is allocated when a connection closes instead of being carried
        // by every idle one: the task shrinks from 2,448 to 2,056 bytes.
        loop {
            let event = self.next_event(ws, stats, &mut waits).await;
            match event {
                Event::Frame(Ok(frame)) => match self.on_frame(frame, stats) {
                    Next::Continue => {}
                    Next::Control(frame) => {
                        if let Some(ending) = Box::pin(self.on_control_frame(ws, frame)).await {
                            return ending;
                        }
                    }
                    Next::Refuse(failure) => return Box::pin(self.refuse(ws, failure)).await,
                },
                Event::Frame(Err(error)) => {
                    return Box::pin(self.on_engine_error(ws, error)).await;
                }
                Event::WriteFailed(error) => return Ending::Dropped(error.to_string()),
                Event::Refused(refusal) => {
                    let (code, reason) = (refusal.close_code(), refusal.reason());
                    debug!(code, reason, "frame refused");
                    self.guard.stop_echoes();
                    let _ = Box::pin(timeout(
                        self.settings.close_timeout,
                        ws.send(Frame::close(CloseCode::from(code), reason)),
                    ))
                    .await;
                    return Ending::ProtocolError(code, reason.to_owned());
                }
                Event::Shutdown => return Box::pin(self.drain_and_close(ws, stats)).await,
                Event::Timer => {
                    if let Some(ending) = self.on_timer(ws).await {
                        return ending;
                    }
                    waits.reset_timer(self.next_deadline());
                }
            }
        }
    }

    /// Waits for the next thing to do, writing and flushing along the way.
    async fn next_event<S>(
        &mut self,
        ws: &mut Streaming<S>,
        stats: &mut Stats,
        waits: &mut Waits<'_, '_>,
    ) -> Event
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        // Shutdown is checked only where the loop would wait, not before every frame: a
        // connection with input buffered echoes it first, which the drain does anyway,
        // and the runtime's cooperative budget makes even a flooding client's read wait
        // now and then.
        poll_fn(|cx| {
            if self.pending.is_some() {
                match self.poll_send_pending(ws, cx) {
                    Poll::Ready(Ok(())) => {
                        self.unflushed = true;
                        self.stalled_since = None;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Event::WriteFailed(error)),
                    Poll::Pending => {
                        // The client is not reading: neither do we.
                        self.publish_counts();
                        self.note_stall(waits);
                        return waits.poll(cx).map(Event::from);
                    }
                }
            }
            if let Poll::Ready(result) = ws.poll_next_frame(cx) {
                return Poll::Ready(Event::Frame(result));
            }
            // Frames before a refused header are echoed first: the guard passes them on
            // and only then stops the stream.
            if let Some(refusal) = self.guard.occurred() {
                return Poll::Ready(Event::Refused(refusal));
            }
            let (queued, stalled) = self.take_lane_echoes(stats);
            self.unflushed |= queued;
            if stalled {
                self.note_stall(waits);
            } else if self.pending.is_none() {
                self.stalled_since = None;
            }
            // Everything buffered is read: count it before its echoes go out.
            self.publish_counts();
            if self.unflushed {
                match ws.poll_flush_unpin(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = false,
                    Poll::Ready(Err(error)) => return Poll::Ready(Event::WriteFailed(error)),
                    Poll::Pending => {}
                }
            }
            if !self.unflushed && !self.assembler.in_progress() {
                // Everything read so far is echoed and written out: its bytes no longer
                // count against the read budget.
                self.guard.release_delivered();
            }
            waits.poll(cx).map(Event::from)
        })
        .await
    }

    /// Handles one frame from the engine. Data frames are handled here, without an
    /// `await`: a plain function costs no future to build and drop per frame (on_frame
    /// was an async fn: 144 instructions per echo, callgrind W1p).
    fn on_frame(&mut self, frame: Frame, stats: &mut Stats) -> Next {
        let part = match frame.opcode() {
            OpCode::Text => Part::First(Kind::Text),
            OpCode::Binary => Part::First(Kind::Binary),
            OpCode::Continuation => Part::Continuation,
            _ => return Next::Control(frame),
        };
        let fin = frame.is_fin();
        match self.assembler.push(part, fin, frame.into_payload()) {
            Ok(None) => Next::Continue,
            Ok(Some((kind, payload))) => {
                self.count_echoes(stats, kind, 1, payload.len() as u64);
                log_message(kind, &payload);
                // The echo is one frame, and its payload is shared with the received
                // message, not copied.
                self.pending = Some(match kind {
                    Kind::Text => Frame::text(payload),
                    Kind::Binary => Frame::binary(payload),
                });
                Next::Continue
            }
            Err(failure) => Next::Refuse(failure),
        }
    }

    /// Closes the connection over a message `assembly` refused.
    async fn refuse<S>(&mut self, ws: &mut Streaming<S>, failure: Failure) -> Ending
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        debug!(
            code = failure.code,
            reason = failure.reason,
            "refusing message"
        );
        let code = CloseCode::from(failure.code);
        match self.close(ws, code, failure.reason).await {
            Ending::Dropped(detail) => Ending::Dropped(detail),
            _ => Ending::ProtocolError(failure.code, failure.reason.to_owned()),
        }
    }

    /// Ping, Pong and Close; `Some` when the connection is over.
    async fn on_control_frame<S>(&mut self, ws: &mut Streaming<S>, frame: Frame) -> Option<Ending>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        match frame.opcode() {
            // The engine has already queued the Pong; a Ping is not echoed as data. The
            // Pong is written now if the socket has room (`poll_ready` writes what the
            // engine owes), so that echoes the guard makes of later messages do not
            // overtake it.
            OpCode::Ping => {
                let _ = poll_fn(|cx| match ws.poll_ready_unpin(cx) {
                    Poll::Pending => Poll::Ready(Ok(())),
                    ready => ready,
                })
                .await;
                None
            }
            OpCode::Pong => {
                if let Some((sent_payload, sent_at)) = self.awaiting_pong {
                    if frame.payload().as_ref() == sent_payload.to_be_bytes() {
                        let rtt = sent_at.elapsed();
                        trace!(rtt_us = rtt.as_micros() as u64, "pong");
                        self.metrics.ping_rtt.observe(rtt.as_secs_f64());
                        self.awaiting_pong = None;
                    }
                }
                None
            }
            OpCode::Close => {
                // The engine queued the echo of this Close behind every echo already
                // queued; flush it, then the server closes TCP first (§7.1.1).
                let code = frame.close_code().map_or(1005, u16::from);
                flush_engine_close(ws, self.settings.close_timeout).await;
                Some(Ending::ClientClosed(code))
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => None,
        }
    }

    /// The engine refused input (it has queued a Close with the matching code) or the
    /// peer went away.
    async fn on_engine_error<S>(&mut self, ws: &mut Streaming<S>, error: WebSocketError) -> Ending
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        // The engine has queued (or the peer has made moot) the last frame we send.
        self.guard.stop_echoes();
        let code = match &error {
            WebSocketError::ConnectionClosed => return Ending::Dropped("connection closed".into()),
            // yawc reports a compressed payload that does not inflate as an I/O error of
            // kind `InvalidInput` (yawc 0.5 `compression.rs`); the socket's own errors
            // never have that kind. Were one ever taken for it, the Close written to a
            // dead socket would just fail.
            WebSocketError::IoError(io)
                if self.compressed && io.kind() == std::io::ErrorKind::InvalidInput =>
            {
                return self.refuse_undecodable(ws, &error).await;
            }
            WebSocketError::IoError(_) => return Ending::Dropped(error.to_string()),
            WebSocketError::FrameTooLarge => 1009,
            WebSocketError::InvalidUTF8 => 1007,
            WebSocketError::InvalidOpCode(_) => 1003,
            error if error.is_protocol_error() => 1002,
            _ => 1011,
        };
        debug!(%error, code, "closing on a protocol error");
        flush_engine_close(ws, self.settings.close_timeout).await;
        Ending::ProtocolError(code, error.to_string())
    }

    /// A compressed message whose payload is not a raw deflate stream: fails the
    /// connection (RFC 6455 §7.1.7) with 1007, the code for data "not consistent with
    /// the type of the message" (§7.4.1). 1011 would blame the server; the fault is in
    /// what the client sent.
    ///
    /// The engine has already queued Close 1011 ("unexpected condition") for it, in a
    /// queue that every read and every `poll_ready` writes out first. So our Close is
    /// handed to the engine's write buffer without `poll_ready` (yawc's `start_send`
    /// encodes into tokio-util's `Framed` buffer, which takes a frame at any fill
    /// level) and flushed behind the echoes already queued. The engine's read side is
    /// never polled again, so its 1011 is never written: one Close, as §5.5.1 allows.
    /// `corrupt_compressed_data_closes_with_1007` fails if a yawc upgrade changes this.
    async fn refuse_undecodable<S>(
        &mut self,
        ws: &mut Streaming<S>,
        error: &WebSocketError,
    ) -> Ending
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let reason = "invalid permessage-deflate data";
        debug!(%error, code = 1007, "closing: a compressed message does not inflate");
        let _ = timeout(self.settings.close_timeout, async {
            ws.start_send_unpin(Frame::close(CloseCode::Invalid, reason))?;
            ws.flush().await
        })
        .await;
        Ending::ProtocolError(1007, reason.to_owned())
    }

    /// Keepalive and idle deadlines; `Some` when the connection is over.
    async fn on_timer<S>(&mut self, ws: &mut Streaming<S>) -> Option<Ending>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let now = Instant::now();
        if let (Some(since), Some(limit)) = (self.stalled_since, self.settings.stall_timeout) {
            if now >= since + limit {
                // The write side is full, so this Close is sent only if room appears.
                let reason = "client stopped reading its echoes";
                self.guard.stop_echoes();
                let _ = ws
                    .send(Frame::close(CloseCode::Policy, reason))
                    .now_or_never();
                return Some(Ending::ServerClosed(1008, reason, Some(Limit::Stall)));
            }
        }
        if let Some((_, sent_at)) = self.awaiting_pong {
            if now >= sent_at + self.settings.ping_timeout {
                // The peer is not answering; there is no handshake to wait for.
                let reason = "keepalive ping unanswered";
                self.guard.stop_echoes();
                let _ = ws
                    .send(Frame::close(CloseCode::Away, reason))
                    .now_or_never();
                return Some(Ending::ServerClosed(1001, reason, Some(Limit::Keepalive)));
            }
        }
        if let Some(idle) = self.settings.idle_timeout {
            if now >= self.last_message + idle {
                return Some(
                    match Box::pin(self.close(ws, CloseCode::Normal, "idle timeout")).await {
                        Ending::ServerClosed(code, reason, _) => {
                            Ending::ServerClosed(code, reason, Some(Limit::Idle))
                        }
                        other => other,
                    },
                );
            }
        }
        if let (Some(due), Some(interval)) = (self.next_ping, self.settings.ping_interval) {
            if now >= due {
                self.next_ping = Some(now + interval);
                // A connection whose echo is still waiting for room is busy, not idle,
                // and a ping could not be written anyway.
                if self.pending.is_none() && self.awaiting_pong.is_none() {
                    self.pings_sent += 1;
                    self.pending = Some(Frame::ping(self.pings_sent.to_be_bytes().to_vec()));
                    self.metrics.pings_sent.inc();
                    self.awaiting_pong = Some((self.pings_sent, now));
                }
            }
        }
        None
    }

    /// Shutdown: echo what was already received, send Close 1001, wait for the answer.
    async fn drain_and_close<S>(&mut self, ws: &mut Streaming<S>, stats: &mut Stats) -> Ending
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        loop {
            if let Some(frame) = self.pending.take() {
                if let Err(error) = ws.feed(frame).await {
                    return Ending::Dropped(error.to_string());
                }
            }
            // Only frames that are already here: `now_or_never` polls once.
            match ws.next_frame().now_or_never() {
                Some(Ok(frame)) => match self.on_frame(frame, stats) {
                    Next::Continue => {}
                    Next::Control(frame) => {
                        if let Some(ending) = self.on_control_frame(ws, frame).await {
                            return ending;
                        }
                    }
                    Next::Refuse(failure) => return self.refuse(ws, failure).await,
                },
                Some(Err(error)) => return self.on_engine_error(ws, error).await,
                None => break,
            }
        }
        self.close(ws, CloseCode::Away, "server shutting down")
            .await
    }

    /// Sends Close with `code` after every queued echo and waits, up to the close
    /// timeout, for the peer's Close.
    async fn close<S>(
        &mut self,
        ws: &mut Streaming<S>,
        code: CloseCode,
        reason: &'static str,
    ) -> Ending
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let code_number = u16::from(code);
        // Nothing read from here on is echoed: our Close is the last frame we send.
        self.guard.stop_echoes();
        let handshake = async {
            if let Some(frame) = self.pending.take() {
                ws.feed(frame).await?;
            }
            ws.send(Frame::close(code, reason)).await?;
            // Messages that cross our Close are not echoed: §5.5.1 forbids sending data
            // after a Close. Wait for the peer's Close or the end of the stream, unless
            // the guard stops the stream first (now or while we wait): the peer's Close
            // could then never be read, and the guard's reads wake themselves at once,
            // so the wait would spin until the timeout.
            let guard = &self.guard;
            poll_fn(|cx| {
                loop {
                    return match ws.poll_next_frame(cx) {
                        Poll::Ready(Ok(frame)) if frame.opcode() == OpCode::Close => {
                            Poll::Ready(Ok::<_, WebSocketError>(()))
                        }
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                        Poll::Pending if guard.occurred().is_some() => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            })
            .await
        };
        match timeout(self.settings.close_timeout, handshake).await {
            Ok(Ok(())) | Ok(Err(WebSocketError::ConnectionClosed)) => {
                Ending::ServerClosed(code_number, reason, None)
            }
            Ok(Err(error)) => Ending::Dropped(error.to_string()),
            Err(_) => Ending::ServerClosed(code_number, "close handshake timed out", None),
        }
    }
}

/// Sends the Close the engine queued itself (the echo of the client's Close, or the
/// close code for a protocol error), behind every echo already queued.
///
/// The engine keeps such frames in a queue of its own that `flush` does not reach; they
/// go out when the read side is polled. Its read side is closed by then, so one more
/// read writes and flushes them and returns at once.
async fn flush_engine_close<S>(ws: &mut Streaming<S>, limit: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = timeout(limit, async {
        let _ = ws.next_frame().await;
        ws.flush().await
    })
    .await;
}

/// The tutorial's `Got message: …` line, at debug level: text shortened, binary as its
/// length. Payloads never reach the info level.
fn log_message(kind: Kind, payload: &[u8]) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    match kind {
        Kind::Text => {
            let text = String::from_utf8_lossy(payload);
            let mut shown: String = text.chars().take(LOGGED_TEXT_CHARS).collect();
            if text.chars().count() > LOGGED_TEXT_CHARS {
                shown.push('…');
            }
            debug!(len = payload.len(), "Got message: {shown:?}");
        }
        _ => debug!(
            len = payload.len(),
            "Got message: <{} bytes of binary>",
            payload.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine validates text only when told to. We validate in `assembly`, and set
    /// the engine's flag as well so that no path through it skips the check.
    #[test]
    fn utf8_validation_is_on() {
        assert!(EchoConfig::new(&Settings::default()).options().check_utf8);
    }

    /// The engine's default limits (64 MiB frames, 128 MiB messages) are not ours.
    #[test]
    fn frame_limit_comes_from_settings() {
        let settings = Settings {
            max_frame_size: 500,
            ..Settings::default()
        };
        let config = EchoConfig::new(&settings);
        assert_eq!(config.options().max_payload_read, Some(501));
    }

    #[test]
    fn compression_off_means_no_deflate_options() {
        let mut settings = Settings::default();
        settings.compression.enabled = false;
        assert!(EchoConfig::new(&settings).options().compression.is_none());
        assert!(
            EchoConfig::new(&Settings::default())
                .options()
                .compression
                .is_some()
        );
    }
}
