//! Fuzz target: any bytes as a client's WebSocket stream after the upgrade. The tracker's
//! frame decoder never panics, bounds what it holds, and decodes the same frames whether the
//! bytes arrive at once or a few at a time.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tidepool_tracker::fuzzing::frames(data));
