//! Fuzz target: any bytes as a pool message from a peer. Decoding never panics, and an
//! accepted message re-encodes to exactly the bytes it was read from.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tidepool_protocol::pool::{PoolLimits, PoolMessage};

fuzz_target!(|data: &[u8]| {
    let msg = Bytes::copy_from_slice(data);
    if let Ok(m) = PoolMessage::decode(&msg, &PoolLimits::default()) {
        let mut again = Vec::new();
        m.encode(&mut again);
        assert_eq!(&again[..], data);
    }
});
