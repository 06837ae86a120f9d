//! The WebSocket protocol, ours from the frame up: a sans-IO core (`frame`, `close`,
//! `utf8`, `deflate`, `connection`, `outbox`) that turns bytes into events and frames
//! into bytes. Not wired in yet: the engine (yawc) still serves connections.

pub(crate) mod close;
pub(crate) mod connection;
pub(crate) mod deflate;
pub(crate) mod frame;
pub(crate) mod outbox;
#[cfg(test)]
mod proptests;
pub(crate) mod utf8;
