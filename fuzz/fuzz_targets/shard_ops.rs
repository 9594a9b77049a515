//! Fuzz target: any bytes as a sequence of operations on the tracker's swarm shard
//! (announces with offers, answers, scrapes, closes, reconnects, silences, clock advances),
//! with its invariants checked after every step.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tidepool_tracker::fuzzing::shard_ops(data));
