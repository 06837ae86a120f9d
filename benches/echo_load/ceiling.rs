//! The ceiling: about the least a WebSocket echo on tokio can cost per message, run as
//! its own process when the bench binary is started with [`ARG`] (`--against ceiling`).
//!
//! It does what uWebSockets does on the hot path and nothing else: one read, every
//! whole frame in it unmasked in place and appended to one output buffer, one write.
//! It checks nothing (no UTF-8, no limits, no reserved bits, no timeouts, no
//! compression), so it is not a server anyone should run: it is the yardstick that
//! shows how much of ws_echo's cost is the kernel's TCP work, which no server avoids,
//! and how much is ws_echo's own. Same pinning as the other servers, and the runtime
//! ws_echo picks on one CPU: tokio's current-thread one, the cheaper of the two.

use std::{io, process::ExitCode};

use base64::Engine as _;
use bytes::{Buf, BytesMut};
use sha1::{Digest, Sha1};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The hidden argument that turns the bench binary into the ceiling server.
pub(crate) const ARG: &str = "--ceiling-server";

/// The stderr line prefix the bench reads the address from.
pub(crate) const LISTENING: &str = "echo_load ceiling listening on ";

/// Each read asks for at least this much room; a connection's buffer starts this size.
const READ_CHUNK: usize = 4096;

/// Longest handshake request accepted.
const MAX_REQUEST: usize = 8192;

/// Serves WebSocket echo on 127.0.0.1:0 until killed.
pub(crate) fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the ceiling's runtime starts");
    runtime.block_on(async {
        let listener = crate::servers::listen_and_report(LISTENING).await;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = connection(stream).await;
            });
        }
    })
}

/// One connection: the handshake, then read, echo every whole frame, write, repeat.
async fn connection(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let request_end = loop {
        if stream.read_buf(&mut input).await? == 0 {
            return Ok(());
        }
        if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if input.len() > MAX_REQUEST {
            return Ok(());
        }
    };
    let Some(key) = header(&input[..request_end], "sec-websocket-key") else {
        stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha1.finalize());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
         sec-websocket-accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await?;
    input.advance(request_end);

    let mut output = Vec::new();
    loop {
        let mut consumed = 0;
        let mut closing = false;
        while let Some(frame) = next_frame(&input[consumed..]) {
            let (first, payload) = frame.unmasked(&mut input[consumed..]);
            let first = match first & 0x0F {
                0x8 => {
                    closing = true;
                    first
                }
                // Ping: answered with a Pong carrying its payload.
                0x9 => 0x80 | 0xA,
                // Pong: nothing to answer.
                0xA => {
                    consumed += frame.len;
                    continue;
                }
                _ => first,
            };
            push_header(&mut output, first, payload.len());
            output.extend_from_slice(payload);
            consumed += frame.len;
            if closing {
                break;
            }
        }
        input.advance(consumed);
        if !output.is_empty() {
            stream.write_all(&output).await?;
            output.clear();
        }
        if closing {
            return Ok(());
        }
        if input.capacity() - input.len() < READ_CHUNK {
            input.reserve(READ_CHUNK);
        }
        if stream.read_buf(&mut input).await? == 0 {
            return Ok(());
        }
    }
}

/// A whole frame at the start of a buffer.
struct FrameAt {
    /// Header length, including the masking key.
    header: usize,
    mask: Option<[u8; 4]>,
    /// Header plus payload.
    len: usize,
}

/// The frame at the start of `bytes`, if all of it is there.
fn next_frame(bytes: &[u8]) -> Option<FrameAt> {
    let [_, second, ..] = *bytes else {
        return None;
    };
    let (extended, payload) = match second & 0x7F {
        126 => (
            2,
            usize::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
        ),
        127 => (
            8,
            usize::try_from(u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)).ok()?,
        ),
        short => (0, usize::from(short)),
    };
    let masked = second & 0x80 != 0;
    let header: usize = 2 + extended + if masked { 4 } else { 0 };
    let len = header.checked_add(payload)?;
    if bytes.len() < len {
        return None;
    }
    let mask = masked.then(|| {
        bytes[header - 4..header]
            .try_into()
            .expect("invariant: a masked header ends with 4 key bytes")
    });
    Some(FrameAt { header, mask, len })
}

impl FrameAt {
    /// Unmasks the payload in place; returns the first header byte and the payload.
    fn unmasked<'a>(&self, bytes: &'a mut [u8]) -> (u8, &'a [u8]) {
        let first = bytes[0];
        let payload = &mut bytes[self.header..self.len];
        if let Some(mask) = self.mask {
            let wide = u64::from_ne_bytes([
                mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
            ]);
            let mut chunks = payload.chunks_exact_mut(8);
            for chunk in &mut chunks {
                let word = u64::from_ne_bytes((&*chunk).try_into().expect("chunks of 8"));
                chunk.copy_from_slice(&(word ^ wide).to_ne_bytes());
            }
            for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
        }
        (first, payload)
    }
}

/// Appends an unmasked server frame header.
fn push_header(output: &mut Vec<u8>, first: u8, len: usize) {
    output.push(first);
    match len {
        0..=125 => output.push(len as u8),
        126..=0xFFFF => {
            output.push(126);
            output.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            output.push(127);
            output.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// The value of header `name` in a raw HTTP request, trimmed.
fn header<'a>(request: &'a [u8], name: &str) -> Option<&'a [u8]> {
    request.split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name.as_bytes())
            .then(|| line[colon + 1..].trim_ascii())
    })
}
