//! Tampering with sealed, chained audit segments: every change is reported,
//! at the right record, with the right kind of failure.

use bulkhead_core::TenantId;
use bulkhead_core::audit::{
    AuditEvent, ConnectionRefused, ContentDigest, EventKind, FRAME_HEADER_LEN, Failure, HEADER_LEN,
    MasterKey, PartitionId, RequestEvent, SegmentHeader, SegmentSealer, SegmentTail, TenantKey,
    genesis_chain, open_partition, scan_segment, valid_prefix_len, verify_partition,
};
use bulkhead_core::wire::RequestId;
use proptest::prelude::*;

const MASTER: [u8; 32] = [0x5a; 32];

fn master() -> MasterKey {
    MasterKey::from_bytes(MASTER)
}

fn partition(name: &str) -> PartitionId {
    PartitionId::parse(name).unwrap()
}

fn request(tenant: &str, i: u64) -> AuditEvent {
    AuditEvent {
        time_unix_ns: 1_700_000_000_000_000_000 + i * 1_000_000,
        kind: EventKind::Request(RequestEvent {
            request_id: RequestId(u128::from(i) * 0x1_0000_0001),
            tenant: TenantId::new(tenant).unwrap(),
            model: "tiny".into(),
            prompt_digest: ContentDigest([u8::try_from(i % 251).unwrap(); 32]),
            response_digest: ContentDigest([1; 32]),
            input_tokens: 10,
            output_tokens: 20,
            ttft_us: Some(900),
            latency_us: 4_000,
            worker: Some(0),
            rerouted: false,
            cache_hit: i.is_multiple_of(2),
            status: 200,
            error_code: None,
            source: None,
            api_key_prefix: Some("bk_12345".into()),
        }),
    }
}

/// A partition's segments, and where each record's frame sits.
struct Built {
    segments: Vec<(u32, Vec<u8>)>,
    /// (index into `segments`, offset, frame length, seq)
    records: Vec<(usize, usize, usize, u64)>,
}

impl Built {
    fn view(&self) -> Vec<(u32, &[u8])> {
        self.segments.iter().map(|(n, b)| (*n, &b[..])).collect()
    }
}

fn build(key: &TenantKey, events: &[AuditEvent], per_segment: usize) -> Built {
    let p = key.partition().clone();
    let (mut seq, mut chain) = (0, genesis_chain(&p));
    let mut built = Built {
        segments: Vec::new(),
        records: Vec::new(),
    };
    for (n, chunk) in events.chunks(per_segment.max(1)).enumerate() {
        let header = SegmentHeader {
            segment: u32::try_from(n).unwrap() + 1,
            key_id: key.key_id(),
            created_unix_ns: 7,
            prev_seq: seq,
            prev_chain: chain,
            partition: p.clone(),
        };
        let mut sealer = SegmentSealer::new(key, &header).unwrap();
        let mut bytes = header.encode().to_vec();
        for event in chunk {
            let at = bytes.len();
            let s = sealer.seal(event, &mut bytes).unwrap();
            built.records.push((n, at, bytes.len() - at, s));
        }
        seq = sealer.last_seq();
        chain = sealer.last_chain();
        built.segments.push((header.segment, bytes));
    }
    built
}

fn tenant_partition(name: &str, records: u64, per_segment: usize) -> (TenantKey, Built) {
    let key = master().tenant_key(&partition(name));
    let events: Vec<_> = (1..=records).map(|i| request(name, i)).collect();
    let built = build(&key, &events, per_segment);
    (key, built)
}

#[test]
fn an_untouched_partition_verifies_and_opens_completely() {
    let (key, built) = tenant_partition("acme", 10, 4);
    for k in [None, Some(&key)] {
        let report = verify_partition(key.partition(), &built.view(), k);
        assert_eq!(report.first_bad, None);
        assert_eq!(
            (report.records, report.last_seq, report.segments),
            (10, 10, 3)
        );
    }
    let opened = open_partition(key.partition(), &built.view(), &key, &mut |_| true).unwrap();
    let expected: Vec<_> = (1..=10).map(|i| request("acme", i)).collect();
    assert_eq!(
        opened.iter().map(|r| r.event.clone()).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(
        opened.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
}

#[test]
fn flipping_any_byte_of_a_record_is_reported_at_that_record() {
    let (key, built) = tenant_partition("acme", 6, 3);
    let &(seg, at, len, seq) = &built.records[4];
    for i in 0..len {
        let mut tampered = built.segments.clone();
        tampered[seg].1[at + i] ^= 0x01;
        let view: Vec<_> = tampered.iter().map(|(n, b)| (*n, &b[..])).collect();
        for k in [None, Some(&key)] {
            let bad = verify_partition(key.partition(), &view, k)
                .first_bad
                .unwrap_or_else(|| panic!("flip of byte {i} went unnoticed"));
            assert_eq!((bad.segment, bad.offset), (2, at as u64), "byte {i}");
            if i < FRAME_HEADER_LEN {
                assert_eq!(bad.failure, Failure::CorruptFrame, "byte {i}");
            } else {
                assert_eq!(bad.seq, Some(seq));
                assert_eq!(bad.failure, Failure::ChainMismatch, "byte {i}");
            }
            let text = bad.to_string();
            assert!(
                text.contains("tenant acme") && text.contains(&format!("at byte {at}")),
                "{text}"
            );
        }
    }
}

#[test]
fn a_forged_chain_passes_the_chain_check_but_not_the_seal() {
    let (key, built) = tenant_partition("acme", 3, 10);
    let mut bytes = built.segments[0].1.clone();
    let (_, at, _, _) = built.records[1];
    bytes[at + FRAME_HEADER_LEN + 2] ^= 0x80;
    // The forger recomputes every chain hash from the altered record on.
    let mut chain = genesis_chain(key.partition()).0;
    for &(_, at, len, _) in &built.records {
        let frame = &bytes[at..at + len];
        let next: [u8; 32] = sha2_chain(&chain, &frame[..len - 32]);
        bytes[at + len - 32..at + len].copy_from_slice(&next);
        chain = next;
    }
    let view = [(1, &bytes[..])];
    assert_eq!(
        verify_partition(key.partition(), &view, None).first_bad,
        None
    );
    let bad = verify_partition(key.partition(), &view, Some(&key))
        .first_bad
        .unwrap();
    assert_eq!((bad.offset, bad.seq), (at as u64, Some(2)));
    assert_eq!(bad.failure, Failure::SealFailed);
}

fn sha2_chain(prev: &[u8; 32], frame_without_chain: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::new()
        .chain_update(prev)
        .chain_update(frame_without_chain)
        .finalize()
        .into()
}

#[test]
fn deleting_or_reordering_records_is_reported_where_the_sequence_breaks() {
    let (key, built) = tenant_partition("acme", 5, 10);
    let bytes = &built.segments[0].1;
    let r = &built.records;
    // Delete record seq 3.
    let mut deleted = bytes[..r[2].1].to_vec();
    deleted.extend_from_slice(&bytes[r[3].1..]);
    let bad = verify_partition(key.partition(), &[(1, &deleted)], Some(&key))
        .first_bad
        .unwrap();
    assert_eq!((bad.offset, bad.seq), (r[2].1 as u64, Some(4)));
    assert_eq!(
        bad.failure,
        Failure::SeqGap {
            expected: 3,
            found: 4
        }
    );
    // Swap records seq 2 and seq 3.
    let mut swapped = bytes[..r[1].1].to_vec();
    swapped.extend_from_slice(&bytes[r[2].1..r[2].1 + r[2].2]);
    swapped.extend_from_slice(&bytes[r[1].1..r[1].1 + r[1].2]);
    swapped.extend_from_slice(&bytes[r[3].1..]);
    assert_eq!(swapped.len(), bytes.len());
    let bad = verify_partition(key.partition(), &[(1, &swapped)], None)
        .first_bad
        .unwrap();
    assert_eq!((bad.offset, bad.seq), (r[1].1 as u64, Some(3)));
    assert_eq!(
        bad.failure,
        Failure::SeqGap {
            expected: 2,
            found: 3
        }
    );
    // Delete the last record of a segment that is not the last: the next
    // segment no longer continues it.
    let (key, built) = tenant_partition("acme", 6, 3);
    let mut segs = built.segments.clone();
    let (_, at, _, _) = built.records[2];
    segs[0].1.truncate(at);
    let view: Vec<_> = segs.iter().map(|(n, b)| (*n, &b[..])).collect();
    let bad = verify_partition(key.partition(), &view, None)
        .first_bad
        .unwrap();
    assert_eq!((bad.segment, bad.offset), (2, 0));
    assert_eq!(
        bad.failure,
        Failure::Discontinuity {
            expected: 2,
            found: 3
        }
    );
    // A whole middle segment deleted.
    let view = [built.view()[0], built.view()[1]];
    let (_, k) = tenant_partition("acme", 9, 3);
    let view3 = k.view();
    let bad = verify_partition(key.partition(), &[view3[0], view3[2]], None)
        .first_bad
        .unwrap();
    assert_eq!((bad.segment, bad.offset), (3, 0));
    assert!(matches!(bad.failure, Failure::Discontinuity { .. }));
    assert_eq!(
        verify_partition(key.partition(), &view, None).first_bad,
        None
    );
}

#[test]
fn segments_swapped_between_tenants_are_reported() {
    let (ka, a) = tenant_partition("alpha", 4, 2);
    let (kb, b) = tenant_partition("beta", 4, 2);
    // Segment 2 of each partition replaced by the other tenant's segment 2.
    let a_view = [(1, &a.segments[0].1[..]), (2, &b.segments[1].1[..])];
    let b_view = [(1, &b.segments[0].1[..]), (2, &a.segments[1].1[..])];
    for (key, view, other) in [(&ka, a_view, "beta"), (&kb, b_view, "alpha")] {
        for k in [None, Some(key)] {
            let bad = verify_partition(key.partition(), &view, k)
                .first_bad
                .unwrap();
            assert_eq!((bad.segment, bad.offset, bad.seq), (2, 0, None));
            assert_eq!(
                bad.failure,
                Failure::WrongPartition {
                    found: other.into()
                }
            );
        }
    }
}

#[test]
fn a_truncated_tail_is_torn_but_a_damaged_middle_is_not() {
    let (key, built) = tenant_partition("acme", 4, 10);
    let bytes = &built.segments[0].1;
    let (_, last_at, last_len, _) = built.records[3];
    for cut in [1, FRAME_HEADER_LEN - 1, FRAME_HEADER_LEN + 3, last_len - 1] {
        let torn = &bytes[..last_at + cut];
        assert_eq!(valid_prefix_len(key.partition(), 1, torn), last_at);
        let scan = scan_segment(key.partition(), 1, torn);
        assert_eq!(
            scan.tail,
            SegmentTail::Torn {
                offset: last_at as u64,
                bytes: cut as u64
            }
        );
        assert_eq!(scan.end_seq, 3);
        let bad = verify_partition(key.partition(), &[(1, torn)], Some(&key))
            .first_bad
            .unwrap();
        assert_eq!(bad.offset, last_at as u64);
        assert_eq!(bad.failure, Failure::TornTail { bytes: cut as u64 });
        // Cut at the valid prefix, it verifies: the crash is recoverable.
        let cut_back = &torn[..valid_prefix_len(key.partition(), 1, torn)];
        assert_eq!(
            verify_partition(key.partition(), &[(1, cut_back)], Some(&key)).first_bad,
            None
        );
    }
    // Zeros after the last record (a crash with preallocated blocks): torn.
    let mut zeros = bytes.clone();
    zeros.extend_from_slice(&[0; 40]);
    assert!(matches!(
        scan_segment(key.partition(), 1, &zeros).tail,
        SegmentTail::Torn { bytes: 40, .. }
    ));
    // A damaged record in the middle is not a torn tail: nothing to cut.
    let (_, mid_at, _, _) = built.records[1];
    let mut damaged = bytes.clone();
    damaged[mid_at + 3] ^= 0xff;
    let scan = scan_segment(key.partition(), 1, &damaged);
    assert!(matches!(
        scan.tail,
        SegmentTail::Bad {
            failure: Failure::CorruptFrame,
            ..
        }
    ));
    // In a segment that is not the last, a cut is a truncation.
    let (key, built) = tenant_partition("acme", 4, 2);
    let first = &built.segments[0].1[..built.segments[0].1.len() - 5];
    let bad = verify_partition(key.partition(), &[(1, first), built.view()[1]], None)
        .first_bad
        .unwrap();
    assert!(matches!(bad.failure, Failure::Truncated { .. }));
}

#[test]
fn a_wrong_key_is_refused_before_any_plaintext() {
    let (key, built) = tenant_partition("acme", 3, 10);
    let other_tenant = master().tenant_key(&partition("other"));
    let other_master = MasterKey::from_bytes([1; 32]).tenant_key(&partition("acme"));
    for wrong in [&other_tenant, &other_master] {
        let bad = verify_partition(key.partition(), &built.view(), Some(wrong))
            .first_bad
            .unwrap();
        assert_eq!((bad.segment, bad.offset), (1, 0));
        assert_eq!(
            bad.failure,
            Failure::KeyIdMismatch {
                expected: wrong.key_id(),
                found: key.key_id()
            }
        );
        let mut seen = 0;
        let opened = open_partition(key.partition(), &built.view(), wrong, &mut |_| {
            seen += 1;
            true
        });
        assert!(opened.is_err());
        assert_eq!(seen, 0, "no record may reach the caller under a wrong key");
    }
    // A forged header carrying the right key id does not help: the seals fail.
    let mut forged = built.segments[0].1.clone();
    let mut header = SegmentHeader::decode(&forged).unwrap();
    header.key_id = other_master.key_id();
    forged[..HEADER_LEN].copy_from_slice(&header.encode());
    let bad = verify_partition(key.partition(), &[(1, &forged)], Some(&other_master))
        .first_bad
        .unwrap();
    assert_eq!(bad.failure, Failure::SealFailed);
    assert_eq!(bad.seq, Some(1));
}

#[test]
fn host_partition_events_seal_and_open() {
    let key = master().tenant_key(&PartitionId::host());
    let event = AuditEvent {
        time_unix_ns: 5,
        kind: EventKind::ConnectionRefused(ConnectionRefused {
            tenant: None,
            source: Some("10.0.0.1:5000".parse().unwrap()),
            reason: "certificate from an unknown CA".into(),
        }),
    };
    assert!(event.partition().is_host());
    let built = build(&key, std::slice::from_ref(&event), 8);
    let opened = open_partition(key.partition(), &built.view(), &key, &mut |_| true).unwrap();
    assert_eq!(opened[0].event, event);
}

fn arb_event() -> impl Strategy<Value = AuditEvent> {
    (
        any::<u64>(),
        any::<u128>(),
        "[a-z0-9]{1,12}",
        any::<[u8; 32]>(),
        any::<(u32, u32, Option<u64>, u64, Option<u32>, bool, bool, u16)>(),
        proptest::option::of("[a-z_]{0,20}"),
        proptest::option::of(any::<std::net::SocketAddrV4>().prop_map(std::net::SocketAddr::V4)),
    )
        .prop_map(|(t, id, model, d, f, code, source)| AuditEvent {
            time_unix_ns: t,
            kind: EventKind::Request(RequestEvent {
                request_id: RequestId(id),
                tenant: TenantId::new("acme").unwrap(),
                model,
                prompt_digest: ContentDigest(d),
                response_digest: ContentDigest([d[0]; 32]),
                input_tokens: f.0,
                output_tokens: f.1,
                ttft_us: f.2,
                latency_us: f.3,
                worker: f.4,
                rerouted: f.5,
                cache_hit: f.6,
                status: f.7,
                error_code: code,
                source,
                api_key_prefix: None,
            }),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_events_round_trip_through_seal_and_open(
        events in proptest::collection::vec(arb_event(), 1..20),
        per_segment in 1usize..6,
    ) {
        let key = master().tenant_key(&partition("acme"));
        let built = build(&key, &events, per_segment);
        let opened = open_partition(key.partition(), &built.view(), &key, &mut |_| true).unwrap();
        prop_assert_eq!(opened.into_iter().map(|r| r.event).collect::<Vec<_>>(), events);
    }

    #[test]
    fn any_single_byte_change_is_detected_at_its_record(
        events in proptest::collection::vec(arb_event(), 1..8),
        per_segment in 1usize..4,
        pick in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let key = master().tenant_key(&partition("acme"));
        let mut built = build(&key, &events, per_segment);
        let total: usize = built.segments.iter().map(|s| s.1.len()).sum();
        let mut at = pick.index(total);
        let mut seg = 0;
        while at >= built.segments[seg].1.len() {
            at -= built.segments[seg].1.len();
            seg += 1;
        }
        built.segments[seg].1[at] ^= xor;
        // The record holding the byte (or the header, at offset 0).
        let start = built
            .records
            .iter()
            .filter(|r| r.0 == seg && r.1 <= at)
            .map(|r| r.1)
            .max()
            .unwrap_or(0);
        for k in [None, Some(&key)] {
            let bad = verify_partition(key.partition(), &built.view(), k).first_bad;
            prop_assert!(bad.is_some(), "change at segment {} byte {} unnoticed", seg, at);
            let bad = bad.unwrap();
            prop_assert_eq!(bad.segment, built.segments[seg].0);
            prop_assert_eq!(bad.offset, start as u64);
        }
    }
}
