//! The pool messages nodes exchange on data channels, binary and versioned: who offers
//! which file (gossiped through the mesh), requests with requested and promised chunk
//! ranges, chunks with their hash-tree proofs, chunks-missing reports, cancels, and a
//! source's word that it will not send some chunks of a request after all.
//!
//! Layout: `[version = 1][kind][fields…]`, integers little-endian, strings and lists
//! length-prefixed; every length is checked against [`PoolLimits`] before anything is
//! allocated, and trailing bytes are an error. A chunk's payload is a slice of the received
//! message, not a copy.

use bytes::Bytes;

use super::ranges::{ChunkRanges, RangesError};
use super::tree::{FileId, FileMeta, Hash};
use crate::id::PeerId;

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;

const OFFER: u8 = 1;
const RETRACT: u8 = 2;
const REQUEST: u8 = 3;
const CHUNK: u8 = 4;
const MISSING: u8 = 5;
const CANCEL: u8 = 6;
const UNAVAILABLE: u8 = 7;

/// Bounds on what a decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Longest file name, in bytes.
    pub max_name: usize,
    /// Most ranges in one chunk-range set.
    pub max_ranges: u32,
    /// Most hashes in a chunk proof (32 covers 2^32 chunks).
    pub max_proof: usize,
    /// Largest chunk payload.
    pub max_chunk: usize,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_name: 255,
            max_ranges: 4096,
            max_proof: 32,
            max_chunk: 256 * 1024,
        }
    }
}

/// One pool message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolMessage {
    /// `origin` holds (some of) a file; gossiped with `hops` left, de-duplicated by
    /// (origin, seq).
    FileOffer {
        /// The node that has the file.
        origin: PeerId,
        /// The origin's sequence number for its offers.
        seq: u64,
        /// How many more times it may be forwarded.
        hops: u8,
        /// What the file is (verified against its id by the receiver).
        meta: FileMeta,
        /// The chunks the origin holds.
        have: ChunkRanges,
    },
    /// `origin` no longer serves a file.
    FileRetract {
        /// The node that stopped serving.
        origin: PeerId,
        /// Its sequence number.
        seq: u64,
        /// Forwarding budget.
        hops: u8,
        /// The file.
        file_id: FileId,
    },
    /// Asks for chunks; forwarded toward holders with `hops_left`.
    FileRequest {
        /// Chosen by the requester; echoed in chunks and reports.
        request_id: u64,
        /// Who wants the chunks.
        requester: PeerId,
        /// The file.
        file_id: FileId,
        /// Chunks asked for and not yet promised by anyone on the path.
        requested: ChunkRanges,
        /// Chunks a node on the path promised to send itself.
        promised: ChunkRanges,
        /// Ask the origin directly (after repeated misses).
        from_origin: bool,
        /// Forwarding budget.
        hops_left: u8,
    },
    /// One chunk with its proof.
    Chunk {
        /// The file.
        file_id: FileId,
        /// The request it answers.
        request_id: u64,
        /// Chunk number.
        index: u32,
        /// Sibling hashes to the root.
        proof: Vec<Hash>,
        /// The bytes.
        data: Bytes,
    },
    /// These chunks of a request are still missing (sent by the requester to re-ask).
    ChunksMissing {
        /// The request.
        request_id: u64,
        /// The file.
        file_id: FileId,
        /// What is missing.
        missing: ChunkRanges,
    },
    /// Stop sending for this request.
    Cancel {
        /// The request.
        request_id: u64,
        /// The file.
        file_id: FileId,
    },
    /// Sent by a source: it will not send these chunks of a request (it lost them, or its
    /// path to them), so the requester asks elsewhere now rather than after a stall.
    Unavailable {
        /// The request.
        request_id: u64,
        /// The file.
        file_id: FileId,
        /// The chunks that will not come.
        chunks: ChunkRanges,
    },
}

/// Why a pool message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Empty message or the wrong version.
    #[error("pool message version {0:?} is not {VERSION}")]
    Version(Option<u8>),
    /// An unknown message kind.
    #[error("unknown pool message kind {0}")]
    Kind(u8),
    /// The message ended inside a field.
    #[error("pool message truncated in {0}")]
    Truncated(&'static str),
    /// Bytes after the last field.
    #[error("{0} trailing bytes after the pool message")]
    Trailing(usize),
    /// A length over its limit.
    #[error("{field} of {len} is over the limit of {max}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A file name that is not UTF-8.
    #[error("file name is not UTF-8")]
    Name,
    /// A bool byte other than 0 or 1.
    #[error("flag byte {0} is not 0 or 1")]
    Flag(u8),
    /// Bad chunk ranges.
    #[error(transparent)]
    Ranges(#[from] RangesError),
}

impl PoolMessage {
    /// Appends the encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        match self {
            PoolMessage::FileOffer {
                origin,
                seq,
                hops,
                meta,
                have,
            } => {
                out.push(OFFER);
                out.extend_from_slice(&origin.0);
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(*hops);
                out.extend_from_slice(&(meta.name.len() as u16).to_le_bytes());
                out.extend_from_slice(meta.name.as_bytes());
                out.extend_from_slice(&meta.size.to_le_bytes());
                out.extend_from_slice(&meta.chunk_size.to_le_bytes());
                out.extend_from_slice(&meta.root);
                have.encode(out);
            }
            PoolMessage::FileRetract {
                origin,
                seq,
                hops,
                file_id,
            } => {
                out.push(RETRACT);
                out.extend_from_slice(&origin.0);
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(*hops);
                out.extend_from_slice(&file_id.0);
            }
            PoolMessage::FileRequest {
                request_id,
                requester,
                file_id,
                requested,
                promised,
                from_origin,
                hops_left,
            } => {
                out.push(REQUEST);
                out.extend_from_slice(&request_id.to_le_bytes());
                out.extend_from_slice(&requester.0);
                out.extend_from_slice(&file_id.0);
                requested.encode(out);
                promised.encode(out);
                out.push(u8::from(*from_origin));
                out.push(*hops_left);
            }
            PoolMessage::Chunk {
                file_id,
                request_id,
                index,
                proof,
                data,
            } => {
                out.push(CHUNK);
                out.extend_from_slice(&file_id.0);
                out.extend_from_slice(&request_id.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
                out.push(proof.len() as u8);
                for h in proof {
                    out.extend_from_slice(h);
                }
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                out.extend_from_slice(data);
            }
            PoolMessage::ChunksMissing {
                request_id,
                file_id,
                missing,
            } => {
                out.push(MISSING);
                out.extend_from_slice(&request_id.to_le_bytes());
                out.extend_from_slice(&file_id.0);
                missing.encode(out);
            }
            PoolMessage::Cancel {
                request_id,
                file_id,
            } => {
                out.push(CANCEL);
                out.extend_from_slice(&request_id.to_le_bytes());
                out.extend_from_slice(&file_id.0);
            }
            PoolMessage::Unavailable {
                request_id,
                file_id,
                chunks,
            } => {
                out.push(UNAVAILABLE);
                out.extend_from_slice(&request_id.to_le_bytes());
                out.extend_from_slice(&file_id.0);
                chunks.encode(out);
            }
        }
    }

    /// Decodes one message; a chunk's payload shares `msg`'s buffer.
    pub fn decode(msg: &Bytes, limits: &PoolLimits) -> Result<PoolMessage, PoolError> {
        let mut r = Reader { msg, at: 0 };
        let version = r.msg.first().copied();
        if version != Some(VERSION) {
            return Err(PoolError::Version(version));
        }
        r.at = 1;
        let kind = r.u8("kind")?;
        let m = match kind {
            OFFER => {
                let origin = PeerId(r.array("origin")?);
                let seq = r.u64("seq")?;
                let hops = r.u8("hops")?;
                let name_len = usize::from(r.u16("name length")?);
                if name_len > limits.max_name {
                    return Err(PoolError::TooLong {
                        field: "file name",
                        len: name_len,
                        max: limits.max_name,
                    });
                }
                let name = std::str::from_utf8(r.take(name_len, "name")?)
                    .map_err(|_| PoolError::Name)?
                    .to_owned();
                let size = r.u64("size")?;
                let chunk_size = r.u32("chunk size")?;
                let root = r.array("root")?;
                let have = r.ranges(limits)?;
                PoolMessage::FileOffer {
                    origin,
                    seq,
                    hops,
                    meta: FileMeta {
                        name,
                        size,
                        chunk_size,
                        root,
                    },
                    have,
                }
            }
            RETRACT => PoolMessage::FileRetract {
                origin: PeerId(r.array("origin")?),
                seq: r.u64("seq")?,
                hops: r.u8("hops")?,
                file_id: FileId(r.array("file id")?),
            },
            REQUEST => PoolMessage::FileRequest {
                request_id: r.u64("request id")?,
                requester: PeerId(r.array("requester")?),
                file_id: FileId(r.array("file id")?),
                requested: r.ranges(limits)?,
                promised: r.ranges(limits)?,
                from_origin: match r.u8("from_origin")? {
                    0 => false,
                    1 => true,
                    other => return Err(PoolError::Flag(other)),
                },
                hops_left: r.u8("hops")?,
            },
            CHUNK => {
                let file_id = FileId(r.array("file id")?);
                let request_id = r.u64("request id")?;
                let index = r.u32("index")?;
                let n = usize::from(r.u8("proof length")?);
                if n > limits.max_proof {
                    return Err(PoolError::TooLong {
                        field: "proof",
                        len: n,
                        max: limits.max_proof,
                    });
                }
                let mut proof = Vec::with_capacity(n);
                for _ in 0..n {
                    proof.push(r.array("proof")?);
                }
                let len = r.u32("data length")? as usize;
                if len > limits.max_chunk {
                    return Err(PoolError::TooLong {
                        field: "chunk",
                        len,
                        max: limits.max_chunk,
                    });
                }
                let start = r.at;
                r.take(len, "chunk data")?;
                PoolMessage::Chunk {
                    file_id,
                    request_id,
                    index,
                    proof,
                    data: msg.slice(start..start + len),
                }
            }
            MISSING => PoolMessage::ChunksMissing {
                request_id: r.u64("request id")?,
                file_id: FileId(r.array("file id")?),
                missing: r.ranges(limits)?,
            },
            CANCEL => PoolMessage::Cancel {
                request_id: r.u64("request id")?,
                file_id: FileId(r.array("file id")?),
            },
            UNAVAILABLE => PoolMessage::Unavailable {
                request_id: r.u64("request id")?,
                file_id: FileId(r.array("file id")?),
                chunks: r.ranges(limits)?,
            },
            other => return Err(PoolError::Kind(other)),
        };
        match msg.len() - r.at {
            0 => Ok(m),
            n => Err(PoolError::Trailing(n)),
        }
    }
}

struct Reader<'a> {
    msg: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], PoolError> {
        let end = self.at.checked_add(n).ok_or(PoolError::Truncated(what))?;
        let s = self
            .msg
            .get(self.at..end)
            .ok_or(PoolError::Truncated(what))?;
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], PoolError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, PoolError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, PoolError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, PoolError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, PoolError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn ranges(&mut self, limits: &PoolLimits) -> Result<ChunkRanges, PoolError> {
        let rest = self.msg.get(self.at..).unwrap_or_default();
        let (set, used) = ChunkRanges::decode(rest, limits.max_ranges)?;
        self.at += used;
        Ok(set)
    }
}
