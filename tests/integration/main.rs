//! Integration tests: the server on a real socket (port 0), real clients.
//!
//! One test binary with topic modules, so it links once.

mod browser_tls;
mod conformance;
mod echo;
mod handshake;
mod http2;
mod limits;
mod shutdown;
mod support;
mod tls;
