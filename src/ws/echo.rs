//! The echo policy: what the server answers to what a client sends. Every message goes
//! back unchanged, in order, as one frame; every Ping gets its Pong; a Close gets the
//! same Close back; a violation gets the Close its rule names. Counts for the closing
//! log line and `/metrics` are kept here.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::debug;

use super::{
    close::Violation,
    connection::{Handler, Kind, Limits, Sender},
    controlled::{self, Controlled},
    controls::Ceilings,
    driver::{News, Policy, Rules, Schedule},
    outbox::{Outbox, Payload},
};
use crate::{config::Settings, metrics::EchoCounters};
use tokio::time::Instant;

/// Longest text payload shown in a debug log line; longer ones are shortened.
const LOGGED_TEXT_CHARS: usize = 64;

/// What every connection shares: built once from the settings.
#[derive(Debug)]
pub(crate) struct EchoConfig {
    /// The receiver's size limits.
    limits: Limits,
    /// The driver's deadlines and caps.
    rules: Rules,
    /// What test controls may ask.
    ceilings: Ceilings,
    /// Connection ids for logs, counted from 1.
    next_id: AtomicU64,
}

impl EchoConfig {
    /// The configuration `settings` give.
    pub(crate) fn new(settings: &Settings) -> Self {
        Self {
            limits: Limits {
                max_frame: settings.max_frame_size,
                max_message: settings.max_message_size,
            },
            rules: Rules::new(settings),
            ceilings: Ceilings {
                enabled: settings.controls,
                max_delay: settings.max_delay,
                max_stream_bytes: settings.max_stream_bytes,
                max_message: settings.max_message_size,
                max_connection_duration: settings.max_connection_duration,
            },
            next_id: AtomicU64::new(1),
        }
    }

    /// What test controls may ask.
    pub(crate) fn ceilings(&self) -> &Ceilings {
        &self.ceilings
    }

    /// The receiver's size limits.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// The driver's deadlines and caps.
    pub(crate) fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The id of a new connection, for its log lines.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Counts of one connection, for its closing log line.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Messages received.
    pub(crate) messages_in: u64,
    /// Payload bytes received.
    pub(crate) bytes_in: u64,
    /// Messages echoed.
    pub(crate) messages_out: u64,
    /// Payload bytes echoed.
    pub(crate) bytes_out: u64,
}

/// The echo policy of one connection.
#[derive(Debug)]
pub(crate) struct Echo<'a> {
    counters: &'a EchoCounters,
    /// Whether permessage-deflate was agreed (for the compression counters).
    compressed: bool,
    /// Counts for the closing log line.
    pub(crate) stats: Stats,
    unpublished: Unpublished,
    news: News,
    /// The test controls the client asked for; `None` for a plain echo (boxed: most
    /// connections have none, and every task carries this struct).
    controlled: Option<Box<Controlled>>,
}

impl<'a> Echo<'a> {
    /// The policy of a new connection.
    pub(crate) fn new(counters: &'a EchoCounters, compressed: bool) -> Self {
        Self {
            counters,
            compressed,
            stats: Stats::default(),
            unpublished: Unpublished::default(),
            news: News::default(),
            controlled: None,
        }
    }

    /// The policy of a connection with test controls.
    pub(crate) fn with_controls(mut self, controlled: Controlled) -> Self {
        self.controlled = Some(Box::new(controlled));
        // The driver asks for the schedule from the start (a stream, a close at once).
        self.news.controlled = true;
        self
    }
}

/// Whatever way a connection ends, its last echoes are counted.
impl Drop for Echo<'_> {
    fn drop(&mut self) {
        self.publish();
    }
}

impl Policy for Echo<'_> {
    fn handler<'p>(
        &'p mut self,
        sender: &'p mut Sender,
        outbox: &'p mut Outbox,
    ) -> impl Handler + 'p {
        Replies {
            echo: self,
            sender,
            outbox,
        }
    }

    fn take_news(&mut self) -> News {
        std::mem::take(&mut self.news)
    }

    fn publish(&mut self) {
        self.unpublished.publish(self.counters, self.compressed);
    }

    fn schedule(&mut self) -> Schedule {
        match self.controlled.as_deref_mut() {
            Some(controlled) => Schedule {
                held: controlled.held(),
                due: controlled.next_due(),
                action: controlled.take_action(),
            },
            None => Schedule::default(),
        }
    }

    #[inline]
    fn stream_need(&self) -> Option<usize> {
        self.controlled.as_ref()?.stream_need()
    }

    fn send_due(&mut self, now: Instant, room: usize, sender: &mut Sender, outbox: &mut Outbox) {
        if let Some(controlled) = self.controlled.as_deref_mut() {
            controlled.send_due(now, room, sender, outbox, &mut self.news);
        }
    }

    fn flush(&mut self, sender: &mut Sender, outbox: &mut Outbox) {
        if let Some(controlled) = self.controlled.as_deref_mut() {
            controlled.flush(sender, outbox, &mut self.news);
        }
    }
}

/// The echo policy answering one batch of input.
struct Replies<'p, 'a> {
    echo: &'p mut Echo<'a>,
    sender: &'p mut Sender,
    outbox: &'p mut Outbox,
}

impl Handler for Replies<'_, '_> {
    #[inline]
    fn message(&mut self, kind: Kind, payload: Payload<'_>) {
        let len = payload.len() as u64;
        let stats = &mut self.echo.stats;
        stats.messages_in += 1;
        stats.bytes_in += len;
        stats.messages_out += 1;
        stats.bytes_out += len;
        self.echo.unpublished.add(kind, len);
        self.echo.news.message = true;
        if tracing::enabled!(tracing::Level::DEBUG) {
            // The first characters take at most 4 bytes each.
            log_message(kind, &payload.head(4 * LOGGED_TEXT_CHARS), payload.len());
        }
        if let Some(controlled) = self.echo.controlled.as_deref_mut() {
            controlled.message(kind, payload, self.sender, self.outbox, &mut self.echo.news);
            return;
        }
        // The echo is one frame; a large payload is written from the buffer it was
        // received in, not copied.
        self.sender.message(kind, payload, self.outbox);
    }

    fn ping(&mut self, payload: &[u8]) {
        if self
            .echo
            .controlled
            .as_ref()
            .is_none_or(|controlled| controlled.answers_pings())
        {
            self.sender.pong(payload, self.outbox);
        }
    }

    fn pong(&mut self, payload: &[u8]) {
        if let Ok(bytes) = <[u8; 8]>::try_from(payload) {
            self.echo.news.pong = Some(u64::from_be_bytes(bytes));
        }
    }

    fn close(&mut self, close: Option<(u16, &str)>) {
        if let Some(controlled) = self.echo.controlled.as_deref_mut() {
            if controlled.defer_close(close) {
                // Delayed echoes wait: the answer follows them.
                self.echo.news.controlled = true;
                return;
            }
        }
        // The same Close back (§5.5.1), behind every echo already queued.
        controlled::answer_close(close, self.sender, self.outbox, &mut self.echo.news);
    }

    fn violation(&mut self, violation: Violation) {
        debug!(
            code = violation.close_code(),
            reason = violation.reason(),
            "closing on a protocol violation"
        );
        self.echo.news.violation.get_or_insert(violation);
        // Echoes held for later go out before the Close.
        if let Some(controlled) = self.echo.controlled.as_deref_mut() {
            controlled.flush(self.sender, self.outbox, &mut self.echo.news);
        }
        self.sender.close(
            Some(violation.close_code()),
            violation.reason(),
            self.outbox,
        );
    }
}

/// Message and byte counts of one connection that the shared counters have not seen
/// yet, indexed by [`Kind`] (text, binary).
///
/// The shared counters are atomics that every connection adds to: four locked adds per
/// echo, cheap in instructions but not in cycles, and each moves a cache line between
/// cores when connections run on several. The connection adds up its echoes here and
/// publishes them before each write that sends echoes, so a client that has its echo
/// can already read it in `/metrics`.
#[derive(Debug, Default)]
struct Unpublished {
    messages: [u64; 2],
    bytes: [u64; 2],
}

impl Unpublished {
    fn add(&mut self, kind: Kind, bytes: u64) {
        let index = match kind {
            Kind::Text => 0,
            Kind::Binary => 1,
        };
        self.messages[index] += 1;
        self.bytes[index] += bytes;
    }

    /// Adds the counts to the shared counters and starts again from zero.
    fn publish(&mut self, counters: &EchoCounters, compressed: bool) {
        let [text, binary] = std::mem::take(&mut self.messages);
        if text == 0 && binary == 0 {
            return;
        }
        let [text_bytes, binary_bytes] = std::mem::take(&mut self.bytes);
        for (messages, bytes, counted_in, counted_out) in [
            (text, text_bytes, &counters.text_in, &counters.text_out),
            (
                binary,
                binary_bytes,
                &counters.binary_in,
                &counters.binary_out,
            ),
        ] {
            if messages > 0 {
                counted_in.messages.inc_by(messages);
                counted_in.bytes.inc_by(bytes);
                counted_out.messages.inc_by(messages);
                counted_out.bytes.inc_by(bytes);
            }
        }
        if compressed {
            counters.deflate_in.0.inc_by(text_bytes + binary_bytes);
            counters.deflate_out.0.inc_by(text_bytes + binary_bytes);
        }
    }
}

/// The tutorial's `Got message: …` line, at debug level: text shortened, binary as its
/// length. Payloads never reach the info level.
/// `head` is the start of the message, `len` bytes in all.
fn log_message(kind: Kind, head: &[u8], len: usize) {
    match kind {
        Kind::Text => {
            let text = String::from_utf8_lossy(head);
            let mut shown: String = text.chars().take(LOGGED_TEXT_CHARS).collect();
            if shown.len() < len {
                shown.push('…');
            }
            debug!(len, "Got message: {shown:?}");
        }
        Kind::Binary => debug!(len, "Got message: <{len} bytes of binary>"),
    }
}
