//! The wire codec's contract, by example: the exact bytes of a frame, the
//! handshake's version check, and clear errors for oversize, truncated,
//! garbage and foreign-version frames.

use bulkhead_core::TenantId;
use bulkhead_core::wire::{
    Capacity, FinishReason, Finished, FrameDecoder, Hello, MAX_FRAME_LEN, ProxyToWorker,
    RejectKind, Rejected, RequestId, Role, Sampling, Submit, TenantBlocks, Violation,
    ViolationKind, WIRE_VERSION, WireError, WorkerBackend, WorkerInfo, WorkerToProxy, encode_frame,
};

fn frame_of<M: bulkhead_core::wire::WireMessage>(msg: &M) -> Vec<u8> {
    let mut out = Vec::new();
    let n = encode_frame(msg, &mut out).expect("encodes");
    assert_eq!(n, out.len());
    out
}

/// A frame with the given version and payload bytes, its length header set to match.
fn raw_frame(version: u16, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(2 + payload.len()).unwrap();
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn submit() -> ProxyToWorker {
    ProxyToWorker::Submit(Submit {
        request_id: RequestId(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
        tenant: TenantId::new("acme").unwrap(),
        model: "tiny-llama".to_owned(),
        prompt_tokens: vec![1, 15_043, 29_892, 2],
        max_tokens: 128,
        sampling: Sampling {
            temperature: 0.7,
            top_p: 0.95,
            seed: Some(42),
            stop: vec![vec![2], vec![13, 13]],
        },
        kv_block_quota: 64,
    })
}

#[test]
fn frame_layout_is_length_then_version_then_postcard_payload() {
    let frame = frame_of(&ProxyToWorker::Cancel {
        request_id: RequestId(5),
    });
    // len = 2 (version) + 1 (variant index 2) + 1 (u128 varint 5)
    assert_eq!(frame, [0, 0, 0, 4, 0x01, 0x01, 2, 5]);

    let frame = frame_of(&ProxyToWorker::Shutdown);
    assert_eq!(frame, [0, 0, 0, 3, 0x01, 0x01, 3]);
}

#[test]
fn every_message_round_trips_in_one_stream() {
    let to_worker = vec![
        ProxyToWorker::Hello(Hello::proxy(7)),
        submit(),
        ProxyToWorker::Cancel {
            request_id: RequestId(u128::MAX),
        },
        ProxyToWorker::Shutdown,
    ];
    let tenant = TenantId::new("acme").unwrap();
    let to_proxy = vec![
        WorkerToProxy::Hello(Hello::worker(
            7,
            WorkerInfo {
                backend: WorkerBackend::Cpu,
                models: vec!["tiny-llama".to_owned()],
                max_slots: 16,
                total_blocks: 4_096,
                block_tokens: 16,
            },
        )),
        WorkerToProxy::Tokens {
            request_id: RequestId(1),
            first_index: 0,
            tokens: vec![450, 4_996, 29_889],
        },
        WorkerToProxy::Violation(Violation {
            request_id: RequestId(1),
            tenant: tenant.clone(),
            kind: ViolationKind::CrossTenantRead,
            block: 913,
            detail: "block owned by another tenant".to_owned(),
        }),
        WorkerToProxy::Rejected(Rejected {
            request_id: Some(RequestId(2)),
            kind: RejectKind::PromptTooLong,
            detail: "prompt of 9000 tokens; the context holds 8192".to_owned(),
        }),
        WorkerToProxy::Finished(Finished {
            request_id: RequestId(1),
            reason: FinishReason::Error,
            prompt_tokens: 4,
            output_tokens: 3,
            prefix_cache_hit_tokens: 0,
            error: Some("KV guard violation".to_owned()),
        }),
        WorkerToProxy::Capacity(Capacity {
            free_slots: 15,
            free_blocks: 4_000,
            per_tenant: vec![TenantBlocks {
                tenant,
                used_blocks: 96,
                quota: 512,
            }],
        }),
    ];

    let mut bytes = Vec::new();
    for m in &to_worker {
        encode_frame(m, &mut bytes).unwrap();
    }
    let mut decoder = FrameDecoder::<ProxyToWorker>::new();
    decoder.push(&bytes);
    for m in &to_worker {
        assert_eq!(decoder.next_message().unwrap().as_ref(), Some(m));
    }
    assert_eq!(decoder.next_message(), Ok(None));
    assert_eq!(decoder.buffered_len(), 0);

    let mut bytes = Vec::new();
    for m in &to_proxy {
        encode_frame(m, &mut bytes).unwrap();
    }
    let mut decoder = FrameDecoder::<WorkerToProxy>::new();
    decoder.push(&bytes);
    for m in &to_proxy {
        assert_eq!(decoder.next_message().unwrap().as_ref(), Some(m));
    }
    assert_eq!(decoder.next_message(), Ok(None));
}

#[test]
fn hello_carries_the_version_and_refuses_another_major() {
    let hello = Hello::proxy(3);
    assert_eq!(hello.version, WIRE_VERSION);
    assert_eq!(hello.role, Role::Proxy);
    assert_eq!(hello.check_version(), Ok(()));

    let newer_minor = Hello {
        version: WIRE_VERSION + 1,
        ..hello.clone()
    };
    assert_eq!(newer_minor.check_version(), Ok(()));

    let next_major = Hello {
        version: WIRE_VERSION + 0x0100,
        ..hello
    };
    let err = next_major.check_version().unwrap_err();
    assert_eq!(
        err,
        WireError::VersionMismatch {
            ours: WIRE_VERSION,
            theirs: WIRE_VERSION + 0x0100
        }
    );
    assert_eq!(
        err.to_string(),
        "wire version mismatch: we speak 1.1, the peer speaks 2.1 (major versions must match)"
    );
}

#[test]
fn a_frame_of_another_major_version_is_refused_before_its_payload_arrives() {
    let mut decoder = FrameDecoder::<WorkerToProxy>::new();
    // Header and version of a 2.0 frame; its payload never comes.
    decoder.push(&[0, 0, 1, 0, 0x02, 0x00]);
    assert_eq!(
        decoder.next_message(),
        Err(WireError::VersionMismatch {
            ours: WIRE_VERSION,
            theirs: 0x0200
        })
    );

    // A newer minor version with a message this build knows decodes fine.
    let mut decoder = FrameDecoder::<ProxyToWorker>::new();
    decoder.push(&raw_frame(WIRE_VERSION + 1, &[3]));
    assert_eq!(decoder.next_message(), Ok(Some(ProxyToWorker::Shutdown)));
}

#[test]
fn an_oversize_length_is_refused_from_the_header_alone() {
    let mut decoder = FrameDecoder::<ProxyToWorker>::new();
    decoder.push(&(MAX_FRAME_LEN + 1).to_be_bytes());
    assert_eq!(
        decoder.next_message(),
        Err(WireError::FrameTooLarge {
            len: u64::from(MAX_FRAME_LEN) + 1,
            max: MAX_FRAME_LEN
        })
    );
    // The error sticks, and nothing more is buffered.
    decoder.push(&[0; 1024]);
    assert_eq!(decoder.buffered_len(), 0);
    assert!(matches!(
        decoder.next_message(),
        Err(WireError::FrameTooLarge { .. })
    ));

    let mut small = FrameDecoder::<ProxyToWorker>::with_max_frame_len(16);
    small.push(&frame_of(&submit()));
    assert!(matches!(
        small.next_message(),
        Err(WireError::FrameTooLarge { max: 16, .. })
    ));
}

#[test]
fn encoding_refuses_a_message_over_the_limit_and_leaves_the_buffer_alone() {
    let huge = ProxyToWorker::Submit(Submit {
        prompt_tokens: vec![u32::MAX; 4 * 1024 * 1024],
        ..match submit() {
            ProxyToWorker::Submit(s) => s,
            _ => unreachable!(),
        }
    });
    let mut out = vec![9, 9];
    let err = encode_frame(&huge, &mut out).unwrap_err();
    assert!(
        matches!(err, WireError::FrameTooLarge { len, max } if len > u64::from(max)),
        "{err}"
    );
    assert_eq!(out, [9, 9]);
}

#[test]
fn truncated_and_padded_payloads_are_malformed_with_context() {
    let frame = frame_of(&submit());
    let payload = &frame[6..];

    let truncated = raw_frame(WIRE_VERSION, &payload[..payload.len() - 3]);
    let mut decoder = FrameDecoder::<ProxyToWorker>::new();
    decoder.push(&truncated);
    let err = decoder.next_message().unwrap_err();
    let WireError::Malformed { what, reason } = &err else {
        panic!("expected Malformed, got {err:?}");
    };
    assert_eq!(
        what,
        &format!("ProxyToWorker payload of {} bytes", payload.len() - 3)
    );
    assert!(reason.contains("end of buffer"), "{reason}");

    let mut padded_payload = payload.to_vec();
    padded_payload.extend_from_slice(&[0, 0]);
    let mut decoder = FrameDecoder::<ProxyToWorker>::new();
    decoder.push(&raw_frame(WIRE_VERSION, &padded_payload));
    let err = decoder.next_message().unwrap_err();
    assert!(err.to_string().contains("2 trailing bytes"), "{err}");

    let mut decoder = FrameDecoder::<ProxyToWorker>::new();
    decoder.push(&[0, 0, 0, 1, 0x01]);
    let err = decoder.next_message().unwrap_err();
    assert!(
        err.to_string()
            .contains("shorter than its 2-byte version field"),
        "{err}"
    );
}

#[test]
fn unknown_variants_and_invalid_tenant_ids_are_malformed() {
    let mut decoder = FrameDecoder::<ProxyToWorker>::new();
    decoder.push(&raw_frame(WIRE_VERSION, &[99]));
    assert!(matches!(
        decoder.next_message(),
        Err(WireError::Malformed { .. })
    ));

    // A Violation whose tenant id is "ACME" (uppercase is not a tenant id).
    let mut payload = vec![4, 1]; // variant Violation, request id 1
    payload.push(4);
    payload.extend_from_slice(b"ACME");
    payload.extend_from_slice(&[0, 0, 0]); // kind, block, empty detail
    let mut decoder = FrameDecoder::<WorkerToProxy>::new();
    decoder.push(&raw_frame(WIRE_VERSION, &payload));
    let err = decoder.next_message().unwrap_err();
    assert!(err.to_string().contains("invalid value"), "{err}");

    // The same bytes with a valid tenant decode.
    payload[3..7].copy_from_slice(b"acme");
    let mut decoder = FrameDecoder::<WorkerToProxy>::new();
    decoder.push(&raw_frame(WIRE_VERSION, &payload));
    assert_eq!(
        decoder.next_message(),
        Ok(Some(WorkerToProxy::Violation(Violation {
            request_id: RequestId(1),
            tenant: TenantId::new("acme").unwrap(),
            kind: ViolationKind::CrossTenantRead,
            block: 0,
            detail: String::new(),
        })))
    );
}

#[test]
fn a_malformed_payload_skips_its_frame_and_the_next_frame_decodes() {
    let mut decoder = FrameDecoder::<ProxyToWorker>::new();
    decoder.push(&raw_frame(WIRE_VERSION, &[99]));
    decoder.push(&frame_of(&ProxyToWorker::Shutdown));
    assert!(matches!(
        decoder.next_message(),
        Err(WireError::Malformed { .. })
    ));
    assert!(!decoder.is_poisoned());
    assert_eq!(decoder.next_message(), Ok(Some(ProxyToWorker::Shutdown)));

    // A framing error, by contrast, ends the stream.
    decoder.push(&[0, 0, 0, 1, 0x01]);
    decoder.push(&frame_of(&ProxyToWorker::Shutdown));
    assert!(decoder.next_message().is_err());
    assert!(decoder.is_poisoned());
    assert!(decoder.next_message().is_err());
}

#[test]
fn finish_reasons_map_to_openai_strings() {
    assert_eq!(FinishReason::Stop.as_openai_str(), "stop");
    assert_eq!(FinishReason::Length.as_openai_str(), "length");
}
