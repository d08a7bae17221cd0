//! The `sim` backend: no math, a cost model of GPU step times.
//!
//! It runs under the real engine, so the KV block pool, the prefix cache,
//! quotas, preemption and batching are all exercised exactly as on a GPU;
//! only the forward pass is replaced by a modelled duration:
//!
//! ```text
//! additive (the default):
//!   step = fixed + prefill_tokens · per_prefill_token + decode_seqs · per_decode_seq
//!        + (weight_bytes + kv_bytes_read) / bandwidth
//! roofline (`mixed_batch = "roofline"`):
//!   step = fixed + max((weight_bytes + kv_bytes_read) / bandwidth,
//!                      (prefill_tokens + decode_seqs) · per_prefill_token)
//!        + decode_seqs · per_decode_seq
//! ```
//!
//! `kv_bytes_read` is every context token's K and V in every layer, for each
//! sequence in the batch (what paged attention reads). The two differ only
//! in steps that mix prompts with decodes: additive charges a prompt token's
//! matrix work on top of the weight read; roofline lets the dense layers
//! take the longer of reading the weights and the FLOPs of every token in
//! the batch (decode tokens do the same matrix work per token as prompt
//! tokens), as a GEMM of a few hundred rows does on a GPU. Additive is the
//! pessimistic bound for a busy tenant's prompts slowing everyone's steps;
//! which is nearer a given GPU is a measurement. Defaults describe an
//! H100 SXM serving a Llama-3-8B-shaped model in bf16; a calibration file
//! (TOML, the fields of [`CostModel`]) replaces them with measurements.
//!
//! The guard runs too (on tags only, [`crate::cpu::ops::check_sequence`]), so
//! a corrupt block table is caught here as on a real device. Tokens are
//! drawn from a per-sequence hash and never EOS, so requests run to
//! `max_tokens`, the worst case for capacity planning.

use crate::{
    backend::{Backend, BackendError, SeqOutput, SeqStep, StepResult, apply_owner_updates},
    cpu::{FlatBatch, ops},
    layout::{BLOCK_TOKENS, FREE_TAG, KvShape, Violation},
    model::ModelConfig,
};
use bulkhead_core::wire::WorkerBackend;
use serde::{Deserialize, Serialize};
use std::{path::Path, time::Duration};

/// Step-time model of a device and model, in nanoseconds and bytes.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostModel {
    /// Launch and scheduling overhead of any step.
    pub fixed_ns: f64,
    /// Compute per prefill token (dense layers; attention is in the KV term).
    pub per_prefill_token_ns: f64,
    /// Compute per decoding sequence beyond the weight read (sampling, small kernels).
    pub per_decode_seq_ns: f64,
    /// Bytes of weights read once per step.
    pub weight_bytes: f64,
    /// Achieved memory bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// Bytes of K plus V per token per layer (`2 · kv_heads · head_dim · element size`).
    pub kv_bytes_per_token_layer: f64,
    /// Layers of the modelled model.
    pub layers: f64,
    /// How the dense layers of a step that mixes prompts with decodes cost.
    pub mixed_batch: MixedBatch,
}

/// How a step's dense layers cost when prompt tokens ride with decodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedBatch {
    /// The weight read plus every prompt token's compute.
    #[default]
    Additive,
    /// The longer of the weight (and KV) read and every token's compute.
    Roofline,
}

impl std::str::FromStr for MixedBatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "additive" => Ok(Self::Additive),
            "roofline" => Ok(Self::Roofline),
            other => Err(format!(
                "`{other}` is not a mixed-batch model: `additive` or `roofline`"
            )),
        }
    }
}

impl MixedBatch {
    /// The name a calibration file uses.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Additive => "additive",
            Self::Roofline => "roofline",
        }
    }
}

impl Default for CostModel {
    /// H100 SXM (3.35 TB/s peak, ~80% achieved) and Llama-3-8B in bf16:
    /// 16 GB of weights, 32 layers, 8 KV heads of 128, ~990 TFLOP/s dense
    /// peak at ~60% for prefill (2 · 8e9 flop per token ≈ 27 µs).
    fn default() -> Self {
        Self {
            fixed_ns: 150_000.0,
            per_prefill_token_ns: 27_000.0,
            per_decode_seq_ns: 20_000.0,
            weight_bytes: 16.06e9,
            bandwidth_bytes_per_s: 2.68e12,
            kv_bytes_per_token_layer: 2.0 * 8.0 * 128.0 * 2.0,
            layers: 32.0,
            mixed_batch: MixedBatch::Additive,
        }
    }
}

/// Why a calibration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// The file could not be read.
    #[error("calibration file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a valid cost model.
    #[error("calibration file {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl CostModel {
    /// Reads a calibration file: any subset of the fields, the rest default.
    pub fn from_file(path: &Path) -> Result<Self, CalibrationError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CalibrationError::Io {
            path: shown.clone(),
            source,
        })?;
        let model: Self = toml::from_str(&text).map_err(|e| CalibrationError::Invalid {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        model
            .validate()
            .map_err(|message| CalibrationError::Invalid {
                path: shown,
                message,
            })?;
        Ok(model)
    }

    /// The model as a calibration file that [`Self::from_file`] reads back.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a struct of numbers and a unit enum serializes")
    }

    /// Every field finite and non-negative; the bandwidth positive.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("fixed_ns", self.fixed_ns),
            ("per_prefill_token_ns", self.per_prefill_token_ns),
            ("per_decode_seq_ns", self.per_decode_seq_ns),
            ("weight_bytes", self.weight_bytes),
            ("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s),
            ("kv_bytes_per_token_layer", self.kv_bytes_per_token_layer),
            ("layers", self.layers),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} = {v} must be finite and >= 0"));
            }
        }
        if self.bandwidth_bytes_per_s <= 0.0 {
            return Err("bandwidth_bytes_per_s must be > 0".to_owned());
        }
        Ok(())
    }

    /// Modelled time of a step: `prefill` tokens in prefill chunks,
    /// `decode` single-token sequences, `context_tokens` summed over the batch.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    pub fn step_time(&self, prefill: usize, decode: usize, context_tokens: usize) -> Duration {
        let kv = context_tokens as f64 * self.layers * self.kv_bytes_per_token_layer;
        let read = (self.weight_bytes + kv) / self.bandwidth_bytes_per_s * 1e9;
        let dense = match self.mixed_batch {
            MixedBatch::Additive => read + prefill as f64 * self.per_prefill_token_ns,
            MixedBatch::Roofline => read.max((prefill + decode) as f64 * self.per_prefill_token_ns),
        };
        let ns = self.fixed_ns + dense + decode as f64 * self.per_decode_seq_ns;
        Duration::from_nanos(ns.round() as u64)
    }
}

/// The cost-model backend.
#[derive(Debug)]
pub struct SimBackend {
    cfg: ModelConfig,
    shape: KvShape,
    owners: Vec<u32>,
    cost: CostModel,
}

impl SimBackend {
    /// A sim of `cfg` with `num_blocks` KV blocks.
    pub fn new(cfg: ModelConfig, num_blocks: usize, cost: CostModel) -> Result<Self, BackendError> {
        cfg.validate()
            .map_err(|e| BackendError::InvalidBatch(e.to_string()))?;
        cost.validate().map_err(BackendError::InvalidBatch)?;
        let shape = KvShape {
            num_blocks,
            layers: cfg.layers,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            block_tokens: BLOCK_TOKENS,
        };
        Ok(Self {
            cfg,
            shape,
            owners: vec![FREE_TAG; num_blocks],
            cost,
        })
    }

    /// The cost model in force.
    pub const fn cost(&self) -> &CostModel {
        &self.cost
    }
}

impl Backend for SimBackend {
    fn kind(&self) -> WorkerBackend {
        WorkerBackend::Sim
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
        // No KV memory to zero; still refuse indices outside the pool.
        match blocks
            .iter()
            .find(|&&b| b as usize >= self.shape.num_blocks)
        {
            Some(b) => Err(BackendError::InvalidBatch(format!(
                "scrub of block {b} outside the pool"
            ))),
            None => Ok(()),
        }
    }

    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<StepResult, BackendError> {
        let flat = FlatBatch::new(&self.cfg, seqs)?;
        let paged = flat.paged();
        let (mut prefill, mut decode, mut context) = (0, 0, 0);
        let mut outputs = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let mut flags = ops::check_sequence(&self.shape, &self.owners, &paged, i);
            if flags & Violation::CrossTenantRead as u32 != 0 {
                // The write of this step's tokens would have been refused too.
                flags |= Violation::CrossTenantWrite as u32;
            }
            if s.tokens.len() == 1 {
                decode += 1;
            } else {
                prefill += s.tokens.len();
            }
            context += s.context_len() as usize;
            let token = (flags == 0 && s.want_logits).then(|| self.token_for(s));
            outputs.push(SeqOutput {
                flags,
                logits: None,
                token,
            });
        }
        Ok(StepResult {
            outputs,
            modelled_time: Some(self.cost.step_time(prefill, decode, context)),
        })
    }

    fn read_block(&self, block: u32) -> Result<Vec<f32>, BackendError> {
        if block as usize >= self.shape.num_blocks {
            return Err(BackendError::InvalidBatch(format!(
                "block {block} outside the pool"
            )));
        }
        // The sim holds no KV memory: every block reads as scrubbed.
        Ok(vec![0.0; self.shape.block_elems()])
    }
}

impl SimBackend {
    /// A token from the sequence's last token and position: a printable
    /// ASCII byte (never BOS or EOS), as a text model's tokens are text.
    /// Arbitrary bytes would be half UTF-8 lead and continuation bytes,
    /// which the front door holds back until a character is whole, and
    /// every such hold would add whole steps to the time to first token
    /// that no real model's output would.
    #[allow(clippy::cast_possible_truncation)]
    fn token_for(&self, s: &SeqStep<'_>) -> u32 {
        let last = u64::from(*s.tokens.last().expect("steps carry tokens"));
        let mut h = (last << 32 | u64::from(s.context_len())).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
        let printable = u32::from(b'~' - b' ') + 1;
        (u32::from(b' ') + (h % u64::from(printable)) as u32).min(self.cfg.vocab as u32 - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_calibration_is_the_default_and_bad_files_name_the_problem() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/calibration/h100-sxm-llama3-8b-bf16.toml");
        assert_eq!(CostModel::from_file(&path).unwrap(), CostModel::default());

        let dir = std::env::temp_dir().join(format!("bh-cal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "bandwidth_bytes_per_s = 0.0\n").unwrap();
        let err = CostModel::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bandwidth_bytes_per_s must be > 0"), "{err}");
        std::fs::write(&bad, "fixed_nanos = 1.0\n").unwrap();
        let err = CostModel::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("fixed_nanos"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn decode_time_grows_with_context_and_prefill_with_tokens() {
        let c = CostModel::default();
        // One decode step of 32 sequences: weights (~6 ms) dominate at short contexts…
        let short = c.step_time(0, 32, 32 * 128);
        let long = c.step_time(0, 32, 32 * 8192);
        assert!(
            short > Duration::from_millis(6) && short < Duration::from_millis(8),
            "{short:?}"
        );
        // …and the KV read (32 × 8192 tokens × 128 KiB = 34 GB, ~13 ms) at long ones.
        assert!(
            long > short * 2 && long < Duration::from_millis(21),
            "{long:?}"
        );
        assert!(c.step_time(512, 0, 512) > c.step_time(256, 0, 256));
    }

    #[test]
    fn roofline_lets_prompts_ride_under_the_weight_read_and_no_further() {
        let additive = CostModel::default();
        let roofline = CostModel {
            mixed_batch: MixedBatch::Roofline,
            ..CostModel::default()
        };
        let (decode, context) = (32, 32 * 128);
        let alone = additive.step_time(0, decode, context);
        // Without prompts the two agree.
        assert_eq!(roofline.step_time(0, decode, context), alone);
        // 64 prompt tokens: additive charges their compute (64 × 27 µs);
        // under roofline, 96 rows of compute (2.6 ms) hide under the ~6 ms read.
        assert_eq!(
            additive.step_time(64, decode, context + 64),
            additive.step_time(0, decode, context + 64) + Duration::from_micros(64 * 27)
        );
        assert_eq!(
            roofline.step_time(64, decode, context + 64),
            roofline.step_time(0, decode, context + 64)
        );
        // 480 prompt tokens: compute (512 × 27 µs = 13.8 ms) is past the read,
        // and the step is compute-bound, still shorter than additive's sum.
        let big = roofline.step_time(480, decode, context + 480);
        assert_eq!(big, Duration::from_micros(150 + 512 * 27 + 32 * 20));
        assert!(big < additive.step_time(480, decode, context + 480));
    }

    #[test]
    fn a_calibration_file_names_its_mixed_batch_model() {
        let dir = std::env::temp_dir().join(format!("bh-cal-mix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("roofline.toml");
        std::fs::write(&file, "mixed_batch = \"roofline\"\n").unwrap();
        assert_eq!(
            CostModel::from_file(&file).unwrap().mixed_batch,
            MixedBatch::Roofline
        );
        let written = dir.join("written.toml");
        let model = CostModel {
            mixed_batch: MixedBatch::Roofline,
            per_prefill_token_ns: 138_000.0,
            ..CostModel::default()
        };
        std::fs::write(&written, model.to_toml()).unwrap();
        assert_eq!(CostModel::from_file(&written).unwrap(), model);
        std::fs::write(&file, "mixed_batch = \"overlap\"\n").unwrap();
        let err = CostModel::from_file(&file).unwrap_err().to_string();
        assert!(err.contains("overlap") && err.contains("roofline"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
