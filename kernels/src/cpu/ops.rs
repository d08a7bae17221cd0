//! The reference kernels: plain Rust, the semantics the CUDA kernels must match.
//!
//! Every function here has a CUDA twin in `kernels/cuda/` with the same
//! arguments and the same guard behaviour; the GPU tests compare them.
//! Shapes are row-major and given in each doc comment.

use crate::layout::{KvShape, Violation};

/// Per-sequence view of a batch over the paged KV cache.
#[derive(Clone, Copy, Debug)]
pub struct PagedBatch<'a> {
    /// Owner tag of each sequence's tenant, `[seqs]`.
    pub tags: &'a [u32],
    /// Each sequence's context length after this step's writes, `[seqs]`.
    pub ctx_lens: &'a [u32],
    /// Block tables, `[seqs, max_blocks]`.
    pub block_tables: &'a [u32],
    /// Entries per block-table row.
    pub max_blocks: usize,
}

/// Per-token index into a batch: which sequence, which position.
#[derive(Clone, Copy, Debug)]
pub struct TokenIndex<'a> {
    /// Sequence of each token, `[tokens]`.
    pub seq: &'a [u32],
    /// Absolute position of each token in its sequence, `[tokens]`.
    pub pos: &'a [u32],
}

/// `out = x / sqrt(mean(x²) + eps) * w`, row by row; `x`, `out`: `[rows, w.len()]`.
#[allow(clippy::cast_precision_loss)]
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot(row, row);
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, &xv), &wv) in o.iter_mut().zip(row).zip(w) {
            *o = xv * inv * wv;
        }
    }
}

/// `out = x · wᵀ`: `x` `[n, k]`, `w` `[m, k]`, `out` `[n, m]`.
pub fn matmul(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    let m = w.len() / k;
    for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        for (o, wr) in or.iter_mut().zip(w.chunks_exact(k)) {
            *o = dot(xr, wr);
        }
    }
}

/// Dot product with eight independent accumulators (vectorises; fixed order, so
/// deterministic). Plain multiply-add, not `mul_add`: without the `fma` target
/// feature that is a libm call, ten times slower.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.as_chunks::<8>();
    let (bc, br) = b.as_chunks::<8>();
    for (x, y) in ac.iter().zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Rotary embedding in place (Llama's rotate-half pairing: element `i` with
/// `i + head_dim/2`); `x` `[n, heads, head_dim]`, `positions` `[n]`.
#[allow(clippy::cast_precision_loss)]
pub fn rope(x: &mut [f32], positions: &[u32], heads: usize, head_dim: usize, theta: f32) {
    let half = head_dim / 2;
    for (row, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let freq = theta.powf(-2.0 * i as f32 / head_dim as f32);
                let (sin, cos) = (pos as f32 * freq).sin_cos();
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    }
}

/// `out = silu(gate) * up`: `gate_up` `[n, 2 * ffn]` (gate then up), `out` `[n, ffn]`.
pub fn swiglu(gate_up: &[f32], ffn: usize, out: &mut [f32]) {
    for (gu, o) in gate_up.chunks_exact(2 * ffn).zip(out.chunks_exact_mut(ffn)) {
        let (g, u) = gu.split_at(ffn);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// The guard's verdict on one sequence's reads: every block its context
/// covers must be in range and owned by its tag. Reads the block table and
/// the owner tags only, never the KV cache.
pub fn check_sequence(shape: &KvShape, owners: &[u32], batch: &PagedBatch<'_>, seq: usize) -> u32 {
    let need = shape.blocks_for(batch.ctx_lens[seq] as usize);
    if need > batch.max_blocks {
        return Violation::InvalidBlock as u32;
    }
    let row = &batch.block_tables[seq * batch.max_blocks..][..need];
    let tag = batch.tags[seq];
    let mut flags = 0;
    for &block in row {
        match owners.get(block as usize) {
            Some(&owner) if (block as usize) < shape.num_blocks => {
                if owner != tag {
                    flags |= Violation::CrossTenantRead as u32;
                }
            }
            _ => flags |= Violation::InvalidBlock as u32,
        }
    }
    flags
}

/// Guarded KV write (`reshape_and_cache`): token `t`'s K and V rows
/// (`k`, `v`: `[tokens, kv_heads, head_dim]`) go to slot `pos % block_tokens`
/// of block `table[seq][pos / block_tokens]`, only if that block is in range
/// and owned by the sequence's tag; otherwise nothing is written and the
/// sequence's flag gets `CrossTenantWrite` (or `InvalidBlock`).
#[allow(clippy::too_many_arguments)]
pub fn write_kv(
    kv: &mut [f32],
    shape: &KvShape,
    owners: &[u32],
    layer: usize,
    batch: &PagedBatch<'_>,
    tokens: &TokenIndex<'_>,
    k: &[f32],
    v: &[f32],
    flags: &mut [u32],
) {
    let row_len = shape.kv_heads * shape.head_dim;
    for (t, (&seq, &pos)) in tokens.seq.iter().zip(tokens.pos).enumerate() {
        let seq = seq as usize;
        let index = pos as usize / shape.block_tokens;
        if index >= batch.max_blocks {
            flags[seq] |= Violation::InvalidBlock as u32;
            continue;
        }
        let block = batch.block_tables[seq * batch.max_blocks + index] as usize;
        if block >= shape.num_blocks || block >= owners.len() {
            flags[seq] |= Violation::InvalidBlock as u32;
            continue;
        }
        if owners[block] != batch.tags[seq] {
            flags[seq] |= Violation::CrossTenantWrite as u32;
            continue;
        }
        let slot = pos as usize % shape.block_tokens;
        for head in 0..shape.kv_heads {
            let src = t * row_len + head * shape.head_dim;
            for (which, data) in [k, v].into_iter().enumerate() {
                let dst = shape.offset(block, layer, which, head, slot);
                kv[dst..dst + shape.head_dim].copy_from_slice(&data[src..src + shape.head_dim]);
            }
        }
    }
}

/// Guarded paged attention, for prefill chunks and decode alike.
///
/// Query token `t` (`q`: `[tokens, heads, head_dim]`) of sequence `s`
/// attends to positions `0 ..= pos[t]` of `s`, read through its block table;
/// query head `h` uses KV head `h / (heads / kv_heads)`. Output `out`:
/// `[tokens, heads, head_dim]`.
///
/// The guard (when `guard`): before any K/V is read, [`check_sequence`] runs
/// for every sequence; a sequence with any violation (or a query past its
/// context) reads nothing, gets zeros, and its flag bits are set. Other
/// sequences are computed exactly as without it. `guard = false` exists only
/// to measure the guard's cost; it must never run in the engine.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    kv: &[f32],
    shape: &KvShape,
    owners: &[u32],
    layer: usize,
    batch: &PagedBatch<'_>,
    tokens: &TokenIndex<'_>,
    q: &[f32],
    heads: usize,
    scale: f32,
    guard: bool,
    out: &mut [f32],
    flags: &mut [u32],
) {
    let hd = shape.head_dim;
    let group = heads / shape.kv_heads;
    let seqs = batch.tags.len();
    let mut denied = vec![false; seqs];
    if guard {
        for (s, denied) in denied.iter_mut().enumerate() {
            let f = check_sequence(shape, owners, batch, s);
            flags[s] |= f;
            *denied = f != 0;
        }
    }
    let mut scores = Vec::new();
    for (t, (&seq, &pos)) in tokens.seq.iter().zip(tokens.pos).enumerate() {
        let s = seq as usize;
        let row = &mut out[t * heads * hd..(t + 1) * heads * hd];
        if guard && !denied[s] && pos >= batch.ctx_lens[s] {
            flags[s] |= Violation::InvalidBlock as u32;
            denied[s] = true;
        }
        if denied[s] {
            row.fill(0.0);
            continue;
        }
        let table = &batch.block_tables[s * batch.max_blocks..(s + 1) * batch.max_blocks];
        let ctx = pos as usize + 1;
        for h in 0..heads {
            let kvh = h / group;
            let qv = &q[(t * heads + h) * hd..][..hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..ctx {
                let block = table[j / shape.block_tokens] as usize;
                let off = shape.offset(block, layer, 0, kvh, j % shape.block_tokens);
                let score = dot(qv, &kv[off..off + hd]) * scale;
                max = max.max(score);
                scores.push(score);
            }
            let mut sum = 0.0f32;
            for sc in &mut scores {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            let o = &mut row[h * hd..(h + 1) * hd];
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let block = table[j / shape.block_tokens] as usize;
                let off = shape.offset(block, layer, 1, kvh, j % shape.block_tokens);
                let w = p * inv;
                for (o, &vv) in o.iter_mut().zip(&kv[off..off + hd]) {
                    *o += w * vv;
                }
            }
        }
    }
}
