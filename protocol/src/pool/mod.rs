//! Node-to-node pool data (binary, versioned), for the chunk pipeline: [`ChunkRanges`], the
//! chunk-number sets that requests and chunks-missing reports are made of, and the content
//! addressing that verifies every chunk ([`FileMeta`], [`HashTree`]).

pub mod ranges;
pub mod tree;

pub use ranges::{ChunkRanges, RangesError};
pub use tree::{FileId, FileMeta, Hash, HashTree, VerifyError};
