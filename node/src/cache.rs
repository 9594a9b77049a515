//! The relay cache: chunks this node passed on for others, kept on disk within a byte
//! budget so later requests are served from here instead of crossing the mesh again.
//! Whole files are evicted, least recently used first; the cache lives for one run (its
//! directory is emptied when it opens and removed when it is dropped).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, Hash};

use crate::store::{ProvenChunk, StoreError, io_err};

/// A bounded on-disk store of verified chunks of files this node does not download itself.
#[derive(Debug)]
pub struct RelayCache {
    dir: PathBuf,
    budget: u64,
    used: u64,
    clock: u64,
    files: HashMap<FileId, Cached>,
    evictions: u64,
}

#[derive(Debug)]
struct Cached {
    file: File,
    path: PathBuf,
    meta: FileMeta,
    have: ChunkRanges,
    proofs: HashMap<u32, Vec<Hash>>,
    bytes: u64,
    last_used: u64,
}

impl RelayCache {
    /// A cache in `dir` (created, and emptied of earlier runs' files) holding at most
    /// `budget` bytes of chunk data.
    pub fn open(dir: &Path, budget: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "cache") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            budget,
            used: 0,
            clock: 0,
            files: HashMap::new(),
            evictions: 0,
        })
    }

    /// Bytes of chunk data held.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Files evicted to stay within the budget.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The chunks held of `id`.
    pub fn have(&self, id: &FileId) -> Option<&ChunkRanges> {
        self.files.get(id).map(|c| &c.have)
    }

    /// The files with chunks held, and which.
    pub fn held(&self) -> impl Iterator<Item = (&FileMeta, &ChunkRanges)> {
        self.files.values().map(|c| (&c.meta, &c.have))
    }

    /// Stores a chunk the caller has verified. Returns the files evicted to make room;
    /// a chunk that cannot fit even in an empty cache is not stored.
    pub fn insert(
        &mut self,
        meta: &FileMeta,
        index: u32,
        data: &[u8],
        proof: &[Hash],
    ) -> Result<Vec<FileId>, StoreError> {
        let id = meta.file_id();
        let len = data.len() as u64;
        if len > self.budget || self.files.get(&id).is_some_and(|c| c.have.contains(index)) {
            return Ok(Vec::new());
        }
        let mut evicted = Vec::new();
        while self.used + len > self.budget {
            // Least recently used first; the file being filled goes last.
            let Some(victim) = self
                .files
                .iter()
                .min_by_key(|(k, c)| (**k == id, c.last_used))
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.evict(&victim);
            evicted.push(victim);
        }
        self.clock += 1;
        let clock = self.clock;
        let cached = match self.files.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let path = self.dir.join(format!("{}.cache", id.to_hex()));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                v.insert(Cached {
                    file,
                    path,
                    meta: meta.clone(),
                    have: ChunkRanges::new(),
                    proofs: HashMap::new(),
                    bytes: 0,
                    last_used: clock,
                })
            }
        };
        let offset = u64::from(index) * u64::from(meta.chunk_size);
        cached
            .file
            .write_all_at(data, offset)
            .map_err(io_err(&cached.path))?;
        cached.have.insert(index..index + 1);
        cached.proofs.insert(index, proof.to_vec());
        cached.bytes += len;
        cached.last_used = clock;
        self.used += len;
        Ok(evicted)
    }

    /// Chunk `index` of `id` with its proof, if held.
    pub fn read_chunk(&mut self, id: &FileId, index: u32) -> Option<ProvenChunk> {
        self.clock += 1;
        let c = self.files.get_mut(id)?;
        let proof = c.proofs.get(&index)?.clone();
        let mut data = vec![0u8; c.meta.chunk_len(index).ok()?];
        let offset = u64::from(index) * u64::from(c.meta.chunk_size);
        c.file.read_exact_at(&mut data, offset).ok()?;
        c.last_used = self.clock;
        Some((data, proof))
    }

    /// Drops everything held of `id` (it became a download or a shared file here).
    pub fn evict(&mut self, id: &FileId) {
        if let Some(c) = self.files.remove(id) {
            self.used -= c.bytes;
            self.evictions += 1;
            let _ = std::fs::remove_file(&c.path);
        }
    }
}

impl Drop for RelayCache {
    fn drop(&mut self) {
        for c in self.files.values() {
            let _ = std::fs::remove_file(&c.path);
        }
        // Only succeeds when the directory is empty (the default per-node temp dir).
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_protocol::pool::HashTree;

    fn file(len: usize, seed: u8, chunk: u32) -> (FileMeta, Vec<u8>, HashTree) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let tree = HashTree::from_bytes(&data, chunk);
        let meta = FileMeta {
            name: format!("f{seed}"),
            size: len as u64,
            chunk_size: chunk,
            root: tree.root(),
        };
        (meta, data, tree)
    }

    #[test]
    fn chunks_are_served_back_and_the_budget_evicts_least_recently_used_files() {
        let dir = std::env::temp_dir().join(format!("tidepool-cache-{}", std::process::id()));
        let mut cache = RelayCache::open(&dir, 40).expect("opens");
        let (a, da, ta) = file(30, 3, 10);
        let (b, db, tb) = file(30, 7, 10);
        for i in 0..3u32 {
            let r = i as usize * 10..i as usize * 10 + 10;
            assert!(
                cache
                    .insert(&a, i, &da[r], &ta.proof(i))
                    .expect("fits")
                    .is_empty()
            );
        }
        assert_eq!(cache.used(), 30);
        let (data, proof) = cache.read_chunk(&a.file_id(), 1).expect("held");
        a.verify_chunk(1, &data, &proof)
            .expect("what went in comes out");
        // A second file pushes the first out as a whole.
        assert!(
            cache
                .insert(&b, 0, &db[..10], &tb.proof(0))
                .expect("fits")
                .is_empty()
        );
        let evicted = cache
            .insert(&b, 1, &db[10..20], &tb.proof(1))
            .expect("fits");
        assert_eq!(evicted, vec![a.file_id()]);
        assert_eq!(cache.used(), 20);
        assert!(cache.have(&a.file_id()).is_none());
        assert_eq!(
            cache
                .have(&b.file_id())
                .map(|h| h.iter().collect::<Vec<_>>()),
            Some(vec![0, 1])
        );
        assert!(cache.read_chunk(&a.file_id(), 1).is_none());
        assert_eq!(cache.evictions(), 1);
        drop(cache);
        assert!(!dir.exists(), "a dropped cache leaves nothing behind");
    }
}
