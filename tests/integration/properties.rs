//! Property tests: arbitrary byte streams through a real connection, in memory and on
//! paused time (`exchange`). Two families of input, arbitrary handshakes and arbitrary
//! frame sequences after a valid one, and one positive property, that valid traffic is
//! echoed exactly. Every case is judged by `exchange::check`: no panic, the stream
//! closed within the timeouts, no task left behind, a well-formed reply no larger than a
//! bound set by the input, and echoes that are the client's valid messages in order.
//!
//! Case counts are set here (1,152 cases in all: about a second in a debug build on the
//! 2-core test machine); `PROPTEST_CASES=10000` sets every property's count for a longer
//! hunt (56 s there). Failures are kept in `proptest-regressions/` and replayed first.
//! A case that spins without ever waiting, which paused time cannot end, is caught by
//! the watchdog in `exchange`, which prints it and aborts.

use proptest::{prelude::*, sample::Index};

use crate::exchange::{self, H2_PREFACE, Message, Script};

/// Cases per property: `PROPTEST_CASES`, or this many.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(cases),
        ..ProptestConfig::default()
    }
}

/// Settings for a case: compression on or off, a small or default size limit, and the
/// origin and subprotocol policies.
fn settings() -> impl Strategy<Value = ws_echo::Settings> {
    (
        any::<bool>(),
        prop_oneof![Just(None), (16usize..4096, 16usize..4096).prop_map(Some)],
        any::<bool>(),
        0..3u8,
    )
        .prop_map(|(compression, limits, origins, subprotocols)| {
            let mut settings = ws_echo::Settings {
                instance_name: "prop".into(),
                ..ws_echo::Settings::default()
            };
            settings.compression.enabled = compression;
            if let Some((message, frame)) = limits {
                settings.max_message_size = message;
                settings.max_frame_size = frame;
            }
            if origins {
                settings.allowed_origins =
                    vec![ws_echo::OriginPattern::parse("https://*.example.com").expect("pattern")];
            }
            settings.subprotocols = match subprotocols {
                0 => ws_echo::SubprotocolPolicy::AcceptFirst,
                1 => ws_echo::SubprotocolPolicy::Only(vec!["chat".into()]),
                _ => ws_echo::SubprotocolPolicy::Never,
            };
            settings
        })
}

/// Splits `input` into chunks at `cuts`, each a separate read on the server.
fn chunked(input: Vec<u8>, cuts: &[Index]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|cut| cut.index(input.len() + 1)).collect();
    at.push(0);
    at.push(input.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| input[w[0]..w[1]].to_vec()).collect()
}

/// Builds a script, runs it, and fails the case on any broken property.
fn run_and_check(script: &Script) -> Result<exchange::Reply, TestCaseError> {
    let transcript = exchange::run(script);
    exchange::check(script, &transcript).map_err(|failure| {
        TestCaseError::fail(format!(
            "{failure}\ninput: b\"{}\"\nreply: b\"{}\"",
            script.input().escape_ascii(),
            transcript.reply[..transcript.reply.len().min(4096)].escape_ascii()
        ))
    })
}

// ---- Handshakes ------------------------------------------------------------------------

/// A base64 key: 16 random bytes (valid), or a wrong length, or not base64 at all.
fn key() -> impl Strategy<Value = Vec<u8>> {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    prop_oneof![
        24 => prop::array::uniform16(any::<u8>()).prop_map(|nonce| STANDARD.encode(nonce).into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..24).prop_map(|bytes| STANDARD.encode(bytes).into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..30),
        1 => Just(b"dGhlIHNhbXBsZSBub25jZQ".to_vec()),
    ]
}

/// A `Sec-WebSocket-Extensions` value: offers with known, unknown and malformed
/// parameters.
fn extensions_offer() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        6 => Just("permessage-deflate".to_owned()),
        1 => Just("PerMessage-Deflate".to_owned()),
        1 => Just("x-webkit-deflate-frame".to_owned()),
        1 => "[a-z-]{1,12}",
    ];
    let bits = prop_oneof![
        (8u8..=15).prop_map(|n| n.to_string()),
        Just("0".to_owned()),
        Just("16".to_owned()),
        Just("09".to_owned()),
        Just("\"10\"".to_owned()),
        Just("\"1\"0".to_owned()),
        Just(String::new()),
    ];
    let param = prop_oneof![
        Just("server_no_context_takeover".to_owned()),
        Just("client_no_context_takeover".to_owned()),
        Just("client_max_window_bits".to_owned()),
        bits.clone()
            .prop_map(|n| format!("client_max_window_bits={n}")),
        bits.prop_map(|n| format!("server_max_window_bits={n}")),
        "[a-z_]{1,10}(=[a-z0-9\"]{0,4})?",
    ];
    let offer = (name, prop::collection::vec(param, 0..4)).prop_map(|(name, params)| {
        std::iter::once(name)
            .chain(params)
            .collect::<Vec<_>>()
            .join("; ")
    });
    prop::collection::vec(offer, 1..4).prop_map(|offers| offers.join(", ").into_bytes())
}

/// Header values for the handshake's headers, valid most of the time.
fn header_value(valid: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        24 => prop::sample::select(valid).prop_map(|v| v.as_bytes().to_vec()),
        1 => "[ -~]{0,16}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..16),
    ]
}

/// One mutation of a serialized request.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(at, bits)| Mutation::Flip(at, bits)),
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

impl Mutation {
    fn apply(&self, bytes: &mut Vec<u8>) {
        match self {
            Self::Flip(at, bits) if !bytes.is_empty() => {
                let i = at.index(bytes.len());
                bytes[i] ^= bits;
            }
            Self::Insert(at, byte) => bytes.insert(at.index(bytes.len() + 1), *byte),
            Self::Delete(at) if !bytes.is_empty() => {
                bytes.remove(at.index(bytes.len()));
            }
            Self::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
            _ => {}
        }
    }
}

/// A request built from parts, mostly plausible, each part sometimes wrong.
#[derive(Debug, Clone)]
struct RequestSpec {
    method: String,
    path: String,
    version: String,
    headers: Vec<(String, Vec<u8>)>,
    mutations: Vec<Mutation>,
}

impl RequestSpec {
    fn bytes(&self) -> Vec<u8> {
        let mut bytes = format!("{} {} {}\r\n", self.method, self.path, self.version).into_bytes();
        for (name, value) in &self.headers {
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        for mutation in &self.mutations {
            mutation.apply(&mut bytes);
        }
        bytes
    }

    /// Whether the server must answer 101: an unmutated GET /ws over HTTP/1.1 that
    /// upgrades to websocket with exactly one version 13 and one valid key, only token
    /// subprotocols, and an allowed origin. Conservative: header values with anything
    /// but printable ASCII, or with spaces around them, count as invalid.
    fn is_valid_upgrade(&self, settings: &ws_echo::Settings) -> bool {
        use base64::Engine as _;
        let all = |name: &str| -> Vec<&[u8]> {
            self.headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_slice())
                .collect()
        };
        let has_token = |name: &str, token: &str| {
            all(name).iter().any(|v| {
                std::str::from_utf8(v)
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            })
        };
        let key_ok = match all("sec-websocket-key").as_slice() {
            [key] => base64::engine::general_purpose::STANDARD
                .decode(key)
                .is_ok_and(|nonce| nonce.len() == 16),
            _ => false,
        };
        let protocols_ok = all("sec-websocket-protocol").iter().all(|v| {
            std::str::from_utf8(v).is_ok_and(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .all(|t| {
                        t.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
                    })
            })
        });
        // `settings()` allows only https://*.example.com when it restricts origins.
        let origin_ok = settings.allowed_origins.is_empty()
            || all("origin").iter().all(|o| {
                let o = String::from_utf8_lossy(o).to_ascii_lowercase();
                o.strip_prefix("https://")
                    .and_then(|o| o.strip_suffix(".example.com"))
                    .is_some_and(|host| !host.contains('/'))
            });
        let printable = self.headers.iter().all(|(_, v)| {
            v.iter().all(|b| (0x20..0x7F).contains(b)) && !v.starts_with(b" ") && !v.ends_with(b" ")
        });
        self.mutations.is_empty()
            && printable
            && self.method == "GET"
            && self.path == "/ws"
            && self.version == "HTTP/1.1"
            && all("host").len() == 1
            && all("content-length").is_empty()
            && all("transfer-encoding").is_empty()
            && has_token("connection", "upgrade")
            && has_token("upgrade", "websocket")
            && all("sec-websocket-version") == [b"13"]
            && key_ok
            && protocols_ok
            && origin_ok
    }
}

/// Every header value must be a valid field value for the "valid" prediction to hold;
/// random bytes in them (CR, LF, NUL) make a malformed request, which is also a case.
fn request() -> impl Strategy<Value = RequestSpec> {
    let method = prop_oneof![
        24 => Just("GET".to_owned()),
        1 => prop::sample::select(&["get", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "PRI", "G ET"][..]).prop_map(str::to_owned),
        1 => "[A-Z]{1,8}",
    ];
    let path = prop_oneof![
        24 => Just("/ws".to_owned()),
        2 => prop::sample::select(&["/", "/ws?x=1", "/healthz", "/readyz", "/nope", "*", "http://test/ws", "//ws", "/ws/"][..]).prop_map(str::to_owned),
        1 => "/[!-~]{0,12}",
    ];
    let version = prop_oneof![
        24 => Just("HTTP/1.1".to_owned()),
        1 => prop::sample::select(&["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "HTTP/9.9", "http/1.1", ""][..]).prop_map(str::to_owned),
    ];
    let optional = |weight_some: u32, value: BoxedStrategy<Vec<u8>>| {
        prop_oneof![
            1 => Just(Vec::new()),
            weight_some => prop::collection::vec(value.clone(), 1..=1),
            1 => prop::collection::vec(value, 2..=3),
        ]
    };
    let headers = (
        optional(24, header_value(&["test", "localhost:3001"]).boxed()),
        optional(24, header_value(&["Upgrade", "upgrade", "upgrade, keep-alive", "keep-alive", "close"]).boxed()),
        optional(24, header_value(&["websocket", "websocket", "WebSocket", "h2c", "websocket, foo"]).boxed()),
        optional(24, header_value(&["13", "13", "13", "8", "13, 8", "", "013"]).boxed()),
        optional(24, key().boxed()),
        prop_oneof![3 => Just(Vec::new()), 2 => prop::collection::vec(extensions_offer(), 1..3)],
        prop_oneof![
            3 => Just(Vec::new()),
            2 => prop::collection::vec(header_value(&["chat", "chat, superchat", "mqtt,chat", "a b", ",,", "chat,"]), 1..3),
        ],
        prop_oneof![
            3 => Just(Vec::new()),
            1 => prop::collection::vec(header_value(&["https://app.example.com", "https://evil.example", "null"]), 1..3),
        ],
        prop::collection::vec(
            ("[A-Za-z-]{1,12}", header_value(&["0", "5", "chunked", "x"])),
            0..3,
        ),
        prop_oneof![6 => Just(Vec::new()), 1 => prop::collection::vec(header_value(&["0", "3", "abc"]), 1..3)],
    )
        .prop_map(|(host, connection, upgrade, version, key, extensions, protocols, origins, extra, length)| {
            let mut headers = Vec::new();
            let mut add = |name: &str, values: Vec<Vec<u8>>| {
                headers.extend(values.into_iter().map(|v| (name.to_owned(), v)));
            };
            add("Host", host);
            add("Connection", connection);
            add("Upgrade", upgrade);
            add("Sec-WebSocket-Version", version);
            add("Sec-WebSocket-Key", key);
            add("Sec-WebSocket-Extensions", extensions);
            add("Sec-WebSocket-Protocol", protocols);
            add("Origin", origins);
            add("Content-Length", length);
            headers.extend(extra);
            headers
        })
        .prop_shuffle();
    (
        method,
        path,
        version,
        headers,
        prop_oneof![4 => Just(Vec::new()), 1 => prop::collection::vec(mutation(), 1..4)],
    )
        .prop_map(|(method, path, version, headers, mutations)| RequestSpec {
            method,
            path,
            version,
            headers,
            mutations,
        })
}

proptest! {
    #![proptest_config(config(256))]

    /// Random bytes, sometimes after an HTTP/2 preface: whatever arrives, the server
    /// answers well-formed HTTP or nothing, and closes in time.
    #[test]
    fn random_bytes_get_a_well_formed_answer(
        settings in settings(),
        h2 in prop::bool::weighted(0.2),
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        cuts in prop::collection::vec(any::<Index>(), 0..4),
        close_write in prop::bool::weighted(0.8),
    ) {
        let mut input = if h2 { H2_PREFACE.to_vec() } else { Vec::new() };
        input.extend(bytes);
        let script = Script { settings, chunks: chunked(input, &cuts), close_write };
        run_and_check(&script)?;
    }

    /// Structured, mutated requests, possibly followed by frames and a second request:
    /// a 101 answers only a valid upgrade (checked against the request), every valid
    /// upgrade gets a 101, and the rest follows the rules above.
    #[test]
    fn arbitrary_handshakes_are_answered_correctly(
        settings in settings(),
        request in request(),
        after in prop_oneof![
            2 => Just(Vec::new()),
            1 => frames(true).prop_map(|frames| frames.concat()),
            1 => prop::collection::vec(any::<u8>(), 0..64),
            1 => request().prop_map(|second| second.bytes()),
        ],
        cuts in prop::collection::vec(any::<Index>(), 0..4),
        close_write in prop::bool::weighted(0.8),
    ) {
        let mut input = request.bytes();
        input.extend(after);
        let valid = request.is_valid_upgrade(&settings);
        let script = Script { settings, chunks: chunked(input, &cuts), close_write };
        let reply = run_and_check(&script)?;
        if valid {
            prop_assert_eq!(reply.statuses.first().copied(), Some(101), "a valid upgrade is refused");
        }
    }
}

// ---- Frames ------------------------------------------------------------------------------

/// How a frame writes its payload length.
#[derive(Debug, Clone, Copy)]
enum Length {
    /// The shortest form, as RFC 6455 §5.2 requires.
    Minimal,
    /// Always the 16-bit form (126).
    Wide16,
    /// Always the 64-bit form (127).
    Wide64,
    /// The shortest form of a length this far from the truth.
    Lie(i8),
}

/// One client frame, possibly malformed.
#[derive(Debug, Clone)]
struct FrameSpec {
    fin: bool,
    /// RSV1–RSV3 as bits 0b100, 0b010, 0b001.
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: Vec<u8>,
    length: Length,
    /// Deflate the payload and set RSV1 (RFC 7692 §7.2.1).
    compress: bool,
}

impl FrameSpec {
    fn encode(&self) -> Vec<u8> {
        let payload = if self.compress {
            crate::support::deflate(&self.payload)
        } else {
            self.payload.clone()
        };
        let rsv = self.rsv | if self.compress { 0b100 } else { 0 };
        let mut frame = vec![(u8::from(self.fin) << 7) | (rsv << 4) | (self.opcode & 0x0F)];
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let len = payload.len();
        match self.length {
            Length::Minimal | Length::Lie(_) => {
                let len = match self.length {
                    Length::Lie(delta) => len.saturating_add_signed(isize::from(delta)),
                    _ => len,
                };
                match len {
                    0..=125 => frame.push(mask_bit | len as u8),
                    126..=0xFFFF => {
                        frame.push(mask_bit | 126);
                        frame.extend_from_slice(&(len as u16).to_be_bytes());
                    }
                    _ => {
                        frame.push(mask_bit | 127);
                        frame.extend_from_slice(&(len as u64).to_be_bytes());
                    }
                }
            }
            Length::Wide16 => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(len.min(0xFFFF) as u16).to_be_bytes());
            }
            Length::Wide64 => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        match self.mask {
            Some(key) => {
                frame.extend_from_slice(&key);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => frame.extend_from_slice(&payload),
        }
        frame
    }
}

/// Byte sequences that are not UTF-8: a stray byte, a cut-off sequence, a surrogate, a
/// code point past U+10FFFF.
const INVALID_UTF8: &[&[u8]] = &[
    &[0xFF],
    &[0xC3],
    &[0xED, 0xA0, 0x80],
    &[0xF4, 0x90, 0x80, 0x80],
    &[0xE2, 0x82],
];

/// Payloads: text, invalid UTF-8, binary, and now and then a large one.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-z ]{0,40}".prop_map(String::into_bytes),
        2 => any::<String>().prop_map(String::into_bytes),
        2 => prop::collection::vec(any::<u8>(), 0..200),
        1 => prop::sample::select(INVALID_UTF8).prop_map(<[u8]>::to_vec),
        1 => (0usize..5000).prop_map(|n| vec![b'x'; n]),
    ]
}

/// A Close payload: a code (valid, reserved or nonsense) and a reason.
fn close_payload() -> impl Strategy<Value = Vec<u8>> {
    let code = prop_oneof![
        4 => prop::sample::select(&[1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999][..]),
        2 => prop::sample::select(&[0u16, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 2999, 5000, 65535][..]),
        1 => any::<u16>(),
    ];
    let reason = prop_oneof![
        3 => "[a-z ]{0,20}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..10),
        1 => Just(vec![b'r'; 124]),
    ];
    prop_oneof![
        6 => (code, reason).prop_map(|(code, reason)| [code.to_be_bytes().to_vec(), reason].concat()),
        1 => Just(Vec::new()),
        1 => any::<u8>().prop_map(|b| vec![b]),
    ]
}

/// A frame, mostly valid: each defect (bad opcode, reserved bits, no mask, a lying or
/// non-minimal length) comes up now and then.
fn frame(compression: bool) -> impl Strategy<Value = FrameSpec> {
    let opcode = prop_oneof![
        5 => Just(0x1u8),
        5 => Just(0x2),
        2 => Just(0x0),
        2 => Just(0x9),
        1 => Just(0xA),
        1 => Just(0x8),
        1 => 0u8..16,
    ];
    let mask = prop_oneof![
        39 => any::<[u8; 4]>().prop_map(Some),
        1 => Just(None),
    ];
    let length = prop_oneof![
        36 => Just(Length::Minimal),
        1 => Just(Length::Wide16),
        1 => Just(Length::Wide64),
        1 => (-3i8..=3).prop_map(Length::Lie),
    ];
    (
        prop::bool::weighted(0.8),
        prop_oneof![29 => Just(0u8), 1 => 0u8..8],
        opcode,
        mask,
        payload(),
        close_payload(),
        length,
        prop::bool::weighted(if compression { 0.4 } else { 0.02 }),
    )
        .prop_map(
            |(fin, rsv, opcode, mask, payload, close, length, compress)| {
                let control = opcode >= 0x8;
                let payload = match opcode {
                    0x8 => close,
                    _ if control => payload.into_iter().take(125).collect(),
                    _ => payload,
                };
                FrameSpec {
                    fin: fin || control,
                    rsv,
                    opcode,
                    mask,
                    payload,
                    length,
                    compress: compress && matches!(opcode, 0x1 | 0x2),
                }
            },
        )
}

/// A sequence of encoded frames, sometimes ending in a Close or in raw bytes.
fn frames(compression: bool) -> impl Strategy<Value = Vec<Vec<u8>>> {
    (
        prop::collection::vec(frame(compression), 0..12),
        prop_oneof![
            2 => Just(None),
            2 => close_payload().prop_map(Some),
        ],
        prop_oneof![6 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..40)],
    )
        .prop_map(|(frames, close, tail)| {
            let mut encoded: Vec<Vec<u8>> = frames.iter().map(FrameSpec::encode).collect();
            if let Some(close) = close {
                encoded.push(crate::support::encode_frame(true, false, 0x8, &close, true));
            }
            encoded.push(tail);
            encoded
        })
}

/// The permessage-deflate offer a client makes, if any.
fn offer() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        2 => Just(None),
        2 => Just(Some("permessage-deflate")),
        1 => Just(Some("permessage-deflate; client_no_context_takeover")),
        1 => Just(Some("permessage-deflate; server_max_window_bits=10; client_max_window_bits")),
    ]
}

/// A valid opening handshake with `offer`.
fn handshake(offer: Option<&str>) -> Vec<u8> {
    let extensions = offer.map_or_else(String::new, |offer| {
        format!("Sec-WebSocket-Extensions: {offer}\r\n")
    });
    format!(
        "GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extensions}\r\n"
    )
    .into_bytes()
}

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary frames after a valid handshake, compressed or not: the echoes are the
    /// client's valid messages in order, a valid Close is echoed after all of them, and a
    /// protocol violation is answered with 1002, 1003, 1007 or 1009.
    #[test]
    fn arbitrary_frames_are_echoed_or_refused(
        (settings, offer, frames) in (settings(), offer()).prop_flat_map(|(settings, offer)| {
            let compression = settings.compression.enabled && offer.is_some();
            let frames = prop_oneof![
                frames(compression).prop_map(|frames| frames.concat()),
                conversation(compression),
            ];
            (Just(settings), Just(offer), frames)
        }),
        cuts in prop::collection::vec(any::<Index>(), 0..6),
        close_write in prop::bool::weighted(0.8),
    ) {
        let input = [handshake(offer), frames].concat();
        let script = Script { settings, chunks: chunked(input, &cuts), close_write };
        let reply = run_and_check(&script)?;
        prop_assert_eq!(reply.statuses.first(), Some(&101));
    }

    /// Random bytes after a valid handshake.
    #[test]
    fn random_bytes_after_the_handshake_are_refused_cleanly(
        settings in settings(),
        offer in offer(),
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        cuts in prop::collection::vec(any::<Index>(), 0..4),
        close_write in prop::bool::weighted(0.8),
    ) {
        let input = [handshake(offer), bytes].concat();
        let script = Script { settings, chunks: chunked(input, &cuts), close_write };
        run_and_check(&script)?;
    }
}

// ---- Valid traffic -------------------------------------------------------------------------

/// A valid message and how it travels: fragment boundaries, Pings between fragments,
/// compressed or not.
#[derive(Debug, Clone)]
struct Traffic {
    message: Message,
    cuts: Vec<Index>,
    pings: Vec<Option<Vec<u8>>>,
    compress: bool,
    masks: [u8; 4],
}

fn traffic(max: usize) -> impl Strategy<Value = Traffic> {
    (
        any::<bool>(),
        prop_oneof![
            4 => 0..200usize,
            2 => 0..max,
        ],
        any::<u64>(),
        prop::collection::vec(any::<Index>(), 0..4),
        prop::collection::vec(
            prop::option::weighted(0.3, prop::collection::vec(any::<u8>(), 0..125)),
            5,
        ),
        any::<bool>(),
        any::<[u8; 4]>(),
    )
        .prop_map(|(text, len, seed, cuts, pings, compress, masks)| {
            // Text: a run of mixed-width characters, so fragments split them.
            let payload = if text {
                "aé€😀"
                    .chars()
                    .cycle()
                    .skip((seed % 4) as usize)
                    .scan(0, |size, c| {
                        *size += c.len_utf8();
                        (*size <= len).then_some(c)
                    })
                    .collect::<String>()
                    .into_bytes()
            } else {
                (0..len)
                    .map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8)
                    .collect()
            };
            Traffic {
                message: Message { text, payload },
                cuts,
                pings,
                compress,
                masks,
            }
        })
}

impl Traffic {
    /// The frames of this message with its Pings between fragments; compressed only
    /// if compression was agreed.
    fn frame_specs(&self, compression: bool) -> Vec<FrameSpec> {
        let compress = compression && self.compress;
        let body = if compress {
            crate::support::deflate(&self.message.payload)
        } else {
            self.message.payload.clone()
        };
        let pieces = chunked(body, &self.cuts);
        let pieces = if pieces.is_empty() {
            vec![Vec::new()]
        } else {
            pieces
        };
        let mut frames = Vec::new();
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            frames.push(FrameSpec {
                fin: i == last,
                rsv: if compress && i == 0 { 0b100 } else { 0 },
                opcode: match (i, self.message.text) {
                    (0, true) => 0x1,
                    (0, false) => 0x2,
                    _ => 0x0,
                },
                mask: Some(self.masks),
                payload: piece,
                length: Length::Minimal,
                compress: false,
            });
            if let Some(Some(ping)) = self.pings.get(i) {
                frames.push(FrameSpec {
                    fin: true,
                    rsv: 0,
                    opcode: 0x9,
                    mask: Some(self.masks),
                    payload: ping.clone(),
                    length: Length::Minimal,
                    compress: false,
                });
            }
        }
        frames
    }
}

/// One defect in an otherwise valid conversation.
#[derive(Debug, Clone)]
enum Defect {
    /// XOR into a frame's first byte: FIN, RSV1–3, opcode.
    FirstByte(Index, u8),
    /// Send a frame unmasked.
    Unmask(Index),
    /// Overwrite a payload byte (invalid UTF-8 in text, corrupt deflate data).
    PayloadByte(Index, Index, u8),
    /// Lie about a frame's length, or write it in a longer form than needed.
    Length(Index, Length),
    /// Drop a frame (a lost first fragment, a missing FIN).
    Drop(Index),
    /// Insert an arbitrary frame.
    Insert(Index, FrameSpec),
}

fn defect(compression: bool) -> impl Strategy<Value = Defect> {
    prop_oneof![
        (
            any::<Index>(),
            prop::sample::select(&[0x80u8, 0x40, 0x20, 0x10, 0x01, 0x02, 0x03, 0x08, 0x0B][..])
        )
            .prop_map(|(at, bits)| Defect::FirstByte(at, bits)),
        any::<Index>().prop_map(Defect::Unmask),
        (
            any::<Index>(),
            any::<Index>(),
            prop::sample::select(&[0xFFu8, 0xC3, 0x80, 0xED, 0x00][..])
        )
            .prop_map(|(at, byte, value)| Defect::PayloadByte(at, byte, value)),
        (
            any::<Index>(),
            prop_oneof![
                Just(Length::Wide16),
                Just(Length::Wide64),
                (-3i8..=3).prop_map(Length::Lie),
            ]
        )
            .prop_map(|(at, length)| Defect::Length(at, length)),
        any::<Index>().prop_map(Defect::Drop),
        (any::<Index>(), frame(compression)).prop_map(|(at, frame)| Defect::Insert(at, frame)),
    ]
}

impl Defect {
    fn apply(&self, frames: &mut Vec<FrameSpec>) {
        let pick = |at: &Index, frames: &Vec<FrameSpec>| {
            (!frames.is_empty()).then(|| at.index(frames.len()))
        };
        match self {
            Self::FirstByte(at, bits) => {
                if let Some(i) = pick(at, frames) {
                    let frame = &mut frames[i];
                    let first =
                        ((u8::from(frame.fin) << 7) | (frame.rsv << 4) | frame.opcode) ^ bits;
                    frame.fin = first & 0x80 != 0;
                    frame.rsv = (first >> 4) & 0b111;
                    frame.opcode = first & 0x0F;
                }
            }
            Self::Unmask(at) => {
                if let Some(i) = pick(at, frames) {
                    frames[i].mask = None;
                }
            }
            Self::PayloadByte(at, byte, value) => {
                if let Some(i) = pick(at, frames) {
                    let payload = &mut frames[i].payload;
                    if !payload.is_empty() {
                        let b = byte.index(payload.len());
                        payload[b] = *value;
                    }
                }
            }
            Self::Length(at, length) => {
                if let Some(i) = pick(at, frames) {
                    frames[i].length = *length;
                }
            }
            Self::Drop(at) => {
                if let Some(i) = pick(at, frames) {
                    frames.remove(i);
                }
            }
            Self::Insert(at, frame) => frames.insert(at.index(frames.len() + 1), frame.clone()),
        }
    }
}

/// A valid conversation (messages, Pings, maybe a Close) with up to three defects.
fn conversation(compression: bool) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(traffic(3000), 0..6),
        prop::option::weighted(0.6, close_payload()),
        prop::collection::vec(defect(compression), 0..4),
    )
        .prop_map(move |(messages, close, defects)| {
            let mut frames: Vec<FrameSpec> = messages
                .iter()
                .flat_map(|m| m.frame_specs(compression))
                .collect();
            if let Some(close) = close {
                frames.push(FrameSpec {
                    fin: true,
                    rsv: 0,
                    opcode: 0x8,
                    mask: Some([1, 2, 3, 4]),
                    payload: close,
                    length: Length::Minimal,
                    compress: false,
                });
            }
            for defect in &defects {
                defect.apply(&mut frames);
            }
            frames.iter().flat_map(FrameSpec::encode).collect()
        })
}

proptest! {
    #![proptest_config(config(128))]

    /// Valid messages of any size up to the limit, fragmented at random with Pings in
    /// between, compressed or not, are echoed exactly and in order, every Ping gets its
    /// Pong, and the closing handshake completes with the client's code.
    #[test]
    fn valid_messages_are_echoed_exactly_and_in_order(
        compression in any::<bool>(),
        messages in prop::collection::vec(traffic(20_000), 0..8),
        cuts in prop::collection::vec(any::<Index>(), 0..6),
        close_write in any::<bool>(),
    ) {
        let settings = ws_echo::Settings { instance_name: "prop".into(), ..Default::default() };
        let offer = compression.then_some("permessage-deflate");
        let mut input = handshake(offer);
        let mut pings = Vec::new();
        for message in &messages {
            for frame in message.frame_specs(compression) {
                if frame.opcode == 0x9 {
                    pings.push(frame.payload.clone());
                }
                input.extend(frame.encode());
            }
        }
        input.extend(crate::support::encode_frame(true, false, 0x8, b"\x03\xe8bye", true));
        let script = Script { settings, chunks: chunked(input, &cuts), close_write };
        let reply = run_and_check(&script)?;
        let websocket = reply.websocket.as_ref().expect("upgraded");
        prop_assert_eq!(websocket.extensions.is_some(), compression);
        let sent: Vec<&Message> = messages.iter().map(|m| &m.message).collect();
        let echoed: Vec<&Message> = websocket.messages.iter().collect();
        prop_assert_eq!(echoed, sent);
        prop_assert_eq!(&websocket.pongs, &pings);
        prop_assert_eq!(websocket.close.as_deref(), Some(&b"\x03\xe8bye"[..]));
    }
}
