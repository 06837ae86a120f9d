//! ws_echo: a WebSocket echo server for testing clients, libraries, proxies and load
//! balancers.
//!
//! `GET /` serves a small page that talks to the echo, and `GET /ws` upgrades to a
//! WebSocket (RFC 6455, with permessage-deflate from RFC 7692) and sends back every text
//! and binary message it receives, unchanged and in order. HTTP/1.1 and HTTP/2 (RFC 8441
//! extended CONNECT) both carry it, in plain text or over TLS. Test controls in the
//! URL (`/ws?delay=1s&fragment=3`) make it misbehave on request.
//!
//! # Layout
//!
//! - `config`: the command line and environment ([`Config`]), validated into [`Settings`].
//! - `http`: everything before a WebSocket exists. `server` ([`run`], [`Server`])
//!   accepts connections, applies the caps and drains them on shutdown; `tls`
//!   ([`TlsSettings`]); `app`, the router, and `state`, what handlers share; `page`
//!   (`GET /`); `origin` ([`OriginPattern`]); `limits`, caps on open WebSockets;
//!   `hello`, the opt-in greeting; `upgrade` (`GET /ws`, and a handshake to `/`),
//!   which checks the test controls and hands a connection to `ws` in a task of its own.
//! - `ws`: the WebSocket protocol, ours from the frame up. `handshake` checks an upgrade
//!   and negotiates subprotocol and compression (`deflate`); `frame` is the one frame
//!   codec; `connection` the sans-IO state machine (fragments, UTF-8, control frames,
//!   close, limits; violations in `close`); `echo` the policy that answers it (under
//!   test controls, parsed in `controls` and carried out in `controlled`); `driver`
//!   the one I/O loop per connection that owns every read and write.
//! - `metrics`: Prometheus series, defined once, served at `/metrics`.
//! - `shutdown`: OS signals and the drain of open connections.
//! - `error`: the errors a caller of this library can act on.
//!
//! # The path of a message
//!
//! 1. `ws::driver::Driver::poll_read_and_answer` reads what the socket has into a buffer
//!    the thread shares, charged to the read budget.
//! 2. `ws::connection::Receiver::receive` parses headers (`ws::frame::parse`), unmasks,
//!    joins fragments, inflates and validates text, and calls the handler once per
//!    message, control frame or violation.
//! 3. `ws::echo` (the `Handler`) hands each message back to `ws::connection::Sender`,
//!    which encodes (and compresses) it into the connection's `ws::outbox::Outbox`.
//! 4. `ws::driver::Driver::poll_write_out` writes the outbox with one `writev` when
//!    nothing more is there to read.
//!
//! # Example
//!
//! Serve on an ephemeral port until Ctrl-C or SIGTERM:
//!
//! ```no_run
//! # async fn example() -> Result<(), ws_echo::Error> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! println!("listening on {}", listener.local_addr()?);
//! ws_echo::run(listener, ws_echo::Settings::default(), ws_echo::shutdown_signal()).await?;
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod http;
mod metrics;
mod shutdown;
mod ws;

pub use config::{CompressionSettings, Config, LogFormat, Settings, SubprotocolPolicy};
pub use error::Error;
pub use http::{
    origin::OriginPattern,
    server::{Server, run},
    tcp::raise_open_file_limit,
    tls::TlsSettings,
};
pub use shutdown::shutdown_signal;
/// The sans-IO core for the fuzzer (`fuzz/fuzz_targets/receiver.rs`); not an API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub use ws::fuzzing::receive_twice as fuzz_receiver;

/// The address the server listens on when none is configured: the tutorial's.
pub const DEFAULT_ADDR: &str = "127.0.0.1:3001";
