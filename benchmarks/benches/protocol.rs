//! Protocol micro-benchmarks: the simd-json decoder and hand-written encoders against a plain
//! serde_json baseline, on the messages a tracker handles most.
//!
//! Run: `cargo bench -p tidepool-benchmarks --bench protocol`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;
use tidepool_benchmarks::{
    REAL_OFFER_SDP, SerdeAnnounceResponse, SerdeOfferMessage, announce_with_offers,
    serde_decode_announce,
};
use tidepool_protocol::tracker::{
    AnnounceResponse, ClientMessage, Decoder, OfferMessage, OpaqueJson,
};
use tidepool_protocol::{InfoHash, OfferId, PeerId};

fn decode_announce(c: &mut Criterion) {
    let frame = announce_with_offers(10);
    let mut group = c.benchmark_group("decode_announce_10_offers");
    group.throughput(Throughput::Bytes(frame.len() as u64));
    let mut decoder = Decoder::default();
    let mut scratch = frame.clone();
    group.bench_function("simd_json_tape", |b| {
        b.iter(|| {
            // simd-json unescapes in place, so every round parses a fresh copy (as a
            // socket worker parses each fresh frame); the copy is in both variants' cost.
            scratch.copy_from_slice(&frame);
            decoder.decode_client(black_box(&mut scratch), |m| match m {
                Ok(ClientMessage::Announce(a)) => a.offers.len(),
                _ => 0,
            })
        })
    });
    group.bench_function("serde_json_borrowed", |b| {
        b.iter(|| {
            scratch.copy_from_slice(&frame);
            serde_decode_announce(black_box(&scratch)).map_or(0, |(_, _, n)| n)
        })
    });
    group.finish();
}

fn encode_offer(c: &mut Criterion) {
    let info_hash = InfoHash([0xab; 20]);
    let peer_id = PeerId(*b"-WW0200-\x00\x01\x1f\"\\\x7f\x80\xff\xe9Abc");
    let offer_id = OfferId::from_bytes20(&[0x5a; 20]);
    // The offer as the tracker holds it after decoding the offerer's announce.
    let mut announce = announce_with_offers(1);
    let mut decoder = Decoder::default();
    let encoded_offer = decoder.decode_client(&mut announce, |m| match m {
        Ok(ClientMessage::Announce(a)) => a.offers[0].offer.to_json_string(),
        other => panic!("{other:?}"),
    });
    let raw: Box<RawValue> = RawValue::from_string(encoded_offer.clone()).expect("valid JSON");
    let latin1 = |b: &[u8; 20]| -> String { b.iter().map(|&x| x as char).collect() };
    let (hash_s, peer_s, offer_id_s) = (
        latin1(&info_hash.0),
        latin1(&peer_id.0),
        offer_id.as_str().to_owned(),
    );

    let mut group = c.benchmark_group("encode_forwarded_offer");
    let mut out = Vec::with_capacity(4096);
    group.bench_function("handwritten_spliced", |b| {
        b.iter(|| {
            out.clear();
            OfferMessage {
                info_hash,
                peer_id,
                offer_id,
                offer: OpaqueJson::Encoded(black_box(&encoded_offer)),
            }
            .encode(&mut out);
            out.len()
        })
    });
    group.bench_function("handwritten_from_sdp", |b| {
        b.iter(|| {
            out.clear();
            OfferMessage {
                info_hash,
                peer_id,
                offer_id,
                offer: OpaqueJson::Sdp {
                    kind: "offer",
                    sdp: black_box(REAL_OFFER_SDP),
                },
            }
            .encode(&mut out);
            out.len()
        })
    });
    group.bench_function("serde_json_raw_value", |b| {
        b.iter(|| {
            out.clear();
            let msg = SerdeOfferMessage {
                action: "announce",
                info_hash: &hash_s,
                peer_id: &peer_s,
                offer_id: &offer_id_s,
                offer: black_box(&raw),
            };
            serde_json::to_writer(&mut out, &msg)
                .map(|()| out.len())
                .unwrap_or(0)
        })
    });
    group.finish();
}

fn encode_announce_response(c: &mut Criterion) {
    let info_hash = InfoHash(*b"\xc0\xff\xee\x00tidepool golden\x00");
    let hash_s: String = info_hash.0.iter().map(|&x| x as char).collect();
    let mut group = c.benchmark_group("encode_announce_response");
    let mut out = Vec::with_capacity(256);
    group.bench_function("handwritten", |b| {
        b.iter(|| {
            out.clear();
            AnnounceResponse {
                info_hash,
                complete: black_box(12),
                incomplete: 345,
                interval: 120,
            }
            .encode(&mut out);
            out.len()
        })
    });
    group.bench_function("serde_json", |b| {
        b.iter(|| {
            out.clear();
            let msg = SerdeAnnounceResponse {
                action: "announce",
                info_hash: &hash_s,
                complete: black_box(12),
                incomplete: 345,
                interval: 120,
            };
            serde_json::to_writer(&mut out, &msg)
                .map(|()| out.len())
                .unwrap_or(0)
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    decode_announce,
    encode_offer,
    encode_announce_response
);
criterion_main!(benches);
