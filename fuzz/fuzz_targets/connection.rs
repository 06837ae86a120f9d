//! Fuzz target `connection`: the fuzzer's bytes go through `Server::spawn_connection`
//! over an in-memory stream on a paused-time runtime, the same path and the same checks
//! as the property tests (`tests/integration/exchange.rs`, included by path). Any broken
//! property panics, and so does the server if it panics in a task: libFuzzer reports
//! both as crashes, with the input.
//!
//! The first input byte picks the setting, the rest is what the client sends:
//!
//! - bits 0–1: what comes first: nothing, a valid handshake, a valid handshake offering
//!   permessage-deflate, or the HTTP/2 preface. The prefixes let the fuzzer spend its
//!   time on frames rather than on rediscovering a handshake.
//! - bit 2: hold the connection open after the last byte instead of closing the write
//!   half.
//! - bit 3: small limits (1 KiB messages, 512-byte frames).
//! - bit 4: compression off on the server.
//! - bits 5–7: `k`; unless 7, the bytes are written in pieces of `4 << k` bytes, each
//!   read on its own by the server.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/integration/exchange.rs"]
mod exchange;

/// A valid upgrade request; the fuzzer appends frames.
const HANDSHAKE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: fuzz\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

fn script(flags: u8, body: &[u8]) -> exchange::Script {
    let mut input = Vec::new();
    match flags & 0b11 {
        0 => {}
        1 => input.extend_from_slice(&[HANDSHAKE, b"\r\n"].concat()),
        2 => input.extend_from_slice(
            &[
                HANDSHAKE,
                b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
            ]
            .concat(),
        ),
        _ => input.extend_from_slice(exchange::H2_PREFACE),
    }
    input.extend_from_slice(body);
    let mut settings = ws_echo::Settings {
        instance_name: "fuzz".into(),
        ..ws_echo::Settings::default()
    };
    if flags & 0b1000 != 0 {
        settings.max_message_size = 1024;
        settings.max_frame_size = 512;
    }
    settings.compression.enabled = flags & 0b1_0000 == 0;
    let k = flags >> 5;
    let chunks = if k == 7 || input.is_empty() {
        vec![input]
    } else {
        input.chunks(4 << k).map(<[u8]>::to_vec).collect()
    };
    exchange::Script {
        settings,
        chunks,
        close_write: flags & 0b100 == 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let script = script(flags, body);
    let transcript = exchange::run(&script);
    if let Err(failure) = exchange::check(&script, &transcript) {
        panic!("{failure}");
    }
});
