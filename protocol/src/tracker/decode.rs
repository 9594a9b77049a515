//! Decoding frames: simd-json parses into a reused tape, and typed messages borrow from it.
//!
//! One pass over the top-level object records where each known key's value sits; then each
//! field is checked in an order that reads `action` and `info_hash` first, so an error reply
//! can carry them. Strings are borrowed from the frame (simd-json unescapes in place), ids are
//! copied into fixed arrays, and offers and answers stay as tape slices until re-encoded.

use std::fmt;

use simd_json::{Buffers, Node, StaticNode, Tape};

use super::error::{DecodeError, RequestError};
use super::opaque::{OpaqueJson, TapeJson};
use super::request::{AnnounceRequest, Answer, ClientMessage, Offer, ScrapeHashes, ScrapeRequest};
use super::response::{
    AnnounceResponse, AnswerMessage, ErrorResponse, OfferMessage, ScrapeResponse, ScrapeStats,
    ServerMessage,
};
use super::{Action, AnnounceEvent};
use crate::id::{IdError, InfoHash, MAX_OFFER_ID_BYTES, OfferId, PeerId, decode_latin1_20};
use crate::json::{Number, value_len};

/// Bounds the decoder enforces on every frame, whatever the transport's own limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Deepest JSON nesting accepted. An announce with offers needs 3; deeper input is
    /// rejected by the parser before any tape is built (depth bombs).
    pub max_depth: usize,
    /// Most offers in one announce.
    pub max_offers: usize,
    /// Most info hashes in one scrape.
    pub max_scrape_hashes: usize,
    /// Largest offer or answer object, counted in JSON values (a `{type, sdp}` object is 5).
    pub max_opaque_values: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: 16,
            max_offers: 64,
            max_scrape_hashes: 256,
            max_opaque_values: 256,
        }
    }
}

/// Decodes frames, reusing its parse buffers and tape between calls.
///
/// Decoded messages borrow from the frame and from the decoder's tape, so they are handed to
/// a closure rather than returned; whatever the closure returns comes back out.
///
/// ```
/// use tidepool_protocol::tracker::{ClientMessage, Decoder};
/// let mut decoder = Decoder::default();
/// let mut frame = br#"{"action":"scrape"}"#.to_vec();
/// let is_scrape = decoder.decode_client(&mut frame, |msg| matches!(msg, Ok(ClientMessage::Scrape(_))));
/// assert!(is_scrape);
/// ```
pub struct Decoder {
    buffers: Buffers,
    tape: Tape<'static>,
    limits: Limits,
    /// Copy of the frame that simd-json unescapes in place (verbatim decoding).
    scratch: Vec<u8>,
    /// Per tape node: its first and last structural index (verbatim decoding).
    map: Vec<(u32, u32)>,
    /// Open containers while building `map`: (tape node, members left, is object).
    stack: Vec<(usize, usize, bool)>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            buffers: Buffers::with_max_depth(4096, limits.max_depth),
            tape: Tape::null(),
            limits,
            scratch: Vec::new(),
            map: Vec::new(),
            stack: Vec::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decodes a client frame (unescaping strings in place) and hands the result to `f`.
    pub fn decode_client<R>(
        &mut self,
        frame: &mut [u8],
        f: impl FnOnce(Result<ClientMessage<'_>, RequestError>) -> R,
    ) -> R {
        let mut tape = std::mem::replace(&mut self.tape, Tape::null()).reset();
        let result = match simd_json::fill_tape(frame, &mut self.buffers, &mut tape) {
            Ok(()) => parse_client(&tape.0, None, &self.limits),
            Err(e) => Err(RequestError::bare(DecodeError::from_simd(
                &e,
                self.limits.max_depth,
            ))),
        };
        let out = f(result);
        self.tape = tape.reset();
        out
    }

    /// Decodes a client frame without touching it (the decoder unescapes a copy), so offers
    /// and answers keep their exact bytes from `frame` ([`TapeJson::raw`]): forwarding them
    /// is a copy, not a re-encode. This is what a tracker wants.
    pub fn decode_client_verbatim<R>(
        &mut self,
        frame: &str,
        f: impl FnOnce(Result<ClientMessage<'_>, RequestError>) -> R,
    ) -> R {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(frame.as_bytes());
        // Padded here, so simd-json parses the copy in place instead of copying it again.
        scratch.resize(frame.len() + simd_json::INPUT_PADDING, 0);
        let mut tape = std::mem::replace(&mut self.tape, Tape::null()).reset();
        let out = match simd_json::fill_tape_padded(
            &mut scratch,
            frame.len(),
            &mut self.buffers,
            &mut tape,
        ) {
            Ok(()) => {
                let structurals = self.buffers.structural_indexes();
                let mapped = structural_map(&tape.0, &mut self.map, &mut self.stack);
                // Only trust the spans when the walk accounts for every structural.
                let spans = (mapped as usize == structurals.len()
                    || mapped as usize + 1 == structurals.len())
                .then_some(Spans {
                    frame,
                    structurals,
                    map: &self.map,
                });
                f(parse_client(&tape.0, spans.as_ref(), &self.limits))
            }
            Err(e) => f(Err(RequestError::bare(DecodeError::from_simd(
                &e,
                self.limits.max_depth,
            )))),
        };
        self.tape = tape.reset();
        self.scratch = scratch;
        out
    }

    /// Decodes a tracker frame (unescaping strings in place) and hands the result to `f`.
    pub fn decode_server<R>(
        &mut self,
        frame: &mut [u8],
        f: impl FnOnce(Result<ServerMessage<'_>, DecodeError>) -> R,
    ) -> R {
        let mut tape = std::mem::replace(&mut self.tape, Tape::null()).reset();
        let result = match simd_json::fill_tape(frame, &mut self.buffers, &mut tape) {
            Ok(()) => parse_server(&tape.0, &self.limits),
            Err(e) => Err(DecodeError::from_simd(&e, self.limits.max_depth)),
        };
        let out = f(result);
        self.tape = tape.reset();
        out
    }
}

/// Byte spans of tape nodes in the original frame, found through simd-json's structural
/// indexes (the byte offset of every `{}[],:` and of the start of every string and scalar).
struct Spans<'t> {
    frame: &'t str,
    structurals: &'t [u32],
    map: &'t [(u32, u32)],
}

impl<'t> Spans<'t> {
    /// The exact text of the object at tape node `node`.
    fn raw(&self, node: usize) -> Option<&'t str> {
        let &(open, close) = self.map.get(node)?;
        let start = *self.structurals.get(open as usize)? as usize;
        let end = *self.structurals.get(close as usize)? as usize + 1;
        let raw = self.frame.get(start..end)?;
        (raw.starts_with('{') && raw.ends_with('}')).then_some(raw)
    }
}

/// Maps each tape node to the structural indexes of its first and last character, walking
/// the tape the way simd-json's stage 2 walked the structurals: a scalar or string is one
/// structural; a container is its opening bracket, each member (a key and `:` before each
/// object value) with a `,` or the closing bracket after it. Returns the structurals used.
fn structural_map(
    nodes: &[Node<'_>],
    map: &mut Vec<(u32, u32)>,
    stack: &mut Vec<(usize, usize, bool)>,
) -> u32 {
    map.clear();
    map.resize(nodes.len(), (0, 0));
    stack.clear();
    let mut s: u32 = 0;
    let mut i = 0;
    while i < nodes.len() {
        if let Some(&(_, _, true)) = stack.last() {
            // An object member: its key and the colon.
            s += 2;
            i += 1;
        }
        let Some(node) = nodes.get(i) else { break };
        map[i].0 = s;
        match *node {
            Node::Object { len, .. } | Node::Array { len, .. } if len > 0 => {
                stack.push((i, len, matches!(node, Node::Object { .. })));
                s += 1;
                i += 1;
                continue;
            }
            Node::Object { .. } | Node::Array { .. } => {
                map[i].1 = s + 1;
                s += 2;
            }
            _ => {
                map[i].1 = s;
                s += 1;
            }
        }
        i += 1;
        // A value ended: the separator or closing bracket after it, closing containers.
        while let Some(top) = stack.last_mut() {
            s += 1;
            top.1 -= 1;
            if top.1 > 0 {
                break;
            }
            map[top.0].1 = s - 1;
            stack.pop();
        }
    }
    s
}

/// Where each known key's value sits in the tape, for one object.
struct Fields<'t, const N: usize> {
    nodes: &'t [Node<'t>],
    spans: Option<&'t Spans<'t>>,
    slots: [Option<usize>; N],
    /// The first known key seen twice; reported after `action`/`info_hash` are read.
    duplicate: Option<&'static str>,
}

impl<'t, const N: usize> Fields<'t, N> {
    /// Indexes the object at `nodes[at]`; unknown keys are skipped.
    fn collect(
        nodes: &'t [Node<'t>],
        spans: Option<&'t Spans<'t>>,
        at: usize,
        keys: &[&'static str; N],
    ) -> Result<Self, DecodeError> {
        let Some(Node::Object { len, .. }) = nodes.get(at) else {
            return Err(DecodeError::NotAnObject);
        };
        let mut fields = Fields {
            nodes,
            spans,
            slots: [None; N],
            duplicate: None,
        };
        let mut i = at + 1;
        for _ in 0..*len {
            let Some(Node::String(key)) = nodes.get(i) else {
                return Err(DecodeError::Syntax("object key is not a string".into()));
            };
            i += 1;
            if let Some(k) = keys.iter().position(|known| known == key) {
                if fields.slots[k].is_some() {
                    fields.duplicate.get_or_insert(keys[k]);
                } else {
                    fields.slots[k] = Some(i);
                }
            }
            i += value_len(nodes.get(i..).unwrap_or_default());
        }
        Ok(fields)
    }

    /// The value of key `k`, with JSON `null` treated as absent.
    fn get(&self, k: usize) -> Option<(usize, &'t Node<'t>)> {
        let i = self.slots[k]?;
        match self.nodes.get(i)? {
            Node::Static(StaticNode::Null) => None,
            node => Some((i, node)),
        }
    }

    fn check_duplicates(&self) -> Result<(), DecodeError> {
        match self.duplicate {
            Some(key) => Err(DecodeError::DuplicateField(key)),
            None => Ok(()),
        }
    }

    fn str(&self, k: usize, field: &'static str) -> Result<Option<&'t str>, DecodeError> {
        match self.get(k) {
            None => Ok(None),
            Some((_, Node::String(s))) => Ok(Some(s)),
            Some(_) => Err(DecodeError::WrongType {
                field,
                expected: "a string",
            }),
        }
    }

    fn id20(&self, k: usize, field: &'static str) -> Result<Option<[u8; 20]>, DecodeError> {
        match self.get(k) {
            None => Ok(None),
            Some((_, node)) => id20_node(node, field).map(Some),
        }
    }

    fn required_id20(&self, k: usize, field: &'static str) -> Result<[u8; 20], DecodeError> {
        self.id20(k, field)?.ok_or(DecodeError::MissingField(field))
    }

    fn number(&self, k: usize, field: &'static str) -> Result<Option<Number>, DecodeError> {
        match self.get(k) {
            None => Ok(None),
            Some((_, Node::Static(StaticNode::U64(v)))) => Ok(Some(Number::UInt(*v))),
            Some((_, Node::Static(StaticNode::I64(v)))) => Ok(Some(Number::from(*v))),
            Some((_, Node::Static(StaticNode::F64(v)))) => Ok(Some(Number::Float(*v))),
            Some(_) => Err(DecodeError::WrongType {
                field,
                expected: "a number",
            }),
        }
    }

    fn count(&self, k: usize, field: &'static str) -> Result<u64, DecodeError> {
        Ok(self
            .number(k, field)?
            .ok_or(DecodeError::MissingField(field))?
            .saturating_u64())
    }

    fn offer_id(&self, k: usize) -> Result<OfferId, DecodeError> {
        let s = self
            .str(k, "offer_id")?
            .ok_or(DecodeError::MissingField("offer_id"))?;
        OfferId::new(s).ok_or(DecodeError::TooLarge {
            field: "offer_id",
            limit: MAX_OFFER_ID_BYTES,
        })
    }

    fn opaque(
        &self,
        k: usize,
        field: &'static str,
        limits: &Limits,
    ) -> Result<Option<OpaqueJson<'t>>, DecodeError> {
        let Some((i, node)) = self.get(k) else {
            return Ok(None);
        };
        let Node::Object { count, .. } = node else {
            return Err(DecodeError::WrongType {
                field,
                expected: "an object",
            });
        };
        let len = count + 1;
        if len > limits.max_opaque_values {
            return Err(DecodeError::TooLarge {
                field,
                limit: limits.max_opaque_values,
            });
        }
        let nodes = self
            .nodes
            .get(i..i + len)
            .ok_or_else(|| DecodeError::Syntax("truncated object".into()))?;
        let raw = self.spans.and_then(|spans| spans.raw(i));
        Ok(Some(OpaqueJson::Tape(TapeJson { nodes, raw })))
    }

    fn required_opaque(
        &self,
        k: usize,
        field: &'static str,
        limits: &Limits,
    ) -> Result<OpaqueJson<'t>, DecodeError> {
        self.opaque(k, field, limits)?
            .ok_or(DecodeError::MissingField(field))
    }
}

fn id20_node(node: &Node<'_>, field: &'static str) -> Result<[u8; 20], DecodeError> {
    match node {
        Node::String(s) => decode_latin1_20(s).map_err(|error| DecodeError::BadId { field, error }),
        _ => Err(DecodeError::BadId {
            field,
            error: IdError::NotAString,
        }),
    }
}

/// The elements of the array at `nodes[i]`, as tape indexes.
fn array_items<'t>(
    nodes: &'t [Node<'t>],
    i: usize,
    field: &'static str,
    limit: usize,
    expected: &'static str,
) -> Result<impl Iterator<Item = usize> + 't, DecodeError> {
    let Some(Node::Array { len, .. }) = nodes.get(i) else {
        return Err(DecodeError::WrongType { field, expected });
    };
    if *len > limit {
        return Err(DecodeError::TooMany { field, limit });
    }
    let mut next = i + 1;
    Ok((0..*len).map(move |_| {
        let at = next;
        next += value_len(nodes.get(at..).unwrap_or_default());
        at
    }))
}

const ACTION: usize = 0;
const INFO_HASH: usize = 1;
const PEER_ID: usize = 2;
const EVENT: usize = 3;
const NUMWANT: usize = 4;
const UPLOADED: usize = 5;
const DOWNLOADED: usize = 6;
const LEFT: usize = 7;
const OFFERS: usize = 8;
const TO_PEER_ID: usize = 9;
const OFFER_ID: usize = 10;
const ANSWER: usize = 11;
const CLIENT_KEYS: [&str; 12] = [
    "action",
    "info_hash",
    "peer_id",
    "event",
    "numwant",
    "uploaded",
    "downloaded",
    "left",
    "offers",
    "to_peer_id",
    "offer_id",
    "answer",
];

fn parse_action(s: &str) -> Result<Action, DecodeError> {
    match s {
        "announce" => Ok(Action::Announce),
        "scrape" => Ok(Action::Scrape),
        other => Err(DecodeError::UnknownAction(DecodeError::quote(other))),
    }
}

fn parse_client<'t>(
    nodes: &'t [Node<'t>],
    spans: Option<&'t Spans<'t>>,
    limits: &Limits,
) -> Result<ClientMessage<'t>, RequestError> {
    let fields = Fields::collect(nodes, spans, 0, &CLIENT_KEYS).map_err(RequestError::bare)?;
    // A single readable info_hash goes into any error reply, whatever else is wrong.
    let mut context = RequestError {
        error: DecodeError::NotAnObject,
        action: None,
        info_hash: fields
            .get(INFO_HASH)
            .and_then(|(_, node)| id20_node(node, "info_hash").ok())
            .map(InfoHash),
    };
    let fail = |context: &RequestError, error| RequestError { error, ..*context };

    let action = fields
        .str(ACTION, "action")
        .and_then(|s| parse_action(s.ok_or(DecodeError::MissingField("action"))?))
        .map_err(|e| fail(&context, e))?;
    context.action = Some(action);
    let result = match action {
        Action::Announce => parse_announce(&fields, limits).map(ClientMessage::Announce),
        Action::Scrape => parse_scrape(&fields, limits).map(ClientMessage::Scrape),
    };
    result.map_err(|e| fail(&context, e))
}

fn parse_announce<'t>(
    fields: &Fields<'t, 12>,
    limits: &Limits,
) -> Result<AnnounceRequest<'t>, DecodeError> {
    let info_hash = InfoHash(fields.required_id20(INFO_HASH, "info_hash")?);
    fields.check_duplicates()?;
    let peer_id = PeerId(fields.required_id20(PEER_ID, "peer_id")?);
    let event = match fields.str(EVENT, "event")? {
        None => AnnounceEvent::None,
        Some(s) => AnnounceEvent::parse(s)
            .ok_or_else(|| DecodeError::UnknownEvent(DecodeError::quote(s)))?,
    };
    // Lenient like the reference server: any number, clamped to a count.
    let numwant = fields
        .number(NUMWANT, "numwant")?
        .map(|n| n.saturating_u64().min(u32::MAX.into()) as u32);

    let mut offers = Vec::new();
    if let Some((i, _)) = fields.get(OFFERS) {
        let items = array_items(
            fields.nodes,
            i,
            "offers",
            limits.max_offers,
            "an array of objects",
        )?;
        for at in items {
            let offer = Fields::collect(fields.nodes, fields.spans, at, &["offer_id", "offer"])
                .map_err(|_| DecodeError::WrongType {
                    field: "offers",
                    expected: "an array of objects",
                })?;
            offer.check_duplicates()?;
            offers.push(Offer {
                offer_id: offer.offer_id(0)?,
                offer: offer.required_opaque(1, "offer", limits)?,
            });
        }
    }

    let answer = match fields.opaque(ANSWER, "answer", limits)? {
        None => None,
        Some(answer) => Some(Answer {
            to_peer_id: PeerId(fields.required_id20(TO_PEER_ID, "to_peer_id")?),
            offer_id: fields.offer_id(OFFER_ID)?,
            answer,
        }),
    };

    Ok(AnnounceRequest {
        info_hash,
        peer_id,
        event,
        numwant,
        uploaded: fields.number(UPLOADED, "uploaded")?,
        downloaded: fields.number(DOWNLOADED, "downloaded")?,
        left: fields.number(LEFT, "left")?,
        offers,
        answer,
    })
}

fn parse_scrape(fields: &Fields<'_, 12>, limits: &Limits) -> Result<ScrapeRequest, DecodeError> {
    let info_hashes = match fields.get(INFO_HASH) {
        None => ScrapeHashes::All,
        Some((_, node @ Node::String(_))) => {
            ScrapeHashes::One(InfoHash(id20_node(node, "info_hash")?))
        }
        Some((i, _)) => {
            let items = array_items(
                fields.nodes,
                i,
                "info_hash",
                limits.max_scrape_hashes,
                "a string or an array of strings",
            )?;
            let mut list = Vec::new();
            for at in items {
                let node = fields.nodes.get(at).ok_or(DecodeError::NotAnObject)?;
                list.push(InfoHash(id20_node(node, "info_hash")?));
            }
            ScrapeHashes::Many(list)
        }
    };
    fields.check_duplicates()?;
    Ok(ScrapeRequest { info_hashes })
}

const S_ACTION: usize = 0;
const S_INFO_HASH: usize = 1;
const S_PEER_ID: usize = 2;
const S_OFFER_ID: usize = 3;
const S_OFFER: usize = 4;
const S_ANSWER: usize = 5;
const S_COMPLETE: usize = 6;
const S_INCOMPLETE: usize = 7;
const S_INTERVAL: usize = 8;
const S_FILES: usize = 9;
const S_FLAGS: usize = 10;
const S_FAILURE: usize = 11;
const SERVER_KEYS: [&str; 12] = [
    "action",
    "info_hash",
    "peer_id",
    "offer_id",
    "offer",
    "answer",
    "complete",
    "incomplete",
    "interval",
    "files",
    "flags",
    "failure reason",
];

fn parse_server<'t>(
    nodes: &'t [Node<'t>],
    limits: &Limits,
) -> Result<ServerMessage<'t>, DecodeError> {
    let fields = Fields::collect(nodes, None, 0, &SERVER_KEYS)?;
    fields.check_duplicates()?;

    if let Some(reason) = fields.str(S_FAILURE, "failure reason")? {
        // A client reads what it can of a failure: an odd action is simply not routed.
        let action = fields
            .str(S_ACTION, "action")?
            .and_then(|s| parse_action(s).ok());
        return Ok(ServerMessage::Error(ErrorResponse {
            failure_reason: reason.into(),
            action,
            info_hash: fields.id20(S_INFO_HASH, "info_hash")?.map(InfoHash),
        }));
    }

    let action = fields
        .str(S_ACTION, "action")?
        .ok_or(DecodeError::MissingField("action"))?;
    match parse_action(action)? {
        Action::Announce => {
            let info_hash = InfoHash(fields.required_id20(S_INFO_HASH, "info_hash")?);
            if let Some(offer) = fields.opaque(S_OFFER, "offer", limits)? {
                return Ok(ServerMessage::Offer(OfferMessage {
                    info_hash,
                    peer_id: PeerId(fields.required_id20(S_PEER_ID, "peer_id")?),
                    offer_id: fields.offer_id(S_OFFER_ID)?,
                    offer,
                }));
            }
            if let Some(answer) = fields.opaque(S_ANSWER, "answer", limits)? {
                return Ok(ServerMessage::Answer(AnswerMessage {
                    info_hash,
                    peer_id: PeerId(fields.required_id20(S_PEER_ID, "peer_id")?),
                    offer_id: fields.offer_id(S_OFFER_ID)?,
                    answer,
                }));
            }
            Ok(ServerMessage::Announce(AnnounceResponse {
                info_hash,
                complete: fields.count(S_COMPLETE, "complete")?,
                incomplete: fields.count(S_INCOMPLETE, "incomplete")?,
                interval: fields.count(S_INTERVAL, "interval")?,
            }))
        }
        Action::Scrape => parse_scrape_response(&fields, limits).map(ServerMessage::Scrape),
    }
}

fn parse_scrape_response(
    fields: &Fields<'_, 12>,
    limits: &Limits,
) -> Result<ScrapeResponse, DecodeError> {
    let mut response = ScrapeResponse::default();
    if let Some((i, node)) = fields.get(S_FILES) {
        let Node::Object { len, .. } = node else {
            return Err(DecodeError::WrongType {
                field: "files",
                expected: "an object",
            });
        };
        if *len > limits.max_scrape_hashes {
            return Err(DecodeError::TooMany {
                field: "files",
                limit: limits.max_scrape_hashes,
            });
        }
        let mut at = i + 1;
        for _ in 0..*len {
            let key = fields.nodes.get(at).ok_or(DecodeError::NotAnObject)?;
            let hash = InfoHash(id20_node(key, "files")?);
            let stats = Fields::collect(
                fields.nodes,
                None,
                at + 1,
                &["complete", "incomplete", "downloaded"],
            )
            .map_err(|_| DecodeError::WrongType {
                field: "files",
                expected: "an object of objects",
            })?;
            let count = |k, name| {
                Ok::<_, DecodeError>(stats.number(k, name)?.map_or(0, Number::saturating_u64))
            };
            response.files.push((
                hash,
                ScrapeStats {
                    complete: count(0, "complete")?,
                    incomplete: count(1, "incomplete")?,
                    downloaded: count(2, "downloaded")?,
                },
            ));
            at += 1 + value_len(fields.nodes.get(at + 1..).unwrap_or_default());
        }
    }
    if let Some((i, _)) = fields.get(S_FLAGS) {
        let flags =
            Fields::collect(fields.nodes, None, i, &["min_request_interval"]).map_err(|_| {
                DecodeError::WrongType {
                    field: "flags",
                    expected: "an object",
                }
            })?;
        response.min_request_interval = flags
            .number(0, "min_request_interval")?
            .map(Number::saturating_u64);
    }
    Ok(response)
}
