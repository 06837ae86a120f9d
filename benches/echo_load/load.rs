//! The load generator: WebSocket clients that keep a fixed number of messages in flight
//! per connection (a closed loop), time every echo, and count only what arrives inside
//! the measured window.
//!
//! Each connection writes the way ws_echo does: it queues as many messages as its window
//! allows and flushes once when it has nothing left to read, so a pipelined connection
//! costs one `write` per wake-up, not one per message. The whole generator runs on one
//! current-thread runtime pinned to its own CPU; every connection keeps its own counters
//! and histogram, merged at the end of a round.

use std::{
    collections::VecDeque,
    future::poll_fn,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::{net::TcpStream, task::JoinSet, time::timeout};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

use crate::raw::RawClient;

/// A failure of the generator or of a server, as a line for the report.
pub(crate) type Error = String;

/// Longest a handshake may take before the round fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest echo the raw client inflates: far above any workload's message (W3's 1 MiB is
/// the largest), so that only a runaway echo fails a round. tokio-tungstenite's default
/// limit is the same.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Highest latency the histograms hold: one minute, in nanoseconds.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Which WebSocket client drives the load, chosen with `--client`; `raw` by default (see
/// benches/README.md for what each costs the generator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientLib {
    /// Pre-encoded frames written and echoes parsed by `raw::RawClient`: the cheapest
    /// generator, so that it is not what limits W1p. Offers permessage-deflate where the
    /// workload does.
    Raw,
    /// tokio-tungstenite 0.29, axum's WebSocket library. Cannot offer compression.
    Tungstenite,
}

impl ClientLib {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Tungstenite => "tokio-tungstenite",
        }
    }
}

/// How a connection writes the messages it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sends {
    /// Queued while echoes are arriving and written in one go when the connection
    /// would wait (the default): one `write` per wake-up, as ws_echo writes.
    Coalesced,
    /// Each message written as soon as it is sent (`--send-each`), the way a browser's
    /// `WebSocket.send()` or a send-and-flush client puts each one in its own segment.
    Each,
}

/// What each message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payload {
    /// A text message of ASCII letters.
    Text,
    /// A binary message of ASCII letters: the baseline calls `to_text().unwrap()` on
    /// every message and panics on bytes that are not UTF-8.
    Binary,
    /// A text message of JSON records, as compressible as typical API traffic.
    Json,
}

/// One closed-loop load: how many connections, what they send, how much in flight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EchoSpec {
    pub(crate) connections: usize,
    pub(crate) size: usize,
    /// Messages in flight per connection.
    pub(crate) depth: usize,
    pub(crate) payload: Payload,
    /// Whether clients offer permessage-deflate.
    pub(crate) compression: bool,
}

impl EchoSpec {
    /// The message every connection sends, exactly `size` bytes long.
    fn message(&self) -> Bytes {
        match self.payload {
            Payload::Text | Payload::Binary => {
                let letters = b"abcdefghijklmnopqrstuvwxyz";
                (0..self.size)
                    .map(|i| letters[i % letters.len()])
                    .collect::<Vec<u8>>()
                    .into()
            }
            Payload::Json => json_message(self.size).into(),
        }
    }
}

/// A JSON array of user records, padded with spaces to exactly `size` bytes; deflate
/// shrinks it about tenfold, as it does real API responses.
fn json_message(size: usize) -> String {
    let mut json = String::from("[");
    for id in 0.. {
        let record = format!(
            r#"{{"id":{id},"name":"user-{id}","email":"user-{id}@example.com","active":{},"score":{}.5,"tags":["alpha","beta"]}}"#,
            id % 3 != 0,
            id % 100,
        );
        // Room for the separator and the closing bracket.
        if json.len() + record.len() + 2 > size {
            break;
        }
        if id > 0 {
            json.push(',');
        }
        json.push_str(&record);
    }
    while json.len() + 1 < size {
        json.push(' ');
    }
    json.push(']');
    json
}

/// Where a round is: every connection reads this before sending and after receiving.
#[derive(Debug)]
pub(crate) struct Control(AtomicU8);

impl Default for Control {
    /// Warming up: connections send, but record nothing yet.
    fn default() -> Self {
        Self(AtomicU8::new(Self::WARMUP))
    }
}

impl Control {
    const WARMUP: u8 = 0;
    const MEASURE: u8 = 1;
    const STOP: u8 = 2;

    pub(crate) fn measure(&self) {
        self.0.store(Self::MEASURE, Ordering::Relaxed);
    }

    pub(crate) fn stop(&self) {
        self.0.store(Self::STOP, Ordering::Relaxed);
    }

    fn sending(&self) -> bool {
        self.0.load(Ordering::Relaxed) != Self::STOP
    }

    fn measuring(&self) -> bool {
        self.0.load(Ordering::Relaxed) == Self::MEASURE
    }
}

/// What one connection, or a whole round once merged, measured.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    /// Echoes received inside the measured window.
    pub(crate) messages: u64,
    /// Their payload bytes (one direction).
    pub(crate) bytes: u64,
    /// Send-to-echo time of each, in nanoseconds.
    pub(crate) latency: Histogram<u64>,
}

impl Tally {
    pub(crate) fn new() -> Self {
        Self {
            messages: 0,
            bytes: 0,
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    pub(crate) fn add(&mut self, other: &Self) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.latency
            .add(&other.latency)
            .expect("histograms share their bounds");
    }

    fn record(&mut self, latency: Duration, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes as u64;
        // Saturates at the top bucket instead of failing on a stalled echo.
        self.latency
            .saturating_record(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }
}

/// A connected client of either kind, with the message it keeps sending.
// Not boxed: each client is moved once into its connection's task, and a box would add
// a pointer chase to every poll of the hot loop.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Client {
    Raw(RawClient),
    Tungstenite(WebSocketStream<TcpStream>, Message),
}

impl Client {
    /// Opens a WebSocket to `ws://{addr}/ws` that will send `spec`'s message.
    pub(crate) async fn connect(
        addr: SocketAddr,
        lib: ClientLib,
        spec: &EchoSpec,
    ) -> Result<Self, Error> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|error| format!("connect to {addr}: {error}"))?;
        tcp.set_nodelay(true)
            .map_err(|error| format!("TCP_NODELAY: {error}"))?;
        let message = spec.message();
        match lib {
            ClientLib::Raw => {
                let opcode = match spec.payload {
                    Payload::Text | Payload::Json => 0x1,
                    Payload::Binary => 0x2,
                };
                Ok(Self::Raw(
                    RawClient::handshake(tcp, addr, opcode, &message, spec.compression).await?,
                ))
            }
            ClientLib::Tungstenite => {
                if spec.compression {
                    return Err("tokio-tungstenite 0.29 cannot offer permessage-deflate".into());
                }
                let url = format!("ws://{addr}/ws");
                let (ws, _) = tokio_tungstenite::client_async(url, tcp)
                    .await
                    .map_err(|error| format!("tungstenite handshake: {error}"))?;
                let message = match spec.payload {
                    Payload::Text | Payload::Json => Message::Text(
                        message
                            .try_into()
                            .expect("generated text messages are ASCII"),
                    ),
                    Payload::Binary => Message::Binary(message),
                };
                Ok(Self::Tungstenite(ws, message))
            }
        }
    }

    /// The payload length of the next text or binary message; `None` once the server
    /// has closed. Pings are answered by the library and skipped here.
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<usize>, Error>> {
        loop {
            match self {
                Self::Raw(client) => return client.poll_message(cx),
                Self::Tungstenite(ws, _) => match ready!(ws.poll_next_unpin(cx)) {
                    Some(Ok(Message::Text(text))) => return Poll::Ready(Ok(Some(text.len()))),
                    Some(Ok(Message::Binary(data))) => return Poll::Ready(Ok(Some(data.len()))),
                    Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(None)),
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return Poll::Ready(Err(error.to_string())),
                },
            }
        }
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match self {
            Self::Raw(client) => client.poll_ready(cx),
            Self::Tungstenite(ws, _) => ws.poll_ready_unpin(cx).map_err(|error| error.to_string()),
        }
    }

    /// Queues one more copy of the message; its payload is shared, not copied.
    fn start_send(&mut self) -> Result<(), Error> {
        match self {
            Self::Raw(client) => {
                client.start_send();
                Ok(())
            }
            Self::Tungstenite(ws, message) => ws
                .start_send_unpin(message.clone())
                .map_err(|error| error.to_string()),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match self {
            Self::Raw(client) => client.poll_flush(cx),
            Self::Tungstenite(ws, _) => ws.poll_flush_unpin(cx).map_err(|error| error.to_string()),
        }
    }
}

/// Runs one connection's closed loop until `control` stops it (or `quota` messages
/// have been echoed) and every message in flight has come back. The connection is then
/// dropped without a closing handshake: the baseline answers a Close by sending after
/// closing, and its `send(..).unwrap()` would panic.
pub(crate) async fn drive(
    mut client: Client,
    depth: usize,
    quota: Option<u64>,
    control: Arc<Control>,
    sends: Sends,
) -> Result<Tally, Error> {
    let mut tally = Tally::new();
    let mut in_flight: VecDeque<Instant> = VecDeque::with_capacity(depth);
    let mut sent = 0_u64;
    let mut unflushed = false;
    poll_fn(|cx| {
        loop {
            while in_flight.len() < depth
                && control.sending()
                && quota.is_none_or(|quota| sent < quota)
            {
                match client.poll_ready(cx)? {
                    Poll::Ready(()) => {}
                    // The server is not reading; read its echoes meanwhile.
                    Poll::Pending => break,
                }
                client.start_send()?;
                in_flight.push_back(Instant::now());
                sent += 1;
                unflushed = true;
                if sends == Sends::Each {
                    if let Poll::Ready(()) = client.poll_flush(cx)? {
                        unflushed = false;
                    }
                }
            }
            match client.poll_message(cx)? {
                Poll::Ready(Some(bytes)) => {
                    let Some(sent_at) = in_flight.pop_front() else {
                        return Poll::Ready(Err("an echo arrived that was never sent".into()));
                    };
                    if control.measuring() {
                        tally.record(sent_at.elapsed(), bytes);
                    }
                    continue;
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(format!(
                        "server closed the connection with {} messages in flight",
                        in_flight.len()
                    )));
                }
                Poll::Pending => {}
            }
            // Nothing more to read now: write everything queued in one go.
            if unflushed {
                if let Poll::Ready(()) = client.poll_flush(cx)? {
                    unflushed = false;
                }
            }
            let done = !control.sending() || quota.is_some_and(|quota| sent >= quota);
            if done && in_flight.is_empty() && !unflushed {
                return Poll::Ready(Ok(()));
            }
            return Poll::Pending;
        }
    })
    .await?;
    Ok(tally)
}

/// Opens `count` connections, at most `parallel` handshakes at a time.
pub(crate) async fn connect_many(
    addr: SocketAddr,
    lib: ClientLib,
    spec: &EchoSpec,
    count: usize,
    parallel: usize,
) -> (Vec<Client>, Vec<Error>) {
    let mut clients = Vec::with_capacity(count);
    let mut errors = Vec::new();
    let mut pending = JoinSet::new();
    let mut started = 0;
    while clients.len() + errors.len() < count {
        while started < count && pending.len() < parallel {
            let spec = *spec;
            pending.spawn(async move {
                match timeout(CONNECT_TIMEOUT, Client::connect(addr, lib, &spec)).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("handshake took over {CONNECT_TIMEOUT:?}")),
                }
            });
            started += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(client))) => clients.push(client),
            Some(Ok(Err(error))) => errors.push(error),
            Some(Err(error)) => errors.push(format!("connect task: {error}")),
            None => break,
        }
    }
    (clients, errors)
}
