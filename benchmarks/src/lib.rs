//! Shared inputs for the micro-benchmarks, and the plain `serde_json` baseline they compare
//! the simd-json decoder and the hand-written encoders against.
//!
//! The baseline is the fastest straightforward serde_json design: borrowed strings where
//! possible (`Cow` for ids, which may contain escapes) and `&RawValue` for offers, so opaque
//! objects are never parsed into a tree. It does the same validation the protocol crate does
//! for identifiers, so both sides do the same work.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tidepool_protocol::{InfoHash, PeerId};

/// A real offer SDP, recorded from npm `bittorrent-tracker` 11.2.3 + node-datachannel 0.33.4.
pub const REAL_OFFER_SDP: &str = "v=0\r\no=rtc 1483316455 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\na=msid-semantic:WMS *\r\na=ice-options:ice2,trickle\r\na=fingerprint:sha-256 C7:C5:22:57:36:99:60:0B:5C:BA:12:04:AF:BC:75:80:ED:5B:60:7C:9B:C9:12:73:2A:B5:09:F6:78:C4:AC:48\r\nm=application 46280 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 127.0.0.1\r\na=mid:0\r\na=sendrecv\r\na=sctp-port:5000\r\na=max-message-size:262144\r\na=setup:actpass\r\na=ice-ufrag:vVL4\r\na=ice-pwd:bbF4/mIKgAqPrWia5JVyZW\r\na=candidate:1 1 UDP 2114977791 127.0.0.1 46280 typ host\r\na=end-of-candidates\r\n";

/// 20 bytes spelled as JSON the way the npm client spells them (latin1, `\u00XX` escapes).
pub fn latin1_json(bytes: &[u8; 20]) -> String {
    let s: String = bytes.iter().map(|&b| b as char).collect();
    serde_json::to_string(&s).unwrap_or_default()
}

/// An announce with `offers` offers, as the npm client would send it.
pub fn announce_with_offers(offers: usize) -> Vec<u8> {
    let info_hash = latin1_json(&[
        0xc0, 0xff, 0xee, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
    ]);
    let peer_id = latin1_json(b"-WW0200-\x00\x01\x1f\"\\\x7f\x80\xff\xe9Abc");
    let offers: Vec<String> = (0..offers)
        .map(|i| {
            let mut id = [0x5au8; 20];
            id[0] = i as u8;
            format!(
                r#"{{"offer":{{"type":"offer","sdp":{}}},"offer_id":{}}}"#,
                serde_json::to_string(REAL_OFFER_SDP).unwrap_or_default(),
                latin1_json(&id)
            )
        })
        .collect();
    format!(
        r#"{{"numwant":{n},"uploaded":0,"downloaded":0,"left":1048576,"event":"started","action":"announce","info_hash":{info_hash},"peer_id":{peer_id},"offers":[{}]}}"#,
        offers.join(","),
        n = offers.len(),
    )
    .into_bytes()
}

/// serde_json baseline: an announce request.
#[derive(Debug, Deserialize)]
pub struct SerdeAnnounce<'a> {
    /// `announce` or `scrape`.
    #[serde(borrow)]
    pub action: Cow<'a, str>,
    /// Latin1 string; converted after parsing.
    #[serde(borrow)]
    pub info_hash: Cow<'a, str>,
    /// Latin1 string; converted after parsing.
    #[serde(borrow)]
    pub peer_id: Cow<'a, str>,
    /// Lifecycle event.
    #[serde(borrow, default)]
    pub event: Option<Cow<'a, str>>,
    /// Offers wanted.
    #[serde(default)]
    pub numwant: Option<serde_json::Number>,
    /// Byte counters.
    #[serde(default)]
    pub uploaded: Option<serde_json::Number>,
    /// Byte counters.
    #[serde(default)]
    pub downloaded: Option<serde_json::Number>,
    /// Byte counters.
    #[serde(default)]
    pub left: Option<serde_json::Number>,
    /// The offers, kept raw.
    #[serde(borrow, default)]
    pub offers: Option<Vec<SerdeOffer<'a>>>,
}

/// serde_json baseline: one offer, its object kept as raw JSON text.
#[derive(Debug, Deserialize)]
pub struct SerdeOffer<'a> {
    /// Echoed id.
    #[serde(borrow)]
    pub offer_id: Cow<'a, str>,
    /// The opaque offer object.
    #[serde(borrow)]
    pub offer: &'a RawValue,
}

/// serde_json baseline decode, including the identifier validation the protocol crate does.
pub fn serde_decode_announce(frame: &[u8]) -> Option<(InfoHash, PeerId, usize)> {
    let a: SerdeAnnounce<'_> = serde_json::from_slice(frame).ok()?;
    let info_hash = InfoHash::from_latin1(&a.info_hash).ok()?;
    let peer_id = PeerId::from_latin1(&a.peer_id).ok()?;
    Some((info_hash, peer_id, a.offers.map_or(0, |o| o.len())))
}

/// serde_json baseline: a forwarded offer.
#[derive(Debug, Serialize)]
pub struct SerdeOfferMessage<'a> {
    /// Always `announce`.
    pub action: &'static str,
    /// Latin1 string.
    pub info_hash: &'a str,
    /// Latin1 string.
    pub peer_id: &'a str,
    /// Echoed id.
    pub offer_id: &'a str,
    /// The opaque offer, spliced raw.
    pub offer: &'a RawValue,
}

/// serde_json baseline: an announce response.
#[derive(Debug, Serialize)]
pub struct SerdeAnnounceResponse<'a> {
    /// Always `announce`.
    pub action: &'static str,
    /// Latin1 string.
    pub info_hash: &'a str,
    /// Seeders.
    pub complete: u64,
    /// Leechers.
    pub incomplete: u64,
    /// Seconds.
    pub interval: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_protocol::tracker::{ClientMessage, Decoder};

    /// Both decoders must agree on the benchmark input, or the comparison means nothing.
    #[test]
    fn baseline_and_simd_decoders_agree_on_the_benchmark_frame() {
        let frame = announce_with_offers(10);
        let (hash, peer, offers) = serde_decode_announce(&frame).expect("baseline decodes");
        let mut bytes = frame.clone();
        Decoder::default().decode_client(&mut bytes, |m| match m {
            Ok(ClientMessage::Announce(a)) => {
                assert_eq!(
                    (a.info_hash, a.peer_id, a.offers.len()),
                    (hash, peer, offers)
                );
                assert_eq!(a.offers[3].offer.sdp(), Some(REAL_OFFER_SDP));
            }
            other => panic!("{other:?}"),
        });
        assert_eq!(offers, 10);
    }
}
