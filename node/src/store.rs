//! Files on disk for the chunk pipeline: a shared file with its hash tree (to hand out
//! chunks with proofs), and a download in progress — chunks verified before they are
//! written into `NAME.part`, the set held recorded in `NAME.part.state` (rewritten
//! atomically, at most every [`STATE_SAVE_INTERVAL`] and when the download is dropped), so
//! a restarted download resumes from what is on disk, and the file renamed into place only
//! when every chunk is in.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, Hash, HashTree, VerifyError};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A chunk or the metadata did not verify.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A state file from another file or version.
    #[error("{0}: state file does not belong to this download")]
    ForeignState(PathBuf),
    /// `finish` before every chunk is in.
    #[error("download incomplete: {missing} chunks missing")]
    Incomplete {
        /// Chunks still missing.
        missing: u64,
    },
}

/// A chunk's bytes and the sibling hashes that prove it.
pub type ProvenChunk = (Vec<u8>, Vec<Hash>);

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A complete file this node serves.
#[derive(Debug)]
pub struct SharedFile {
    file: File,
    path: PathBuf,
    meta: FileMeta,
    tree: HashTree,
}

impl SharedFile {
    /// Reads `path` once to build its hash tree.
    pub fn open(path: &Path, chunk_size: u32) -> Result<Self, StoreError> {
        let file = File::open(path).map_err(io_err(path))?;
        let size = file.metadata().map_err(io_err(path))?.len();
        let mut leaves = Vec::new();
        let mut buf = vec![0u8; chunk_size.max(1) as usize];
        let mut offset = 0u64;
        let mut index = 0u32;
        while offset < size {
            let n = (size - offset).min(u64::from(chunk_size)) as usize;
            file.read_exact_at(&mut buf[..n], offset)
                .map_err(io_err(path))?;
            leaves.push(tidepool_protocol::pool::tree::leaf_hash(index, &buf[..n]));
            offset += n as u64;
            index += 1;
        }
        let tree = HashTree::from_leaves(leaves);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let meta = FileMeta {
            name,
            size,
            chunk_size,
            root: tree.root(),
        };
        meta.chunk_count()?;
        Ok(Self {
            file,
            path: path.to_owned(),
            meta,
            tree,
        })
    }

    /// Opens a file known by `meta` (a finished download): the tree is rebuilt from the
    /// bytes and must have the expected root; the name stays the one in `meta`, so the file
    /// keeps its id wherever it is stored.
    pub fn open_as(path: &Path, meta: &FileMeta) -> Result<Self, StoreError> {
        let mut f = Self::open(path, meta.chunk_size)?;
        if f.meta.root != meta.root || f.meta.size != meta.size {
            return Err(StoreError::Verify(VerifyError::WrongFileId));
        }
        f.meta = meta.clone();
        Ok(f)
    }

    /// The same open file, known by the path it was renamed to.
    pub fn at(mut self, path: &Path) -> Self {
        self.path = path.to_owned();
        self
    }

    /// What the file is.
    pub fn meta(&self) -> &FileMeta {
        &self.meta
    }

    /// Its id.
    pub fn id(&self) -> FileId {
        self.meta.file_id()
    }

    /// Flushes the file to stable storage.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_all().map_err(io_err(&self.path))
    }

    /// Chunk `index` and its proof.
    pub fn read_chunk(&self, index: u32) -> Result<ProvenChunk, StoreError> {
        let len = self.meta.chunk_len(index)?;
        let mut data = vec![0u8; len];
        let offset = u64::from(index) * u64::from(self.meta.chunk_size);
        self.file
            .read_exact_at(&mut data, offset)
            .map_err(io_err(&self.path))?;
        Ok((data, self.tree.proof(index)))
    }
}

const STATE_MAGIC: &[u8; 8] = b"tpstate1";

/// How often the held set is rewritten while chunks arrive. Per chunk it cost a file
/// create and a rename each time, ~10% of a downloader's CPU (measured, 16-node pool); a
/// node killed without warning re-fetches at most this long's worth of chunks, since the
/// state never claims a chunk before its bytes were written.
pub const STATE_SAVE_INTERVAL: Duration = Duration::from_millis(250);

/// A download in progress.
#[derive(Debug)]
pub struct PartialFile {
    file: File,
    part: PathBuf,
    state: PathBuf,
    target: PathBuf,
    meta: FileMeta,
    have: ChunkRanges,
    /// The chunks whose proofs are in `NAME.part.proofs` and verified: what this download
    /// can serve.
    servable: ChunkRanges,
    /// `NAME.part.proofs`: one fixed-size slot per chunk (`[n u8][n × 32-byte hash]`),
    /// written with the chunk, so proofs stay on disk whatever the file's size and a
    /// resumed download can serve what it already holds.
    proofs: File,
    proof_path: PathBuf,
    /// Bytes per slot: room for the longest proof of this file.
    slot: u64,
    /// Chunks written since the state was last saved.
    unsaved: bool,
    last_save: Instant,
}

impl PartialFile {
    /// Starts a download of `meta` into `target`, or resumes one left in `target.part`.
    pub fn open(target: &Path, meta: &FileMeta) -> Result<Self, StoreError> {
        meta.chunk_count()?;
        let part = with_suffix(target, ".part");
        let state = with_suffix(target, ".part.state");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .map_err(io_err(&part))?;
        file.set_len(meta.size).map_err(io_err(&part))?;
        let have = match std::fs::read(&state) {
            Ok(bytes) => {
                parse_state(&bytes, meta).ok_or_else(|| StoreError::ForeignState(state.clone()))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => ChunkRanges::new(),
            Err(e) => return Err(io_err(&state)(e)),
        };
        let proof_path = with_suffix(target, ".part.proofs");
        let proofs = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(have.is_empty())
            .open(&proof_path)
            .map_err(io_err(&proof_path))?;
        let count = meta.chunk_count()?;
        // Chunk 0 has a sibling on every level: its proof is the longest.
        let depth = tidepool_protocol::pool::tree::proof_len(count, 0);
        let mut f = Self {
            file,
            part,
            state,
            target: target.to_owned(),
            meta: meta.clone(),
            have,
            servable: ChunkRanges::new(),
            proofs,
            proof_path,
            slot: 1 + 32 * depth as u64,
            unsaved: false,
            last_save: Instant::now(),
        };
        f.load_proofs();
        Ok(f)
    }

    /// Takes back the proofs a previous run wrote for chunks still held, each checked
    /// against the chunk on disk (a torn or stale slot is skipped, never served). Reads
    /// every held chunk once: callers run this off their event loop.
    fn load_proofs(&mut self) {
        let held: Vec<u32> = self.have.iter().collect();
        for index in held {
            let Some(proof) = self.read_proof(index) else {
                continue;
            };
            let Ok(len) = self.meta.chunk_len(index) else {
                continue;
            };
            let mut data = vec![0u8; len];
            let offset = u64::from(index) * u64::from(self.meta.chunk_size);
            if self.file.read_exact_at(&mut data, offset).is_ok()
                && self.meta.verify_chunk(index, &data, &proof).is_ok()
            {
                self.servable.insert(index..index + 1);
            }
        }
    }

    fn read_proof(&self, index: u32) -> Option<Vec<Hash>> {
        let mut slot = vec![0u8; self.slot as usize];
        self.proofs
            .read_exact_at(&mut slot, u64::from(index) * self.slot)
            .ok()?;
        let (&n, mut rest) = slot.split_first()?;
        let mut proof = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let (h, tail) = rest.split_first_chunk::<32>()?;
            proof.push(*h);
            rest = tail;
        }
        Some(proof)
    }

    /// Chunks on disk (verified when they arrived).
    pub fn have(&self) -> &ChunkRanges {
        &self.have
    }

    /// Chunks this download can serve: those whose proofs it has (received in this run, or
    /// in an earlier one whose proof log survived).
    pub fn servable(&self) -> &ChunkRanges {
        &self.servable
    }

    /// What is being downloaded.
    pub fn meta(&self) -> &FileMeta {
        &self.meta
    }

    /// Where the chunks are written (`NAME.part`).
    pub fn part_path(&self) -> &Path {
        &self.part
    }

    /// Where the file goes when it is complete.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Verifies chunk `index` and writes it; returns false if it was already held.
    pub fn write_chunk(
        &mut self,
        index: u32,
        data: &[u8],
        proof: &[Hash],
    ) -> Result<bool, StoreError> {
        self.meta.verify_chunk(index, data, proof)?;
        if self.have.contains(index) {
            return Ok(false);
        }
        let offset = u64::from(index) * u64::from(self.meta.chunk_size);
        self.file
            .write_all_at(data, offset)
            .map_err(io_err(&self.part))?;
        let mut slot = Vec::with_capacity(self.slot as usize);
        slot.push(proof.len() as u8);
        for h in proof {
            slot.extend_from_slice(h);
        }
        // Whole slots, so reading any slot back never runs past the end of the file.
        slot.resize(slot.len().max(self.slot as usize), 0);
        if slot.len() as u64 <= self.slot {
            self.proofs
                .write_all_at(&slot, u64::from(index) * self.slot)
                .map_err(io_err(&self.proof_path))?;
            self.servable.insert(index..index + 1);
        }
        self.have.insert(index..index + 1);
        self.unsaved = true;
        self.save_state_if_due()?;
        Ok(true)
    }

    /// Chunk `index` and its proof, if held with a verified proof.
    pub fn read_chunk(&self, index: u32) -> Result<Option<ProvenChunk>, StoreError> {
        if !self.servable.contains(index) {
            return Ok(None);
        }
        let Some(proof) = self.read_proof(index) else {
            return Ok(None);
        };
        let mut data = vec![0u8; self.meta.chunk_len(index)?];
        let offset = u64::from(index) * u64::from(self.meta.chunk_size);
        self.file
            .read_exact_at(&mut data, offset)
            .map_err(io_err(&self.part))?;
        Ok(Some((data, proof)))
    }

    /// Records the held set if chunks arrived since it was last saved and the interval has
    /// passed (called on a timer, so a download gone quiet does not leave its last chunks
    /// unrecorded).
    pub fn save_state_if_due(&mut self) -> Result<(), StoreError> {
        if self.unsaved && self.last_save.elapsed() >= STATE_SAVE_INTERVAL {
            self.save_state()?;
        }
        Ok(())
    }

    /// Once every chunk is in: flushes, renames `NAME.part` to `NAME`, removes the state.
    pub fn finish(mut self) -> Result<PathBuf, StoreError> {
        let all = ChunkRanges::full(self.meta.chunk_count()?);
        let missing = all.difference(&self.have).len();
        if missing > 0 {
            return Err(StoreError::Incomplete { missing });
        }
        self.file.sync_all().map_err(io_err(&self.part))?;
        std::fs::rename(&self.part, &self.target).map_err(io_err(&self.target))?;
        // Nothing left to record: the drop below must not write the state back.
        self.unsaved = false;
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.proof_path);
        Ok(self.target.clone())
    }

    /// Writes the held set next to the data, atomically (temp file + rename).
    fn save_state(&mut self) -> Result<(), StoreError> {
        let mut bytes = STATE_MAGIC.to_vec();
        bytes.extend_from_slice(&self.meta.file_id().0);
        self.have.encode(&mut bytes);
        let tmp = with_suffix(&self.state, ".tmp");
        std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &self.state).map_err(io_err(&self.state))?;
        self.unsaved = false;
        self.last_save = Instant::now();
        Ok(())
    }
}

impl Drop for PartialFile {
    /// A download stopped on purpose keeps every chunk it wrote.
    fn drop(&mut self) {
        if self.unsaved
            && let Err(e) = self.save_state()
        {
            tracing::warn!("saving download state: {e}");
        }
    }
}

fn parse_state(bytes: &[u8], meta: &FileMeta) -> Option<ChunkRanges> {
    let rest = bytes.strip_prefix(STATE_MAGIC)?;
    let (id, rest) = rest.split_at_checked(32)?;
    if id != meta.file_id().0 {
        return None;
    }
    let (have, used) = ChunkRanges::decode(rest, u32::MAX).ok()?;
    let all = ChunkRanges::full(meta.chunk_count().ok()?);
    (used == rest.len() && all.contains_all(&have)).then_some(have)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tidepool-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn a_download_verifies_resumes_and_lands_identical() {
        let dir = temp("resume");
        let src = dir.join("source.bin");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 253) as u8).collect();
        std::fs::write(&src, &data).expect("write");
        let shared = SharedFile::open(&src, 4096).expect("share");
        let meta = shared.meta().clone();
        assert_eq!(meta.chunk_count().expect("shape"), 25);
        let target = dir.join("copy.bin");

        let mut part = PartialFile::open(&target, &meta).expect("start");
        for i in 0..10 {
            let (d, p) = shared.read_chunk(i).expect("read");
            assert!(part.write_chunk(i, &d, &p).expect("verified"));
        }
        let (d, p) = shared.read_chunk(3).expect("read");
        assert!(!part.write_chunk(3, &d, &p).expect("again"), "already held");
        // A corrupted chunk is refused and nothing is written.
        let (mut bad, p) = shared.read_chunk(10).expect("read");
        bad[0] ^= 0xff;
        assert!(matches!(
            part.write_chunk(10, &bad, &p),
            Err(StoreError::Verify(_))
        ));
        assert!(!part.have().contains(10));
        drop(part);

        // Restart: the ten chunks on disk are picked up (the drop saved the state, though
        // the save interval had not passed), with their proofs, so they can be served.
        let mut part = PartialFile::open(&target, &meta).expect("resume");
        assert_eq!(part.have(), &ChunkRanges::full(10));
        assert_eq!(part.servable(), &ChunkRanges::full(10));
        assert_eq!(
            part.read_chunk(4).expect("read").expect("servable"),
            shared.read_chunk(4).expect("read")
        );
        // The last chunk's proof is shorter than the first's: its slot still reads back.
        let (d, p) = shared.read_chunk(24).expect("read");
        part.write_chunk(24, &d, &p).expect("verified");
        assert_eq!(
            part.read_chunk(24).expect("read").expect("servable"),
            (d, p)
        );
        assert!(matches!(
            PartialFile::open(&target, &meta).map(|p| p.have().len()),
            Ok(10)
        ));
        for i in 10..25 {
            let (d, p) = shared.read_chunk(i).expect("read");
            part.write_chunk(i, &d, &p).expect("verified");
        }
        assert_eq!(part.servable(), &ChunkRanges::full(25));
        let served = part.read_chunk(20).expect("read").expect("held this run");
        assert_eq!(served, shared.read_chunk(20).expect("read"));
        let done = part.finish().expect("complete");
        assert_eq!(std::fs::read(&done).expect("read"), data);
        for leftover in [
            "copy.bin.part",
            "copy.bin.part.state",
            "copy.bin.part.proofs",
        ] {
            assert!(!dir.join(leftover).exists(), "{leftover} removed");
        }
    }

    #[test]
    fn a_damaged_proof_file_costs_only_the_damaged_slots() {
        let dir = temp("prooflog");
        let src = dir.join("source.bin");
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(&src, &data).expect("write");
        let shared = SharedFile::open(&src, 4096).expect("share");
        let meta = shared.meta().clone();
        let target = dir.join("copy.bin");
        let mut part = PartialFile::open(&target, &meta).expect("start");
        for i in 0..4 {
            let (d, p) = shared.read_chunk(i).expect("read");
            part.write_chunk(i, &d, &p).expect("verified");
        }
        let slot = part.slot as usize;
        drop(part);
        let log = dir.join("copy.bin.part.proofs");
        let mut bytes = std::fs::read(&log).expect("written");
        assert_eq!(bytes.len(), 4 * slot, "one fixed slot per chunk");
        // Slots are [n][n hashes]: flip a byte in chunk 0's first hash, tear chunk 3's.
        bytes[1] ^= 0xff;
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&log, &bytes).expect("write");
        let part = PartialFile::open(&target, &meta).expect("resume");
        assert_eq!(part.have(), &ChunkRanges::full(4));
        assert_eq!(
            part.servable(),
            &ChunkRanges::from_range(1..3),
            "bad proofs not taken"
        );
        assert!(part.read_chunk(0).expect("read").is_none());
    }

    fn rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    #[test]
    fn proofs_stay_on_disk_so_memory_does_not_grow_with_the_chunk_count() {
        // 2^18 chunks: their proofs (18 hashes each) would take ~160 MiB held in memory,
        // as a 64 GiB file of 64 KiB chunks would take ~0.7 GiB.
        let dir = temp("many-chunks");
        let (chunk, n) = (64u32, 1u32 << 18);
        let data = vec![0u8; chunk as usize];
        let tree = HashTree::from_leaves(
            (0..n)
                .map(|i| tidepool_protocol::pool::tree::leaf_hash(i, &data))
                .collect(),
        );
        let meta = FileMeta {
            name: "many.bin".into(),
            size: u64::from(n) * u64::from(chunk),
            chunk_size: chunk,
            root: tree.root(),
        };
        let target = dir.join("many.bin");
        let mut part = PartialFile::open(&target, &meta).expect("start");
        let before = rss();
        for i in 0..n {
            assert!(
                part.write_chunk(i, &data, &tree.proof(i))
                    .expect("verified")
            );
        }
        let grew = rss().saturating_sub(before);
        assert!(grew < 48 << 20, "RSS grew {grew} bytes for {n} chunks");
        assert_eq!(part.servable().len(), u64::from(n));
        let (d, proof) = part.read_chunk(n - 1).expect("read").expect("servable");
        assert_eq!((d, proof), (data.clone(), tree.proof(n - 1)));
        drop(part);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn finishing_early_and_foreign_state_files_are_refused() {
        let dir = temp("refuse");
        let src = dir.join("a.bin");
        std::fs::write(&src, vec![1u8; 10_000]).expect("write");
        let meta = SharedFile::open(&src, 1024).expect("share").meta().clone();
        let target = dir.join("b.bin");
        let part = PartialFile::open(&target, &meta).expect("start");
        assert!(matches!(
            part.finish(),
            Err(StoreError::Incomplete { missing: 10 })
        ));
        std::fs::write(dir.join("b.bin.part.state"), b"tpstate1 not this file").expect("write");
        assert!(matches!(
            PartialFile::open(&target, &meta),
            Err(StoreError::ForeignState(_))
        ));
    }
}
