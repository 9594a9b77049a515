//! The WebSocket layer (RFC 6455, server side), sans-IO: the upgrade request, frame headers,
//! unmasking in place, message assembly, and the frames the tracker writes. Bytes in, frames
//! out; the socket, TLS and buffers are `link`'s.
//!
//! Why not tungstenite: it zeroes its read chunk before every read (~15% of the tracker's
//! instructions), validates text frames' UTF-8 where the caller validates again, and holds a
//! read buffer for every idle connection. Here a frame is parsed where it was read, and a
//! connection holds no buffer between frames (see `benchmarks/RESULTS.md`).

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Largest upgrade request head accepted (browsers send well under 2 KiB).
pub(crate) const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Headers in the upgrade request.
const MAX_HEADERS: usize = 48;

pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// Close codes the tracker sends (RFC 6455 §7.4.1).
pub(crate) mod close_code {
    pub(crate) const AWAY: u16 = 1001;
    pub(crate) const PROTOCOL: u16 = 1002;
    pub(crate) const UNSUPPORTED: u16 = 1003;
    pub(crate) const INVALID: u16 = 1007;
    pub(crate) const POLICY: u16 = 1008;
    pub(crate) const SIZE: u16 = 1009;
}

/// A client's upgrade request, accepted.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Upgrade {
    /// The `Sec-WebSocket-Accept` value for the response.
    pub(crate) accept: String,
    /// `X-Forwarded-For` and `X-Real-IP`, for connections from trusted proxies.
    pub(crate) forwarded_for: Option<String>,
    pub(crate) real_ip: Option<String>,
    /// A bearer token from the URL's `token` query parameter or `Authorization: Bearer`.
    /// Never logged.
    pub(crate) token: Option<String>,
}

impl Upgrade {
    /// The 101 response.
    pub(crate) fn response(&self) -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            self.accept
        )
    }
}

/// Why an upgrade request was refused: an HTTP status and a line for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) reason: &'static str,
}

impl Refusal {
    const fn bad(reason: &'static str) -> Self {
        Self {
            status: 400,
            reason,
        }
    }

    /// The HTTP response that tells the client (then the connection closes).
    pub(crate) fn response(&self) -> String {
        let (text, extra) = match self.status {
            426 => ("Upgrade Required", "Sec-WebSocket-Version: 13\r\n"),
            401 => ("Unauthorized", "WWW-Authenticate: Bearer\r\n"),
            429 => ("Too Many Requests", "Retry-After: 5\r\n"),
            431 => ("Request Header Fields Too Large", ""),
            _ => ("Bad Request", ""),
        };
        format!(
            "HTTP/1.1 {} {text}\r\n{extra}Connection: close\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\n\r\n{}\n",
            self.status,
            self.reason.len() + 1,
            self.reason
        )
    }
}

/// Parses the upgrade request at the start of `buf`: `Ok(None)` while its head is incomplete,
/// else the bytes it took and what it asked for. `forwarded`: capture the proxy headers.
pub(crate) fn parse_upgrade(
    buf: &[u8],
    forwarded: bool,
) -> Result<Option<(usize, Upgrade)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_REQUEST_HEAD => {
            return Err(Refusal {
                status: 431,
                reason: "request head too large",
            });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal {
                status: 431,
                reason: "too many headers",
            });
        }
        Err(_) => return Err(Refusal::bad("malformed HTTP request")),
    };
    if used > MAX_REQUEST_HEAD {
        return Err(Refusal {
            status: 431,
            reason: "request head too large",
        });
    }
    if req.method != Some("GET") {
        return Err(Refusal::bad("a WebSocket upgrade is a GET"));
    }
    if req.version != Some(1) {
        return Err(Refusal::bad("a WebSocket upgrade needs HTTP/1.1"));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("upgrade", "websocket") {
        return Err(Refusal::bad(
            "this is a WebSocket tracker: Upgrade: websocket expected",
        ));
    }
    if !has_token("connection", "upgrade") {
        return Err(Refusal::bad("Connection: Upgrade expected"));
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Refusal {
            status: 426,
            reason: "WebSocket version 13 only",
        });
    }
    let Some(key) = header("sec-websocket-key").map(str::trim) else {
        return Err(Refusal::bad("Sec-WebSocket-Key missing"));
    };
    // A key is 16 random bytes, base64: 24 characters.
    if key.is_empty() || key.len() > 64 {
        return Err(Refusal::bad("Sec-WebSocket-Key malformed"));
    }
    let (forwarded_for, real_ip) = if forwarded {
        (
            header("x-forwarded-for").map(str::to_owned),
            header("x-real-ip").map(str::to_owned),
        )
    } else {
        (None, None)
    };
    let token = header("authorization")
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .or_else(|| query_param(req.path.unwrap_or_default(), "token"))
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    Ok(Some((
        used,
        Upgrade {
            accept: accept_key(key.as_bytes()),
            forwarded_for,
            real_ip,
            token,
        },
    )))
}

/// The value of `name` in a request target's query (`/path?a=1&token=…`), undecoded: tokens
/// are JWTs, whose characters need no escaping in a URL.
fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = target.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub(crate) fn accept_key(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A protocol violation: the connection is closed with `code` after telling the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Violation {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
}

const fn violation(reason: &'static str) -> Violation {
    Violation {
        code: close_code::PROTOCOL,
        reason,
    }
}

/// Size limits for what a client sends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_frame: usize,
    pub(crate) max_message: usize,
    /// Binary messages are accepted (else refused with 1003 from their first header).
    pub(crate) binary: bool,
}

/// A frame decoded from the buffer; ranges index the buffer passed to [`Assembler::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A whole text message in one frame (its UTF-8 is the caller's to check, once).
    Text(std::ops::Range<usize>),
    /// A whole binary message in one frame.
    Binary(std::ops::Range<usize>),
    /// A fragmented message is complete: [`Assembler::take_message`] has it.
    Assembled {
        text: bool,
    },
    /// A fragment was added to a message still open.
    Fragment,
    Ping(std::ops::Range<usize>),
    Pong,
    /// A close frame, with its code if it had one (already checked).
    Close(Option<u16>),
}

/// One connection's receiving side: the message being reassembled from fragments (held only
/// while one is open, at most `max_message` bytes).
#[derive(Debug, Default)]
pub(crate) struct Assembler {
    partial: Option<Partial>,
    done: Vec<u8>,
}

#[derive(Debug)]
struct Partial {
    text: bool,
    data: Vec<u8>,
    /// Bytes of a text message known to be valid UTF-8 so far: invalid text fails at the
    /// fragment that breaks it, not at the end (a code point may span fragments).
    checked: usize,
}

impl Partial {
    fn append(&mut self, payload: &[u8]) -> Result<(), Violation> {
        self.data.extend_from_slice(payload);
        if !self.text {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            // Only cut short at the end: the rest of the code point may follow.
            Err(e) if e.error_len().is_none() => self.checked += e.valid_up_to(),
            Err(_) => {
                return Err(Violation {
                    code: close_code::INVALID,
                    reason: "invalid UTF-8",
                });
            }
        }
        Ok(())
    }
}

impl Assembler {
    /// Decodes the frame at the start of `buf` (unmasking it in place): `Ok(None)` until the
    /// whole frame is there, else the bytes it took and the frame. Over-size frames are
    /// refused from their header, before their payload is waited for.
    pub(crate) fn next(
        &mut self,
        buf: &mut [u8],
        limits: Limits,
    ) -> Result<Option<(usize, Frame)>, Violation> {
        let Some(&[b0, b1]) = buf.get(..2) else {
            return Ok(None);
        };
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        if b0 & 0x70 != 0 {
            return Err(violation("reserved bits set (no extension was agreed)"));
        }
        if b1 & 0x80 == 0 {
            return Err(violation("client frames must be masked"));
        }
        let control = opcode & 0x8 != 0;
        if !matches!(
            opcode,
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ) {
            return Err(violation("unknown opcode"));
        }
        if opcode == OP_BINARY && !limits.binary {
            return Err(Violation {
                code: close_code::UNSUPPORTED,
                reason: "binary frames are not supported",
            });
        }
        let (len, mut at) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(b);
                    let len = u64::from_be_bytes(w);
                    if len >> 63 != 0 {
                        return Err(violation("frame length has its top bit set"));
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        if control && (!fin || len > 125) {
            return Err(violation(
                "control frames are single frames of 125 bytes at most",
            ));
        }
        let too_large = Violation {
            code: close_code::SIZE,
            reason: "message too large",
        };
        let len = usize::try_from(len).map_err(|_| too_large)?;
        if len > limits.max_frame {
            return Err(too_large);
        }
        match (opcode, &self.partial) {
            (OP_CONTINUATION, None) => return Err(violation("continuation of no message")),
            (OP_TEXT | OP_BINARY, Some(_)) => {
                return Err(violation("new message inside a fragmented one"));
            }
            (OP_CONTINUATION, Some(p)) if p.data.len() + len > limits.max_message => {
                return Err(too_large);
            }
            (OP_TEXT | OP_BINARY, None) if len > limits.max_message => return Err(too_large),
            _ => {}
        }
        let Some(mask) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        let mask = [mask[0], mask[1], mask[2], mask[3]];
        at += 4;
        let Some(end) = at.checked_add(len) else {
            return Err(too_large);
        };
        let Some(payload) = buf.get_mut(at..end) else {
            return Ok(None);
        };
        unmask(payload, mask);
        let range = at..end;
        let frame = match opcode {
            OP_TEXT | OP_BINARY if fin => {
                if opcode == OP_TEXT {
                    Frame::Text(range)
                } else {
                    Frame::Binary(range)
                }
            }
            OP_TEXT | OP_BINARY => {
                let mut partial = Partial {
                    text: opcode == OP_TEXT,
                    data: Vec::new(),
                    checked: 0,
                };
                partial.append(payload)?;
                self.partial = Some(partial);
                Frame::Fragment
            }
            OP_CONTINUATION => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(violation("continuation of no message"));
                };
                partial.append(payload)?;
                if fin {
                    self.done = partial.data;
                    Frame::Assembled { text: partial.text }
                } else {
                    self.partial = Some(partial);
                    Frame::Fragment
                }
            }
            OP_CLOSE => Frame::Close(close_payload(payload)?),
            OP_PING => Frame::Ping(range),
            _ => Frame::Pong,
        };
        Ok(Some((end, frame)))
    }

    /// The message a [`Frame::Assembled`] completed.
    pub(crate) fn take_message(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.done)
    }

    /// Bytes held for a message still being reassembled.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.data.capacity()) + self.done.capacity()
    }
}

/// Checks a close frame's code and reason (RFC 6455 §5.5.1, §7.4).
fn close_payload(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(violation("close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(violation("invalid close code"));
            }
            if simdutf8::basic::from_utf8(reason).is_err() {
                return Err(Violation {
                    code: close_code::INVALID,
                    reason: "close reason is not UTF-8",
                });
            }
            Ok(Some(code))
        }
    }
}

/// XORs the client's mask into the payload, eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    // Whole 8-byte chunks keep the mask's phase: the rest starts at mask[0].
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Appends an unmasked frame (servers do not mask) with `payload`.
pub(crate) fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let len = payload.len();
    out.reserve(len + 10);
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame (the reason is cut to fit a control frame).
pub(crate) fn write_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    write_frame(out, OP_CLOSE, &payload[..2 + cut]);
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_frame: 1024,
        max_message: 2048,
        binary: true,
    };

    /// A client frame: masked with a fixed key.
    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![b0];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len < 65536 {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn one(buf: &mut [u8]) -> Result<Option<(usize, Frame)>, Violation> {
        Assembler::default().next(buf, LIMITS)
    }

    #[test]
    fn the_rfc_example_key_gets_the_rfc_accept_value() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrade_requests_are_parsed_and_incomplete_heads_wait() {
        let req = b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
            X-Forwarded-For: 203.0.113.9\r\n\r\n\x81";
        let head = req.len() - 1;
        for cut in [0, 10, head - 1] {
            assert_eq!(parse_upgrade(&req[..cut], false), Ok(None), "cut at {cut}");
        }
        let (used, up) = parse_upgrade(req, true).expect("valid").expect("complete");
        assert_eq!(
            used, head,
            "the frame byte after the head is left for the frame decoder"
        );
        assert_eq!(up.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(up.forwarded_for.as_deref(), Some("203.0.113.9"));
        let (_, up) = parse_upgrade(req, false).expect("valid").expect("complete");
        assert_eq!(
            up.forwarded_for, None,
            "headers are believed from trusted proxies only"
        );
    }

    #[test]
    fn tokens_come_from_the_query_or_a_bearer_header() {
        let head = |target: &str, extra: &str| {
            format!(
                "GET {target} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
            )
        };
        let token = |req: String| {
            parse_upgrade(req.as_bytes(), false)
                .expect("valid")
                .expect("complete")
                .1
                .token
        };
        assert_eq!(token(head("/", "")), None);
        assert_eq!(token(head("/?token=a.b.c", "")), Some("a.b.c".into()));
        assert_eq!(
            token(head("/announce?x=1&token=a.b.c&y", "")),
            Some("a.b.c".into())
        );
        assert_eq!(token(head("/?tokens=a.b.c", "")), None);
        assert_eq!(token(head("/?token=", "")), None);
        assert_eq!(
            token(head("/", "Authorization: Bearer  h.e.d \r\n")),
            Some("h.e.d".into())
        );
        assert_eq!(token(head("/", "Authorization: Basic eDp5\r\n")), None);
        // The header wins over the query.
        assert_eq!(
            token(head("/?token=q.q.q", "authorization: bearer h.h.h\r\n")),
            Some("h.h.h".into())
        );
    }

    #[test]
    fn plain_http_wrong_versions_and_huge_heads_are_refused_with_a_status() {
        let refused = |req: &[u8]| parse_upgrade(req, false).expect_err("refused").status;
        assert_eq!(refused(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"),
            400
        );
        assert_eq!(
            refused(
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                  Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: a\r\n\r\n"
            ),
            426
        );
        assert_eq!(
            refused(
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                  Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            400
        );
        assert_eq!(refused(b"\x16\x03\x01\x02\x00binary"), 400);
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST_HEAD + 10, b'a');
        assert_eq!(refused(&huge), 431);
        let many: String = (0..60).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            refused(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
        assert!(
            Refusal::bad("x")
                .response()
                .starts_with("HTTP/1.1 400 Bad Request\r\n")
        );
    }

    #[test]
    fn frames_decode_once_whole_and_unmask_in_place() {
        for len in [0usize, 1, 7, 8, 9, 125, 126, 1000] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut frame = client_frame(0x81, &payload);
            let total = frame.len();
            for cut in [1, 2, total / 2, total - 1] {
                assert_eq!(
                    one(&mut frame.clone()[..cut]),
                    Ok(None),
                    "len {len} cut {cut}"
                );
            }
            let (used, f) = one(&mut frame).expect("valid").expect("whole");
            assert_eq!(used, total);
            let Frame::Text(r) = f else {
                panic!("text expected, got {f:?}")
            };
            assert_eq!(&frame[r], &payload[..]);
        }
    }

    #[test]
    fn fragments_are_reassembled_and_control_frames_may_come_between() {
        let mut a = Assembler::default();
        let mut f1 = client_frame(0x01, b"hel");
        assert_eq!(
            a.next(&mut f1, LIMITS),
            Ok(Some((f1.len(), Frame::Fragment)))
        );
        let mut ping = client_frame(0x89, b"p");
        assert!(matches!(
            a.next(&mut ping, LIMITS),
            Ok(Some((_, Frame::Ping(_))))
        ));
        let mut f2 = client_frame(0x80, b"lo");
        assert_eq!(
            a.next(&mut f2, LIMITS),
            Ok(Some((f2.len(), Frame::Assembled { text: true })))
        );
        assert_eq!(a.take_message(), b"hello");
        // A code point split across fragments is fine; bytes that can never be UTF-8 fail at
        // the fragment that carries them.
        let euro = "€".as_bytes();
        a.next(&mut client_frame(0x01, &euro[..1]), LIMITS)
            .expect("first byte");
        let rest = a.next(&mut client_frame(0x80, &euro[1..]), LIMITS);
        assert!(matches!(
            rest,
            Ok(Some((_, Frame::Assembled { text: true })))
        ));
        assert_eq!(a.take_message(), euro);
        a.next(&mut client_frame(0x01, b"ok"), LIMITS)
            .expect("valid so far");
        let bad = a.next(&mut client_frame(0x00, &[0xC0, 0xAF]), LIMITS);
        assert_eq!(bad.expect_err("never UTF-8").code, 1007);
        assert_eq!(a.held(), 0, "nothing is held once the message is taken");
    }

    #[test]
    fn unmasked_reserved_unknown_and_misused_frames_are_protocol_violations() {
        let code = |buf: &mut [u8]| one(buf).expect_err("violation").code;
        assert_eq!(code(&mut [0x81, 0x00]), 1002, "unmasked");
        assert_eq!(code(&mut client_frame(0xC1, b"x")), 1002, "RSV1 set");
        assert_eq!(code(&mut client_frame(0x83, b"x")), 1002, "opcode 3");
        assert_eq!(code(&mut client_frame(0x09, b"x")), 1002, "fragmented ping");
        assert_eq!(code(&mut client_frame(0x89, &[0; 126])), 1002, "long ping");
        assert_eq!(
            code(&mut client_frame(0x80, b"x")),
            1002,
            "lone continuation"
        );
        assert_eq!(code(&mut client_frame(0x88, &[3])), 1002, "one-byte close");
        assert_eq!(
            code(&mut client_frame(0x88, &[0x03, 0xEC])),
            1002,
            "close code 1004"
        );
        assert_eq!(code(&mut client_frame(0x88, &[0x03, 0xE8, 0xFF])), 1007);
        let text_only = Limits {
            binary: false,
            ..LIMITS
        };
        let mut header = client_frame(0x02, &[0; 600]);
        header.truncate(4);
        let refused = Assembler::default().next(&mut header, text_only);
        assert_eq!(
            refused.expect_err("binary").code,
            1003,
            "refused from its header"
        );
        let mut a = Assembler::default();
        a.next(&mut client_frame(0x01, b"a"), LIMITS)
            .expect("fragment");
        assert_eq!(
            a.next(&mut client_frame(0x81, b"b"), LIMITS)
                .expect_err("nested")
                .code,
            1002
        );
    }

    #[test]
    fn oversized_frames_are_refused_from_their_header_alone() {
        // Only the header of a 1 MiB frame has arrived: refused before waiting for the rest.
        let mut header = client_frame(0x82, &vec![0; 1 << 20]);
        header.truncate(14);
        assert_eq!(one(&mut header).expect_err("too large").code, 1009);
        let mut huge = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(one(&mut huge).expect_err("top bit").code, 1002);
        // Fragments may not add up past the message limit either.
        let mut a = Assembler::default();
        let part = vec![b'x'; 1000];
        a.next(&mut client_frame(0x01, &part), LIMITS).expect("1");
        a.next(&mut client_frame(0x00, &part), LIMITS).expect("2");
        let third = a.next(&mut client_frame(0x80, &part), LIMITS);
        assert_eq!(third.expect_err("over the message limit").code, 1009);
    }

    #[test]
    fn written_frames_use_the_shortest_length_and_close_reasons_fit() {
        for (len, header) in [(5usize, 2usize), (126, 4), (70_000, 10)] {
            let mut out = Vec::new();
            write_frame(&mut out, OP_TEXT, &vec![b'a'; len]);
            assert_eq!(out.len(), header + len);
            assert_eq!(out[0], 0x81);
        }
        let mut out = Vec::new();
        write_close(&mut out, close_code::POLICY, &"é".repeat(100));
        assert!(
            out.len() <= 127,
            "a control frame carries 125 bytes at most"
        );
        assert!(
            std::str::from_utf8(&out[4..]).is_ok(),
            "cut on a character boundary"
        );
    }
}
