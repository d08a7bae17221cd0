//! The CUDA kernels against the CPU reference (`kernels::cpu::ops`), op by op
//! on random data, the guard's verdicts and isolation, and the whole tiny
//! model.
//!
//! Every test needs an NVIDIA GPU: they are ignored by default and run with
//! `cargo test -p bulkhead-kernels --test gpu_parity -- --ignored`. Asked to
//! run where there is no GPU, each one fails (it does not skip).
//!
//! Tolerances (a kernel sums in another order than the CPU, so exact equality
//! is asked only where no rounding differs): with `scale = max(1, max |ref|)`,
//! - `rms_norm`, rope, swiglu: max |gpu - cpu| <= 1e-5 * scale;
//! - matmul: <= 2e-5 * scale (k up to 768 terms);
//! - attention (decode split-K and generic): <= 1e-5 * scale;
//! - embed, Q/K/V split, residual add, KV write: bit-identical;
//! - whole model: logits within 1e-4 * scale and the same greedy tokens.
//!
//! Seen on an H100 (relative to scale): `rms_norm`, rope <= 9e-8, swiglu 1e-10,
//! matmul <= 1.1e-6, attention <= 1.8e-7, tiny-model logits <= 1.7e-6.
//!
//! Every comparison prints the difference it saw.

#![allow(clippy::many_single_char_names)] // q, k, v, n: the math's own names
#![allow(clippy::float_cmp)] // exact values are the point: copies and fills must be bit-exact
#![allow(clippy::needless_range_loop)] // per-sequence arrays indexed side by side

use bulkhead_kernels::{
    backend::{Backend, SeqStep},
    cpu::{
        CpuBackend,
        ops::{self as cpu, PagedBatch, TokenIndex},
    },
    cuda::{self, CudaBackend, CudaOps, DecodeScratch, DeviceBatch, DeviceKv},
    layout::{FREE_TAG, KvShape, Violation},
    model::{ModelConfig, SplitMix64, Weights},
};

const READ: u32 = Violation::CrossTenantRead as u32;
const WRITE: u32 = Violation::CrossTenantWrite as u32;
const INVALID: u32 = Violation::InvalidBlock as u32;

fn gpu() -> CudaOps {
    assert!(
        cuda::available(),
        "this test needs an NVIDIA GPU and its driver (libcuda): cuda::available() is false here"
    );
    CudaOps::new(0).unwrap_or_else(|e| panic!("cannot start the CUDA ops on GPU 0: {e}"))
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.uniform(1.0)).collect()
}

/// Asserts `got` is within `tol * max(1, max |want|)` of `want` everywhere
/// (and finite); returns the largest difference.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let mut worst = 0.0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g} (want {w})");
        let d = (g - w).abs();
        assert!(
            d <= tol * scale,
            "{what}: element {i}: gpu {g}, cpu {w}, |diff| {d} > {tol} * {scale}"
        );
        worst = worst.max(d);
    }
    println!(
        "{what}: max |gpu - cpu| = {worst:.3e} (scale {scale:.3}, relative {:.3e})",
        worst / scale
    );
    worst
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn dense_ops_match_the_cpu() {
    let ops = gpu();
    println!("device: {:?}", ops.info());

    // rms_norm
    for (rows, d) in [(7usize, 256usize), (3, 300), (1, 4096)] {
        let x = random(rows * d, 1);
        let w = random(d, 2);
        let mut want = vec![0.0; rows * d];
        cpu::rms_norm(&x, &w, 1e-5, &mut want);
        let (xd, wd) = (ops.upload(&x).unwrap(), ops.upload(&w).unwrap());
        let mut out = ops.upload(&vec![f32::NAN; rows * d]).unwrap();
        ops.rms_norm(&xd, &wd, rows, d, 1e-5, &mut out).unwrap();
        assert_close(
            &format!("rms_norm {rows}x{d}"),
            &ops.download(&out).unwrap(),
            &want,
            1e-5,
        );
    }

    // matmul: tiles with ragged edges in every dimension
    for (n, k, m) in [
        (1usize, 256usize, 1024usize),
        (37, 256, 258),
        (65, 768, 256),
        (130, 100, 70),
    ] {
        let x = random(n * k, 3);
        let w = random(m * k, 4);
        let mut want = vec![0.0; n * m];
        cpu::matmul(&x, &w, k, &mut want);
        let (xd, wd) = (ops.upload(&x).unwrap(), ops.upload(&w).unwrap());
        let mut out = ops.upload(&vec![f32::NAN; n * m]).unwrap();
        ops.matmul(&xd, &wd, n, k, m, &mut out).unwrap();
        assert_close(
            &format!("matmul {n}x{k} . ({m}x{k})T"),
            &ops.download(&out).unwrap(),
            &want,
            2e-5,
        );
    }

    // rope, at positions up to a long context
    for (heads, hd, theta) in [
        (8usize, 32usize, 10_000.0f32),
        (4, 128, 500_000.0),
        (2, 64, 10_000.0),
    ] {
        let n = 50;
        let mut rng = SplitMix64::new(9);
        let pos: Vec<u32> = (0..n)
            .map(|_| u32::try_from(rng.next_u64() % 32_768).unwrap())
            .collect();
        let x = random(n * heads * hd, 5);
        let mut want = x.clone();
        cpu::rope(&mut want, &pos, heads, hd, theta);
        let mut xd = ops.upload(&x).unwrap();
        let pd = ops.upload(&pos).unwrap();
        ops.rope(&mut xd, &pd, n, heads, hd, theta).unwrap();
        assert_close(
            &format!("rope heads {heads} hd {hd} theta {theta}"),
            &ops.download(&xd).unwrap(),
            &want,
            1e-5,
        );
    }

    // swiglu
    let (n, ffn) = (9, 768);
    let gu: Vec<f32> = random(n * 2 * ffn, 6).iter().map(|v| v * 8.0).collect();
    let mut want = vec![0.0; n * ffn];
    cpu::swiglu(&gu, ffn, &mut want);
    let gud = ops.upload(&gu).unwrap();
    let mut out = ops.upload(&vec![f32::NAN; n * ffn]).unwrap();
    ops.swiglu(&gud, n, ffn, &mut out).unwrap();
    assert_close("swiglu", &ops.download(&out).unwrap(), &want, 1e-5);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn glue_ops_are_exact() {
    let ops = gpu();
    let (vocab, hidden, n) = (258, 256, 11);
    let table = random(vocab * hidden, 7);
    let tokens: Vec<u32> = (0..n)
        .map(|i| u32::try_from(i * 23 % vocab).unwrap())
        .collect();
    let mut out = ops.upload(&vec![f32::NAN; n * hidden]).unwrap();
    ops.embed(
        &ops.upload(&tokens).unwrap(),
        n,
        &ops.upload(&table).unwrap(),
        vocab,
        hidden,
        &mut out,
    )
    .unwrap();
    let want: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| table[t as usize * hidden..][..hidden].to_vec())
        .collect();
    assert_eq!(ops.download(&out).unwrap(), want, "embed");

    let (q_w, kv_w) = (256, 64);
    let qkv = random(n * (q_w + 2 * kv_w), 8);
    let mut q = ops.zeros::<f32>(n * q_w).unwrap();
    let mut k = ops.zeros::<f32>(n * kv_w).unwrap();
    let mut v = ops.zeros::<f32>(n * kv_w).unwrap();
    ops.split_qkv(
        &ops.upload(&qkv).unwrap(),
        n,
        q_w,
        kv_w,
        &mut q,
        &mut k,
        &mut v,
    )
    .unwrap();
    let (q, k, v) = (
        ops.download(&q).unwrap(),
        ops.download(&k).unwrap(),
        ops.download(&v).unwrap(),
    );
    for (t, row) in qkv.chunks_exact(q_w + 2 * kv_w).enumerate() {
        assert_eq!(q[t * q_w..][..q_w], row[..q_w], "q row {t}");
        assert_eq!(k[t * kv_w..][..kv_w], row[q_w..q_w + kv_w], "k row {t}");
        assert_eq!(v[t * kv_w..][..kv_w], row[q_w + kv_w..], "v row {t}");
    }

    let (a, b) = (random(1000, 9), random(1000, 10));
    let mut ad = ops.upload(&a).unwrap();
    ops.add_assign(&mut ad, &ops.upload(&b).unwrap(), 1000)
        .unwrap();
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(ops.download(&ad).unwrap(), want, "add");
}

/// A paged batch over a cache of random contents: sequence `s` of tenant
/// `tags[s]` owns the blocks of its table (distinct, shuffled).
#[derive(Clone)]
struct Fixture {
    shape: KvShape,
    heads: usize,
    kv: Vec<f32>,
    owners: Vec<u32>,
    tags: Vec<u32>,
    ctx: Vec<u32>,
    tables: Vec<u32>,
    max_blocks: usize,
}

impl Fixture {
    fn new(heads: usize, kv_heads: usize, head_dim: usize, ctx: &[u32], seed: u64) -> Self {
        let max_blocks = ctx
            .iter()
            .map(|&c| (c as usize).div_ceil(16))
            .max()
            .unwrap_or(1)
            .max(1)
            + 2;
        let need: usize = ctx.iter().map(|&c| (c as usize).div_ceil(16)).sum();
        let shape = KvShape {
            num_blocks: need + 8,
            layers: 2,
            kv_heads,
            head_dim,
            block_tokens: 16,
        };
        // A shuffled block order, so tables are not contiguous.
        let mut order: Vec<u32> = (0..u32::try_from(shape.num_blocks).unwrap()).collect();
        let mut rng = SplitMix64::new(seed);
        for i in (1..order.len()).rev() {
            let j = usize::try_from(rng.next_u64() % (i as u64 + 1)).unwrap();
            order.swap(i, j);
        }
        let tags: Vec<u32> = (0..ctx.len())
            .map(|s| 1 + u32::try_from(s % 3).unwrap())
            .collect();
        let mut owners = vec![FREE_TAG; shape.num_blocks];
        let mut tables = vec![u32::MAX; ctx.len() * max_blocks];
        let mut next = order.into_iter();
        for (s, &c) in ctx.iter().enumerate() {
            for i in 0..(c as usize).div_ceil(16) {
                let b = next.next().unwrap();
                tables[s * max_blocks + i] = b;
                owners[b as usize] = tags[s];
            }
        }
        // The spare blocks belong to a tenant in no sequence.
        for b in next {
            owners[b as usize] = 99;
        }
        Self {
            shape,
            heads,
            kv: random(shape.total_elems(), seed + 1),
            owners,
            tags,
            ctx: ctx.to_vec(),
            tables,
            max_blocks,
        }
    }

    fn paged(&self) -> PagedBatch<'_> {
        PagedBatch {
            tags: &self.tags,
            ctx_lens: &self.ctx,
            block_tables: &self.tables,
            max_blocks: self.max_blocks,
        }
    }

    fn row(&self) -> usize {
        self.heads * self.shape.head_dim
    }

    fn scale(&self) -> f32 {
        #[allow(clippy::cast_precision_loss)]
        let hd = self.shape.head_dim as f32;
        1.0 / hd.sqrt()
    }

    /// A spare block (owned by tenant 99), outside every table.
    fn spare(&self) -> u32 {
        u32::try_from(self.owners.iter().position(|&o| o == 99).unwrap()).unwrap()
    }

    /// The fixture without sequence `s`.
    fn without(&self, s: usize) -> Self {
        let mut f = self.clone();
        f.tags.remove(s);
        f.ctx.remove(s);
        f.tables
            .drain(s * self.max_blocks..(s + 1) * self.max_blocks);
        f
    }

    fn cpu_attention(
        &self,
        layer: usize,
        index: &TokenIndex<'_>,
        q: &[f32],
    ) -> (Vec<f32>, Vec<u32>) {
        let mut out = vec![f32::NAN; q.len()];
        let mut flags = vec![0; self.tags.len()];
        cpu::paged_attention(
            &self.kv,
            &self.shape,
            &self.owners,
            layer,
            &self.paged(),
            index,
            q,
            self.heads,
            self.scale(),
            true,
            &mut out,
            &mut flags,
        );
        (out, flags)
    }

    fn device_kv(&self, ops: &CudaOps) -> DeviceKv {
        let mut kv = DeviceKv::new(ops, self.shape).unwrap();
        kv.upload(ops, &self.kv).unwrap();
        kv.set_owners(ops, 0, &self.owners).unwrap();
        kv
    }

    /// Decode attention on the GPU (split-K unless the shape has no such
    /// kernel); `part`: tokens per partition.
    fn gpu_decode(
        &self,
        ops: &CudaOps,
        layer: usize,
        q: &[f32],
        guard: bool,
        part: Option<u32>,
    ) -> (Vec<f32>, Vec<u32>) {
        let kv = self.device_kv(ops);
        let mut batch = DeviceBatch::decode(ops, &self.paged()).unwrap();
        let qd = ops.upload(q).unwrap();
        let mut out = ops.upload(&vec![f32::NAN; q.len()]).unwrap();
        let mut flags = ops.zeros::<u32>(self.tags.len()).unwrap();
        let mut scratch = DecodeScratch::new();
        let launch = ops
            .paged_attention_decode(
                &kv,
                layer,
                &mut batch,
                &qd,
                self.heads,
                self.scale(),
                guard,
                &mut out,
                &mut flags,
                &mut scratch,
                part,
            )
            .unwrap();
        println!("  decode launch: {launch:?}");
        (
            ops.download(&out).unwrap(),
            ops.download_prefix(&flags, self.tags.len()).unwrap(),
        )
    }

    /// Generic (prefill) attention on the GPU.
    fn gpu_generic(
        &self,
        ops: &CudaOps,
        layer: usize,
        index: &TokenIndex<'_>,
        q: &[f32],
    ) -> (Vec<f32>, Vec<u32>) {
        let kv = self.device_kv(ops);
        let mut batch = DeviceBatch::new(ops, &self.paged(), index).unwrap();
        let qd = ops.upload(q).unwrap();
        let mut out = ops.upload(&vec![f32::NAN; q.len()]).unwrap();
        let mut flags = ops.zeros::<u32>(self.tags.len()).unwrap();
        ops.paged_attention(
            &kv,
            layer,
            &mut batch,
            &qd,
            self.heads,
            self.scale(),
            true,
            &mut out,
            &mut flags,
        )
        .unwrap();
        (
            ops.download(&out).unwrap(),
            ops.download_prefix(&flags, self.tags.len()).unwrap(),
        )
    }

    fn decode_index(&self) -> (Vec<u32>, Vec<u32>) {
        let seq = (0..u32::try_from(self.tags.len()).unwrap()).collect();
        let pos = self.ctx.iter().map(|c| c - 1).collect();
        (seq, pos)
    }
}

fn rows(out: &[f32], row: usize, r: usize) -> &[f32] {
    &out[r * row..(r + 1) * row]
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn decode_attention_matches_the_cpu() {
    let ops = gpu();
    // (heads, kv_heads, head_dim): the tiny model, no grouping, Llama-3-8B-like,
    // Llama-70B-like grouping, and a head_dim with no split-K kernel (generic path).
    for (heads, kv_heads, hd) in [
        (8, 2, 32),
        (8, 8, 64),
        (32, 8, 128),
        (16, 2, 128),
        (4, 2, 80),
    ] {
        let f = Fixture::new(heads, kv_heads, hd, &[1, 17, 300, 1000, 2500], 20);
        let q = random(f.tags.len() * f.row(), 21);
        let (seq, pos) = f.decode_index();
        let (want, want_flags) = f.cpu_attention(
            1,
            &TokenIndex {
                seq: &seq,
                pos: &pos,
            },
            &q,
        );
        assert_eq!(want_flags, vec![0; f.tags.len()]);
        for part in [None, Some(64), Some(512), Some(4096)] {
            let (got, flags) = f.gpu_decode(&ops, 1, &q, true, part);
            assert_eq!(flags, want_flags);
            assert_close(
                &format!("decode heads {heads}/{kv_heads} hd {hd} part {part:?}"),
                &got,
                &want,
                1e-5,
            );
            let (unguarded, _) = f.gpu_decode(&ops, 1, &q, false, part);
            assert_eq!(unguarded, got, "the guard changed a clean result");
        }
        let (got, flags) = f.gpu_generic(
            &ops,
            1,
            &TokenIndex {
                seq: &seq,
                pos: &pos,
            },
            &q,
        );
        assert_eq!(flags, want_flags);
        assert_close(
            &format!("generic decode heads {heads}/{kv_heads} hd {hd}"),
            &got,
            &want,
            1e-5,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn decode_guard_refuses_and_isolates_like_the_cpu() {
    let ops = gpu();
    for (heads, kv_heads, hd) in [(8, 2, 32), (32, 8, 128)] {
        let clean = Fixture::new(heads, kv_heads, hd, &[700, 450, 1200, 90], 30);
        let q = random(clean.tags.len() * clean.row(), 31);
        let planted_seq = 1;
        let mut cases = Vec::new();
        // A foreign block (the first block of sequence 2, another tenant) and a
        // block past the pool, both in sequence 1.
        let mut f = clean.clone();
        f.tables[planted_seq * f.max_blocks + 3] = f.tables[2 * f.max_blocks];
        f.tables[planted_seq * f.max_blocks + 20] = 1_000_000;
        cases.push(("foreign + out of range", f, READ | INVALID));
        // A block of a tenant in no sequence.
        let mut f = clean.clone();
        f.tables[planted_seq * f.max_blocks + 27] = f.spare();
        cases.push(("spare tenant's block", f, READ));
        // A free block (scrubbed, owned by no one).
        let mut f = clean.clone();
        let b = f.tables[planted_seq * f.max_blocks + 5] as usize;
        f.owners[b] = FREE_TAG;
        cases.push(("free block", f, READ));
        // A context longer than the table.
        let mut f = clean.clone();
        f.ctx[planted_seq] = u32::try_from(f.max_blocks * 16 + 1).unwrap();
        cases.push(("context past the table", f, INVALID));

        for (name, f, bits) in cases {
            let (seq, pos) = f.decode_index();
            let (want, want_flags) = f.cpu_attention(
                0,
                &TokenIndex {
                    seq: &seq,
                    pos: &pos,
                },
                &q,
            );
            let mut expect = vec![0; f.tags.len()];
            expect[planted_seq] = bits;
            assert_eq!(want_flags, expect, "{name}: the CPU reference's flags");
            let alone = f.without(planted_seq);
            let q_alone: Vec<f32> = q
                .chunks_exact(f.row())
                .enumerate()
                .filter(|(s, _)| *s != planted_seq)
                .flat_map(|(_, r)| r.to_vec())
                .collect();
            for part in [Some(64), Some(512)] {
                let (got, flags) = f.gpu_decode(&ops, 0, &q, true, part);
                assert_eq!(flags, want_flags, "{name}, part {part:?}: flags");
                assert!(
                    rows(&got, f.row(), planted_seq).iter().all(|&x| x == 0.0),
                    "{name}, part {part:?}: the refused sequence's output is not all zeros"
                );
                assert_close(&format!("{name} hd {hd} part {part:?}"), &got, &want, 1e-5);
                let (base, base_flags) = alone.gpu_decode(&ops, 0, &q_alone, true, part);
                assert_eq!(base_flags, vec![0; alone.tags.len()]);
                let others: Vec<f32> = got
                    .chunks_exact(f.row())
                    .enumerate()
                    .filter(|(s, _)| *s != planted_seq)
                    .flat_map(|(_, r)| r.to_vec())
                    .collect();
                assert_eq!(
                    others, base,
                    "{name}, part {part:?}: the other sequences differ from a batch without the refused one"
                );
            }
            // The generic kernel agrees.
            let (got, flags) = f.gpu_generic(
                &ops,
                0,
                &TokenIndex {
                    seq: &seq,
                    pos: &pos,
                },
                &q,
            );
            assert_eq!(flags, want_flags, "{name}: generic flags");
            assert!(rows(&got, f.row(), planted_seq).iter().all(|&x| x == 0.0));
            assert_close(&format!("{name} hd {hd} generic"), &got, &want, 1e-5);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn prefill_attention_matches_and_refuses_like_the_cpu() {
    let ops = gpu();
    for (heads, kv_heads, hd) in [(8, 2, 32), (8, 4, 64), (4, 2, 128), (6, 3, 80)] {
        let clean = Fixture::new(heads, kv_heads, hd, &[40, 100, 64, 33], 40);
        // Chunks: seq 0 its whole prompt, seq 1 positions 60..100, seq 2 one
        // token at 63, seq 3 positions 1..33; interleaved order.
        let mut seq = Vec::new();
        let mut pos = Vec::new();
        for (s, range) in [(0u32, 0..40u32), (1, 60..100), (2, 63..64), (3, 1..33)] {
            for p in range {
                seq.push(s);
                pos.push(p);
            }
        }
        let q = random(seq.len() * clean.row(), 41);
        let index = TokenIndex {
            seq: &seq,
            pos: &pos,
        };
        let (want, want_flags) = clean.cpu_attention(1, &index, &q);
        assert_eq!(want_flags, vec![0; 4]);
        let (got, flags) = clean.gpu_generic(&ops, 1, &index, &q);
        assert_eq!(flags, want_flags);
        assert_close(
            &format!("prefill heads {heads}/{kv_heads} hd {hd}"),
            &got,
            &want,
            1e-5,
        );

        // Sequence 1 gets a foreign block and an out-of-range one; sequence 3's
        // last token claims a position past its context.
        let mut f = clean.clone();
        f.tables[f.max_blocks + 2] = f.tables[0];
        f.tables[f.max_blocks + 4] = 77_777;
        let mut bad_pos = pos.clone();
        let last = bad_pos.len() - 1;
        bad_pos[last] = 33;
        let index = TokenIndex {
            seq: &seq,
            pos: &bad_pos,
        };
        let (want, want_flags) = f.cpu_attention(1, &index, &q);
        assert_eq!(want_flags, vec![0, READ | INVALID, 0, INVALID]);
        let (got, flags) = f.gpu_generic(&ops, 1, &index, &q);
        assert_eq!(flags, want_flags, "prefill flags");
        for (t, &s) in seq.iter().enumerate() {
            if s == 1 || t == last {
                assert!(
                    rows(&got, f.row(), t).iter().all(|&x| x == 0.0),
                    "token {t} not zeroed"
                );
            }
        }
        assert_close(&format!("prefill refused, hd {hd}"), &got, &want, 1e-5);
        // Bit-identical to the clean run for every token of the other sequences.
        let (clean_got, _) = clean.gpu_generic(
            &ops,
            1,
            &TokenIndex {
                seq: &seq,
                pos: &pos,
            },
            &q,
        );
        for (t, &s) in seq.iter().enumerate() {
            if s != 1 && t != last {
                assert_eq!(
                    rows(&got, f.row(), t),
                    rows(&clean_got, f.row(), t),
                    "token {t} changed"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn write_kv_matches_the_cpu_and_refuses_foreign_blocks() {
    let ops = gpu();
    let mut f = Fixture::new(8, 2, 32, &[40, 20, 33], 50);
    // Sequence 1's second block is sequence 0's (tenant 1's, seq 1 is tenant 2);
    // sequence 2's third block is outside the pool.
    let foreign = f.tables[0];
    f.tables[f.max_blocks + 1] = foreign;
    f.tables[2 * f.max_blocks + 2] = 5_000;
    let mut seq = Vec::new();
    let mut pos = Vec::new();
    for (s, n) in [(0u32, 40u32), (1, 20), (2, 33)] {
        for p in 0..n {
            seq.push(s);
            pos.push(p);
        }
    }
    let row = f.shape.kv_heads * f.shape.head_dim;
    let (k, v) = (random(seq.len() * row, 51), random(seq.len() * row, 52));
    let index = TokenIndex {
        seq: &seq,
        pos: &pos,
    };
    let mut want = f.kv.clone();
    let mut want_flags = vec![0; 3];
    cpu::write_kv(
        &mut want,
        &f.shape,
        &f.owners,
        1,
        &f.paged(),
        &index,
        &k,
        &v,
        &mut want_flags,
    );
    assert_eq!(want_flags, vec![0, WRITE, INVALID]);

    let mut kv = f.device_kv(&ops);
    let batch = DeviceBatch::new(&ops, &f.paged(), &index).unwrap();
    let mut flags = ops.zeros::<u32>(3).unwrap();
    ops.write_kv(
        &mut kv,
        1,
        &batch,
        &ops.upload(&k).unwrap(),
        &ops.upload(&v).unwrap(),
        &mut flags,
    )
    .unwrap();
    assert_eq!(ops.download_prefix(&flags, 3).unwrap(), want_flags);
    let got = kv.download(&ops).unwrap();
    assert!(
        got == want,
        "the cache after write_kv differs from the CPU's"
    );
    let n = f.shape.block_elems();
    let fb = foreign as usize;
    // Tenant 1's block holds tenant 1's writes only: what the CPU wrote, and
    // nothing of sequence 1's tokens 16..20.
    assert_eq!(got[fb * n..(fb + 1) * n], want[fb * n..(fb + 1) * n]);
    let mut only_seq0 = f.kv.clone();
    let mut scratch_flags = vec![0; 3];
    let seq0 = TokenIndex {
        seq: &seq[..40],
        pos: &pos[..40],
    };
    cpu::write_kv(
        &mut only_seq0,
        &f.shape,
        &f.owners,
        1,
        &f.paged(),
        &seq0,
        &k[..40 * row],
        &v[..40 * row],
        &mut scratch_flags,
    );
    assert_eq!(
        got[fb * n..(fb + 1) * n],
        only_seq0[fb * n..(fb + 1) * n],
        "tenant 2 wrote into tenant 1's block"
    );
}

fn tiny_backends(blocks: usize) -> (CpuBackend, CudaBackend) {
    assert!(
        cuda::available(),
        "this test needs an NVIDIA GPU and its driver (libcuda)"
    );
    let cfg = ModelConfig::tiny();
    let weights = Weights::from_seed(&cfg, 1);
    let gpu = CudaBackend::new(cfg.clone(), &weights, blocks, 0)
        .unwrap_or_else(|e| panic!("CudaBackend: {e}"));
    let cpu = CpuBackend::new(cfg, weights, blocks).unwrap();
    (cpu, gpu)
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn scrub_zeroes_a_block_and_only_it() {
    let (_, mut be) = tiny_backends(16);
    be.fill_block(3, 1.5).unwrap();
    be.fill_block(4, -2.0).unwrap();
    assert!(be.read_block(3).unwrap().iter().all(|&x| x == 1.5));
    be.scrub(&[3]).unwrap();
    let b3 = be.read_block(3).unwrap();
    assert_eq!(b3.len(), be.kv_shape().block_elems());
    assert!(
        b3.iter().all(|&x| x.to_bits() == 0),
        "block 3 is not all zero bytes"
    );
    assert!(
        be.read_block(4).unwrap().iter().all(|&x| x == -2.0),
        "block 4 changed"
    );
    assert!(
        be.scrub(&[16]).is_err(),
        "a block outside the pool was accepted"
    );
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    u32::try_from(best).unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn the_tiny_model_matches_the_cpu_backend() {
    let (mut cpu_be, mut gpu_be) = tiny_backends(64);
    let cfg = ModelConfig::tiny();
    // Two tenants decoding side by side, blocks 0..8 and 8..16.
    let tags: Vec<(u32, u32)> = (0..16).map(|b| (b, if b < 8 { 7 } else { 8 })).collect();
    cpu_be.set_owner_tags(&tags).unwrap();
    gpu_be.set_owner_tags(&tags).unwrap();
    let mut prompts: Vec<Vec<u32>> = vec![
        std::iter::once(cfg.bos)
            .chain(
                b"The quick brown fox jumps over the lazy dog."
                    .iter()
                    .map(|&b| u32::from(b)),
            )
            .take(40)
            .collect(),
        std::iter::once(cfg.bos)
            .chain(b"Isolation at every layer, ".iter().map(|&b| u32::from(b)))
            .collect(),
    ];
    let tables: [Vec<u32>; 2] = [(0..8).collect(), (8..16).collect()];
    let seq_tags = [7, 8];
    let mut start = [0u32; 2];
    let mut worst = 0.0f32;
    for step in 0..=20 {
        let steps: Vec<SeqStep<'_>> = (0..2)
            .map(|s| {
                let tokens: &[u32] = if step == 0 {
                    &prompts[s]
                } else {
                    &prompts[s][prompts[s].len() - 1..]
                };
                SeqStep {
                    tag: seq_tags[s],
                    tokens,
                    start_pos: start[s],
                    block_table: &tables[s],
                    want_logits: true,
                }
            })
            .collect();
        let c = cpu_be.step(&steps).unwrap();
        let g = gpu_be.step(&steps).unwrap();
        let mut next = [0u32; 2];
        for s in 0..2 {
            assert_eq!(c.outputs[s].flags, 0);
            assert_eq!(g.outputs[s].flags, 0, "step {step} seq {s}: flags");
            let (cl, gl) = (
                c.outputs[s].logits.as_ref().unwrap(),
                g.outputs[s].logits.as_ref().unwrap(),
            );
            worst = worst.max(assert_close(
                &format!("step {step} seq {s} logits"),
                gl,
                cl,
                1e-4,
            ));
            let (ct, gt) = (argmax(cl), argmax(gl));
            assert_eq!(gt, ct, "step {step} seq {s}: greedy token");
            next[s] = ct;
        }
        let lens: Vec<u32> = steps
            .iter()
            .map(|st| u32::try_from(st.tokens.len()).unwrap())
            .collect();
        drop(steps);
        for s in 0..2 {
            start[s] += lens[s];
            prompts[s].push(next[s]);
        }
    }
    println!("tiny model: 1 prefill + 20 decode steps, 2 sequences, max |logit diff| {worst:.3e}");
    println!(
        "generated: {:?} / {:?}",
        String::from_utf8_lossy(
            &prompts[0][40..]
                .iter()
                .map(|&t| u8::try_from(t.min(255)).unwrap())
                .collect::<Vec<_>>()
        ),
        String::from_utf8_lossy(
            &prompts[1][27..]
                .iter()
                .map(|&t| u8::try_from(t.min(255)).unwrap())
                .collect::<Vec<_>>()
        )
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn a_step_with_a_foreign_block_fails_closed_like_the_cpu() {
    let (mut cpu_be, mut gpu_be) = tiny_backends(16);
    let updates = [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2)];
    cpu_be.set_owner_tags(&updates).unwrap();
    gpu_be.set_owner_tags(&updates).unwrap();
    let prompt_a: Vec<u32> = (0..40).map(|i| (i * 7) % 256).collect();
    let prompt_b: Vec<u32> = (0..25).map(|i| (i * 13) % 256).collect();
    let run = |be: &mut dyn Backend, plant: bool| {
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
        be.step(&steps).unwrap()
    };
    let clean = run(&mut gpu_be, false);
    let planted_cpu = run(&mut cpu_be, true);
    let planted = run(&mut gpu_be, true);
    assert_eq!(planted_cpu.outputs[0].flags, WRITE | READ);
    assert_eq!(planted.outputs[0].flags, WRITE | READ, "GPU flags");
    assert_eq!(planted.outputs[1].flags, 0);
    assert_eq!(
        planted.outputs[1].logits, clean.outputs[1].logits,
        "the other tenant's logits changed"
    );
    assert_close(
        "foreign-block step, tenant 2 logits",
        planted.outputs[1].logits.as_ref().unwrap(),
        planted_cpu.outputs[1].logits.as_ref().unwrap(),
        1e-4,
    );
    assert_eq!(gpu_be.owners(), cpu_be.owners());
}
