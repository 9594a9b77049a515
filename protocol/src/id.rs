//! Identifiers of the WebTorrent tracker protocol: 20-byte binary strings carried in JSON as
//! 20 code points U+0000..U+00FF ("latin1"), plus the looser `offer_id` that is only echoed.

use std::fmt;

use thiserror::Error;

/// Why a JSON string is not a valid 20-byte identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IdError {
    /// The string does not hold exactly 20 code points.
    #[error("must be 20 code points, got {0}")]
    Length(usize),
    /// A code point above U+00FF cannot stand for one byte.
    #[error("code point U+{0:04X} is above U+00FF")]
    CodePoint(u32),
    /// The JSON value is not a string at all.
    #[error("must be a string")]
    NotAString,
}

/// Decodes a latin1 JSON string (already unescaped) into 20 bytes.
///
/// ASCII-only strings (the common case for hex-like ids) take a byte-copy fast path.
pub(crate) fn decode_latin1_20(s: &str) -> Result<[u8; 20], IdError> {
    let mut out = [0u8; 20];
    if s.len() == 20 && s.is_ascii() {
        out.copy_from_slice(s.as_bytes());
        return Ok(out);
    }
    let mut n = 0usize;
    for c in s.chars() {
        let cp = c as u32;
        if cp > 0xFF {
            return Err(IdError::CodePoint(cp));
        }
        if n < 20 {
            out[n] = cp as u8;
        }
        n += 1;
    }
    if n != 20 {
        return Err(IdError::Length(n));
    }
    Ok(out)
}

macro_rules! bytes20_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; 20]);

        impl $name {
            /// Decodes the identifier from an unescaped JSON string of 20 code points ≤ U+00FF.
            pub fn from_latin1(s: &str) -> Result<Self, IdError> {
                decode_latin1_20(s).map(Self)
            }

            /// The raw 20 bytes.
            pub fn as_bytes(&self) -> &[u8; 20] {
                &self.0
            }

            /// Lower-case hex, as logs and access lists spell it.
            pub fn to_hex(&self) -> String {
                crate::id::to_hex(&self.0)
            }

            /// Parses 40 hex digits (either case).
            pub fn from_hex(hex: &str) -> Option<Self> {
                crate::id::from_hex(hex).map(Self)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.to_hex())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl From<[u8; 20]> for $name {
            fn from(bytes: [u8; 20]) -> Self {
                Self(bytes)
            }
        }
    };
}

bytes20_id!(
    /// A swarm's identity: the torrent's (or pool's) 20-byte info hash.
    InfoHash
);
bytes20_id!(
    /// A peer's self-chosen 20-byte identity within a swarm.
    PeerId
);

pub(crate) fn to_hex(bytes: &[u8; 20]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(40);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xF) as usize] as char);
    }
    s
}

pub(crate) fn from_hex(hex: &str) -> Option<[u8; 20]> {
    let hex = hex.as_bytes();
    if hex.len() != 40 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 20];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Longest `offer_id` accepted, in UTF-8 bytes.
///
/// Standard clients send 20 latin1 code points (at most 40 UTF-8 bytes); others send hex or
/// other shapes. The tracker only echoes this value, so anything up to this bound passes.
pub const MAX_OFFER_ID_BYTES: usize = 64;

/// An offer's identifier: echoed verbatim from the offer to the answer, never interpreted.
///
/// Stored inline (no heap allocation), so it crosses thread boundaries cheaply. Unlike
/// [`InfoHash`] and [`PeerId`] it is not held to 20 code points: strictness here broke real
/// clients in other trackers, and nothing is keyed on it except the offerer's own lookup.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OfferId {
    len: u8,
    buf: [u8; MAX_OFFER_ID_BYTES],
}

impl InfoHash {
    /// The swarm of a pool name: SHA-1 of its UTF-8 bytes, like a BitTorrent info hash. The
    /// node joins it and the tracker's `token issue --pool` grants it.
    pub fn of_pool(name: &str) -> Self {
        use sha1::Digest as _;
        Self(sha1::Sha1::digest(name.as_bytes()).into())
    }
}

impl OfferId {
    /// Wraps an unescaped JSON string; `None` when longer than [`MAX_OFFER_ID_BYTES`].
    pub fn new(s: &str) -> Option<Self> {
        if s.len() > MAX_OFFER_ID_BYTES {
            return None;
        }
        let mut buf = [0u8; MAX_OFFER_ID_BYTES];
        buf[..s.len()].copy_from_slice(s.as_bytes());
        Some(Self {
            len: s.len() as u8,
            buf,
        })
    }

    /// The standard form: 20 bytes as 20 latin1 code points.
    pub fn from_bytes20(bytes: &[u8; 20]) -> Self {
        let mut s = String::with_capacity(40);
        s.extend(bytes.iter().map(|&b| b as char));
        // 20 latin1 code points are at most 40 UTF-8 bytes: always within the bound.
        Self::new(&s).unwrap_or_else(|| unreachable!("40 bytes fit in {MAX_OFFER_ID_BYTES}"))
    }

    /// The identifier as the JSON string it came in (unescaped).
    pub fn as_str(&self) -> &str {
        // `buf[..len]` was copied from a `&str`, so it is valid UTF-8; the fallback is dead.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or_default()
    }

    /// The 20 bytes, when the identifier has the standard latin1 form.
    pub fn to_bytes20(&self) -> Option<[u8; 20]> {
        decode_latin1_20(self.as_str()).ok()
    }
}

impl fmt::Debug for OfferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_bytes20() {
            Some(bytes) => write!(f, "OfferId({})", to_hex(&bytes)),
            None => write!(f, "OfferId({:?})", self.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_value_decodes_from_its_code_point() {
        for chunk in (0u16..256).collect::<Vec<_>>().chunks(20) {
            let mut bytes = [0x41u8; 20];
            for (i, b) in chunk.iter().enumerate() {
                bytes[i] = *b as u8;
            }
            let s: String = bytes.iter().map(|&b| b as char).collect();
            assert_eq!(InfoHash::from_latin1(&s), Ok(InfoHash(bytes)));
        }
    }

    #[test]
    fn rejects_wrong_length_and_wide_code_points() {
        assert_eq!(PeerId::from_latin1("short"), Err(IdError::Length(5)));
        assert_eq!(
            PeerId::from_latin1(&"a".repeat(21)),
            Err(IdError::Length(21))
        );
        let wide = format!("{}\u{100}", "a".repeat(19));
        assert_eq!(PeerId::from_latin1(&wide), Err(IdError::CodePoint(0x100)));
        // 20 UTF-8 bytes that are fewer code points must not pass the ASCII fast path.
        let mixed = format!("{}é", "a".repeat(18));
        assert_eq!(mixed.len(), 20);
        assert_eq!(PeerId::from_latin1(&mixed), Err(IdError::Length(19)));
    }

    #[test]
    fn hex_round_trips() {
        let id = InfoHash([0xab; 20]);
        assert_eq!(InfoHash::from_hex(&id.to_hex()), Some(id));
        assert_eq!(InfoHash::from_hex("zz"), None);
        assert_eq!(InfoHash::from_hex(&"g".repeat(40)), None);
    }

    #[test]
    fn offer_id_keeps_any_string_within_bound() {
        let hex = "0123456789abcdef0123456789abcdef01234567";
        let id = OfferId::new(hex).expect("40 bytes fit");
        assert_eq!(id.as_str(), hex);
        assert_eq!(id.to_bytes20(), None);
        assert!(OfferId::new(&"x".repeat(MAX_OFFER_ID_BYTES + 1)).is_none());
        let std = OfferId::from_bytes20(&[0xff; 20]);
        assert_eq!(std.to_bytes20(), Some([0xff; 20]));
    }
}
