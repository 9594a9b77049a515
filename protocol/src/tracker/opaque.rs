//! Opaque JSON objects (offers and answers): forwarded as they came, never interpreted.

use std::fmt;

use simd_json::Node;

use crate::json::{write_key, write_str, write_tape_value};

/// An offer or answer object. The tracker forwards it without looking inside; real clients
/// send `{"type","sdp"}`, but their own tests send other shapes, so any object passes.
#[derive(Clone, Copy)]
pub enum OpaqueJson<'a> {
    /// Decoded from a frame: the object's parse-tape nodes, re-encoded on output.
    Tape(TapeJson<'a>),
    /// Built by a client: `{"type": kind, "sdp": sdp}`.
    Sdp {
        /// `"offer"` or `"answer"`.
        kind: &'a str,
        /// The session description.
        sdp: &'a str,
    },
    /// JSON text already encoded by [`OpaqueJson::encode`], written out verbatim. Lets a
    /// tracker encode an offer once and splice it into every copy it forwards.
    Encoded(&'a str),
}

/// One decoded JSON object: its parse-tape nodes and, when the decoder was given the
/// original frame ([`Decoder::decode_client_verbatim`](super::Decoder::decode_client_verbatim)),
/// its exact bytes there, which are then forwarded as they came instead of re-encoded.
#[derive(Clone, Copy)]
pub struct TapeJson<'a> {
    pub(crate) nodes: &'a [Node<'a>],
    pub(crate) raw: Option<&'a str>,
}

impl<'a> TapeJson<'a> {
    /// The object's text exactly as it appeared in the frame, when known.
    pub fn raw(&self) -> Option<&'a str> {
        self.raw
    }
}

impl<'a> OpaqueJson<'a> {
    /// Appends the object as JSON.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            OpaqueJson::Tape(TapeJson { raw: Some(raw), .. }) => {
                out.extend_from_slice(raw.as_bytes());
            }
            OpaqueJson::Tape(TapeJson { nodes, raw: None }) => {
                write_tape_value(out, nodes);
            }
            OpaqueJson::Sdp { kind, sdp } => {
                out.push(b'{');
                write_key(out, "type");
                write_str(out, kind);
                out.push(b',');
                write_key(out, "sdp");
                write_str(out, sdp);
                out.push(b'}');
            }
            OpaqueJson::Encoded(text) => out.extend_from_slice(text.as_bytes()),
        }
    }

    /// The object as a JSON string.
    pub fn to_json_string(&self) -> String {
        // The verbatim case (every offer and answer the tracker forwards) is a copy of text
        // already checked; only re-encoded objects go through the byte writers.
        if let OpaqueJson::Encoded(text)
        | OpaqueJson::Tape(TapeJson {
            raw: Some(text), ..
        }) = self
        {
            return (*text).to_owned();
        }
        let mut out = Vec::new();
        self.encode(&mut out);
        // Every writer above emits UTF-8 (tape strings and `Encoded` are `&str` already).
        String::from_utf8(out).unwrap_or_default()
    }

    /// The `sdp` string member, when there is one (what a WebRTC peer needs).
    pub fn sdp(&self) -> Option<&'a str> {
        self.string_member("sdp")
    }

    /// The `type` string member, when there is one.
    pub fn kind(&self) -> Option<&'a str> {
        self.string_member("type")
    }

    fn string_member(&self, name: &str) -> Option<&'a str> {
        match *self {
            OpaqueJson::Tape(TapeJson { nodes, .. }) => {
                let Some(Node::Object { len, .. }) = nodes.first() else {
                    return None;
                };
                let mut i = 1;
                for _ in 0..*len {
                    let key = nodes.get(i)?;
                    let value = nodes.get(i + 1)?;
                    if let (Node::String(k), Node::String(v)) = (key, value)
                        && *k == name
                    {
                        return Some(v);
                    }
                    i += 1 + crate::json::value_len(&nodes[i + 1..]);
                }
                None
            }
            OpaqueJson::Sdp { kind, sdp } => match name {
                "sdp" => Some(sdp),
                "type" => Some(kind),
                _ => None,
            },
            // Pre-encoded text is only ever spliced, never inspected.
            OpaqueJson::Encoded(_) => None,
        }
    }
}

impl fmt::Debug for OpaqueJson<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpaqueJson({})", self.to_json_string())
    }
}

impl fmt::Debug for TapeJson<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", OpaqueJson::Tape(*self))
    }
}

/// Semantic equality: two opaque objects are equal when they re-encode to the same JSON text
/// (so a verbatim copy with other whitespace or escapes equals its decoded form).
impl PartialEq for OpaqueJson<'_> {
    fn eq(&self, other: &Self) -> bool {
        fn normal(o: &OpaqueJson<'_>) -> String {
            match *o {
                OpaqueJson::Tape(TapeJson { nodes, .. }) => {
                    let mut out = Vec::new();
                    write_tape_value(&mut out, nodes);
                    String::from_utf8(out).unwrap_or_default()
                }
                other => other.to_json_string(),
            }
        }
        normal(self) == normal(other)
    }
}
