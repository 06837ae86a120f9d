//! The fast lane for uncompressed connections: whole small messages are echoed where
//! they are read, and every data echo leaves through one ordered output queue.
//!
//! The engine's frame path (decode, split the read buffer, encode into its write buffer)
//! costs about 720 of the 1,369 user-space instructions of a pipelined 20-byte echo
//! (callgrind, `echo_load --callgrind W1p`, yawc 0.5). uWebSockets reaches the kernel's
//! ceiling by parsing and unmasking frames in place; this module does the same for the
//! frames that need nothing else: unfragmented text or binary, no reserved bits, masked,
//! and wholly inside one read. `frame_guard` calls [`echo_whole_frames`] on each read
//! before handing the rest to the engine, so a frame the lane declines (a control frame,
//! a fragment, invalid UTF-8, a frame cut by the read) and everything after it in that
//! read takes the engine's path, which owns every error and close code.
//!
//! Order is kept by one rule: the echo loop puts the echoes of engine-path messages in
//! the same [`Output`] queue, and the guard writes the queue out before any byte the
//! engine writes (Pong, Ping, Close). An echo is therefore never overtaken by a later one,
//! and never follows the Close that ends the connection: the lane stops
//! ([`Output::stop`]) when the client's Close passes the guard or before the server
//! sends its own.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::AsyncWrite;

use crate::assembly::{Kind, is_utf8};

/// A drained queue keeps its allocation up to this size for the next echoes; a larger
/// one (after a big message) is freed, so an idle connection holds at most this much.
const KEPT_CAPACITY: usize = 1024;

/// Echoes waiting to be written, in order, and what the lane echoed since the echo loop
/// last asked. Lives in the guard's shared state behind a mutex: the guard (inside the
/// engine) and the echo loop both add to it, in the connection's one task, so the lock
/// is never contended. It is taken once per read, once per flush and once per wake-up
/// of the echo loop, never per message.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Encoded server frames; `bytes[written..]` is still to be written.
    bytes: Vec<u8>,
    written: usize,
    /// No more echoes from the lane: a Close was received or is about to be sent.
    stopped: bool,
    /// The queue was over its limit when the guard last tried to read.
    stalled: bool,
    /// Messages and payload bytes the lane echoed, by [`Kind`] (text, binary), since
    /// [`Output::take_echoed`].
    echoed: [(u64, u64); 2],
}

/// What the lane echoed since the echo loop last asked, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Echoed {
    /// (messages, payload bytes) of text.
    pub(crate) text: (u64, u64),
    /// (messages, payload bytes) of binary.
    pub(crate) binary: (u64, u64),
}

impl Echoed {
    /// Whether nothing was echoed.
    pub(crate) fn is_empty(&self) -> bool {
        self.text.0 == 0 && self.binary.0 == 0
    }
}

impl Output {
    /// Bytes queued and not yet written.
    pub(crate) fn unwritten(&self) -> usize {
        self.bytes.len() - self.written
    }

    /// Whether the guard found the queue over its limit and stopped reading.
    pub(crate) fn stalled(&self) -> bool {
        self.stalled
    }

    pub(crate) fn set_stalled(&mut self, stalled: bool) {
        self.stalled = stalled;
    }

    /// Ends the lane: later frames all take the engine's path.
    pub(crate) fn stop(&mut self) {
        self.stopped = true;
    }

    /// Takes the counts of what the lane echoed.
    pub(crate) fn take_echoed(&mut self) -> Echoed {
        let [text, binary] = std::mem::take(&mut self.echoed);
        Echoed { text, binary }
    }

    /// Queues the echo of a whole message as one unmasked server frame.
    pub(crate) fn push_message(&mut self, kind: Kind, payload: &[u8]) {
        self.push_header(opcode(kind), payload.len());
        self.bytes.extend_from_slice(payload);
    }

    fn push_header(&mut self, opcode: u8, len: usize) {
        let first = 0x80 | opcode;
        match len {
            0..=125 => self.bytes.extend_from_slice(&[first, len as u8]),
            126..=0xFFFF => {
                self.bytes.extend_from_slice(&[first, 126]);
                self.bytes.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                self.bytes.extend_from_slice(&[first, 127]);
                self.bytes.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
    }

    /// Writes the queue out to `io`; ready once all of it is written.
    pub(crate) fn poll_write_out<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.written < self.bytes.len() {
            let n =
                std::task::ready!(Pin::new(&mut *io).poll_write(cx, &self.bytes[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if self.bytes.capacity() > KEPT_CAPACITY {
            self.bytes = Vec::new();
        } else {
            self.bytes.clear();
        }
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

fn opcode(kind: Kind) -> u8 {
    match kind {
        Kind::Text => 0x1,
        Kind::Binary => 0x2,
    }
}

/// Echoes the whole frames at the start of `bytes` (one read, starting at a frame
/// boundary, outside any fragmented message) that need nothing but unmasking: FIN set,
/// RSV bits clear, text or binary, masked, payload at most `max_payload` bytes and, for
/// text, valid UTF-8. Stops at the first frame that is anything else. Returns how many
/// bytes of `bytes` the echoed frames took; the caller hands the rest to the engine.
pub(crate) fn echo_whole_frames(bytes: &[u8], out: &mut Output, max_payload: usize) -> usize {
    if out.stopped {
        return 0;
    }
    let mut index = 0;
    while let [first, second, ..] = bytes[index..] {
        let kind = match first {
            0x81 => Kind::Text,
            0x82 => Kind::Binary,
            _ => break,
        };
        if second & 0x80 == 0 {
            // Unmasked: the engine fails the connection (RFC 6455 §5.1).
            break;
        }
        let (extended, len) = match second & 0x7F {
            126 => match bytes.get(index + 2..index + 4) {
                Some(&[high, low]) => (2, usize::from(u16::from_be_bytes([high, low]))),
                _ => break,
            },
            // 64-bit lengths are for messages far larger than one read.
            127 => break,
            short => (0, usize::from(short)),
        };
        if len > max_payload {
            break;
        }
        let payload_start = index + 2 + extended + 4;
        let Some(payload) = bytes.get(payload_start..payload_start + len) else {
            break;
        };
        let mask: [u8; 4] = bytes[payload_start - 4..payload_start]
            .try_into()
            .expect("invariant: the slice is 4 bytes long");
        let frame_start = out.bytes.len();
        out.push_header(opcode(kind), len);
        let echo_start = out.bytes.len();
        out.bytes.extend_from_slice(payload);
        unmask(&mut out.bytes[echo_start..], mask);
        if kind == Kind::Text && !is_utf8(&out.bytes[echo_start..]) {
            // The engine's path closes with 1007 and the reason.
            out.bytes.truncate(frame_start);
            break;
        }
        let counts = &mut out.echoed[match kind {
            Kind::Text => 0,
            Kind::Binary => 1,
        }];
        counts.0 += 1;
        counts.1 += len as u64;
        index = payload_start + len;
    }
    index
}

/// Longest frame [`is_cut_small_frame`] accepts: a 125-byte payload and its header.
const MAX_CARRIED: usize = 2 + 4 + 125;

/// Whether `rest` (what follows the lane's last echo in a read, at a frame boundary) is
/// the beginning of a frame the lane would take, cut by the end of the read: text or
/// binary with FIN and no RSV bits, masked, a payload of at most 125 bytes, incomplete.
/// Anything else (including 16-bit lengths) is left to the engine.
pub(crate) fn is_cut_small_frame(rest: &[u8]) -> bool {
    match *rest {
        [] => false,
        [first] => first == 0x81 || first == 0x82,
        [first, second, ..] => {
            let len = usize::from(second & 0x7F);
            (first == 0x81 || first == 0x82)
                && second & 0x80 != 0
                && len <= 125
                && rest.len() < 2 + 4 + len
                && rest.len() < MAX_CARRIED
        }
    }
}

/// XORs `payload` with the client's masking key (RFC 6455 §5.3), eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("invariant: 8-byte chunk"));
        chunk.copy_from_slice(&(word ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    /// A masked client frame.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
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
        frame.extend_from_slice(&KEY);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
        frame
    }

    /// The RFC 6455 §5.7 example: a single-frame unmasked text message "Hello".
    const HELLO_ECHO: [u8; 7] = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];

    #[test]
    fn whole_text_and_binary_frames_are_echoed_unmasked() {
        let mut read = client_frame(0x81, b"Hello");
        read.extend(client_frame(0x82, &[0xFF, 0x00, 0x80]));
        let mut out = Output::default();
        assert_eq!(echo_whole_frames(&read, &mut out, 1 << 20), read.len());
        let mut expected = HELLO_ECHO.to_vec();
        expected.extend_from_slice(&[0x82, 3, 0xFF, 0x00, 0x80]);
        assert_eq!(out.bytes, expected);
        assert_eq!(
            out.take_echoed(),
            Echoed {
                text: (1, 5),
                binary: (1, 3)
            }
        );
        assert!(out.take_echoed().is_empty(), "counts are taken once");
    }

    #[test]
    fn unmasking_matches_bytewise_xor_at_every_length() {
        for len in 0..40 {
            let payload: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let mut masked: Vec<u8> = payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ KEY[i % 4])
                .collect();
            unmask(&mut masked, KEY);
            assert_eq!(masked, payload, "length {len}");
        }
    }

    #[test]
    fn sixteen_bit_lengths_are_echoed_with_the_same_length_form() {
        let payload = vec![b'a'; 300];
        let read = client_frame(0x81, &payload);
        let mut out = Output::default();
        assert_eq!(echo_whole_frames(&read, &mut out, 1 << 20), read.len());
        assert_eq!(&out.bytes[..4], &[0x81, 126, 0x01, 0x2C]);
        assert_eq!(&out.bytes[4..], &payload[..]);
    }

    /// Everything the lane declines stops it, with the frames before it echoed.
    #[test]
    fn the_lane_stops_at_the_first_frame_it_declines() {
        let good = client_frame(0x81, b"ok");
        let declined: [(&str, Vec<u8>); 9] = [
            ("ping", client_frame(0x89, b"p")),
            ("close", client_frame(0x88, &[0x03, 0xE8])),
            ("first fragment", client_frame(0x01, b"frag")),
            ("continuation", client_frame(0x80, b"frag")),
            ("RSV1 (compressed)", client_frame(0xC1, b"x")),
            ("invalid UTF-8", client_frame(0x81, &[0xC0, 0x80])),
            ("unmasked", vec![0x81, 0x02, b'h', b'i']),
            ("over the size limit", client_frame(0x82, &[0; 101])),
            ("64-bit length", client_frame(0x82, &[0; 0x1_0000])),
        ];
        for (what, frame) in declined {
            let mut read = good.clone();
            read.extend_from_slice(&frame);
            read.extend_from_slice(&good);
            let mut out = Output::default();
            assert_eq!(
                echo_whole_frames(&read, &mut out, 100),
                good.len(),
                "{what}"
            );
            assert_eq!(out.bytes, [0x81, 2, b'o', b'k'], "{what}");
            assert_eq!(out.take_echoed().text, (1, 2), "{what}");
        }
    }

    #[test]
    fn a_frame_cut_by_the_read_is_left_to_the_engine() {
        let frame = client_frame(0x81, b"Hello");
        for cut in 0..frame.len() {
            let mut out = Output::default();
            assert_eq!(
                echo_whole_frames(&frame[..cut], &mut out, 100),
                0,
                "cut at {cut}"
            );
            assert!(out.bytes.is_empty());
        }
    }

    #[test]
    fn only_cut_small_lane_frames_are_carried() {
        let frame = client_frame(0x81, b"Hello");
        for cut in 1..frame.len() {
            assert!(is_cut_small_frame(&frame[..cut]), "cut at {cut}");
        }
        assert!(!is_cut_small_frame(&frame), "a whole frame is not cut");
        assert!(!is_cut_small_frame(&[]));
        let ping = client_frame(0x89, b"p");
        assert!(
            !is_cut_small_frame(&ping[..3]),
            "control frames go to the engine"
        );
        let long = client_frame(0x82, &[0; 200]);
        assert!(
            !is_cut_small_frame(&long[..10]),
            "16-bit lengths go to the engine"
        );
        let unmasked = [0x81, 0x05, b'H'];
        assert!(!is_cut_small_frame(&unmasked));
    }

    #[test]
    fn a_stopped_lane_echoes_nothing() {
        let mut out = Output::default();
        out.stop();
        assert_eq!(
            echo_whole_frames(&client_frame(0x81, b"late"), &mut out, 100),
            0
        );
        assert!(out.bytes.is_empty());
    }

    #[test]
    fn engine_path_echoes_use_the_same_framing() {
        let mut out = Output::default();
        out.push_message(Kind::Text, b"Hello");
        assert_eq!(out.bytes, HELLO_ECHO);
        let mut out = Output::default();
        out.push_message(Kind::Binary, &vec![7; 70_000]);
        assert_eq!(&out.bytes[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[tokio::test]
    async fn written_out_queue_is_empty_and_small_again() {
        let mut out = Output::default();
        out.push_message(Kind::Binary, &vec![1; 10_000]);
        let mut sink = Vec::new();
        std::future::poll_fn(|cx| out.poll_write_out(&mut sink, cx))
            .await
            .unwrap();
        assert_eq!(sink.len(), 10_004);
        assert_eq!(out.unwritten(), 0);
        assert_eq!(
            out.bytes.capacity(),
            0,
            "a large queue is freed once written"
        );
    }
}
