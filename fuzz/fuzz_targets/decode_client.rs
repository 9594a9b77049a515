//! Fuzz target: any bytes as a client frame. Decoding never panics; an accepted message
//! re-encodes to JSON that decodes to the same message; a rejected one yields a failure reply
//! that a client can decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool_protocol::tracker::{Decoder, ServerMessage};

fuzz_target!(|data: &[u8]| {
    // Verbatim decoding (what the tracker uses) must agree with plain decoding.
    if let Ok(text) = std::str::from_utf8(data) {
        let plain = Decoder::default().decode_client(&mut data.to_vec(), |m| format!("{m:?}"));
        let verbatim = Decoder::default().decode_client_verbatim(text, |m| {
            if let Ok(m) = &m {
                // A verbatim copy must itself decode as the same message.
                let mut out = Vec::new();
                m.encode(&mut out);
                Decoder::default().decode_client(&mut out, |again| {
                    assert_eq!(again.as_ref().ok(), Some(m), "verbatim re-encoding decodes unchanged");
                });
            }
            m.is_ok()
        });
        assert_eq!(verbatim, plain.starts_with("Ok("), "verbatim and plain decoding agree");
    }
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
