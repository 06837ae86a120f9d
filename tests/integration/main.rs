//! Integration tests: the server on a real socket (port 0), real clients.
//!
//! One test binary with topic modules, so it links once.

mod abuse;
mod conformance;
mod echo;
mod exchange;
mod handshake;
mod limits;
mod properties;
mod shutdown;
mod support;
