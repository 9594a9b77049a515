//! Content addressing: a file is cut into fixed-size chunks, each chunk hashed (BLAKE3, with
//! its index, so chunks cannot be swapped), the hashes combined into a binary tree whose root
//! goes into the file's metadata, and the metadata hashed into the file id. A chunk arrives
//! with the sibling hashes on its path to the root, so it is verified on its own, before it
//! is stored, relayed or counted.

use std::fmt;

/// A BLAKE3 digest.
pub type Hash = [u8; 32];

/// Domain separation: leaves, inner nodes and metadata never hash alike.
const LEAF: u8 = 0;
const NODE: u8 = 1;
const META: &[u8] = b"tidepool-file-v1";

/// A file's id: the hash of its metadata.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub Hash);

impl FileId {
    /// Lower-case hex, as the CLI prints it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(FileId(out))
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileId({})", &self.to_hex()[..16])
    }
}

/// Why a file's metadata or a chunk failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The metadata does not hash to the file id it came with.
    #[error("metadata does not match file id")]
    WrongFileId,
    /// The chunk index is past the end of the file.
    #[error("chunk {index} is past the file's {count} chunks")]
    NoSuchChunk {
        /// The index.
        index: u32,
        /// Chunks in the file.
        count: u32,
    },
    /// The chunk has the wrong length for its position.
    #[error("chunk {index} is {got} bytes, expected {want}")]
    WrongLength {
        /// The index.
        index: u32,
        /// Its length.
        got: usize,
        /// The length it must have.
        want: usize,
    },
    /// The proof has the wrong number of hashes for this position.
    #[error("proof for chunk {index} has {got} hashes, expected {want}")]
    WrongProofLength {
        /// The index.
        index: u32,
        /// Hashes given.
        got: usize,
        /// Hashes needed.
        want: usize,
    },
    /// The chunk and proof do not lead to the file's root.
    #[error("chunk {index} does not match the file's hash tree")]
    Mismatch {
        /// The index.
        index: u32,
    },
    /// Chunk size of zero, or a file with more than `u32::MAX` chunks.
    #[error("impossible file shape")]
    BadShape,
}

/// What a file is: travels with every offer of it and is verified against the file id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// A name for people (not trusted for paths).
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk_size: u32,
    /// Root of the chunk hash tree.
    pub root: Hash,
}

impl FileMeta {
    /// The id: BLAKE3 over a domain tag and every field.
    pub fn file_id(&self) -> FileId {
        let mut h = blake3::Hasher::new();
        h.update(META);
        h.update(&(self.name.len() as u64).to_le_bytes());
        h.update(self.name.as_bytes());
        h.update(&self.size.to_le_bytes());
        h.update(&self.chunk_size.to_le_bytes());
        h.update(&self.root);
        FileId(*h.finalize().as_bytes())
    }

    /// Number of chunks (an empty file has one empty chunk, so it has a root too).
    pub fn chunk_count(&self) -> Result<u32, VerifyError> {
        chunk_count(self.size, self.chunk_size)
    }

    /// Length of chunk `index`.
    pub fn chunk_len(&self, index: u32) -> Result<usize, VerifyError> {
        let count = self.chunk_count()?;
        if index >= count {
            return Err(VerifyError::NoSuchChunk { index, count });
        }
        let start = u64::from(index) * u64::from(self.chunk_size);
        Ok((self.size - start).min(u64::from(self.chunk_size)) as usize)
    }

    /// Checks `data` is chunk `index` of this file, using the sibling hashes in `proof`.
    pub fn verify_chunk(&self, index: u32, data: &[u8], proof: &[Hash]) -> Result<(), VerifyError> {
        let count = self.chunk_count()?;
        let want = self.chunk_len(index)?;
        if data.len() != want {
            return Err(VerifyError::WrongLength {
                index,
                got: data.len(),
                want,
            });
        }
        let need = proof_len(count, index);
        if proof.len() != need {
            return Err(VerifyError::WrongProofLength {
                index,
                got: proof.len(),
                want: need,
            });
        }
        let mut hash = leaf_hash(index, data);
        let (mut i, mut width) = (index, count);
        let mut siblings = proof.iter();
        while width > 1 {
            let sibling = i ^ 1;
            if sibling < width {
                let s = siblings.next().ok_or(VerifyError::Mismatch { index })?;
                hash = if i & 1 == 0 {
                    node_hash(&hash, s)
                } else {
                    node_hash(s, &hash)
                };
            }
            i /= 2;
            width = width.div_ceil(2);
        }
        if hash == self.root {
            Ok(())
        } else {
            Err(VerifyError::Mismatch { index })
        }
    }
}

fn chunk_count(size: u64, chunk_size: u32) -> Result<u32, VerifyError> {
    if chunk_size == 0 {
        return Err(VerifyError::BadShape);
    }
    let n = size.div_ceil(u64::from(chunk_size)).max(1);
    u32::try_from(n).map_err(|_| VerifyError::BadShape)
}

/// Hashes in the proof of chunk `index` of `count`: one per level where it has a sibling
/// (an odd node at the end of a level is carried up unpaired).
pub fn proof_len(count: u32, index: u32) -> usize {
    let (mut i, mut width, mut n) = (index, count, 0);
    while width > 1 {
        if i ^ 1 < width {
            n += 1;
        }
        i /= 2;
        width = width.div_ceil(2);
    }
    n
}

/// The leaf hash of chunk `index`.
pub fn leaf_hash(index: u32, data: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[LEAF]);
    h.update(&index.to_le_bytes());
    h.update(data);
    *h.finalize().as_bytes()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[NODE]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// Every level of a file's hash tree (leaves first), kept by whoever serves the file so it
/// can hand out proofs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashTree {
    levels: Vec<Vec<Hash>>,
}

impl HashTree {
    /// Builds the tree from the leaf hashes in chunk order (at least one).
    pub fn from_leaves(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![if leaves.is_empty() {
            vec![leaf_hash(0, &[])]
        } else {
            leaves
        }];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let up = below
                .chunks(2)
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    [single] => *single,
                    _ => unreachable!("chunks(2) yields one or two"),
                })
                .collect();
            levels.push(up);
        }
        Self { levels }
    }

    /// The tree of `data` cut into `chunk_size` pieces.
    pub fn from_bytes(data: &[u8], chunk_size: u32) -> Self {
        let leaves = if data.is_empty() {
            vec![leaf_hash(0, &[])]
        } else {
            data.chunks(chunk_size.max(1) as usize)
                .enumerate()
                .map(|(i, c)| leaf_hash(i as u32, c))
                .collect()
        };
        Self::from_leaves(leaves)
    }

    /// The root.
    pub fn root(&self) -> Hash {
        self.levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or_default()
    }

    /// Chunks covered.
    pub fn leaf_count(&self) -> u32 {
        self.levels.first().map_or(0, |l| l.len() as u32)
    }

    /// The sibling hashes on chunk `index`'s path to the root, bottom up.
    pub fn proof(&self, index: u32) -> Vec<Hash> {
        let mut out = Vec::new();
        let mut i = index as usize;
        for level in &self.levels[..self.levels.len().saturating_sub(1)] {
            if let Some(s) = level.get(i ^ 1) {
                out.push(*s);
            }
            i /= 2;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: usize, chunk: u32) -> (Vec<u8>, FileMeta, HashTree) {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let tree = HashTree::from_bytes(&data, chunk);
        let meta = FileMeta {
            name: "f".into(),
            size: len as u64,
            chunk_size: chunk,
            root: tree.root(),
        };
        (data, meta, tree)
    }

    #[test]
    fn every_chunk_verifies_with_its_proof_for_many_shapes() {
        for (len, chunk) in [(0, 4), (1, 4), (4, 4), (5, 4), (17, 4), (64, 8), (100, 7)] {
            let (data, meta, tree) = file(len, chunk);
            let count = meta.chunk_count().expect("shape");
            assert_eq!(tree.leaf_count(), count, "{len}/{chunk}");
            for i in 0..count {
                let start = i as usize * chunk as usize;
                let piece = &data[start.min(len)..(start + chunk as usize).min(len)];
                let proof = tree.proof(i);
                assert_eq!(proof.len(), proof_len(count, i));
                assert_eq!(
                    meta.verify_chunk(i, piece, &proof),
                    Ok(()),
                    "{len}/{chunk} #{i}"
                );
            }
        }
    }

    #[test]
    fn tampered_chunks_proofs_and_metadata_are_caught() {
        let (data, meta, tree) = file(100, 8);
        let proof = tree.proof(3);
        let mut bad = data[24..32].to_vec();
        bad[0] ^= 1;
        assert_eq!(
            meta.verify_chunk(3, &bad, &proof),
            Err(VerifyError::Mismatch { index: 3 })
        );
        // The right bytes at the wrong index: the index is part of the leaf hash.
        assert!(meta.verify_chunk(4, &data[24..32], &tree.proof(4)).is_err());
        let mut bad_proof = proof.clone();
        bad_proof[0][0] ^= 1;
        assert!(meta.verify_chunk(3, &data[24..32], &bad_proof).is_err());
        assert!(matches!(
            meta.verify_chunk(3, &data[24..32], &proof[1..]),
            Err(VerifyError::WrongProofLength { .. })
        ));
        assert!(matches!(
            meta.verify_chunk(12, &data[96..100], &tree.proof(12)),
            Ok(())
        ));
        assert!(matches!(
            meta.verify_chunk(12, &data[96..99], &tree.proof(12)),
            Err(VerifyError::WrongLength {
                want: 4,
                got: 3,
                ..
            })
        ));
        assert!(matches!(
            meta.verify_chunk(13, &[], &[]),
            Err(VerifyError::NoSuchChunk { .. })
        ));
        let mut renamed = meta.clone();
        renamed.name = "g".into();
        assert_ne!(renamed.file_id(), meta.file_id());
        assert_eq!(
            FileId::from_hex(&meta.file_id().to_hex()),
            Some(meta.file_id())
        );
    }
}
