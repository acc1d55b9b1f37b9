#![no_main]
use libfuzzer_sys::fuzz_target;

// The WebSocket handshake and frame parser: no panic, bounded buffers.
fuzz_target!(|data: &[u8]| fuzz_support::ws(data));
