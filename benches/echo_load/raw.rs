//! The generator's cheapest client (`--client raw`, the default for workloads without
//! compression): it writes one pre-encoded masked frame per message and parses echoes
//! straight from its read buffer.
//!
//! Why not a library client: with yawc's client the generator spent 0.40-0.45 µs of CPU
//! per W1p message, as much as ws_echo itself, and the ceiling server ran at 65% of its
//! core while the generator's was full (echo_load --against ceiling, 2026-11-25): the
//! generator, not the server, set W1p's messages/s. This client does no per-frame
//! masking, allocation or frame objects. Every frame carries the same masking key, which
//! a server cannot tell from a random one: unmasking costs it the same.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::load::Error;

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

/// A connected WebSocket client that sends one message over and over.
pub(crate) struct RawClient {
    stream: TcpStream,
    /// The message as one masked client frame.
    frame: Box<[u8]>,
    /// Frames queued since the last flush, and how much of them is written.
    output: Vec<u8>,
    written: usize,
    input: BytesMut,
}

impl RawClient {
    /// Upgrades `stream` to a WebSocket on `/ws` and prepares the frame that carries
    /// `message` with `opcode` (1 text, 2 binary).
    pub(crate) async fn handshake(
        mut stream: TcpStream,
        addr: SocketAddr,
        opcode: u8,
        message: &[u8],
    ) -> Result<Self, Error> {
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
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
        input.advance(end);
        Ok(Self {
            stream,
            frame: masked_frame(opcode, message),
            output: Vec::new(),
            written: 0,
            input,
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

    /// The payload length of the next text or binary echo; `None` once the server has
    /// closed. Pings and Pongs are skipped (rounds are far shorter than a keepalive).
    pub(crate) fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<usize>, Error>> {
        loop {
            let missing = match frame_at(&self.input) {
                Ok((opcode, header, len)) => {
                    self.input.advance(header + len);
                    match opcode {
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

/// `message` as one final, masked client frame.
fn masked_frame(opcode: u8, message: &[u8]) -> Box<[u8]> {
    let mut frame = vec![0x80 | opcode];
    match message.len() {
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
        message
            .iter()
            .enumerate()
            .map(|(i, byte)| byte ^ MASK[i % 4]),
    );
    frame.into_boxed_slice()
}

/// The unmasked server frame at the start of `bytes`: opcode, header length and payload
/// length; or, when it is not all there yet, how many more bytes at least are needed.
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
    Ok((first & 0x0F, header, len))
}
