//! Prometheus metrics: every series is defined here once, with its help text, and
//! served in the text format at `GET /metrics` (or on `--metrics-listen`).
//!
//! Each server has its own registry (`prometheus-client`), not a process-global
//! recorder, so servers in one process (tests, embedders) never mix their counts. The
//! hot path holds pre-resolved counter handles: counting a message is a few atomic
//! adds, no label lookup.
//!
//! Compression ratio, per direction, in PromQL:
//! `rate(ws_echo_deflate_wire_bytes_total[5m]) / rate(ws_echo_deflate_message_bytes_total[5m])`.

use std::sync::Arc;

use axum::{extract::State, http::header, response::IntoResponse};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Which way bytes or messages went, seen from the server.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From the client.
    In,
    /// To the client.
    Out,
}

/// A data message's type.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum MessageType {
    /// Text (opcode 0x1).
    Text,
    /// Binary (opcode 0x2).
    Binary,
}

/// Who sent the first Close, or how the connection otherwise ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client closed.
    Client,
    /// The server closed (shutdown, limits, protocol errors).
    Server,
    /// The TCP connection ended without a closing handshake (code 1006).
    None,
}

/// How a handshake ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum HandshakeResult {
    /// Upgraded.
    Accepted,
    /// 405.
    MethodNotAllowed,
    /// 426: not an upgrade request.
    NotAnUpgrade,
    /// 400: an upgrade over HTTP/1.0.
    OldHttpVersion,
    /// 400: an HTTP/1.1 upgrade without Host.
    MissingHost,
    /// 400: an upgrade with a request body.
    UnexpectedBody,
    /// 426: wrong version.
    UnsupportedVersion,
    /// 400: bad key.
    BadKey,
    /// 400: bad subprotocol list.
    BadSubprotocol,
    /// 403: origin not allowed.
    ForbiddenOrigin,
    /// 503: global cap.
    ServerFull,
    /// 429: per-address cap.
    AddressFull,
    /// 503: draining.
    Draining,
    /// 400: a test control with a bad value.
    BadControl,
    /// Refused with the status the `status` control asked for.
    StatusControl,
}

/// Which limit dropped or refused something.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Limit {
    /// A message or frame over the size limit (1009).
    MessageSize,
    /// A client that stopped reading, past the stall timeout (1008).
    Stall,
    /// A message holding budget made no progress for the message timeout (1008).
    MessageTimeout,
    /// The cap on TCP connections of any kind (503, or closed at once on TLS).
    TcpConnections,
    /// An HTTP connection with no request in progress past the idle timeout.
    HttpIdle,
    /// A keepalive ping unanswered (1001).
    Keepalive,
    /// No traffic for the idle timeout (1000).
    Idle,
    /// No request headers within the handshake timeout.
    HandshakeTimeout,
    /// The global connection cap (503).
    Connections,
    /// The per-address connection cap (429).
    ConnectionsPerIp,
    /// The origin policy (403).
    Origin,
    /// `--max-connection-duration` (1000).
    ConnectionDuration,
}

/// Label values in Prometheus' lower-case style.
trait Label {
    fn label(self) -> &'static str;
}

impl Label for Direction {
    fn label(self) -> &'static str {
        match self {
            Self::In => "in",
            Self::Out => "out",
        }
    }
}

impl Label for MessageType {
    fn label(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Binary => "binary",
        }
    }
}

impl Label for Side {
    fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
            Self::None => "none",
        }
    }
}

impl Label for HandshakeResult {
    fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotAnUpgrade => "not_an_upgrade",
            Self::OldHttpVersion => "old_http_version",
            Self::MissingHost => "missing_host",
            Self::UnexpectedBody => "unexpected_body",
            Self::UnsupportedVersion => "unsupported_version",
            Self::BadKey => "bad_key",
            Self::BadSubprotocol => "bad_subprotocol",
            Self::ForbiddenOrigin => "forbidden_origin",
            Self::ServerFull => "server_full",
            Self::AddressFull => "address_full",
            Self::Draining => "draining",
            Self::BadControl => "bad_control",
            Self::StatusControl => "status_control",
        }
    }
}

impl Label for Limit {
    fn label(self) -> &'static str {
        match self {
            Self::MessageSize => "message_size",
            Self::Stall => "stall",
            Self::MessageTimeout => "message_timeout",
            Self::TcpConnections => "tcp_connections",
            Self::HttpIdle => "http_idle",
            Self::Keepalive => "keepalive",
            Self::Idle => "idle",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Connections => "connections",
            Self::ConnectionsPerIp => "connections_per_ip",
            Self::Origin => "origin",
            Self::ConnectionDuration => "connection_duration",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    direction: &'static str,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    side: &'static str,
    /// 1000–2999 as they are; application codes grouped as 3xxx and 4xxx, so a peer
    /// cannot create thousands of series.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControlLabels {
    control: &'static str,
}

/// Counter handles for one direction and type, resolved once.
#[derive(Clone, Debug)]
pub(crate) struct MessageCounters {
    /// Messages.
    pub(crate) messages: Counter,
    /// Payload bytes.
    pub(crate) bytes: Counter,
}

/// Every metric of one server. Created by `AppState::new`, shared through an `Arc`.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// `ws_echo_connections_open`.
    pub(crate) connections_open: Gauge,
    handshakes: Family<HandshakeLabels, Counter>,
    messages: Family<MessageLabels, Counter>,
    message_bytes: Family<MessageLabels, Counter>,
    closes: Family<CloseLabels, Counter>,
    /// `ws_echo_pings_sent_total`: keepalive pings.
    pub(crate) pings_sent: Counter,
    /// `ws_echo_ping_rtt_seconds`: keepalive round trips.
    pub(crate) ping_rtt: Histogram,
    /// `ws_echo_budget_waits_total`: reads that waited for the buffer budget.
    pub(crate) budget_waits: Counter,
    /// `ws_echo_tcp_connections_open`: TCP connections of any kind.
    pub(crate) tcp_open: Gauge,
    deflate_message_bytes: Family<DirectionLabels, Counter>,
    deflate_wire_bytes: Family<DirectionLabels, Counter>,
    limit_drops: Family<LimitLabels, Counter>,
    controls: Family<ControlLabels, Counter>,
}

impl Metrics {
    /// A registry with every series, all at zero.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("ws_echo");
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Open WebSocket connections",
            connections_open.clone(),
        );
        let handshakes = Family::default();
        registry.register(
            "handshakes",
            "WebSocket handshakes by result",
            handshakes.clone(),
        );
        let messages = Family::default();
        registry.register(
            "messages",
            "Data messages by direction and type",
            messages.clone(),
        );
        let message_bytes = Family::default();
        registry.register(
            "message_bytes",
            "Data message payload bytes by direction and type",
            message_bytes.clone(),
        );
        let closes = Family::default();
        registry.register(
            "closes",
            "Closed WebSockets by the side that closed first and the close code (1006: no closing handshake)",
            closes.clone(),
        );
        let pings_sent = Counter::default();
        registry.register("pings_sent", "Keepalive pings sent", pings_sent.clone());
        // 0.1 ms to about 3.3 s.
        let ping_rtt = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "ping_rtt_seconds",
            "Keepalive ping round-trip time",
            ping_rtt.clone(),
        );
        let budget_waits = Counter::default();
        registry.register(
            "budget_waits",
            "Times a WebSocket stopped reading to wait for the buffer budget",
            budget_waits.clone(),
        );
        let tcp_open = Gauge::default();
        registry.register(
            "tcp_connections_open",
            "Open TCP connections of any kind (HTTP/1.1, HTTP/2, TLS, WebSocket)",
            tcp_open.clone(),
        );
        let deflate_message_bytes = Family::default();
        registry.register(
            "deflate_message_bytes",
            "Payload bytes of messages on connections with permessage-deflate, before compression",
            deflate_message_bytes.clone(),
        );
        let deflate_wire_bytes = Family::default();
        registry.register(
            "deflate_wire_bytes",
            "Bytes on the wire of connections with permessage-deflate, frame headers included",
            deflate_wire_bytes.clone(),
        );
        let limit_drops = Family::default();
        registry.register(
            "limit_drops",
            "Connections or handshakes refused or closed by a limit",
            limit_drops.clone(),
        );
        let controls = Family::default();
        registry.register(
            "controls",
            "WebSocket handshakes answered with each test control (the query string of the URL)",
            controls.clone(),
        );
        Self {
            registry,
            controls,
            connections_open,
            handshakes,
            messages,
            message_bytes,
            closes,
            pings_sent,
            ping_rtt,
            budget_waits,
            tcp_open,
            deflate_message_bytes,
            deflate_wire_bytes,
            limit_drops,
        }
    }

    /// Counts a handshake outcome.
    pub(crate) fn handshake(&self, result: HandshakeResult) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                result: result.label(),
            })
            .inc();
    }

    /// Counts a handshake answered with the test control `name`.
    pub(crate) fn control_used(&self, name: &'static str) {
        self.controls
            .get_or_create(&ControlLabels { control: name })
            .inc();
    }

    /// Counts something a limit refused or closed.
    pub(crate) fn limit_drop(&self, limit: Limit) {
        self.limit_drops
            .get_or_create(&LimitLabels {
                limit: limit.label(),
            })
            .inc();
    }

    /// Counts a closed WebSocket.
    pub(crate) fn close(&self, side: Side, code: u16) {
        let code = match code {
            3000..=3999 => "3xxx".to_owned(),
            4000..=4999 => "4xxx".to_owned(),
            code => code.to_string(),
        };
        self.closes
            .get_or_create(&CloseLabels {
                side: side.label(),
                code,
            })
            .inc();
    }

    /// Handles for counting messages of one direction and type.
    pub(crate) fn message_counters(
        &self,
        direction: Direction,
        r#type: MessageType,
    ) -> MessageCounters {
        let labels = MessageLabels {
            direction: direction.label(),
            r#type: r#type.label(),
        };
        MessageCounters {
            messages: self.messages.get_or_create(&labels).clone(),
            bytes: self.message_bytes.get_or_create(&labels).clone(),
        }
    }

    /// Handles for the deflate payload and wire byte counters of one direction.
    pub(crate) fn deflate_counters(&self, direction: Direction) -> (Counter, Counter) {
        let labels = DirectionLabels {
            direction: direction.label(),
        };
        (
            self.deflate_message_bytes.get_or_create(&labels).clone(),
            self.deflate_wire_bytes.get_or_create(&labels).clone(),
        )
    }

    /// The text exposition.
    fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("invariant: writing to a String cannot fail");
        text
    }
}

/// The message counters every connection uses, resolved once per server.
#[derive(Clone, Debug)]
pub(crate) struct EchoCounters {
    /// Text in.
    pub(crate) text_in: MessageCounters,
    /// Binary in.
    pub(crate) binary_in: MessageCounters,
    /// Text out.
    pub(crate) text_out: MessageCounters,
    /// Binary out.
    pub(crate) binary_out: MessageCounters,
    /// Deflate payload and wire bytes, in.
    pub(crate) deflate_in: (Counter, Counter),
    /// Deflate payload and wire bytes, out.
    pub(crate) deflate_out: (Counter, Counter),
    /// The wire halves of the two above (read, written), counted by the driver.
    pub(crate) deflate_wire: (Counter, Counter),
}

impl EchoCounters {
    /// Resolves the handles from `metrics`.
    pub(crate) fn new(metrics: &Metrics) -> Self {
        let deflate_in = metrics.deflate_counters(Direction::In);
        let deflate_out = metrics.deflate_counters(Direction::Out);
        Self {
            deflate_wire: (deflate_in.1.clone(), deflate_out.1.clone()),
            text_in: metrics.message_counters(Direction::In, MessageType::Text),
            binary_in: metrics.message_counters(Direction::In, MessageType::Binary),
            text_out: metrics.message_counters(Direction::Out, MessageType::Text),
            binary_out: metrics.message_counters(Direction::Out, MessageType::Binary),
            deflate_in,
            deflate_out,
        }
    }
}

/// `GET /metrics`: the Prometheus text format.
pub(crate) async fn handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed_with_help() {
        let metrics = Metrics::new();
        metrics.handshake(HandshakeResult::Accepted);
        metrics.close(Side::Client, 4321);
        metrics.limit_drop(Limit::Stall);
        let counters = EchoCounters::new(&metrics);
        counters.text_in.messages.inc();
        let text = metrics.render();
        for series in [
            "ws_echo_connections_open",
            "ws_echo_handshakes_total{result=\"accepted\"} 1",
            "ws_echo_messages_total{direction=\"in\",type=\"text\"} 1",
            "ws_echo_closes_total{side=\"client\",code=\"4xxx\"} 1",
            "ws_echo_limit_drops_total{limit=\"stall\"} 1",
            "ws_echo_ping_rtt_seconds_bucket",
            "# HELP ws_echo_pings_sent",
        ] {
            assert!(text.contains(series), "missing {series} in:\n{text}");
        }
    }
}
