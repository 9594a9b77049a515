//! Property tests: every message type survives encode → decode unchanged, over arbitrary
//! identifier bytes (all 256 values), offer ids, SDP strings (any Unicode, control characters
//! included) and numbers.

use proptest::prelude::*;
use tidepool_protocol::tracker::{
    AnnounceEvent, AnnounceRequest, AnnounceResponse, Answer, AnswerMessage, ClientMessage,
    Decoder, ErrorResponse, Offer, OfferMessage, OpaqueJson, ScrapeHashes, ScrapeRequest,
    ScrapeResponse, ScrapeStats, ServerMessage,
};
use tidepool_protocol::{InfoHash, Number, OfferId, PeerId};

fn bytes20() -> impl Strategy<Value = [u8; 20]> {
    any::<[u8; 20]>()
}

fn offer_id() -> impl Strategy<Value = OfferId> {
    prop_oneof![
        bytes20().prop_map(|b| OfferId::from_bytes20(&b)),
        // Non-standard ids: any string that fits.
        "\\PC{0,20}".prop_filter_map("fits", |s| OfferId::new(&s)),
    ]
}

fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<u64>().prop_map(Number::UInt),
        (i64::MIN..0).prop_map(Number::Int),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Number::Float),
    ]
}

fn event() -> impl Strategy<Value = AnnounceEvent> {
    prop_oneof![
        Just(AnnounceEvent::Started),
        Just(AnnounceEvent::Stopped),
        Just(AnnounceEvent::Completed),
        Just(AnnounceEvent::Update),
        Just(AnnounceEvent::Paused),
        Just(AnnounceEvent::None),
    ]
}

/// SDP-like text: any characters, including quotes, backslashes and control characters.
fn sdp() -> impl Strategy<Value = String> {
    prop_oneof![
        "(?s).{0,300}",
        "v=0\r\no=- [0-9]{1,19} 2 IN IP4 127\\.0\\.0\\.1\r\n.{0,50}"
    ]
}

#[derive(Debug, Clone)]
struct OwnedOffer {
    id: OfferId,
    sdp: String,
}

fn check_client(msg: &ClientMessage<'_>) -> Result<(), TestCaseError> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    serde_json::from_slice::<serde_json::Value>(&out)
        .map_err(|e| TestCaseError::fail(format!("encoder wrote invalid JSON: {e}")))?;
    let mut decoder = Decoder::default();
    decoder.decode_client(&mut out, |decoded| {
        let decoded = decoded.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&decoded, msg);
        Ok(())
    })
}

fn check_server(msg: &ServerMessage<'_>) -> Result<(), TestCaseError> {
    let mut out = Vec::new();
    msg.encode(&mut out);
    serde_json::from_slice::<serde_json::Value>(&out)
        .map_err(|e| TestCaseError::fail(format!("encoder wrote invalid JSON: {e}")))?;
    let mut decoder = Decoder::default();
    decoder.decode_server(&mut out, |decoded| {
        let decoded = decoded.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&decoded, msg);
        Ok(())
    })
}

proptest! {
    #[test]
    fn announce_round_trips(
        info_hash in bytes20(),
        peer_id in bytes20(),
        event in event(),
        numwant in proptest::option::of(any::<u32>()),
        uploaded in proptest::option::of(number()),
        downloaded in proptest::option::of(number()),
        left in proptest::option::of(number()),
        offers in proptest::collection::vec(
            (offer_id(), sdp()).prop_map(|(id, sdp)| OwnedOffer { id, sdp }), 0..6),
        answer in proptest::option::of((bytes20(), offer_id(), sdp())),
    ) {
        let msg = ClientMessage::Announce(AnnounceRequest {
            info_hash: InfoHash(info_hash),
            peer_id: PeerId(peer_id),
            event,
            numwant,
            uploaded,
            downloaded,
            left,
            offers: offers
                .iter()
                .map(|o| Offer { offer_id: o.id, offer: OpaqueJson::Sdp { kind: "offer", sdp: &o.sdp } })
                .collect(),
            answer: answer.as_ref().map(|(to, id, sdp)| Answer {
                to_peer_id: PeerId(*to),
                offer_id: *id,
                answer: OpaqueJson::Sdp { kind: "answer", sdp },
            }),
        });
        check_client(&msg)?;
    }

    #[test]
    fn scrape_round_trips(hashes in proptest::collection::vec(bytes20(), 0..8), shape in 0u8..3) {
        let info_hashes = match shape {
            0 => ScrapeHashes::All,
            1 => ScrapeHashes::One(InfoHash(hashes.first().copied().unwrap_or([7; 20]))),
            _ => ScrapeHashes::Many(hashes.into_iter().map(InfoHash).collect()),
        };
        check_client(&ClientMessage::Scrape(ScrapeRequest { info_hashes }))?;
    }

    #[test]
    fn announce_response_round_trips(
        info_hash in bytes20(), complete in any::<u64>(), incomplete in any::<u64>(), interval in any::<u64>(),
    ) {
        check_server(&ServerMessage::Announce(AnnounceResponse {
            info_hash: InfoHash(info_hash), complete, incomplete, interval,
        }))?;
    }

    #[test]
    fn forwarded_offer_and_answer_round_trip(
        info_hash in bytes20(), peer_id in bytes20(), id in offer_id(), sdp in sdp(),
    ) {
        check_server(&ServerMessage::Offer(OfferMessage {
            info_hash: InfoHash(info_hash),
            peer_id: PeerId(peer_id),
            offer_id: id,
            offer: OpaqueJson::Sdp { kind: "offer", sdp: &sdp },
        }))?;
        check_server(&ServerMessage::Answer(AnswerMessage {
            info_hash: InfoHash(info_hash),
            peer_id: PeerId(peer_id),
            offer_id: id,
            answer: OpaqueJson::Sdp { kind: "answer", sdp: &sdp },
        }))?;
    }

    #[test]
    fn scrape_response_round_trips(
        files in proptest::collection::vec((bytes20(), any::<(u64, u64, u64)>()), 0..8),
        min_request_interval in proptest::option::of(any::<u64>()),
    ) {
        let files = files
            .into_iter()
            .map(|(h, (complete, incomplete, downloaded))| {
                (InfoHash(h), ScrapeStats { complete, incomplete, downloaded })
            })
            .collect();
        check_server(&ServerMessage::Scrape(ScrapeResponse { files, min_request_interval }))?;
    }

    #[test]
    fn error_response_round_trips(
        reason in "(?s).{0,100}",
        action in proptest::option::of(prop_oneof![
            Just(tidepool_protocol::tracker::Action::Announce),
            Just(tidepool_protocol::tracker::Action::Scrape),
        ]),
        info_hash in proptest::option::of(bytes20()),
    ) {
        check_server(&ServerMessage::Error(ErrorResponse {
            failure_reason: reason.into(),
            action,
            info_hash: info_hash.map(InfoHash),
        }))?;
    }

    /// Opaque objects of any shape survive as JSON values (not only `{type, sdp}`).
    #[test]
    fn opaque_objects_of_any_shape_are_forwarded_verbatim(
        value in arbitrary_object(),
        info_hash in bytes20(),
        peer_id in bytes20(),
    ) {
        let text = serde_json::to_string(&value).expect("serializable");
        let mut frame = format!(
            r#"{{"action":"announce","info_hash":{},"peer_id":{},"offers":[{{"offer_id":"x","offer":{text}}}]}}"#,
            serde_json::to_string(&latin1(&info_hash)).expect("string"),
            serde_json::to_string(&latin1(&peer_id)).expect("string"),
        )
        .into_bytes();
        Decoder::default().decode_client(&mut frame, |msg| {
            let Ok(ClientMessage::Announce(a)) = msg else {
                return Err(TestCaseError::fail(format!("{msg:?}")));
            };
            let forwarded: serde_json::Value =
                serde_json::from_str(&a.offers[0].offer.to_json_string()).expect("valid JSON");
            prop_assert_eq!(forwarded, value.clone());
            Ok(())
        })?;
    }
}

fn latin1(bytes: &[u8; 20]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

fn arbitrary_object() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "(?s).{0,20}".prop_map(Value::String),
    ];
    let tree = leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    proptest::collection::btree_map("[a-z]{1,6}", tree, 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// A frame whose offers are written with `write` (compact or pretty), and the offers' texts.
fn frame_with_offers(values: &[serde_json::Value], pretty: bool) -> (String, Vec<String>) {
    let texts: Vec<String> = values
        .iter()
        .map(|v| {
            if pretty {
                serde_json::to_string_pretty(v)
            } else {
                serde_json::to_string(v)
            }
            .expect("serializable")
        })
        .collect();
    let offers: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{{ \"offer_id\" : \"o{i}\" ,\n \"offer\" :{t} }}"))
        .collect();
    let frame = format!(
        "{{\"action\":\"announce\", \"info_hash\":\"{}\",\"peer_id\":\"{}\", \"offers\": [ {} ] , \"x\":[1,{{}},[]]}}",
        "a".repeat(20),
        "b".repeat(20),
        offers.join(" , ")
    );
    (frame, texts)
}

proptest! {
    /// Verbatim decoding finds each offer's exact bytes in the frame, whatever the layout,
    /// and otherwise decodes exactly what plain decoding does.
    #[test]
    fn verbatim_offers_are_the_exact_bytes_of_the_frame(
        values in proptest::collection::vec(arbitrary_object(), 1..5),
        pretty in any::<bool>(),
    ) {
        let (frame, texts) = frame_with_offers(&values, pretty);
        let mut decoder = Decoder::default();
        let plain = {
            let mut bytes = frame.clone().into_bytes();
            let mut d = Decoder::default();
            d.decode_client(&mut bytes, |m| m.map(|m| { let mut o = Vec::new(); m.encode(&mut o); o }))
        };
        decoder.decode_client_verbatim(&frame, |msg| {
            let Ok(ClientMessage::Announce(a)) = &msg else {
                return Err(TestCaseError::fail(format!("{msg:?}")));
            };
            for (offer, text) in a.offers.iter().zip(&texts) {
                let OpaqueJson::Tape(t) = offer.offer else {
                    return Err(TestCaseError::fail("decoded offers are tape objects"));
                };
                prop_assert_eq!(t.raw(), Some(text.as_str()));
                prop_assert_eq!(offer.offer.to_json_string(), text.clone());
            }
            let mut out = Vec::new();
            msg.as_ref().map_err(|e| TestCaseError::fail(e.to_string()))?.encode(&mut out);
            // Same message as plain decoding (the encodings differ only in offer whitespace).
            let a: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
            let b: serde_json::Value = serde_json::from_slice(plain.as_ref().expect("plain decodes")).expect("valid JSON");
            prop_assert_eq!(a, b);
            Ok(())
        })?;
    }
}

#[test]
fn verbatim_spans_survive_tricky_strings_and_empty_containers() {
    let offer =
        r#"{"sdp":"a}\"b{[\\","n":[],"o":{},"u":"\u00e9\ud83d\ude00é","deep":[[{"x":[{}]}]]}"#;
    let answer = r#"{ "type" : "answer" , "sdp" : "x\r\ny" }"#;
    let frame = format!(
        r#"{{"action":"announce","info_hash":"{h}","peer_id":"{h}","offers":[{{"offer_id":"1","offer":{offer}}}],"to_peer_id":"{h}","offer_id":"z","answer":{answer}}}"#,
        h = "c".repeat(20)
    );
    Decoder::default().decode_client_verbatim(&frame, |msg| {
        let Ok(ClientMessage::Announce(a)) = msg else {
            panic!("{msg:?}")
        };
        let OpaqueJson::Tape(t) = a.offers[0].offer else {
            panic!("tape")
        };
        assert_eq!(t.raw(), Some(offer));
        let OpaqueJson::Tape(t) = a.answer.as_ref().expect("answer").answer else {
            panic!("tape")
        };
        assert_eq!(t.raw(), Some(answer));
        assert_eq!(
            a.answer.as_ref().expect("answer").answer.sdp(),
            Some("x\r\ny")
        );
    });
    // Errors come out the same way as from plain decoding.
    let err = Decoder::default()
        .decode_client_verbatim(r#"{"action":"announce","info_hash":"x"}"#, |m| {
            m.expect_err("bad id")
        });
    assert_eq!(
        err.action,
        Some(tidepool_protocol::tracker::Action::Announce)
    );
}
