//! [`CudaBackend`]: the built-in model's forward pass on the GPU, the same
//! math and guard as [`crate::cpu::forward`].
#![allow(clippy::many_single_char_names)] // x, h, q, k, v, n: the math's own names

use super::ops::{CudaOps, DecodeScratch, DeviceBatch, DeviceKv};
use crate::{
    backend::{Backend, BackendError, SeqOutput, SeqStep, StepResult, apply_owner_updates},
    cpu::FlatBatch,
    layout::{BLOCK_TOKENS, FREE_TAG, KvShape},
    model::{ModelConfig, Weights},
};
use bulkhead_core::wire::WorkerBackend;
use cudarc::driver::CudaSlice;

/// One decoder layer's weights in device memory.
#[derive(Debug)]
struct DeviceLayer {
    attn_norm: CudaSlice<f32>,
    wqkv: CudaSlice<f32>,
    wo: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    w_gate_up: CudaSlice<f32>,
    w_down: CudaSlice<f32>,
}

/// The model's weights in device memory.
#[derive(Debug)]
struct DeviceWeights {
    embed: CudaSlice<f32>,
    layers: Vec<DeviceLayer>,
    final_norm: CudaSlice<f32>,
    lm_head: CudaSlice<f32>,
}

/// The CUDA backend: the model's weights, the KV cache and the owner tags on
/// one GPU, and a host mirror of the tags.
#[derive(Debug)]
pub struct CudaBackend {
    cfg: ModelConfig,
    ops: CudaOps,
    weights: DeviceWeights,
    kv: DeviceKv,
    owners: Vec<u32>,
    scratch: DecodeScratch,
}

fn check_weights(cfg: &ModelConfig, w: &Weights) -> Result<(), BackendError> {
    let bad = |what: &str, have: usize, want: usize| {
        Err(BackendError::InvalidBatch(format!(
            "weights: {what} holds {have} floats, model `{}` needs {want}",
            cfg.name
        )))
    };
    let (h, q_w) = (cfg.hidden, cfg.heads * cfg.head_dim);
    if w.layers.len() != cfg.layers {
        return bad("the layer list", w.layers.len(), cfg.layers);
    }
    for (what, have, want) in [
        ("embed", w.embed.len(), cfg.vocab * h),
        ("final_norm", w.final_norm.len(), h),
        ("lm_head", w.lm_head.len(), cfg.vocab * h),
    ] {
        if have != want {
            return bad(what, have, want);
        }
    }
    for l in &w.layers {
        for (what, have, want) in [
            ("attn_norm", l.attn_norm.len(), h),
            ("wqkv", l.wqkv.len(), cfg.qkv_width() * h),
            ("wo", l.wo.len(), h * q_w),
            ("ffn_norm", l.ffn_norm.len(), h),
            ("w_gate_up", l.w_gate_up.len(), 2 * cfg.ffn * h),
            ("w_down", l.w_down.len(), h * cfg.ffn),
        ] {
            if have != want {
                return bad(what, have, want);
            }
        }
    }
    Ok(())
}

impl CudaBackend {
    /// Opens GPU `device`, compiles the kernels for it, uploads `weights` and
    /// allocates a zeroed cache of `num_blocks` free blocks.
    pub fn new(
        cfg: ModelConfig,
        weights: &Weights,
        num_blocks: usize,
        device: usize,
    ) -> Result<Self, BackendError> {
        cfg.validate()
            .map_err(|e| BackendError::InvalidBatch(e.to_string()))?;
        check_weights(&cfg, weights)?;
        let ops = CudaOps::new(device)?;
        // The split-K decode kernels of this model's shape, compiled now rather
        // than at the first decode step.
        ops.prepare_decode(cfg.head_dim, cfg.group())?;
        let shape = KvShape {
            num_blocks,
            layers: cfg.layers,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            block_tokens: BLOCK_TOKENS,
        };
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                Ok(DeviceLayer {
                    attn_norm: ops.upload(&l.attn_norm)?,
                    wqkv: ops.upload(&l.wqkv)?,
                    wo: ops.upload(&l.wo)?,
                    ffn_norm: ops.upload(&l.ffn_norm)?,
                    w_gate_up: ops.upload(&l.w_gate_up)?,
                    w_down: ops.upload(&l.w_down)?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let weights = DeviceWeights {
            embed: ops.upload(&weights.embed)?,
            layers,
            final_norm: ops.upload(&weights.final_norm)?,
            lm_head: ops.upload(&weights.lm_head)?,
        };
        let kv = DeviceKv::new(&ops, shape)?;
        ops.synchronize()?;
        Ok(Self {
            cfg,
            ops,
            weights,
            kv,
            owners: vec![FREE_TAG; num_blocks],
            scratch: DecodeScratch::new(),
        })
    }

    /// The device ops (for tests and benchmarks).
    pub fn ops(&self) -> &CudaOps {
        &self.ops
    }

    /// The owner-tag mirror.
    pub fn owners(&self) -> &[u32] {
        &self.owners
    }

    /// Writes a value into every element of a block: for tests that need a
    /// block to hold something before it is scrubbed.
    pub fn fill_block(&mut self, block: u32, value: f32) -> Result<(), BackendError> {
        self.kv.fill_block(&self.ops, block, value)
    }

    /// The decoder layers over a flattened batch, then the logits of the
    /// listed token rows (`[rows.len(), vocab]`, row-major) and the flags.
    fn forward(
        &mut self,
        flat: &FlatBatch,
        logit_rows: &[u32],
    ) -> Result<(Vec<f32>, Vec<u32>), BackendError> {
        let cfg = &self.cfg;
        let ops = &self.ops;
        let n = flat.tokens.len();
        let (hidden, hd) = (cfg.hidden, cfg.head_dim);
        let (q_w, kv_w) = (cfg.heads * hd, cfg.kv_heads * hd);
        let mut batch = DeviceBatch::new(ops, &flat.paged(), &flat.index())?;
        let decode = batch.is_decode();
        let tokens = ops.upload(&flat.tokens)?;
        let positions = ops.upload(&flat.pos)?;
        let mut flags = ops.zeros::<u32>(flat.tags.len())?;
        let mut x = ops.zeros::<f32>(n * hidden)?;
        let mut h = ops.zeros::<f32>(n * hidden)?;
        let mut qkv = ops.zeros::<f32>(n * cfg.qkv_width())?;
        let mut q = ops.zeros::<f32>(n * q_w)?;
        let mut k = ops.zeros::<f32>(n * kv_w)?;
        let mut v = ops.zeros::<f32>(n * kv_w)?;
        let mut attn = ops.zeros::<f32>(n * q_w)?;
        let mut proj = ops.zeros::<f32>(n * hidden)?;
        let mut gate_up = ops.zeros::<f32>(n * 2 * cfg.ffn)?;
        let mut act = ops.zeros::<f32>(n * cfg.ffn)?;
        let w = &self.weights;
        ops.embed(&tokens, n, &w.embed, cfg.vocab, hidden, &mut x)?;
        for (layer, lw) in w.layers.iter().enumerate() {
            ops.rms_norm(&x, &lw.attn_norm, n, hidden, cfg.rms_eps, &mut h)?;
            ops.matmul(&h, &lw.wqkv, n, hidden, cfg.qkv_width(), &mut qkv)?;
            ops.split_qkv(&qkv, n, q_w, kv_w, &mut q, &mut k, &mut v)?;
            ops.rope(&mut q, &positions, n, cfg.heads, hd, cfg.rope_theta)?;
            ops.rope(&mut k, &positions, n, cfg.kv_heads, hd, cfg.rope_theta)?;
            ops.write_kv(&mut self.kv, layer, &batch, &k, &v, &mut flags)?;
            if decode {
                ops.paged_attention_decode(
                    &self.kv,
                    layer,
                    &mut batch,
                    &q,
                    cfg.heads,
                    cfg.attn_scale(),
                    true,
                    &mut attn,
                    &mut flags,
                    &mut self.scratch,
                    None,
                )?;
            } else {
                ops.paged_attention(
                    &self.kv,
                    layer,
                    &mut batch,
                    &q,
                    cfg.heads,
                    cfg.attn_scale(),
                    true,
                    &mut attn,
                    &mut flags,
                )?;
            }
            ops.matmul(&attn, &lw.wo, n, q_w, hidden, &mut proj)?;
            ops.add_assign(&mut x, &proj, n * hidden)?;
            ops.rms_norm(&x, &lw.ffn_norm, n, hidden, cfg.rms_eps, &mut h)?;
            ops.matmul(&h, &lw.w_gate_up, n, hidden, 2 * cfg.ffn, &mut gate_up)?;
            ops.swiglu(&gate_up, n, cfg.ffn, &mut act)?;
            ops.matmul(&act, &lw.w_down, n, cfg.ffn, hidden, &mut proj)?;
            ops.add_assign(&mut x, &proj, n * hidden)?;
        }
        let logits = if logit_rows.is_empty() {
            Vec::new()
        } else {
            let r = logit_rows.len();
            let mut normed = ops.zeros::<f32>(r * hidden)?;
            ops.rms_norm_rows(
                &x,
                n,
                logit_rows,
                &w.final_norm,
                hidden,
                cfg.rms_eps,
                &mut normed,
            )?;
            let mut logits = ops.zeros::<f32>(r * cfg.vocab)?;
            ops.matmul(&normed, &w.lm_head, r, hidden, cfg.vocab, &mut logits)?;
            ops.download_prefix(&logits, r * cfg.vocab)?
        };
        let flags = ops.download_prefix(&flags, flat.tags.len())?;
        Ok((logits, flags))
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> WorkerBackend {
        WorkerBackend::Cuda
    }

    fn model(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_shape(&self) -> KvShape {
        self.kv.shape()
    }

    fn set_owner_tags(&mut self, updates: &[(u32, u32)]) -> Result<(), BackendError> {
        let (touched, result) = apply_owner_updates(&mut self.owners, updates);
        if let Some(range) = touched {
            let lo = *range.start();
            self.kv.set_owners(&self.ops, lo, &self.owners[range])?;
        }
        result
    }

    fn scrub(&mut self, blocks: &[u32]) -> Result<(), BackendError> {
        for &block in blocks {
            self.kv.scrub(&self.ops, block)?;
        }
        self.ops.synchronize()
    }

    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<StepResult, BackendError> {
        let flat = FlatBatch::new(&self.cfg, seqs)?;
        if seqs.is_empty() {
            return Ok(StepResult::default());
        }
        let rows: Vec<u32> = seqs
            .iter()
            .zip(&flat.last_token)
            .filter(|(s, _)| s.want_logits)
            .map(|(_, &t)| {
                u32::try_from(t)
                    .map_err(|_| BackendError::InvalidBatch("batch too large".to_owned()))
            })
            .collect::<Result<_, _>>()?;
        let (logits, flags) = self.forward(&flat, &rows)?;
        let vocab = self.cfg.vocab;
        let mut next_row = 0;
        let outputs = seqs
            .iter()
            .zip(flags)
            .map(|(s, flags)| {
                let logits = s.want_logits.then(|| {
                    let row = logits[next_row * vocab..][..vocab].to_vec();
                    next_row += 1;
                    row
                });
                SeqOutput {
                    flags,
                    logits,
                    token: None,
                }
            })
            .collect();
        Ok(StepResult {
            outputs,
            modelled_time: None,
        })
    }

    fn read_block(&self, block: u32) -> Result<Vec<f32>, BackendError> {
        self.kv.read_block(&self.ops, block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where there is no GPU the backend says so: it neither panics nor pretends.
    #[test]
    fn starting_without_a_gpu_is_unavailable_not_a_panic() {
        let cfg = ModelConfig::tiny();
        let weights = Weights::from_seed(&cfg, 1);
        match CudaBackend::new(cfg, &weights, 8, 0) {
            Ok(_) => assert!(super::super::available(), "a backend started without a GPU"),
            Err(BackendError::Unavailable(why)) => {
                assert!(
                    !super::super::available() || !super::super::nvrtc::library_present(),
                    "{why}"
                );
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
