//! Test controls: what a client may ask of the server from the query string of the
//! WebSocket URL (`/ws?delay=200ms&fragment=3`): delays, fragmented echoes, a close or a
//! drop on cue, a refused handshake, pings, a stream, a slow reader, and deliberate
//! protocol faults. This module parses and checks them, within the operator's
//! [`Ceilings`], and describes them (`GET /controls`, the `X-Ws-Echo-Controls` header);
//! `controlled` carries them out.
//!
//! The query string is the one channel every client has: browsers cannot set handshake
//! headers. Unknown parameters are ignored (clients add their own, such as tokens); a
//! known one with a bad value is refused with 400 before any upgrade, so that a typo
//! never silently tests nothing.

use std::{fmt, time::Duration};

use serde_json::{Value, json};

use super::close;

/// Longest `reason`: a Close payload is at most 125 bytes, two of them the code.
pub(crate) const MAX_REASON: usize = 123;
/// Shortest `ping` interval: shorter would be a flood, not a keepalive.
const MIN_PING: Duration = Duration::from_millis(10);
/// Longest `ping` interval.
const MAX_PING: Duration = Duration::from_secs(3600);
/// Longest `after=DUR`.
const MAX_AFTER: Duration = Duration::from_secs(86_400);
/// Most `after=N` echoes.
const MAX_AFTER_ECHOES: u64 = 1_000_000_000;
/// Most `stream` messages.
const MAX_STREAM: u64 = 1_000_000;
/// `size` of stream messages when not given.
const DEFAULT_STREAM_SIZE: usize = 64;
/// Highest `read_rate`, bytes per second (1 GiB/s: faster is no slow reader).
const MAX_READ_RATE: u64 = 1 << 30;

/// The operator's limits on what controls may ask (`--max-delay`,
/// `--max-stream-bytes`, `--max-connection-duration`, `--no-controls`).
#[derive(Debug, Clone)]
pub(crate) struct Ceilings {
    /// Whether controls are honoured at all.
    pub(crate) enabled: bool,
    /// Longest `delay`, `jitter` and `interval`.
    pub(crate) max_delay: Duration,
    /// Most bytes one connection's stream may send.
    pub(crate) max_stream_bytes: u64,
    /// Largest message (`--max-message-size`): the most `fragment` and `size` may be.
    pub(crate) max_message: usize,
    /// Every connection is closed this long after its upgrade, when set.
    pub(crate) max_connection_duration: Option<Duration>,
}

/// When `close` or `drop` fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    /// After this many echoes have been sent (0: at once).
    Echoes(u64),
    /// This long after the upgrade.
    Time(Duration),
}

/// What the server sends before echoing (`stream=N&size=…&interval=…&type=…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stream {
    /// Messages to send.
    pub(crate) count: u64,
    /// Bytes in each.
    pub(crate) size: usize,
    /// Time between two of them.
    pub(crate) interval: Duration,
    /// Binary rather than text.
    pub(crate) binary: bool,
}

/// One deliberate protocol violation (`fault=NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// A text frame whose payload is not UTF-8.
    InvalidUtf8,
    /// A frame with the mask bit set: servers must not mask (RFC 6455 §5.1).
    MaskedFrame,
    /// RSV1 set where no extension allows it.
    Rsv1,
    /// A frame with reserved opcode 0x3.
    ReservedOpcode,
    /// A Ping with 126 bytes of payload (control frames carry at most 125).
    OversizedPing,
    /// A Close with code 1005, which must never be sent (RFC 6455 §7.4.1).
    BadCloseCode,
    /// The 101 names a subprotocol the client did not offer.
    UnrequestedSubprotocol,
    /// The 101 carries a wrong `Sec-WebSocket-Accept`.
    BadAccept,
}

impl Fault {
    /// Every fault, in the order `/controls` lists them.
    const ALL: [Fault; 8] = [
        Fault::InvalidUtf8,
        Fault::MaskedFrame,
        Fault::Rsv1,
        Fault::ReservedOpcode,
        Fault::OversizedPing,
        Fault::BadCloseCode,
        Fault::UnrequestedSubprotocol,
        Fault::BadAccept,
    ];

    /// The name in the query string.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::InvalidUtf8 => "invalid-utf8",
            Fault::MaskedFrame => "masked-frame",
            Fault::Rsv1 => "rsv1",
            Fault::ReservedOpcode => "reserved-opcode",
            Fault::OversizedPing => "oversized-ping",
            Fault::BadCloseCode => "bad-close-code",
            Fault::UnrequestedSubprotocol => "unrequested-subprotocol",
            Fault::BadAccept => "bad-accept",
        }
    }

    /// Whether the fault is in the handshake response rather than in place of the
    /// first echo.
    pub(crate) fn in_handshake(self) -> bool {
        matches!(self, Fault::UnrequestedSubprotocol | Fault::BadAccept)
    }

    fn effect(self) -> &'static str {
        match self {
            Fault::InvalidUtf8 => {
                "a text frame whose payload is not UTF-8 (a client fails with 1007)"
            }
            Fault::MaskedFrame => {
                "the echo in a masked frame, which a server must never send (1002)"
            }
            Fault::Rsv1 => {
                "RSV1 set where no extension allows it: on the echo, or on its second frame with permessage-deflate (1002)"
            }
            Fault::ReservedOpcode => "the echo with reserved opcode 0x3 (1002)",
            Fault::OversizedPing => "a Ping with 126 bytes of payload, over the 125 allowed (1002)",
            Fault::BadCloseCode => "a Close with code 1005, which must never be sent (1002)",
            Fault::UnrequestedSubprotocol => {
                "the 101 selects subprotocol ws-echo-unrequested, which the client did not offer"
            }
            Fault::BadAccept => "the 101 carries a wrong Sec-WebSocket-Accept (HTTP/1.1 only)",
        }
    }
}

/// The controls one connection asked for; the default asks for nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Controls {
    /// Every echo leaves this long after its message arrived.
    pub(crate) delay: Option<Duration>,
    /// Up to this much more, at random, per echo.
    pub(crate) jitter: Option<Duration>,
    /// Echoes go out as frames of at most this many payload bytes.
    pub(crate) fragment: Option<usize>,
    /// The server closes with this code at `after`.
    pub(crate) close: Option<u16>,
    /// The reason of that Close.
    pub(crate) reason: Option<String>,
    /// When `close` or `drop` fires (at once when not given).
    pub(crate) after: Option<After>,
    /// The connection is reset at `after`, without a Close.
    pub(crate) drop: bool,
    /// The handshake is refused with this status.
    pub(crate) status: Option<u16>,
    /// The server pings this often.
    pub(crate) ping: Option<Duration>,
    /// The server does not answer pings.
    pub(crate) no_pong: bool,
    /// Messages sent before any echo.
    pub(crate) stream: Option<Stream>,
    /// Most bytes read from the client per second.
    pub(crate) read_rate: Option<u64>,
    /// One deliberate violation.
    pub(crate) fault: Option<Fault>,
}

/// A control with a value it cannot take: answered with 400 and this text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadControl {
    /// The parameter at fault.
    pub(crate) name: &'static str,
    /// What it takes, and what it got.
    pub(crate) message: String,
}

impl fmt::Display for BadControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

/// The parameter names, in the order the header and `/controls` list them.
const NAMES: [&str; 16] = [
    "delay",
    "jitter",
    "fragment",
    "close",
    "reason",
    "after",
    "drop",
    "status",
    "ping",
    "pong",
    "stream",
    "size",
    "interval",
    "type",
    "read_rate",
    "fault",
];

impl Controls {
    /// The controls in `query`, checked against `ceilings`. Without controls enabled,
    /// or without any control parameter, nothing is asked.
    ///
    /// # Errors
    ///
    /// [`BadControl`] for the first parameter whose value is malformed or out of range,
    /// one given twice, or one that needs another (`reason` needs `close`).
    pub(crate) fn parse(query: Option<&str>, ceilings: &Ceilings) -> Result<Self, BadControl> {
        let mut values: [Option<String>; NAMES.len()] = Default::default();
        let Some(query) = query.filter(|_| ceilings.enabled) else {
            return Ok(Self::default());
        };
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(index) = NAMES.iter().position(|name| *name == key) else {
                continue;
            };
            let name = NAMES[index];
            let value = percent_decode(value).ok_or_else(|| BadControl {
                name,
                message: "the value is not valid percent-encoded UTF-8".into(),
            })?;
            if values[index].replace(value).is_some() {
                return Err(BadControl {
                    name,
                    message: "given more than once".into(),
                });
            }
        }
        let [
            delay,
            jitter,
            fragment,
            close,
            reason,
            after,
            drop,
            status,
            ping,
            pong,
            stream,
            size,
            interval,
            kind,
            read_rate,
            fault,
        ] = values;
        let max_delay = ceilings.max_delay;
        let mut controls = Controls {
            delay: delay
                .map(|v| duration("delay", &v, Duration::ZERO, max_delay))
                .transpose()?,
            jitter: jitter
                .map(|v| duration("jitter", &v, Duration::ZERO, max_delay))
                .transpose()?,
            fragment: fragment
                .map(|v| integer("fragment", &v, 1, ceilings.max_message as u64))
                .transpose()?
                .map(|n| n as usize),
            close: close.map(|v| close_code(&v)).transpose()?,
            reason: None,
            after: after.map(|v| parse_after(&v)).transpose()?,
            drop: drop
                .map(|v| boolean("drop", &v))
                .transpose()?
                .unwrap_or(false),
            status: status
                .map(|v| integer("status", &v, 400, 599))
                .transpose()?
                .map(|n| n as u16),
            ping: ping
                .map(|v| duration("ping", &v, MIN_PING, MAX_PING))
                .transpose()?,
            no_pong: !pong
                .map(|v| boolean("pong", &v))
                .transpose()?
                .unwrap_or(true),
            stream: None,
            read_rate: read_rate
                .map(|v| integer("read_rate", &v, 1, MAX_READ_RATE))
                .transpose()?,
            fault: fault.map(|v| parse_fault(&v)).transpose()?,
        };
        if let Some(reason) = reason {
            if controls.close.is_none() {
                return Err(needs("reason", "close=CODE"));
            }
            if reason.len() > MAX_REASON {
                return Err(BadControl {
                    name: "reason",
                    message: format!("at most {MAX_REASON} bytes of UTF-8, got {}", reason.len()),
                });
            }
            controls.reason = Some(reason);
        }
        if controls.after.is_some() && controls.close.is_none() && !controls.drop {
            return Err(needs("after", "close=CODE or drop=1"));
        }
        if controls.close.is_some() && controls.drop {
            return Err(BadControl {
                name: "drop",
                message: "close and drop exclude each other: give one".into(),
            });
        }
        match stream {
            Some(count) => {
                let count = integer("stream", &count, 1, MAX_STREAM)?;
                let size = size
                    .map(|v| integer("size", &v, 0, ceilings.max_message as u64))
                    .transpose()?
                    .map_or(DEFAULT_STREAM_SIZE, |n| n as usize);
                // Headers beyond a few bytes per message are what `fragment` adds: the
                // encoded message must fit where the largest message does.
                let encoded = encoded_len(size, controls.fragment);
                if encoded > ceilings.max_message + 64 {
                    return Err(BadControl {
                        name: "size",
                        message: format!(
                            "a stream message cut by fragment={} takes {encoded} bytes on the wire, over the largest message ({})",
                            controls.fragment.unwrap_or(size),
                            ceilings.max_message
                        ),
                    });
                }
                if count.saturating_mul(size as u64) > ceilings.max_stream_bytes {
                    return Err(BadControl {
                        name: "stream",
                        message: format!(
                            "stream × size may be at most {} bytes (--max-stream-bytes), got {count} × {size}",
                            ceilings.max_stream_bytes
                        ),
                    });
                }
                let interval = interval
                    .map(|v| duration("interval", &v, Duration::ZERO, max_delay))
                    .transpose()?
                    .unwrap_or(Duration::ZERO);
                let binary = match kind.as_deref() {
                    None | Some("text") => false,
                    Some("binary") => true,
                    Some(other) => {
                        return Err(BadControl {
                            name: "type",
                            message: format!("text or binary, got {other:?}"),
                        });
                    }
                };
                controls.stream = Some(Stream {
                    count,
                    size,
                    interval,
                    binary,
                });
            }
            None => {
                for (name, given) in [("size", &size), ("interval", &interval), ("type", &kind)] {
                    if given.is_some() {
                        return Err(needs(name, "stream=N"));
                    }
                }
            }
        }
        Ok(controls)
    }

    /// Whether nothing is asked: the connection is a plain echo.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether anything is asked of the connection once it is open (everything but
    /// `status` and the handshake faults).
    pub(crate) fn shape_the_connection(&self) -> bool {
        Controls {
            status: None,
            fault: self.fault.filter(|fault| !fault.in_handshake()),
            ..self.clone()
        } != Controls::default()
    }

    /// The names of the controls in effect, for the per-control counter.
    pub(crate) fn names(&self) -> Vec<&'static str> {
        self.entries().into_iter().map(|(name, _)| name).collect()
    }

    /// The controls in effect, normalised: `delay=200ms, fragment=3`. Header-safe:
    /// the reason is percent-encoded.
    pub(crate) fn summary(&self) -> String {
        self.entries()
            .into_iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn entries(&self) -> Vec<(&'static str, String)> {
        let time = |d: &Duration| humantime::format_duration(*d).to_string().replace(' ', "");
        let mut entries = Vec::new();
        let mut add = |name: &'static str, value: Option<String>| {
            if let Some(value) = value {
                entries.push((name, value));
            }
        };
        add("delay", self.delay.as_ref().map(time));
        add("jitter", self.jitter.as_ref().map(time));
        add("fragment", self.fragment.map(|n| n.to_string()));
        add("close", self.close.map(|n| n.to_string()));
        add("reason", self.reason.as_deref().map(percent_encode));
        add(
            "after",
            self.after.map(|after| match after {
                After::Echoes(n) => n.to_string(),
                After::Time(d) => time(&d),
            }),
        );
        add("drop", self.drop.then(|| "1".into()));
        add("status", self.status.map(|n| n.to_string()));
        add("ping", self.ping.as_ref().map(time));
        add("pong", self.no_pong.then(|| "0".into()));
        if let Some(stream) = &self.stream {
            add("stream", Some(stream.count.to_string()));
            add("size", Some(stream.size.to_string()));
            add("interval", Some(time(&stream.interval)));
            add(
                "type",
                Some(if stream.binary { "binary" } else { "text" }.into()),
            );
        }
        add("read_rate", self.read_rate.map(|n| n.to_string()));
        add("fault", self.fault.map(|fault| fault.name().into()));
        entries
    }
}

/// Bytes a message of `len` takes on the wire when `fragment` cuts it: the payload
/// and a header per frame (2 bytes up to 125, 4 up to 65,535, 10 beyond).
pub(crate) fn encoded_len(len: usize, fragment: Option<usize>) -> usize {
    let size = fragment.unwrap_or(usize::MAX).max(1).min(len.max(1));
    let frames = len.div_ceil(size).max(1);
    let header = match size {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    };
    len + frames * header
}

/// `GET /controls`: every parameter, its range and the operator's ceilings, as JSON.
pub(crate) fn describe(ceilings: &Ceilings) -> Value {
    let time = |d: Duration| humantime::format_duration(d).to_string().replace(' ', "");
    let max_delay = time(ceilings.max_delay);
    let max_message = ceilings.max_message;
    let parameter = |name: &str, value: &str, range: String, effect: &str| json!({ "name": name, "value": value, "range": range, "effect": effect });
    json!({
        "enabled": ceilings.enabled,
        "ceilings": {
            "max_delay": max_delay,
            "max_stream_bytes": ceilings.max_stream_bytes,
            "max_connection_duration": ceilings.max_connection_duration.map(time),
            "max_message_size": max_message,
        },
        "parameters": [
            parameter("delay", "duration", format!("0s..={max_delay}"), "every echo leaves this long after its message arrived; order kept"),
            parameter("jitter", "duration", format!("0s..={max_delay}"), "adds a uniform random 0..jitter to each delay; order kept"),
            parameter("fragment", "bytes", format!("1..={max_message}"), "every echo goes out as frames of at most this many payload bytes"),
            parameter("close", "close code", "1000-1003, 1007-1014, 3000-4999".into(), "the server starts a close with this code (at once, or at `after`)"),
            parameter("reason", "text", format!("at most {MAX_REASON} bytes of UTF-8; needs close"), "the reason of that Close"),
            parameter("after", "echoes or duration", format!("0..={MAX_AFTER_ECHOES} echoes, or up to {}; needs close or drop", time(MAX_AFTER)), "when close or drop fires: after N echoes, or this long after the upgrade (default: at once)"),
            parameter("drop", "1 or 0", "1, true, 0, false".into(), "at `after`, the connection is reset without a Close frame (on HTTP/2 the stream, with RST_STREAM)"),
            parameter("status", "HTTP status", "400..=599".into(), "the handshake is refused with this status"),
            parameter("ping", "duration", format!("{}..={}", time(MIN_PING), time(MAX_PING)), "the server pings this often (instead of --ping-interval)"),
            parameter("pong", "0", "0 or false (1 or true: the default)".into(), "the server does not answer the client's pings"),
            parameter("stream", "count", format!("1..={MAX_STREAM}; stream × size at most {} bytes", ceilings.max_stream_bytes), "before echoing, the server sends this many messages"),
            parameter("size", "bytes", format!("0..={max_message}, default {DEFAULT_STREAM_SIZE}; needs stream"), "size of each stream message: text is the counter, a space, then a-z repeated; binary the 8-byte big-endian counter, then (counter + i) mod 256"),
            parameter("interval", "duration", format!("0s..={max_delay}, default 0s; needs stream"), "time between stream messages"),
            parameter("type", "text or binary", "text, binary; default text; needs stream".into(), "the kind of stream messages"),
            parameter("read_rate", "bytes per second", format!("1..={MAX_READ_RATE}"), "the server reads at most this many bytes per second from the client"),
            parameter("fault", "name", Fault::ALL.map(Fault::name).join(", "), "one deliberate protocol violation: see faults"),
        ],
        "faults": Fault::ALL.map(|fault| json!({
            "name": fault.name(),
            "where": if fault.in_handshake() { "handshake response" } else { "in place of the first echo" },
            "effect": fault.effect(),
        })),
        "notes": "Unknown parameters are ignored; a known one with a bad value gets 400 naming it. Durations as 250ms, 2s, 1m. Controls work on /ws and on / (a WebSocket handshake to / upgrades).",
    })
}

fn needs(name: &'static str, other: &str) -> BadControl {
    BadControl {
        name,
        message: format!("only with {other}"),
    }
}

fn duration(
    name: &'static str,
    value: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, BadControl> {
    let time = |d: Duration| humantime::format_duration(d).to_string().replace(' ', "");
    match humantime::parse_duration(value) {
        Ok(parsed) if (min..=max).contains(&parsed) => Ok(parsed),
        _ => Err(BadControl {
            name,
            message: format!(
                "a duration from {} to {} (such as 250ms or 2s), got {value:?}",
                time(min),
                time(max)
            ),
        }),
    }
}

fn integer(name: &'static str, value: &str, min: u64, max: u64) -> Result<u64, BadControl> {
    match value.parse::<u64>() {
        Ok(parsed) if (min..=max).contains(&parsed) => Ok(parsed),
        _ => Err(BadControl {
            name,
            message: format!("an integer from {min} to {max}, got {value:?}"),
        }),
    }
}

fn boolean(name: &'static str, value: &str) -> Result<bool, BadControl> {
    match value {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(BadControl {
            name,
            message: format!("1, true, 0 or false, got {value:?}"),
        }),
    }
}

fn close_code(value: &str) -> Result<u16, BadControl> {
    match value.parse::<u16>() {
        // The codes an endpoint may send (close::is_sendable) except 1015, which only
        // reports a TLS failure.
        Ok(code) if close::is_sendable(code) && code != 1015 => Ok(code),
        _ => Err(BadControl {
            name: "close",
            message: format!("a close code in 1000-1003, 1007-1014 or 3000-4999, got {value:?}"),
        }),
    }
}

fn parse_after(value: &str) -> Result<After, BadControl> {
    if let Ok(echoes) = value.parse::<u64>() {
        if echoes <= MAX_AFTER_ECHOES {
            return Ok(After::Echoes(echoes));
        }
    } else if let Ok(time) = humantime::parse_duration(value) {
        if time <= MAX_AFTER {
            return Ok(After::Time(time));
        }
    }
    Err(BadControl {
        name: "after",
        message: format!(
            "a number of echoes from 0 to {MAX_AFTER_ECHOES} or a duration up to 1day (such as 2s), got {value:?}"
        ),
    })
}

fn parse_fault(value: &str) -> Result<Fault, BadControl> {
    Fault::ALL
        .into_iter()
        .find(|fault| fault.name() == value)
        .ok_or_else(|| BadControl {
            name: "fault",
            message: format!(
                "one of {}, got {value:?}",
                Fault::ALL.map(Fault::name).join(", ")
            ),
        })
}

/// Decodes a query-string value: `%XX` escapes and `+` for a space, as browsers'
/// `URLSearchParams` encode them. `None` when an escape is broken or the bytes are not
/// UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = value.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Encodes what is not an unreserved URL character, so that a reason fits a header.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ceilings() -> Ceilings {
        Ceilings {
            enabled: true,
            max_delay: Duration::from_secs(30),
            max_stream_bytes: 64 << 20,
            max_message: 16 << 20,
            max_connection_duration: None,
        }
    }

    fn parse(query: &str) -> Result<Controls, BadControl> {
        Controls::parse(Some(query), &ceilings())
    }

    #[test]
    fn no_control_parameter_asks_for_nothing() {
        assert!(parse("token=abc&hello=1").unwrap().is_empty());
        assert!(Controls::parse(None, &ceilings()).unwrap().is_empty());
    }

    #[test]
    fn every_control_is_read_and_normalised() {
        let controls = parse(
            "delay=200ms&jitter=1s&fragment=3&close=4000&reason=bye+now%21&after=2\
             &ping=1500ms&pong=0&stream=5&size=10&interval=100ms&type=binary&read_rate=100\
             &fault=rsv1&status=",
        );
        // `status=` is empty: malformed.
        assert_eq!(controls.unwrap_err().name, "status");
        let controls = parse(
            "delay=200ms&jitter=1s&fragment=3&close=4000&reason=bye+now%21&after=2\
             &ping=1500ms&pong=0&stream=5&size=10&interval=100ms&type=binary&read_rate=100\
             &fault=rsv1",
        )
        .unwrap();
        assert_eq!(controls.reason.as_deref(), Some("bye now!"));
        assert_eq!(controls.after, Some(After::Echoes(2)));
        assert_eq!(
            controls.summary(),
            "delay=200ms, jitter=1s, fragment=3, close=4000, reason=bye%20now%21, after=2, \
             ping=1s500ms, pong=0, stream=5, size=10, interval=100ms, type=binary, \
             read_rate=100, fault=rsv1"
        );
        assert!(controls.shape_the_connection());
    }

    #[test]
    fn out_of_range_values_name_their_parameter_and_range() {
        for (query, name, says) in [
            ("delay=31s", "delay", "from 0s to 30s"),
            ("delay=soon", "delay", "such as 250ms"),
            ("fragment=0", "fragment", "from 1 to 16777216"),
            ("close=1005", "close", "3000-4999"),
            ("close=1015", "close", "1007-1014"),
            ("status=302", "status", "from 400 to 599"),
            ("ping=1ms", "ping", "from 10ms"),
            ("pong=maybe", "pong", "1, true, 0 or false"),
            ("stream=0", "stream", "from 1"),
            ("stream=2000&size=65536", "stream", "--max-stream-bytes"),
            ("stream=1&type=json", "type", "text or binary"),
            ("size=3", "size", "only with stream=N"),
            ("reason=x", "reason", "only with close=CODE"),
            ("after=3", "after", "close=CODE or drop=1"),
            ("close=1000&after=2days", "after", "up to 1day"),
            ("close=1000&drop=1", "drop", "exclude each other"),
            ("read_rate=0", "read_rate", "from 1"),
            ("fault=nasty", "fault", "invalid-utf8, masked-frame"),
            ("delay=1s&delay=2s", "delay", "more than once"),
            ("close=1000&reason=%ff", "reason", "UTF-8"),
        ] {
            let error = parse(query).unwrap_err();
            assert_eq!(error.name, name, "{query}");
            assert!(error.to_string().contains(says), "{query}: {error}");
        }
        let long = format!("close=1000&reason={}", "a".repeat(124));
        assert!(
            parse(&long)
                .unwrap_err()
                .to_string()
                .contains("at most 123")
        );
    }

    #[test]
    fn switched_off_controls_are_ignored_even_when_malformed() {
        let off = Ceilings {
            enabled: false,
            ..ceilings()
        };
        assert!(
            Controls::parse(Some("delay=forever&close=1"), &off)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn handshake_only_controls_leave_the_connection_plain() {
        assert!(!parse("status=503").unwrap().shape_the_connection());
        assert!(!parse("fault=bad-accept").unwrap().shape_the_connection());
        assert!(parse("fault=rsv1").unwrap().shape_the_connection());
    }

    #[test]
    fn the_description_lists_every_parameter_and_fault() {
        let description = describe(&ceilings());
        let names: Vec<&str> = description["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, NAMES);
        assert_eq!(description["faults"].as_array().unwrap().len(), 8);
        assert_eq!(description["ceilings"]["max_delay"], "30s");
    }
}
