//! Fuzz target: any bytes as encoded chunk ranges (what a peer's request or chunks-missing
//! report carries). Decoding never panics; an accepted set is canonical and re-encodes to
//! exactly the bytes it was read from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidepool_protocol::pool::ChunkRanges;

fuzz_target!(|data: &[u8]| {
    if let Ok((set, used)) = ChunkRanges::decode(data, 4096) {
        let r = set.ranges();
        assert!(r.iter().all(|x| x.start < x.end));
        assert!(r.windows(2).all(|w| w[0].end < w[1].start));
        let mut again = Vec::new();
        set.encode(&mut again);
        assert_eq!(&again[..], &data[..used]);
    }
});
