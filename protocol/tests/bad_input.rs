//! Bad input gets a typed error naming what is wrong, and the error keeps `action` and
//! `info_hash` whenever they could be read; what real clients send is accepted.

use tidepool_protocol::tracker::{
    Action, AnnounceEvent, ClientMessage, DecodeError, Decoder, Limits, RequestError, ScrapeHashes,
};
use tidepool_protocol::{IdError, InfoHash, Number};

const HASH: &str = "aaaaaaaaaaaaaaaaaaaa";
const PEER: &str = "-TP0001-bbbbbbbbbbbb";

fn decode(frame: &str) -> Result<String, RequestError> {
    let mut bytes = frame.as_bytes().to_vec();
    Decoder::default().decode_client(&mut bytes, |msg| {
        msg.map(|m| {
            let mut out = Vec::new();
            m.encode(&mut out);
            String::from_utf8(out).expect("UTF-8")
        })
    })
}

fn reject(frame: &str) -> RequestError {
    match decode(frame) {
        Ok(ok) => panic!("accepted {frame:?} as {ok}"),
        Err(e) => e,
    }
}

fn announce(extra: &str) -> String {
    format!(r#"{{"action":"announce","info_hash":"{HASH}","peer_id":"{PEER}"{extra}}}"#)
}

fn with_announce<R>(
    frame: &str,
    f: impl FnOnce(&tidepool_protocol::tracker::AnnounceRequest<'_>) -> R,
) -> R {
    let mut bytes = frame.as_bytes().to_vec();
    Decoder::default().decode_client(&mut bytes, |msg| match msg {
        Ok(ClientMessage::Announce(a)) => f(&a),
        other => panic!("not an announce: {other:?}"),
    })
}

fn hash() -> Option<InfoHash> {
    InfoHash::from_latin1(HASH).ok()
}

#[test]
fn truncated_json_is_a_syntax_error() {
    let full = announce("");
    for cut in [1, 10, full.len() / 2, full.len() - 1] {
        let err = reject(&full[..cut]);
        assert!(
            matches!(err.error, DecodeError::Syntax(_)),
            "{cut}: {err:?}"
        );
    }
    assert!(matches!(reject("").error, DecodeError::Syntax(_)));
}

#[test]
fn non_object_top_level_is_rejected() {
    for frame in [
        "[]",
        "\"announce\"",
        "42",
        "null",
        "true",
        r#"[{"action":"scrape"}]"#,
    ] {
        assert_eq!(reject(frame).error, DecodeError::NotAnObject, "{frame}");
    }
}

#[test]
fn invalid_utf8_is_rejected() {
    let mut bytes = announce("").into_bytes();
    bytes[40] = 0xFF;
    let err = Decoder::default().decode_client(&mut bytes, |m| m.expect_err("invalid UTF-8"));
    assert_eq!(err.error, DecodeError::Utf8);
}

#[test]
fn wrong_types_name_the_field_and_keep_context() {
    let cases = [
        (announce(r#","numwant":"50""#), "numwant", "a number"),
        (announce(r#","uploaded":true"#), "uploaded", "a number"),
        (announce(r#","left":"0""#), "left", "a number"),
        (announce(r#","event":7"#), "event", "a string"),
        (announce(r#","offers":{}"#), "offers", "an array of objects"),
        (
            announce(r#","offers":["x"]"#),
            "offers",
            "an array of objects",
        ),
        (
            announce(r#","offers":[{"offer_id":"x","offer":"sdp"}]"#),
            "offer",
            "an object",
        ),
        (
            announce(r#","offers":[{"offer_id":5,"offer":{}}]"#),
            "offer_id",
            "a string",
        ),
    ];
    for (frame, field, expected) in cases {
        let err = reject(&frame);
        assert_eq!(
            err.error,
            DecodeError::WrongType { field, expected },
            "{frame}"
        );
        assert_eq!(err.action, Some(Action::Announce));
        assert_eq!(err.info_hash, hash());
    }
    let err = reject(r#"{"action":7}"#);
    assert_eq!(
        err.error,
        DecodeError::WrongType {
            field: "action",
            expected: "a string"
        }
    );
}

#[test]
fn non_string_identifiers_are_typed_errors() {
    let err = reject(r#"{"action":"announce","info_hash":12345,"peer_id":"x"}"#);
    assert_eq!(
        err.error,
        DecodeError::BadId {
            field: "info_hash",
            error: IdError::NotAString
        }
    );
    assert_eq!(err.action, Some(Action::Announce));
    let err = reject(&format!(
        r#"{{"action":"announce","info_hash":"{HASH}","peer_id":[1]}}"#
    ));
    assert_eq!(
        err.error,
        DecodeError::BadId {
            field: "peer_id",
            error: IdError::NotAString
        }
    );
    assert_eq!(err.info_hash, hash());
}

#[test]
fn wrong_lengths_are_rejected() {
    for (len, field) in [(19, "info_hash"), (21, "info_hash"), (0, "info_hash")] {
        let frame = format!(
            r#"{{"action":"announce","info_hash":"{}","peer_id":"{PEER}"}}"#,
            "a".repeat(len)
        );
        let err = reject(&frame);
        assert_eq!(
            err.error,
            DecodeError::BadId {
                field,
                error: IdError::Length(len)
            }
        );
    }
    let err = reject(&announce(
        r#","to_peer_id":"short","offer_id":"o","answer":{}"#,
    ));
    assert_eq!(
        err.error,
        DecodeError::BadId {
            field: "to_peer_id",
            error: IdError::Length(5)
        }
    );
    let long_offer_id = "o".repeat(65);
    let err = reject(&announce(&format!(
        r#","offers":[{{"offer_id":"{long_offer_id}","offer":{{}}}}]"#
    )));
    assert_eq!(
        err.error,
        DecodeError::TooLarge {
            field: "offer_id",
            limit: 64
        }
    );
}

#[test]
fn code_points_above_ff_are_rejected_escaped_or_raw() {
    let escaped = format!(
        r#"{{"action":"announce","info_hash":"{}\u0100","peer_id":"{PEER}"}}"#,
        "a".repeat(19)
    );
    let raw = format!(
        r#"{{"action":"announce","info_hash":"{}Ā","peer_id":"{PEER}"}}"#,
        "a".repeat(19)
    );
    let emoji = format!(
        r#"{{"action":"announce","info_hash":"{}\ud83d\ude00","peer_id":"{PEER}"}}"#,
        "a".repeat(19)
    );
    for (frame, cp) in [(escaped, 0x100), (raw, 0x100), (emoji, 0x1F600)] {
        let err = reject(&frame);
        assert_eq!(
            err.error,
            DecodeError::BadId {
                field: "info_hash",
                error: IdError::CodePoint(cp)
            }
        );
        assert_eq!(err.action, Some(Action::Announce));
    }
    let err = reject(&format!(
        r#"{{"action":"scrape","info_hash":["{HASH}","{}€"]}}"#,
        "a".repeat(19)
    ));
    assert_eq!(
        err.error,
        DecodeError::BadId {
            field: "info_hash",
            error: IdError::CodePoint(0x20AC)
        }
    );
    assert_eq!(err.action, Some(Action::Scrape));
}

#[test]
fn nested_depth_bombs_stop_at_the_depth_limit() {
    let deep = 100_000;
    let top = format!("{}{}", "[".repeat(deep), "]".repeat(deep));
    assert_eq!(reject(&top).error, DecodeError::TooDeep(16));
    let inside_offer = announce(&format!(
        r#","offers":[{{"offer_id":"x","offer":{{"a":{}1{}}}}}]"#,
        "[".repeat(deep),
        "]".repeat(deep)
    ));
    assert_eq!(reject(&inside_offer).error, DecodeError::TooDeep(16));
    // Within the limit is fine.
    let ok = announce(&format!(
        r#","offers":[{{"offer_id":"x","offer":{{"a":{}1{}}}}}]"#,
        "[".repeat(8),
        "]".repeat(8)
    ));
    assert!(decode(&ok).is_ok());
}

#[test]
fn huge_numbers_beyond_any_float_are_rejected() {
    for n in ["1e400", "-1e400", &format!("1{}", "0".repeat(400))] {
        let err = reject(&announce(&format!(r#","uploaded":{n}"#)));
        assert_eq!(err.error, DecodeError::BadNumber, "{n}");
    }
}

#[test]
fn duplicate_keys_are_rejected_not_guessed() {
    let err = reject(&format!(
        r#"{{"action":"announce","info_hash":"{HASH}","info_hash":"{HASH}","peer_id":"{PEER}"}}"#
    ));
    assert_eq!(err.error, DecodeError::DuplicateField("info_hash"));
    assert_eq!(err.action, Some(Action::Announce));
    let err = reject(&announce(r#","left":0,"left":100"#));
    assert_eq!(err.error, DecodeError::DuplicateField("left"));
    let err = reject(&announce(
        r#","offers":[{"offer_id":"a","offer_id":"b","offer":{}}]"#,
    ));
    assert_eq!(err.error, DecodeError::DuplicateField("offer_id"));
    // Duplicates among unknown keys are none of our business.
    assert!(decode(&announce(r#","x":1,"x":2"#)).is_ok());
}

#[test]
fn unknown_action_and_event_are_typed_errors_with_context() {
    let err = reject(&format!(r#"{{"action":"connect","info_hash":"{HASH}"}}"#));
    assert_eq!(err.error, DecodeError::UnknownAction("connect".into()));
    assert_eq!(err.info_hash, hash());
    let long = "x".repeat(10_000);
    let err = reject(&format!(r#"{{"action":"{long}"}}"#));
    assert!(
        err.to_string().len() < 100,
        "peer strings are not echoed at length"
    );
    let err = reject(&announce(r#","event":"exploded""#));
    assert_eq!(err.error, DecodeError::UnknownEvent("exploded".into()));
    assert_eq!(
        reject(r#"{"info_hash":"x"}"#).error,
        DecodeError::MissingField("action")
    );
}

#[test]
fn missing_required_fields_are_named() {
    let err = reject(&format!(r#"{{"action":"announce","info_hash":"{HASH}"}}"#));
    assert_eq!(err.error, DecodeError::MissingField("peer_id"));
    assert_eq!(err.info_hash, hash());
    assert_eq!(
        reject(r#"{"action":"announce"}"#).error,
        DecodeError::MissingField("info_hash")
    );
    let err = reject(&announce(
        r#","answer":{"type":"answer","sdp":"x"},"offer_id":"o""#,
    ));
    assert_eq!(err.error, DecodeError::MissingField("to_peer_id"));
    let err = reject(&announce(r#","offers":[{"offer":{}}]"#));
    assert_eq!(err.error, DecodeError::MissingField("offer_id"));
}

#[test]
fn limits_bound_offers_scrapes_and_opaque_objects() {
    let offers: Vec<String> = (0..65)
        .map(|i| format!(r#"{{"offer_id":"{i}","offer":{{}}}}"#))
        .collect();
    let err = reject(&announce(&format!(r#","offers":[{}]"#, offers.join(","))));
    assert_eq!(
        err.error,
        DecodeError::TooMany {
            field: "offers",
            limit: 64
        }
    );

    let hashes: Vec<String> = (0..257).map(|_| format!("\"{HASH}\"")).collect();
    let err = reject(&format!(
        r#"{{"action":"scrape","info_hash":[{}]}}"#,
        hashes.join(",")
    ));
    assert_eq!(
        err.error,
        DecodeError::TooMany {
            field: "info_hash",
            limit: 256
        }
    );

    let wide: Vec<String> = (0..200).map(|i| format!(r#""k{i}":[1]"#)).collect();
    let err = reject(&announce(&format!(
        r#","offers":[{{"offer_id":"x","offer":{{{}}}}}]"#,
        wide.join(",")
    )));
    assert_eq!(
        err.error,
        DecodeError::TooLarge {
            field: "offer",
            limit: 256
        }
    );

    // Limits are configurable: a stricter decoder rejects what the default accepts.
    let mut frame =
        announce(r#","offers":[{"offer_id":"1","offer":{}},{"offer_id":"2","offer":{}}]"#)
            .into_bytes();
    let strict = Limits {
        max_offers: 1,
        ..Limits::default()
    };
    let err = Decoder::new(strict).decode_client(&mut frame, |m| m.expect_err("two offers"));
    assert_eq!(
        err.error,
        DecodeError::TooMany {
            field: "offers",
            limit: 1
        }
    );
}

#[test]
fn error_reply_carries_action_and_info_hash() {
    let err = reject(&announce(r#","numwant":"lots""#));
    let mut out = Vec::new();
    err.to_response().encode(&mut out);
    let reply: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
    assert_eq!(reply["action"], "announce");
    assert_eq!(reply["info_hash"], HASH);
    assert_eq!(reply["failure reason"], "`numwant` must be a number");
    // Nothing readable: the reply is still well-formed, just without context.
    let mut out = Vec::new();
    reject("{").to_response().encode(&mut out);
    let reply: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
    assert!(
        reply["failure reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("invalid JSON"))
    );
    assert!(reply.get("action").is_none());
}

#[test]
fn accepts_what_real_clients_send() {
    // numwant, offers, event all missing; unknown extra fields ignored.
    with_announce(
        &announce(r#","trackerid":"t","key":"k","port":6881"#),
        |a| {
            assert_eq!(a.numwant, None);
            assert!(a.offers.is_empty());
            assert_eq!(a.event, AnnounceEvent::None);
        },
    );
    with_announce(&announce(r#","offers":[],"event":"""#), |a| {
        assert!(a.offers.is_empty());
        assert_eq!(a.event, AnnounceEvent::None);
    });
    for (name, event) in [
        ("started", AnnounceEvent::Started),
        ("stopped", AnnounceEvent::Stopped),
        ("completed", AnnounceEvent::Completed),
        ("update", AnnounceEvent::Update),
        ("paused", AnnounceEvent::Paused),
    ] {
        with_announce(&announce(&format!(r#","event":"{name}""#)), |a| {
            assert_eq!(a.event, event)
        });
    }
    // left: -1, huge beyond u64, a float, null (magnet without metadata: a leecher), zero.
    with_announce(&announce(r#","left":-1"#), |a| {
        assert_eq!(a.left, Some(Number::Int(-1)))
    });
    with_announce(&announce(r#","left":18446744073709552000"#), |a| {
        assert_eq!(a.left, Some(Number::Float(18446744073709552000.0)));
    });
    with_announce(&announce(r#","left":1.5"#), |a| {
        assert_eq!(a.left, Some(Number::Float(1.5)))
    });
    with_announce(&announce(r#","left":null"#), |a| assert_eq!(a.left, None));
    with_announce(&announce(r#","left":0"#), |a| {
        assert!(a.left.is_some_and(Number::is_zero))
    });
    // numwant clamps like the reference server instead of failing.
    with_announce(&announce(r#","numwant":-5"#), |a| {
        assert_eq!(a.numwant, Some(0))
    });
    with_announce(&announce(r#","numwant":1e12"#), |a| {
        assert_eq!(a.numwant, Some(u32::MAX))
    });
    // Any offer_id up to the bound is echoed verbatim, not only 20 code points.
    let hex = "0123456789abcdef0123456789abcdef01234567";
    with_announce(
        &announce(&format!(
            r#","offers":[{{"offer_id":"{hex}","offer":{{"type":"offer","sdp":"v=0"}}}}]"#
        )),
        |a| {
            assert_eq!(a.offers[0].offer_id.as_str(), hex);
            assert_eq!(a.offers[0].offer.sdp(), Some("v=0"));
        },
    );
    // Opaque objects of other shapes pass (clients' own tests send them).
    with_announce(
        &announce(r#","offers":[{"offer_id":"x","offer":{"hello":[1,{"a":null}]}}]"#),
        |a| {
            assert_eq!(
                a.offers[0].offer.to_json_string(),
                r#"{"hello":[1,{"a":null}]}"#
            );
        },
    );
}

#[test]
fn scrape_takes_one_many_or_no_info_hash() {
    let mut decoder = Decoder::default();
    let mut check = |frame: String, expect: ScrapeHashes| {
        let mut bytes = frame.into_bytes();
        decoder.decode_client(&mut bytes, |m| match m {
            Ok(ClientMessage::Scrape(s)) => assert_eq!(s.info_hashes, expect),
            other => panic!("{other:?}"),
        });
    };
    let h = InfoHash::from_latin1(HASH).expect("valid");
    check(r#"{"action":"scrape"}"#.into(), ScrapeHashes::All);
    check(
        r#"{"action":"scrape","info_hash":null}"#.into(),
        ScrapeHashes::All,
    );
    check(
        format!(r#"{{"action":"scrape","info_hash":"{HASH}"}}"#),
        ScrapeHashes::One(h),
    );
    check(
        format!(r#"{{"action":"scrape","info_hash":["{HASH}","{HASH}"]}}"#),
        ScrapeHashes::Many(vec![h, h]),
    );
    check(
        r#"{"action":"scrape","info_hash":[]}"#.into(),
        ScrapeHashes::Many(vec![]),
    );
}

#[test]
fn decoder_is_reusable_after_errors() {
    let mut decoder = Decoder::default();
    for i in 0..100 {
        let frame = if i % 2 == 0 {
            "{\"action\":".to_string()
        } else {
            announce(r#","left":3"#)
        };
        let mut bytes = frame.into_bytes();
        let ok = decoder.decode_client(&mut bytes, |m| m.is_ok());
        assert_eq!(ok, i % 2 == 1);
    }
}
