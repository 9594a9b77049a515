//! Sets of chunk numbers as sorted, disjoint, non-adjacent half-open ranges: the unit of
//! requests, promises and chunks-missing reports. Set operations are linear merges; the
//! wire form is a count and delta-encoded varints, so a contiguous file of any size costs a
//! few bytes.

use std::fmt;
use std::ops::Range;

/// A set of chunk numbers.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ChunkRanges {
    /// Sorted, each non-empty, no two overlapping or touching.
    ranges: Vec<Range<u32>>,
}

/// Why encoded ranges were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangesError {
    /// The input ended inside the encoding.
    #[error("chunk ranges truncated")]
    Truncated,
    /// A varint longer than five bytes or over 32 bits.
    #[error("chunk ranges: varint overflows 32 bits")]
    Overflow,
    /// A varint with redundant trailing zero bytes (each value has one encoding).
    #[error("chunk ranges: varint not in its shortest form")]
    NonMinimal,
    /// More ranges than the caller allows.
    #[error("chunk ranges: {count} ranges, over the limit of {max}")]
    TooMany {
        /// Ranges announced.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// An empty range, or one touching or overlapping the previous one (non-canonical).
    #[error("chunk ranges: range {index} is empty or not after the previous one")]
    NotCanonical {
        /// Which range.
        index: u32,
    },
}

impl ChunkRanges {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every chunk in `range`.
    pub fn from_range(range: Range<u32>) -> Self {
        let mut s = Self::new();
        s.insert(range);
        s
    }

    /// Chunks `0..n`.
    pub fn full(n: u32) -> Self {
        Self::from_range(0..n)
    }

    /// The ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[Range<u32>] {
        &self.ranges
    }

    /// No chunk.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of chunks.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.end - r.start)).sum()
    }

    /// Whether `chunk` is in the set.
    pub fn contains(&self, chunk: u32) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= chunk);
        self.ranges.get(i).is_some_and(|r| r.start <= chunk)
    }

    /// Whether every chunk of `other` is in the set.
    pub fn contains_all(&self, other: &ChunkRanges) -> bool {
        other.difference(self).is_empty()
    }

    /// The smallest chunk, if any.
    pub fn first(&self) -> Option<u32> {
        self.ranges.first().map(|r| r.start)
    }

    /// Every chunk, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(Clone::clone)
    }

    /// Adds `range`.
    pub fn insert(&mut self, range: Range<u32>) {
        if range.start < range.end {
            *self = self.union(&ChunkRanges {
                ranges: vec![range],
            });
        }
    }

    /// Removes `range`.
    pub fn remove(&mut self, range: Range<u32>) {
        if range.start < range.end {
            *self = self.difference(&ChunkRanges {
                ranges: vec![range],
            });
        }
    }

    /// The first `n` chunks of the set (all of it if it has fewer).
    pub fn take_first(&self, mut n: u64) -> ChunkRanges {
        let mut out = Vec::new();
        for r in &self.ranges {
            if n == 0 {
                break;
            }
            let len = u64::from(r.end - r.start);
            if len <= n {
                out.push(r.clone());
                n -= len;
            } else {
                out.push(r.start..r.start + n as u32);
                n = 0;
            }
        }
        ChunkRanges { ranges: out }
    }

    /// Chunks in either set.
    pub fn union(&self, other: &ChunkRanges) -> ChunkRanges {
        let mut out: Vec<Range<u32>> = Vec::with_capacity(self.ranges.len() + other.ranges.len());
        let (mut a, mut b) = (
            self.ranges.iter().peekable(),
            other.ranges.iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.start <= y.start => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            let Some(r) = next else { break };
            match out.last_mut() {
                // Touching ranges merge too, keeping the form canonical.
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r.clone()),
            }
        }
        ChunkRanges { ranges: out }
    }

    /// Chunks in both sets.
    pub fn intersection(&self, other: &ChunkRanges) -> ChunkRanges {
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = (&self.ranges[i], &other.ranges[j]);
            let start = a.start.max(b.start);
            let end = a.end.min(b.end);
            if start < end {
                out.push(start..end);
            }
            if a.end < b.end {
                i += 1;
            } else {
                j += 1;
            }
        }
        ChunkRanges { ranges: out }
    }

    /// Chunks in this set and not in `other`.
    pub fn difference(&self, other: &ChunkRanges) -> ChunkRanges {
        let mut out = Vec::new();
        let mut j = 0;
        for r in &self.ranges {
            let mut start = r.start;
            while j < other.ranges.len() && other.ranges[j].end <= start {
                j += 1;
            }
            let mut k = j;
            while k < other.ranges.len() && other.ranges[k].start < r.end {
                let cut = &other.ranges[k];
                if cut.start > start {
                    out.push(start..cut.start);
                }
                start = start.max(cut.end);
                k += 1;
            }
            if start < r.end {
                out.push(start..r.end);
            }
        }
        ChunkRanges { ranges: out }
    }

    /// Appends the wire form: varint count, then per range varint (start − previous end)
    /// and varint length.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_varint(out, self.ranges.len() as u32);
        let mut prev = 0;
        for r in &self.ranges {
            put_varint(out, r.start - prev);
            put_varint(out, r.end - r.start);
            prev = r.end;
        }
    }

    /// Reads the wire form from the front of `input`, allowing at most `max_ranges` ranges;
    /// returns the set and the bytes used. Only the canonical form is accepted, so a set has
    /// exactly one encoding.
    pub fn decode(input: &[u8], max_ranges: u32) -> Result<(ChunkRanges, usize), RangesError> {
        let mut at = 0;
        let count = get_varint(input, &mut at)?;
        if count > max_ranges {
            return Err(RangesError::TooMany {
                count,
                max: max_ranges,
            });
        }
        let mut ranges = Vec::with_capacity(count as usize);
        let mut prev: u32 = 0;
        for index in 0..count {
            let gap = get_varint(input, &mut at)?;
            let len = get_varint(input, &mut at)?;
            // After the first range a zero gap would touch the previous one.
            if len == 0 || (index > 0 && gap == 0) {
                return Err(RangesError::NotCanonical { index });
            }
            let start = prev.checked_add(gap).ok_or(RangesError::Overflow)?;
            let end = start.checked_add(len).ok_or(RangesError::Overflow)?;
            ranges.push(start..end);
            prev = end;
        }
        Ok((ChunkRanges { ranges }, at))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(input: &[u8], at: &mut usize) -> Result<u32, RangesError> {
    let mut v: u64 = 0;
    for shift in (0..35).step_by(7) {
        let b = *input.get(*at).ok_or(RangesError::Truncated)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b == 0 && shift > 0 {
            return Err(RangesError::NonMinimal);
        }
        if b & 0x80 == 0 {
            return u32::try_from(v).map_err(|_| RangesError::Overflow);
        }
    }
    Err(RangesError::Overflow)
}

impl fmt::Debug for ChunkRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, r) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}..{}", r.start, r.end)?;
        }
        f.write_str("}")
    }
}

impl FromIterator<u32> for ChunkRanges {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut chunks: Vec<u32> = iter.into_iter().collect();
        chunks.sort_unstable();
        chunks.dedup();
        let mut ranges: Vec<Range<u32>> = Vec::new();
        for c in chunks {
            match ranges.last_mut() {
                Some(last) if last.end == c => last.end = c + 1,
                _ => ranges.push(c..c.saturating_add(1)),
            }
        }
        // u32::MAX itself cannot be represented in a half-open range; it is dropped.
        ranges.retain(|r| r.start < r.end);
        ChunkRanges { ranges }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_sets_encode_in_a_few_bytes_and_touching_ranges_merge() {
        let mut s = ChunkRanges::full(1 << 20);
        let mut buf = Vec::new();
        s.encode(&mut buf);
        assert_eq!(buf.len(), 5, "count, gap, 3-byte length");
        s.remove(10..20);
        s.insert(10..15);
        s.insert(15..20);
        assert_eq!(s, ChunkRanges::full(1 << 20));
        assert_eq!(
            format!("{:?}", ChunkRanges::from_iter([1, 2, 3, 7])),
            "{1..4, 7..8}"
        );
    }

    #[test]
    fn non_canonical_truncated_and_oversized_encodings_are_refused() {
        let decode = |b: &[u8]| ChunkRanges::decode(b, 4).map(|(s, _)| s);
        assert_eq!(decode(&[]), Err(RangesError::Truncated));
        assert_eq!(decode(&[1, 0]), Err(RangesError::Truncated));
        assert_eq!(
            decode(&[1, 0, 0]),
            Err(RangesError::NotCanonical { index: 0 })
        );
        assert_eq!(
            decode(&[2, 0, 1, 0, 1]),
            Err(RangesError::NotCanonical { index: 1 })
        );
        assert_eq!(decode(&[5]), Err(RangesError::TooMany { count: 5, max: 4 }));
        assert_eq!(
            decode(&[1, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(RangesError::Overflow)
        );
        assert_eq!(
            decode(&[1, 0xff, 0xff, 0xff, 0xff, 0x0f, 1]),
            Err(RangesError::Overflow),
            "start + len past u32::MAX"
        );
        assert_eq!(
            decode(&[2, 3, 2, 1, 4]),
            Ok(ChunkRanges::from_iter([3, 4, 6, 7, 8, 9]))
        );
    }
}
