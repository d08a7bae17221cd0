//! Enqueue + dequeue with 10,000 tenants and 1,000,000 queued requests:
//! bulkhead's `FairQueue` against the seed's sort-everything WFQ, in one run.
//!
//! Both queues are filled to 1,000,000 requests first; each iteration then
//! enqueues `BATCH` requests and dequeues `BATCH` (one scheduling batch, after
//! which the seed sorted every queued request), so the size stays at 1M.
//! Criterion reports time per iteration; the summary at the end divides by the
//! 2 × `BATCH` operations and prints the ratio between the two.

use bulkhead_core::TenantId;
use bulkhead_core::fair_queue::{FairQueue, ServiceWeights};
use bulkhead_core::sim::{SimRng, SortingWfq, Ticket};
use criterion::{BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

const TENANTS: u32 = 10_000;
const QUEUED: usize = 1_000_000;
const BATCH: u32 = 64;

struct Workload {
    tenants: Vec<TenantId>,
    rng: SimRng,
    next_id: u64,
}

impl Workload {
    fn new() -> Self {
        Self {
            tenants: (0..TENANTS)
                .map(|i| TenantId::new(&format!("tenant-{i}")).unwrap())
                .collect(),
            rng: SimRng::new(42),
            next_id: 0,
        }
    }

    /// The next request: a random tenant, a prompt of 16–2,048 tokens.
    fn next(&mut self) -> Ticket {
        let tenant = self.tenants[self.rng.range(0, TENANTS - 1) as usize].clone();
        self.next_id += 1;
        Ticket {
            id: self.next_id,
            tenant,
            prompt_tokens: self.rng.range(16, 2_048),
            max_tokens: 256,
            output_tokens: 0,
        }
    }
}

fn filled_fair_queue(w: &mut Workload) -> FairQueue<Ticket> {
    let mut q = FairQueue::new(ServiceWeights::default());
    for (i, t) in (0..).zip(&w.tenants) {
        q.set_tenant(t, 1 + i % 4, u32::MAX);
    }
    for _ in 0..QUEUED {
        let t = w.next();
        q.enqueue(&t.tenant.clone(), t.prompt_tokens, t).unwrap();
    }
    q
}

fn filled_seed_wfq(w: &mut Workload) -> SortingWfq {
    let mut q = SortingWfq::new(ServiceWeights::default());
    for (i, t) in (0..).zip(&w.tenants) {
        q.set_tenant(t, 1 + i % 4, u32::MAX);
    }
    for _ in 0..QUEUED {
        assert!(q.enqueue(w.next()));
    }
    q.sort();
    q
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("fair_queue_10k_tenants_1m_queued");
    group.throughput(Throughput::Elements(2 * u64::from(BATCH)));
    group.warm_up_time(Duration::from_secs(1));

    let mut w = Workload::new();
    let mut q = filled_fair_queue(&mut w);
    group.sample_size(50);
    group.bench_function("bulkhead_vtc", |b| {
        b.iter_batched(
            || (0..BATCH).map(|_| w.next()).collect::<Vec<_>>(),
            |batch| {
                for t in batch {
                    q.enqueue(&t.tenant.clone(), t.prompt_tokens, t).unwrap();
                }
                for _ in 0..BATCH {
                    let d = q.dequeue().unwrap();
                    q.charge_output(&d.tenant, 1);
                    black_box(d);
                }
            },
            BatchSize::SmallInput,
        );
    });
    drop(q);

    let mut w = Workload::new();
    let mut seed = filled_seed_wfq(&mut w);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("seed_sorting_wfq", |b| {
        b.iter_batched(
            || (0..BATCH).map(|_| w.next()).collect::<Vec<_>>(),
            |batch| {
                for t in batch {
                    assert!(seed.enqueue(t));
                }
                // The seed sorts every queued request once per batch.
                seed.sort();
                for _ in 0..BATCH {
                    black_box(seed.dequeue().unwrap());
                }
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// Reads criterion's point estimate (ns per iteration) of one benchmark.
fn estimate_ns(name: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../target").to_owned());
    let path =
        format!("{target}/criterion/fair_queue_10k_tenants_1m_queued/{name}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    if let (Some(ours), Some(seed)) = (estimate_ns("bulkhead_vtc"), estimate_ns("seed_sorting_wfq"))
    {
        let ops = 2.0 * f64::from(BATCH);
        #[allow(clippy::print_stdout)]
        {
            println!("\nper operation (enqueue or dequeue), {TENANTS} tenants, {QUEUED} queued:");
            println!("  bulkhead VTC       {:>12.1} ns/op", ours / ops);
            println!("  seed sorting WFQ   {:>12.1} ns/op", seed / ops);
            println!("  speed-up           {:>12.1}x", seed / ours);
        }
    }
}
