//! CPU benches: the guard's cost in paged attention (guarded against
//! unguarded, interleaved in the same run) and decode tokens/s of the
//! built-in model at batch 1 and 32.
//!
//! `cargo bench -p bulkhead-kernels --bench cpu_engine`

use bulkhead_kernels::{
    backend::{Backend, SeqStep},
    cpu::{
        CpuBackend,
        ops::{self, PagedBatch, TokenIndex},
    },
    layout::{FREE_TAG, KvShape},
    model::{ModelConfig, SplitMix64, Weights},
};
use criterion::{BenchmarkId, Criterion, Throughput};
use std::{hint::black_box, time::Instant};

/// A decode batch over a paged cache: `batch` sequences of `ctx` tokens.
struct Attn {
    shape: KvShape,
    heads: usize,
    kv: Vec<f32>,
    owners: Vec<u32>,
    tags: Vec<u32>,
    ctx: Vec<u32>,
    tables: Vec<u32>,
    max_blocks: usize,
    q: Vec<f32>,
    seq: Vec<u32>,
    pos: Vec<u32>,
}

impl Attn {
    #[allow(clippy::cast_possible_truncation)]
    fn new(batch: usize, ctx: usize, heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        let max_blocks = ctx.div_ceil(16);
        let shape = KvShape {
            num_blocks: batch * max_blocks,
            layers: 1,
            kv_heads,
            head_dim,
            block_tokens: 16,
        };
        let mut rng = SplitMix64::new(1);
        let mut owners = vec![FREE_TAG; shape.num_blocks];
        // Blocks interleaved across sequences, as a busy pool hands them out.
        let tables: Vec<u32> = (0..batch * max_blocks)
            .map(|i| {
                let (s, b) = (i / max_blocks, i % max_blocks);
                let block = b * batch + s;
                owners[block] = 1 + (s % 4) as u32;
                block as u32
            })
            .collect();
        Self {
            shape,
            heads,
            kv: (0..shape.total_elems()).map(|_| rng.uniform(1.0)).collect(),
            owners,
            tags: (0..batch).map(|s| 1 + (s % 4) as u32).collect(),
            ctx: vec![ctx as u32; batch],
            tables,
            max_blocks,
            q: (0..batch * heads * head_dim)
                .map(|_| rng.uniform(1.0))
                .collect(),
            seq: (0..batch as u32).collect(),
            pos: vec![ctx as u32 - 1; batch],
        }
    }

    fn run(&self, guard: bool, out: &mut [f32]) {
        let mut flags = vec![0; self.tags.len()];
        ops::paged_attention(
            &self.kv,
            &self.shape,
            &self.owners,
            0,
            &PagedBatch {
                tags: &self.tags,
                ctx_lens: &self.ctx,
                block_tables: &self.tables,
                max_blocks: self.max_blocks,
            },
            &TokenIndex {
                seq: &self.seq,
                pos: &self.pos,
            },
            &self.q,
            self.heads,
            0.1,
            guard,
            out,
            &mut flags,
        );
        assert!(flags.iter().all(|&f| f == 0));
    }
}

const SHAPES: [(&str, usize, usize, usize, usize, usize); 2] = [
    // name, batch, ctx, heads, kv_heads, head_dim
    ("tiny-b32-ctx1024", 32, 1024, 8, 2, 32),
    ("llama8b-b4-ctx2048", 4, 2048, 32, 8, 128),
];

fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("paged_attention");
    for (name, batch, ctx, heads, kv_heads, hd) in SHAPES {
        let a = Attn::new(batch, ctx, heads, kv_heads, hd);
        let mut out = vec![0.0; a.q.len()];
        group.throughput(Throughput::Elements((batch * ctx) as u64));
        for guard in [true, false] {
            let label = if guard { "guarded" } else { "unguarded" };
            group.bench_function(BenchmarkId::new(label, name), |b| {
                b.iter(|| a.run(black_box(guard), &mut out));
            });
        }
    }
    group.finish();
}

/// Guarded over unguarded time, interleaved round by round so drift hits both.
fn guard_overhead() {
    for (name, batch, ctx, heads, kv_heads, hd) in SHAPES {
        let a = Attn::new(batch, ctx, heads, kv_heads, hd);
        let mut out = vec![0.0; a.q.len()];
        let mut ratios = Vec::new();
        for round in 0..41 {
            let mut t = [0.0f64; 2];
            for (i, guard) in [(round % 2, true), (1 - round % 2, false)] {
                let start = Instant::now();
                for _ in 0..5 {
                    a.run(guard, &mut out);
                }
                t[i] = start.elapsed().as_secs_f64();
            }
            let (g, u) = if round % 2 == 0 {
                (t[0], t[1])
            } else {
                (t[1], t[0])
            };
            ratios.push(g / u);
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        println!(
            "guard overhead {name}: {:+.2}% (median of {} interleaved rounds; goal <= 2%)",
            (median - 1.0) * 100.0,
            ratios.len()
        );
    }
}

fn decode(c: &mut Criterion) {
    let cfg = ModelConfig::tiny();
    let weights = Weights::from_seed(&cfg, 1);
    let mut group = c.benchmark_group("decode_tiny_model");
    for batch in [1usize, 32] {
        let ctx = 128u32;
        let blocks_each = (ctx as usize).div_ceil(16);
        let mut be = CpuBackend::new(cfg.clone(), weights.clone(), batch * blocks_each).unwrap();
        let updates: Vec<(u32, u32)> = (0..batch * blocks_each)
            .map(|b| {
                (
                    u32::try_from(b).unwrap(),
                    1 + u32::try_from(b / blocks_each).unwrap(),
                )
            })
            .collect();
        be.set_owner_tags(&updates).unwrap();
        let tables: Vec<Vec<u32>> = (0..batch)
            .map(|s| {
                (0..blocks_each)
                    .map(|i| u32::try_from(s * blocks_each + i).unwrap())
                    .collect()
            })
            .collect();
        let tokens: Vec<[u32; 1]> = (0..batch)
            .map(|s| [u32::try_from(s % 256).unwrap()])
            .collect();
        // One decode step at position ctx-1: each iteration is a steady-state step.
        let steps: Vec<SeqStep<'_>> = (0..batch)
            .map(|s| SeqStep {
                tag: 1 + u32::try_from(s).unwrap(),
                tokens: &tokens[s],
                start_pos: ctx - 1,
                block_table: &tables[s],
                want_logits: true,
            })
            .collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(
            BenchmarkId::new("tokens", format!("batch{batch}-ctx{ctx}")),
            |b| {
                b.iter(|| black_box(be.step(&steps).unwrap()));
            },
        );
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    attention(&mut c);
    decode(&mut c);
    c.final_summary();
    if !std::env::args().any(|a| a == "--list") {
        guard_overhead();
    }
}
