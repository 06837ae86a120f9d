//! Integration tests: the server on a real socket (port 0), real clients.
//!
//! One test binary with topic modules, so it links once.

mod abuse;
mod browser_tls;
mod budget;
#[path = "../common/chromium.rs"]
mod chromium;
mod conformance;
mod controls;
mod echo;
mod environment;
mod exchange;
mod half_close;
mod handshake;
mod hello;
mod http2;
mod limits;
mod logs;
mod metrics;
mod properties;
mod shutdown;
mod support;
mod tls;
