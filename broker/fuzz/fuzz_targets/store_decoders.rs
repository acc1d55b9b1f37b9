#![no_main]

use libfuzzer_sys::fuzz_target;

// Cmd::decode, raft::decode_entry, Shard::decode with re-encoding oracles.
fuzz_target!(|data: &[u8]| fuzz_support::store_decoders(data));
