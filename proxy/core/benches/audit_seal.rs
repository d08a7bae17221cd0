//! Sealing and chaining audit records on one core: records/s of
//! `SegmentSealer::seal` (postcard + AES-256-GCM + two SHA-256), against the
//! baseline of encoding the same record unsealed, measured in the same run.
//!
//! The goal is ≥ 200,000 sealed, chained records/s per core; the summary at
//! the end prints both rates and their ratio.

use bulkhead_core::TenantId;
use bulkhead_core::audit::{
    AuditEvent, ContentDigest, EventKind, MasterKey, PartitionId, RequestEvent, SegmentHeader,
    SegmentSealer, genesis_chain,
};
use bulkhead_core::wire::RequestId;
use criterion::{Criterion, Throughput};
use std::hint::black_box;
use std::time::{Duration, Instant};

const BATCH: u32 = 1_000;

fn event(i: u64) -> AuditEvent {
    AuditEvent {
        time_unix_ns: 1_700_000_000_000_000_000 + i,
        kind: EventKind::Request(RequestEvent {
            request_id: RequestId(u128::from(i) * 0x9e37_79b9_7f4a_7c15),
            tenant: TenantId::new("acme").unwrap(),
            model: "tiny-llama".into(),
            prompt_digest: ContentDigest([7; 32]),
            response_digest: ContentDigest([9; 32]),
            input_tokens: 512,
            output_tokens: 128,
            ttft_us: Some(21_000),
            latency_us: 250_000,
            worker: Some(2),
            rerouted: false,
            cache_hit: true,
            status: 200,
            error_code: None,
            source: Some("127.0.0.1:40000".parse().unwrap()),
            api_key_prefix: Some("bk_live_".into()),
        }),
    }
}

fn sealer() -> SegmentSealer {
    let partition = PartitionId::parse("acme").unwrap();
    let key = MasterKey::from_bytes([1; 32]).tenant_key(&partition);
    let header = SegmentHeader {
        segment: 1,
        key_id: key.key_id(),
        created_unix_ns: 0,
        prev_seq: 0,
        prev_chain: genesis_chain(&partition),
        partition,
    };
    SegmentSealer::new(&key, &header).unwrap()
}

/// Records/s of `f` over `BATCH` records, measured directly for the summary.
fn rate(mut f: impl FnMut(&[AuditEvent], &mut Vec<u8>)) -> f64 {
    let events: Vec<_> = (0..u64::from(BATCH)).map(event).collect();
    let mut out = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs(1) {
        out.clear();
        f(&events, &mut out);
        n += 1;
    }
    f64::from(n) * f64::from(BATCH) / start.elapsed().as_secs_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let events: Vec<_> = (0..u64::from(BATCH)).map(event).collect();
    let mut group = c.benchmark_group("audit_seal");
    group.throughput(Throughput::Elements(u64::from(BATCH)));
    let mut s = sealer();
    let mut out = Vec::with_capacity(1 << 20);
    group.bench_function("seal_and_chain", |b| {
        b.iter(|| {
            out.clear();
            for e in &events {
                black_box(s.seal(e, &mut out).unwrap());
            }
        });
    });
    group.bench_function("baseline_encode_unsealed", |b| {
        b.iter(|| {
            out.clear();
            for e in &events {
                out = postcard::to_extend(e, std::mem::take(&mut out)).unwrap();
            }
            black_box(out.len());
        });
    });
    group.finish();
    c.final_summary();

    let mut s = sealer();
    let sealed = rate(|evs, out| {
        for e in evs {
            black_box(s.seal(e, out).unwrap());
        }
    });
    let plain = rate(|evs, out| {
        for e in evs {
            *out = postcard::to_extend(e, std::mem::take(out)).unwrap();
        }
    });
    println!(
        "audit_seal summary: sealed+chained {sealed:.0} records/s (goal >= 200000: {}), \
         unsealed encode {plain:.0} records/s, ratio {:.2}",
        if sealed >= 200_000.0 { "met" } else { "MISSED" },
        sealed / plain
    );
}
