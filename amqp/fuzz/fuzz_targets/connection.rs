#![no_main]

use libfuzzer_sys::fuzz_target;

// Connection::server / Connection::client fed the input in chunks (see
// `fuzz_support::connection` for the input layout).
fuzz_target!(|data: &[u8]| fuzz_support::connection(data));
