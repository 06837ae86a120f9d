//! ws_echo: a WebSocket echo server for testing clients, libraries, proxies and load
//! balancers.
//!
//! `GET /` serves a small page that talks to the echo, and `GET /ws` upgrades to a
//! WebSocket (RFC 6455, with permessage-deflate from RFC 7692) and sends back every text
//! and binary message it receives, unchanged and in order. HTTP/1.1 and HTTP/2 (RFC 8441
//! extended CONNECT) both carry it, in plain text or over TLS.
//!
//! # Layout
//!
//! - `config`: the command line and environment ([`Config`]), validated into [`Settings`].
//! - `server`: [`run`] accepts connections on a bound listener and drains them on shutdown.
//! - `tls`: the rustls configuration ([`TlsSettings`]) and the per-connection TLS
//!   handshake.
//! - `app`: the router and the state every handler shares.
//! - `assembly`: reassembles fragmented messages and validates text as it arrives.
//! - `handshake`: checks an upgrade request and negotiates subprotocol and compression.
//! - `deflate`: parses permessage-deflate offers and picks the one to accept.
//! - `echo`: `GET /ws`, the per-connection echo loop; the only module that knows the
//!   WebSocket engine.
//! - `frame_guard`: a read-side guard for what the engine does not check itself.
//! - `fast_echo`: echoes whole small messages where they are read, and keeps every
//!   echo of an uncompressed connection in order in one output queue.
//! - `waits`: the echo loop's shutdown and timer waits, polled only when they can end.
//! - `hello`: the opt-in JSON greeting (`/ws?hello=1`).
//! - `limits`: caps on open WebSockets, in all and per client address.
//! - `metrics`: Prometheus series, defined once, served at `/metrics`.
//! - `origin`: which web origins may connect.
//! - `page`: `GET /`, the embedded HTML page.
//! - `shutdown`: OS signals and the drain of open connections.
//! - `error`: the errors a caller of this library can act on.
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

mod app;
mod assembly;
mod config;
mod deflate;
mod echo;
mod error;
mod fast_echo;
mod frame_guard;
mod handshake;
mod hello;
mod limits;
mod metrics;
mod origin;
mod page;
mod server;
mod shutdown;
mod tls;
mod waits;
// The new protocol core, tested on its own until the switch from the engine.
#[allow(dead_code)]
mod ws;

pub use config::{CompressionSettings, Config, LogFormat, Settings, SubprotocolPolicy};
pub use error::Error;
pub use origin::OriginPattern;
pub use server::{Server, run};
pub use shutdown::shutdown_signal;
pub use tls::TlsSettings;

/// The address the server listens on when none is configured: the tutorial's.
pub const DEFAULT_ADDR: &str = "127.0.0.1:3001";
