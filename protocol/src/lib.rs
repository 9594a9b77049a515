//! Wire formats shared by the tidepool tracker, node and load tester. Pure data plus
//! encode/decode; no I/O, no clocks.
//!
//! Layout:
//! - [`id`]: the 20-byte identifiers (`InfoHash`, `PeerId`) carried as latin1 JSON strings,
//!   and the echoed `OfferId`.
//! - [`tracker`]: the WebTorrent tracker messages (DESIGN.md §3), both directions: typed
//!   messages, a [`tracker::Decoder`] on simd-json that borrows from the frame, and encoders
//!   that append to a caller's reused `Vec<u8>`.
//! - [`Number`]: JSON numbers as peers send them (`left` may be `-1`, huge, or a float).
//! - [`pool`]: node-to-node messages on data channels; [`pool::ChunkRanges`].
//!
//! Golden frames recorded from npm `bittorrent-tracker` live in `tests/golden/`; the script
//! that records them is `interop/record.mjs` (at the workspace root).

pub mod id;
mod json;
pub mod pool;
pub mod tracker;

pub use id::{IdError, InfoHash, OfferId, PeerId};
pub use json::Number;
