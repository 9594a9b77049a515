//! Fuzz target: any bytes as a tracker frame (what a node or load tester reads). Decoding
//! never panics, and an accepted message re-encodes to JSON that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool_protocol::tracker::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut frame = data.to_vec();
    let mut decoder = Decoder::default();
    let mut check = Decoder::default();
    decoder.decode_server(&mut frame, |msg| {
        if let Ok(msg) = msg {
            let mut out = Vec::new();
            msg.encode(&mut out);
            check.decode_server(&mut out, |again| {
                let again = again.expect("re-encoded message must decode");
                assert_eq!(again, msg, "re-encoded message must decode unchanged");
            });
        }
    });
});
