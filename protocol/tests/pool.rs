//! Pool messages: every kind round-trips with arbitrary contents (a chunk's payload without a
//! copy), and every truncation, trailing byte, oversized field and bad flag is refused.

use bytes::Bytes;
use proptest::prelude::*;
use tidepool_protocol::PeerId;
use tidepool_protocol::pool::{ChunkRanges, FileId, FileMeta, PoolError, PoolLimits, PoolMessage};

fn ranges() -> impl Strategy<Value = ChunkRanges> {
    prop::collection::vec(0u32..5000, 0..40).prop_map(|v| v.into_iter().collect())
}

fn id20() -> impl Strategy<Value = [u8; 20]> {
    prop::array::uniform20(any::<u8>())
}

fn id32() -> impl Strategy<Value = [u8; 32]> {
    prop::array::uniform32(any::<u8>())
}

fn message() -> impl Strategy<Value = PoolMessage> {
    prop_oneof![
        (
            id20(),
            any::<u64>(),
            any::<u8>(),
            "[a-zé .]{0,40}",
            any::<u64>(),
            1u32..,
            id32(),
            ranges()
        )
            .prop_map(|(o, seq, hops, name, size, chunk_size, root, have)| {
                PoolMessage::FileOffer {
                    origin: PeerId(o),
                    seq,
                    hops,
                    meta: FileMeta {
                        name,
                        size,
                        chunk_size,
                        root,
                    },
                    have,
                }
            }),
        (id20(), any::<u64>(), any::<u8>(), id32()).prop_map(|(o, seq, hops, f)| {
            PoolMessage::FileRetract {
                origin: PeerId(o),
                seq,
                hops,
                file_id: FileId(f),
            }
        }),
        (
            any::<u64>(),
            id20(),
            id32(),
            ranges(),
            ranges(),
            any::<bool>(),
            any::<u8>()
        )
            .prop_map(
                |(request_id, r, f, requested, promised, from_origin, hops_left)| {
                    PoolMessage::FileRequest {
                        request_id,
                        requester: PeerId(r),
                        file_id: FileId(f),
                        requested,
                        promised,
                        from_origin,
                        hops_left,
                    }
                }
            ),
        (
            id32(),
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(id32(), 0..20),
            prop::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(f, request_id, index, proof, data)| PoolMessage::Chunk {
                file_id: FileId(f),
                request_id,
                index,
                proof,
                data: Bytes::from(data),
            }),
        (any::<u64>(), id32(), ranges()).prop_map(|(request_id, f, missing)| {
            PoolMessage::ChunksMissing {
                request_id,
                file_id: FileId(f),
                missing,
            }
        }),
        (any::<u64>(), id32()).prop_map(|(request_id, f)| PoolMessage::Cancel {
            request_id,
            file_id: FileId(f)
        }),
        (any::<u64>(), id32(), ranges()).prop_map(|(request_id, f, chunks)| {
            PoolMessage::Unavailable {
                request_id,
                file_id: FileId(f),
                chunks,
            }
        }),
    ]
}

fn encode(m: &PoolMessage) -> Bytes {
    let mut out = Vec::new();
    m.encode(&mut out);
    Bytes::from(out)
}

proptest! {
    #[test]
    fn every_message_round_trips(m in message()) {
        let bytes = encode(&m);
        let back = PoolMessage::decode(&bytes, &PoolLimits::default()).expect("decodes");
        if let PoolMessage::Chunk { data, .. } = &back {
            // The payload is a view into the received message.
            let inside = bytes.as_ptr_range().contains(&data.as_ptr()) || data.is_empty();
            prop_assert!(inside);
        }
        prop_assert_eq!(back, m);
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_refused(m in message(), extra in any::<u8>()) {
        let bytes = encode(&m);
        for cut in 0..bytes.len() {
            prop_assert!(PoolMessage::decode(&bytes.slice(..cut), &PoolLimits::default()).is_err(), "cut at {}", cut);
        }
        let mut longer = bytes.to_vec();
        longer.push(extra);
        prop_assert_eq!(
            PoolMessage::decode(&Bytes::from(longer), &PoolLimits::default()),
            Err(PoolError::Trailing(1))
        );
    }
}

#[test]
fn wrong_version_unknown_kind_bad_flag_and_oversized_fields_are_refused() {
    let limits = PoolLimits::default();
    let cancel = encode(&PoolMessage::Cancel {
        request_id: 1,
        file_id: FileId([0; 32]),
    });
    let mut v2 = cancel.to_vec();
    v2[0] = 2;
    assert_eq!(
        PoolMessage::decode(&Bytes::from(v2), &limits),
        Err(PoolError::Version(Some(2)))
    );
    assert_eq!(
        PoolMessage::decode(&Bytes::new(), &limits),
        Err(PoolError::Version(None))
    );
    let mut kind = cancel.to_vec();
    kind[1] = 99;
    assert_eq!(
        PoolMessage::decode(&Bytes::from(kind), &limits),
        Err(PoolError::Kind(99))
    );

    let request = PoolMessage::FileRequest {
        request_id: 1,
        requester: PeerId([1; 20]),
        file_id: FileId([2; 32]),
        requested: ChunkRanges::full(10),
        promised: ChunkRanges::new(),
        from_origin: true,
        hops_left: 3,
    };
    let mut flag = encode(&request).to_vec();
    let at = flag.len() - 2;
    flag[at] = 2;
    assert_eq!(
        PoolMessage::decode(&Bytes::from(flag), &limits),
        Err(PoolError::Flag(2))
    );

    let chunk = PoolMessage::Chunk {
        file_id: FileId([0; 32]),
        request_id: 1,
        index: 0,
        proof: vec![[0; 32]; 33],
        data: Bytes::from_static(b"x"),
    };
    assert!(matches!(
        PoolMessage::decode(&encode(&chunk), &limits),
        Err(PoolError::TooLong { field: "proof", .. })
    ));
    let big = PoolMessage::Chunk {
        file_id: FileId([0; 32]),
        request_id: 1,
        index: 0,
        proof: vec![],
        data: Bytes::from(vec![0u8; limits.max_chunk + 1]),
    };
    assert!(matches!(
        PoolMessage::decode(&encode(&big), &limits),
        Err(PoolError::TooLong { field: "chunk", .. })
    ));
    let offer = PoolMessage::FileOffer {
        origin: PeerId([0; 20]),
        seq: 0,
        hops: 0,
        meta: FileMeta {
            name: "n".repeat(300),
            size: 1,
            chunk_size: 1,
            root: [0; 32],
        },
        have: ChunkRanges::new(),
    };
    assert!(matches!(
        PoolMessage::decode(&encode(&offer), &limits),
        Err(PoolError::TooLong {
            field: "file name",
            ..
        })
    ));
    let mut bad_utf8 = encode(&PoolMessage::FileOffer {
        origin: PeerId([0; 20]),
        seq: 0,
        hops: 0,
        meta: FileMeta {
            name: "ab".into(),
            size: 1,
            chunk_size: 1,
            root: [0; 32],
        },
        have: ChunkRanges::new(),
    })
    .to_vec();
    // version, kind, origin (20), seq (8), hops, name length (2), then the name.
    bad_utf8[2 + 20 + 8 + 1 + 2] = 0xff;
    assert_eq!(
        PoolMessage::decode(&Bytes::from(bad_utf8), &limits),
        Err(PoolError::Name)
    );
}
