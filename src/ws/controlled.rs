//! The echo under test controls (see `controls`): what stands between a received
//! message and the frames that go out when a client asked for more than a plain echo.
//! Echoes wait here for their `delay` (in order, their bytes counted as held), leave in
//! `fragment`-sized frames, or are replaced by a `fault`; a `stream` goes out first; the
//! `close` or `drop` fires after N echoes or at its time.
//!
//! The driver asks when something is next due ([`Controlled::next_due`]), gives the room
//! the budget covers for stream messages, and acts on the [`Action`] reported in the news.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

use super::{
    chunked::Chunked,
    connection::{Kind, Sender},
    controls::{After, Controls, Fault, Stream},
    driver::{Action, News},
    frame::{self, OpCode},
    outbox::{Outbox, Payload},
};

/// Stream messages produced in one call at most, so that one connection does not keep
/// its thread.
const STREAM_BATCH: u64 = 16;

/// What one waiting entry costs besides its bytes (the queue's slot and the vector's
/// header), charged with them: 30 s of empty messages, each a few bytes on the wire,
/// must not grow the queue outside the budget.
const ENTRY_COST: usize = 64;

/// An echo that `fragment` would cut into more frames than this goes out a turn's
/// worth at a time, as the client reads ([`PIECES_PER_TURN`]): a 16 MiB echo in 1-byte
/// frames is 48 MiB encoded, which must not be made ahead of the budget.
const FRAMES_AT_ONCE: usize = 64;

/// The most one turn encodes of an echo sent in pieces: bytes in the outbox, frames.
const PIECES_PER_TURN: (usize, usize) = (64 * 1024, 4096);

/// What waits for its time.
#[derive(Debug)]
enum Later {
    /// An echo.
    Echo { kind: Kind, bytes: Chunked },
    /// An echo going out in `fragment`-sized frames, as prepared (compressed) for the
    /// wire; `sent` bytes of it are framed.
    Pieces {
        kind: Kind,
        rsv1: bool,
        bytes: Vec<u8>,
        sent: usize,
    },
    /// The answer to the peer's Close, which must follow the echoes before it.
    Close(Option<(u16, String)>),
}

/// One connection's controls and what they hold.
#[derive(Debug)]
pub(crate) struct Controlled {
    controls: Controls,
    /// Whether permessage-deflate was agreed (the `rsv1` fault differs).
    compressed: bool,
    /// Echoes and the Close answer, in order, each with when it may leave.
    pending: VecDeque<(Instant, Later)>,
    /// Payload bytes in `pending`.
    held: usize,
    /// Echoes sent so far (the fault counts as one).
    echoes: u64,
    /// When the next stream message is due; `None` once the stream is over.
    next_stream: Option<Instant>,
    /// Stream messages sent.
    streamed: u64,
    /// When `close` or `drop` fires by time; `None` once it fired or when it waits for
    /// echoes.
    action_at: Option<Instant>,
    /// The close or drop has fired.
    acted: bool,
    /// The frame fault is still to be sent.
    fault_due: bool,
    /// What the driver must do, until it asks ([`Controlled::take_action`]).
    action: Option<Action>,
    /// Jitter's random state (xorshift64).
    random: u64,
}

impl Controlled {
    /// The controls of a connection opened at `opened`; `seed` makes its jitter differ
    /// from other connections'.
    pub(crate) fn new(controls: Controls, compressed: bool, opened: Instant, seed: u64) -> Self {
        let acts = controls.close.is_some() || controls.drop;
        let action_at = match controls.after {
            _ if !acts => None,
            None | Some(After::Echoes(0)) => Some(opened),
            Some(After::Time(after)) => Some(opened + after),
            Some(After::Echoes(_)) => None,
        };
        Self {
            next_stream: controls.stream.map(|_| opened),
            fault_due: controls.fault.is_some_and(|fault| !fault.in_handshake()),
            controls,
            compressed,
            pending: VecDeque::new(),
            held: 0,
            echoes: 0,
            streamed: 0,
            action_at,
            acted: false,
            action: None,
            // Never zero: xorshift would stay at zero.
            random: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// Payload bytes waiting for their time.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Whether the server sends from this connection's script now and before anything
    /// else: a stream runs, and the connection reads nothing until it is over.
    pub(crate) fn streaming(&self) -> bool {
        self.next_stream.is_some()
    }

    /// The room the next stream message needs: its frames as `fragment` cuts them.
    pub(crate) fn stream_need(&self) -> Option<usize> {
        let stream = self.controls.stream.as_ref()?;
        self.next_stream
            .map(|_| super::controls::encoded_len(stream.size, self.controls.fragment))
    }

    /// Whether the server answers the client's pings.
    pub(crate) fn answers_pings(&self) -> bool {
        !self.controls.no_pong
    }

    /// When something is next due: an echo, a stream message, the close or drop.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let echo = if self.streaming() {
            None
        } else {
            self.pending.front().map(|(due, _)| *due)
        };
        [self.action_at, self.next_stream, echo]
            .into_iter()
            .flatten()
            .min()
    }

    /// A whole message arrived: echo it now, or keep it for its time.
    pub(crate) fn message(
        &mut self,
        kind: Kind,
        payload: Payload<'_>,
        sender: &mut Sender,
        outbox: &mut Outbox,
        news: &mut News,
    ) {
        news.controlled = true;
        let delay = self.next_delay();
        if delay.is_zero() && self.pending.is_empty() && !self.streaming() {
            self.echo(kind, payload, sender, outbox, news);
            return;
        }
        // Order kept: no echo leaves before the one queued ahead of it.
        let mut due = Instant::now() + delay;
        if let Some((last, _)) = self.pending.back() {
            due = due.max(*last);
        }
        // Kept as received: a large message in its chunks, not joined (a copy).
        let bytes = match payload {
            Payload::Chunks(chunked) => std::mem::take(chunked),
            other => Chunked::from(take_bytes(other)),
        };
        self.held += bytes.len() + ENTRY_COST;
        self.pending.push_back((due, Later::Echo { kind, bytes }));
    }

    /// The peer's Close: answered behind the echoes that wait (`true`), or now by the
    /// caller when none wait (`false`).
    pub(crate) fn defer_close(&mut self, close: Option<(u16, &str)>) -> bool {
        let Some((last, _)) = self.pending.back() else {
            return false;
        };
        let due = *last;
        let close = close.map(|(code, reason)| (code, reason.to_owned()));
        self.held += ENTRY_COST;
        self.pending.push_back((due, Later::Close(close)));
        true
    }

    /// Sends what is due at `now`: the close or drop, stream messages while `room`
    /// covers them, echoes whose time has come.
    pub(crate) fn send_due(
        &mut self,
        now: Instant,
        mut room: usize,
        sender: &mut Sender,
        outbox: &mut Outbox,
        news: &mut News,
    ) {
        news.controlled = true;
        if self.action_at.is_some_and(|at| at <= now) {
            self.action_at = None;
            if self.controls.close.is_some() {
                // An echo accepted before the close goes out before it.
                self.flush(sender, outbox, news);
            }
            self.act();
            return;
        }
        if let (Some(at), Some(stream)) = (self.next_stream, self.controls.stream) {
            let mut batch = 0;
            let mut at = at;
            let need = self.stream_need().unwrap_or(0);
            while at <= now && batch < STREAM_BATCH && room >= need {
                self.streamed += 1;
                let mut message = stream_message(&stream, self.streamed);
                room -= self.stream_need().unwrap_or(0);
                batch += 1;
                let kind = if stream.binary {
                    Kind::Binary
                } else {
                    Kind::Text
                };
                let max_frame = self.controls.fragment.unwrap_or(usize::MAX);
                sender.fragmented(kind, Payload::Owned(&mut message), max_frame, outbox);
                if self.streamed == stream.count {
                    self.next_stream = None;
                    break;
                }
                if !stream.interval.is_zero() {
                    at = now + stream.interval;
                }
                self.next_stream = Some(at);
            }
            if self.streaming() {
                return;
            }
        }
        while self.pending.front().is_some_and(|(due, _)| *due <= now) {
            if !self.release_one(sender, outbox, news, true) {
                break;
            }
        }
    }

    /// Sends every waiting echo now: the server is about to close.
    pub(crate) fn flush(&mut self, sender: &mut Sender, outbox: &mut Outbox, news: &mut News) {
        news.controlled = true;
        while !self.pending.is_empty() {
            self.release_one(sender, outbox, news, false);
        }
    }

    /// Sends the first waiting entry; `false` when it is an echo in pieces that is not
    /// all out yet (`one_turn` bounds what it encodes: [`PIECES_PER_TURN`]).
    fn release_one(
        &mut self,
        sender: &mut Sender,
        outbox: &mut Outbox,
        news: &mut News,
        one_turn: bool,
    ) -> bool {
        let Some((due, later)) = self.pending.pop_front() else {
            return true;
        };
        match later {
            Later::Echo { kind, mut bytes } => {
                self.held -= bytes.len() + ENTRY_COST;
                self.echo(kind, bytes.as_payload(), sender, outbox, news);
            }
            Later::Close(close) => {
                self.held -= ENTRY_COST;
                let close = close
                    .as_ref()
                    .map(|(code, reason)| (*code, reason.as_str()));
                answer_close(close, sender, outbox, news);
            }
            Later::Pieces {
                kind,
                rsv1,
                bytes,
                mut sent,
            } => {
                let size = self.controls.fragment.unwrap_or(usize::MAX).max(1);
                let (most_bytes, most_frames) = PIECES_PER_TURN;
                let mut frames = 0;
                while sent < bytes.len()
                    && (!one_turn || (outbox.len() < most_bytes && frames < most_frames))
                {
                    let end = sent.saturating_add(size).min(bytes.len());
                    let opcode = if sent == 0 {
                        kind.opcode()
                    } else {
                        OpCode::Continuation
                    };
                    let fin = end == bytes.len();
                    sender.piece(opcode, fin, rsv1 && sent == 0, &bytes[sent..end], outbox);
                    self.held -= end - sent;
                    sent = end;
                    frames += 1;
                }
                if sent < bytes.len() {
                    let rest = Later::Pieces {
                        kind,
                        rsv1,
                        bytes,
                        sent,
                    };
                    self.pending.push_front((due, rest));
                    return false;
                }
                self.held -= ENTRY_COST;
                self.count_echo(sender, outbox, news);
            }
        }
        true
    }

    /// Sends one echo (or the fault in its place) and fires `after=N`.
    fn echo(
        &mut self,
        kind: Kind,
        payload: Payload<'_>,
        sender: &mut Sender,
        outbox: &mut Outbox,
        news: &mut News,
    ) {
        if std::mem::take(&mut self.fault_due) {
            if let Some(fault) = self.controls.fault {
                let plain = payload.to_plain();
                let (frames, closes) = fault_frames(fault, kind, &plain, self.compressed);
                if sender.raw(&frames, closes, outbox) && closes {
                    self.action = Some(Action::Closed(1005));
                }
            }
            if self.action.is_some() {
                // The fault's Close ends the connection: no close or drop follows.
                self.acted = true;
            }
        } else {
            match self.controls.fragment {
                Some(size) if payload.len() > size.saturating_mul(FRAMES_AT_ONCE) => {
                    // Framed as the client reads; counted once its last frame goes.
                    let (rsv1, bytes) = sender.prepare(take_bytes(payload));
                    self.held += bytes.len() + ENTRY_COST;
                    let pieces = Later::Pieces {
                        kind,
                        rsv1,
                        bytes,
                        sent: 0,
                    };
                    self.pending.push_front((Instant::now(), pieces));
                    return;
                }
                fragment => {
                    sender.fragmented(kind, payload, fragment.unwrap_or(usize::MAX), outbox);
                }
            }
        }
        self.count_echo(sender, outbox, news);
    }

    /// One more echo has gone out: `after=N` fires at the Nth.
    fn count_echo(&mut self, sender: &mut Sender, outbox: &mut Outbox, news: &mut News) {
        self.echoes += 1;
        if !self.acted && self.controls.after == Some(After::Echoes(self.echoes)) {
            if self.controls.close.is_some() {
                // Nothing may follow the Close: what waits goes first.
                self.flush(sender, outbox, news);
            }
            self.act();
        }
    }

    /// Reports the close or drop to the driver, once.
    fn act(&mut self) {
        if std::mem::replace(&mut self.acted, true) {
            return;
        }
        if let Some(code) = self.controls.close {
            let reason = self.controls.reason.as_deref().unwrap_or_default().into();
            self.action = Some(Action::Close { code, reason });
        } else if self.controls.drop {
            self.action = Some(Action::Drop);
        }
    }

    /// What the driver must do now, if anything; asked once per report.
    pub(crate) fn take_action(&mut self) -> Option<Action> {
        self.action.take()
    }

    /// The delay of the next echo: `delay` plus a random part of `jitter`.
    fn next_delay(&mut self) -> Duration {
        let delay = self.controls.delay.unwrap_or_default();
        let Some(jitter) = self.controls.jitter.filter(|jitter| !jitter.is_zero()) else {
            return delay;
        };
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        let nanos = jitter.as_nanos() as u64;
        delay + Duration::from_nanos(self.random % (nanos + 1))
    }
}

/// The bytes of a payload, taken when the buffer may be.
fn take_bytes(payload: Payload<'_>) -> Vec<u8> {
    match payload {
        Payload::Owned(buffer) => std::mem::take(buffer),
        Payload::Chunks(chunked) => chunked.take_contiguous(),
        other => other.to_plain().into_owned(),
    }
}

/// Answers the peer's Close: the same code back (§5.5.1), and the driver is told.
pub(crate) fn answer_close(
    close: Option<(u16, &str)>,
    sender: &mut Sender,
    outbox: &mut Outbox,
    news: &mut News,
) {
    news.peer_closed = Some(close.map_or(1005, |(code, _)| code));
    let (code, reason) = close.map_or((None, ""), |(code, reason)| (Some(code), reason));
    sender.close(code, reason, outbox);
}

/// Stream message `counter` (from 1): text is the counter, a space, then the alphabet
/// repeated; binary the 8-byte big-endian counter, then `(counter + i) mod 256`. Both
/// cut to `size`.
pub(crate) fn stream_message(stream: &Stream, counter: u64) -> Vec<u8> {
    let mut message = Vec::with_capacity(stream.size);
    if stream.binary {
        message.extend_from_slice(&counter.to_be_bytes());
        let start = message.len();
        message
            .extend((start..stream.size.max(start)).map(|i| counter.wrapping_add(i as u64) as u8));
    } else {
        message.extend_from_slice(format!("{counter} ").as_bytes());
        let alphabet = b"abcdefghijklmnopqrstuvwxyz";
        let mut letters = alphabet.iter().cycle();
        while message.len() < stream.size {
            message.push(*letters.next().expect("invariant: a cycle never ends"));
        }
    }
    message.truncate(stream.size);
    message
}

/// The frames of `fault` in place of an echo of `payload`, and whether they close the
/// connection (a Close frame).
fn fault_frames(fault: Fault, kind: Kind, payload: &[u8], compressed: bool) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(payload.len() + 2 * frame::MAX_HEADER_LEN + 130);
    match fault {
        Fault::InvalidUtf8 => {
            let text = b"not UTF-8: \xff\xfe";
            frame::encode_header(&mut out, true, false, OpCode::Text, text.len());
            out.extend_from_slice(text);
        }
        Fault::MaskedFrame => {
            frame::encode_header(&mut out, true, false, kind.opcode(), payload.len());
            // The mask bit is the top bit of the second byte; the key follows the length.
            out[1] |= 0x80;
            let mask = [0x37, 0xfa, 0x21, 0x3d];
            out.extend_from_slice(&mask);
            let start = out.len();
            out.extend_from_slice(payload);
            frame::unmask(&mut out[start..], mask, 0);
        }
        Fault::Rsv1 if compressed => {
            // RSV1 is allowed on a message's first frame with permessage-deflate, never
            // on a continuation (RFC 7692 §6.1).
            frame::encode_header(&mut out, false, false, kind.opcode(), 0);
            frame::encode_header(&mut out, true, true, OpCode::Continuation, payload.len());
            out.extend_from_slice(payload);
        }
        Fault::Rsv1 => {
            frame::encode_header(&mut out, true, true, kind.opcode(), payload.len());
            out.extend_from_slice(payload);
        }
        Fault::ReservedOpcode => {
            frame::encode_header(&mut out, true, false, OpCode::Text, payload.len());
            out[0] = (out[0] & 0xf0) | 0x3;
            out.extend_from_slice(payload);
        }
        Fault::OversizedPing => {
            frame::encode_header(&mut out, true, false, OpCode::Ping, 126);
            out.extend_from_slice(&[b'p'; 126]);
        }
        Fault::BadCloseCode => {
            frame::encode_header(&mut out, true, false, OpCode::Close, 2);
            out.extend_from_slice(&1005u16.to_be_bytes());
            return (out, true);
        }
        // Handshake faults are in the 101, not here.
        Fault::UnrequestedSubprotocol | Fault::BadAccept => {
            frame::encode_header(&mut out, true, false, kind.opcode(), payload.len());
            out.extend_from_slice(payload);
        }
    }
    (out, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender, an outbox and news for a policy to answer into.
    fn parts() -> (Sender, Outbox, News) {
        (Sender::new(None), Outbox::default(), News::default())
    }

    fn stream(size: usize, binary: bool) -> Stream {
        Stream {
            count: 3,
            size,
            interval: Duration::ZERO,
            binary,
        }
    }

    #[test]
    fn stream_messages_carry_their_counter() {
        assert_eq!(stream_message(&stream(10, false), 7), b"7 abcdefgh");
        assert_eq!(stream_message(&stream(1, false), 12), b"1");
        assert_eq!(stream_message(&stream(0, false), 1), b"");
        let binary = stream_message(&stream(10, true), 258);
        assert_eq!(binary, [0, 0, 0, 0, 0, 0, 1, 2, 10, 11]);
        assert_eq!(stream_message(&stream(4, true), 1), [0, 0, 0, 0]);
    }

    #[test]
    fn fault_frames_break_exactly_one_rule() {
        let (frames, closes) = fault_frames(Fault::MaskedFrame, Kind::Text, b"abc", false);
        assert!(!closes);
        assert_eq!(&frames[..2], [0x81, 0x83]);
        let mut payload = frames[6..].to_vec();
        frame::unmask(&mut payload, frames[2..6].try_into().unwrap(), 0);
        assert_eq!(payload, b"abc");
        let (frames, _) = fault_frames(Fault::Rsv1, Kind::Binary, b"ab", false);
        assert_eq!(frames, [0xc2, 2, b'a', b'b']);
        let (frames, _) = fault_frames(Fault::Rsv1, Kind::Binary, b"ab", true);
        assert_eq!(frames, [0x02, 0, 0xc0, 2, b'a', b'b']);
        let (frames, _) = fault_frames(Fault::ReservedOpcode, Kind::Binary, b"a", false);
        assert_eq!(frames, [0x83, 1, b'a']);
        let (frames, _) = fault_frames(Fault::OversizedPing, Kind::Text, b"a", false);
        assert_eq!(&frames[..4], [0x89, 126, 0, 126]);
        assert_eq!(frames.len(), 4 + 126);
        let (frames, closes) = fault_frames(Fault::BadCloseCode, Kind::Text, b"a", false);
        assert!(closes);
        assert_eq!(frames, [0x88, 2, 0x03, 0xed]);
        let (frames, _) = fault_frames(Fault::InvalidUtf8, Kind::Binary, b"a", false);
        assert_eq!(frames[0], 0x81);
        assert!(std::str::from_utf8(&frames[2..]).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_echoes_leave_in_order_and_the_close_follows_them() {
        let controls = Controls {
            delay: Some(Duration::from_millis(100)),
            ..Controls::default()
        };
        let opened = Instant::now();
        let mut controlled = Controlled::new(controls, false, opened, 1);
        let (mut sender, mut outbox, mut news) = parts();
        controlled.message(
            Kind::Text,
            Payload::Slice(b"one"),
            &mut sender,
            &mut outbox,
            &mut news,
        );
        tokio::time::advance(Duration::from_millis(50)).await;
        controlled.message(
            Kind::Text,
            Payload::Slice(b"two"),
            &mut sender,
            &mut outbox,
            &mut news,
        );
        assert!(controlled.defer_close(Some((1000, "bye"))));
        assert_eq!(controlled.held(), 6 + 3 * ENTRY_COST);
        assert!(outbox.is_empty());
        assert_eq!(
            controlled.next_due(),
            Some(opened + Duration::from_millis(100))
        );
        tokio::time::advance(Duration::from_millis(50)).await;
        controlled.send_due(Instant::now(), 0, &mut sender, &mut outbox, &mut news);
        assert_eq!(outbox.contents(), [0x81, 3, b'o', b'n', b'e']);
        assert_eq!(news.peer_closed, None);
        tokio::time::advance(Duration::from_millis(50)).await;
        controlled.send_due(Instant::now(), 0, &mut sender, &mut outbox, &mut news);
        assert_eq!(news.peer_closed, Some(1000));
        assert_eq!(controlled.held(), 0);
        let written = outbox.contents();
        assert_eq!(&written[5..10], [0x81, 3, b't', b'w', b'o']);
        assert_eq!(&written[10..12], [0x88, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn every_waiting_entry_is_charged_even_an_empty_message() {
        let controls = Controls {
            delay: Some(Duration::from_secs(30)),
            ..Controls::default()
        };
        let mut controlled = Controlled::new(controls, false, Instant::now(), 1);
        let (mut sender, mut outbox, mut news) = parts();
        for _ in 0..1000 {
            controlled.message(
                Kind::Text,
                Payload::Slice(b""),
                &mut sender,
                &mut outbox,
                &mut news,
            );
        }
        assert_eq!(controlled.held(), 1000 * ENTRY_COST);
        controlled.flush(&mut sender, &mut outbox, &mut news);
        assert_eq!(controlled.held(), 0);
        assert_eq!(outbox.len(), 2000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_fragmented_echo_goes_out_a_turn_at_a_time() {
        let controls = Controls {
            fragment: Some(1),
            ..Controls::default()
        };
        let mut controlled = Controlled::new(controls, false, Instant::now(), 1);
        let (mut sender, mut outbox, mut news) = parts();
        let message = vec![b'f'; 10_000];
        controlled.message(
            Kind::Binary,
            Payload::Slice(&message),
            &mut sender,
            &mut outbox,
            &mut news,
        );
        // Nothing encoded yet: the echo waits, its bytes counted once.
        assert!(outbox.is_empty());
        assert_eq!(controlled.held(), 10_000 + ENTRY_COST);
        let (_, most_frames) = PIECES_PER_TURN;
        controlled.send_due(
            Instant::now(),
            usize::MAX,
            &mut sender,
            &mut outbox,
            &mut news,
        );
        assert_eq!(outbox.len(), most_frames * 3);
        assert_eq!(controlled.held(), 10_000 - most_frames + ENTRY_COST);
        let first = outbox.contents();
        assert_eq!(&first[..6], [0x02, 1, b'f', 0x00, 1, b'f']);
        while controlled.held() > 0 {
            controlled.send_due(
                Instant::now(),
                usize::MAX,
                &mut sender,
                &mut outbox,
                &mut news,
            );
        }
        let all = outbox.contents();
        assert_eq!(all.len(), 30_000);
        assert_eq!(&all[all.len() - 3..], [0x80, 1, b'f']);
        assert_eq!(controlled.next_due(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn close_after_n_echoes_follows_the_nth() {
        let controls = Controls {
            close: Some(4000),
            reason: Some("done".into()),
            after: Some(After::Echoes(2)),
            fragment: Some(2),
            ..Controls::default()
        };
        let mut controlled = Controlled::new(controls, false, Instant::now(), 1);
        assert_eq!(controlled.next_due(), None);
        let (mut sender, mut outbox, mut news) = parts();
        controlled.message(
            Kind::Binary,
            Payload::Slice(b"abc"),
            &mut sender,
            &mut outbox,
            &mut news,
        );
        assert_eq!(controlled.take_action(), None);
        assert_eq!(outbox.contents(), [0x02, 2, b'a', b'b', 0x80, 1, b'c']);
        controlled.message(
            Kind::Binary,
            Payload::Slice(b"d"),
            &mut sender,
            &mut outbox,
            &mut news,
        );
        assert_eq!(
            controlled.take_action(),
            Some(Action::Close {
                code: 4000,
                reason: "done".into()
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_goes_within_its_room_and_at_its_interval() {
        let controls = Controls {
            stream: Some(Stream {
                count: 3,
                size: 10,
                interval: Duration::from_secs(1),
                binary: false,
            }),
            ..Controls::default()
        };
        let opened = Instant::now();
        let mut controlled = Controlled::new(controls, false, opened, 1);
        let (mut sender, mut outbox, mut news) = parts();
        assert_eq!(controlled.stream_need(), Some(10 + 2));
        controlled.send_due(opened, 5, &mut sender, &mut outbox, &mut news);
        assert!(outbox.is_empty(), "no room, no message");
        controlled.send_due(opened, 1 << 20, &mut sender, &mut outbox, &mut news);
        assert_eq!(outbox.len(), 12);
        assert_eq!(controlled.next_due(), Some(opened + Duration::from_secs(1)));
        for second in 1..=2 {
            let now = opened + Duration::from_secs(second);
            controlled.send_due(now, 1 << 20, &mut sender, &mut outbox, &mut news);
        }
        assert!(!controlled.streaming());
        assert_eq!(controlled.next_due(), None);
        let written = outbox.contents();
        assert_eq!(&written[24..], b"\x81\x0a3 abcdefgh");
    }
}
