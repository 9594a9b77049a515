//! The WebTorrent tracker protocol (JSON text frames over WebSocket), both directions.
//!
//! Client → tracker: [`ClientMessage`] (announce, with offers or an answer; scrape).
//! Tracker → client: [`ServerMessage`] (announce response, forwarded offer, forwarded answer,
//! scrape response, failure). Each type encodes into a caller's reused `Vec<u8>`; decoding
//! goes through a [`Decoder`], which borrows strings from the frame instead of copying them.
//!
//! Where npm `bittorrent-tracker` (the reference) and aquatic_ws differ, this follows what real
//! clients depend on; each such choice is noted where it is made.

mod decode;
mod error;
mod opaque;
mod request;
mod response;

pub use decode::{Decoder, Limits};
pub use error::{DecodeError, RequestError};
pub use opaque::{OpaqueJson, TapeJson};
pub use request::{AnnounceRequest, Answer, ClientMessage, Offer, ScrapeHashes, ScrapeRequest};
pub use response::{
    AnnounceResponse, AnswerMessage, ErrorResponse, OfferMessage, ScrapeResponse, ScrapeStats,
    ServerMessage,
};

/// The two request kinds; also echoed in responses so clients can route them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Join or update a swarm, send offers, or answer one.
    Announce,
    /// Ask for swarm statistics.
    Scrape,
}

impl Action {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Announce => "announce",
            Action::Scrape => "scrape",
        }
    }
}

/// The `event` of an announce. Missing and empty both mean an ordinary re-announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AnnounceEvent {
    /// First announce of a download.
    Started,
    /// The peer leaves the swarm (it still gets a response: clients wait for it).
    Stopped,
    /// The download finished: the peer is now a seeder.
    Completed,
    /// Explicit periodic update (sent by some clients).
    Update,
    /// BEP 21 partial seed: stays in the swarm, counted by its `left`.
    Paused,
    /// No event (missing or `""`).
    #[default]
    None,
}

impl AnnounceEvent {
    /// The wire spelling; `None` is not sent at all.
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            AnnounceEvent::Started => Some("started"),
            AnnounceEvent::Stopped => Some("stopped"),
            AnnounceEvent::Completed => Some("completed"),
            AnnounceEvent::Update => Some("update"),
            AnnounceEvent::Paused => Some("paused"),
            AnnounceEvent::None => None,
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "started" => AnnounceEvent::Started,
            "stopped" => AnnounceEvent::Stopped,
            "completed" => AnnounceEvent::Completed,
            "update" => AnnounceEvent::Update,
            "paused" => AnnounceEvent::Paused,
            "" => AnnounceEvent::None,
            _ => return None,
        })
    }
}
