#![no_main]
use libfuzzer_sys::fuzz_target;

// decode_slice / encode of every MQTT 3.1.1 and 5.0 packet, with a round-trip oracle.
fuzz_target!(|data: &[u8]| fuzz_support::mqtt_codec(data));
