#![no_main]
use libfuzzer_sys::fuzz_target;

// bridge::from_amqp (what a subscriber's delivery becomes) on arbitrary bytes, against the
// generic AMQP message parser.
fuzz_target!(|data: &[u8]| fuzz_support::amqp_to_mqtt(data));
