//! Node-to-node pool messages carried on data channels (binary, versioned). So far: the
//! chunk-number sets requests and reports are made of.

pub mod ranges;

pub use ranges::{ChunkRanges, RangesError};
