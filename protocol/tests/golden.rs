//! Golden frames recorded from npm `bittorrent-tracker` (server and client, real WebRTC on
//! loopback) by `interop/record.mjs` (at the workspace root): every frame must decode, and re-encode to the same JSON.

use serde_json::Value;
use tidepool_protocol::tracker::{
    ClientMessage, DecodeError, Decoder, ScrapeHashes, ServerMessage,
};
use tidepool_protocol::{IdError, InfoHash, PeerId};

struct Frame {
    dir: String,
    stage: String,
    text: String,
}

fn load() -> (Value, Vec<Frame>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/bittorrent-tracker.jsonl"
    );
    let text = std::fs::read_to_string(path).expect("fixture file exists (run interop/record.mjs)");
    let mut lines = text.lines();
    let meta: Value = serde_json::from_str(lines.next().expect("meta line")).expect("meta JSON");
    let frames = lines
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("fixture line is JSON");
            Frame {
                dir: v["dir"].as_str().expect("dir").to_owned(),
                stage: v["stage"].as_str().expect("stage").to_owned(),
                text: v["frame"].as_str().expect("frame").to_owned(),
            }
        })
        .collect();
    (meta["meta"].clone(), frames)
}

/// The protocol treats `null` and absent alike; compare with top-level nulls dropped.
fn normalized(text: &str) -> Value {
    let mut v: Value = serde_json::from_str(text).expect("valid JSON");
    if let Value::Object(map) = &mut v {
        map.retain(|_, value| !value.is_null());
    }
    v
}

fn hex_id(v: &Value) -> [u8; 20] {
    *InfoHash::from_hex(v.as_str().expect("hex string"))
        .expect("40 hex digits")
        .as_bytes()
}

#[test]
fn fixture_comes_from_the_reference_implementation_with_working_webrtc() {
    let (meta, frames) = load();
    let source = meta["source"].as_str().expect("source");
    assert!(source.contains("bittorrent-tracker"), "{source}");
    assert_eq!(
        meta["data_channels_opened"], 2,
        "offers/answers were really usable"
    );
    assert!(frames.len() >= 20, "only {} frames", frames.len());
}

#[test]
fn every_client_frame_decodes_and_reencodes_to_the_same_json() {
    let (meta, frames) = load();
    let peer_ids = [
        hex_id(&meta["peer_ids_hex"][0]),
        hex_id(&meta["peer_ids_hex"][1]),
    ];
    let info_hash = hex_id(&meta["info_hash_hex"]);
    let mut decoder = Decoder::default();
    let mut seen = std::collections::BTreeSet::new();
    for frame in frames.iter().filter(|f| f.dir == "client_to_tracker") {
        let mut bytes = frame.text.clone().into_bytes();
        decoder.decode_client(&mut bytes, |msg| {
            if frame.stage.starts_with("error_") {
                let err = msg.expect_err(&frame.stage);
                match frame.stage.as_str() {
                    "error_bad_info_hash" => assert_eq!(
                        err.error,
                        DecodeError::BadId {
                            field: "info_hash",
                            error: IdError::Length(9)
                        }
                    ),
                    "error_unknown_action" => {
                        assert_eq!(err.error, DecodeError::UnknownAction("connect".into()));
                        assert_eq!(err.info_hash, Some(InfoHash(info_hash)), "context kept");
                    }
                    other => panic!("unexpected error stage {other}"),
                }
                seen.insert(frame.stage.clone());
                return;
            }
            let msg = msg.unwrap_or_else(|e| panic!("{}: {e}\n{}", frame.stage, frame.text));
            match &msg {
                ClientMessage::Announce(a) => {
                    assert_eq!(a.info_hash, InfoHash(info_hash));
                    assert!(
                        peer_ids.contains(&a.peer_id.0),
                        "peer ids decode byte-exact"
                    );
                    if let Some(answer) = &a.answer {
                        assert!(peer_ids.contains(&answer.to_peer_id.0));
                        assert_eq!(answer.answer.kind(), Some("answer"));
                        assert!(
                            answer
                                .answer
                                .sdp()
                                .is_some_and(|s| s.starts_with("v=0\r\n"))
                        );
                        seen.insert("answer".to_owned());
                    }
                    if !a.offers.is_empty() {
                        for offer in &a.offers {
                            assert_eq!(offer.offer.kind(), Some("offer"));
                            assert!(offer.offer_id.to_bytes20().is_some());
                        }
                        seen.insert("announce_with_offers".to_owned());
                    }
                    seen.insert(format!("event_{:?}", a.event));
                }
                ClientMessage::Scrape(s) => {
                    seen.insert(
                        match s.info_hashes {
                            ScrapeHashes::All => "scrape_all",
                            ScrapeHashes::One(_) => "scrape_one",
                            ScrapeHashes::Many(_) => "scrape_many",
                        }
                        .to_owned(),
                    );
                }
            }
            let mut out = Vec::new();
            msg.encode(&mut out);
            let reencoded = String::from_utf8(out).expect("UTF-8");
            assert_eq!(
                normalized(&reencoded),
                normalized(&frame.text),
                "{}",
                frame.stage
            );
        });
    }
    for kind in [
        "announce_with_offers",
        "answer",
        "event_Started",
        "event_Completed",
        "event_Stopped",
        "event_None",
        "scrape_one",
        "scrape_many",
        "scrape_all",
        "error_bad_info_hash",
        "error_unknown_action",
    ] {
        assert!(seen.contains(kind), "fixture lacks {kind}: {seen:?}");
    }
}

#[test]
fn every_tracker_frame_decodes_and_reencodes_to_the_same_json() {
    let (meta, frames) = load();
    let peer_ids = [
        hex_id(&meta["peer_ids_hex"][0]),
        hex_id(&meta["peer_ids_hex"][1]),
    ];
    let mut decoder = Decoder::default();
    let mut seen = std::collections::BTreeSet::new();
    for frame in frames.iter().filter(|f| f.dir == "tracker_to_client") {
        let mut bytes = frame.text.clone().into_bytes();
        decoder.decode_server(&mut bytes, |msg| {
            let msg = msg.unwrap_or_else(|e| panic!("{}: {e}\n{}", frame.stage, frame.text));
            let kind = match &msg {
                ServerMessage::Announce(r) => {
                    assert!(r.interval > 0);
                    "announce_response"
                }
                ServerMessage::Offer(o) => {
                    assert!(peer_ids.contains(&o.peer_id.0));
                    assert_eq!(o.offer.kind(), Some("offer"));
                    "offer"
                }
                ServerMessage::Answer(a) => {
                    assert!(peer_ids.contains(&PeerId(a.peer_id.0).0));
                    assert_eq!(a.answer.kind(), Some("answer"));
                    "answer"
                }
                ServerMessage::Scrape(s) => {
                    assert!(!s.files.is_empty());
                    "scrape"
                }
                ServerMessage::Error(e) => {
                    assert!(!e.failure_reason.is_empty());
                    "error"
                }
            };
            seen.insert(kind);
            let mut out = Vec::new();
            msg.encode(&mut out);
            let reencoded = String::from_utf8(out).expect("UTF-8");
            assert_eq!(
                normalized(&reencoded),
                normalized(&frame.text),
                "{}",
                frame.stage
            );
        });
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["announce_response", "answer", "error", "offer", "scrape"]
    );
}
