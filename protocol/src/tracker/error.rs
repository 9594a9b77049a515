//! Typed decode errors, and the request error that keeps what could be read for the reply.

use simd_json::ErrorType;
use thiserror::Error;

use super::{Action, ErrorResponse};
use crate::id::{IdError, InfoHash};

/// Why a frame is not a valid tracker message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Not JSON at all, or truncated.
    #[error("invalid JSON: {0}")]
    Syntax(String),
    /// Not UTF-8 (WebSocket text frames must be).
    #[error("invalid UTF-8")]
    Utf8,
    /// Nested deeper than the decoder allows (depth bombs).
    #[error("JSON nested deeper than {0} levels")]
    TooDeep(usize),
    /// A number literal that no float can hold (such as `1e400`).
    #[error("number out of range")]
    BadNumber,
    /// The top level is an array, string or number.
    #[error("message must be a JSON object")]
    NotAnObject,
    /// A field the message kind needs is absent (or null).
    #[error("missing `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    #[error("`{field}` must be {expected}")]
    WrongType {
        /// The field's JSON key.
        field: &'static str,
        /// What it must be, in words.
        expected: &'static str,
    },
    /// An identifier is not 20 code points ≤ U+00FF.
    #[error("invalid `{field}`: {error}")]
    BadId {
        /// The field's JSON key.
        field: &'static str,
        /// What is wrong with it.
        error: IdError,
    },
    /// A known field appears twice; which one counts would be a guess, so neither does.
    #[error("duplicate `{0}`")]
    DuplicateField(&'static str),
    /// `action` is neither `announce` nor `scrape`.
    #[error("unknown action {0:?}")]
    UnknownAction(String),
    /// `event` is none of the announce events.
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
    /// A list holds more entries than allowed.
    #[error("too many entries in `{field}` (limit {limit})")]
    TooMany {
        /// The field's JSON key.
        field: &'static str,
        /// The limit that was exceeded.
        limit: usize,
    },
    /// A string or opaque object is larger than allowed.
    #[error("`{field}` is too large (limit {limit})")]
    TooLarge {
        /// The field's JSON key.
        field: &'static str,
        /// The limit that was exceeded (bytes, or JSON values for opaque objects).
        limit: usize,
    },
}

impl DecodeError {
    pub(crate) fn from_simd(err: &simd_json::Error, max_depth: usize) -> Self {
        match err.error() {
            ErrorType::DepthLimitExceeded => DecodeError::TooDeep(max_depth),
            ErrorType::InvalidNumber | ErrorType::InvalidExponent | ErrorType::Overflow => {
                DecodeError::BadNumber
            }
            ErrorType::InvalidUtf8 => DecodeError::Utf8,
            _ => DecodeError::Syntax(err.to_string()),
        }
    }

    /// Bounded copy of a peer-supplied string for an error message (never echo megabytes).
    pub(crate) fn quote(s: &str) -> String {
        const MAX: usize = 32;
        match s.char_indices().nth(MAX) {
            Some((end, _)) => format!("{}…", &s[..end]),
            None => s.to_owned(),
        }
    }
}

/// A client request that could not be decoded, with what could be read of it.
///
/// `action` and `info_hash` go back in the failure reply: without `action` the npm client
/// treats the reply as a socket error and reconnects after a long back-off.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{error}")]
pub struct RequestError {
    /// What was wrong.
    pub error: DecodeError,
    /// The request's action, when it was read.
    pub action: Option<Action>,
    /// The request's info hash, when it was read (single-hash requests only).
    pub info_hash: Option<InfoHash>,
}

impl RequestError {
    pub(crate) fn bare(error: DecodeError) -> Self {
        Self {
            error,
            action: None,
            info_hash: None,
        }
    }

    /// The failure reply to send back on the same connection.
    pub fn to_response(&self) -> ErrorResponse<'static> {
        ErrorResponse {
            failure_reason: self.error.to_string().into(),
            action: self.action,
            info_hash: self.info_hash,
        }
    }
}
