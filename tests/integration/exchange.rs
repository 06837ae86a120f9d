//! One connection driven end to end, and the rules every reply must follow whatever the
//! client sent. A script of bytes goes to [`ws_echo::Server::spawn_connection`] over an
//! in-memory stream, on a current-thread runtime with paused time, so a case takes no
//! wall-clock time for its timeouts and runs the same way every time.
//!
//! Shared by the property tests (`properties`) and the fuzz target
//! (`fuzz/fuzz_targets/connection.rs` includes this file by path), so that a case found by
//! either is judged by the same rules. It needs only ws_echo's public API, tokio, flate2,
//! httparse, sha1 and base64.
//!
//! Two known deviations are tolerated, each where it is checked, until the server
//! changes: corrupt deflate data ends the connection without a Close, and an HTTP/1.0
//! upgrade gets a 101 and then nothing.

#![allow(dead_code, unreachable_pub)]

use std::{cell::RefCell, sync::Once, time::Duration};

use flate2::{Decompress, FlushDecompress, Status};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::Instant,
};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The largest response body the server has: the embedded page. Bounds what one request
/// can make the server send.
const PAGE_LEN: usize = include_str!("../../src/http/page/index.html").len();

/// Capacity of the in-memory pipe in each direction, as a socket buffer would be.
const PIPE: usize = 64 * 1024;

/// Most reply bytes kept for checking; more than this fails the memory bound anyway.
const REPLY_KEEP: usize = 64 << 20;

/// How long (virtual time) a case may run before it counts as hung.
const HORIZON: Duration = Duration::from_secs(3600);

/// How long (wall-clock time) a case may run. Paused time cannot end a task that spins
/// without ever waiting, so a watchdog thread does: it prints the case and aborts.
const WALL_LIMIT: Duration = Duration::from_secs(30);

/// What the client does on one connection.
#[derive(Debug, Clone)]
pub struct Script {
    /// The server's settings.
    pub settings: ws_echo::Settings,
    /// Written in order. The client yields a virtual millisecond before each, so the
    /// server reads every chunk on its own: chunk boundaries are read boundaries.
    pub chunks: Vec<Vec<u8>>,
    /// Shut down the write half after the last chunk. Otherwise the client stays
    /// connected and silent (but keeps reading) until the server closes.
    pub close_write: bool,
}

impl Script {
    /// Everything the client sends, in one piece.
    pub fn input(&self) -> Vec<u8> {
        self.chunks.concat()
    }

    /// The latest the server may close the stream after the client's last write: with
    /// the write half shut, the handshake and close timeouts plus a margin; held open,
    /// the keepalive's ping interval and timeout may be needed to notice the silence.
    pub fn close_bound(&self) -> Duration {
        let settings = &self.settings;
        let margin = Duration::from_secs(1);
        let mut bound = settings.handshake_timeout + settings.close_timeout + margin;
        if !self.close_write {
            let keepalive = settings
                .ping_interval
                .map_or(Duration::MAX, |interval| interval + settings.ping_timeout);
            let idle = settings.idle_timeout.unwrap_or(Duration::MAX);
            bound = bound.max(
                keepalive
                    .min(idle)
                    .saturating_add(settings.close_timeout + margin),
            );
        }
        bound
    }
}

/// What happened on the connection.
#[derive(Debug)]
pub struct Transcript {
    /// What the server wrote, up to [`REPLY_KEEP`] bytes.
    pub reply: Vec<u8>,
    /// How many bytes the server wrote in all.
    pub reply_len: usize,
    /// Virtual time from the client's last write (or its failure) to the end of the
    /// reply; `None` when the server had not closed the stream at the horizon.
    pub closed_after: Option<Duration>,
    /// Runtime tasks still alive a virtual second after the stream ended: a connection
    /// that has ended must leave none behind.
    pub tasks_left: usize,
    /// Connections [`ws_echo::Server::drain`] still found open at its deadline.
    pub undrained: usize,
    /// Panics in the server's tasks (which tokio would otherwise swallow).
    pub panics: Vec<String>,
}

thread_local! {
    /// Whether this thread is running a case, and the panics seen while it was.
    static CASE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Records panics on threads that are running a case, then does whatever the previous
/// hook did (print, or abort under the fuzzer). Every task of a case runs on the case's
/// thread (current-thread runtime), so a thread-local catches them all.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = CASE.try_with(|case| {
                if let Ok(mut case) = case.try_borrow_mut() {
                    if let Some(panics) = case.as_mut() {
                        panics.push(info.to_string());
                    }
                }
            });
            previous(info);
        }));
    });
}

/// Runs `script` against a fresh server and reports what happened.
pub fn run(script: &Script) -> Transcript {
    install_panic_hook();
    let (finished, watchdog) = std::sync::mpsc::channel::<()>();
    let case = format!(
        "settings: {:?}\nclose_write: {}\ninput: b\"{}\"",
        script.settings,
        script.close_write,
        script.input().escape_ascii()
    );
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watchdog.recv_timeout(WALL_LIMIT) {
            // Straight to stderr: the test harness's capture would lose `eprintln!`.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "a case spun for {WALL_LIMIT:?} of wall-clock time without finishing:\n{case}"
            );
            std::process::abort();
        }
    });
    CASE.with(|case| *case.borrow_mut() = Some(Vec::new()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let mut transcript = runtime.block_on(drive(script));
    drop(runtime);
    transcript.panics = CASE
        .with(|case| case.borrow_mut().take())
        .unwrap_or_default();
    let _ = finished.send(());
    transcript
}

async fn drive(script: &Script) -> Transcript {
    let server = ws_echo::Server::new(script.settings.clone());
    let (client, server_side) = tokio::io::duplex(PIPE);
    server.spawn_connection(server_side, "192.0.2.7:40000".parse().expect("address"));
    let (mut reader, mut writer) = tokio::io::split(client);
    let read = async {
        let mut reply = Vec::new();
        let mut total = 0;
        let mut buffer = vec![0; 16 * 1024];
        // An error is the end too: the server dropped the stream.
        while let Ok(n @ 1..) = reader.read(&mut buffer).await {
            total += n;
            let keep = n.min(REPLY_KEEP - reply.len());
            reply.extend_from_slice(&buffer[..keep]);
        }
        (reply, total, Instant::now())
    };
    let write = async {
        for chunk in &script.chunks {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if writer.write_all(chunk).await.is_err() {
                break;
            }
        }
        let done = Instant::now();
        if script.close_write {
            // Let the server take in everything first (paused time advances only when
            // every task waits). hyper drops a request still in flight when the read
            // side ends (`http1().half_close(false)`, its default), so a client that
            // shuts down at once may get no answer at all.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = writer.shutdown().await;
        }
        done
    };
    let outcome = tokio::time::timeout(HORIZON, async { tokio::join!(read, write) }).await;
    drop(writer);
    let (reply, reply_len, closed_after) = match outcome {
        Ok(((reply, total, ended), done)) => {
            (reply, total, Some(ended.saturating_duration_since(done)))
        }
        Err(_) => (Vec::new(), 0, None),
    };
    drop(reader);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tasks_left = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let undrained = server.drain().await;
    Transcript {
        reply,
        reply_len,
        closed_after,
        tasks_left,
        undrained,
        panics: Vec::new(),
    }
}

/// A data message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub text: bool,
    pub payload: Vec<u8>,
}

/// The server's reply, parsed and checked.
#[derive(Debug, Default)]
pub struct Reply {
    /// Status codes of the HTTP/1 responses, in order.
    pub statuses: Vec<u16>,
    /// How many HTTP/2 frames the server sent.
    pub h2_frames: usize,
    /// Bytes of HTTP (heads and bodies, or HTTP/2 frames).
    pub http_bytes: usize,
    /// The WebSocket, when a response was 101.
    pub websocket: Option<WebSocketReply>,
}

/// What the server sent after a 101.
#[derive(Debug, Default)]
pub struct WebSocketReply {
    /// Which request (counted from 0) the 101 answered.
    pub request_index: usize,
    /// `Sec-WebSocket-Accept`.
    pub accept: String,
    /// `Sec-WebSocket-Protocol`, if any.
    pub subprotocol: Option<String>,
    /// `Sec-WebSocket-Extensions`, if any: permessage-deflate was agreed.
    pub extensions: Option<String>,
    /// Data messages, decompressed.
    pub messages: Vec<Message>,
    /// Payloads of the Pongs the server sent.
    pub pongs: Vec<Vec<u8>>,
    /// How many Pings the server sent.
    pub pings: usize,
    /// The payload of the server's Close, if it sent one.
    pub close: Option<Vec<u8>>,
    /// Bytes of frames.
    pub bytes: usize,
}

/// Parses the server's reply to `input`, checking that it is well-formed: a sequence of
/// HTTP/1 responses, or HTTP/2 frames after an HTTP/2 preface, and after a 101 only valid
/// server frames (unmasked, RSV1 only on compressed first frames, control frames whole
/// and at most 125 bytes, a valid Close code, nothing after Close, text that is UTF-8,
/// and no message over `max_message_size`).
///
/// # Errors
///
/// What is wrong with the reply.
pub fn parse_reply(
    input: &[u8],
    reply: &[u8],
    settings: &ws_echo::Settings,
) -> Result<Reply, String> {
    let mut parsed = Reply::default();
    if reply.is_empty() {
        return Ok(parsed);
    }
    if !reply.starts_with(b"HTTP/") {
        if input.starts_with(H2_PREFACE) {
            parsed.h2_frames = parse_h2(reply)?;
            parsed.http_bytes = reply.len();
            return Ok(parsed);
        }
        return Err(format!(
            "reply is neither HTTP/1 nor HTTP/2: {:?}",
            preview(reply)
        ));
    }
    let mut rest = reply;
    let mut requests_answered = 0;
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err(format!("response head cut off: {:?}", preview(rest)));
            }
            Err(error) => {
                return Err(format!(
                    "malformed response head ({error}): {:?}",
                    preview(rest)
                ));
            }
        };
        let status = response.code.expect("a complete response has a status");
        if !(100..=599).contains(&status) {
            return Err(format!("status {status} out of range"));
        }
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        parsed.statuses.push(status);
        parsed.http_bytes += head_len;
        rest = &rest[head_len..];
        if status == 101 {
            let mut websocket = WebSocketReply {
                request_index: requests_answered,
                ..Default::default()
            };
            let has_token = |name: &str, token: &str| {
                header(name).is_some_and(|value| {
                    value
                        .split(',')
                        .any(|item| item.trim().eq_ignore_ascii_case(token))
                })
            };
            if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
                return Err("101 without Upgrade: websocket and Connection: upgrade".into());
            }
            websocket.accept = header("sec-websocket-accept").ok_or("101 without an accept key")?;
            if websocket.accept.len() != 28 {
                return Err(format!(
                    "accept key {:?} is not 20 bytes of base64",
                    websocket.accept
                ));
            }
            websocket.subprotocol = header("sec-websocket-protocol");
            websocket.extensions = header("sec-websocket-extensions");
            if let Some(extensions) = &websocket.extensions {
                if !extensions.starts_with("permessage-deflate") {
                    return Err(format!("unexpected extensions agreed: {extensions:?}"));
                }
            }
            parse_frames(rest, settings, &mut websocket)?;
            parsed.websocket = Some(websocket);
            return Ok(parsed);
        }
        if status < 200 {
            continue;
        }
        requests_answered += 1;
        if status == 204 || status == 304 {
            continue;
        }
        let body_len = if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            chunked_len(rest)?
        } else if let Some(length) = header("content-length") {
            let length: usize = length
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length {length:?}"))?;
            // The answer to HEAD has a length and no body; the next response, or the end,
            // follows at once. No body of ours starts like a status line.
            if length > 0 && (rest.is_empty() || rest.starts_with(b"HTTP/1.")) {
                0
            } else if rest.len() < length {
                return Err(format!("body cut off: {} of {length} bytes", rest.len()));
            } else {
                length
            }
        } else {
            // Delimited by the end of the connection.
            rest.len()
        };
        parsed.http_bytes += body_len;
        rest = &rest[body_len..];
    }
    Ok(parsed)
}

/// The length of a chunked body at the start of `data`, trailers included.
fn chunked_len(data: &[u8]) -> Result<usize, String> {
    let mut at = 0;
    loop {
        let line_end = find(&data[at..], b"\r\n").ok_or("chunk size line cut off")? + at;
        let size_text = std::str::from_utf8(&data[at..line_end]).map_err(|_| "chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        at = line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let end = find(&data[at..], b"\r\n").ok_or("trailer cut off")? + at;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Ok(at);
                }
            }
        }
        if data.len() < at + size + 2 || &data[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk cut off".into());
        }
        at += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Checks HTTP/2 framing: whole frames, the first a SETTINGS on stream 0.
fn parse_h2(reply: &[u8]) -> Result<usize, String> {
    let mut rest = reply;
    let mut frames = 0;
    while !rest.is_empty() {
        if rest.len() < 9 {
            return Err("HTTP/2 frame header cut off".into());
        }
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let kind = rest[3];
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
        if frames == 0 && (kind != 0x4 || stream != 0) {
            return Err("HTTP/2 reply does not start with SETTINGS".into());
        }
        if rest.len() < 9 + len {
            return Err("HTTP/2 frame cut off".into());
        }
        rest = &rest[9 + len..];
        frames += 1;
    }
    Ok(frames)
}

/// Whether a Close code may be sent on the wire (RFC 6455 §7.4; 1012, 1013 and 1014
/// are registered with IANA since).
pub fn close_code_is_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Parses and checks the server's frames.
fn parse_frames(
    mut rest: &[u8],
    settings: &ws_echo::Settings,
    websocket: &mut WebSocketReply,
) -> Result<(), String> {
    let compressed = websocket.extensions.is_some();
    let fresh_context = websocket
        .extensions
        .as_deref()
        .is_some_and(|e| e.contains("server_no_context_takeover"));
    let mut inflater = Decompress::new(false);
    let mut message: Option<(bool, bool, Vec<u8>)> = None;
    websocket.bytes = rest.len();
    while !rest.is_empty() {
        let frame = RawFrame::parse(rest)
            .ok_or_else(|| format!("server frame cut off: {:?}", preview(rest)))?;
        rest = &rest[frame.len..];
        // §5.5.1 forbids data after a Close, and a second Close makes no sense. A Pong
        // may still answer a Ping that crossed our Close: the RFC allows it.
        if websocket.close.is_some() && !matches!(frame.opcode, 0x9 | 0xA) {
            return Err(format!(
                "frame after the server's Close: opcode {}",
                frame.opcode
            ));
        }
        if frame.mask.is_some() {
            return Err("masked server frame".into());
        }
        if frame.rsv2 || frame.rsv3 {
            return Err("RSV2/RSV3 on a server frame".into());
        }
        if frame.opcode >= 0x8 && (!frame.fin || frame.payload.len() > 125 || frame.rsv1) {
            return Err(format!("malformed control frame {frame:?}"));
        }
        match frame.opcode {
            0x1 | 0x2 => {
                if message.is_some() {
                    return Err("new message inside a fragmented one".into());
                }
                if frame.rsv1 && !compressed {
                    return Err("RSV1 without permessage-deflate".into());
                }
                message = Some((frame.opcode == 0x1, frame.rsv1, frame.payload));
            }
            0x0 => {
                let Some((_, _, data)) = message.as_mut() else {
                    return Err("continuation with no message".into());
                };
                if frame.rsv1 {
                    return Err("RSV1 on a continuation".into());
                }
                data.extend_from_slice(&frame.payload);
            }
            0x8 => {
                if frame.payload.len() == 1 {
                    return Err("Close with a one-byte payload".into());
                }
                if frame.payload.len() >= 2 {
                    let code = u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
                    if !close_code_is_valid(code) {
                        return Err(format!("server sent Close code {code}"));
                    }
                    if std::str::from_utf8(&frame.payload[2..]).is_err() {
                        return Err("Close reason is not UTF-8".into());
                    }
                }
                websocket.close = Some(frame.payload);
                continue;
            }
            0x9 => {
                websocket.pings += 1;
                continue;
            }
            0xA => {
                websocket.pongs.push(frame.payload);
                continue;
            }
            other => return Err(format!("server sent reserved opcode {other:#x}")),
        }
        if !frame.fin {
            continue;
        }
        let (text, deflated, data) = message.take().expect("a data frame set a message");
        let payload = if deflated {
            if fresh_context {
                inflater.reset(false);
            }
            let mut payload = Vec::new();
            match inflate_into(
                &mut inflater,
                &data,
                true,
                settings.max_message_size,
                &mut payload,
            ) {
                Ok(()) => payload,
                Err(InflateError::TooBig) => return Err("echo larger than max_message_size".into()),
                Err(why) => return Err(format!("server's deflate data: {why:?}")),
            }
        } else {
            data
        };
        if payload.len() > settings.max_message_size {
            return Err(format!(
                "echo of {} bytes, over max_message_size {}",
                payload.len(),
                settings.max_message_size
            ));
        }
        if text && std::str::from_utf8(&payload).is_err() {
            return Err("server sent text that is not UTF-8".into());
        }
        websocket.messages.push(Message { text, payload });
    }
    if message.is_some() && websocket.close.is_some() {
        return Err("Close inside a fragmented message".into());
    }
    Ok(())
}

/// One frame in either direction, payload unmasked.
#[derive(Debug)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv1: bool,
    pub rsv2: bool,
    pub rsv3: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload: Vec<u8>,
    /// Bytes of the whole frame.
    pub len: usize,
}

/// Where a frame header ends and how long its payload is; `None` if cut off.
fn frame_header(data: &[u8]) -> Option<(usize, u64, Option<[u8; 4]>)> {
    if data.len() < 2 {
        return None;
    }
    let (length, mut at) = match data[1] & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(data.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(data.get(2..10)?.try_into().ok()?), 10),
        short => (u64::from(short), 2),
    };
    let mask = if data[1] & 0x80 != 0 {
        let key: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    Some((at, length, mask))
}

impl RawFrame {
    /// Parses the frame at the start of `data`, or `None` if it is cut off.
    pub fn parse(data: &[u8]) -> Option<Self> {
        let (header, length, mask) = frame_header(data)?;
        let end = header.checked_add(usize::try_from(length).ok()?)?;
        let mut payload = data.get(header..end)?.to_vec();
        if let Some(key) = mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= key[i % 4];
            }
        }
        Some(Self {
            fin: data[0] & 0x80 != 0,
            rsv1: data[0] & 0x40 != 0,
            rsv2: data[0] & 0x20 != 0,
            rsv3: data[0] & 0x10 != 0,
            opcode: data[0] & 0x0F,
            mask,
            payload,
            len: end,
        })
    }
}

/// Why inflating failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InflateError {
    /// More than the limit would come out.
    TooBig,
    /// Not a deflate stream (or one that makes no progress).
    Corrupt,
    /// A final block (BFINAL): the stream cannot go on to the next message.
    FinalBlock,
}

/// Inflates the next part of a permessage-deflate message into `out` (RFC 7692
/// §7.2.2), adding the empty block that ends the message when `finish`, and failing
/// once `out` grows past `limit`.
fn inflate_into(
    inflater: &mut Decompress,
    data: &[u8],
    finish: bool,
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<(), InflateError> {
    let tail: &[u8] = if finish {
        &[0x00, 0x00, 0xff, 0xff]
    } else {
        &[]
    };
    let input = [data, tail].concat();
    let mut at = 0;
    loop {
        out.reserve(16 * 1024);
        let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
        let status = inflater
            .decompress_vec(&input[at..], out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Corrupt)?;
        at += (inflater.total_in() - in_before) as usize;
        if out.len() > limit {
            return Err(InflateError::TooBig);
        }
        if status == Status::StreamEnd {
            return Err(InflateError::FinalBlock);
        }
        let progress = inflater.total_in() != in_before || inflater.total_out() != out_before;
        if at == input.len() && out.len() < out.capacity() {
            return Ok(());
        }
        if !progress && out.len() < out.capacity() {
            return Err(InflateError::Corrupt);
        }
    }
}

/// The model's name for corrupt deflate data from the client.
pub const CORRUPT_DEFLATE: &str = "corrupt deflate data";

/// The model's name for a new message inside a fragmented one, where either is compressed.
pub const INTERLEAVED_COMPRESSED: &str = "new compressed message inside a fragmented one";

/// How a client's WebSocket byte stream ends, judged by RFC 6455 and RFC 7692 with the
/// server's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A valid Close with this payload, after only valid frames.
    Close(Vec<u8>),
    /// The first invalid frame or message: the server must fail the connection.
    Violation(&'static str),
    /// Something the RFCs leave to the server (a 1012–1014 close code, a BFINAL block,
    /// a compressed fragment past the frame limit): no claim about what follows.
    Ambiguous(&'static str),
    /// The bytes end before a Close, possibly inside a frame.
    Unfinished,
}

/// What a client sent after the handshake: its complete valid messages in order, its
/// Pings, and how the stream ended.
#[derive(Debug, Clone)]
pub struct ClientModel {
    pub messages: Vec<Message>,
    pub pings: Vec<Vec<u8>>,
    pub end: End,
}

/// Reads the client's frames the way a conforming server must.
pub fn model_client(
    mut rest: &[u8],
    extensions: Option<&str>,
    settings: &ws_echo::Settings,
) -> ClientModel {
    let deflate = extensions.is_some();
    let fresh_context = extensions.is_some_and(|e| e.contains("client_no_context_takeover"));
    let mut model = ClientModel {
        messages: Vec::new(),
        pings: Vec::new(),
        end: End::Unfinished,
    };
    let mut inflater = Decompress::new(false);
    let mut message: Option<(bool, bool, Vec<u8>)> = None;
    let end = loop {
        if rest.len() < 2 {
            break End::Unfinished;
        }
        let (b0, b1) = (rest[0], rest[1]);
        let (fin, rsv1, opcode) = (b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x0F);
        let control = opcode >= 0x8;
        // What the first two bytes already tell (the frame guard and the engine refuse
        // these before the rest of the frame arrives).
        if b0 & 0x30 != 0 {
            break End::Violation("RSV2 or RSV3 set");
        }
        if matches!(opcode, 0x3..=0x7 | 0xB..=0xF) {
            break End::Violation("reserved opcode");
        }
        if control && b1 & 0x7F > 125 {
            break End::Violation("oversized control frame");
        }
        if rsv1 && (control || opcode == 0x0) {
            break End::Violation("RSV1 on a control frame or continuation");
        }
        // What the whole header tells.
        let Some((_, length, mask)) = frame_header(rest) else {
            break End::Unfinished;
        };
        if control && !fin {
            break End::Violation("fragmented control frame");
        }
        // A compressed frame may exceed the frame limit by deflate's worst-case
        // overhead (README: "Limits"), so that a message at the limit that does not
        // compress still passes.
        let compressed_frame =
            rsv1 || (opcode == 0x0 && message.as_ref().is_some_and(|(_, deflated, _)| *deflated));
        let frame_limit = if compressed_frame {
            let max = settings.max_frame_size as u64;
            max + max / 8 + 64
        } else {
            settings.max_frame_size as u64
        };
        // Control frames carry at most 125 bytes (checked above) and are exempt: a
        // frame limit below that must not break the closing handshake.
        if !control && length > frame_limit {
            break End::Violation("frame over max_frame_size");
        }
        let Some(frame) = RawFrame::parse(rest) else {
            break End::Unfinished;
        };
        rest = &rest[frame.len..];
        // The engine checks these only once the whole frame is in (§5.1, §5.2 leave
        // the moment open).
        if mask.is_none() {
            break End::Violation("unmasked client frame");
        }
        if rsv1 && !deflate {
            break End::Violation("RSV1 without permessage-deflate");
        }
        match opcode {
            0x8 => {
                break match frame.payload.len() {
                    0 => End::Close(frame.payload),
                    1 => End::Violation("one-byte Close payload"),
                    _ => {
                        let code = u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
                        if std::str::from_utf8(&frame.payload[2..]).is_err() {
                            End::Violation("Close reason is not UTF-8")
                        } else if (1012..=1014).contains(&code) {
                            End::Ambiguous("close code registered after RFC 6455")
                        } else if close_code_is_valid(code) {
                            End::Close(frame.payload)
                        } else {
                            End::Violation("invalid close code")
                        }
                    }
                };
            }
            0x9 => model.pings.push(frame.payload.clone()),
            0xA => {}
            0x1 | 0x2 => {
                if message.is_some()
                    && (rsv1 || message.as_ref().is_some_and(|(_, deflated, _)| *deflated))
                {
                    // The engine inflates a compressed frame, or any data frame while a
                    // compressed message is open, before the interleaving is noticed:
                    // corrupt data in it takes precedence.
                    break End::Violation(INTERLEAVED_COMPRESSED);
                }
                if message.is_some() {
                    break End::Violation("new message inside a fragmented one");
                }
                if rsv1 && fresh_context {
                    inflater.reset(false);
                }
                message = Some((opcode == 0x1, rsv1, Vec::new()));
            }
            _ => {
                if message.is_none() {
                    break End::Violation("continuation with no message");
                }
            }
        }
        if control {
            continue;
        }
        let (text, deflated, payload) = message.as_mut().expect("a data frame set a message");
        if *deflated {
            // Inflated frame by frame, as the engine does, so corrupt data is found at
            // the frame that carries it.
            let limit = settings.max_message_size;
            match inflate_into(&mut inflater, &frame.payload, fin, limit, payload) {
                Ok(()) => {}
                Err(InflateError::TooBig) => {
                    break End::Violation("inflated message over the limits");
                }
                Err(InflateError::Corrupt) => break End::Violation(CORRUPT_DEFLATE),
                Err(InflateError::FinalBlock) => {
                    break End::Ambiguous("final deflate block (BFINAL)");
                }
            }
        } else {
            payload.extend_from_slice(&frame.payload);
        }
        if payload.len() > settings.max_message_size {
            break End::Violation("message over max_message_size");
        }
        // §8.1: invalid text fails as soon as it is seen, not at the end of the message.
        if *text {
            if let Err(error) = std::str::from_utf8(payload) {
                if error.error_len().is_some() {
                    break End::Violation("text message is not UTF-8");
                }
            }
        }
        if !fin {
            continue;
        }
        let text = *text;
        let (_, _, payload) = message.take().expect("a data frame set a message");
        if text && std::str::from_utf8(&payload).is_err() {
            break End::Violation("text message is not UTF-8");
        }
        model.messages.push(Message { text, payload });
    };
    model.end = end;
    model
}

/// The request heads at the start of `input`, as (start offset, head length, has a
/// body), until one does not parse.
fn requests(input: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut found = Vec::new();
    let mut at = 0;
    while at < input.len() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = request.parse(&input[at..]) else {
            break;
        };
        let mut body = None;
        let mut unknown = false;
        for header in request.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                let length = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok());
                unknown |= body.is_some() || length.is_none();
                body = length;
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                unknown = true;
            }
        }
        let body_len = body.unwrap_or(0);
        found.push((at, head, unknown || body_len > 0));
        if unknown {
            break;
        }
        at += head + body_len;
    }
    found
}

/// Checks every property that holds whatever the client sent: no panic, the stream
/// closed in time, no task left behind, a well-formed reply, a bounded reply, and, after
/// an upgrade, echoes that are exactly the client's valid messages in order.
///
/// # Errors
///
/// The first property that failed.
pub fn check(script: &Script, transcript: &Transcript) -> Result<Reply, String> {
    if let Some(panic) = transcript.panics.first() {
        return Err(format!("the server panicked: {panic}"));
    }
    let bound = script.close_bound();
    match transcript.closed_after {
        None => {
            return Err(format!(
                "the server never closed the stream ({HORIZON:?} virtual)"
            ));
        }
        Some(after) if after > bound => {
            return Err(format!(
                "the server closed {after:?} after the last write, past {bound:?}"
            ));
        }
        Some(_) => {}
    }
    if transcript.tasks_left != 0 {
        return Err(format!(
            "{} tasks alive after the stream ended",
            transcript.tasks_left
        ));
    }
    if transcript.undrained != 0 {
        return Err(format!(
            "{} connections left at the drain deadline",
            transcript.undrained
        ));
    }
    let input = script.input();
    let settings = &script.settings;
    let reply = parse_reply(&input, &transcript.reply, settings)?;
    // One request of at least 9 bytes (an HTTP/2 frame header) brings at most the page.
    let http_bound = (input.len() / 9 + 1) * (PAGE_LEN + 2048);
    if reply.http_bytes > http_bound {
        return Err(format!(
            "{} HTTP bytes for {} bytes of input",
            reply.http_bytes,
            input.len()
        ));
    }
    let Some(websocket) = &reply.websocket else {
        if transcript.reply_len > http_bound {
            return Err(format!(
                "{} bytes for {} bytes of input",
                transcript.reply_len,
                input.len()
            ));
        }
        return Ok(reply);
    };
    let heads = requests(&input);
    let Some(&(start, head, has_body)) = heads.get(websocket.request_index) else {
        // hyper read a request that httparse does not: nothing to compare with.
        return Ok(reply);
    };
    if !check_handshake(&input[start..start + head], websocket)? {
        return Ok(reply);
    }
    let ws_input = &input[start + head..];
    // Uncompressed, an echo is no larger than what came in (a masked frame is 4 bytes
    // longer than its echo); a Close, a few keepalive Pings and one reassembled header
    // are the slack. Compressed, each frame of at least 2 bytes may inflate to one
    // message of the maximum size.
    let ws_bound = if websocket.extensions.is_none() {
        ws_input.len() + 512
    } else {
        (ws_input.len() / 2 + 1) * (settings.max_message_size + 16) + 512
    };
    if websocket.bytes > ws_bound {
        return Err(format!(
            "{} WebSocket bytes for {} bytes of input",
            websocket.bytes,
            ws_input.len()
        ));
    }
    if has_body {
        return Ok(reply);
    }
    let model = model_client(ws_input, websocket.extensions.as_deref(), settings);
    check_echoes(&model, websocket)?;
    Ok(reply)
}

/// The handshake properties: a 101 answers only a valid upgrade request (RFC 6455
/// §4.2.1), with the right accept key, a subprotocol the client offered, and compression
/// only if the client offered it. Returns whether the WebSocket runs after the 101.
fn check_handshake(request: &[u8], websocket: &WebSocketReply) -> Result<bool, String> {
    use base64::Engine as _;
    use sha1::Digest as _;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed
        .parse(request)
        .map_err(|error| format!("upgrade request does not parse: {error}"))?;
    let all = |name: &str| -> Vec<String> {
        parsed
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .collect()
    };
    let tokens = |name: &str| -> Vec<String> {
        all(name)
            .iter()
            .flat_map(|v| {
                v.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    if parsed.version == Some(0) {
        // Known deviation, left to the server's owners: §4.2.1 asks for HTTP/1.1 or
        // later, but an HTTP/1.0 upgrade gets "HTTP/1.0 101" and then hyper closes the
        // connection (HTTP/1.0 has no upgrade), so the WebSocket never runs.
        if websocket.bytes > 0 {
            return Err("frames after a 101 to an HTTP/1.0 request".into());
        }
        return Ok(false);
    }
    if parsed.method != Some("GET") {
        return Err(format!("101 for method {:?}", parsed.method));
    }
    if !tokens("connection").iter().any(|t| t == "upgrade")
        || !tokens("upgrade").iter().any(|t| t == "websocket")
    {
        return Err("101 for a request that asked for no upgrade".into());
    }
    if all("sec-websocket-version") != ["13"] {
        return Err(format!(
            "101 for versions {:?}",
            all("sec-websocket-version")
        ));
    }
    let keys = all("sec-websocket-key");
    let [key] = keys.as_slice() else {
        return Err(format!("101 for {} keys", keys.len()));
    };
    let engine = base64::engine::general_purpose::STANDARD;
    if engine.decode(key).map_or(true, |nonce| nonce.len() != 16) {
        return Err(format!("101 for the key {key:?}"));
    }
    let mut sha1 = sha1::Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let expected = engine.encode(sha1.finalize());
    if websocket.accept != expected {
        return Err(format!(
            "accept {:?} for key {key:?}, expected {expected:?}",
            websocket.accept
        ));
    }
    if let Some(protocol) = &websocket.subprotocol {
        let offered: Vec<String> = all("sec-websocket-protocol")
            .iter()
            .flat_map(|v| {
                v.split(',')
                    .map(|t| t.trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect();
        if !offered.contains(protocol) {
            return Err(format!(
                "subprotocol {protocol:?} was not offered: {offered:?}"
            ));
        }
    }
    if websocket.extensions.is_some()
        && !all("sec-websocket-extensions")
            .iter()
            .any(|v| v.to_ascii_lowercase().contains("permessage-deflate"))
    {
        return Err("permessage-deflate agreed without an offer".into());
    }
    Ok(true)
}

/// The echo properties: the server's messages are the client's valid messages, in
/// order, possibly cut short; a Pong answers each Ping in order; a valid Close is
/// echoed after every message; a violation gets a failing Close.
fn check_echoes(model: &ClientModel, websocket: &WebSocketReply) -> Result<(), String> {
    let echoed = &websocket.messages;
    let common = echoed.len().min(model.messages.len());
    if let Some(i) = (0..common).find(|&i| echoed[i] != model.messages[i]) {
        return Err(format!(
            "echo {i} differs: sent {:?}, echoed {:?}",
            preview(&model.messages[i].payload),
            preview(&echoed[i].payload)
        ));
    }
    let ambiguous = matches!(model.end, End::Ambiguous(_));
    if echoed.len() > model.messages.len() && !ambiguous {
        return Err(format!(
            "{} echoes for {} valid messages (stream ends: {:?})",
            echoed.len(),
            model.messages.len(),
            model.end
        ));
    }
    let pongs = &websocket.pongs;
    // After a violation the server may still read (and answer) Pings while it waits for
    // the client's Close; the model stops at the violation.
    let more_pings = ambiguous || matches!(model.end, End::Violation(_));
    if pongs.len() > model.pings.len() && !more_pings {
        return Err(format!(
            "{} Pongs for {} Pings",
            pongs.len(),
            model.pings.len()
        ));
    }
    if let Some(i) = (0..pongs.len().min(model.pings.len())).find(|&i| pongs[i] != model.pings[i]) {
        return Err(format!("Pong {i} does not carry its Ping's payload"));
    }
    match &model.end {
        End::Close(payload) => {
            if echoed.len() != model.messages.len() {
                return Err(format!(
                    "{} of {} messages echoed before a valid Close",
                    echoed.len(),
                    model.messages.len()
                ));
            }
            if pongs.len() != model.pings.len() {
                return Err(format!(
                    "{} Pongs for {} Pings before Close",
                    pongs.len(),
                    model.pings.len()
                ));
            }
            if websocket.close.as_ref() != Some(payload) {
                return Err(format!(
                    "client's Close {:?} answered with {:?}",
                    preview(payload),
                    websocket.close.as_deref().map(preview)
                ));
            }
        }
        End::Violation(what) => {
            let code = websocket
                .close
                .as_ref()
                .filter(|close| close.len() >= 2)
                .map(|close| u16::from_be_bytes([close[0], close[1]]));
            match code {
                Some(1002 | 1003 | 1007 | 1009) => {}
                other => {
                    return Err(format!("violation ({what}) answered with Close {other:?}"));
                }
            }
        }
        End::Ambiguous(_) | End::Unfinished => {}
    }
    Ok(())
}

/// The first bytes of `data`, for messages.
pub fn preview(data: &[u8]) -> String {
    let shown = &data[..data.len().min(80)];
    let mut text = String::from_utf8_lossy(shown).into_owned();
    if data.len() > shown.len() {
        text.push_str(&format!("… ({} bytes)", data.len()));
    }
    text
}
