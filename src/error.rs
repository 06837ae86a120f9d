//! The errors a caller of this library can act on: bad settings, bad TLS material, and
//! I/O on the listener.
//!
//! A connection's own errors never appear here: they end at that connection, which logs
//! them and closes with the matching WebSocket close code.

use std::io;

/// Why the server could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener failed: binding, reading its address, or accepting.
    #[error("listener I/O failed: {0}")]
    Io(#[from] io::Error),
    /// A setting is out of range or inconsistent with another.
    #[error("invalid setting: {0}")]
    InvalidSettings(String),
    /// The TLS certificate or key could not be read, parsed, generated or written, or
    /// the key does not belong to the certificate.
    #[error("TLS: {0}")]
    TlsMaterial(String),
}
