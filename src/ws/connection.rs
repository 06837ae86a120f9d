//! The sans-IO WebSocket connection (RFC 6455, RFC 7692): bytes in, events to a
//! [`Handler`]; frames out, into an [`Outbox`]. No sockets and no async here: the
//! driver feeds it what it reads, and tests and the fuzz target feed it bytes directly.
//!
//! [`Receiver`] follows frames across reads cut anywhere: it unmasks, joins fragments,
//! inflates, validates text as it arrives (failing at the first bad byte on the wire),
//! enforces the size limits, and hands whole messages and control frames to the
//! handler. Every rule it enforces ends in one [`Violation`], which names the Close to
//! answer with. [`Sender`] encodes what the server sends, compressing messages when
//! permessage-deflate was agreed.

use super::{
    chunked::Chunked,
    close::{self, Violation},
    deflate::{self, InflateError, Inflater, Params},
    frame::{self, Header, OpCode},
    outbox::{Outbox, Payload},
    utf8::{self, Utf8Validator},
};

/// The least a message buffer grows by when room allows (up to what its frame still
/// announces): a frame's payload does not grow its buffer read by read.
const GROW_AT_LEAST: usize = 64 * 1024;

/// What a data message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// UTF-8 text.
    Text,
    /// Bytes.
    Binary,
}

impl Kind {
    /// The opcode of the first frame of such a message.
    pub(crate) fn opcode(self) -> OpCode {
        match self {
            Self::Text => OpCode::Text,
            Self::Binary => OpCode::Binary,
        }
    }
}

/// What the receiver found in the bytes: the policy (echo, for this server) decides
/// what to send in answer.
pub(crate) trait Handler {
    /// A whole data message, text already validated.
    fn message(&mut self, kind: Kind, payload: Payload<'_>);
    /// A Ping; RFC 6455 §5.5.2 asks for a Pong with the same payload.
    fn ping(&mut self, payload: &[u8]);
    /// A Pong.
    fn pong(&mut self, payload: &[u8]);
    /// The peer's Close: its code and reason, `None` for an empty one. Nothing after
    /// it is read.
    fn close(&mut self, close: Option<(u16, &str)>);
    /// The peer broke a rule: the connection must close with the violation's code.
    /// What follows is still read, data dropped, until the peer's Close.
    fn violation(&mut self, violation: Violation);
}

/// The size limits a receiver enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Largest frame payload, in bytes on the wire. A compressed frame may exceed it by
    /// deflate's worst-case overhead (see [`Limits::compressed_frame`]).
    pub(crate) max_frame: usize,
    /// Largest message, after inflation.
    pub(crate) max_message: usize,
}

impl Limits {
    /// The largest compressed frame: `max_frame` plus deflate's worst case for data that
    /// does not compress. zlib falls back to stored blocks (5 bytes per 16 KiB: 16 MiB
    /// of random bytes deflate to 16,782,337), but a compressor that keeps fixed Huffman
    /// codes (zlib-rs at level 1 does) spends 9 bits on half the byte values: up to 1/8
    /// more. The wire bytes of a compressed frame are inflated as they arrive, never
    /// held, so the margin costs no memory; the message limit applies after inflation.
    pub(crate) fn compressed_frame(self) -> u64 {
        let max = self.max_frame as u64;
        max + max / 8 + 64
    }
}

/// A frame whose payload is still arriving.
#[derive(Debug)]
struct InFrame {
    header: Header,
    /// Payload bytes received so far.
    done: u64,
    /// The payload is dropped unread: the connection is closing.
    skip: bool,
}

/// A data message being received.
#[derive(Debug)]
struct Message {
    kind: Kind,
    compressed: bool,
    /// The payload so far, unmasked and inflated.
    payload: Chunked,
    /// Validates text as it arrives; `None` for binary.
    utf8: Option<Utf8Validator>,
}

/// Where the receiver stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading frames.
    Open,
    /// Our Close is sent: data payloads are dropped unread while we wait for the peer's
    /// Close (a lingering close).
    Draining,
    /// The peer's Close arrived, or frame boundaries were lost: nothing more is read.
    Done,
}

/// The receiving half of a connection.
#[derive(Debug)]
pub(crate) struct Receiver {
    limits: Limits,
    /// Set when permessage-deflate was agreed; boxed, so that the many uncompressed
    /// connections do not carry its 168 bytes.
    inflater: Option<Box<Inflater>>,
    /// A header cut by the end of a read.
    header: [u8; frame::MAX_HEADER_LEN],
    header_len: u8,
    frame: Option<InFrame>,
    message: Option<Message>,
    /// A control frame's payload cut by the end of a read.
    control: Vec<u8>,
    state: State,
    /// A Close frame arrived (valid or not).
    close_received: bool,
    /// Input taken in but not yet followed: what came after the point where the
    /// message buffer had no more room (see [`Receiver::receive_within`]). Kept as it
    /// came over the wire, masked.
    backlog: Vec<u8>,
    /// How many more bytes the message buffer may allocate in the current call.
    room: usize,
}

impl Receiver {
    /// A receiver at the start of a connection.
    pub(crate) fn new(limits: Limits, deflate: Option<Params>) -> Self {
        Self {
            limits,
            inflater: deflate
                .as_ref()
                .map(|params| Box::new(Inflater::new(params))),
            header: [0; frame::MAX_HEADER_LEN],
            header_len: 0,
            frame: None,
            message: None,
            control: Vec::new(),
            state: State::Open,
            close_received: false,
            backlog: Vec::new(),
            room: usize::MAX,
        }
    }

    /// Bytes this receiver holds for a message in progress and input it has not
    /// followed yet, counted by capacity: what is allocated, not only what has arrived.
    pub(crate) fn buffered(&self) -> usize {
        self.message_capacity() + self.control.capacity() + self.backlog.capacity()
    }

    /// Capacity of the buffer of the message in progress (0 when none is).
    pub(crate) fn message_capacity(&self) -> usize {
        self.message.as_ref().map_or(0, |m| m.payload.capacity())
    }

    /// Bytes the message in progress can still take without allocating: only an
    /// uncompressed one takes wire bytes as they are.
    pub(crate) fn spare(&self) -> usize {
        self.message
            .as_ref()
            .filter(|m| !m.compressed)
            .map_or(0, |m| m.payload.spare())
    }

    /// Whether a data message has started and not ended.
    pub(crate) fn message_in_progress(&self) -> bool {
        self.message.is_some()
    }

    /// Whether input taken in earlier waits to be followed ([`Receiver::resume`]).
    pub(crate) fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Whether the peer's Close arrived, or nothing more can be read (a header broke a
    /// rule and frame boundaries are lost).
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the peer sent a Close frame (valid or not): the closing handshake is
    /// over once ours is written.
    pub(crate) fn close_received(&self) -> bool {
        self.close_received
    }

    /// From now on data payloads are dropped unread: the server has sent its Close and
    /// only waits for the peer's. The message in progress is freed.
    pub(crate) fn drain(&mut self) {
        if self.state == State::Open {
            self.state = State::Draining;
        }
        self.message = None;
        if let Some(frame) = &mut self.frame {
            frame.skip |= !frame.header.opcode.is_control();
        }
    }

    /// Takes in the next bytes read, in place (they are unmasked where they lie), and
    /// calls `handler` for each message, control frame and violation they hold, in
    /// order. After a violation the receiver drains: frames that can still be followed
    /// are, so that the peer's Close is found; their data is dropped unread.
    pub(crate) fn receive(&mut self, input: &mut [u8], handler: &mut impl Handler) {
        self.receive_within(input, handler, usize::MAX);
    }

    /// [`Receiver::receive`], allocating at most `room` more bytes for messages: an
    /// uncompressed message grows by what arrives, but a few compressed bytes may
    /// inflate to megabytes, so inflating stops where the room ends and the rest of the
    /// input is kept ([`Receiver::buffered`] counts it) until [`Receiver::resume`] is
    /// given more room. Nothing more should be passed in while a backlog remains.
    pub(crate) fn receive_within(
        &mut self,
        mut input: &mut [u8],
        handler: &mut impl Handler,
        room: usize,
    ) {
        debug_assert!(
            self.backlog.is_empty(),
            "input is followed in order: the backlog first"
        );
        self.room = room;
        while !input.is_empty() && self.state != State::Done {
            if let Err(violation) = self.receive_some(&mut input, handler) {
                self.drain();
                handler.violation(violation);
            }
        }
        self.room = usize::MAX;
    }

    /// Goes on with the input kept when the room ran out, with `room` more.
    pub(crate) fn resume(&mut self, handler: &mut impl Handler, room: usize) {
        let mut backlog = std::mem::take(&mut self.backlog);
        self.receive_within(&mut backlog, handler, room);
    }

    /// Takes in `input` up to its end or the first violation, leaving the rest in it.
    fn receive_some(
        &mut self,
        input: &mut &mut [u8],
        handler: &mut impl Handler,
    ) -> Result<(), Violation> {
        while !input.is_empty() && self.state != State::Done {
            if self.frame.is_none() {
                let (header, used) = match self.next_header(input) {
                    Ok(Some(found)) => found,
                    Ok(None) => {
                        *input = &mut [];
                        return Ok(());
                    }
                    Err(violation) => {
                        // Where this frame ends is unknown: nothing more can be read.
                        self.state = State::Done;
                        return Err(violation);
                    }
                };
                *input = &mut std::mem::take(input)[used..];
                if self.is_whole_message(&header, input.len()) {
                    // The common case: a whole unfragmented, uncompressed message in
                    // this read, handed over where it lies.
                    let (payload, rest) = std::mem::take(input).split_at_mut(header.len as usize);
                    *input = rest;
                    if header.opcode == OpCode::Text {
                        frame::unmask(payload, header.mask, 0);
                        if !utf8::is_utf8(payload) {
                            return Err(Violation::InvalidUtf8);
                        }
                        handler.message(Kind::Text, Payload::Slice(payload));
                    } else {
                        // Unmasked as it is copied out, in one pass.
                        handler.message(Kind::Binary, Payload::Masked(payload, header.mask));
                    }
                    continue;
                }
                self.start_frame(header)?;
                let frame = self
                    .frame
                    .as_ref()
                    .expect("invariant: start_frame sets the frame it accepts");
                let len = header.len as usize;
                // A whole control frame in this read is handled where it lies too.
                if !frame.skip && header.opcode.is_control() && header.len <= input.len() as u64 {
                    self.frame = None;
                    let (payload, rest) = std::mem::take(input).split_at_mut(len);
                    *input = rest;
                    frame::unmask(payload, header.mask, 0);
                    self.control_frame(header.opcode, payload, handler)?;
                    continue;
                }
            }
            let frame = self
                .frame
                .as_mut()
                .expect("invariant: a frame is set above or was in progress");
            let take = (frame.header.len - frame.done).min(input.len() as u64) as usize;
            let (piece, rest) = std::mem::take(input).split_at_mut(take);
            *input = rest;
            let (header, offset, skip) = (frame.header, frame.done, frame.skip);
            frame.done += take as u64;
            if !skip {
                frame::unmask(piece, header.mask, offset);
                let used = self.payload_piece(header, piece)?;
                if used < piece.len() {
                    // Out of room: the rest of the piece goes back to the frame, masked
                    // again as it came (masking is its own inverse), and waits with
                    // the input after it.
                    let frame = self
                        .frame
                        .as_mut()
                        .expect("invariant: the frame of this piece is still in progress");
                    frame.done -= (piece.len() - used) as u64;
                    let unused = &mut piece[used..];
                    frame::unmask(unused, header.mask, offset + used as u64);
                    self.backlog.reserve_exact(unused.len() + input.len());
                    self.backlog.extend_from_slice(unused);
                    self.backlog.extend_from_slice(input);
                    *input = &mut [];
                    return Ok(());
                }
            }
            if frame_done(&self.frame) {
                let frame = self.frame.take().expect("invariant: checked just above");
                if !frame.skip {
                    self.end_frame(frame.header, handler)?;
                }
            }
        }
        Ok(())
    }

    /// The header at the start of `input`, completing one cut by the last read: the
    /// header and how many bytes of `input` it took. `None` when `input` ends inside
    /// it (kept for the next read).
    #[inline]
    fn next_header(&mut self, input: &[u8]) -> Result<Option<(Header, usize)>, Violation> {
        if self.header_len == 0 {
            if let Some(found) = frame::parse(input, self.inflater.is_some())? {
                return Ok(Some(found));
            }
        }
        let held = usize::from(self.header_len);
        let take = (frame::MAX_HEADER_LEN - held).min(input.len());
        self.header[held..held + take].copy_from_slice(&input[..take]);
        match frame::parse(&self.header[..held + take], self.inflater.is_some())? {
            Some((header, len)) => {
                self.header_len = 0;
                Ok(Some((header, len - held)))
            }
            None => {
                self.header_len = (held + take) as u8;
                Ok(None)
            }
        }
    }

    /// Checks a header against the connection's state and starts its frame.
    fn start_frame(&mut self, header: Header) -> Result<(), Violation> {
        let draining = self.state == State::Draining;
        let skip = draining && !header.opcode.is_control();
        if !header.opcode.is_control() && !draining {
            let compressed = match header.opcode {
                OpCode::Continuation => match &self.message {
                    Some(message) => message.compressed,
                    None => {
                        return Err(self.refuse_frame(header, Violation::UnexpectedContinuation));
                    }
                },
                _ if self.message.is_some() => {
                    return Err(self.refuse_frame(header, Violation::UnfinishedMessage));
                }
                _ => header.rsv1,
            };
            let held = self.message.as_ref().map_or(0, |m| m.payload.len() as u64);
            let too_big = if compressed {
                header.len > self.limits.compressed_frame()
            } else {
                header.len > self.limits.max_frame as u64
                    || held + header.len > self.limits.max_message as u64
            };
            if too_big {
                // Refused on the header, before any of its payload is held.
                return Err(self.refuse_frame(header, Violation::TooBig));
            }
        }
        if !skip && header.opcode != OpCode::Continuation && !header.opcode.is_control() {
            let kind = if header.opcode == OpCode::Text {
                Kind::Text
            } else {
                Kind::Binary
            };
            self.message = Some(Message {
                kind,
                compressed: header.rsv1,
                payload: Chunked::default(),
                utf8: (kind == Kind::Text).then(Utf8Validator::default),
            });
        }
        self.frame = Some(InFrame {
            header,
            done: 0,
            skip,
        });
        Ok(())
    }

    /// Refuses a frame on its header: its payload is skipped, so that frames after it
    /// can still be read while the connection closes.
    fn refuse_frame(&mut self, header: Header, violation: Violation) -> Violation {
        self.frame = Some(InFrame {
            header,
            done: 0,
            skip: true,
        });
        violation
    }

    /// Whether `header` starts a whole uncompressed message of one frame whose payload
    /// is all in the `available` bytes, within the limits, while no message is open.
    #[inline]
    fn is_whole_message(&self, header: &Header, available: usize) -> bool {
        header.fin
            && !header.rsv1
            && matches!(header.opcode, OpCode::Text | OpCode::Binary)
            && header.len <= available as u64
            && header.len <= self.limits.max_frame.min(self.limits.max_message) as u64
            && self.message.is_none()
            && self.state == State::Open
    }

    /// Adds a piece of payload (unmasked) to the control frame or message it belongs to,
    /// and says how much of it was taken: less than all only when inflating ran out of
    /// room.
    fn payload_piece(&mut self, header: Header, piece: &[u8]) -> Result<usize, Violation> {
        if header.opcode.is_control() {
            self.control.extend_from_slice(piece);
            return Ok(piece.len());
        }
        let mut ahead = self
            .frame
            .as_ref()
            .map_or(0, |frame| (frame.header.len - frame.done) as usize)
            + piece.len();
        let message = self
            .message
            .as_mut()
            .expect("invariant: a data frame that is not skipped belongs to a message");
        let start = message.payload.len();
        if message.compressed {
            let inflater = self
                .inflater
                .as_mut()
                .expect("invariant: start_frame refuses RSV1 unless deflate was agreed");
            let inflated = inflater.inflate(
                piece,
                &mut message.payload,
                self.limits.max_message,
                &mut self.room,
            );
            // What inflated before a corrupt byte is checked first, so that the same
            // bytes give the same violation however reads cut them.
            feed_utf8(message, start)?;
            return inflated.map_err(inflate_violation);
        }
        let mut rest = piece;
        while !rest.is_empty() {
            grow(&mut message.payload, rest.len(), ahead, &mut self.room);
            let taken = message.payload.append(rest);
            rest = &rest[taken..];
            ahead -= taken;
        }
        feed_utf8(message, start)?;
        Ok(piece.len())
    }

    /// A frame's payload is complete.
    fn end_frame(&mut self, header: Header, handler: &mut impl Handler) -> Result<(), Violation> {
        if header.opcode.is_control() {
            let mut payload = std::mem::take(&mut self.control);
            let result = self.control_frame(header.opcode, &mut payload, handler);
            // Keep nothing for an idle connection.
            drop(payload);
            return result;
        }
        if !header.fin {
            return Ok(());
        }
        let mut message = self
            .message
            .take()
            .expect("invariant: a data frame that is not skipped belongs to a message");
        if message.compressed {
            let start = message.payload.len();
            let inflater = self
                .inflater
                .as_mut()
                .expect("invariant: start_frame refuses RSV1 unless deflate was agreed");
            let finished = inflater.finish(&mut message.payload, self.limits.max_message);
            feed_utf8(&mut message, start)?;
            finished.map_err(inflate_violation)?;
        }
        if message
            .utf8
            .as_ref()
            .is_some_and(|utf8| !utf8.is_complete())
        {
            return Err(Violation::InvalidUtf8);
        }
        handler.message(message.kind, message.payload.as_payload());
        Ok(())
    }

    /// A whole control frame.
    fn control_frame(
        &mut self,
        opcode: OpCode,
        payload: &mut [u8],
        handler: &mut impl Handler,
    ) -> Result<(), Violation> {
        match opcode {
            OpCode::Ping => handler.ping(payload),
            OpCode::Pong => handler.pong(payload),
            _ => {
                // A Close ends what the peer sends, valid or not (§5.5.1): after a bad
                // one too, the server answers and closes without waiting for another.
                self.state = State::Done;
                self.close_received = true;
                self.message = None;
                handler.close(close::parse_payload(payload)?);
            }
        }
        Ok(())
    }
}

/// Makes room in `payload` for `need` more bytes, or as many as its last chunk can
/// take. It grows by at least [`GROW_AT_LEAST`] and by as much as it holds (doubling,
/// so that copies stay linear within a chunk, and a new chunk is allocated once), but
/// never past what the frame still announces (`ahead`: the length is the peer's word,
/// and capacity is memory held) nor past `room` unless `need` itself is more (bytes
/// already read must be kept). `room` is charged for what was allocated.
fn grow(payload: &mut Chunked, need: usize, ahead: usize, room: &mut usize) {
    if payload.spare() >= need {
        return;
    }
    let wanted = payload.len().max(GROW_AT_LEAST).min(ahead).min(*room);
    let allocated = payload.reserve(need.max(wanted));
    *room = room.saturating_sub(allocated);
}

/// Validates the text a message received from position `start` on.
fn feed_utf8(message: &mut Message, start: usize) -> Result<(), Violation> {
    if let Some(utf8) = &mut message.utf8 {
        for piece in message.payload.since(start) {
            utf8.feed(piece).map_err(|_| Violation::InvalidUtf8)?;
        }
    }
    Ok(())
}

/// Whether the frame in progress has all its payload.
fn frame_done(frame: &Option<InFrame>) -> bool {
    frame.as_ref().is_some_and(|f| f.done == f.header.len)
}

fn inflate_violation(error: InflateError) -> Violation {
    match error {
        InflateError::TooLarge => Violation::TooBig,
        InflateError::Corrupt => Violation::InvalidDeflate,
    }
}

/// The sending half of a connection: encodes frames into an [`Outbox`].
#[derive(Debug)]
pub(crate) struct Sender {
    deflate: Option<Params>,
    /// Our Close is queued: nothing may follow it (§5.5.1).
    closed: bool,
}

impl Sender {
    /// A sender that compresses messages when `deflate` was agreed.
    pub(crate) fn new(deflate: Option<Params>) -> Self {
        Self {
            deflate,
            closed: false,
        }
    }

    /// Queues a message as one frame, compressed when deflate was agreed and it is
    /// long enough to gain from it. Nothing is queued after our Close.
    #[inline]
    pub(crate) fn message(&mut self, kind: Kind, payload: Payload<'_>, out: &mut Outbox) {
        if self.deflate.is_none() && !self.closed {
            // The common case: one frame, the payload copied (or taken) once.
            out.push_frame(true, false, kind.opcode(), payload);
            return;
        }
        self.fragmented(kind, payload, usize::MAX, out);
    }

    /// Queues a message as frames of at most `max_frame` payload bytes (at least one).
    #[inline]
    pub(crate) fn fragmented(
        &mut self,
        kind: Kind,
        payload: Payload<'_>,
        max_frame: usize,
        out: &mut Outbox,
    ) {
        if self.closed {
            return;
        }
        let max_frame = max_frame.max(1);
        let compress = self
            .deflate
            .filter(|params| payload.len() >= params.threshold);
        if compress.is_none() && payload.len() <= max_frame {
            // The common case: one frame, the payload copied (or taken) once.
            out.push_frame(true, false, kind.opcode(), payload);
            return;
        }
        encode_slow(kind, payload, max_frame, compress.as_ref(), out);
    }

    /// Queues frames encoded elsewhere (the `fault` control's deliberate violations);
    /// `closes` when they include our Close. Returns `false`, queuing nothing, after
    /// our Close.
    pub(crate) fn raw(&mut self, frames: &[u8], closes: bool, out: &mut Outbox) -> bool {
        if self.closed {
            return false;
        }
        self.closed = closes;
        out.push_raw(frames);
        true
    }

    /// Prepares a message to be sent in pieces (the `fragment` control): compressed when
    /// deflate was agreed and it gains from it. Returns RSV1 for its first frame, and
    /// the bytes to cut into frames.
    pub(crate) fn prepare(&self, payload: Vec<u8>) -> (bool, Vec<u8>) {
        if let Some(params) = self
            .deflate
            .filter(|params| payload.len() >= params.threshold)
        {
            let mut compressed = Vec::new();
            deflate::deflate_message(&payload, &params, &mut compressed);
            if compressed.len() < payload.len() {
                return (true, compressed);
            }
        }
        (false, payload)
    }

    /// Queues one frame of a message sent in pieces ([`Sender::prepare`]). Nothing is
    /// queued after our Close.
    pub(crate) fn piece(
        &mut self,
        opcode: OpCode,
        fin: bool,
        rsv1: bool,
        bytes: &[u8],
        out: &mut Outbox,
    ) {
        if !self.closed {
            out.push_frame(fin, rsv1, opcode, Payload::Slice(bytes));
        }
    }

    /// Queues a Ping.
    pub(crate) fn ping(&mut self, payload: &[u8], out: &mut Outbox) {
        if !self.closed {
            out.push_frame(true, false, OpCode::Ping, Payload::Slice(payload));
        }
    }

    /// Queues the Pong that answers a Ping.
    pub(crate) fn pong(&mut self, payload: &[u8], out: &mut Outbox) {
        if !self.closed {
            out.push_frame(true, false, OpCode::Pong, Payload::Slice(payload));
        }
    }

    /// Queues our Close: `code` and `reason`, or an empty payload for `None` (the
    /// answer to an empty Close, §5.5.1). Returns `false` if one was already queued.
    pub(crate) fn close(&mut self, code: Option<u16>, reason: &str, out: &mut Outbox) -> bool {
        if std::mem::replace(&mut self.closed, true) {
            return false;
        }
        let mut payload = Vec::with_capacity(2 + reason.len());
        if let Some(code) = code {
            payload.extend_from_slice(&code.to_be_bytes());
            // §5.5: at most 125 bytes in all; cut at a character boundary.
            let mut end = reason.len().min(frame::MAX_CONTROL_PAYLOAD - 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            payload.extend_from_slice(&reason.as_bytes()[..end]);
        }
        out.push_frame(true, false, OpCode::Close, Payload::Slice(&payload));
        true
    }
}

/// Compresses and/or fragments a message: the rarer paths of [`Sender::fragmented`],
/// kept out of line so that the common one stays small.
#[inline(never)]
fn encode_slow(
    kind: Kind,
    payload: Payload<'_>,
    max_frame: usize,
    compress: Option<&Params>,
    out: &mut Outbox,
) {
    let mut compressed = Vec::new();
    if let Some(params) = compress {
        payload.deflate(params, &mut compressed);
    }
    // Data that does not compress goes out as it is (RFC 7692 lets each message
    // choose): deflate would only make it larger.
    let rsv1 = compress.is_some() && compressed.len() < payload.len();
    if rsv1 && compressed.len() <= max_frame {
        out.push_frame(true, true, kind.opcode(), Payload::Owned(&mut compressed));
        return;
    }
    if !rsv1 && payload.len() <= max_frame {
        // Not copied yet: the payload (its buffer, when it has one) is handed over.
        out.push_frame(true, false, kind.opcode(), payload);
        return;
    }
    let plain;
    let bytes = if rsv1 {
        compressed.as_slice()
    } else {
        plain = payload.to_plain();
        &*plain
    };
    let mut pieces = bytes.chunks(max_frame).peekable();
    let mut opcode = kind.opcode();
    let mut first = true;
    while let Some(piece) = pieces.next() {
        let fin = pieces.peek().is_none();
        out.push_frame(fin, rsv1 && first, opcode, Payload::Slice(piece));
        opcode = OpCode::Continuation;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{
        chunked::CHUNK,
        frame::client_frame,
        fuzzing::{Record, Seen},
    };

    const MASK: [u8; 4] = [0xA1, 0x02, 0x7F, 0x33];
    const LIMITS: Limits = Limits {
        max_frame: 1000,
        max_message: 2000,
    };

    fn deflate_params() -> Params {
        Params {
            server_window_bits: 15,
            client_window_bits: 15,
            client_no_context_takeover: false,
            level: 1,
            threshold: 0,
        }
    }

    /// What a receiver reports for `bytes` fed in one piece, checked to be the same
    /// when they are cut at every point, in two pieces and byte by byte.
    fn receive_at_every_split(bytes: &[u8], deflate: Option<Params>) -> Vec<Seen> {
        let feed = |pieces: &[&[u8]]| {
            let mut receiver = Receiver::new(LIMITS, deflate);
            let mut record = Record::default();
            for piece in pieces {
                receiver.receive(&mut piece.to_vec(), &mut record);
            }
            record.0
        };
        let whole = feed(&[bytes]);
        for cut in 0..bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(feed(&[a, b]), whole, "cut at {cut}");
        }
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(feed(&bytewise), whole, "byte by byte");
        whole
    }

    fn text(s: &str) -> Seen {
        Seen::Message(Kind::Text, s.as_bytes().to_vec())
    }

    #[test]
    fn whole_messages_of_each_kind_are_reported() {
        let mut bytes = client_frame(0x81, b"hello", MASK);
        bytes.extend(client_frame(0x82, &[0, 1, 2], MASK));
        bytes.extend(client_frame(0x81, b"", MASK));
        assert_eq!(
            receive_at_every_split(&bytes, None),
            [
                text("hello"),
                Seen::Message(Kind::Binary, vec![0, 1, 2]),
                text("")
            ]
        );
    }

    #[test]
    fn fragments_are_joined_around_control_frames() {
        let mut bytes = client_frame(0x01, "κό".as_bytes(), MASK);
        bytes.extend(client_frame(0x89, b"p", MASK));
        bytes.extend(client_frame(0x00, "σ".as_bytes(), MASK));
        bytes.extend(client_frame(0x8A, b"q", MASK));
        bytes.extend(client_frame(0x80, "με".as_bytes(), MASK));
        assert_eq!(
            receive_at_every_split(&bytes, None),
            [
                Seen::Ping(b"p".to_vec()),
                Seen::Pong(b"q".to_vec()),
                text("κόσμε")
            ]
        );
    }

    #[test]
    fn invalid_text_fails_at_the_first_bad_byte_not_the_message_end() {
        // The first fragment alone carries the bad byte: the violation comes before
        // the rest of the message exists.
        let bytes = client_frame(0x01, b"ok\xFFmore", MASK);
        assert_eq!(
            receive_at_every_split(&bytes, None),
            [Seen::Violation(Violation::InvalidUtf8)]
        );
        // Cut inside a large frame: reported once the bad byte has arrived.
        let payload = [b"a".repeat(500), b"\xC3\x28".to_vec(), b"b".repeat(400)].concat();
        let frame = client_frame(0x81, &payload, MASK);
        let mut receiver = Receiver::new(LIMITS, None);
        let mut record = Record::default();
        let cut = 8 + 502;
        receiver.receive(&mut frame[..cut].to_vec(), &mut record);
        assert_eq!(record.0, [Seen::Violation(Violation::InvalidUtf8)]);
    }

    #[test]
    fn a_message_ending_inside_a_character_is_invalid() {
        let bytes = client_frame(0x81, &"€".as_bytes()[..2], MASK);
        assert_eq!(
            receive_at_every_split(&bytes, None),
            [Seen::Violation(Violation::InvalidUtf8)]
        );
    }

    #[test]
    fn an_oversized_frame_is_refused_on_its_header_and_skipped_to_the_close() {
        let mut bytes = client_frame(0x82, &[7; 1001], MASK);
        bytes.extend(client_frame(0x88, &[3, 232], MASK));
        assert_eq!(
            receive_at_every_split(&bytes, None),
            [
                Seen::Violation(Violation::TooBig),
                Seen::Close(Some((1000, String::new())))
            ]
        );
        // The header alone is enough.
        let mut receiver = Receiver::new(LIMITS, None);
        let mut record = Record::default();
        receiver.receive(&mut bytes[..8].to_vec(), &mut record);
        assert_eq!(record.0, [Seen::Violation(Violation::TooBig)]);
        assert_eq!(receiver.buffered(), 0);
    }

    #[test]
    fn a_continuation_that_would_pass_the_message_limit_is_refused_on_its_header() {
        let mut bytes = client_frame(0x02, &[1; 1000], MASK);
        bytes.extend(client_frame(0x00, &[1; 1000], MASK));
        let mut receiver = Receiver::new(LIMITS, None);
        let mut record = Record::default();
        receiver.receive(&mut bytes, &mut record);
        assert!(record.0.is_empty());
        // 2,000 bytes held; a header announcing one more is refused before its byte.
        let mut next = client_frame(0x80, &[1], MASK);
        receiver.receive(&mut next[..6], &mut record);
        assert_eq!(record.0, [Seen::Violation(Violation::TooBig)]);
    }

    #[test]
    fn header_and_sequence_rules_each_have_their_violation() {
        let cases: [(Vec<u8>, Violation); 5] = [
            (
                client_frame(0x80, b"x", MASK),
                Violation::UnexpectedContinuation,
            ),
            (
                [
                    client_frame(0x01, b"x", MASK),
                    client_frame(0x81, b"y", MASK),
                ]
                .concat(),
                Violation::UnfinishedMessage,
            ),
            (client_frame(0xC1, b"x", MASK), Violation::MisplacedRsv1),
            (client_frame(0x83, b"x", MASK), Violation::ReservedOpcode),
            (
                client_frame(0x88, &[0x03, 0xED], MASK),
                Violation::InvalidCloseCode,
            ),
        ];
        for (bytes, violation) in cases {
            assert_eq!(
                receive_at_every_split(&bytes, None),
                [Seen::Violation(violation)],
                "{violation:?}"
            );
        }
    }

    /// Found by the integration properties: RSV1 on a Close whose header was cut
    /// before its mask waited for the rest instead of failing at once.
    #[test]
    fn misplaced_rsv1_fails_before_the_header_is_complete() {
        let mut receiver = Receiver::new(LIMITS, Some(deflate_params()));
        let mut record = Record::default();
        receiver.receive(&mut [0xC8, 0x80], &mut record);
        assert_eq!(record.0, [Seen::Violation(Violation::MisplacedRsv1)]);
        let mut receiver = Receiver::new(LIMITS, None);
        let mut record = Record::default();
        receiver.receive(&mut [0xC1], &mut record);
        assert_eq!(record.0, [Seen::Violation(Violation::MisplacedRsv1)]);
        // Agreed, on a first data frame: fine.
        let mut receiver = Receiver::new(LIMITS, Some(deflate_params()));
        let mut record = Record::default();
        receiver.receive(&mut [0xC1, 0x85], &mut record);
        assert!(record.0.is_empty());
    }

    #[test]
    fn nothing_after_the_peers_close_is_read() {
        let mut bytes = client_frame(0x88, b"", MASK);
        bytes.extend(client_frame(0x81, b"late", MASK));
        assert_eq!(receive_at_every_split(&bytes, None), [Seen::Close(None)]);
    }

    #[test]
    fn draining_drops_data_but_finds_the_close() {
        let mut receiver = Receiver::new(LIMITS, None);
        let mut record = Record::default();
        receiver.receive(&mut client_frame(0x01, b"part", MASK), &mut record);
        receiver.drain();
        assert_eq!(receiver.buffered(), 0);
        let mut rest = client_frame(0x80, b"end", MASK);
        rest.extend(client_frame(0x82, &[1; 900], MASK));
        rest.extend(client_frame(0x88, &[0x03, 0xE9], MASK));
        receiver.receive(&mut rest, &mut record);
        assert_eq!(record.0, [Seen::Close(Some((1001, String::new())))]);
        assert!(receiver.is_done());
    }

    /// A client's compressed message: deflated (as `deflate_message` does for the
    /// server), masked, RSV1 set, `fragments` frames.
    fn compressed(opcode: u8, payload: &[u8], fragments: usize) -> Vec<u8> {
        let mut data = Vec::new();
        deflate::deflate_message(payload, &deflate_params(), &mut data);
        let size = data.len().div_ceil(fragments).max(1);
        let mut bytes = Vec::new();
        let pieces: Vec<&[u8]> = data.chunks(size).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let fin = if i + 1 == pieces.len() { 0x80 } else { 0 };
            let first = match i {
                0 => fin | 0x40 | opcode,
                _ => fin,
            };
            bytes.extend(client_frame(first, piece, MASK));
        }
        bytes
    }

    /// A deflate bomb inflates no further than the room each call gives: what it
    /// cannot inflate yet is kept, and resuming with more room yields the same
    /// message and the frames after it, in order, wherever the room runs out.
    #[test]
    fn inflating_stops_where_the_room_ends_and_resumes_in_order() {
        const MIB: usize = 1024 * 1024;
        let limits = Limits {
            max_frame: MIB,
            max_message: 4 * MIB,
        };
        let payload: Vec<u8> = (0..4 * MIB).map(|i| (i / 4096) as u8).collect();
        for fragments in [1, 3] {
            let mut bytes = compressed(0x2, &payload, fragments);
            assert!(bytes.len() < 64 * 1024, "a bomb: {} bytes", bytes.len());
            bytes.extend(client_frame(0x89, b"after", MASK));
            for room in [4096, 64 * 1024, 1000 * 1000] {
                let mut receiver = Receiver::new(limits, Some(deflate_params()));
                let mut record = Record::default();
                let mut calls = 0;
                let mut before = receiver.buffered();
                receiver.receive_within(&mut bytes.clone(), &mut record, room);
                loop {
                    // What a call adds is its room plus the input it keeps.
                    assert!(
                        receiver.buffered() <= before + room + bytes.len(),
                        "room {room}: {} after {before}",
                        receiver.buffered()
                    );
                    if !receiver.has_backlog() {
                        break;
                    }
                    calls += 1;
                    before = receiver.buffered();
                    receiver.resume(&mut record, room);
                }
                assert_eq!(
                    record.0,
                    [
                        Seen::Message(Kind::Binary, payload.clone()),
                        Seen::Ping(b"after".to_vec())
                    ],
                    "room {room}, {fragments} fragments"
                );
                assert!(
                    calls >= 4 * MIB / room.max(1) / 2,
                    "room {room}: {calls} calls"
                );
                assert_eq!(receiver.buffered(), 0);
            }
        }
    }

    /// An uncompressed message grows its buffer by what arrives, not by what its
    /// header announces, and by no more than the room allows past the piece itself.
    #[test]
    fn an_uncompressed_message_grows_within_the_room() {
        let limits = Limits {
            max_frame: 1 << 24,
            max_message: 1 << 24,
        };
        let mut receiver = Receiver::new(limits, None);
        let mut record = Record::default();
        let frame = client_frame(0x82, &vec![7; 1 << 20], MASK);
        // The header (14 bytes) announces 1 MiB; only 100 bytes of it arrive.
        receiver.receive_within(&mut frame[..114].to_vec(), &mut record, 1 << 20);
        assert!(
            receiver.buffered() <= GROW_AT_LEAST,
            "{}",
            receiver.buffered()
        );
        let mut receiver = Receiver::new(limits, None);
        receiver.receive_within(&mut frame[..114].to_vec(), &mut record, 200);
        assert!(receiver.buffered() <= 200, "{}", receiver.buffered());
        assert_eq!(receiver.spare(), receiver.buffered() - 100);
    }

    /// Echoes every message it is handed with `sender` and notes whether it came in
    /// chunks; anything else is a failure.
    struct ChunkEcho {
        sender: Sender,
        outbox: Outbox,
        in_chunks: Vec<bool>,
        violations: Vec<Violation>,
    }

    impl Handler for ChunkEcho {
        fn message(&mut self, kind: Kind, payload: Payload<'_>) {
            self.in_chunks.push(matches!(payload, Payload::Chunks(_)));
            self.sender.message(kind, payload, &mut self.outbox);
        }
        fn ping(&mut self, _: &[u8]) {
            panic!("no ping was sent");
        }
        fn pong(&mut self, _: &[u8]) {
            panic!("no pong was sent");
        }
        fn close(&mut self, _: Option<(u16, &str)>) {
            panic!("no close was sent");
        }
        fn violation(&mut self, violation: Violation) {
            self.violations.push(violation);
        }
    }

    /// A message longer than one chunk is held in chunks, validated across their
    /// boundaries, handed over in them and echoed from them (or compressed from them),
    /// whether it arrives in one frame, in fragments or compressed, however reads cut it.
    #[test]
    fn a_message_past_one_chunk_is_received_and_echoed_in_chunks() {
        let limits = Limits {
            max_frame: 1 << 24,
            max_message: 1 << 24,
        };
        // Three-byte characters: one straddles the end of the first chunk (2^20 = 3k + 1).
        let text = "€".repeat((2 * CHUNK + 1000) / 3);
        let bytes = text.as_bytes();
        let mut fragments = client_frame(0x01, &bytes[..CHUNK + 7], MASK);
        fragments.extend(client_frame(0x00, &bytes[CHUNK + 7..CHUNK + 9], MASK));
        fragments.extend(client_frame(0x80, &bytes[CHUNK + 9..], MASK));
        let wires = [
            (client_frame(0x81, bytes, MASK), None),
            (fragments, None),
            (compressed(0x1, bytes, 3), Some(deflate_params())),
        ];
        for (index, (wire, deflate)) in wires.into_iter().enumerate() {
            let first = index == 0;
            for read in [64 * 1024, 100_003, wire.len()] {
                let mut receiver = Receiver::new(limits, deflate);
                let mut echo = ChunkEcho {
                    sender: Sender::new(deflate),
                    outbox: Outbox::default(),
                    in_chunks: Vec::new(),
                    violations: Vec::new(),
                };
                for piece in wire.chunks(read) {
                    receiver.receive(&mut piece.to_vec(), &mut echo);
                }
                assert_eq!(echo.violations, [], "read {read}");
                // A whole frame in one read is handed over where it lies.
                let in_place = first && read == wire.len();
                assert_eq!(echo.in_chunks, [!in_place], "read {read}");
                let mut slices = [std::io::IoSlice::new(&[]); crate::ws::outbox::MAX_IO_SLICES];
                let segments = echo.outbox.io_slices(&mut slices);
                let sent = echo.outbox.contents();
                // A server frame: FIN, RSV1 and the opcode, then no mask.
                let used = match sent[1] {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                };
                assert_eq!(sent[0] & 0x8F, 0x81, "one whole text frame");
                let mut payload = sent[used..].to_vec();
                if sent[0] & 0x40 != 0 {
                    let mut inflater = Inflater::new(&deflate_params());
                    let mut inflated = Chunked::default();
                    inflater
                        .inflate(&payload, &mut inflated, usize::MAX - 1, &mut { usize::MAX })
                        .expect("our own deflate stream");
                    inflater
                        .finish(&mut inflated, usize::MAX - 1)
                        .expect("trailer");
                    payload = inflated.take_contiguous();
                } else {
                    // Written from the chunks it was received in: the header, then one
                    // segment per chunk (more than one).
                    if !in_place {
                        assert!(
                            segments > 1 + bytes.len() / CHUNK,
                            "read {read}: {segments}"
                        );
                    }
                }
                assert!(payload == bytes, "read {read}: the echo differs");
            }
        }
        // A bad byte just past the first chunk is found there, as it arrives (in
        // reads: a whole frame in one read is checked where it lies).
        let mut bad = bytes.to_vec();
        bad[CHUNK + 1] = 0xFF;
        let wire = client_frame(0x81, &bad, MASK);
        let mut receiver = Receiver::new(limits, None);
        let mut record = Record::default();
        let mut reads = wire.chunks(64 * 1024);
        while record.0.is_empty() {
            let read = reads.next().expect("the violation before the end");
            receiver.receive(&mut read.to_vec(), &mut record);
        }
        assert_eq!(record.0, [Seen::Violation(Violation::InvalidUtf8)]);
        assert!(reads.len() > 10, "found where it is, not at the end");
    }

    #[test]
    fn compressed_messages_are_inflated_whole_or_fragmented() {
        let mut bytes = compressed(0x1, "Hello, world! Hello, world!".as_bytes(), 1);
        bytes.extend(compressed(0x1, "κόσμε κόσμε κόσμε".as_bytes(), 3));
        assert_eq!(
            receive_at_every_split(&bytes, Some(deflate_params())),
            [
                text("Hello, world! Hello, world!"),
                text("κόσμε κόσμε κόσμε")
            ]
        );
    }

    #[test]
    fn an_incompressible_message_at_the_limit_passes_though_its_frame_is_larger() {
        let limits = Limits {
            max_frame: 2000,
            max_message: 2000,
        };
        let mut state = 0x1234_5678u32;
        let random: Vec<u8> = (0..2000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        let mut bytes = compressed(0x2, &random, 1);
        assert!(bytes.len() - 8 > 2000, "deflate grows random data");
        let mut receiver = Receiver::new(limits, Some(deflate_params()));
        let mut record = Record::default();
        receiver.receive(&mut bytes, &mut record);
        assert_eq!(record.0, [Seen::Message(Kind::Binary, random)]);
        // One byte more than the message limit, inflated, is too big.
        let mut receiver = Receiver::new(limits, Some(deflate_params()));
        let mut record = Record::default();
        receiver.receive(&mut compressed(0x2, &[0; 2001], 1), &mut record);
        assert_eq!(record.0, [Seen::Violation(Violation::TooBig)]);
    }
}
