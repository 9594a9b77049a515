//! Low-level JSON plumbing: escaping writers into a reused `Vec<u8>`, and walking simd-json tapes.

use simd_json::{Node, StaticNode};

/// A JSON number as the peer sent it: integers keep full precision, the rest is a float.
///
/// Clients send byte counts as `-1`, as huge values beyond `u64` (which parse as floats), and
/// as ordinary integers; all are accepted and round-trip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// A non-negative integer.
    UInt(u64),
    /// A negative integer.
    Int(i64),
    /// Anything with a fraction, an exponent, or beyond the 64-bit integer range.
    Float(f64),
}

impl Number {
    /// True for `0`, `-0`, `0.0`: a peer with `left == 0` is a seeder.
    pub fn is_zero(self) -> bool {
        match self {
            Number::UInt(v) => v == 0,
            Number::Int(v) => v == 0,
            Number::Float(v) => v == 0.0,
        }
    }

    /// The value as a count, saturating: negatives and NaN become 0, floats are truncated.
    pub fn saturating_u64(self) -> u64 {
        match self {
            Number::UInt(v) => v,
            Number::Int(_) => 0,
            // `as` saturates and maps NaN to 0, which is exactly the policy wanted here.
            Number::Float(v) => v as u64,
        }
    }
}

impl From<u64> for Number {
    fn from(v: u64) -> Self {
        Number::UInt(v)
    }
}

impl From<i64> for Number {
    fn from(v: i64) -> Self {
        if v >= 0 {
            Number::UInt(v as u64)
        } else {
            Number::Int(v)
        }
    }
}

/// Bytes that JSON strings must escape: control characters, `"` and `\`.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = true;
        i += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Appends `s` as a JSON string literal, escaping what JSON requires (the way
/// `JSON.stringify` does, so output matches what the reference implementation sends).
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Skip 8 clean bytes at a time (SDP is mostly long runs between `\r\n`s).
        if let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            if !word_needs_escape(word) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        if NEEDS_ESCAPE[b as usize] {
            out.extend_from_slice(&bytes[start..i]);
            let (esc, len) = escape(b);
            out.extend_from_slice(&esc[..len]);
            start = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// True when any byte of `w` is a control character, `"` or `\\` (SWAR bit tricks:
/// `(x - 0x01..) & !x & 0x80..` is non-zero iff some byte of `x` is zero, and with `0x20..`
/// iff some byte is below 0x20).
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w;
    let quote = (w ^ (ONES * b'"' as u64)).wrapping_sub(ONES) & !(w ^ (ONES * b'"' as u64));
    let backslash = (w ^ (ONES * b'\\' as u64)).wrapping_sub(ONES) & !(w ^ (ONES * b'\\' as u64));
    (below_space | quote | backslash) & HIGHS != 0
}

/// Appends 20 bytes as a JSON string of 20 code points U+0000..U+00FF.
pub(crate) fn write_latin1(out: &mut Vec<u8>, bytes: &[u8; 20]) {
    // Printable ASCII (typical of peer ids like "-WW0200-...") is copied in one go.
    if bytes
        .iter()
        .all(|&b| (0x20..0x80).contains(&b) && !NEEDS_ESCAPE[b as usize])
    {
        out.reserve(22);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    // Worst case 6 bytes per byte (`\u00XX`), plus quotes; build on the stack, copy once.
    let mut buf = [0u8; 20 * 6 + 2];
    let mut n = 0;
    buf[n] = b'"';
    n += 1;
    for &b in bytes {
        match b {
            0x80..=0xFF => {
                // Two-byte UTF-8 encoding of U+0080..U+00FF.
                buf[n] = 0xC0 | (b >> 6);
                buf[n + 1] = 0x80 | (b & 0x3F);
                n += 2;
            }
            _ if NEEDS_ESCAPE[b as usize] => {
                let (esc, len) = escape(b);
                buf[n..n + len].copy_from_slice(&esc[..len]);
                n += len;
            }
            _ => {
                buf[n] = b;
                n += 1;
            }
        }
    }
    buf[n] = b'"';
    n += 1;
    out.extend_from_slice(&buf[..n]);
}

/// The JSON escape sequence for a byte that needs one, as `JSON.stringify` spells it.
fn escape(b: u8) -> ([u8; 6], usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let short = |c: u8| ([b'\\', c, 0, 0, 0, 0], 2);
    match b {
        b'"' => short(b'"'),
        b'\\' => short(b'\\'),
        b'\n' => short(b'n'),
        b'\r' => short(b'r'),
        b'\t' => short(b't'),
        0x08 => short(b'b'),
        0x0C => short(b'f'),
        _ => (
            [
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xF) as usize],
            ],
            6,
        ),
    }
}

pub(crate) fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

pub(crate) fn write_number(out: &mut Vec<u8>, n: Number) {
    match n {
        Number::UInt(v) => write_u64(out, v),
        Number::Int(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
        // JSON has no NaN or infinity; `JSON.stringify` writes them as null, and so do we.
        Number::Float(v) if !v.is_finite() => out.extend_from_slice(b"null"),
        Number::Float(v) => out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes()),
    }
}

/// Appends `"key":` (the key must not need escaping; all protocol keys are plain ASCII).
pub(crate) fn write_key(out: &mut Vec<u8>, key: &str) {
    debug_assert!(key.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'));
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Number of tape nodes taken by the value starting at `nodes[0]`.
pub(crate) fn value_len(nodes: &[Node<'_>]) -> usize {
    match nodes.first() {
        Some(Node::Object { count, .. }) | Some(Node::Array { count, .. }) => 1 + count,
        Some(_) => 1,
        None => 0,
    }
}

/// Writes the value starting at `nodes[0]` back out as JSON, returning the nodes consumed.
///
/// Recursion depth is bounded by the parser's depth limit, which the decoder sets.
pub(crate) fn write_tape_value(out: &mut Vec<u8>, nodes: &[Node<'_>]) -> usize {
    match nodes.first() {
        None => 0,
        Some(Node::String(s)) => {
            write_str(out, s);
            1
        }
        Some(Node::Static(s)) => {
            match *s {
                StaticNode::Null => out.extend_from_slice(b"null"),
                StaticNode::Bool(true) => out.extend_from_slice(b"true"),
                StaticNode::Bool(false) => out.extend_from_slice(b"false"),
                StaticNode::U64(v) => write_u64(out, v),
                StaticNode::I64(v) => write_number(out, Number::from(v)),
                StaticNode::F64(v) => write_number(out, Number::Float(v)),
            }
            1
        }
        Some(Node::Array { len, count }) => {
            out.push(b'[');
            let mut i = 1;
            for n in 0..*len {
                if n > 0 {
                    out.push(b',');
                }
                i += write_tape_value(out, &nodes[i..]);
            }
            out.push(b']');
            debug_assert_eq!(i, count + 1);
            i
        }
        Some(Node::Object { len, count }) => {
            out.push(b'{');
            let mut i = 1;
            for n in 0..*len {
                if n > 0 {
                    out.push(b',');
                }
                if let Some(Node::String(key)) = nodes.get(i) {
                    write_str(out, key);
                }
                out.push(b':');
                i += 1;
                i += write_tape_value(out, &nodes[i..]);
            }
            out.push(b'}');
            debug_assert_eq!(i, count + 1);
            i
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_string(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).expect("writers emit UTF-8")
    }

    #[test]
    fn escapes_like_json_stringify() {
        let s = to_string(|o| write_str(o, "a\"b\\c\n\r\t\u{8}\u{c}\u{1}\u{1f}é€"));
        assert_eq!(s, r#""a\"b\\c\n\r\t\b\f\u0001\u001fé€""#);
    }

    #[test]
    fn word_check_agrees_with_the_table_for_every_byte_in_every_lane() {
        for b in 0..=255u8 {
            for lane in 0..8 {
                let mut word = [b'a'; 8];
                word[lane] = b;
                let w = u64::from_le_bytes(word);
                assert_eq!(
                    word_needs_escape(w),
                    NEEDS_ESCAPE[b as usize],
                    "{b:#x} in lane {lane}"
                );
            }
        }
    }

    #[test]
    fn latin1_writes_one_code_point_per_byte() {
        let mut bytes = [b'a'; 20];
        bytes[0] = 0;
        bytes[1] = b'"';
        bytes[2] = 0xFF;
        bytes[3] = 0x80;
        let s = to_string(|o| write_latin1(o, &bytes));
        let back: String = serde_json::from_str(&s).expect("valid JSON string");
        let decoded: Vec<u8> = back.chars().map(|c| c as u32 as u8).collect();
        assert_eq!(decoded, bytes);
        assert_eq!(back.chars().count(), 20);
    }

    #[test]
    fn numbers_keep_their_kind() {
        assert_eq!(to_string(|o| write_number(o, Number::Int(-1))), "-1");
        assert_eq!(
            to_string(|o| write_number(o, Number::UInt(u64::MAX))),
            "18446744073709551615"
        );
        assert_eq!(
            to_string(|o| write_number(o, Number::Float(f64::NAN))),
            "null"
        );
        let f = to_string(|o| write_number(o, Number::Float(1.8446744073709552e19)));
        assert_eq!(f.parse::<f64>().ok(), Some(1.8446744073709552e19));
    }

    #[test]
    fn number_helpers() {
        assert!(Number::Float(-0.0).is_zero());
        assert!(!Number::Int(-1).is_zero());
        assert_eq!(Number::Int(-1).saturating_u64(), 0);
        assert_eq!(Number::Float(1e30).saturating_u64(), u64::MAX);
        assert_eq!(Number::from(-5i64), Number::Int(-5));
        assert_eq!(Number::from(5i64), Number::UInt(5));
    }
}
