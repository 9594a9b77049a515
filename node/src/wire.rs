//! The frame every library message carries on a data channel: a one-byte kind and a small
//! fixed header, then the payload. Sans-IO: encode into a buffer, decode from a slice.

use bytes::{BufMut, Bytes, BytesMut};

/// Header bytes in front of an application payload.
pub const DATA_HEADER: usize = 10;

const KIND_DATA: u8 = 0;
const KIND_RECEIPT: u8 = 1;
const KIND_PING: u8 = 2;
const KIND_PONG: u8 = 3;
const KIND_HELLO: u8 = 4;
const KIND_HELLO_ACK: u8 = 5;

/// Flags on a data frame.
pub mod flags {
    /// The sender wants a receipt when the frame reaches the peer's node.
    pub const WANT_RECEIVED: u8 = 1;
    /// The sender wants a receipt when the peer's application takes the message.
    pub const WANT_DELIVERED: u8 = 2;
    /// The last frame of a byte stream (its payload may be empty).
    pub const END_OF_STREAM: u8 = 4;
}

/// Which receipt a peer sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptKind {
    /// The peer's node took the message off the channel.
    Received,
    /// The peer's application took the message from its event stream.
    Delivered,
}

/// One decoded frame. `Data` borrows nothing: its payload is a cheap slice of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// An application message.
    Data {
        /// [`flags`] bits.
        flags: u8,
        /// Sender-chosen id, echoed in receipts.
        id: u64,
        /// The message.
        payload: Bytes,
    },
    /// A receipt for a data frame the peer sent us.
    Receipt {
        /// What happened to it.
        kind: ReceiptKind,
        /// The data frame's id.
        id: u64,
    },
    /// A heartbeat; answer with a pong carrying the same nonce.
    Ping(u64),
    /// The answer to a ping.
    Pong(u64),
    /// Sent on a channel until the peer's first frame arrives on it: proves the peer
    /// opened its end (data sent before that can be lost in the WebRTC stack).
    Hello,
    /// The answer to a hello.
    HelloAck,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the kind's header.
    #[error("frame of kind {kind} is {len} bytes, shorter than its header")]
    Short {
        /// The kind byte.
        kind: u8,
        /// The frame's length.
        len: usize,
    },
    /// The message was empty.
    #[error("empty frame")]
    Empty,
    /// An unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A receipt kind other than received (1) or delivered (2).
    #[error("unknown receipt kind {0}")]
    UnknownReceipt(u8),
}

/// Writes a data frame's header; the caller appends the payload.
pub fn data_header(out: &mut BytesMut, flags: u8, id: u64) {
    out.put_u8(KIND_DATA);
    out.put_u8(flags);
    out.put_u64_le(id);
}

/// A complete data frame.
pub fn data(flags: u8, id: u64, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(DATA_HEADER + payload.len());
    data_header(&mut out, flags, id);
    out.put_slice(payload);
    out
}

/// A receipt frame.
pub fn receipt(kind: ReceiptKind, id: u64) -> BytesMut {
    let mut out = BytesMut::with_capacity(10);
    out.put_u8(KIND_RECEIPT);
    out.put_u8(match kind {
        ReceiptKind::Received => 1,
        ReceiptKind::Delivered => 2,
    });
    out.put_u64_le(id);
    out
}

/// A ping (`pong == false`) or pong frame.
pub fn heartbeat(pong: bool, nonce: u64) -> BytesMut {
    let mut out = BytesMut::with_capacity(9);
    out.put_u8(if pong { KIND_PONG } else { KIND_PING });
    out.put_u64_le(nonce);
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// A hello (`ack == false`) or its answer.
pub fn hello(ack: bool) -> BytesMut {
    let mut out = BytesMut::with_capacity(1);
    out.put_u8(if ack { KIND_HELLO_ACK } else { KIND_HELLO });
    out
}

/// Decodes one message as received from a data channel.
pub fn decode(msg: Bytes) -> Result<Frame, FrameError> {
    let kind = *msg.first().ok_or(FrameError::Empty)?;
    let need = match kind {
        KIND_DATA | KIND_RECEIPT => 10,
        KIND_PING | KIND_PONG => 9,
        KIND_HELLO => return Ok(Frame::Hello),
        KIND_HELLO_ACK => return Ok(Frame::HelloAck),
        other => return Err(FrameError::UnknownKind(other)),
    };
    if msg.len() < need {
        return Err(FrameError::Short {
            kind,
            len: msg.len(),
        });
    }
    Ok(match kind {
        KIND_DATA => Frame::Data {
            flags: msg[1],
            id: u64_at(&msg, 2),
            payload: msg.slice(DATA_HEADER..),
        },
        KIND_RECEIPT => Frame::Receipt {
            kind: match msg[1] {
                1 => ReceiptKind::Received,
                2 => ReceiptKind::Delivered,
                other => return Err(FrameError::UnknownReceipt(other)),
            },
            id: u64_at(&msg, 2),
        },
        KIND_PING => Frame::Ping(u64_at(&msg, 1)),
        _ => Frame::Pong(u64_at(&msg, 1)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_kind_round_trips() {
        let d = data(flags::WANT_DELIVERED, 42, b"hello").freeze();
        assert_eq!(
            decode(d),
            Ok(Frame::Data {
                flags: flags::WANT_DELIVERED,
                id: 42,
                payload: Bytes::from_static(b"hello")
            })
        );
        let r = receipt(ReceiptKind::Received, 7).freeze();
        assert_eq!(
            decode(r),
            Ok(Frame::Receipt {
                kind: ReceiptKind::Received,
                id: 7
            })
        );
        assert_eq!(decode(heartbeat(false, 9).freeze()), Ok(Frame::Ping(9)));
        assert_eq!(decode(heartbeat(true, 9).freeze()), Ok(Frame::Pong(9)));
        assert_eq!(decode(hello(false).freeze()), Ok(Frame::Hello));
        assert_eq!(decode(hello(true).freeze()), Ok(Frame::HelloAck));
        let empty = data(0, 1, b"").freeze();
        assert!(matches!(decode(empty), Ok(Frame::Data { payload, .. }) if payload.is_empty()));
    }

    #[test]
    fn short_empty_and_unknown_frames_are_errors() {
        assert_eq!(decode(Bytes::new()), Err(FrameError::Empty));
        assert_eq!(
            decode(Bytes::from_static(&[0, 0, 1])),
            Err(FrameError::Short { kind: 0, len: 3 })
        );
        assert_eq!(
            decode(Bytes::from_static(&[2, 1])),
            Err(FrameError::Short { kind: 2, len: 2 })
        );
        assert_eq!(
            decode(Bytes::from_static(&[9])),
            Err(FrameError::UnknownKind(9))
        );
        let mut bad = receipt(ReceiptKind::Received, 1);
        bad[1] = 5;
        assert_eq!(decode(bad.freeze()), Err(FrameError::UnknownReceipt(5)));
    }
}
