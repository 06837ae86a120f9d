//! A read-side guard for the frame-header rules the engine does not check, or answers
//! with the wrong close code.
//!
//! - A control frame carries at most 125 bytes (RFC 6455 §5.5). yawc 0.5 checks that only
//!   for Ping: a 126-byte Close reaches its close handling, which echoes it back, an
//!   illegal frame of our own (Autobahn 7.3.6).
//! - A reserved opcode fails the connection with 1002 (§5.2, §7.4.1); yawc answers 1003.
//! - RSV1 is set only on the first frame of a compressed message (RFC 7692 §6.1); yawc
//!   accepts it on control and continuation frames.
//! - Invalid UTF-8 in an uncompressed text message fails the connection with 1007 at
//!   the first bad byte on the wire (RFC 6455 §8.1; Autobahn 6.4.3 and 6.4.4 check this
//!   "fail fast"): the engine delivers whole frames only, so a bad byte early in a
//!   large frame would otherwise wait for the frame's end.
//!
//! The handler never sees these frames, so the checks sit here, on the upgraded byte
//! stream, below the engine. The guard follows frame boundaries as the bytes pass (it
//! reads only headers and never copies payloads). At a bad header it hands the engine
//! nothing from that frame on, stops reading, and records why; the echo loop turns that
//! into Close 1002 with the reason.
//!
//! The guard also charges what it reads to the server's **read budget**, a semaphore of
//! bytes shared by all connections. Each connection may hold [`FREE_ALLOWANCE`] bytes
//! without charge, so that light clients are never held up; past that, it reads only
//! what it can take from the budget, and waits (TCP backpressure) when the budget is
//! spent. The echo loop gives the bytes back once their echoes are flushed
//! ([`GuardHandle::release_delivered`]), and the guard gives back the rest when the
//! connection ends.
//!
//! On uncompressed connections the guard is also where `fast_echo` works: it echoes the
//! whole small messages of each read into the connection's output queue before the
//! engine sees the rest, and writes that queue out before anything the engine writes.
//! Reads at a frame boundary land in a buffer each thread shares among its connections
//! ([`SCRATCH_SIZE`], the event loop's buffer of uWebSockets), not in the engine's small
//! one, so a message of up to 64 KiB takes one `recv`; what the engine gets from such a
//! read waits in a backlog for the room its buffer offers.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Semaphore,
};
use tokio_util::sync::PollSemaphore;

use crate::{
    assembly::Kind,
    fast_echo::{self, Echoed, FrameProgress, Output},
};

/// The largest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u8 = 125;

/// Bytes a connection may hold without charging the read budget: enough for every
/// small-message workload, so only bulk senders ever wait for the budget.
pub(crate) const FREE_ALLOWANCE: usize = 64 * 1024;

/// Most bytes read at once past the allowance: the unit taken from the budget.
const BUDGET_CHUNK: usize = 64 * 1024;

/// Size of the buffer the fast lane reads into (see [`FrameGuard::poll_read_scratch`]).
const SCRATCH_SIZE: usize = 64 * 1024;

/// The smallest read worth taking through the scratch buffer: below this much room
/// in its allowance a connection reads into the engine's buffer, under the budget.
const MIN_SCRATCH_READ: usize = 4 * 1024;

thread_local! {
    /// The fast lane's read buffer, one per thread and shared by every connection the
    /// thread runs: a read lands here and is taken apart before the read returns
    /// (echoes to the output queue, a large frame's start to the queue, the rest to
    /// the engine or the backlog), so nothing stays. Idle connections hold no read
    /// buffer of their own beyond the engine's small one. Allocated on first use and
    /// never zeroed; only the pages reads have reached are resident.
    static SCRATCH: std::cell::RefCell<Box<[std::mem::MaybeUninit<u8>]>> =
        std::cell::RefCell::new(Box::new_uninit_slice(SCRATCH_SIZE));
}

/// A frame header the guard refused, with the reason sent in the Close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Refusal {
    /// A control frame announcing more than 125 bytes.
    OversizedControl = 1,
    /// Opcodes 3–7 and 0xB–0xF.
    ReservedOpcode = 2,
    /// RSV1 on a control or continuation frame.
    MisplacedRsv1 = 3,
    /// A text message the fast lane was receiving is not valid UTF-8.
    InvalidUtf8 = 4,
}

impl Refusal {
    /// The reason sent with Close 1002.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::OversizedControl => "control frame payload over 125 bytes",
            Self::ReservedOpcode => "reserved opcode",
            Self::MisplacedRsv1 => "RSV1 set on a control or continuation frame",
            Self::InvalidUtf8 => "text message is not valid UTF-8",
        }
    }

    /// The close code: 1002 (protocol error) for a bad header, 1007 for bad text.
    pub(crate) fn close_code(self) -> u16 {
        match self {
            Self::InvalidUtf8 => 1007,
            _ => 1002,
        }
    }

    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::OversizedControl),
            2 => Some(Self::ReservedOpcode),
            3 => Some(Self::MisplacedRsv1),
            4 => Some(Self::InvalidUtf8),
            _ => None,
        }
    }

    /// Checks the first two bytes of a frame header.
    fn check(first: u8, second: u8) -> Option<Self> {
        let opcode = first & 0x0F;
        let rsv1 = first & 0x40 != 0;
        let control = opcode >= 0x8;
        match opcode {
            0x3..=0x7 | 0xB..=0xF => Some(Self::ReservedOpcode),
            _ if control && second & 0x7F > MAX_CONTROL_PAYLOAD => Some(Self::OversizedControl),
            _ if rsv1 && (control || opcode == 0x0) => Some(Self::MisplacedRsv1),
            _ => None,
        }
    }
}

/// Where the guard is in the incoming frame sequence.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Inside a frame header: `have` of its bytes are in `header`, `need` in all
    /// (2 until the second byte tells the real size).
    Header {
        header: [u8; 14],
        have: usize,
        need: usize,
    },
    /// Inside a payload with this many bytes still to pass.
    Payload { remaining: u64 },
}

impl Position {
    const START: Self = Self::Header {
        header: [0; 14],
        have: 0,
        need: 2,
    };
}

/// A stream wrapper that stops at the first refused frame header and charges what it
/// reads to the read budget.
///
/// Created by [`guard`] around the upgraded connection and owned by the engine's
/// stream; dropping it drops the connection and returns its budget.
#[derive(Debug)]
pub(crate) struct FrameGuard<S> {
    inner: S,
    position: Position,
    /// Bytes of the frame in progress that have passed (0 at a frame boundary).
    frame_passed: usize,
    /// This connection's handle on the shared read budget.
    budget: PollSemaphore,
    /// Shared with the [`GuardHandle`] the echo loop holds.
    shared: Arc<Shared>,
    /// Counters of bytes on the wire, for connections whose compression ratio is
    /// measured.
    wire: Option<WireCounters>,
    /// Whether `fast_echo` echoes whole small messages here, and its limits; `None` for
    /// compressed connections, whose echoes all go through the engine.
    lane: Option<Lane>,
    /// A text or binary frame without FIN has passed and its final continuation has not:
    /// whole frames now belong to the engine's path (which refuses them as interleaved).
    message_open: bool,
    /// The client's Close has passed: nothing after it is echoed.
    close_seen: bool,
    /// The start of a small frame the last read ended in, held back from the engine
    /// until the next read completes it (see `poll_read_once`). Empty and unallocated
    /// at rest.
    carry: Vec<u8>,
    /// Wire bytes of the frame the lane is receiving into the queue: held against the
    /// budget like a partial frame until its echo is flushed.
    lane_frame_bytes: usize,
    /// Bytes for the engine that a scratch read brought beyond the room in its buffer,
    /// already scanned and charged: handed over before anything else is read. Empty
    /// and unallocated at rest.
    backlog: BytesMut,
    /// The open message is uncompressed text: its frames' payloads are checked here as
    /// they pass.
    text_message: bool,
    /// The masking key of the text frame whose payload is passing, and how many of its
    /// payload bytes have passed (the key's phase).
    text_frame: Option<([u8; 4], u64)>,
    /// The end of the text passed so far when it stops inside a character: the next
    /// bytes finish it.
    utf8_tail: ([u8; 4], u8),
}

/// The limits of the fast lane (`fast_echo`) for one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lane {
    /// Largest payload echoed in the lane; larger frames go to the engine, which applies
    /// the frame and message limits with their close codes.
    pub(crate) max_payload: usize,
    /// Queued echo bytes past which the guard stops reading (TCP backpressure).
    pub(crate) write_limit: usize,
}

/// Wire byte counters a guard adds to as bytes pass.
#[derive(Debug)]
pub(crate) struct WireCounters {
    /// Bytes read from the client.
    pub(crate) read: Counter,
    /// Bytes written to the client.
    pub(crate) written: Counter,
}

/// State the guard and the echo loop share. Both run in the connection's task; the
/// atomics only make the type `Sync`.
#[derive(Debug, Default)]
struct Shared {
    /// 0, or the [`Refusal`] that stopped the stream.
    refusal: AtomicU8,
    /// Bytes read and not yet given back.
    held: AtomicUsize,
    /// Budget permits taken; always at least `held - FREE_ALLOWANCE`.
    acquired: AtomicUsize,
    /// Bytes of an incomplete frame among `held`: not delivered to the engine as a frame.
    partial: AtomicUsize,
    /// The output queue of an uncompressed connection (see `fast_echo`).
    output: Mutex<Output>,
}

impl Shared {
    /// Stops the stream for `refusal`: nothing more is read, and the echo loop closes
    /// with its code.
    fn refuse(&self, refusal: Refusal) {
        self.refusal.store(refusal as u8, Ordering::Release);
    }

    /// Whether the stream was stopped.
    fn refused(&self) -> bool {
        self.refusal.load(Ordering::Acquire) != 0
    }

    fn output(&self) -> MutexGuard<'_, Output> {
        // Nothing panics while holding the lock (it guards plain buffer appends and a
        // write), so it is never poisoned; if it were, its data is still consistent.
        self.output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The echo loop's view of the guard: why it stopped the stream, and the budget.
#[derive(Debug)]
pub(crate) struct GuardHandle {
    shared: Arc<Shared>,
    budget: Arc<Semaphore>,
}

impl GuardHandle {
    /// The refused header, if one arrived; nothing after it is read.
    pub(crate) fn occurred(&self) -> Option<Refusal> {
        Refusal::from_u8(self.shared.refusal.load(Ordering::Acquire))
    }

    /// Gives back the budget of every byte delivered in complete frames. Called by the
    /// echo loop when everything it read has been echoed and flushed.
    pub(crate) fn release_delivered(&self) {
        let partial = self.shared.partial.load(Ordering::Relaxed);
        self.shared.held.store(partial, Ordering::Relaxed);
        let keep = partial.saturating_sub(FREE_ALLOWANCE);
        let acquired = self.shared.acquired.swap(keep, Ordering::Relaxed);
        if acquired > keep {
            self.budget.add_permits(acquired - keep);
        }
    }

    /// Queues the echo of a message that came through the engine, behind every echo
    /// queued before it. `false` when the queue is at `limit` bytes: write it out first
    /// (flushing the engine's stream does) and try again.
    pub(crate) fn queue_message(&self, kind: Kind, payload: &[u8], limit: usize) -> bool {
        let mut output = self.shared.output();
        if output.unwritten() >= limit {
            return false;
        }
        output.push_message(kind, payload);
        true
    }

    /// What the fast lane echoed since the last call; whether echoes wait in the queue
    /// (they need a flush); whether the guard stopped reading because the client does
    /// not take them.
    pub(crate) fn take_echoed(&self) -> (Echoed, bool, bool) {
        let mut output = self.shared.output();
        (
            output.take_echoed(),
            output.unwritten() > 0,
            output.stalled(),
        )
    }

    /// Ends the fast lane before the server sends Close: nothing read after this point
    /// is echoed.
    pub(crate) fn stop_echoes(&self) {
        self.shared.output().stop();
    }

    /// Bytes this connection holds against the allowance and budget.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.shared.held.load(Ordering::Relaxed)
    }
}

/// Wraps `inner`, which must start at a frame boundary (right after the handshake),
/// charging reads to `budget`; with a `lane`, whole small messages are echoed here.
pub(crate) fn guard<S>(
    inner: S,
    budget: Arc<Semaphore>,
    wire: Option<WireCounters>,
    lane: Option<Lane>,
) -> (FrameGuard<S>, GuardHandle) {
    let shared = Arc::new(Shared::default());
    let guard = FrameGuard {
        inner,
        position: Position::START,
        frame_passed: 0,
        budget: PollSemaphore::new(Arc::clone(&budget)),
        shared: Arc::clone(&shared),
        wire,
        lane,
        message_open: false,
        close_seen: false,
        carry: Vec::new(),
        lane_frame_bytes: 0,
        backlog: BytesMut::new(),
        text_message: false,
        text_frame: None,
        utf8_tail: ([0; 4], 0),
    };
    (guard, GuardHandle { shared, budget })
}

impl<S> Drop for FrameGuard<S> {
    fn drop(&mut self) {
        self.budget
            .add_permits(self.shared.acquired.swap(0, Ordering::Relaxed));
    }
}

/// Parses the frame header at the start of `bytes`: its length and the payload length
/// it announces, or the refusal. `None` when `bytes` ends inside the header.
fn whole_header(bytes: &[u8]) -> Option<Result<(usize, u64), Refusal>> {
    let [first, second, ..] = *bytes else {
        return None;
    };
    if let Some(refusal) = Refusal::check(first, second) {
        return Some(Err(refusal));
    }
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    let (extended, payload) = match second & 0x7F {
        126 => (
            2,
            u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
        ),
        127 => (8, u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)),
        short => (0, u64::from(short)),
    };
    let header_len = 2 + extended + mask;
    (bytes.len() >= header_len).then_some(Ok((header_len, payload)))
}

impl<S> FrameGuard<S> {
    /// Notes a whole header (`header`, mask included): for the fast lane, whether a
    /// fragmented message is open and whether the client's Close has passed; for the
    /// text check, whether the payload that follows is text to check.
    fn note_header(&mut self, header: &[u8]) {
        let (first, second) = (header[0], header[1]);
        let fin = first & 0x80 != 0;
        match first & 0x0F {
            0x1 | 0x2 => self.message_open = !fin,
            0x0 if fin => self.message_open = false,
            0x8 => self.close_seen = true,
            _ => {}
        }
        let compressed = first & 0x40 != 0;
        let text = match first & 0x0F {
            0x1 => {
                self.text_message = !compressed;
                self.utf8_tail.1 = 0;
                !compressed
            }
            0x2 => {
                self.text_message = false;
                false
            }
            0x0 => self.text_message,
            _ => false,
        };
        if fin && first & 0x0F <= 0x2 {
            // FIN on a data frame: the message ends with this frame.
            self.text_message = false;
        }
        let masked = second & 0x80 != 0;
        self.text_frame = (text && masked).then(|| {
            let mask = header[header.len() - 4..]
                .try_into()
                .expect("invariant: a masked header ends with the 4-byte key");
            (mask, 0)
        });
    }

    /// Checks the next payload bytes of a text frame. `false` at the first byte that
    /// cannot be UTF-8.
    fn check_text(&mut self, masked: &[u8]) -> bool {
        let Some((mask, passed)) = &mut self.text_frame else {
            return true;
        };
        const CHUNK: usize = 256;
        let mut scratch = [0u8; CHUNK + 4];
        for piece in masked.chunks(CHUNK) {
            let (tail, tail_len) = self.utf8_tail;
            let tail_len = usize::from(tail_len);
            scratch[..tail_len].copy_from_slice(&tail[..tail_len]);
            let text = &mut scratch[..tail_len + piece.len()];
            text[tail_len..].copy_from_slice(piece);
            let phase = (*passed % 4) as usize;
            let key = [0, 1, 2, 3].map(|i| mask[(phase + i) % 4]);
            fast_echo::unmask(&mut text[tail_len..], key);
            *passed += piece.len() as u64;
            let rest = match std::str::from_utf8(text) {
                Ok(_) => &[][..],
                // A character cut here: kept for the next bytes.
                Err(error) if error.error_len().is_none() => &text[error.valid_up_to()..],
                Err(_) => return false,
            };
            let mut kept = [0; 4];
            kept[..rest.len()].copy_from_slice(rest);
            self.utf8_tail = (kept, rest.len() as u8);
        }
        true
    }

    /// Follows the frame sequence through `bytes`. Returns the first refused header and
    /// its offset in `bytes` (0 if it started in an earlier read), or `None`.
    fn scan(&mut self, bytes: &[u8]) -> Option<(usize, Refusal)> {
        let mut index = 0;
        while index < bytes.len() {
            // The common case, a header that starts here and lies whole in this read,
            // is parsed in place instead of byte by byte through `Position::Header`:
            // 204 -> 68 instructions per 20-byte echo (callgrind, echo_load W1p).
            if let Position::Header { have: 0, .. } = self.position {
                match whole_header(&bytes[index..]) {
                    Some(Err(refusal)) => return Some((index, refusal)),
                    Some(Ok((header_len, 0))) => {
                        self.note_header(&bytes[index..index + header_len]);
                        index += header_len;
                        continue;
                    }
                    Some(Ok((header_len, payload))) => {
                        self.note_header(&bytes[index..index + header_len]);
                        index += header_len;
                        self.frame_passed = header_len;
                        self.position = Position::Payload { remaining: payload };
                        continue;
                    }
                    None => {}
                }
            }
            // The whole header and the payload bytes that passed, dealt with once the
            // borrow of `position` ends.
            let mut completed = None;
            let mut payload_passed = None;
            match &mut self.position {
                Position::Payload { remaining } => {
                    let step = (*remaining).min((bytes.len() - index) as u64);
                    payload_passed = Some(index..index + step as usize);
                    *remaining -= step;
                    index += step as usize;
                    self.frame_passed += step as usize;
                    if *remaining == 0 {
                        self.position = Position::START;
                        self.frame_passed = 0;
                    }
                }
                Position::Header { header, have, need } => {
                    header[*have] = bytes[index];
                    *have += 1;
                    index += 1;
                    self.frame_passed += 1;
                    if *have == 2 {
                        if let Some(refusal) = Refusal::check(header[0], header[1]) {
                            return Some((index.saturating_sub(2), refusal));
                        }
                        let extended = match header[1] & 0x7F {
                            126 => 2,
                            127 => 8,
                            _ => 0,
                        };
                        let mask = if header[1] & 0x80 != 0 { 4 } else { 0 };
                        *need = 2 + extended + mask;
                    }
                    if *have == *need {
                        completed = Some((*header, *need));
                        let payload = match header[1] & 0x7F {
                            126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
                            127 => u64::from_be_bytes(
                                header[2..10].try_into().expect("invariant: 8 header bytes"),
                            ),
                            short => u64::from(short),
                        };
                        if payload == 0 {
                            self.position = Position::START;
                            self.frame_passed = 0;
                        } else {
                            self.position = Position::Payload { remaining: payload };
                        }
                    }
                }
            }
            if let Some((header, len)) = completed {
                self.note_header(&header[..len]);
            }
            if let Some(passed) = payload_passed {
                let start = passed.start;
                if !self.check_text(&bytes[passed]) {
                    return Some((start, Refusal::InvalidUtf8));
                }
            }
        }
        None
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Bytes already read and scanned go first, even past a refusal: they came before
        // the refused header.
        if !this.backlog.is_empty() && buf.remaining() > 0 {
            let handed = this.backlog.len().min(buf.remaining());
            buf.put_slice(&this.backlog[..handed]);
            this.backlog.advance(handed);
            if this.backlog.is_empty() {
                this.backlog = BytesMut::new();
            }
            this.note_partial();
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.shared.refused() {
                // Wake every time: the engine may poll twice with different wakers, and
                // the echo loop checks the refusal as soon as the engine has no frame
                // left, so this cannot spin.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let mut frame_in_progress = false;
            if let Some(lane) = this.lane {
                // Echoes the client does not take stop the reading, as the engine's full
                // write buffer does for the echo loop.
                let mut output = this.shared.output();
                if output.unwritten() >= lane.write_limit {
                    let written = output.poll_write_out(&mut this.inner, cx);
                    output.set_stalled(written.is_pending());
                    std::task::ready!(written)?;
                }
                output.set_stalled(false);
                frame_in_progress = output.frame_in_progress();
            }
            let (delivered, taken_out) = if frame_in_progress {
                std::task::ready!(this.poll_read_lane_frame(cx, buf))?
            } else {
                std::task::ready!(this.poll_read_once(cx, buf))?
            };
            if delivered == 0 && this.shared.refused() {
                // Returning no bytes would read as end of stream; the loop's top waits
                // for the echo loop instead.
                continue;
            }
            if delivered == 0 && taken_out > 0 {
                // Everything read was echoed or carried here. Returning no bytes would
                // read as the end of the stream: read on (the runtime's cooperative
                // budget ends this loop under a flood).
                continue;
            }
            return Poll::Ready(Ok(()));
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameGuard<S> {
    /// One read into `buf` (or, where the lane may take what comes, into the thread's
    /// scratch buffer: `poll_read_scratch`), charged to the budget, behind the bytes
    /// carried from the last read; the fast lane's echoes taken out, a small frame cut
    /// at the end carried to the next read, the rest scanned. Returns the bytes
    /// delivered in `buf` and the bytes taken out (echoed, carried or in the backlog).
    fn poll_read_once(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<(usize, usize)>> {
        let this = self;
        if this.carry.is_empty()
            && buf.remaining() > 0
            && buf.remaining() < SCRATCH_SIZE
            && this.lane_open()
        {
            if let Some(read) = this.poll_read_scratch(cx, buf) {
                return read;
            }
        }
        let before = buf.filled().len();
        let prepended = this.carry.len().min(buf.remaining());
        if prepended > 0 {
            buf.put_slice(&this.carry[..prepended]);
            this.carry.drain(..prepended);
        }
        // With carried bytes that did not all fit (an engine buffer smaller than a small
        // frame), those are delivered as they are, without reading behind them.
        if this.carry.is_empty() && buf.remaining() > 0 {
            let read = this.poll_read_budgeted(cx, buf);
            if !matches!(read, Poll::Ready(Ok(()))) {
                // Nothing is delivered: the carried bytes wait for the next read.
                if prepended > 0 {
                    this.carry.extend_from_slice(&buf.filled()[before..]);
                    buf.set_filled(before);
                }
                return read.map_ok(|()| (0, 0));
            }
        }
        let fresh = buf.filled().len() - before - prepended;
        Poll::Ready(Ok(this.process_read(buf, before, prepended, fresh)))
    }

    /// What follows a read that put `prepended` carried bytes and then `fresh` new ones
    /// into `buf` from `before` on: the fast lane's echoes taken out, a small frame cut
    /// at the end carried, a large one started, the rest scanned and delivered. Returns
    /// the bytes delivered in `buf` and the bytes taken out (echoed or carried).
    fn process_read(
        &mut self,
        buf: &mut ReadBuf<'_>,
        before: usize,
        prepended: usize,
        fresh: usize,
    ) -> (usize, usize) {
        let this = self;
        let mut after = buf.filled().len();
        let mut echoed = 0;
        let mut carried = 0;
        if let Some(lane) = this.lane {
            let lane_open = this.lane_open();
            if after > before && lane_open {
                echoed = fast_echo::echo_whole_frames(
                    &buf.filled()[before..after],
                    &mut this.shared.output(),
                    lane.max_payload,
                );
            }
            if echoed > 0 {
                buf.filled_mut().copy_within(before + echoed..after, before);
                after -= echoed;
                buf.set_filled(after);
            }
            // A small frame cut by the end of the read waits here for its end, so that
            // it and the frames after it can take the lane on the next read instead of
            // the engine's path (pipelined messages rarely end where a read does).
            if fresh > 0 && lane_open && after > before {
                let rest = &buf.filled()[before..after];
                let started = this.shared.output().start_frame(rest, lane.max_payload);
                match started {
                    // A frame too large for this read: its payload is read into the
                    // queue from now on (`poll_read_lane_frame`).
                    Some(progress) => {
                        carried = rest.len();
                        this.note_frame_progress(progress);
                    }
                    None if fast_echo::is_cut_small_frame(rest) => {
                        if fast_echo::cut_text_is_invalid(rest) {
                            this.shared.refuse(Refusal::InvalidUtf8);
                        } else {
                            this.carry.extend_from_slice(rest);
                        }
                        carried = rest.len();
                    }
                    None => {}
                }
                if carried > 0 {
                    after = before;
                    buf.set_filled(after);
                }
            }
        }
        let refused = this.scan(&buf.filled()[before..after]);
        if let Some((offset, refusal)) = refused {
            this.shared.refuse(refusal);
            buf.set_filled(before + offset);
        }
        let delivered = buf.filled().len() - before;
        if let Some(wire) = &this.wire {
            wire.read.inc_by(delivered as u64);
        }
        // Echoed bytes stay charged until their echoes are flushed, like delivered ones;
        // prepended ones were charged when they were read. (Carried bytes, at most one
        // small frame, are given back with the delivered ones: within the allowance.)
        this.charge((delivered + echoed + carried).saturating_sub(prepended));
        (delivered, echoed + carried)
    }

    /// Whether the next bytes may take the fast lane: it is on, and the guard is at a
    /// frame boundary, outside a fragmented message, before any Close.
    fn lane_open(&self) -> bool {
        self.lane.is_some()
            && matches!(self.position, Position::Header { have: 0, .. })
            && !self.message_open
            && !self.close_seen
    }

    /// One read into the thread's scratch buffer instead of the engine's buffer, which
    /// is small (it is every idle connection's): a 16 KiB message then arrives in one
    /// `recv` instead of two (384 bytes, then the rest straight into the queue). The
    /// read is then processed as any read (`process_read`): whole small messages echoed,
    /// a larger frame's start moved to the queue, a cut small frame carried. What is
    /// left for the engine goes into `buf` as far as it has room and into the backlog
    /// after that. `None` (nothing read) when the connection has too little allowance
    /// left for a worthwhile read without taking from the budget, or when the thread's
    /// buffer is in use; the caller reads into `buf` then.
    fn poll_read_scratch(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<(usize, usize)>>> {
        let covered = self.covered();
        if covered < MIN_SCRATCH_READ {
            return None;
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.try_borrow_mut().ok()?;
            let room = covered.min(scratch.len());
            let mut read = ReadBuf::uninit(&mut scratch[..room]);
            match Pin::new(&mut self.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {}
                other => return Some(other.map_ok(|()| (0, 0))),
            }
            let fresh = read.filled().len();
            if fresh == 0 {
                // The end of the stream: the engine reads it as such.
                return Some(Poll::Ready(Ok((0, 0))));
            }
            let (delivered, taken_out) = self.process_read(&mut read, 0, 0, fresh);
            let handed = delivered.min(buf.remaining());
            buf.put_slice(&read.filled()[..handed]);
            if handed < delivered {
                self.backlog
                    .extend_from_slice(&read.filled()[handed..delivered]);
                self.note_partial();
            }
            // The backlog counts as taken out: `buf` may have had no room for any of it.
            Some(Poll::Ready(Ok((handed, taken_out + (delivered - handed)))))
        })
    }

    /// Reads the payload of the frame the lane is receiving straight into the queue,
    /// charged to the budget, and as much again as `buf` has room for: bytes past the
    /// frame's end go to `buf` and are handled as a read of their own. Asking for more
    /// than the frame needs makes the read short when the socket holds just the frame,
    /// so the runtime knows the socket is drained and the next read costs no `recv`
    /// (W2: three `recv` per 16 KiB message down to two). Returns the bytes delivered in
    /// `buf` and the bytes taken out.
    fn poll_read_lane_frame(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<(usize, usize)>> {
        let shared = Arc::clone(&self.shared);
        let mut output = shared.output();
        let past_the_frame = buf.remaining();
        let Some((mut room, remaining)) = output.frame_buffer(past_the_frame) else {
            return Poll::Ready(Ok((0, 0)));
        };
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut BudgetedRead(self)), cx, &mut room);
        let n = std::task::ready!(read)?;
        if n == 0 {
            // The stream ended inside the message: nothing to echo, and the engine
            // reads the end of the stream next.
            output.drop_frame();
            self.lane_frame_bytes = 0;
            return Poll::Ready(Ok((0, 0)));
        }
        let surplus = n.saturating_sub(remaining);
        let before = buf.filled().len();
        if surplus > 0 {
            buf.put_slice(output.surplus(surplus));
            output.drop_surplus(surplus);
        }
        let n = n - surplus;
        let progress = output.frame_received(n);
        drop(output);
        if progress == FrameProgress::InvalidUtf8 {
            // Nothing after the bad frame reaches the engine.
            buf.set_filled(before);
        }
        self.note_frame_progress(progress);
        self.charge(n);
        if surplus > 0 && !self.shared.refused() {
            let (delivered, taken_out) = self.process_read(buf, before, 0, surplus);
            return Poll::Ready(Ok((delivered, n + taken_out)));
        }
        Poll::Ready(Ok((0, n)))
    }

    /// Notes how the frame the lane is receiving stands: the wire bytes it holds
    /// against the budget, or the refusal of invalid text.
    fn note_frame_progress(&mut self, progress: FrameProgress) {
        self.lane_frame_bytes = match progress {
            FrameProgress::Partial(wire) => wire,
            FrameProgress::Done => 0,
            FrameProgress::InvalidUtf8 => {
                self.shared.refuse(Refusal::InvalidUtf8);
                0
            }
        };
    }

    /// Records the bytes among those held that the echo loop's release must keep: the
    /// frame in progress (passed to the engine or received into the queue) and the
    /// backlog. The two can overlap (a frame's start in the backlog), so the larger is
    /// kept rather than the sum, which could exceed what is held.
    fn note_partial(&self) {
        let in_frame = self.frame_passed + self.lane_frame_bytes;
        self.shared
            .partial
            .store(in_frame.max(self.backlog.len()), Ordering::Relaxed);
    }

    /// What this connection may read without taking more from the budget.
    fn covered(&self) -> usize {
        let held = self.shared.held.load(Ordering::Relaxed);
        let acquired = self.shared.acquired.load(Ordering::Relaxed);
        (FREE_ALLOWANCE + acquired).saturating_sub(held)
    }

    /// Adds `taken` bytes read to what this connection holds, and gives back permits
    /// taken for bytes that did not come.
    fn charge(&mut self, taken: usize) {
        let held = self.shared.held.fetch_add(taken, Ordering::Relaxed) + taken;
        self.note_partial();
        let needed = held.saturating_sub(FREE_ALLOWANCE);
        let acquired = self.shared.acquired.load(Ordering::Relaxed);
        if acquired > needed {
            self.shared.acquired.store(needed, Ordering::Relaxed);
            self.budget.add_permits(acquired - needed);
        }
    }

    /// Reads into `buf`, charging what comes to the read budget (see the module doc).
    fn poll_read_budgeted(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        let covered = this.covered();
        // When the budget has room for all the engine's spare capacity (it does unless
        // the server is under memory pressure), take it for this read only and read
        // straight into that capacity; what does not come goes back below, and all of
        // it if nothing comes. The chunked path must zero each chunk first, which was a
        // memset of every large message: echo_load W3, 58,000 of 384,000 instructions
        // per 1 MiB echo.
        let mut taken_for_this_read = None;
        if buf.remaining() > covered {
            let budget = this.budget.clone_inner();
            let taken = u32::try_from(buf.remaining() - covered)
                .ok()
                .and_then(|extra| budget.try_acquire_many(extra).ok())
                .map(|permit| {
                    let extra = permit.num_permits();
                    permit.forget();
                    extra
                });
            if let Some(extra) = taken {
                this.shared.acquired.fetch_add(extra, Ordering::Relaxed);
                taken_for_this_read = Some((budget, extra));
            }
        }
        if buf.remaining() <= covered || taken_for_this_read.is_some() {
            let read = Pin::new(&mut this.inner).poll_read(cx, buf);
            if read.is_pending() {
                if let Some((budget, extra)) = taken_for_this_read {
                    this.shared.acquired.fetch_sub(extra, Ordering::Relaxed);
                    budget.add_permits(extra);
                }
            }
            std::task::ready!(read)?;
        } else {
            let want = buf.remaining().min(BUDGET_CHUNK).max(covered);
            if want > covered {
                let need = u32::try_from(want - covered).expect("invariant: at most BUDGET_CHUNK");
                match std::task::ready!(this.budget.poll_acquire_many(cx, need)) {
                    Some(permit) => {
                        permit.forget();
                        this.shared
                            .acquired
                            .fetch_add(need as usize, Ordering::Relaxed);
                    }
                    // The semaphore is never closed; treat it as the end of the stream.
                    None => return Poll::Ready(Ok(())),
                }
            }
            // Read at most `want` bytes. This initialises (zeroes) at most one chunk of
            // the engine's spare buffer, and only for connections past their allowance.
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(want));
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
            let read = limited.filled().len();
            buf.advance(read);
        }
        Poll::Ready(Ok(()))
    }
}

/// The guard's budgeted read as an `AsyncRead`, so that tokio-util's `poll_read_buf`
/// can read into the queue's spare capacity without zeroing it first.
struct BudgetedRead<'a, S>(&'a mut FrameGuard<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for BudgetedRead<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read_budgeted(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> FrameGuard<S> {
    /// Writes out the queued echoes: everything the engine writes goes after them.
    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.lane.is_none() {
            return Poll::Ready(Ok(()));
        }
        self.shared.output().poll_write_out(&mut self.inner, cx)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_write_queue(cx))?;
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        if let Some(wire) = &self.wire {
            wire.written.inc_by(written as u64);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_write_queue(cx))?;
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        if let Some(wire) = &self.wire {
            wire.written.inc_by(written as u64);
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_write_queue(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_write_queue(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    fn budget(bytes: usize) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(bytes))
    }

    /// The masking key of the test frames.
    const KEY: [u8; 4] = [1, 2, 3, 4];

    /// A masked client frame (FIN, `opcode`) with `payload_len` zero bytes of payload.
    fn frame(opcode: u8, payload_len: usize) -> Vec<u8> {
        fast_echo::masked_frame(0x80 | opcode, &vec![0; payload_len], KEY)
    }

    #[tokio::test]
    async fn frames_within_limits_pass_unchanged() {
        let (client, server) = duplex(1 << 20);
        let (mut guarded, violation) = guard(server, budget(1 << 30), None, None);
        let mut sent = frame(0x2, 70_000);
        sent.extend(frame(0x9, 125));
        sent.extend(frame(0x1, 0));
        sent.extend(frame(0x8, 2));
        let mut client = client;
        client.write_all(&sent).await.unwrap();
        drop(client);
        let mut received = Vec::new();
        guarded.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, sent);
        assert_eq!(violation.occurred(), None);
    }

    #[tokio::test]
    async fn oversized_close_is_withheld_and_flagged() {
        let (mut client, server) = duplex(1 << 16);
        let (mut guarded, violation) = guard(server, budget(1 << 30), None, None);
        let good = frame(0x1, 5);
        let mut sent = good.clone();
        sent.extend(frame(0x8, 126));
        client.write_all(&sent).await.unwrap();
        let mut received = vec![0; 1024];
        let n = guarded.read(&mut received).await.unwrap();
        assert_eq!(&received[..n], &good[..]);
        assert_eq!(violation.occurred(), Some(Refusal::OversizedControl));
        let next = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            guarded.read(&mut received),
        )
        .await;
        assert!(next.is_err(), "nothing after the oversized frame is read");
    }

    #[test]
    fn header_split_across_reads_is_followed() {
        let (guarded, _violation) = guard((), budget(1 << 30), None, None);
        let mut guarded = guarded;
        let sent = frame(0x2, 300);
        for byte in &sent {
            assert_eq!(guarded.scan(std::slice::from_ref(byte)), None);
        }
        let bad = frame(0xA, 126);
        assert_eq!(guarded.scan(&bad[..1]), None);
        assert_eq!(
            guarded.scan(&bad[1..]),
            Some((0, Refusal::OversizedControl))
        );
    }

    /// Whole headers take the fast path, cut ones the byte-by-byte one: wherever a read
    /// ends, the guard follows the same frames and stops at the same refused header.
    #[test]
    fn every_split_point_gives_the_same_result() {
        let mut sent = frame(0x1, 20);
        sent.extend(frame(0x2, 0));
        sent.extend(frame(0x2, 300));
        sent.extend(frame(0x9, 5));
        sent.extend(frame(0x0, 70_000));
        let good = sent.len();
        sent.extend(frame(0x8, 126));
        sent.extend(frame(0x1, 3));
        for split in 0..=sent.len() {
            let (mut guarded, _violation) = guard((), budget(1 << 30), None, None);
            let (head, tail) = sent.split_at(split);
            let in_head = guarded.scan(head);
            let refused = match in_head {
                Some(refused) => (true, refused),
                None => (
                    false,
                    guarded.scan(tail).expect("the Close header is refused"),
                ),
            };
            // Offsets count from the start of the read the refusal is found in, and are
            // 0 when the refused header began in an earlier read.
            let expected = if split >= good + 2 {
                (true, (good, Refusal::OversizedControl))
            } else if split == good + 1 {
                (false, (0, Refusal::OversizedControl))
            } else {
                (false, (good - split, Refusal::OversizedControl))
            };
            assert_eq!(refused, expected, "read split at byte {split}");
        }
    }

    /// Past the free allowance, a connection reads only what the budget covers, and
    /// delivered bytes go back to the budget when released.
    #[tokio::test]
    async fn reads_past_the_allowance_wait_for_the_budget() {
        let budget = budget(32 * 1024);
        let (mut client, server) = duplex(1 << 20);
        let (mut guarded, handle) = guard(server, Arc::clone(&budget), None, None);
        let sent = frame(0x2, 200 * 1024);
        client.write_all(&sent).await.unwrap();
        let mut received = Vec::new();
        let mut chunk = vec![0; 16 * 1024];
        let read_all_we_can = async {
            loop {
                let n = guarded.read(&mut chunk).await.unwrap();
                received.extend_from_slice(&chunk[..n]);
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), read_all_we_can).await;
        assert_eq!(
            received.len(),
            FREE_ALLOWANCE + 32 * 1024,
            "allowance plus budget, then it waits"
        );
        assert_eq!(budget.available_permits(), 0);
        // Nothing is delivered as a whole frame yet, so nothing can be given back.
        handle.release_delivered();
        assert_eq!(budget.available_permits(), 0);
        drop(guarded);
        assert_eq!(
            budget.available_permits(),
            32 * 1024,
            "a closed connection returns its budget"
        );
    }

    #[tokio::test]
    async fn released_frames_return_their_budget() {
        let budget = budget(1 << 20);
        let (mut client, server) = duplex(1 << 20);
        let (mut guarded, handle) = guard(server, Arc::clone(&budget), None, None);
        let sent = frame(0x2, 100 * 1024);
        client.write_all(&sent).await.unwrap();
        let mut received = vec![0; sent.len()];
        guarded.read_exact(&mut received).await.unwrap();
        assert_eq!(handle.held(), sent.len());
        assert!(budget.available_permits() < 1 << 20);
        handle.release_delivered();
        assert_eq!(handle.held(), 0);
        assert_eq!(budget.available_permits(), 1 << 20);
    }

    /// A client end and a guard with the fast lane on, over an in-memory stream.
    fn with_lane() -> (DuplexStream, FrameGuard<DuplexStream>, GuardHandle) {
        let lane = Lane {
            max_payload: 1 << 20,
            write_limit: 1 << 20,
        };
        let (client, server) = duplex(1 << 20);
        let (guarded, handle) = guard(server, budget(1 << 30), None, Some(lane));
        (client, guarded, handle)
    }

    /// A small text frame split over two reads is echoed by the lane once whole, and
    /// the engine sees none of it.
    #[tokio::test]
    async fn a_small_frame_cut_by_a_read_is_carried_and_echoed() {
        let (mut client, mut guarded, handle) = with_lane();
        let mut sent = frame(0x1, 0);
        let whole = sent.len();
        sent.extend(frame(0x1, 40));
        // One whole frame and the first 10 bytes of the next.
        client.write_all(&sent[..whole + 10]).await.unwrap();
        let mut received = vec![0; 1024];
        let wait = std::time::Duration::from_millis(50);
        let read = tokio::time::timeout(wait, guarded.read(&mut received)).await;
        assert!(read.is_err(), "nothing reaches the engine");
        let (echoed, queued, _) = handle.take_echoed();
        assert_eq!(echoed.text, (1, 0));
        assert!(queued);
        client.write_all(&sent[whole + 10..]).await.unwrap();
        let read = tokio::time::timeout(wait, guarded.read(&mut received)).await;
        assert!(read.is_err(), "nothing reaches the engine");
        assert_eq!(handle.take_echoed().0.text, (1, 40));
        // The queue goes out before anything the engine writes.
        guarded.write_all(b"engine").await.unwrap();
        let mut out = vec![0; 2 + 2 + 40 + 6];
        client.read_exact(&mut out).await.unwrap();
        assert_eq!(&out[..4], &[0x81, 0, 0x81, 40]);
        assert_eq!(&out[44..], b"engine");
    }

    /// The rest of a large frame and what follows it arrive in one read: the frame is
    /// finished in the queue, the small frame after it takes the lane, and the Ping is
    /// what the engine gets.
    #[tokio::test]
    async fn bytes_past_a_large_frame_are_handled_as_a_read_of_their_own() {
        let (mut client, mut guarded, handle) = with_lane();
        let large = frame(0x2, 5_000);
        let small = frame(0x2, 10);
        let ping = frame(0x9, 3);
        client.write_all(&large[..100]).await.unwrap();
        let mut received = vec![0; 384];
        let wait = std::time::Duration::from_millis(50);
        let read = tokio::time::timeout(wait, guarded.read(&mut received)).await;
        assert!(read.is_err(), "the large frame's start goes to the queue");
        client
            .write_all(&[&large[100..], &small[..], &ping[..]].concat())
            .await
            .unwrap();
        let n = guarded.read(&mut received).await.unwrap();
        assert_eq!(&received[..n], &ping[..], "the engine gets the Ping only");
        let (echoed, queued, _) = handle.take_echoed();
        assert_eq!(echoed.binary, (2, 5_010));
        assert!(queued);
    }

    /// A 16 KiB message arrives in one read into the scratch buffer, not in a first
    /// read the size of the engine's small buffer and a second for the rest: it is
    /// echoed whole although the engine offered 384 bytes, and nothing reaches it.
    #[tokio::test]
    async fn a_large_message_is_read_at_once_through_the_scratch_buffer() {
        let (mut client, mut guarded, handle) = with_lane();
        let message = frame(0x2, 16 * 1024);
        client.write_all(&message).await.unwrap();
        let mut engine_buffer = vec![0; 384];
        let mut engine_read = ReadBuf::new(&mut engine_buffer);
        let read = std::future::poll_fn(|cx| {
            Poll::Ready(Pin::new(&mut guarded).poll_read_once(cx, &mut engine_read))
        })
        .await;
        assert!(
            matches!(read, Poll::Ready(Ok((0, taken))) if taken == message.len()),
            "one read took the whole frame: {read:?}"
        );
        assert_eq!(handle.take_echoed().0.binary, (1, 16 * 1024));
        assert_eq!(handle.held(), message.len(), "charged until flushed");
    }

    /// Bytes for the engine beyond the room in its buffer wait in the backlog, are
    /// handed over in order before anything else is read, and stay charged meanwhile.
    #[tokio::test]
    async fn what_the_engine_has_no_room_for_waits_in_the_backlog() {
        let (mut client, mut guarded, handle) = with_lane();
        // The lane echoes the first frame; the fragmented message and the frames after
        // it go to the engine (the lane stops at the first frame it declines).
        let echoed = frame(0x1, 5);
        let mut declined = frame_with(0x01, &[b'a'; 300]);
        declined.extend(frame_with(0x80, &[b'b'; 300]));
        declined.extend(frame(0x9, 125));
        declined.extend(frame(0x2, 7));
        client
            .write_all(&[&echoed[..], &declined[..]].concat())
            .await
            .unwrap();
        let mut received = Vec::new();
        let mut chunk = vec![0; 100];
        while received.len() < declined.len() {
            let n = guarded.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the stream goes on");
            received.extend_from_slice(&chunk[..n]);
            if received.len() < declined.len() {
                assert!(handle.held() >= declined.len() - received.len());
                handle.release_delivered();
                assert!(
                    handle.held() >= declined.len() - received.len(),
                    "the backlog stays charged"
                );
            }
        }
        assert_eq!(received, declined);
        assert_eq!(handle.take_echoed().0.text, (1, 5));
        assert_eq!(handle.occurred(), None);
        // A read after the backlog waits for the socket.
        let wait = std::time::Duration::from_millis(50);
        let read = tokio::time::timeout(wait, guarded.read(&mut chunk)).await;
        assert!(read.is_err(), "nothing more to read");
    }

    /// Frames passed to the engine before a refused header are handed over from the
    /// backlog even though the guard has stopped the stream; nothing after it is.
    #[tokio::test]
    async fn the_backlog_before_a_refused_header_is_still_handed_over() {
        let (mut client, mut guarded, handle) = with_lane();
        let mut declined = frame(0x9, 125);
        declined.extend(frame(0x9, 125));
        let reserved_opcode = frame(0x3, 1);
        client
            .write_all(&[&declined[..], &reserved_opcode[..], &frame(0x1, 1)[..]].concat())
            .await
            .unwrap();
        let mut received = Vec::new();
        let mut chunk = vec![0; 64];
        let wait = std::time::Duration::from_millis(50);
        while received.len() < declined.len() {
            let n = tokio::time::timeout(wait, guarded.read(&mut chunk))
                .await
                .expect("the frames before the refused header come")
                .unwrap();
            assert!(n > 0, "the stream goes on until the refused header");
            received.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(received, declined);
        assert_eq!(handle.occurred(), Some(Refusal::ReservedOpcode));
        let read = tokio::time::timeout(wait, guarded.read(&mut chunk)).await;
        assert!(read.is_err(), "nothing after the refused header");
    }

    /// A connection with less than `MIN_SCRATCH_READ` left of its allowance reads into
    /// the engine's buffer, under the budget, as before.
    #[tokio::test]
    async fn a_connection_near_its_allowance_reads_into_the_engine_buffer() {
        let (mut client, mut guarded, handle) = with_lane();
        guarded.charge(FREE_ALLOWANCE - 100);
        let ping = frame(0x9, 125);
        client.write_all(&ping).await.unwrap();
        let mut chunk = vec![0; 64];
        let n = guarded.read(&mut chunk).await.unwrap();
        assert_eq!(
            &chunk[..n],
            &ping[..64],
            "one engine-sized read, nothing more"
        );
        assert!(guarded.backlog.is_empty());
        assert_eq!(handle.held(), FREE_ALLOWANCE - 100 + 64);
    }

    /// A masked frame with first byte `first` and `payload`.
    fn frame_with(first: u8, payload: &[u8]) -> Vec<u8> {
        fast_echo::masked_frame(first, payload, KEY)
    }

    /// Autobahn 6.4.3 in miniature: invalid UTF-8 inside a text fragment is refused
    /// where it arrives, wherever the reads cut the frames, and valid text split at
    /// every byte is not.
    #[test]
    fn invalid_text_is_refused_at_the_first_bad_byte() {
        let mut sent = frame_with(0x01, "κόσμε".as_bytes());
        let mut bad = "ab".as_bytes().to_vec();
        bad.extend_from_slice(&[0xF4, 0x90, 0x80, 0x80]);
        bad.extend_from_slice(b"edited");
        let bad_frame = frame_with(0x80, &bad);
        let bad_byte = sent.len() + 6 + 3; // header, "ab", 0xF4, then 0x90 is bad
        sent.extend(bad_frame);
        for split in 0..sent.len() {
            let (mut guarded, _) = guard((), budget(1 << 30), None, None);
            let (head, tail) = sent.split_at(split);
            let refused = match guarded.scan(head) {
                Some(refused) => Some(refused.1),
                None => guarded.scan(tail).map(|refused| refused.1),
            };
            assert_eq!(refused, Some(Refusal::InvalidUtf8), "split at {split}");
            let (mut guarded, _) = guard((), budget(1 << 30), None, None);
            assert_eq!(
                guarded.scan(&sent[..bad_byte]),
                None,
                "nothing is refused before the bad byte"
            );
        }
        let mut good = frame_with(0x01, "κόσ".as_bytes());
        good.extend(frame_with(0x89, b"ping"));
        good.extend(frame_with(0x80, "με𝄞".as_bytes()));
        good.extend(frame_with(0xC1, &[0xFF, 0xFE])); // compressed: not text on the wire
        for split in 0..good.len() {
            let (mut guarded, _) = guard((), budget(1 << 30), None, None);
            let (head, tail) = good.split_at(split);
            assert_eq!(guarded.scan(head), None, "split at {split}");
            assert_eq!(guarded.scan(tail), None, "split at {split}");
        }
    }

    #[test]
    fn reserved_opcodes_and_misplaced_rsv1_are_refused() {
        for opcode in [0x3, 0x7, 0xB, 0xF] {
            assert_eq!(
                Refusal::check(0x80 | opcode, 0x80),
                Some(Refusal::ReservedOpcode)
            );
        }
        assert_eq!(
            Refusal::check(0xC9, 0x80),
            Some(Refusal::MisplacedRsv1),
            "ping"
        );
        assert_eq!(
            Refusal::check(0xC0, 0x80),
            Some(Refusal::MisplacedRsv1),
            "continuation"
        );
        assert_eq!(
            Refusal::check(0xC1, 0x80),
            None,
            "compressed text is fine here"
        );
    }
}
