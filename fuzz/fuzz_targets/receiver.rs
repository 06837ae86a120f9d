//! Fuzz target `receiver`: the fuzzer's bytes go straight into the sans-IO protocol core
//! (`src/ws/connection.rs`), with no socket, runtime or handshake, once whole and once
//! cut into pieces; `src/ws/fuzzing.rs` documents the setup byte and the invariants.
//! Tens of thousands of cases a second, against the `connection` target's hundreds.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ws_echo::fuzz_receiver(data));
