//! Access lists: which swarms the tracker serves. A file of hex info hashes, read as an allow
//! list or a deny list, swapped in whole on reload so workers never see half a file.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ahash::AHashSet;
use serde::{Deserialize, Serialize};
use tidepool_protocol::InfoHash;

/// How the list is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessListMode {
    /// Every swarm is served; no file is read.
    #[default]
    Off,
    /// Only swarms in the file are served.
    Allow,
    /// Every swarm except those in the file is served.
    Deny,
}

/// Why an access list file was rejected (the previous list stays in force).
#[derive(Debug, thiserror::Error)]
pub enum AccessListError {
    /// The file could not be read.
    #[error("reading access list {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not 40 hex digits.
    #[error("access list {path}, line {line}: expected 40 hex digits, found {found:?}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The offending text (truncated).
        found: String,
    },
}

/// A loaded list.
#[derive(Debug, Clone, Default)]
pub struct AccessList {
    mode: AccessListMode,
    hashes: AHashSet<InfoHash>,
}

impl AccessList {
    /// Reads `path`: one info hash per line as 40 hex digits; blank lines and `#` comments
    /// are ignored. Any bad line rejects the whole file.
    pub fn load(mode: AccessListMode, path: &Path) -> Result<Self, AccessListError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessListError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(mode, &text).map_err(|(line, found)| AccessListError::Parse {
            path: path.display().to_string(),
            line,
            found,
        })
    }

    fn parse(mode: AccessListMode, text: &str) -> Result<Self, (usize, String)> {
        let mut hashes = AHashSet::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let hash =
                InfoHash::from_hex(line).ok_or_else(|| (i + 1, line.chars().take(60).collect()))?;
            hashes.insert(hash);
        }
        Ok(Self { mode, hashes })
    }

    /// Whether announces into `info_hash` are served.
    pub fn allows(&self, info_hash: &InfoHash) -> bool {
        match self.mode {
            AccessListMode::Off => true,
            AccessListMode::Allow => self.hashes.contains(info_hash),
            AccessListMode::Deny => !self.hashes.contains(info_hash),
        }
    }

    /// Info hashes in the list.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether the list holds no info hash.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// The list shared by all workers, swapped whole on reload.
pub(crate) type SharedAccessList = Swap<AccessList>;
/// A worker's view of the shared list.
pub(crate) type AccessView = View<AccessList>;

/// A value every worker reads and a reload replaces whole. Workers keep their own `Arc` and
/// compare generations once per loop turn, so the lock is taken only after a reload.
#[derive(Debug, Default)]
pub(crate) struct Swap<T> {
    generation: AtomicU64,
    value: RwLock<Arc<T>>,
}

impl<T> Swap<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            generation: AtomicU64::new(0),
            value: RwLock::new(Arc::new(value)),
        }
    }

    pub(crate) fn replace(&self, value: T) {
        if let Ok(mut current) = self.value.write() {
            *current = Arc::new(value);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn current(&self) -> Arc<T> {
        self.value
            .read()
            .map(|l| l.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

/// A worker's view of a [`Swap`], refreshed when the generation moves.
#[derive(Debug)]
pub(crate) struct View<T> {
    generation: u64,
    value: Arc<T>,
}

impl<T> View<T> {
    pub(crate) fn new(shared: &Swap<T>) -> Self {
        Self {
            generation: shared.generation(),
            value: shared.current(),
        }
    }

    /// Picks up a reload; true when the value changed since the last call.
    pub(crate) fn refresh(&mut self, shared: &Swap<T>) -> bool {
        let generation = shared.generation();
        if generation == self.generation {
            return false;
        }
        self.generation = generation;
        self.value = shared.current();
        true
    }

    pub(crate) fn get(&self) -> &T {
        &self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789ABCDEF01234567";

    #[test]
    fn parses_hex_lines_comments_and_blanks() {
        let text = format!("# swarms we host\n\n{A}  # the demo\n{}\n", "f".repeat(40));
        let list = AccessList::parse(AccessListMode::Allow, &text).expect("valid");
        assert_eq!(list.len(), 2);
        assert!(list.allows(&InfoHash::from_hex(A).expect("hex")));
        assert!(!list.allows(&InfoHash([0; 20])));
        let deny = AccessList::parse(AccessListMode::Deny, &text).expect("valid");
        assert!(!deny.allows(&InfoHash::from_hex(A).expect("hex")));
        assert!(deny.allows(&InfoHash([0; 20])));
    }

    #[test]
    fn bad_lines_name_their_line_number() {
        let text = format!("{A}\n{}\n", &A[..39]);
        assert_eq!(
            AccessList::parse(AccessListMode::Allow, &text).map(|l| l.len()),
            Err((2, A[..39].to_owned()))
        );
        let text = format!("{}g\n", &A[..39]);
        assert!(AccessList::parse(AccessListMode::Deny, &text).is_err());
    }

    #[test]
    fn views_pick_up_replacements_once() {
        let shared = SharedAccessList::new(AccessList::default());
        let mut view = AccessView::new(&shared);
        assert!(!view.refresh(&shared));
        let list = AccessList::parse(AccessListMode::Deny, A).expect("valid");
        shared.replace(list);
        assert!(view.refresh(&shared));
        assert!(!view.refresh(&shared));
        assert_eq!(view.get().len(), 1);
    }
}
