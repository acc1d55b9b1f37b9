#![no_main]

use libfuzzer_sys::fuzz_target;

// ToBroker::decode and ToRouter::decode with re-encoding oracles.
fuzz_target!(|data: &[u8]| fuzz_support::broker_protocol(data));
