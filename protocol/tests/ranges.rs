//! `ChunkRanges` against a plain `BTreeSet<u32>` model: every operation agrees with the set
//! it stands for, stays canonical, and survives its wire form.

use std::collections::BTreeSet;

use proptest::prelude::*;
use tidepool_protocol::pool::ChunkRanges;

fn model() -> impl Strategy<Value = BTreeSet<u32>> {
    // Small universe so unions and differences overlap often; some far-out values too.
    prop::collection::btree_set(prop_oneof![0u32..200, (u32::MAX - 50)..u32::MAX], 0..80)
}

fn ranges(m: &BTreeSet<u32>) -> ChunkRanges {
    m.iter().copied().collect()
}

fn canonical(s: &ChunkRanges) -> bool {
    s.ranges().iter().all(|r| r.start < r.end)
        && s.ranges().windows(2).all(|w| w[0].end < w[1].start)
}

proptest! {
    #[test]
    fn set_operations_match_the_model(a in model(), b in model()) {
        let (ra, rb) = (ranges(&a), ranges(&b));
        let union: BTreeSet<u32> = a.union(&b).copied().collect();
        let inter: BTreeSet<u32> = a.intersection(&b).copied().collect();
        let diff: BTreeSet<u32> = a.difference(&b).copied().collect();
        for (got, want) in [(ra.union(&rb), union), (ra.intersection(&rb), inter), (ra.difference(&rb), diff)] {
            prop_assert!(canonical(&got), "{got:?}");
            prop_assert_eq!(got.iter().collect::<BTreeSet<u32>>(), want.clone());
            prop_assert_eq!(got.len(), want.len() as u64);
        }
        prop_assert_eq!(ra.contains_all(&rb), b.is_subset(&a));
        for x in a.iter().chain(b.iter()) {
            prop_assert_eq!(ra.contains(*x), a.contains(x));
        }
    }

    #[test]
    fn insert_remove_and_take_first_match_the_model(a in model(), start in 0u32..220, len in 0u32..40, n in 0u64..100) {
        let mut r = ranges(&a);
        let mut m = a.clone();
        r.insert(start..start + len);
        m.extend(start..start + len);
        prop_assert!(canonical(&r));
        prop_assert_eq!(r.iter().collect::<BTreeSet<u32>>(), m.clone());
        r.remove(start / 2..start / 2 + len);
        for x in start / 2..start / 2 + len {
            m.remove(&x);
        }
        prop_assert!(canonical(&r));
        prop_assert_eq!(r.iter().collect::<BTreeSet<u32>>(), m.clone());
        let first: Vec<u32> = r.take_first(n).iter().collect();
        let want: Vec<u32> = m.iter().copied().take(n as usize).collect();
        prop_assert_eq!(first, want);
    }

    #[test]
    fn wire_form_round_trips_and_is_unique(a in model(), trailing in prop::collection::vec(any::<u8>(), 0..8)) {
        let r = ranges(&a);
        let mut buf = Vec::new();
        r.encode(&mut buf);
        let used = buf.len();
        buf.extend(&trailing);
        let (back, n) = ChunkRanges::decode(&buf, 1000).expect("decodes");
        prop_assert_eq!(n, used);
        prop_assert_eq!(back, r);
    }

    #[test]
    fn arbitrary_bytes_decode_to_canonical_sets_or_errors(bytes in prop::collection::vec(prop_oneof![any::<u8>(), Just(0x80u8), Just(0u8)], 0..64)) {
        if let Ok((r, n)) = ChunkRanges::decode(&bytes, 16) {
            prop_assert!(canonical(&r));
            let mut again = Vec::new();
            r.encode(&mut again);
            prop_assert_eq!(&again[..], &bytes[..n], "one encoding per set");
        }
    }
}
