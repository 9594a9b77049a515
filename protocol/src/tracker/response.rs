//! Tracker → client messages and their encoding.

use std::borrow::Cow;

use super::{Action, OpaqueJson};
use crate::id::{InfoHash, OfferId, PeerId};
use crate::json::{write_key, write_latin1, write_str, write_u64};

/// Any message a tracker sends.
// Decoded messages live briefly on the stack inside the decode closure and are never stored
// in bulk, so boxing the large variant would only add an allocation per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage<'a> {
    /// Reply to an announce (not sent for answers).
    Announce(AnnounceResponse),
    /// Another peer's offer, forwarded.
    Offer(OfferMessage<'a>),
    /// An answer to one of this client's offers, forwarded.
    Answer(AnswerMessage<'a>),
    /// Reply to a scrape.
    Scrape(ScrapeResponse),
    /// `{"failure reason": ...}`.
    Error(ErrorResponse<'a>),
}

/// `{"action":"announce","info_hash","complete","incomplete","interval"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceResponse {
    /// The swarm announced to.
    pub info_hash: InfoHash,
    /// Seeders in the swarm.
    pub complete: u64,
    /// Leechers in the swarm.
    pub incomplete: u64,
    /// Seconds until the client should announce again.
    pub interval: u64,
}

/// A forwarded offer: `peer_id` is the offerer's.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferMessage<'a> {
    /// The swarm.
    pub info_hash: InfoHash,
    /// The offerer.
    pub peer_id: PeerId,
    /// Echo this back with the answer.
    pub offer_id: OfferId,
    /// The offer object, as the offerer sent it.
    pub offer: OpaqueJson<'a>,
}

/// A forwarded answer: `peer_id` is the answerer's.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerMessage<'a> {
    /// The swarm.
    pub info_hash: InfoHash,
    /// The answerer.
    pub peer_id: PeerId,
    /// The offer that was answered.
    pub offer_id: OfferId,
    /// The answer object, as the answerer sent it.
    pub answer: OpaqueJson<'a>,
}

/// Counts for one swarm in a scrape response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScrapeStats {
    /// Seeders.
    pub complete: u64,
    /// Leechers.
    pub incomplete: u64,
    /// Completed downloads seen.
    pub downloaded: u64,
}

/// `{"action":"scrape","files":{<info_hash>:{...}}}`. Unknown swarms are listed with zeros:
/// the npm client reports a missing entry as an invalid response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScrapeResponse {
    /// One entry per requested (or, for a scrape of all, existing) swarm.
    pub files: Vec<(InfoHash, ScrapeStats)>,
    /// `flags.min_request_interval`, as npm `bittorrent-tracker` sends it.
    pub min_request_interval: Option<u64>,
}

/// `{"failure reason": ..., "action"?, "info_hash"?}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse<'a> {
    /// Human-readable reason.
    pub failure_reason: Cow<'a, str>,
    /// The failed request's action, when known (the npm client needs it to route the reply).
    pub action: Option<Action>,
    /// The failed request's swarm, when known.
    pub info_hash: Option<InfoHash>,
}

impl ServerMessage<'_> {
    /// Appends the message as one JSON text frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ServerMessage::Announce(m) => m.encode(out),
            ServerMessage::Offer(m) => m.encode(out),
            ServerMessage::Answer(m) => m.encode(out),
            ServerMessage::Scrape(m) => m.encode(out),
            ServerMessage::Error(m) => m.encode(out),
        }
    }
}

impl AnnounceResponse {
    /// Appends the response as JSON.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"action":"announce","info_hash":"#);
        write_latin1(out, &self.info_hash.0);
        out.extend_from_slice(br#","complete":"#);
        write_u64(out, self.complete);
        out.extend_from_slice(br#","incomplete":"#);
        write_u64(out, self.incomplete);
        out.extend_from_slice(br#","interval":"#);
        write_u64(out, self.interval);
        out.push(b'}');
    }
}

/// Shared shape of forwarded offers and answers.
fn encode_forward(
    out: &mut Vec<u8>,
    info_hash: &InfoHash,
    peer_id: &PeerId,
    offer_id: &OfferId,
    key: &str,
    body: &OpaqueJson<'_>,
) {
    // One allocation for the whole frame: the fixed text (~70 bytes), each 20-byte id at
    // worst `\u00XX` per byte, the offer id likewise, and the body as it will be copied.
    out.reserve(
        80 + 2 * (6 * 20 + 2)
            + 6 * offer_id.as_str().len()
            + 2
            + key.len()
            + if let OpaqueJson::Encoded(text) = body {
                text.len()
            } else {
                0
            },
    );
    out.extend_from_slice(br#"{"action":"announce","info_hash":"#);
    write_latin1(out, &info_hash.0);
    out.push(b',');
    write_key(out, "peer_id");
    write_latin1(out, &peer_id.0);
    out.push(b',');
    write_key(out, "offer_id");
    write_str(out, offer_id.as_str());
    out.push(b',');
    write_key(out, key);
    body.encode(out);
    out.push(b'}');
}

impl OfferMessage<'_> {
    /// Appends the message as JSON.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_forward(
            out,
            &self.info_hash,
            &self.peer_id,
            &self.offer_id,
            "offer",
            &self.offer,
        );
    }
}

impl AnswerMessage<'_> {
    /// Appends the message as JSON.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_forward(
            out,
            &self.info_hash,
            &self.peer_id,
            &self.offer_id,
            "answer",
            &self.answer,
        );
    }
}

impl ScrapeResponse {
    /// Appends the response as JSON.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"action":"scrape","files":{"#);
        for (i, (hash, stats)) in self.files.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_latin1(out, &hash.0);
            out.extend_from_slice(br#":{"complete":"#);
            write_u64(out, stats.complete);
            out.extend_from_slice(br#","incomplete":"#);
            write_u64(out, stats.incomplete);
            out.extend_from_slice(br#","downloaded":"#);
            write_u64(out, stats.downloaded);
            out.push(b'}');
        }
        out.push(b'}');
        if let Some(interval) = self.min_request_interval {
            out.extend_from_slice(br#","flags":{"min_request_interval":"#);
            write_u64(out, interval);
            out.push(b'}');
        }
        out.push(b'}');
    }
}

impl ErrorResponse<'_> {
    /// Appends the response as JSON.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        write_key(out, "failure reason");
        write_str(out, &self.failure_reason);
        if let Some(action) = self.action {
            out.push(b',');
            write_key(out, "action");
            write_str(out, action.as_str());
        }
        if let Some(hash) = &self.info_hash {
            out.push(b',');
            write_key(out, "info_hash");
            write_latin1(out, &hash.0);
        }
        out.push(b'}');
    }
}
