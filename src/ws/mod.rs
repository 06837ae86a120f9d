//! The WebSocket protocol, ours from the frame up: a sans-IO core (`frame`, `close`,
//! `utf8`, `deflate`, `chunked`, `connection`, `outbox`) that turns bytes into events
//! and frames into bytes, the echo policy that answers events (`echo`; under the test controls of
//! the URL, `controls` and `controlled`), and the one I/O driver per connection that
//! owns every read and write (`driver`).

pub(crate) mod chunked;
pub(crate) mod close;
pub(crate) mod connection;
pub(crate) mod controlled;
pub(crate) mod controls;
pub(crate) mod deflate;
pub(crate) mod driver;
pub(crate) mod echo;
pub(crate) mod frame;
// `pub` for the fuzz crate, which reaches it through `ws_echo::fuzz_receiver`.
#[cfg(any(fuzzing, test))]
#[allow(unreachable_pub)]
pub mod fuzzing;
pub(crate) mod handshake;
pub(crate) mod outbox;
#[cfg(test)]
mod proptests;
pub(crate) mod utf8;
pub(crate) mod waits;
