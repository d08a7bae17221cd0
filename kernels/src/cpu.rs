//! The CPU reference backend: the built-in model's forward pass in plain
//! Rust over a paged KV cache in host memory, with the same guard as the
//! CUDA kernels ([`ops`]).

pub mod ops;

use self::ops::{PagedBatch, TokenIndex};
use crate::{
    backend::{Backend, BackendError, SeqOutput, SeqStep, StepResult, apply_owner_updates},
    layout::{BLOCK_TOKENS, FREE_TAG, KvShape},
    model::{ModelConfig, Weights},
};
use bulkhead_core::wire::WorkerBackend;

/// The CPU backend: the model, its weights, the KV cache and the owner-tag mirror.
#[derive(Debug)]
pub struct CpuBackend {
    cfg: ModelConfig,
    weights: Weights,
    shape: KvShape,
    kv: Vec<f32>,
    owners: Vec<u32>,
}

/// A batch flattened to per-token and per-sequence arrays, as the kernels take it.
#[derive(Debug, Default)]
pub struct FlatBatch {
    /// Every token of every sequence, in order, `[tokens]`.
    pub tokens: Vec<u32>,
    /// Sequence of each token.
    pub seq: Vec<u32>,
    /// Position of each token.
    pub pos: Vec<u32>,
    /// Tag per sequence.
    pub tags: Vec<u32>,
    /// Context length per sequence after the step.
    pub ctx_lens: Vec<u32>,
    /// Block tables, `[seqs, max_blocks]`, padded with `u32::MAX`.
    pub block_tables: Vec<u32>,
    /// Entries per row.
    pub max_blocks: usize,
    /// Index of each sequence's last token in `tokens`.
    pub last_token: Vec<usize>,
}

impl FlatBatch {
    /// Flattens and validates a batch against a model.
    #[allow(clippy::cast_possible_truncation)]
    pub fn new(cfg: &ModelConfig, seqs: &[SeqStep<'_>]) -> Result<Self, BackendError> {
        let mut flat = Self {
            max_blocks: seqs
                .iter()
                .map(|s| s.block_table.len())
                .max()
                .unwrap_or(0)
                .max(1),
            ..Self::default()
        };
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(BackendError::InvalidBatch(format!(
                    "sequence {i} has no tokens"
                )));
            }
            if s.tag == FREE_TAG {
                return Err(BackendError::InvalidBatch(format!(
                    "sequence {i} carries the free tag, which owns nothing"
                )));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab) {
                return Err(BackendError::InvalidBatch(format!(
                    "sequence {i}: token {bad} is outside the vocabulary of {}",
                    cfg.vocab
                )));
            }
            let ctx = u64::from(s.start_pos) + s.tokens.len() as u64;
            if ctx > cfg.max_context as u64 {
                return Err(BackendError::InvalidBatch(format!(
                    "sequence {i}: context {ctx} exceeds the model's {}",
                    cfg.max_context
                )));
            }
            for (j, &t) in s.tokens.iter().enumerate() {
                flat.tokens.push(t);
                flat.seq.push(i as u32);
                flat.pos.push(s.start_pos + j as u32);
            }
            flat.last_token.push(flat.tokens.len() - 1);
            flat.tags.push(s.tag);
            flat.ctx_lens.push(s.context_len());
            let mut row = s.block_table.to_vec();
            row.resize(flat.max_blocks, u32::MAX);
            flat.block_tables.extend_from_slice(&row);
        }
        Ok(flat)
    }

    /// The per-sequence view.
    pub fn paged(&self) -> PagedBatch<'_> {
        PagedBatch {
            tags: &self.tags,
            ctx_lens: &self.ctx_lens,
            block_tables: &self.block_tables,
            max_blocks: self.max_blocks,
        }
    }

    /// The per-token view.
    pub fn index(&self) -> TokenIndex<'_> {
        TokenIndex {
            seq: &self.seq,
            pos: &self.pos,
        }
    }
}

impl CpuBackend {
    /// A backend for `cfg` with `num_blocks` KV blocks, all free and zeroed.
    pub fn new(
        cfg: ModelConfig,
        weights: Weights,
        num_blocks: usize,
    ) -> Result<Self, BackendError> {
        cfg.validate()
            .map_err(|e| BackendError::InvalidBatch(e.to_string()))?;
        let shape = KvShape {
            num_blocks,
            layers: cfg.layers,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            block_tokens: BLOCK_TOKENS,
        };
        Ok(Self {
            cfg,
            weights,
            shape,
            kv: vec![0.0; shape.total_elems()],
            owners: vec![FREE_TAG; num_blocks],
        })
    }

    /// The owner-tag mirror.
    pub fn owners(&self) -> &[u32] {
        &self.owners
    }

    /// Writes a value into every element of a block: for tests that need a
    /// block to hold something before it is scrubbed.
    pub fn fill_block(&mut self, block: u32, value: f32) -> Result<(), BackendError> {
        let range = self.block_range(block)?;
        self.kv[range].fill(value);
        Ok(())
    }

    fn block_range(&self, block: u32) -> Result<std::ops::Range<usize>, BackendError> {
        let block = block as usize;
        if block >= self.shape.num_blocks {
            return Err(BackendError::InvalidBatch(format!(
                "block {block} is outside the pool of {}",
                self.shape.num_blocks
            )));
        }
        let n = self.shape.block_elems();
        Ok(block * n..(block + 1) * n)
    }
}

impl Backend for CpuBackend {
    fn kind(&self) -> WorkerBackend {
        WorkerBackend::Cpu
    }

    fn model(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_shape(&self) -> KvShape {
        self.shape
    }

    fn set_owner_tags(&mut self, updates: &[(u32, u32)]) -> Result<(), BackendError> {
        apply_owner_updates(&mut self.owners, updates).1
    }

    fn scrub(&mut self, blocks: &[u32]) -> Result<(), BackendError> {
        for &block in blocks {
            let range = self.block_range(block)?;
            self.kv[range].fill(0.0);
        }
        Ok(())
    }

    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<StepResult, BackendError> {
        let flat = FlatBatch::new(&self.cfg, seqs)?;
        let mut flags = vec![0u32; seqs.len()];
        let x = forward(
            &self.cfg,
            &self.weights,
            self.shape,
            &mut self.kv,
            &self.owners,
            &flat,
            &mut flags,
        );
        let mut outputs = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let logits = s.want_logits.then(|| {
                let h = &x[flat.last_token[i] * self.cfg.hidden..][..self.cfg.hidden];
                let mut normed = vec![0.0; self.cfg.hidden];
                ops::rms_norm(h, &self.weights.final_norm, self.cfg.rms_eps, &mut normed);
                let mut logits = vec![0.0; self.cfg.vocab];
                ops::matmul(&normed, &self.weights.lm_head, self.cfg.hidden, &mut logits);
                logits
            });
            outputs.push(SeqOutput {
                flags: flags[i],
                logits,
                token: None,
            });
        }
        Ok(StepResult {
            outputs,
            modelled_time: None,
        })
    }

    fn read_block(&self, block: u32) -> Result<Vec<f32>, BackendError> {
        Ok(self.kv[self.block_range(block)?].to_vec())
    }
}

/// The decoder layers over a flattened batch; returns the final residual
/// stream `[tokens, hidden]`. Public so benches and the GPU tests can run
/// the reference on their own buffers.
#[allow(clippy::many_single_char_names)] // x, h, q, k, v: the papers' names
pub fn forward(
    cfg: &ModelConfig,
    w: &Weights,
    shape: KvShape,
    kv: &mut [f32],
    owners: &[u32],
    flat: &FlatBatch,
    flags: &mut [u32],
) -> Vec<f32> {
    let n = flat.tokens.len();
    let (hidden, hd) = (cfg.hidden, cfg.head_dim);
    let (q_w, kv_w) = (cfg.heads * hd, cfg.kv_heads * hd);
    let mut x = Vec::with_capacity(n * hidden);
    for &t in &flat.tokens {
        x.extend_from_slice(&w.embed[t as usize * hidden..][..hidden]);
    }
    let mut h = vec![0.0; n * hidden];
    let mut qkv = vec![0.0; n * cfg.qkv_width()];
    let (mut q, mut k, mut v) = (vec![0.0; n * q_w], vec![0.0; n * kv_w], vec![0.0; n * kv_w]);
    let mut attn = vec![0.0; n * q_w];
    let mut proj = vec![0.0; n * hidden];
    let mut gate_up = vec![0.0; n * 2 * cfg.ffn];
    let mut act = vec![0.0; n * cfg.ffn];
    let (paged, index) = (flat.paged(), flat.index());
    for (layer, lw) in w.layers.iter().enumerate() {
        ops::rms_norm(&x, &lw.attn_norm, cfg.rms_eps, &mut h);
        ops::matmul(&h, &lw.wqkv, hidden, &mut qkv);
        for (t, row) in qkv.chunks_exact(cfg.qkv_width()).enumerate() {
            q[t * q_w..][..q_w].copy_from_slice(&row[..q_w]);
            k[t * kv_w..][..kv_w].copy_from_slice(&row[q_w..q_w + kv_w]);
            v[t * kv_w..][..kv_w].copy_from_slice(&row[q_w + kv_w..]);
        }
        ops::rope(&mut q, &flat.pos, cfg.heads, hd, cfg.rope_theta);
        ops::rope(&mut k, &flat.pos, cfg.kv_heads, hd, cfg.rope_theta);
        ops::write_kv(kv, &shape, owners, layer, &paged, &index, &k, &v, flags);
        ops::paged_attention(
            kv,
            &shape,
            owners,
            layer,
            &paged,
            &index,
            &q,
            cfg.heads,
            cfg.attn_scale(),
            true,
            &mut attn,
            flags,
        );
        ops::matmul(&attn, &lw.wo, q_w, &mut proj);
        add_assign(&mut x, &proj);
        ops::rms_norm(&x, &lw.ffn_norm, cfg.rms_eps, &mut h);
        ops::matmul(&h, &lw.w_gate_up, hidden, &mut gate_up);
        ops::swiglu(&gate_up, cfg.ffn, &mut act);
        ops::matmul(&act, &lw.w_down, cfg.ffn, &mut proj);
        add_assign(&mut x, &proj);
    }
    x
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
