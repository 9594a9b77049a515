//! Client → tracker messages and their encoding.

use super::{Action, AnnounceEvent, OpaqueJson};
use crate::id::{InfoHash, OfferId, PeerId};
use crate::json::{Number, write_key, write_latin1, write_number, write_str, write_u64};

/// Any message a client sends.
// Decoded messages live briefly on the stack inside the decode closure and are never stored
// in bulk, so boxing the large variant would only add an allocation per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage<'a> {
    /// `action: "announce"` (including answers).
    Announce(AnnounceRequest<'a>),
    /// `action: "scrape"`.
    Scrape(ScrapeRequest),
}

/// An announce: join or update a swarm, optionally carrying offers for other peers, or an
/// answer to one offer (then the tracker sends no announce response).
#[derive(Debug, Clone, PartialEq)]
pub struct AnnounceRequest<'a> {
    /// The swarm.
    pub info_hash: InfoHash,
    /// The announcing peer.
    pub peer_id: PeerId,
    /// Lifecycle event.
    pub event: AnnounceEvent,
    /// How many peers the client wants offers sent to; absent means the tracker's default.
    pub numwant: Option<u32>,
    /// Bytes uploaded (any JSON number; absent or null is `None`).
    pub uploaded: Option<Number>,
    /// Bytes downloaded.
    pub downloaded: Option<Number>,
    /// Bytes left; `Some(0)` is a seeder. `None` (absent, or `null` for a magnet download
    /// without metadata) is a leecher, as are negative and huge values.
    pub left: Option<Number>,
    /// Offers to forward, one per chosen peer.
    pub offers: Vec<Offer<'a>>,
    /// Present when this announce answers another peer's offer.
    pub answer: Option<Answer<'a>>,
}

/// One WebRTC offer in an announce.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer<'a> {
    /// Chosen by the offerer; echoed with the answer so it can match them up.
    pub offer_id: OfferId,
    /// The offer object, forwarded verbatim.
    pub offer: OpaqueJson<'a>,
}

/// The answer part of an announce.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer<'a> {
    /// The offerer, who gets the answer.
    pub to_peer_id: PeerId,
    /// The offer being answered.
    pub offer_id: OfferId,
    /// The answer object, forwarded verbatim.
    pub answer: OpaqueJson<'a>,
}

/// Which swarms a scrape asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScrapeHashes {
    /// No `info_hash`: every swarm.
    All,
    /// `info_hash` as one string.
    One(InfoHash),
    /// `info_hash` as a list (kept as a list on the wire even with one entry).
    Many(Vec<InfoHash>),
}

/// A scrape request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeRequest {
    /// The swarms asked about.
    pub info_hashes: ScrapeHashes,
}

impl ScrapeHashes {
    /// The requested hashes as a slice (empty for [`ScrapeHashes::All`]).
    pub fn as_slice(&self) -> &[InfoHash] {
        match self {
            ScrapeHashes::All => &[],
            ScrapeHashes::One(h) => std::slice::from_ref(h),
            ScrapeHashes::Many(v) => v,
        }
    }
}

impl ClientMessage<'_> {
    /// Appends the message as one JSON text frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ClientMessage::Announce(a) => a.encode(out),
            ClientMessage::Scrape(s) => s.encode(out),
        }
    }

    /// The message's action.
    pub fn action(&self) -> Action {
        match self {
            ClientMessage::Announce(_) => Action::Announce,
            ClientMessage::Scrape(_) => Action::Scrape,
        }
    }
}

impl AnnounceRequest<'_> {
    /// Appends the request as JSON.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"action":"announce","info_hash":"#);
        write_latin1(out, &self.info_hash.0);
        out.push(b',');
        write_key(out, "peer_id");
        write_latin1(out, &self.peer_id.0);
        if let Some(event) = self.event.as_str() {
            out.push(b',');
            write_key(out, "event");
            write_str(out, event);
        }
        if let Some(numwant) = self.numwant {
            out.push(b',');
            write_key(out, "numwant");
            write_u64(out, numwant.into());
        }
        for (key, value) in [
            ("uploaded", self.uploaded),
            ("downloaded", self.downloaded),
            ("left", self.left),
        ] {
            if let Some(n) = value {
                out.push(b',');
                write_key(out, key);
                write_number(out, n);
            }
        }
        if !self.offers.is_empty() {
            out.push(b',');
            write_key(out, "offers");
            out.push(b'[');
            for (i, offer) in self.offers.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'{');
                write_key(out, "offer_id");
                write_str(out, offer.offer_id.as_str());
                out.push(b',');
                write_key(out, "offer");
                offer.offer.encode(out);
                out.push(b'}');
            }
            out.push(b']');
        }
        if let Some(answer) = &self.answer {
            out.push(b',');
            write_key(out, "to_peer_id");
            write_latin1(out, &answer.to_peer_id.0);
            out.push(b',');
            write_key(out, "offer_id");
            write_str(out, answer.offer_id.as_str());
            out.push(b',');
            write_key(out, "answer");
            answer.answer.encode(out);
        }
        out.push(b'}');
    }
}

impl ScrapeRequest {
    /// Appends the request as JSON.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"action":"scrape""#);
        match &self.info_hashes {
            ScrapeHashes::All => {}
            ScrapeHashes::One(h) => {
                out.push(b',');
                write_key(out, "info_hash");
                write_latin1(out, &h.0);
            }
            ScrapeHashes::Many(list) => {
                out.push(b',');
                write_key(out, "info_hash");
                out.push(b'[');
                for (i, h) in list.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_latin1(out, &h.0);
                }
                out.push(b']');
            }
        }
        out.push(b'}');
    }
}
