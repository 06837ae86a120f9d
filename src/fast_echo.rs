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
//! a fragment, invalid UTF-8) and everything after it in that read takes the engine's
//! path, which owns every error and close code.
//!
//! A larger frame of the same kind that a read cuts is taken too ([`Output::start_frame`]):
//! its header goes into the queue, and the guard reads the rest of its payload straight
//! into the queue behind it, unmasking and (for text) validating as it comes, instead of
//! the engine's growing reads from its 384-byte buffer. (A frame of up to 64 KiB that
//! arrives whole usually comes in one read, into the guard's scratch buffer, and is
//! echoed by [`echo_whole_frames`].) The queue writes out only *committed* bytes: a frame in
//! progress is committed when its last byte has arrived and its text is valid.
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

use bytes::BytesMut;
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
    /// Encoded server frames; `bytes[written..committed]` is ready to be written, and
    /// `bytes[committed..]` is the frame in progress, if any.
    bytes: BytesMut,
    written: usize,
    committed: usize,
    /// The frame whose payload is still arriving.
    frame: Option<FrameInProgress>,
    /// No more echoes from the lane: a Close was received or is about to be sent.
    stopped: bool,
    /// The queue was over its limit when the guard last tried to read.
    stalled: bool,
    /// Messages and payload bytes the lane echoed, by [`Kind`] (text, binary), since
    /// [`Output::take_echoed`].
    echoed: [(u64, u64); 2],
}

/// A frame the lane is receiving straight into the queue.
#[derive(Debug)]
struct FrameInProgress {
    kind: Kind,
    mask: [u8; 4],
    /// Payload length announced by the header.
    len: usize,
    /// Payload bytes received so far.
    received: usize,
    /// Of those, how many are known to be valid UTF-8 (text only): a character cut by
    /// a read is checked when the next bytes arrive.
    valid_utf8: usize,
    /// Where the payload starts in the queue.
    payload_start: usize,
    /// Bytes read from the socket for this frame so far (header included).
    wire_bytes: usize,
}

/// What a read into a frame in progress came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameProgress {
    /// More payload is to come; this many bytes of the wire are held for it so far.
    Partial(usize),
    /// The frame is whole and committed.
    Done,
    /// The text is not valid UTF-8: the frame is dropped and the connection must close
    /// with 1007.
    InvalidUtf8,
}

/// What the lane echoed since the echo loop last asked, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Echoed {
    /// (messages, payload bytes) of text.
    pub(crate) text: (u64, u64),
    /// (messages, payload bytes) of binary.
    pub(crate) binary: (u64, u64),
}

impl Output {
    /// Bytes ready to be written and not written yet.
    pub(crate) fn unwritten(&self) -> usize {
        self.committed - self.written
    }

    /// Whether a frame's payload is arriving into the queue.
    pub(crate) fn frame_in_progress(&self) -> bool {
        self.frame.is_some()
    }

    /// Makes everything queued so far ready to be written.
    fn commit(&mut self) {
        self.committed = self.bytes.len();
    }

    /// Whether the guard found the queue over its limit and stopped reading.
    pub(crate) fn stalled(&self) -> bool {
        self.stalled
    }

    pub(crate) fn set_stalled(&mut self, stalled: bool) {
        self.stalled = stalled;
    }

    /// Ends the lane: later frames all take the engine's path, and a frame in progress
    /// is dropped (its message never arrived whole, so it is not echoed).
    pub(crate) fn stop(&mut self) {
        self.stopped = true;
        self.drop_frame();
    }

    /// Drops the frame in progress, if any.
    pub(crate) fn drop_frame(&mut self) {
        if self.frame.take().is_some() {
            self.bytes.truncate(self.committed);
        }
    }

    /// Takes the counts of what the lane echoed.
    pub(crate) fn take_echoed(&mut self) -> Echoed {
        let [text, binary] = std::mem::take(&mut self.echoed);
        Echoed { text, binary }
    }

    /// Queues the echo of a whole message as one unmasked server frame, before any
    /// frame in progress (whose message came later).
    pub(crate) fn push_message(&mut self, kind: Kind, payload: &[u8]) {
        // Not reached in practice: while a frame is in progress the engine is given
        // nothing, so the echo loop has nothing new to queue.
        let in_progress = self
            .frame
            .is_some()
            .then(|| self.bytes.split_off(self.committed));
        let start = self.bytes.len();
        self.push_header(opcode(kind), payload.len());
        self.bytes.extend_from_slice(payload);
        self.commit();
        if let (Some(frame), Some(in_progress)) = (&mut self.frame, in_progress) {
            frame.payload_start += self.bytes.len() - start;
            self.bytes.unsplit(in_progress);
        }
    }

    /// Starts receiving the frame at the start of `rest` (what a read left after
    /// [`echo_whole_frames`], at a frame boundary) into the queue, if the lane takes it:
    /// FIN, no RSV bits, masked, text or binary, a whole header, a payload of at most
    /// `max_payload` bytes that `rest` does not hold whole. Returns whether it did;
    /// then all of `rest` is taken.
    pub(crate) fn start_frame(&mut self, rest: &[u8], max_payload: usize) -> Option<FrameProgress> {
        if self.stopped || self.frame.is_some() {
            return None;
        }
        let (kind, header_len, len) = lane_header(rest)?;
        if len > max_payload || rest.len() >= header_len + len {
            return None;
        }
        let mask: [u8; 4] = rest[header_len - 4..header_len]
            .try_into()
            .expect("invariant: the slice is 4 bytes long");
        self.push_header(opcode(kind), len);
        let payload_start = self.bytes.len();
        self.frame = Some(FrameInProgress {
            kind,
            mask,
            len,
            received: 0,
            valid_utf8: 0,
            payload_start,
            wire_bytes: header_len,
        });
        self.bytes.extend_from_slice(&rest[header_len..]);
        Some(self.frame_received(rest.len() - header_len))
    }

    /// Room to read the rest of the frame in progress into: the queue's spare capacity,
    /// limited to the payload still to come plus `past_the_frame` bytes; and the payload
    /// still to come. Then [`Output::surplus`] and [`Output::drop_surplus`] for what came
    /// past the frame, and [`Output::frame_received`] for the rest.
    pub(crate) fn frame_buffer(
        &mut self,
        past_the_frame: usize,
    ) -> Option<(bytes::buf::Limit<&mut BytesMut>, usize)> {
        let remaining = self
            .frame
            .as_ref()
            .map(|frame| frame.len - frame.received)?;
        self.bytes.reserve(remaining + past_the_frame);
        let room = bytes::BufMut::limit(&mut self.bytes, remaining + past_the_frame);
        Some((room, remaining))
    }

    /// The last `n` bytes read into the queue: those past the frame in progress, still
    /// masked.
    pub(crate) fn surplus(&self, n: usize) -> &[u8] {
        &self.bytes[self.bytes.len() - n..]
    }

    /// Removes the last `n` bytes read into the queue.
    pub(crate) fn drop_surplus(&mut self, n: usize) {
        self.bytes.truncate(self.bytes.len() - n);
    }

    /// Unmasks and checks `n` payload bytes just appended to the frame in progress, and
    /// commits the frame when it is whole.
    pub(crate) fn frame_received(&mut self, n: usize) -> FrameProgress {
        let Some(frame) = &mut self.frame else {
            return FrameProgress::Done;
        };
        let new_start = frame.payload_start + frame.received;
        let phase = frame.received % 4;
        let mask = [0, 1, 2, 3].map(|i| frame.mask[(phase + i) % 4]);
        unmask(&mut self.bytes[new_start..new_start + n], mask);
        frame.received += n;
        frame.wire_bytes += n;
        if frame.kind == Kind::Text {
            let unchecked = &self.bytes[frame.payload_start + frame.valid_utf8..new_start + n];
            if unchecked.is_ascii() {
                frame.valid_utf8 = frame.received;
            } else {
                match std::str::from_utf8(unchecked) {
                    Ok(_) => frame.valid_utf8 = frame.received,
                    // A character cut by the read: the next bytes may finish it.
                    Err(error) if error.error_len().is_none() => {
                        frame.valid_utf8 += error.valid_up_to();
                    }
                    Err(_) => {
                        self.drop_frame();
                        return FrameProgress::InvalidUtf8;
                    }
                }
            }
        }
        if frame.received < frame.len {
            return FrameProgress::Partial(frame.wire_bytes);
        }
        if frame.kind == Kind::Text && frame.valid_utf8 != frame.len {
            // The message ends inside a character.
            self.drop_frame();
            return FrameProgress::InvalidUtf8;
        }
        let (kind, len) = (frame.kind, frame.len);
        self.frame = None;
        self.count(kind, len);
        self.commit();
        FrameProgress::Done
    }

    fn count(&mut self, kind: Kind, len: usize) {
        let counts = &mut self.echoed[match kind {
            Kind::Text => 0,
            Kind::Binary => 1,
        }];
        counts.0 += 1;
        counts.1 += len as u64;
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

    /// Writes the committed part of the queue out to `io`; ready once all of it is
    /// written.
    pub(crate) fn poll_write_out<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.written < self.committed {
            let ready = &self.bytes[self.written..self.committed];
            let n = std::task::ready!(Pin::new(&mut *io).poll_write(cx, ready))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if self.frame.is_some() {
            // The frame in progress stays where it is.
            return Poll::Ready(Ok(()));
        }
        if self.bytes.capacity() > KEPT_CAPACITY {
            self.bytes = BytesMut::new();
        } else {
            self.bytes.clear();
        }
        self.written = 0;
        self.committed = 0;
        Poll::Ready(Ok(()))
    }
}

/// The kind, header length and payload length of a lane frame whose header starts
/// `bytes` and lies whole in it: FIN, no RSV bits, text or binary, masked.
fn lane_header(bytes: &[u8]) -> Option<(Kind, usize, usize)> {
    let [first, second, ..] = *bytes else {
        return None;
    };
    let kind = match first {
        0x81 => Kind::Text,
        0x82 => Kind::Binary,
        _ => return None,
    };
    if second & 0x80 == 0 {
        return None;
    }
    let (extended, len) = match second & 0x7F {
        126 => (
            2,
            u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
        ),
        127 => (8, u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)),
        short => (0, u64::from(short)),
    };
    let header_len = 2 + extended + 4;
    if bytes.len() < header_len {
        return None;
    }
    Some((kind, header_len, usize::try_from(len).ok()?))
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
    if out.stopped || out.frame.is_some() {
        return 0;
    }
    let mut index = 0;
    // Unmasked frames, among others, have no lane header: the engine fails them
    // (RFC 6455 §5.1).
    while let Some((kind, header_len, len)) = lane_header(&bytes[index..]) {
        // 64-bit lengths are for messages far larger than one read.
        if header_len == 2 + 8 + 4 || len > max_payload {
            break;
        }
        let payload_start = index + header_len;
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
        out.count(kind, len);
        index = payload_start + len;
    }
    if index > 0 {
        out.commit();
    }
    index
}

/// Whether `rest` (what follows the lane's last echo in a read, at a frame boundary) is
/// the beginning of a frame the lane would take, cut by the end of the read, and short:
/// a cut header (at most 13 bytes), or a frame with a payload of at most 125 bytes
/// (at most 131 bytes). Text or binary with FIN and no RSV bits, masked. A longer frame
/// with its header whole is started instead ([`Output::start_frame`]); anything else
/// is left to the engine.
pub(crate) fn is_cut_small_frame(rest: &[u8]) -> bool {
    match *rest {
        [] => false,
        [first] => first == 0x81 || first == 0x82,
        [first, second, ..] => {
            let len = usize::from(second & 0x7F);
            let header_len =
                2 + match len {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                } + 4;
            (first == 0x81 || first == 0x82)
                && second & 0x80 != 0
                && (rest.len() < header_len || (len <= 125 && rest.len() < header_len + len))
        }
    }
}

/// Whether `rest`, a small text frame cut by the end of a read
/// ([`is_cut_small_frame`]), already holds invalid UTF-8: then the connection fails now,
/// at the first bad byte on the wire, instead of when the frame ends (Autobahn 6.4.3 and
/// 6.4.4 check for this "fail fast").
pub(crate) fn cut_text_is_invalid(rest: &[u8]) -> bool {
    const HEADER: usize = 2 + 4;
    // Only a short-length header is 6 bytes: a cut 16-bit header has no payload yet.
    let short_length = rest.get(1).is_some_and(|second| second & 0x7F <= 125);
    if rest.first() != Some(&0x81) || !short_length || rest.len() <= HEADER {
        return false;
    }
    let mask: [u8; 4] = rest[2..HEADER]
        .try_into()
        .expect("invariant: the slice is 4 bytes long");
    // A small frame's payload is at most 125 bytes, and this one is cut short of it.
    let mut payload = [0; 125];
    let payload = &mut payload[..(rest.len() - HEADER).min(125)];
    payload.copy_from_slice(&rest[HEADER..HEADER + payload.len()]);
    unmask(payload, mask);
    // An error without a length is a character cut by the read: the next bytes may
    // finish it.
    matches!(std::str::from_utf8(payload), Err(error) if error.error_len().is_some())
}

/// XORs `payload` with the client's masking key (RFC 6455 §5.3), 32 bytes at a time: a
/// fixed-size inner loop the compiler turns into SIMD XORs (callgrind W2, 16 KiB:
/// 4,876 instructions per echo in this function with 8-byte words).
pub(crate) fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    const WIDTH: usize = 32;
    let wide: [u8; WIDTH] = std::array::from_fn(|i| mask[i % 4]);
    let mut chunks = payload.chunks_exact_mut(WIDTH);
    for chunk in &mut chunks {
        for (byte, key) in chunk.iter_mut().zip(wide) {
            *byte ^= key;
        }
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// A client frame for tests: first byte `first` (FIN, RSV bits, opcode), `payload`
/// masked with `key`, its length in the shortest encoding.
#[cfg(test)]
pub(crate) fn masked_frame(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
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
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

    /// A client frame masked with [`KEY`].
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        masked_frame(first, payload, KEY)
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
        assert_eq!(
            out.take_echoed(),
            Echoed::default(),
            "counts are taken once"
        );
    }

    #[test]
    fn unmasking_matches_bytewise_xor_at_every_length() {
        for len in 0..100 {
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
            assert_eq!(&out.bytes[..], [0x81, 2, b'o', b'k'], "{what}");
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
            is_cut_small_frame(&long[..7]),
            "a cut 16-bit header is carried"
        );
        assert!(
            !is_cut_small_frame(&long[..10]),
            "a whole header starts a frame instead"
        );
        let unmasked = [0x81, 0x05, b'H'];
        assert!(!is_cut_small_frame(&unmasked));
    }

    /// A frame larger than the read is taken into the queue and committed only when its
    /// last byte has come, wherever the reads split it.
    #[test]
    fn a_large_frame_is_received_into_the_queue_across_reads() {
        let payload: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let frame = client_frame(0x81, &payload);
        for first_read in [8, 9, 11, 500] {
            let mut out = Output::default();
            assert_eq!(
                out.start_frame(&frame[..first_read], 1 << 20),
                Some(FrameProgress::Partial(first_read))
            );
            assert_eq!(
                out.unwritten(),
                0,
                "nothing is ready before the frame is whole"
            );
            let mut at = first_read;
            let mut progress = FrameProgress::Partial(0);
            for step in [3, 100, 1000] {
                let end = (at + step).min(frame.len());
                let (mut room, _) = out.frame_buffer(0).expect("a frame in progress");
                bytes::BufMut::put_slice(&mut room, &frame[at..end]);
                progress = out.frame_received(end - at);
                at = end;
            }
            assert_eq!(progress, FrameProgress::Done);
            assert_eq!(&out.bytes[..4], &[0x81, 126, 0x03, 0xE8]);
            assert_eq!(&out.bytes[4..], &payload[..], "first read {first_read}");
            assert_eq!(out.unwritten(), 1004);
            assert_eq!(out.take_echoed().text, (1, 1000));
        }
    }

    #[test]
    fn invalid_utf8_in_a_large_frame_fails_as_it_arrives() {
        let mut payload = vec![b'x'; 300];
        payload[200] = 0xFF;
        let frame = client_frame(0x81, &payload);
        let mut out = Output::default();
        out.push_message(Kind::Text, b"before");
        assert_eq!(
            out.start_frame(&frame[..100], 1 << 20),
            Some(FrameProgress::Partial(100))
        );
        let (mut room, _) = out.frame_buffer(0).expect("a frame in progress");
        bytes::BufMut::put_slice(&mut room, &frame[100..250]);
        assert_eq!(out.frame_received(150), FrameProgress::InvalidUtf8);
        assert!(!out.frame_in_progress());
        assert_eq!(
            &out.bytes[..],
            &[0x81, 6, b'b', b'e', b'f', b'o', b'r', b'e']
        );
    }

    #[test]
    fn a_character_cut_between_reads_is_valid() {
        let payload = "é".repeat(100);
        let frame = client_frame(0x81, payload.as_bytes());
        let mut out = Output::default();
        // 8 header bytes and 3 payload bytes: "é" and the first byte of the next one.
        assert_eq!(
            out.start_frame(&frame[..11], 1 << 20),
            Some(FrameProgress::Partial(11))
        );
        let (mut room, _) = out.frame_buffer(0).expect("a frame in progress");
        bytes::BufMut::put_slice(&mut room, &frame[11..]);
        assert_eq!(out.frame_received(frame.len() - 11), FrameProgress::Done);
    }

    #[test]
    fn frames_over_the_limit_or_whole_are_not_started() {
        let frame = client_frame(0x82, &[0; 1000]);
        let mut out = Output::default();
        assert_eq!(out.start_frame(&frame[..100], 999), None, "over the limit");
        assert_eq!(out.start_frame(&frame, 1 << 20), None, "whole");
        assert_eq!(out.start_frame(&frame[..5], 1 << 20), None, "cut header");
        assert!(out.bytes.is_empty());
    }

    #[test]
    fn stopping_drops_a_frame_in_progress() {
        let frame = client_frame(0x82, &[0; 1000]);
        let mut out = Output::default();
        out.push_message(Kind::Binary, b"kept");
        out.start_frame(&frame[..100], 1 << 20);
        out.stop();
        assert_eq!(&out.bytes[..], &[0x82, 4, b'k', b'e', b'p', b't']);
        assert_eq!(out.unwritten(), 6);
    }

    #[test]
    fn invalid_text_in_a_cut_small_frame_is_seen_before_the_frame_ends() {
        let mut payload = "κόσμε".as_bytes().to_vec();
        payload.extend_from_slice(&[0xF4, 0x90, 0x80, 0x80]); // above U+10FFFF
        payload.extend_from_slice(b"edited");
        let frame = client_frame(0x81, &payload);
        let bad_at = 6 + "κόσμε".len();
        for cut in 0..frame.len() {
            // from_utf8 reports 0xF4 0x90 as invalid as soon as the 0x90 is there.
            let expected = cut > bad_at + 1;
            assert_eq!(cut_text_is_invalid(&frame[..cut]), expected, "cut at {cut}");
        }
        let cut_character = client_frame(0x81, "é".as_bytes());
        assert!(
            !cut_text_is_invalid(&cut_character[..7]),
            "a cut character is not invalid"
        );
        let binary = client_frame(0x82, &[0xFF; 10]);
        assert!(!cut_text_is_invalid(&binary[..10]), "binary is not text");
        // A 16-bit length header cut inside or just after it: its length bytes are not
        // a masking key, nor its key a payload (unmasked with them, byte 6 reads 0x80).
        let mut long = vec![0x81, 0x80 | 126, 0x01, 0xC0, 0, 0, 0x81, 0];
        long.extend(vec![b'a'; 0x1C0]);
        for cut in 0..9 {
            assert!(
                !cut_text_is_invalid(&long[..cut]),
                "16-bit header cut at {cut}"
            );
        }
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
        assert_eq!(&out.bytes[..], HELLO_ECHO);
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
