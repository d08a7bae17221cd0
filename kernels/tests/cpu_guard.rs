//! The CPU reference's guard: a foreign or out-of-range block in one
//! sequence's table zeroes and flags that sequence only; the rest of the
//! batch is bit-identical to a run without it.

use bulkhead_kernels::{
    backend::{Backend, SeqStep},
    cpu::{
        CpuBackend,
        ops::{self, PagedBatch, TokenIndex},
    },
    layout::{FREE_TAG, KvShape, Violation},
    model::{ModelConfig, SplitMix64, Weights},
};

const SHAPE: KvShape = KvShape {
    num_blocks: 64,
    layers: 2,
    kv_heads: 2,
    head_dim: 32,
    block_tokens: 16,
};
const HEADS: usize = 8;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.uniform(1.0)).collect()
}

/// Three decoding sequences of tenants 1, 2, 1 over disjoint blocks.
struct Fixture {
    kv: Vec<f32>,
    owners: Vec<u32>,
    tags: Vec<u32>,
    ctx: Vec<u32>,
    tables: Vec<u32>,
    max_blocks: usize,
}

fn fixture() -> Fixture {
    let max_blocks = 8;
    let tags = vec![1, 2, 1];
    let ctx = vec![100, 37, 128];
    let mut owners = vec![FREE_TAG; SHAPE.num_blocks];
    let mut tables = vec![u32::MAX; 3 * max_blocks];
    let mut next = 0u32;
    for s in 0..3 {
        for i in 0..SHAPE.blocks_for(ctx[s] as usize) {
            tables[s * max_blocks + i] = next;
            owners[next as usize] = tags[s];
            next += 1;
        }
    }
    Fixture {
        kv: random(SHAPE.total_elems(), 11),
        owners,
        tags,
        ctx,
        tables,
        max_blocks,
    }
}

fn attend(f: &Fixture, guard: bool) -> (Vec<f32>, Vec<u32>) {
    let q = random(3 * HEADS * SHAPE.head_dim, 5);
    let pos: Vec<u32> = f.ctx.iter().map(|c| c - 1).collect();
    let batch = PagedBatch {
        tags: &f.tags,
        ctx_lens: &f.ctx,
        block_tables: &f.tables,
        max_blocks: f.max_blocks,
    };
    let index = TokenIndex {
        seq: &[0, 1, 2],
        pos: &pos,
    };
    let mut out = vec![f32::NAN; q.len()];
    let mut flags = vec![0; 3];
    ops::paged_attention(
        &f.kv, &SHAPE, &f.owners, 1, &batch, &index, &q, HEADS, 0.17, guard, &mut out, &mut flags,
    );
    (out, flags)
}

fn rows(out: &[f32], s: usize) -> &[f32] {
    let n = HEADS * SHAPE.head_dim;
    &out[s * n..(s + 1) * n]
}

#[test]
fn a_foreign_block_zeroes_and_flags_only_its_sequence() {
    let clean = fixture();
    let (base, flags) = attend(&clean, true);
    assert_eq!(flags, [0, 0, 0]);
    assert!(base.iter().all(|x| x.is_finite()));
    assert_eq!(
        attend(&clean, false).0,
        base,
        "the guard changed a clean result"
    );

    let mut planted = fixture();
    // Sequence 0 (tenant 1) gets sequence 1's first block (tenant 2).
    planted.tables[3] = planted.tables[planted.max_blocks];
    let (out, flags) = attend(&planted, true);
    assert_eq!(flags, [Violation::CrossTenantRead as u32, 0, 0]);
    assert!(rows(&out, 0).iter().all(|&x| x == 0.0));
    assert_eq!(rows(&out, 1), rows(&base, 1));
    assert_eq!(rows(&out, 2), rows(&base, 2));
}

#[test]
fn out_of_range_short_tables_and_free_blocks_are_refused() {
    let base = attend(&fixture(), true).0;
    // A block index past the pool.
    let mut f = fixture();
    f.tables[f.max_blocks + 1] = 9_999;
    let (out, flags) = attend(&f, true);
    assert_eq!(flags, [0, Violation::InvalidBlock as u32, 0]);
    assert!(rows(&out, 1).iter().all(|&x| x == 0.0));
    assert_eq!(rows(&out, 0), rows(&base, 0));

    // A context longer than the table holds.
    let mut f = fixture();
    f.ctx[2] = u32::try_from(f.max_blocks * 16 + 1).unwrap();
    let (out, flags) = attend(&f, true);
    assert_eq!(flags[2], Violation::InvalidBlock as u32);
    assert!(rows(&out, 2).iter().all(|&x| x == 0.0));

    // A block owned by no one (freed and scrubbed) is not the tenant's either.
    let mut f = fixture();
    let blk = f.tables[2 * f.max_blocks + 3] as usize;
    f.owners[blk] = FREE_TAG;
    let (_, flags) = attend(&f, true);
    assert_eq!(flags, [0, 0, Violation::CrossTenantRead as u32]);
}

#[test]
fn a_refused_write_touches_nothing() {
    let f = fixture();
    let mut kv = f.kv.clone();
    let row = SHAPE.kv_heads * SHAPE.head_dim;
    let (k, v) = (random(2 * row, 1), random(2 * row, 2));
    let mut tables = f.tables.clone();
    tables[1] = f.tables[f.max_blocks]; // seq 0's block 1 -> tenant 2's block
    let batch = PagedBatch {
        tags: &f.tags,
        ctx_lens: &f.ctx,
        block_tables: &tables,
        max_blocks: f.max_blocks,
    };
    let mut flags = vec![0; 3];
    // Token 0: seq 0 at position 20 (block 1, refused); token 1: seq 2 at 5 (fine).
    ops::write_kv(
        &mut kv,
        &SHAPE,
        &f.owners,
        0,
        &batch,
        &TokenIndex {
            seq: &[0, 2],
            pos: &[20, 5],
        },
        &k,
        &v,
        &mut flags,
    );
    assert_eq!(flags, [Violation::CrossTenantWrite as u32, 0, 0]);
    let foreign = f.tables[f.max_blocks] as usize;
    let n = SHAPE.block_elems();
    assert_eq!(
        kv[foreign * n..(foreign + 1) * n],
        f.kv[foreign * n..(foreign + 1) * n]
    );
    let own = SHAPE.offset(f.tables[2 * f.max_blocks] as usize, 0, 0, 1, 5);
    assert_eq!(
        kv[own..own + SHAPE.head_dim],
        k[row + SHAPE.head_dim..2 * row]
    );
}

#[test]
fn the_backend_fails_closed_per_sequence_and_leaves_the_batch_alone() {
    let cfg = ModelConfig::tiny();
    let weights = Weights::from_seed(&cfg, 3);
    let prompt_a: Vec<u32> = (0..40).map(|i| (i * 7) % 256).collect();
    let prompt_b: Vec<u32> = (0..25).map(|i| (i * 13) % 256).collect();
    let run = |plant: bool| {
        let mut be = CpuBackend::new(cfg.clone(), weights.clone(), 16).unwrap();
        be.set_owner_tags(&[(0, 1), (1, 1), (2, 1), (3, 2), (4, 2)])
            .unwrap();
        let table_a: Vec<u32> = if plant { vec![0, 3, 2] } else { vec![0, 1, 2] };
        let steps = [
            SeqStep {
                tag: 1,
                tokens: &prompt_a,
                start_pos: 0,
                block_table: &table_a,
                want_logits: true,
            },
            SeqStep {
                tag: 2,
                tokens: &prompt_b,
                start_pos: 0,
                block_table: &[3, 4],
                want_logits: true,
            },
        ];
        let out = be.step(&steps).unwrap();
        (out, be.read_block(3).unwrap())
    };
    let (clean, _) = run(false);
    let (planted, block3) = run(true);
    assert_eq!(clean.outputs[0].flags, 0);
    assert_eq!(
        planted.outputs[0].flags,
        Violation::CrossTenantWrite as u32 | Violation::CrossTenantRead as u32
    );
    assert_eq!(
        planted.outputs[1], clean.outputs[1],
        "the other tenant's logits changed"
    );
    // Tenant 2's block holds only tenant 2's K/V: the same as in the clean run.
    let (_, clean_block3) = {
        let mut be = CpuBackend::new(cfg.clone(), weights.clone(), 16).unwrap();
        be.set_owner_tags(&[(3, 2), (4, 2)]).unwrap();
        let steps = [SeqStep {
            tag: 2,
            tokens: &prompt_b,
            start_pos: 0,
            block_table: &[3, 4],
            want_logits: true,
        }];
        (be.step(&steps).unwrap(), be.read_block(3).unwrap())
    };
    assert_eq!(block3, clean_block3, "tenant 1 wrote into tenant 2's block");
}

#[test]
fn matmul_rows_do_not_depend_on_their_batch() {
    let (k, m) = (67, 13);
    let w = random(m * k, 21);
    let x = random(7 * k, 22);
    let mut batched = vec![0.0; 7 * m];
    ops::matmul(&x, &w, k, &mut batched);
    for r in 0..7 {
        let mut alone = vec![0.0; m];
        ops::matmul(&x[r * k..(r + 1) * k], &w, k, &mut alone);
        assert_eq!(alone, batched[r * m..(r + 1) * m], "row {r}");
        let dots: Vec<f32> = (0..m)
            .map(|j| ops::dot(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k]))
            .collect();
        assert_eq!(alone, dots);
    }
}
