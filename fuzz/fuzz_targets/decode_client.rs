//! Fuzz target: any bytes as a client frame. Decoding never panics; an accepted message
//! re-encodes to JSON that decodes to the same message; a rejected one yields a failure reply
//! that a client can decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool_protocol::tracker::{Decoder, ServerMessage};

fuzz_target!(|data: &[u8]| {
    let mut frame = data.to_vec();
    let mut decoder = Decoder::default();
    let mut check = Decoder::default();
    decoder.decode_client(&mut frame, |msg| {
        let mut out = Vec::new();
        match msg {
            Ok(msg) => {
                msg.encode(&mut out);
                check.decode_client(&mut out, |again| {
                    let again = again.expect("re-encoded message must decode");
                    assert_eq!(again, msg, "re-encoded message must decode unchanged");
                });
            }
            Err(err) => {
                err.to_response().encode(&mut out);
                check.decode_server(&mut out, |reply| {
                    assert!(matches!(reply, Ok(ServerMessage::Error(_))), "{reply:?}");
                });
            }
        }
    });
});
