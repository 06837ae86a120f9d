//! Graceful shutdown: turns OS signals into one cancellation that every connection
//! observes, then waits, up to a deadline, for connections to finish.
//!
//! axum 0.8's `with_graceful_shutdown` does not wait for tasks spawned from an upgrade
//! (tokio-rs/axum#3003), and we serve connections ourselves anyway. So `server::run`
//! holds a [`CancellationToken`] and a [`TaskTracker`]: every HTTP connection and every
//! echo loop runs in the tracker and watches the token. On shutdown the accept loop stops,
//! the token is cancelled (HTTP connections finish their request, echo loops echo what
//! they have, send Close 1001 and wait for the answer), and [`drain`] waits for the
//! tracker to empty or the deadline to pass, whichever is first.

use std::{future::Future, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM: the signals a terminal, systemd,
/// Docker and Kubernetes send to stop a process.
///
/// The handlers are installed when this function is called, not when the future is
/// first polled, so a signal that arrives while the server is still starting is not
/// lost to the default action (which would kill the process).
///
/// # Panics
///
/// When called outside a tokio runtime with signal support (`enable_all`/`enable_io`),
/// where no handler can be installed.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt =
            signal(SignalKind::interrupt()).expect("invariant: tokio's signal driver is enabled");
        let mut terminate =
            signal(SignalKind::terminate()).expect("invariant: tokio's signal driver is enabled");
        async move {
            tokio::select! {
                _ = interrupt.recv() => info!("Ctrl-C received, shutting down"),
                _ = terminate.recv() => info!("SIGTERM received, shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            info!("Ctrl-C received, shutting down");
        }
    }
}

/// Cancels `token` and waits up to `deadline` for every task in `tracker` to finish.
/// Returns how many were still running at the deadline (they are dropped with the
/// runtime).
pub(crate) async fn drain(
    token: &CancellationToken,
    tracker: &TaskTracker,
    deadline: Duration,
) -> usize {
    token.cancel();
    tracker.close();
    info!(
        connections = tracker.len(),
        deadline_ms = deadline.as_millis() as u64,
        "draining"
    );
    match tokio::time::timeout(deadline, tracker.wait()).await {
        Ok(()) => 0,
        Err(_) => {
            let remaining = tracker.len();
            warn!(
                remaining,
                "shutdown deadline passed with connections still open"
            );
            remaining
        }
    }
}
