#![no_main]

use libfuzzer_sys::fuzz_target;

// decode_performative, decode_sasl, Decoder::value/skip, message::find_to/parse on the input,
// with re-encoding oracles (see `fuzz_support::frame_decoder`).
fuzz_target!(|data: &[u8]| fuzz_support::frame_decoder(data));
