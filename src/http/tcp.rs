//! TCP connections of any kind (HTTP/1.1, HTTP/2, TLS, and the WebSockets upgraded from
//! them): the cap that keeps them below the process's open-file limit, the answer past
//! it, and what each connection has in progress, for the HTTP idle timeout.
//!
//! Without a cap, a flood of idle connections (HTTP/2 ones hold no WebSocket place)
//! runs the process out of file descriptors, and then `accept` fails and every new
//! client, health checks included, gets no answer at all. With it, the accept loop
//! always has descriptors left: a connection past the cap is answered 503 with
//! `Retry-After` on the plain port, or closed at once on the TLS port.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
};

use crate::metrics::{Limit, Metrics};

/// File descriptors kept out of the cap: listeners, the runtime's own, log files,
/// certificate files read at start, and the refusals below.
pub(crate) const RESERVED_FDS: u64 = 128;

/// Refusals answered at once, each holding its socket for at most [`REFUSAL_TIME`];
/// past that, more are closed without an answer. Within [`RESERVED_FDS`].
const REFUSALS_AT_ONCE: usize = 64;

/// How long a refused connection is kept to deliver the 503 (reading and dropping the
/// request, so that closing does not reset the connection before the client reads it).
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// How long a refused connection may stay silent before it is closed.
const REFUSAL_QUIET: Duration = Duration::from_millis(100);

/// The answer past the cap.
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Retry-After: 1\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Length: 42\r\n\
Connection: close\r\n\
\r\n\
too many open connections; retry shortly\r\n";

/// Raises the soft open-file limit to the hard one, as servers do at start: the
/// default soft limit (often 1,024) is far below what a WebSocket server holds.
/// Returns the limit now in effect.
///
/// # Errors
///
/// The operating system's, if the limit cannot be read or set.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// The cap when none is configured: the open-file limit less [`RESERVED_FDS`].
pub(crate) fn default_cap() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    usize::try_from(soft.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX)
}

/// The cap on TCP connections, shared by the accept loop.
#[derive(Debug)]
pub(crate) struct TcpCap {
    slots: Arc<Semaphore>,
    max: usize,
    refusals: Arc<Semaphore>,
}

impl TcpCap {
    /// A cap of `max` connections.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
            refusals: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
        }
    }

    /// The configured maximum.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// A place for a new connection, or `None` at the cap.
    pub(crate) fn admit(&self, metrics: &Arc<Metrics>) -> Option<Arc<Slot>> {
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        Some(Slot::new(Some(permit), Arc::clone(metrics)))
    }

    /// Answers a connection past the cap: 503 on the plain port (`tls` false), closed
    /// at once on the TLS port, where a plain answer would mean nothing.
    pub(crate) fn refuse(&self, mut stream: TcpStream, tls: bool, metrics: &Metrics) {
        metrics.limit_drop(Limit::TcpConnections);
        if tls {
            return;
        }
        let mut sink = [0; 1024];
        let Ok(refusal) = Arc::clone(&self.refusals).try_acquire_owned() else {
            // Too many refusals in flight: drop what the request sent so far (closing
            // with unread bytes resets the connection), answer in one try, and close.
            while stream.try_read(&mut sink).is_ok_and(|read| read > 0) {}
            let _ = stream.try_write(FULL);
            return;
        };
        tokio::spawn(async move {
            let _refusal = refusal;
            let _ = tokio::time::timeout(REFUSAL_TIME, async {
                stream.write_all(FULL).await?;
                stream.shutdown().await?;
                // Read and drop the request until the client closes or goes quiet:
                // closing with unread bytes would reset the connection and lose the
                // answer.
                while let Ok(read) =
                    tokio::time::timeout(REFUSAL_QUIET, stream.read(&mut sink)).await
                {
                    if read? == 0 {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
        });
    }
}

/// One connection's place under the cap, held by its HTTP task and by every WebSocket
/// upgraded from it (an HTTP/1.1 upgrade outlives the HTTP task), and what it has in
/// progress: requests being answered and open WebSockets.
#[derive(Debug)]
pub(crate) struct Slot {
    /// `None` for connections that are not TCP (in-memory streams of tests).
    permit: Option<OwnedSemaphorePermit>,
    metrics: Arc<Metrics>,
    active: AtomicUsize,
    changed: Notify,
}

impl Slot {
    /// A connection's slot; counted in `ws_echo_tcp_connections_open` when it holds a
    /// place under the cap.
    pub(crate) fn new(permit: Option<OwnedSemaphorePermit>, metrics: Arc<Metrics>) -> Arc<Self> {
        if permit.is_some() {
            metrics.tcp_open.inc();
        }
        Arc::new(Self {
            permit,
            metrics,
            active: AtomicUsize::new(0),
            changed: Notify::new(),
        })
    }

    /// Marks a request or a WebSocket as in progress until the guard drops.
    pub(crate) fn active(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(Arc::clone(self))
    }

    /// Completes once nothing has been in progress for `timeout`.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            // Registered before the count is read, so that no change is missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.active.load(Ordering::Acquire) == 0 {
                if tokio::time::timeout(timeout, changed).await.is_err() {
                    return;
                }
            } else {
                changed.await;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.permit.is_some() {
            self.metrics.tcp_open.dec();
        }
    }
}

/// Something in progress on a connection (see [`Slot::active`]).
#[derive(Debug)]
pub(crate) struct Active(Arc<Slot>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_after_the_timeout_with_nothing_in_progress() {
        let slot = Slot::new(None, Arc::new(Metrics::new()));
        let request = slot.active();
        let idle = slot.idle_for(Duration::from_secs(10));
        tokio::pin!(idle);
        // A request in progress for a minute: not idle.
        assert!(
            tokio::time::timeout(Duration::from_secs(60), idle.as_mut())
                .await
                .is_err()
        );
        drop(request);
        // The clock starts when it ends.
        let started = tokio::time::Instant::now();
        idle.await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[test]
    fn the_cap_refuses_past_its_maximum_and_frees_a_place_when_a_slot_drops() {
        let metrics = Arc::new(Metrics::new());
        let cap = TcpCap::new(2);
        let first = cap.admit(&metrics).expect("a place");
        let _second = cap.admit(&metrics).expect("a place");
        assert!(cap.admit(&metrics).is_none());
        assert_eq!(metrics.tcp_open.get(), 2);
        drop(first);
        assert_eq!(metrics.tcp_open.get(), 1);
        assert!(cap.admit(&metrics).is_some());
    }
}
