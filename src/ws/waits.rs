//! The two things an echo loop waits for besides its socket: the shutdown token and its
//! timer (keepalive, pong, idle and stall deadlines), polled cheaply.
//!
//! The loop polls both every time it would wait, which on a connection with one message
//! in flight is once per echo. Polling a future that is already registered with the
//! same waker only registers it again: ~160 instructions for the token's `Notify` and
//! ~110 for the `Sleep` per echo (callgrind, echo_load W1, a twentieth of an echo).
//! [`Waits`] polls them only when that could change something: on the first wait, when
//! the task's waker is not the one they hold, when the timer was reset, or when a cheap
//! check (`is_cancelled`, `is_elapsed`, atomic loads) says one is ready.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Which wait ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Woken {
    /// The shutdown token was cancelled.
    Shutdown,
    /// The timer's deadline passed.
    Timer,
}

/// The shutdown token's future and the loop's timer, both pinned by the caller (for
/// `'pinned`).
pub(crate) struct Waits<'token, 'pinned> {
    token: &'token CancellationToken,
    shutdown: Pin<&'pinned mut WaitForCancellationFuture<'token>>,
    timer: Pin<&'pinned mut Sleep>,
    /// The waker both futures were last polled with, since the timer was last reset:
    /// each holds it and wakes it when it becomes ready.
    registered_with: Option<Waker>,
}

impl<'token, 'pinned> Waits<'token, 'pinned> {
    pub(crate) fn new(
        token: &'token CancellationToken,
        shutdown: Pin<&'pinned mut WaitForCancellationFuture<'token>>,
        timer: Pin<&'pinned mut Sleep>,
    ) -> Self {
        Self {
            token,
            shutdown,
            timer,
            registered_with: None,
        }
    }

    /// Moves the timer's deadline.
    pub(crate) fn reset_timer(&mut self, deadline: Instant) {
        self.timer.as_mut().reset(deadline);
        // A reset timer holds no waker until it is polled again.
        self.registered_with = None;
    }

    /// Ready when the token is cancelled (first) or the timer's deadline has passed;
    /// otherwise both will wake `cx`'s task.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Woken> {
        let registered = self
            .registered_with
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if registered && !self.token.is_cancelled() && !self.timer.is_elapsed() {
            return Poll::Pending;
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Woken::Shutdown);
        }
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Woken::Timer);
        }
        if !registered {
            self.registered_with = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Wake,
        time::Duration,
    };

    use tokio::time::sleep_until;

    use super::*;

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl CountingWaker {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Declares `$waits`, a `Waits` on `$token` whose timer is due in `$secs` seconds
    /// (the pinned futures live in the caller's frame, so a function cannot do this).
    macro_rules! waits_on {
        ($token:ident, timer_in_secs = $secs:literal, $waits:ident) => {
            let shutdown = $token.cancelled();
            tokio::pin!(shutdown);
            let timer = sleep_until(Instant::now() + Duration::from_secs($secs));
            tokio::pin!(timer);
            let mut $waits = Waits::new(&$token, shutdown, timer);
        };
    }

    fn counting_waker() -> (Arc<CountingWaker>, Waker) {
        let counter = Arc::new(CountingWaker::default());
        (Arc::clone(&counter), Waker::from(counter))
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_ends_the_wait_at_its_deadline_even_when_not_repolled() {
        let token = CancellationToken::new();
        waits_on!(token, timer_in_secs = 5, waits);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(waits.poll(&mut cx), Poll::Pending);
        // Polls with the same waker skip the futures and stay pending.
        assert_eq!(waits.poll(&mut cx), Poll::Pending);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(wakes.count() >= 1, "the timer woke the task");
        assert_eq!(waits.poll(&mut cx), Poll::Ready(Woken::Timer));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_reset_after_it_fired_wakes_the_task_again() {
        let token = CancellationToken::new();
        waits_on!(token, timer_in_secs = 1, waits);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(waits.poll(&mut cx), Poll::Pending);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(waits.poll(&mut cx), Poll::Ready(Woken::Timer));
        // Firing took the timer's waker: the reset one must be polled to get it back.
        waits.reset_timer(Instant::now() + Duration::from_secs(5));
        assert_eq!(waits.poll(&mut cx), Poll::Pending);
        let woken_before = wakes.count();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            wakes.count() > woken_before,
            "the new deadline woke the task"
        );
        assert_eq!(waits.poll(&mut cx), Poll::Ready(Woken::Timer));
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_wakes_the_task_and_ends_the_wait() {
        let token = CancellationToken::new();
        waits_on!(token, timer_in_secs = 5, waits);
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(waits.poll(&mut cx), Poll::Pending);
        assert_eq!(waits.poll(&mut cx), Poll::Pending);
        token.cancel();
        assert_eq!(wakes.count(), 1, "cancelling woke the task");
        assert_eq!(waits.poll(&mut cx), Poll::Ready(Woken::Shutdown));
    }

    #[tokio::test(start_paused = true)]
    async fn another_waker_is_registered_and_the_new_one_is_woken() {
        let token = CancellationToken::new();
        waits_on!(token, timer_in_secs = 5, waits);
        let (first_wakes, first) = counting_waker();
        let (second_wakes, second) = counting_waker();
        assert_eq!(waits.poll(&mut Context::from_waker(&first)), Poll::Pending);
        assert_eq!(waits.poll(&mut Context::from_waker(&second)), Poll::Pending);
        token.cancel();
        assert_eq!(first_wakes.count(), 0);
        assert_eq!(second_wakes.count(), 1);
        // And the first is seen as a different waker again after that.
        assert_eq!(
            waits.poll(&mut Context::from_waker(&first)),
            Poll::Ready(Woken::Shutdown)
        );
    }
}
