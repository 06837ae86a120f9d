//! The generator's cheapest client (`--client raw`, the default): it writes one
//! pre-encoded masked frame per message and parses echoes straight from its read buffer.
//!
//! Why not a library client: with yawc's client (the generator's before this one) the
//! generator spent 0.40-0.45 µs of CPU per W1p message, as much as ws_echo itself, and
//! the ceiling server ran at 65% of its core while the generator's was full (echo_load
//! --against ceiling, 2026-11-25): the generator, not the server, set W1p's messages/s.
//! This client does no per-frame masking, allocation or frame objects. Every frame
//! carries the same masking key, which a server cannot tell from a random one: unmasking
//! costs it the same.
//!
//! Workloads that offer permessage-deflate (W5) offer it with `client_no_context_takeover`
//! (RFC 7692 §7.1.1.1): every copy of the message then compresses to the same bytes, so
//! it is compressed once, at handshake time, and the frame stays pre-encoded. Echoes that
//! come back compressed (RSV1) are inflated, and reported at their inflated length as
//! plain ones are. A server that declines the offer (the baseline, fastwebsockets, the
//! ceiling, ws_echo with `--no-compression`) gets plain frames, as from any client whose
//! offer is declined: W5 compares ws_echo with servers that have no compression.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::load::{Error, MAX_MESSAGE};

/// RFC 6455's sample key and the accept value it must produce (§1.3).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The masking key of every frame.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Each read asks for at least this much room.
const READ_CHUNK: usize = 16 * 1024;

/// Queued bytes above which `poll_ready` flushes before taking more.
const HIGH_WATER: usize = 256 * 1024;

/// Longest handshake response accepted.
const MAX_RESPONSE: usize = 8192;

/// The permessage-deflate offer. Without context takeover on our side every copy of the
/// message compresses alike, which is what lets the frame be pre-encoded.
const DEFLATE_OFFER: &str = "permessage-deflate; client_no_context_takeover";

/// RSV1 in a frame's first byte: set on compressed messages (RFC 7692 §6).
const RSV1: u8 = 0x40;

/// The end of every sync flush: removed from each compressed message by its sender and
/// put back by its receiver before inflating (RFC 7692 §7.2.1, §7.2.2).
const TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// A connected WebSocket client that sends one message over and over.
pub(crate) struct RawClient {
    stream: TcpStream,
    /// The message as one masked client frame.
    frame: Box<[u8]>,
    /// Frames queued since the last flush, and how much of them is written.
    output: Vec<u8>,
    written: usize,
    input: BytesMut,
    /// Set when permessage-deflate was agreed.
    inflater: Option<Inflater>,
}

impl RawClient {
    /// Upgrades `stream` to a WebSocket on `/ws` and prepares the frame that carries
    /// `message` with `opcode` (1 text, 2 binary); with `deflate`, offers
    /// permessage-deflate and, if the server agrees, compresses the message once here.
    pub(crate) async fn handshake(
        mut stream: TcpStream,
        addr: SocketAddr,
        opcode: u8,
        message: &[u8],
        deflate: bool,
    ) -> Result<Self, Error> {
        let offer = if deflate {
            format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
        } else {
            String::new()
        };
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|error| format!("raw handshake: {error}"))?;
        let mut input = BytesMut::with_capacity(READ_CHUNK);
        let end = loop {
            if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if input.len() > MAX_RESPONSE {
                return Err("raw handshake: response headers too long".into());
            }
            let read = stream
                .read_buf(&mut input)
                .await
                .map_err(|error| format!("raw handshake: {error}"))?;
            if read == 0 {
                return Err("raw handshake: closed before the response".into());
            }
        };
        let response = String::from_utf8_lossy(&input[..end]).into_owned();
        let accepted = response.lines().any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == ACCEPT
            })
        });
        if !response.starts_with("HTTP/1.1 101") || !accepted {
            let status = response.lines().next().unwrap_or_default();
            return Err(format!("raw handshake refused: {status}"));
        }
        let agreed = if deflate {
            deflate_answer(&response)
        } else {
            None
        };
        let (frame, inflater) = match agreed {
            Some(server_no_context_takeover) => (
                masked_frame(0x80 | RSV1 | opcode, &deflate_message(message)?),
                Some(Inflater {
                    decompress: Decompress::new(false),
                    fresh_each: server_no_context_takeover,
                    message: Vec::new(),
                }),
            ),
            None => (masked_frame(0x80 | opcode, message), None),
        };
        input.advance(end);
        Ok(Self {
            stream,
            frame,
            output: Vec::new(),
            written: 0,
            input,
            inflater,
        })
    }

    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.output.len() - self.written < HIGH_WATER {
            Poll::Ready(Ok(()))
        } else {
            self.poll_flush(cx)
        }
    }

    /// Queues one more copy of the message.
    pub(crate) fn start_send(&mut self) {
        self.output.extend_from_slice(&self.frame);
    }

    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while self.written < self.output.len() {
            let written =
                ready!(Pin::new(&mut self.stream).poll_write(cx, &self.output[self.written..]))
                    .map_err(|error| error.to_string())?;
            if written == 0 {
                return Poll::Ready(Err("the server stopped reading".into()));
            }
            self.written += written;
        }
        self.output.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// The payload length of the next text or binary echo, inflated if it came
    /// compressed; `None` once the server has closed. Pings and Pongs are skipped (rounds
    /// are far shorter than a keepalive).
    pub(crate) fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<usize>, Error>> {
        loop {
            let missing = match frame_at(&self.input) {
                Ok((first, header, len)) => {
                    // Only a compressed echo is looked at; every other frame is skipped by
                    // its length alone, so without deflate this test is all it costs.
                    if first & RSV1 != 0 {
                        let payload = &self.input[header..header + len];
                        let inflated = match (&mut self.inflater, first & 0x0F) {
                            (Some(inflater), 0x1 | 0x2) => inflater.inflate(payload),
                            (Some(_), opcode) => Err(format!("RSV1 on opcode {opcode:#x}")),
                            (None, _) => Err("RSV1 set without permessage-deflate agreed".into()),
                        };
                        self.input.advance(header + len);
                        return Poll::Ready(inflated.map(Some));
                    }
                    self.input.advance(header + len);
                    match first & 0x0F {
                        0x1 | 0x2 => return Poll::Ready(Ok(Some(len))),
                        0x8 => return Poll::Ready(Ok(None)),
                        0x9 | 0xA => continue,
                        other => return Poll::Ready(Err(format!("unexpected opcode {other:#x}"))),
                    }
                }
                Err(missing) => missing,
            };
            self.input.reserve(missing.max(READ_CHUNK));
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.stream),
                cx,
                &mut self.input
            ))
            .map_err(|error| error.to_string())?;
            if read == 0 {
                return Poll::Ready(Ok(None));
            }
        }
    }
}

/// Inflates the echoes that come back compressed.
struct Inflater {
    decompress: Decompress,
    /// The server answered `server_no_context_takeover` (ws_echo always does), so each
    /// echo inflates from a fresh state. Otherwise the server's compressor keeps its
    /// window from one message to the next, and so must ours.
    fresh_each: bool,
    /// The last echo, inflated; kept so that its room is reused.
    message: Vec<u8>,
}

impl Inflater {
    /// Inflates one compressed message's payload, with the trailer put back (§7.2.2),
    /// and returns its length.
    fn inflate(&mut self, payload: &[u8]) -> Result<usize, Error> {
        self.message.clear();
        let ended = inflate_into(&mut self.decompress, payload, &mut self.message)?;
        // A message may end its deflate stream with a final block (§7.2.3.4); the trailer
        // is then padding, and the next message starts a new stream.
        if !ended {
            inflate_into(&mut self.decompress, &TRAILER, &mut self.message)?;
        }
        if ended || self.fresh_each {
            self.decompress.reset(false);
        }
        Ok(self.message.len())
    }
}

/// Runs `state` over all of `input`, appending to `out` until zlib has nothing more to
/// give; `Ok(true)` when the deflate stream ended. Fails past [`MAX_MESSAGE`] bytes, so
/// that a runaway echo fails the round instead of exhausting memory.
fn inflate_into(
    state: &mut Decompress,
    mut input: &[u8],
    out: &mut Vec<u8>,
) -> Result<bool, Error> {
    loop {
        if out.len() == out.capacity() {
            // Compressed JSON inflates about tenfold; after the first echo the reused
            // buffer has room already.
            out.reserve(input.len().saturating_mul(4).max(READ_CHUNK));
        }
        let (in_before, out_before) = (state.total_in(), state.total_out());
        let status = state
            .decompress_vec(input, out, FlushDecompress::None)
            .map_err(|error| format!("inflating an echo: {error}"))?;
        // zlib consumes at most the slice it was given, whose length is a usize.
        input = &input[(state.total_in() - in_before) as usize..];
        if out.len() > MAX_MESSAGE {
            return Err(format!("an echo inflates past {MAX_MESSAGE} bytes"));
        }
        if status == Status::StreamEnd {
            return Ok(true);
        }
        // zlib stops only when it runs out of input or of output space: with space left
        // over it has given all it can.
        if out.len() < out.capacity() {
            if input.is_empty() {
                return Ok(false);
            }
            if (state.total_in(), state.total_out()) == (in_before, out_before) {
                return Err("inflating an echo: no progress on corrupt data".into());
            }
        }
    }
}

/// `message` compressed as RFC 7692 §7.2.1 says: raw deflate from a fresh state,
/// sync-flushed, the trailer removed. Level 1, as the yawc client compressed
/// (`CompressionLevel::fast()`).
fn deflate_message(message: &[u8]) -> Result<Vec<u8>, Error> {
    let mut compress = Compress::new(Compression::fast(), false);
    let mut out = Vec::new();
    let mut input = message;
    loop {
        // zlib wants more than six bytes of room around a sync flush, or it may write the
        // flush marker twice (zlib.h, deflate()). What is left takes at most its own size
        // plus stored-block headers (5 bytes per up to 64 KiB) and the flush.
        if out.capacity() - out.len() < 64 {
            out.reserve(input.len() + input.len() / 8192 + 64);
        }
        let before = compress.total_in();
        compress
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .map_err(|error| format!("deflating the message: {error}"))?;
        input = &input[(compress.total_in() - before) as usize..];
        // zlib returns with room left over only once the flush is complete.
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
    }
    if !out.ends_with(&TRAILER) {
        return Err("deflating the message: the sync flush did not end with 00 00 ff ff".into());
    }
    out.truncate(out.len() - TRAILER.len());
    Ok(out)
}

/// Whether the handshake `response` agreed to permessage-deflate: `None` when the server
/// declined, else whether it answered `server_no_context_takeover`.
fn deflate_answer(response: &str) -> Option<bool> {
    response
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-extensions"))
        .flat_map(|(_, value)| value.split(','))
        .find_map(|extension| {
            let mut params = extension.split(';').map(str::trim);
            params
                .next()
                .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
                .then(|| {
                    params.any(|param| param.eq_ignore_ascii_case("server_no_context_takeover"))
                })
        })
}

/// `payload` as one masked client frame whose first byte (FIN, RSV1, opcode) is `first`.
fn masked_frame(first: u8, payload: &[u8]) -> Box<[u8]> {
    let mut frame = vec![first];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&MASK);
    frame.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, byte)| byte ^ MASK[i % 4]),
    );
    frame.into_boxed_slice()
}

/// The unmasked server frame at the start of `bytes`: its first byte (FIN, RSV bits,
/// opcode), header length and payload length; or, when it is not all there yet, how many
/// more bytes at least are needed.
fn frame_at(bytes: &[u8]) -> Result<(u8, usize, usize), usize> {
    let [first, second, ..] = *bytes else {
        return Err(2 - bytes.len());
    };
    let (header, len) = match second & 0x7F {
        126 => match bytes.get(2..4) {
            Some(len) => (4, usize::from(u16::from_be_bytes([len[0], len[1]]))),
            None => return Err(4 - bytes.len()),
        },
        127 => match bytes.get(2..10) {
            Some(len) => (
                10,
                u64::from_be_bytes(len.try_into().expect("8 bytes")) as usize,
            ),
            None => return Err(10 - bytes.len()),
        },
        short => (2, usize::from(short)),
    };
    if bytes.len() < header + len {
        return Err(header + len - bytes.len());
    }
    Ok((first, header, len))
}
