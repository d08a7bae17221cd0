//! Property tests of the wire codec: any message round-trips, any split of
//! the byte stream decodes the same messages, and no input panics.

use bulkhead_core::TenantId;
use bulkhead_core::wire::{
    Capacity, FinishReason, Finished, FrameDecoder, Hello, ProxyToWorker, RejectKind, Rejected,
    RequestId, Sampling, Submit, TenantBlocks, Violation, ViolationKind, WIRE_VERSION, WireError,
    WireMessage, WorkerBackend, WorkerInfo, WorkerToProxy, encode_frame,
};
use proptest::prelude::*;

fn tenant() -> impl Strategy<Value = TenantId> {
    "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?".prop_map(|s| TenantId::new(&s).unwrap())
}

fn request_id() -> impl Strategy<Value = RequestId> {
    any::<u128>().prop_map(RequestId)
}

fn tokens(max: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(any::<u32>(), 0..max)
}

fn hello() -> impl Strategy<Value = Hello> {
    let info = (
        prop_oneof![
            Just(WorkerBackend::Cuda),
            Just(WorkerBackend::Cpu),
            Just(WorkerBackend::Sim)
        ],
        prop::collection::vec("[a-z0-9.-]{0,12}", 0..3),
        any::<(u32, u32, u32)>(),
    )
        .prop_map(
            |(backend, models, (max_slots, total_blocks, block_tokens))| WorkerInfo {
                backend,
                models,
                max_slots,
                total_blocks,
                block_tokens,
            },
        );
    (any::<u32>(), prop::option::of(info)).prop_map(|(id, info)| match info {
        Some(info) => Hello::worker(id, info),
        None => Hello::proxy(id),
    })
}

fn sampling() -> impl Strategy<Value = Sampling> {
    (
        0.0_f32..4.0,
        0.0_f32..=1.0,
        any::<Option<u64>>(),
        prop::collection::vec(tokens(4), 0..3),
    )
        .prop_map(|(temperature, top_p, seed, stop)| Sampling {
            temperature,
            top_p,
            seed,
            stop,
        })
}

fn to_worker() -> impl Strategy<Value = ProxyToWorker> {
    let submit = (
        request_id(),
        tenant(),
        "[ -~]{0,16}",
        tokens(64),
        any::<u32>(),
        sampling(),
        any::<u32>(),
    )
        .prop_map(
            |(request_id, tenant, model, prompt_tokens, max_tokens, sampling, kv_block_quota)| {
                ProxyToWorker::Submit(Submit {
                    request_id,
                    tenant,
                    model,
                    prompt_tokens,
                    max_tokens,
                    sampling,
                    kv_block_quota,
                })
            },
        );
    prop_oneof![
        1 => hello().prop_map(ProxyToWorker::Hello),
        4 => submit,
        1 => request_id().prop_map(|request_id| ProxyToWorker::Cancel { request_id }),
        1 => Just(ProxyToWorker::Shutdown),
    ]
}

fn to_proxy() -> impl Strategy<Value = WorkerToProxy> {
    let reason = prop_oneof![
        Just(FinishReason::Stop),
        Just(FinishReason::Length),
        Just(FinishReason::Cancelled),
        Just(FinishReason::Error),
    ];
    let kind = prop_oneof![
        Just(ViolationKind::CrossTenantRead),
        Just(ViolationKind::CrossTenantWrite),
        Just(ViolationKind::UnscrubbedReuse),
        Just(ViolationKind::InvalidBlock),
        Just(ViolationKind::QuotaExceeded),
    ];
    let finished = (
        request_id(),
        reason,
        any::<(u32, u32, u32)>(),
        prop::option::of(".{0,24}"),
    )
        .prop_map(|(request_id, reason, (prompt, output, hit), error)| {
            WorkerToProxy::Finished(Finished {
                request_id,
                reason,
                prompt_tokens: prompt,
                output_tokens: output,
                prefix_cache_hit_tokens: hit,
                error,
            })
        });
    let capacity = (
        any::<(u32, u32)>(),
        prop::collection::vec((tenant(), any::<(u32, u32)>()), 0..5),
    )
        .prop_map(|((free_slots, free_blocks), tenants)| {
            WorkerToProxy::Capacity(Capacity {
                free_slots,
                free_blocks,
                per_tenant: tenants
                    .into_iter()
                    .map(|(tenant, (used_blocks, quota))| TenantBlocks {
                        tenant,
                        used_blocks,
                        quota,
                    })
                    .collect(),
            })
        });
    let violation = (request_id(), tenant(), kind, any::<u32>(), ".{0,24}").prop_map(
        |(request_id, tenant, kind, block, detail)| {
            WorkerToProxy::Violation(Violation {
                request_id,
                tenant,
                kind,
                block,
                detail,
            })
        },
    );
    let reject_kind = prop_oneof![
        Just(RejectKind::MalformedFrame),
        Just(RejectKind::ProtocolViolation),
        Just(RejectKind::UnknownModel),
        Just(RejectKind::UnknownTenant),
        Just(RejectKind::InvalidPrompt),
        Just(RejectKind::PromptTooLong),
        Just(RejectKind::InvalidSampling),
        Just(RejectKind::QuotaExhausted),
        Just(RejectKind::DuplicateRequest),
        Just(RejectKind::ShuttingDown),
    ];
    let rejected = (prop::option::of(request_id()), reject_kind, ".{0,24}").prop_map(
        |(request_id, kind, detail)| {
            WorkerToProxy::Rejected(Rejected {
                request_id,
                kind,
                detail,
            })
        },
    );
    prop_oneof![
        1 => rejected,
        1 => hello().prop_map(WorkerToProxy::Hello),
        4 => (request_id(), any::<u32>(), tokens(32)).prop_map(|(request_id, first_index, tokens)| {
            WorkerToProxy::Tokens { request_id, first_index, tokens }
        }),
        1 => finished,
        1 => capacity,
        1 => violation,
    ]
}

fn encode_all<M: WireMessage>(messages: &[M]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for m in messages {
        encode_frame(m, &mut bytes).unwrap();
    }
    bytes
}

/// Pushes `chunks` in order, pulling every complete message after each push.
fn decode_chunks<'a, M: WireMessage>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<M>, WireError> {
    let mut decoder = FrameDecoder::<M>::new();
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        while let Some(m) = decoder.next_message()? {
            out.push(m);
        }
    }
    assert_eq!(decoder.buffered_len(), 0, "bytes left over");
    Ok(out)
}

/// Drives a decoder over `chunks` until it errors or runs dry; must never panic.
fn drain_garbage<M: WireMessage>(chunks: &[Vec<u8>]) {
    let mut decoder = FrameDecoder::<M>::new();
    for chunk in chunks {
        decoder.push(chunk);
        loop {
            match decoder.next_message() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(err) => {
                    assert!(!err.to_string().is_empty());
                    if decoder.is_poisoned() {
                        // Framing errors are sticky.
                        assert_eq!(decoder.next_message(), Err(err));
                        return;
                    }
                    // A bad payload consumed its frame: decoding goes on.
                    assert!(matches!(err, WireError::Malformed { .. }), "{err}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn messages_round_trip(to_w in prop::collection::vec(to_worker(), 0..6),
                           to_p in prop::collection::vec(to_proxy(), 0..6)) {
        let bytes = encode_all(&to_w);
        prop_assert_eq!(decode_chunks::<ProxyToWorker>([bytes.as_slice()])?, to_w);
        let bytes = encode_all(&to_p);
        prop_assert_eq!(decode_chunks::<WorkerToProxy>([bytes.as_slice()])?, to_p);
    }

    #[test]
    fn every_split_point_decodes_the_same(messages in prop::collection::vec(to_proxy(), 1..4)) {
        let bytes = encode_all(&messages);
        for split in 0..=bytes.len() {
            let (a, b) = bytes.split_at(split);
            prop_assert_eq!(&decode_chunks::<WorkerToProxy>([a, b])?, &messages);
        }
        // And one byte at a time.
        prop_assert_eq!(decode_chunks::<WorkerToProxy>(bytes.chunks(1))?, messages);
    }

    #[test]
    fn random_chunking_decodes_the_same(messages in prop::collection::vec(to_worker(), 1..6),
                                        sizes in prop::collection::vec(1_usize..40, 1..64)) {
        let bytes = encode_all(&messages);
        let mut chunks = Vec::new();
        let mut rest = bytes.as_slice();
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at((*size).min(rest.len()));
            chunks.push(chunk);
            rest = tail;
        }
        prop_assert_eq!(decode_chunks::<ProxyToWorker>(chunks)?, messages);
    }

    #[test]
    fn arbitrary_bytes_never_panic(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8)) {
        drain_garbage::<ProxyToWorker>(&chunks);
        drain_garbage::<WorkerToProxy>(&chunks);
    }

    #[test]
    fn arbitrary_payloads_in_valid_frames_never_panic(payload in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut frame = u32::try_from(payload.len() + 2).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(&WIRE_VERSION.to_be_bytes());
        frame.extend_from_slice(&payload);
        for result in [
            FrameDecoder::<ProxyToWorker>::new().next_message_after(&frame).map(|m| m.is_some()),
            FrameDecoder::<WorkerToProxy>::new().next_message_after(&frame).map(|m| m.is_some()),
        ] {
            match result {
                Ok(complete) => prop_assert!(complete),
                Err(err) => prop_assert!(matches!(err, WireError::Malformed { .. }), "{err}"),
            }
        }
    }

    #[test]
    fn mutated_frames_never_panic(message in to_proxy(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let mut bytes = encode_all(&[message]);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        drain_garbage::<WorkerToProxy>(&[bytes]);
    }

    #[test]
    fn request_ids_round_trip_through_text(id in request_id()) {
        let text = id.to_string();
        prop_assert_eq!(text.len(), 32);
        prop_assert_eq!(text.parse::<RequestId>(), Ok(id));
    }
}

/// One-shot decoding for the tests above.
trait DecodeOnce<M> {
    fn next_message_after(self, bytes: &[u8]) -> Result<Option<M>, WireError>;
}

impl<M: WireMessage> DecodeOnce<M> for FrameDecoder<M> {
    fn next_message_after(mut self, bytes: &[u8]) -> Result<Option<M>, WireError> {
        self.push(bytes);
        self.next_message()
    }
}
