//! The binary format of what instances send each other on the bus: batches of requests (to a
//! shard's owner) and outputs (to a connection's instance), with a per-stream sequence so the
//! receiver counts what the bus lost. Anyone who can publish on the bus can send us bytes:
//! decoding checks every length against what is left, so it never panics or over-allocates.

use tidepool_protocol::tracker::{AnnounceEvent, ScrapeStats};
use tidepool_protocol::{InfoHash, OfferId, PeerId};

use super::InstanceId;
use crate::swarm::{Announce, AnswerPart, ConnId, FrameKind, Output, Request};

/// Bumped on any change to the format; other versions are refused and counted.
const VERSION: u8 = 1;
/// Bytes before the first item.
pub(crate) const HEADER_BYTES: usize = 1 + 8 + 4 + 8 + 8 + 4;

/// What one batch says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The sending instance.
    pub(crate) from: InstanceId,
    /// The sender's `cluster.shards`: a batch from an instance that splits the hash space
    /// otherwise is refused (its idea of who owns what differs from ours).
    pub(crate) shards: u32,
    /// 1 for the first batch the sender published to this receiver, then +1 each.
    pub(crate) seq: u64,
    /// Items the sender published to this receiver in earlier batches: a gap between this
    /// and what arrived is what the bus lost.
    pub(crate) sent_before: u64,
    /// Items in this batch.
    pub(crate) count: u32,
}

/// One forwarded message.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    /// A request from a connection on the sending instance, for a shard the receiver owns.
    Request(ConnId, Request),
    /// An output of the sender's swarm workers for a connection on the receiving instance.
    Output(ConnId, Output),
}

/// Why a batch was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    /// Shorter than its lengths say.
    #[error("truncated batch")]
    Truncated,
    /// Another format version.
    #[error("unknown batch version {0}")]
    Version(u8),
    /// A tag, event or kind byte out of range, or text that is not UTF-8.
    #[error("malformed batch")]
    Malformed,
}

/// Starts a batch in `buf` (cleared); items follow, and [`finish`] writes the count.
pub(crate) fn begin(buf: &mut Vec<u8>, from: InstanceId, shards: u32, seq: u64, sent_before: u64) {
    buf.clear();
    buf.push(VERSION);
    buf.extend_from_slice(&from.0.to_le_bytes());
    buf.extend_from_slice(&shards.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&sent_before.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
}

/// Writes the item count into a batch started with [`begin`].
pub(crate) fn finish(buf: &mut [u8], count: u32) {
    if let Some(slot) = buf.get_mut(HEADER_BYTES - 4..HEADER_BYTES) {
        slot.copy_from_slice(&count.to_le_bytes());
    }
}

fn conn(buf: &mut Vec<u8>, c: &ConnId) {
    buf.extend_from_slice(&c.instance.to_le_bytes());
    buf.extend_from_slice(&c.worker.to_le_bytes());
    buf.extend_from_slice(&c.slot.to_le_bytes());
    buf.extend_from_slice(&c.serial.to_le_bytes());
}

fn bytes(buf: &mut Vec<u8>, b: &[u8]) {
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

fn event_byte(e: AnnounceEvent) -> u8 {
    match e {
        AnnounceEvent::Started => 0,
        AnnounceEvent::Stopped => 1,
        AnnounceEvent::Completed => 2,
        AnnounceEvent::Update => 3,
        AnnounceEvent::Paused => 4,
        AnnounceEvent::None => 5,
    }
}

fn kind_byte(k: FrameKind) -> u8 {
    match k {
        FrameKind::AnnounceResponse => 0,
        FrameKind::Offer => 1,
        FrameKind::Answer => 2,
        FrameKind::Error => 3,
        FrameKind::Denied => 4,
    }
}

/// Appends one item to a batch.
pub(crate) fn push(buf: &mut Vec<u8>, item: &Item) {
    match item {
        Item::Request(c, request) => {
            buf.push(0);
            conn(buf, c);
            match request {
                Request::Announce(a) => {
                    buf.push(0);
                    buf.extend_from_slice(&a.info_hash.0);
                    buf.extend_from_slice(&a.peer_id.0);
                    buf.push(event_byte(a.event));
                    buf.push(u8::from(a.seeder));
                    match a.numwant {
                        Some(n) => {
                            buf.push(1);
                            buf.extend_from_slice(&n.to_le_bytes());
                        }
                        None => buf.push(0),
                    }
                    match &a.replaces {
                        Some(p) => {
                            buf.push(1);
                            buf.extend_from_slice(&p.0);
                        }
                        None => buf.push(0),
                    }
                    buf.extend_from_slice(&(a.offers.len() as u32).to_le_bytes());
                    for (id, offer) in &a.offers {
                        bytes(buf, id.as_str().as_bytes());
                        bytes(buf, offer.as_bytes());
                    }
                    match &a.answer {
                        Some(ans) => {
                            buf.push(1);
                            buf.extend_from_slice(&ans.to_peer_id.0);
                            bytes(buf, ans.offer_id.as_str().as_bytes());
                            bytes(buf, ans.answer.as_bytes());
                        }
                        None => buf.push(0),
                    }
                }
                Request::Scrape {
                    request_id,
                    info_hashes,
                } => {
                    buf.push(1);
                    buf.extend_from_slice(&request_id.to_le_bytes());
                    buf.extend_from_slice(&(info_hashes.len() as u32).to_le_bytes());
                    for h in info_hashes {
                        buf.extend_from_slice(&h.0);
                    }
                }
                Request::Closed { peers } => {
                    buf.push(2);
                    buf.extend_from_slice(&(peers.len() as u32).to_le_bytes());
                    for (h, p) in peers {
                        buf.extend_from_slice(&h.0);
                        buf.extend_from_slice(&p.0);
                    }
                }
            }
        }
        Item::Output(c, output) => {
            buf.push(1);
            conn(buf, c);
            match output {
                Output::Frame(kind, frame) => {
                    buf.push(0);
                    buf.push(kind_byte(*kind));
                    bytes(buf, frame);
                }
                Output::ScrapePart { request_id, files } => {
                    buf.push(1);
                    buf.extend_from_slice(&request_id.to_le_bytes());
                    buf.extend_from_slice(&(files.len() as u32).to_le_bytes());
                    for (h, s) in files {
                        buf.extend_from_slice(&h.0);
                        buf.extend_from_slice(&s.complete.to_le_bytes());
                        buf.extend_from_slice(&s.incomplete.to_le_bytes());
                        buf.extend_from_slice(&s.downloaded.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// Reads a batch: its header, then its items in order.
pub(crate) fn decode(data: &[u8]) -> Result<(Header, Vec<Item>), WireError> {
    let mut r = Reader(data);
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let header = Header {
        from: InstanceId(r.u64()?),
        shards: r.u32()?,
        seq: r.u64()?,
        sent_before: r.u64()?,
        count: r.u32()?,
    };
    // Every item takes at least 24 bytes: a count past that is a lie, refused before any
    // allocation is sized by it.
    let mut items = Vec::with_capacity((header.count as usize).min(r.0.len() / 24));
    for _ in 0..header.count {
        items.push(r.item()?);
    }
    if !r.0.is_empty() {
        return Err(WireError::Malformed);
    }
    Ok((header, items))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn flag(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed),
        }
    }

    /// A count of elements of at least `each` bytes, checked against what is left.
    fn count(&mut self, each: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(each) > self.0.len() {
            return Err(WireError::Truncated);
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn text(&mut self) -> Result<&'a str, WireError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| WireError::Malformed)
    }

    fn conn(&mut self) -> Result<ConnId, WireError> {
        Ok(ConnId {
            instance: self.u64()?,
            worker: self.u16()?,
            slot: self.u32()?,
            serial: self.u64()?,
        })
    }

    fn offer_id(&mut self) -> Result<OfferId, WireError> {
        OfferId::new(self.text()?).ok_or(WireError::Malformed)
    }

    fn item(&mut self) -> Result<Item, WireError> {
        let tag = self.u8()?;
        let c = self.conn()?;
        match (tag, self.u8()?) {
            (0, 0) => {
                let info_hash = InfoHash(self.array()?);
                let peer_id = PeerId(self.array()?);
                let event = match self.u8()? {
                    0 => AnnounceEvent::Started,
                    1 => AnnounceEvent::Stopped,
                    2 => AnnounceEvent::Completed,
                    3 => AnnounceEvent::Update,
                    4 => AnnounceEvent::Paused,
                    5 => AnnounceEvent::None,
                    _ => return Err(WireError::Malformed),
                };
                let seeder = self.flag()?;
                let numwant = if self.flag()? {
                    Some(self.u32()?)
                } else {
                    None
                };
                let replaces = if self.flag()? {
                    Some(PeerId(self.array()?))
                } else {
                    None
                };
                let n = self.count(8)?;
                let mut offers = Vec::with_capacity(n);
                for _ in 0..n {
                    offers.push((self.offer_id()?, self.text()?.into()));
                }
                let answer = if self.flag()? {
                    Some(AnswerPart {
                        to_peer_id: PeerId(self.array()?),
                        offer_id: self.offer_id()?,
                        answer: self.text()?.into(),
                    })
                } else {
                    None
                };
                let a = Announce {
                    info_hash,
                    peer_id,
                    event,
                    numwant,
                    seeder,
                    offers,
                    answer,
                    replaces,
                };
                Ok(Item::Request(c, Request::Announce(a)))
            }
            (0, 1) => {
                let request_id = self.u64()?;
                let n = self.count(20)?;
                let info_hashes = (0..n)
                    .map(|_| self.array().map(InfoHash))
                    .collect::<Result<_, _>>()?;
                Ok(Item::Request(
                    c,
                    Request::Scrape {
                        request_id,
                        info_hashes,
                    },
                ))
            }
            (0, 2) => {
                let n = self.count(40)?;
                let peers = (0..n)
                    .map(|_| Ok((InfoHash(self.array()?), PeerId(self.array()?))))
                    .collect::<Result<_, WireError>>()?;
                Ok(Item::Request(c, Request::Closed { peers }))
            }
            (1, 0) => {
                let kind = match self.u8()? {
                    0 => FrameKind::AnnounceResponse,
                    1 => FrameKind::Offer,
                    2 => FrameKind::Answer,
                    3 => FrameKind::Error,
                    4 => FrameKind::Denied,
                    _ => return Err(WireError::Malformed),
                };
                // Frames go to clients as text frames unchecked: they must be UTF-8.
                let frame = self.text()?.as_bytes().to_vec();
                Ok(Item::Output(c, Output::Frame(kind, frame)))
            }
            (1, 1) => {
                let request_id = self.u64()?;
                let n = self.count(44)?;
                let files = (0..n)
                    .map(|_| {
                        Ok((
                            InfoHash(self.array()?),
                            ScrapeStats {
                                complete: self.u64()?,
                                incomplete: self.u64()?,
                                downloaded: self.u64()?,
                            },
                        ))
                    })
                    .collect::<Result<_, WireError>>()?;
                Ok(Item::Output(c, Output::ScrapePart { request_id, files }))
            }
            _ => Err(WireError::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Item> {
        let c = ConnId {
            instance: 0xdead_beef,
            worker: 3,
            slot: 77,
            serial: 1 << 40,
        };
        let h = InfoHash([7; 20]);
        vec![
            Item::Request(
                c,
                Request::Announce(Announce {
                    info_hash: h,
                    peer_id: PeerId([1; 20]),
                    event: AnnounceEvent::Completed,
                    numwant: Some(5),
                    seeder: true,
                    offers: vec![(
                        OfferId::from_bytes20(&[0xff; 20]),
                        r#"{"type":"offer","sdp":"v=0 ü"}"#.into(),
                    )],
                    answer: Some(AnswerPart {
                        to_peer_id: PeerId([2; 20]),
                        offer_id: OfferId::new("short").expect("fits"),
                        answer: "{}".into(),
                    }),
                    replaces: Some(PeerId([9; 20])),
                }),
            ),
            Item::Request(
                c,
                Request::Scrape {
                    request_id: 12,
                    info_hashes: vec![h, InfoHash([8; 20])],
                },
            ),
            Item::Request(
                c,
                Request::Closed {
                    peers: vec![(h, PeerId([1; 20]))],
                },
            ),
            Item::Output(
                c,
                Output::Frame(FrameKind::Offer, b"{\"offer\":1}".to_vec()),
            ),
            Item::Output(
                c,
                Output::ScrapePart {
                    request_id: 12,
                    files: vec![(
                        h,
                        ScrapeStats {
                            complete: 1,
                            incomplete: 2,
                            downloaded: 3,
                        },
                    )],
                },
            ),
        ]
    }

    fn batch(items: &[Item]) -> Vec<u8> {
        let mut buf = Vec::new();
        begin(&mut buf, InstanceId(5), 1024, 9, 100);
        for item in items {
            push(&mut buf, item);
        }
        finish(&mut buf, items.len() as u32);
        buf
    }

    #[test]
    fn every_kind_of_item_comes_back_as_sent() {
        let items = sample();
        let (header, back) = decode(&batch(&items)).expect("decodes");
        assert_eq!(
            header,
            Header {
                from: InstanceId(5),
                shards: 1024,
                seq: 9,
                sent_before: 100,
                count: 5
            }
        );
        // Request has no PartialEq on purpose; compare the debug forms.
        assert_eq!(format!("{back:?}"), format!("{items:?}"));
    }

    #[test]
    fn every_truncation_and_a_lying_count_are_refused_without_panic() {
        let bytes = batch(&sample());
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut lying = bytes.clone();
        finish(&mut lying, u32::MAX);
        assert_eq!(decode(&lying).map(|_| ()), Err(WireError::Truncated));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing).map(|_| ()), Err(WireError::Malformed));
        let mut version = bytes;
        version[0] = 9;
        assert_eq!(decode(&version).map(|_| ()), Err(WireError::Version(9)));
    }

    #[test]
    fn a_frame_that_is_not_utf8_is_refused() {
        let c = ConnId {
            instance: 1,
            worker: 0,
            slot: 0,
            serial: 1,
        };
        let bytes = batch(&[Item::Output(
            c,
            Output::Frame(FrameKind::Offer, vec![0xff, 0xfe]),
        )]);
        assert_eq!(decode(&bytes).map(|_| ()), Err(WireError::Malformed));
    }
}
