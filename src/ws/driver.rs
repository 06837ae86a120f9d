//! The I/O driver of one WebSocket: the only code that reads from or writes to an
//! upgraded connection. It reads into a buffer its thread shares with every other
//! connection, feeds the bytes to the sans-IO [`Receiver`], lets the policy (the echo,
//! in `echo`) answer into the [`Outbox`], and writes that out with one `writev` per
//! wake-up. It also owns what a connection may hold (the read budget, backpressure) and
//! every deadline (keepalive, idle, stall, close).
//!
//! Every Close the server starts goes through [`Driver::close`]: it queues the Close
//! behind every echo, then keeps reading and dropping what the client still sends,
//! until the client's Close, its EOF, the close timeout or a byte cap, so that the
//! client always receives our Close (a lingering close, as nginx does: closing a socket
//! with unread bytes makes the kernel send a reset that destroys what is in flight).

use std::{
    borrow::Cow,
    future::poll_fn,
    io::IoSlice,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Semaphore,
    time::{Instant, sleep_until, timeout},
};
use tokio_util::sync::{CancellationToken, PollSemaphore};
use tracing::trace;

use super::{
    close::Violation,
    connection::{Handler, Receiver, Sender},
    outbox::{MAX_IO_SLICES, Outbox},
};
use prometheus_client::metrics::counter::Counter;

use super::waits::{Waits, Woken};
use crate::metrics::{Limit, Metrics};

/// Bytes a connection may hold (message in progress and unwritten echoes) without
/// charging the read budget: enough for every small-message workload, so only bulk
/// senders ever wait for the budget.
pub(crate) const FREE_ALLOWANCE: usize = 64 * 1024;

/// The least taken from the budget at a time past the allowance. A connection that
/// holds more takes half of what it holds (up to [`MAX_BUDGET_CHUNK`]), so that a
/// large message goes to the budget a few times, not once per read.
const BUDGET_CHUNK: usize = 64 * 1024;

/// The most taken from the budget at a time: a handful of acquires per 16 MiB message,
/// and at most this much taken and not yet held. (When a message was one growing
/// buffer, each step was also a copy whose old buffer stayed resident until purged;
/// its chunks are now never moved, see `chunked.rs`.)
const MAX_BUDGET_CHUNK: usize = 4 * 1024 * 1024;

/// Permits given back for memory just freed return to the budget this long after, when
/// there are at least [`PURGE_DELAY_FROM`] of them: the allocator gives freed pages back
/// to the system lazily (the binary's jemalloc within about 100 ms: `dirty_decay_ms` in
/// `.cargo/config.toml`, its background thread waking at most every 100 ms), so memory
/// another connection takes at once is resident beside it meanwhile, unless it happens to
/// be reused. `benches/attacks.py hold` (release build), where connections closed at the
/// message timeout free 16 MiB each while others wait for the budget: VmHWM 265–278 MiB
/// given back at once, 254–260 MiB after 200 ms, against a bound of 265 MiB.
const PURGE_DELAY: Duration = Duration::from_millis(200);

/// The least given back after [`PURGE_DELAY`]: smaller frees are mostly reused from
/// the allocator's thread caches, while a message's 1 MiB chunks go back to the pages
/// of one arena, which the other threads' arenas do not reuse.
const PURGE_DELAY_FROM: usize = 1024 * 1024;

/// Gives `permits` back to `budget` for memory just freed: at once if few, after
/// [`PURGE_DELAY`] if many (and at once outside a runtime, which then is ending).
fn give_back_freed(budget: Arc<Semaphore>, permits: usize) {
    if permits < PURGE_DELAY_FROM {
        budget.add_permits(permits);
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                tokio::time::sleep(PURGE_DELAY).await;
                budget.add_permits(permits);
            });
        }
        Err(_) => budget.add_permits(permits),
    }
}

/// How often a connection waiting for the budget looks whether its client has left.
const PEER_CHECK: Duration = Duration::from_millis(250);

/// Message checks a connection may spend waiting for the budget before it is closed.
const STARVED_CHECKS: u8 = 3;

/// Reads one wake-up may take before the connection yields to others.
const MAX_READS_PER_POLL: u32 = 32;

/// The least room worth a read: with less, a connection takes more from the budget
/// first (or waits for it).
const MIN_READ: usize = 4 * 1024;

/// Size of the read buffer each thread shares among its connections, the event loop's
/// buffer of uWebSockets: a read lands here and is taken apart before the next one, so
/// idle connections hold no read buffer at all, and a message of up to 64 KiB takes one
/// `recv`.
const SCRATCH_SIZE: usize = 64 * 1024;

thread_local! {
    /// The shared read buffer (see [`SCRATCH_SIZE`]). Allocated zeroed on first use
    /// (`calloc`: only the pages reads reach become resident).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// Most bytes read and dropped while waiting for the peer's Close, as a multiple of the
/// largest frame: enough for a client that writes a whole over-limit frame before it
/// reads (Node's `ws` does), bounded for one that never stops.
const LINGER_FRAMES: usize = 2;

/// The buffer budget every connection shares: permits are bytes.
#[derive(Debug)]
pub(crate) struct Budget {
    permits: Arc<Semaphore>,
    /// Connections waiting for permits now: a message that holds budget while others
    /// wait must make progress (see [`Rules::message_timeout`]).
    waiting: AtomicUsize,
}

impl Budget {
    /// A budget of `bytes`.
    pub(crate) fn new(bytes: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(bytes)),
            waiting: AtomicUsize::new(0),
        }
    }
}

/// The deadlines and limits of one connection, from the settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    /// Keepalive ping interval.
    pub(crate) ping_interval: Option<Duration>,
    /// How long a ping may go unanswered.
    pub(crate) ping_timeout: Duration,
    /// Close after this long without a message.
    pub(crate) idle_timeout: Option<Duration>,
    /// Close a client that has not read its echoes for this long.
    pub(crate) stall_timeout: Option<Duration>,
    /// How long a message that holds budget may go without progress: no bytes while
    /// the server reads, or no room while other connections wait for the budget.
    pub(crate) message_timeout: Option<Duration>,
    /// How long a Close we sent waits for the peer's.
    pub(crate) close_timeout: Duration,
    /// Stop reading while this many bytes are unwritten: TCP backpressure.
    pub(crate) write_limit: usize,
    /// Most bytes dropped unread while waiting for the peer's Close.
    pub(crate) linger_limit: usize,
    /// The whole read budget, in bytes: no connection waits for more.
    pub(crate) budget: usize,
    /// Close (1000) a connection this long after its upgrade.
    pub(crate) max_duration: Option<Duration>,
    /// Most bytes read per second (the `read_rate` control).
    pub(crate) read_rate: Option<u64>,
}

impl Rules {
    /// The rules `settings` set.
    pub(crate) fn new(settings: &crate::Settings) -> Self {
        Self {
            ping_interval: settings.ping_interval,
            ping_timeout: settings.ping_timeout,
            idle_timeout: settings.idle_timeout,
            stall_timeout: settings.stall_timeout,
            message_timeout: settings.message_timeout,
            close_timeout: settings.close_timeout,
            write_limit: settings.write_buffer_limit,
            linger_limit: settings
                .max_frame_size
                .saturating_mul(LINGER_FRAMES)
                .max(SCRATCH_SIZE),
            budget: settings.buffer_budget,
            max_duration: settings.max_connection_duration,
            read_rate: None,
        }
    }

    /// These rules with a connection's own ping interval and read rate (the `ping` and
    /// `read_rate` controls).
    pub(crate) fn with_controls(&self, ping: Option<Duration>, read_rate: Option<u64>) -> Self {
        Self {
            ping_interval: ping.or(self.ping_interval),
            read_rate,
            ..*self
        }
    }
}

/// A stream the driver runs on. Besides reading and writing, it may be able to tell
/// that the peer has gone without reading what it sent before: a connection waiting for
/// the budget reads nothing, and must still notice a client that left.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// Whether the peer is known to have closed or reset the connection, whatever data
    /// it sent before, without reading and without waiting. The default cannot tell
    /// (TLS and HTTP/2 streams: the message and stall timeouts end such connections).
    fn peer_closed(&self) -> bool {
        false
    }

    /// Makes dropping the stream abort the connection rather than close it (the `drop`
    /// control). The default does nothing: an HTTP/2 stream dropped without a shutdown
    /// is reset already (`http::h2::Tunnel`), and hyper's wrapper around any other
    /// stream cannot be reached.
    fn reset_on_drop(&self) {}
}

impl Transport for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {}

/// A WebSocket upgraded over HTTP/1.1 on the TLS port (behind `http::preface::Rewind`):
/// its TCP socket answers for it.
impl Transport for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn peer_closed(&self) -> bool {
        self.get_ref().0.peer_closed()
    }

    fn reset_on_drop(&self) {
        self.get_ref().0.reset_on_drop();
    }
}

impl Transport for tokio::net::TcpStream {
    fn peer_closed(&self) -> bool {
        // The socket's readiness as the reactor last saw it: the peer's FIN or reset
        // stays in it as "read closed" (tokio never clears that), even behind data
        // that waits unread. Polled once with a waker that does nothing, so that no
        // waiter is left registered, and the readiness is left as it is (clearing it
        // would hide the waiting data from the next read).
        let check = std::pin::pin!(self.ready(tokio::io::Interest::READABLE));
        let mut noop = Context::from_waker(std::task::Waker::noop());
        match check.poll(&mut noop) {
            Poll::Ready(Ok(ready)) => ready.is_read_closed(),
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        }
    }

    fn reset_on_drop(&self) {
        // A zero linger makes close() send a reset at once. (tokio deprecates
        // `set_linger` because a non-zero linger blocks the thread in close; zero
        // never does.)
        #[allow(deprecated)]
        let _ = self.set_linger(Some(Duration::ZERO));
    }
}

/// How a connection ended.
#[derive(Debug)]
pub(crate) enum Ending {
    /// The client sent Close; its code (1005 when it gave none) was echoed.
    ClientClosed(u16),
    /// The server sent Close with this code and reason; `Some` limit when a limit made
    /// it close.
    ServerClosed(u16, Cow<'static, str>, Option<Limit>),
    /// The client broke a protocol rule or a size limit; the server closed with the
    /// violation's code.
    ProtocolError(Violation),
    /// The TCP connection ended without a closing handshake.
    Dropped(String),
}

/// What the connection's policy (the echo) answers to what arrives, and what the
/// driver learns from it.
pub(crate) trait Policy {
    /// The handler for the next batch of input: it may queue frames with `sender`.
    fn handler<'p>(
        &'p mut self,
        sender: &'p mut Sender,
        outbox: &'p mut Outbox,
    ) -> impl Handler + 'p;
    /// What happened in the input handed over so far that the driver must act on.
    fn take_news(&mut self) -> News;
    /// Publishes counts; called once per wake-up, before the echoes go out.
    fn publish(&mut self);
    /// What the policy holds and plans (test controls), asked when the news says it
    /// may have changed.
    fn schedule(&mut self) -> Schedule;
    /// The room the next scheduled message needs, while a stream runs: the connection
    /// reads nothing until the stream is over.
    fn stream_need(&self) -> Option<usize>;
    /// Sends what is due at `now`, stream messages only while `room` covers them.
    fn send_due(&mut self, now: Instant, room: usize, sender: &mut Sender, outbox: &mut Outbox);
    /// Sends everything held for later at once: the server is about to close.
    fn flush(&mut self, sender: &mut Sender, outbox: &mut Outbox);
}

/// What a policy under test controls holds and plans.
#[derive(Debug, Default)]
pub(crate) struct Schedule {
    /// Bytes held for later (delayed echoes): counted with what the connection holds.
    pub(crate) held: usize,
    /// When the policy next has something to send; `None` when nothing is scheduled.
    pub(crate) due: Option<Instant>,
    /// What the driver must do now.
    pub(crate) action: Option<Action>,
}

/// What the policy asks the driver to do (the `close`, `drop` and `fault` controls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Close with this code and reason, behind what is queued.
    Close {
        /// The code.
        code: u16,
        /// The reason.
        reason: Box<str>,
    },
    /// Our Close with this code is already queued: wait for the peer's.
    Closed(u16),
    /// Write what is queued, then reset the connection without a Close.
    Drop,
}

/// What the policy saw since the driver last asked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct News {
    /// A message arrived (for the idle timeout).
    pub(crate) message: bool,
    /// The payload of a Pong, when one arrived that could answer our ping.
    pub(crate) pong: Option<u64>,
    /// The peer's Close arrived and its answer is queued: its code, 1005 for none.
    pub(crate) peer_closed: Option<u16>,
    /// The peer broke a rule, and our Close is queued.
    pub(crate) violation: Option<Violation>,
    /// The policy's [`Schedule`] may have changed (test controls only): ask it.
    pub(crate) controlled: bool,
}

/// What woke the loop.
enum Event {
    /// The peer's Close or a violation: the connection closes.
    Closing,
    /// The stream ended or failed.
    Gone(String),
    /// The policy asked for a close or a drop.
    Action(Action),
    Shutdown,
    Timer,
}

impl From<Woken> for Event {
    fn from(woken: Woken) -> Self {
        match woken {
            Woken::Shutdown => Event::Shutdown,
            Woken::Timer => Event::Timer,
        }
    }
}

/// One connection's I/O loop and everything it holds.
pub(crate) struct Driver<'a, S> {
    io: S,
    /// Keepalive counters and the ping round-trip histogram.
    metrics: &'a Metrics,
    /// Wire bytes read and written, counted on compressed connections only.
    wire: Option<&'a (Counter, Counter)>,
    receiver: Receiver,
    sender: Sender,
    outbox: Outbox,
    /// Shared by every connection (`ws::echo::EchoConfig`).
    rules: &'a Rules,
    /// The shared budget's waiting count.
    shared_budget: &'a Budget,
    budget: PollSemaphore,
    /// Permits taken from the budget and not given back.
    acquired: usize,
    /// This connection is in the shared budget's waiting count.
    counted_waiting: bool,
    /// Echoes were written since the last flush.
    unflushed: bool,
    /// The permits a read waits for, while it waits: writing (which frees some of what
    /// the connection holds) may let it go on without them.
    budget_wait: Option<u32>,
    /// Since when the client has not taken its echoes.
    stalled_since: Option<Instant>,
    /// When the message in progress, which holds budget, is next checked for progress
    /// (see [`Rules::message_timeout`]).
    message_check: Option<Instant>,
    /// Bytes arrived since the last message check.
    read_since_check: bool,
    /// Message checks in a row that found the connection waiting for the budget.
    starved_checks: u8,
    /// The timer looks at the socket while the connection waits for the budget.
    peer_check_armed: bool,
    /// When the last message arrived (kept only with an idle timeout).
    last_message: Instant,
    next_ping: Option<Instant>,
    /// The outstanding keepalive ping: its payload and when it went out.
    awaiting_pong: Option<(u64, Instant)>,
    pings_sent: u64,
    /// What the policy reported and the loop has not acted on.
    news: News,
    /// What only connections with test controls or a duration limit need; boxed, since
    /// most have none and every idle connection carries its driver.
    extras: Option<Box<Extras>>,
}

/// The driver's state for test controls and `--max-connection-duration`.
#[derive(Debug, Default)]
struct Extras {
    /// Bytes the policy holds for later ([`Schedule::held`]), as of its last news.
    scheduled: usize,
    /// When the policy next has something to send, as of its last news.
    policy_due: Option<Instant>,
    /// The timer must be set again (`policy_due` changed, or the read rate ran out).
    due_moved: bool,
    /// The policy's deadline as the timer was last set with it.
    armed: Option<Instant>,
    /// The next stream message waits for the outbox to drain, not for time.
    stream_blocked: bool,
    /// When `--max-connection-duration` closes the connection.
    ends_at: Option<Instant>,
    /// The `read_rate` control's window, when there is one.
    rate: Option<ReadRate>,
    /// What the policy asked for and the loop has not done yet.
    action: Option<Action>,
}

/// A read rate's window: `left` bytes may still be read until `started` + 1 s.
#[derive(Debug)]
struct ReadRate {
    started: Instant,
    left: u64,
}

impl<S> Drop for Driver<'_, S> {
    fn drop(&mut self) {
        give_back_freed(self.budget.clone_inner(), self.acquired);
        self.set_waiting(false);
    }
}

impl<S> Driver<'_, S> {
    /// Records whether this connection waits for the budget, for the shared count.
    fn set_waiting(&mut self, waiting: bool) {
        if std::mem::replace(&mut self.counted_waiting, waiting) != waiting {
            if waiting {
                self.shared_budget.waiting.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared_budget.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl<'a, S: Transport> Driver<'a, S> {
    /// A driver for `io`, which starts at a frame boundary (right after the handshake).
    /// `wire` counts the bytes read and written (compressed connections).
    pub(crate) fn new(
        io: S,
        metrics: &'a Metrics,
        wire: Option<&'a (Counter, Counter)>,
        receiver: Receiver,
        sender: Sender,
        rules: &'a Rules,
        budget: &'a Budget,
    ) -> Self {
        let now = Instant::now();
        Self {
            io,
            metrics,
            wire,
            receiver,
            sender,
            outbox: Outbox::default(),
            rules,
            shared_budget: budget,
            budget: PollSemaphore::new(Arc::clone(&budget.permits)),
            acquired: 0,
            counted_waiting: false,
            unflushed: false,
            budget_wait: None,
            stalled_since: None,
            message_check: None,
            read_since_check: false,
            starved_checks: 0,
            peer_check_armed: false,
            last_message: now,
            next_ping: rules.ping_interval.map(|interval| now + interval),
            awaiting_pong: None,
            pings_sent: 0,
            news: News::default(),
            extras: (rules.max_duration.is_some() || rules.read_rate.is_some()).then(|| {
                Box::new(Extras {
                    ends_at: rules.max_duration.map(|longest| now + longest),
                    rate: rules.read_rate.map(|rate| ReadRate {
                        started: now,
                        left: rate,
                    }),
                    ..Extras::default()
                })
            }),
        }
    }

    /// The sending half and the outbox, to queue frames before the loop starts (the
    /// greeting).
    pub(crate) fn sending(&mut self) -> (&mut Sender, &mut Outbox) {
        (&mut self.sender, &mut self.outbox)
    }

    /// Takes in bytes the client sent before the driver started (right after its
    /// handshake), as if they had just been read.
    pub(crate) fn receive_early(&mut self, early: &[u8], policy: &mut impl Policy) {
        let mut input = early.to_vec();
        {
            let mut handler = policy.handler(&mut self.sender, &mut self.outbox);
            self.receiver.receive(&mut input, &mut handler);
        }
        self.take_news(policy);
    }

    /// Runs the connection to its end, `policy` answering what arrives.
    ///
    /// Borrowed, not consumed: an async fn keeps its arguments for its whole life
    /// beside the locals they move into, so a driver taken by value was stored twice in
    /// every connection's task (rust-lang/rust#62958).
    pub(crate) async fn run(
        &mut self,
        policy: &mut impl Policy,
        shutdown: &CancellationToken,
    ) -> Ending {
        // What the policy scheduled from the start (a stream, a close at once).
        self.take_news(policy);
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let timer = sleep_until(self.next_deadline());
        tokio::pin!(timer);
        let mut waits = Waits::new(shutdown, cancelled, timer);
        // A task is as large as its largest await, for all of its life: the closing
        // paths are boxed so that an idle connection does not carry their state.
        loop {
            match poll_fn(|cx| self.poll_event(cx, policy, &mut waits)).await {
                Event::Closing => {
                    if let Some(violation) = self.news.violation {
                        // Our Close is queued; however the wait for the client's ends,
                        // the violation is what ended the connection.
                        let _ = Box::pin(self.linger(policy)).await;
                        return Ending::ProtocolError(violation);
                    }
                    let code = self.news.peer_closed.unwrap_or(1005);
                    // Our answer is queued behind every echo: write it, then the server
                    // closes TCP first (§7.1.1).
                    let close_timeout = self.rules.close_timeout;
                    let _ = timeout(close_timeout, Box::pin(self.write_all_and_shut(policy))).await;
                    return Ending::ClientClosed(code);
                }
                Event::Gone(detail) => {
                    // A client that sent its last messages and shut its side may still
                    // read their echoes, delayed ones included.
                    self.flush_policy(policy);
                    if !self.outbox.is_empty() {
                        let close_timeout = self.rules.close_timeout;
                        let _ =
                            timeout(close_timeout, Box::pin(self.write_all_and_shut(policy))).await;
                    }
                    return Ending::Dropped(detail);
                }
                Event::Shutdown => {
                    return Box::pin(self.close(policy, 1001, "server shutting down".into(), None))
                        .await;
                }
                Event::Action(action) => return Box::pin(self.act(policy, action)).await,
                Event::Timer => {
                    if let Some(ending) = Box::pin(self.on_timer(policy)).await {
                        return ending;
                    }
                    waits.reset_timer(self.next_deadline());
                }
            }
        }
    }

    /// Reads, answers and writes until something needs the loop's attention.
    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        policy: &mut impl Policy,
        waits: &mut Waits<'_, '_>,
    ) -> Poll<Event> {
        let mut reads = 0;
        let mut timers_moved = false;
        if let Some(event) = self.news_event() {
            // Found in the bytes that came with the handshake.
            return Poll::Ready(event);
        }
        loop {
            // What the policy scheduled (test controls only), when it is due and the
            // echoes fit.
            let mut due_again = false;
            if let Some(due) = self.policy_due() {
                let now = Instant::now();
                if due <= now && self.outbox.len() < self.rules.write_limit {
                    let (room, blocked) = match policy.stream_need() {
                        Some(need) => match self.poll_budget(cx, need) {
                            // Room short of a message with the budget not waited for
                            // (what the outbox holds must drain first): the next write
                            // or read wakes the loop, the timer need not.
                            Poll::Ready(covered) => (covered, covered < need),
                            Poll::Pending => (0, false),
                        },
                        None => (usize::MAX, false),
                    };
                    if let Some(extras) = self.extras.as_deref_mut() {
                        extras.stream_blocked = blocked;
                    }
                    policy.send_due(now, room, &mut self.sender, &mut self.outbox);
                    self.take_news(policy);
                    if let Some(event) = self.news_event() {
                        return Poll::Ready(event);
                    }
                    due_again = self.policy_due().is_some_and(|due| due <= now)
                        && self.budget_wait.is_none()
                        && !blocked;
                }
            }
            // Read while the echoes fit: past the limit the client is not reading
            // them, and the server stops reading too. Echoes held for later count;
            // a stream waiting for the budget keeps it (a read would take its turn).
            if self.outbox.len() + self.scheduled() < self.rules.write_limit
                && (self.extras.is_none() || !self.reads_held_back_by_schedule(policy))
            {
                match self.poll_read_and_answer(cx, policy) {
                    Poll::Ready(Ok(())) => {
                        self.take_news(policy);
                        if let Some(event) = self.news_event() {
                            return Poll::Ready(event);
                        }
                        reads += 1;
                        if reads == MAX_READS_PER_POLL {
                            // A stream whose reads never wait (an HTTP/2 stream reads
                            // from h2's buffer, outside tokio's cooperative budget) must
                            // not hold the thread: write what is queued, then yield.
                            policy.publish();
                            if let Poll::Ready(Err(error)) = self.poll_write_out(cx) {
                                return Poll::Ready(Event::Gone(error.to_string()));
                            }
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        continue;
                    }
                    Poll::Ready(Err(detail)) => return Poll::Ready(Event::Gone(detail)),
                    Poll::Pending => {}
                }
            }
            // Everything buffered is read: count it before its echoes go out.
            policy.publish();
            match self.poll_write_out(cx) {
                Poll::Ready(Ok(true)) => continue,
                Poll::Ready(Ok(false)) | Poll::Pending => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Event::Gone(error.to_string())),
            }
            self.release_budget();
            let waiting = self.budget_wait.is_some();
            if waiting && self.io.peer_closed() {
                // Waiting for the budget, the connection reads nothing: the socket
                // itself says the client has gone.
                return Poll::Ready(Event::Gone(
                    "connection closed while waiting for buffer space".into(),
                ));
            }
            // Echoes the client does not take: past the write limit, or any while the
            // read waits for budget they hold.
            let stalled =
                self.outbox.len() >= self.rules.write_limit || (waiting && !self.outbox.is_empty());
            if !stalled {
                self.stalled_since = None;
            } else if self.stalled_since.is_none() && self.rules.stall_timeout.is_some() {
                trace!("client is not reading its echoes; reading paused");
                self.stalled_since = Some(Instant::now());
                timers_moved = true;
            }
            // A message that holds budget is checked for progress from time to time.
            let holding = (self.acquired > 0 || self.budget_wait.is_some())
                && self.receiver.message_in_progress();
            if holding != self.message_check.is_some() {
                self.message_check = holding
                    .then(|| {
                        self.rules
                            .message_timeout
                            .map(|limit| Instant::now() + limit)
                    })
                    .flatten();
                self.read_since_check = false;
                timers_moved |= self.message_check.is_some();
            }
            // Waiting, the socket is looked at every PEER_CHECK (the FIN arrives
            // as readiness, which wakes no one while nothing reads).
            if waiting != self.peer_check_armed {
                self.peer_check_armed = waiting;
                timers_moved = true;
            }
            if due_again {
                // More is due now (a stream's next batch): go on, within the turn.
                reads += 1;
                if reads < MAX_READS_PER_POLL {
                    continue;
                }
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.extras.is_some() {
                // The policy's deadline counts only while it can be acted on: set the
                // timer again when that changes (the outbox drained below the limit).
                let armed = self.scheduled_deadline();
                if let Some(extras) = self.extras.as_deref_mut() {
                    timers_moved |= std::mem::take(&mut extras.due_moved);
                    timers_moved |= std::mem::replace(&mut extras.armed, armed) != armed;
                }
            }
            if timers_moved {
                waits.reset_timer(self.next_deadline());
            }
            return waits.poll(cx).map(Event::from);
        }
    }

    /// What the loop must do about the news: the peer's Close or a violation closes,
    /// an action is carried out.
    fn news_event(&mut self) -> Option<Event> {
        if self.news.peer_closed.is_some() || self.news.violation.is_some() {
            return Some(Event::Closing);
        }
        self.extras.as_mut()?.action.take().map(Event::Action)
    }

    /// Acts on what the policy saw in the last input.
    fn take_news(&mut self, policy: &mut impl Policy) {
        let news = policy.take_news();
        if news.controlled {
            let schedule = policy.schedule();
            let extras = self.extras.get_or_insert_with(Box::default);
            extras.scheduled = schedule.held;
            if schedule.due != extras.policy_due {
                extras.policy_due = schedule.due;
                extras.due_moved = true;
            }
            if extras.action.is_none() {
                extras.action = schedule.action;
            }
        }
        if news.message && self.rules.idle_timeout.is_some() {
            // Reading the clock costs ~40 instructions per echo; only the idle timeout
            // needs it.
            self.last_message = Instant::now();
        }
        if let (Some(payload), Some((sent, at))) = (news.pong, self.awaiting_pong) {
            if payload == sent {
                let rtt = at.elapsed();
                trace!(rtt_us = rtt.as_micros() as u64, "pong");
                self.metrics.ping_rtt.observe(rtt.as_secs_f64());
                self.awaiting_pong = None;
            }
        }
        self.news.peer_closed = self.news.peer_closed.or(news.peer_closed);
        self.news.violation = self.news.violation.or(news.violation);
    }

    /// Reads what the socket has into the thread's buffer and hands it to the receiver
    /// and the policy. `Err` when the stream ended or failed.
    fn poll_read_and_answer(
        &mut self,
        cx: &mut Context<'_>,
        policy: &mut impl Policy,
    ) -> Poll<Result<(), String>> {
        let covered = std::task::ready!(self.poll_budget(cx, MIN_READ));
        let (read_room, grow_room) = self.split_room(covered);
        if self.receiver.has_backlog() {
            // What an earlier read brought and the room did not let through comes first.
            let mut handler = policy.handler(&mut self.sender, &mut self.outbox);
            self.receiver.resume(&mut handler, grow_room);
            return Poll::Ready(Ok(()));
        }
        let rules = self.rules;
        let read_room = match self.extras.as_deref_mut() {
            Some(Extras {
                rate: Some(rate),
                due_moved,
                ..
            }) => {
                let now = Instant::now();
                if now >= rate.started + Duration::from_secs(1) {
                    rate.started = now;
                    rate.left = rules.read_rate.unwrap_or(u64::MAX);
                }
                if rate.left == 0 {
                    // The timer wakes the loop when the next second's bytes may come.
                    *due_moved = true;
                    return Poll::Pending;
                }
                read_room.min(usize::try_from(rate.left).unwrap_or(usize::MAX))
            }
            _ => read_room,
        };
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(&mut scratch[..read_room.min(SCRATCH_SIZE)]);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(error)) => Poll::Ready(Err(error.to_string())),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    Poll::Ready(Err("connection closed".into()))
                }
                Poll::Ready(Ok(())) => {
                    let input = buf.filled_mut();
                    if let Some((read, _)) = self.wire {
                        read.inc_by(input.len() as u64);
                    }
                    if let Some(rate) = self.extras.as_deref_mut().and_then(|e| e.rate.as_mut()) {
                        rate.left = rate.left.saturating_sub(input.len() as u64);
                    }
                    self.read_since_check = true;
                    let mut handler = policy.handler(&mut self.sender, &mut self.outbox);
                    self.receiver.receive_within(input, &mut handler, grow_room);
                    Poll::Ready(Ok(()))
                }
            }
        })
    }

    /// Bytes this connection holds: the message in progress, input not yet followed,
    /// the outbox's buffers until they are written out whole (a partly written 1 MiB
    /// echo holds 1 MiB: counting only its unwritten rest let 1,000 streams to
    /// non-readers hold 400 MiB past a 32 MiB budget) and echoes held for later. With
    /// permessage-deflate the message counts twice: its echo is compressed beside it
    /// before it is freed.
    #[inline]
    fn held(&self) -> usize {
        let echo_reserve = if self.wire.is_some() {
            self.receiver.message_capacity()
        } else {
            0
        };
        self.receiver.buffered() + echo_reserve + self.outbox.held() + self.scheduled()
    }

    /// Whether the connection's own controls keep the loop from reading: echoes held
    /// for later fill the write limit, this second's read rate is spent, or
    /// [`Driver::reads_held_back_by_schedule`].
    fn reads_held_back(&self, policy: &impl Policy) -> bool {
        self.extras.as_deref().is_some_and(|extras| {
            self.scheduled() >= self.rules.write_limit
                || extras.rate.as_ref().is_some_and(|rate| rate.left == 0)
                || self.reads_held_back_by_schedule(policy)
        })
    }

    /// A stream waits for the budget (a read would take its turn), or the peer's Close
    /// came and waits behind delayed echoes (nothing after it is read).
    fn reads_held_back_by_schedule(&self, policy: &impl Policy) -> bool {
        (policy.stream_need().is_some() && self.budget_wait.is_some())
            || self.receiver.close_received()
    }

    /// What the policy scheduled, while it can be acted on: not while the outbox is
    /// over the write limit, the budget is waited for, or a stream message waits for
    /// the outbox to drain (their progress wakes the loop).
    fn scheduled_deadline(&self) -> Option<Instant> {
        let extras = self.extras.as_deref()?;
        extras.policy_due.filter(|_| {
            self.outbox.len() < self.rules.write_limit
                && self.budget_wait.is_none()
                && !extras.stream_blocked
        })
    }

    /// Bytes the policy holds for later.
    #[inline]
    fn scheduled(&self) -> usize {
        self.extras.as_ref().map_or(0, |extras| extras.scheduled)
    }

    /// When the policy next has something to send.
    #[inline]
    fn policy_due(&self) -> Option<Instant> {
        self.extras.as_ref()?.policy_due
    }

    /// Splits the room the budget covers between the next read and what the receiver
    /// may allocate from it, so that together they stay within it: a read adds at most
    /// its own bytes to an uncompressed message (after the spare room it already
    /// holds) or to the echoes; compressed input may be kept whole for a later turn
    /// while what it inflates to (counted twice, see [`Driver::held`]) takes the rest.
    fn split_room(&self, covered: usize) -> (usize, usize) {
        if self.wire.is_some() {
            (covered / 2, covered / 4)
        } else {
            (covered + self.receiver.spare(), covered)
        }
    }

    /// How much the next read (or stream message) may take: what the allowance and the
    /// permits taken cover. Under `want` (at least [`MIN_READ`]), it first takes what the connection holds beyond its permits
    /// (an inflated message can grow past what its read was allowed) plus one chunk;
    /// Pending while the budget is spent.
    #[inline(always)]
    fn poll_budget(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<usize> {
        let held = self.held();
        let covered = (FREE_ALLOWANCE + self.acquired).saturating_sub(held);
        let want = want.max(MIN_READ);
        if covered >= want {
            if self.budget_wait.take().is_some() {
                // Written echoes made room while an acquire was queued: drop it (and
                // whatever it was assigned goes back), or it would keep taking permits
                // that no one counts.
                self.budget = PollSemaphore::new(self.budget.clone_inner());
                self.set_waiting(false);
            }
            return Poll::Ready(covered);
        }
        // The same count while the wait lasts: a different one would requeue the
        // acquire at the back of the semaphore's line.
        let deficit = held.saturating_sub(FREE_ALLOWANCE + self.acquired);
        let chunk = (held / 2).clamp(BUDGET_CHUNK, MAX_BUDGET_CHUNK).max(want);
        let need = *self.budget_wait.get_or_insert(
            u32::try_from((deficit + chunk).min(self.rules.budget)).unwrap_or(u32::MAX),
        );
        let acquired = self.budget.poll_acquire_many(cx, need);
        if acquired.is_pending() && !self.counted_waiting {
            self.metrics.budget_waits.inc();
            self.set_waiting(true);
        }
        match std::task::ready!(acquired) {
            Some(permit) => {
                permit.forget();
                self.budget_wait = None;
                self.set_waiting(false);
                self.acquired += need as usize;
                Poll::Ready((FREE_ALLOWANCE + self.acquired).saturating_sub(held))
            }
            // The semaphore is never closed; were it, read without it.
            None => Poll::Ready(SCRATCH_SIZE),
        }
    }

    /// Gives back the permits this connection no longer needs.
    fn release_budget(&mut self) {
        let surplus = self.take_surplus();
        if surplus > 0 {
            self.budget.clone_inner().add_permits(surplus);
        }
    }

    /// Drops the message in progress, whose permits go back once the allocator has had
    /// time to return its memory ([`PURGE_DELAY`]): the connection is closing, and its
    /// echoes are not held back by the wait.
    fn drop_message(&mut self) {
        self.receiver.drain();
        let surplus = self.take_surplus();
        if surplus > 0 {
            give_back_freed(self.budget.clone_inner(), surplus);
        }
    }

    /// The permits taken beyond what the connection holds now, no longer counted as
    /// its own.
    fn take_surplus(&mut self) -> usize {
        let needed = self.held().saturating_sub(FREE_ALLOWANCE);
        let surplus = self.acquired.saturating_sub(needed);
        self.acquired -= surplus;
        surplus
    }

    /// Writes what the outbox holds, then flushes. `Ok(true)` when that may let a read
    /// go on that could not (the outbox was over the write limit, or the read waited
    /// for budget that written echoes held), `Ok(false)` when there is nothing more to
    /// do.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let was_full = self.outbox.len() >= self.rules.write_limit || self.budget_wait.is_some();
        let mut wrote = false;
        while !self.outbox.is_empty() {
            let written = if let Some(bytes) = self.outbox.contiguous() {
                std::task::ready!(Pin::new(&mut self.io).poll_write(cx, bytes))?
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IO_SLICES];
                let count = self.outbox.io_slices(&mut slices);
                std::task::ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))?
            };
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.outbox.advance(written);
            self.unflushed = true;
            wrote = true;
            if let Some((_, counted)) = self.wire {
                counted.inc_by(written as u64);
            }
        }
        if self.unflushed {
            std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(was_full && wrote))
    }

    /// Writes everything queued, then ends our side of the stream.
    async fn write_all_and_shut(&mut self, policy: &mut impl Policy) {
        policy.publish();
        if poll_fn(|cx| self.poll_write_out(cx)).await.is_ok() {
            let _ = poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await;
        }
    }

    /// Sends Close with `code` behind every queued echo and waits for the peer's Close
    /// (see [`Driver::linger`]).
    async fn close(
        &mut self,
        policy: &mut impl Policy,
        code: u16,
        reason: Cow<'static, str>,
        limit: Option<Limit>,
    ) -> Ending {
        // What the policy holds for later is echoed before the Close.
        if let Some(answered) = self.flush_policy(policy) {
            // The peer's Close was waiting behind those echoes, and is now answered.
            let close_timeout = self.rules.close_timeout;
            let _ = timeout(close_timeout, self.write_all_and_shut(policy)).await;
            return Ending::ClientClosed(answered);
        }
        self.sender.close(Some(code), &reason, &mut self.outbox);
        // The message is dropped: what it held goes back to the others as soon as its
        // memory is returned, not after the closing handshake.
        self.drop_message();
        match self.linger(policy).await {
            Ok(()) => Ending::ServerClosed(code, reason, limit),
            Err(detail) if detail == TIMED_OUT => {
                Ending::ServerClosed(code, TIMED_OUT.into(), limit)
            }
            Err(detail) => Ending::Dropped(detail),
        }
    }

    /// Carries out what the policy asked for: a close with its code, the wait for the
    /// peer's Close after a Close the policy queued, or a reset.
    async fn act(&mut self, policy: &mut impl Policy, action: Action) -> Ending {
        match action {
            Action::Close { code, reason } => {
                self.close(policy, code, String::from(reason).into(), None)
                    .await
            }
            Action::Closed(code) => {
                // As in `close`: nothing more is followed, and the budget goes back.
                self.drop_message();
                let _ = self.linger(policy).await;
                Ending::ServerClosed(code, "fault=bad-close-code".into(), None)
            }
            Action::Drop => {
                // What was echoed before the drop is written first (the `after=N`
                // echoes), then the connection is aborted.
                policy.publish();
                let close_timeout = self.rules.close_timeout;
                let _ = timeout(close_timeout, poll_fn(|cx| self.poll_write_out(cx))).await;
                self.io.reset_on_drop();
                Ending::Dropped("reset on request (drop control)".into())
            }
        }
    }

    /// Our Close is queued: writes it, then reads and drops what the client sends
    /// until its Close or its EOF, for at most the close timeout and
    /// [`Rules::linger_limit`] bytes. `Err` says why it stopped early.
    async fn linger(&mut self, policy: &mut impl Policy) -> Result<(), String> {
        let mut dropped = 0;
        let mut eof = false;
        let mut shut = false;
        let close_timeout = self.rules.close_timeout;
        let wait = poll_fn(|cx| {
            loop {
                if let Poll::Ready(Err(error)) = self.poll_write_out(cx) {
                    return Poll::Ready(Err(error.to_string()));
                }
                // The peer's Close came (or its EOF): done once ours is written. Until
                // then, even after a header that lost us the frame boundaries, read and
                // drop: closing with unread bytes would reset the connection.
                if self.receiver.close_received() || eof {
                    if self.outbox.is_empty() && !self.unflushed {
                        return Poll::Ready(Ok(()));
                    }
                    // `poll_write_out` was Pending: it wakes us.
                    return Poll::Pending;
                }
                if self.receiver.is_done() && !shut && self.outbox.is_empty() && !self.unflushed {
                    // A header broke a rule and frame boundaries are lost: the peer's
                    // Close can never be found. End our side now (the peer sees our
                    // Close, then EOF) and go on dropping what it sends until its EOF.
                    if let Poll::Ready(result) = Pin::new(&mut self.io).poll_shutdown(cx) {
                        shut = true;
                        if let Err(error) = result {
                            return Poll::Ready(Err(error.to_string()));
                        }
                    }
                }
                if self.receiver.has_backlog() {
                    // Draining drops data unread: the backlog is followed whole.
                    let mut handler = policy.handler(&mut self.sender, &mut self.outbox);
                    self.receiver.resume(&mut handler, usize::MAX);
                    drop(handler);
                    self.take_news(policy);
                    continue;
                }
                if dropped >= self.rules.linger_limit {
                    return Poll::Ready(Err(
                        "closed with unread input past the linger limit".into()
                    ));
                }
                let read = SCRATCH.with_borrow_mut(|scratch| {
                    let want = (self.rules.linger_limit - dropped).min(SCRATCH_SIZE);
                    let mut buf = ReadBuf::new(&mut scratch[..want]);
                    std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
                    let input = buf.filled_mut();
                    dropped += input.len();
                    let mut handler = policy.handler(&mut self.sender, &mut self.outbox);
                    self.receiver.receive(input, &mut handler);
                    Poll::Ready(Ok::<_, std::io::Error>(input.is_empty()))
                });
                match read {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error.to_string())),
                    // The peer closed its side: it may still read what we send.
                    Poll::Ready(Ok(true)) => eof = true,
                    Poll::Ready(Ok(false)) => self.take_news(policy),
                }
            }
        });
        let result = match timeout(close_timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(TIMED_OUT.into()),
        };
        if !shut {
            let _ = timeout(
                self.rules.close_timeout,
                poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)),
            )
            .await;
        }
        result
    }

    /// Keepalive, idle, stall and message deadlines; `Some` when the connection is over.
    async fn on_timer(&mut self, policy: &mut impl Policy) -> Option<Ending> {
        let now = Instant::now();
        if let Some(rate) = self.extras.as_deref_mut().and_then(|e| e.rate.as_mut()) {
            // A new second of the read rate: refilled here, not only by a read, so
            // that its deadline never stays in the past while reading is paused.
            if now >= rate.started + Duration::from_secs(1) {
                rate.started = now;
                rate.left = self.rules.read_rate.unwrap_or(u64::MAX);
            }
        }
        if let (Some(due), Some(limit)) = (self.message_check, self.rules.message_timeout) {
            if now >= due {
                // While others wait, a message gives way if it holds more than an even
                // share of the budget among the waiting and itself; so does one that
                // waits itself while holding (many may each hold part of what they
                // need), unless it holds no more than one chunk.
                let waiting = self.shared_budget.waiting.load(Ordering::Relaxed);
                let share = self.rules.budget / (waiting + 1).max(2);
                let others_wait = waiting > usize::from(self.counted_waiting)
                    && (self.acquired > share
                        || (self.counted_waiting && self.acquired > BUDGET_CHUNK));
                let reading = self.outbox.len() < self.rules.write_limit && !self.counted_waiting;
                let read = std::mem::take(&mut self.read_since_check);
                // Waiting for the budget with little of it is not the client's fault,
                // but not forever: three checks, while the holders above give way.
                let starved = self.counted_waiting && !read;
                self.starved_checks = if starved { self.starved_checks + 1 } else { 0 };
                let reason = if others_wait {
                    Some("message held buffer space others waited for")
                } else if self.starved_checks >= STARVED_CHECKS {
                    Some("message waited too long for buffer space")
                } else if reading && !read {
                    Some("message stalled")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Some(
                        self.close(policy, 1008, reason.into(), Some(Limit::MessageTimeout))
                            .await,
                    );
                }
                self.message_check = Some(now + limit);
            }
        }
        if let (Some(since), Some(limit)) = (self.stalled_since, self.rules.stall_timeout) {
            if now >= since + limit {
                // The client takes nothing, so there is no handshake to wait for: the
                // Close goes out only if the socket has room for it now.
                let reason = "client stopped reading its echoes";
                return Some(self.close_at_once(policy, 1008, reason, Limit::Stall));
            }
        }
        if let Some((payload, sent_at)) = self.awaiting_pong {
            if self.reads_held_back(policy) {
                // Its own delayed echoes or stream keep the server from reading the
                // Pong: the client is not to blame, the wait starts again.
                self.awaiting_pong = Some((payload, now));
            } else if now >= sent_at + self.rules.ping_timeout {
                let reason = "keepalive ping unanswered";
                return Some(self.close_at_once(policy, 1001, reason, Limit::Keepalive));
            }
        }
        if let Some(idle) = self.rules.idle_timeout {
            if now >= self.last_message + idle {
                return Some(
                    self.close(policy, 1000, "idle timeout".into(), Some(Limit::Idle))
                        .await,
                );
            }
        }
        if let Some(ends_at) = self.extras.as_ref().and_then(|extras| extras.ends_at) {
            if now >= ends_at {
                let reason = "connection duration limit reached".into();
                let limit = Some(Limit::ConnectionDuration);
                return Some(self.close(policy, 1000, reason, limit).await);
            }
        }
        if let (Some(due), Some(interval)) = (self.next_ping, self.rules.ping_interval) {
            if now >= due {
                self.next_ping = Some(now + interval);
                // A connection whose echoes wait for room is busy, not idle.
                // Nor is one waiting for the read budget: it could not read the Pong.
                // Nor is one that reads nothing while its held echoes wait.
                if self.outbox.is_empty()
                    && self.awaiting_pong.is_none()
                    && self.budget_wait.is_none()
                    && !self.reads_held_back(policy)
                {
                    self.pings_sent += 1;
                    self.sender
                        .ping(&self.pings_sent.to_be_bytes(), &mut self.outbox);
                    self.metrics.pings_sent.inc();
                    self.awaiting_pong = Some((self.pings_sent, now));
                    let _ = poll_fn(|cx| Poll::Ready(self.poll_write_out(cx))).await;
                }
            }
        }
        None
    }

    /// Queues Close, writes what the socket takes now, and ends.
    fn close_at_once(
        &mut self,
        policy: &mut impl Policy,
        code: u16,
        reason: &'static str,
        limit: Limit,
    ) -> Ending {
        let answered = self.flush_policy(policy);
        self.sender.close(Some(code), reason, &mut self.outbox);
        policy.publish();
        let waker = std::task::Waker::noop();
        let _ = self.poll_write_out(&mut Context::from_waker(waker));
        match answered {
            Some(code) => Ending::ClientClosed(code),
            None => Ending::ServerClosed(code, reason.into(), Some(limit)),
        }
    }

    /// Sends everything the policy held for later, before a Close the server starts.
    /// `Some` with the peer's code when that included the answer to the peer's Close
    /// (it waited behind delayed echoes): the connection then ends as the client's.
    fn flush_policy(&mut self, policy: &mut impl Policy) -> Option<u16> {
        policy.flush(&mut self.sender, &mut self.outbox);
        self.take_news(policy);
        self.news.peer_closed
    }

    /// The earliest instant a timer needs the loop's attention.
    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let pong = self
            .awaiting_pong
            .map(|(_, sent)| sent + self.rules.ping_timeout);
        let idle = self.rules.idle_timeout.map(|idle| self.last_message + idle);
        let stall = self
            .stalled_since
            .zip(self.rules.stall_timeout)
            .map(|(since, limit)| since + limit);
        let peer_check = self.peer_check_armed.then(|| Instant::now() + PEER_CHECK);
        let extras = self.extras.as_deref();
        let longest = extras.and_then(|extras| extras.ends_at);
        let scheduled = self.scheduled_deadline();
        let rate = extras
            .and_then(|extras| extras.rate.as_ref())
            .filter(|rate| rate.left == 0)
            .map(|rate| rate.started + Duration::from_secs(1));
        [
            self.next_ping,
            pong,
            idle,
            stall,
            self.message_check,
            peer_check,
            longest,
            scheduled,
            rate,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(far)
    }
}

/// `linger`'s answer when the close timeout passed first.
const TIMED_OUT: &str = "close handshake timed out";
#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;

    /// Every idle connection carries its driver inside its task for its whole life
    /// (echo_load W4 counts it). Measured: 560 bytes over hyper's upgraded stream, of
    /// which the receiver is 176 (168 before a large message's list of chunks, boxed:
    /// 8 bytes; the inflater is boxed too, 168 bytes inline) and the outbox 80; the
    /// rules are shared, not copied (112 bytes). 472 before the backlog, the message
    /// check and the budget's waiting count; 528 before the test controls (the action
    /// in the news, and the boxed extras: 608 with them inline).
    #[test]
    fn an_idle_connection_carries_a_small_driver() {
        type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;
        assert!(size_of::<Driver<'static, Upgraded>>() <= 560);
        assert!(size_of::<Receiver>() <= 176);
        assert!(size_of::<Outbox>() <= 80);
    }
}
