//! Node-to-node pool data (binary, versioned), for the chunk pipeline: the messages
//! ([`PoolMessage`]), [`ChunkRanges`], the chunk-number sets that requests and chunks-missing
//! reports are made of, and the content addressing that verifies every chunk ([`FileMeta`],
//! [`HashTree`]).

pub mod message;
pub mod ranges;
pub mod tree;

pub use message::{PoolError, PoolLimits, PoolMessage};
pub use ranges::{ChunkRanges, RangesError};
pub use tree::{FileId, FileMeta, Hash, HashTree, VerifyError};
