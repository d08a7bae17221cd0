//! Weights made deterministically from a seed.

use super::{ModelConfig, SplitMix64};

/// One decoder layer's weights. Matrices are row-major `[out, in]`
/// (a row per output feature, as in PyTorch's `Linear`).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// RMSNorm gain before attention, `[hidden]`.
    pub attn_norm: Vec<f32>,
    /// Fused Q, K, V projection, `[qkv_width, hidden]`: rows of Q heads, then K heads, then V heads.
    pub wqkv: Vec<f32>,
    /// Attention output projection, `[hidden, heads * head_dim]`.
    pub wo: Vec<f32>,
    /// RMSNorm gain before the feed-forward, `[hidden]`.
    pub ffn_norm: Vec<f32>,
    /// Fused gate and up projections, `[2 * ffn, hidden]`: gate rows, then up rows.
    pub w_gate_up: Vec<f32>,
    /// Down projection, `[hidden, ffn]`.
    pub w_down: Vec<f32>,
}

/// A whole model's weights.
#[derive(Clone, Debug)]
pub struct Weights {
    /// Token embeddings, `[vocab, hidden]`.
    pub embed: Vec<f32>,
    /// The decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm gain, `[hidden]`.
    pub final_norm: Vec<f32>,
    /// LM head, `[vocab, hidden]`.
    pub lm_head: Vec<f32>,
}

impl Weights {
    /// Weights drawn uniformly with variance `1 / fan_in` (norm gains near 1),
    /// in a fixed order from `seed`: the same seed gives the same bits everywhere.
    pub fn from_seed(cfg: &ModelConfig, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut matrix = |rows: usize, cols: usize| {
            // Uniform on [-a, a] has variance a²/3.
            #[allow(clippy::cast_precision_loss)]
            let scale = (3.0 / cols as f32).sqrt();
            (0..rows * cols)
                .map(|_| rng.uniform(scale))
                .collect::<Vec<_>>()
        };
        let embed = matrix(cfg.vocab, cfg.hidden);
        let layers = (0..cfg.layers)
            .map(|_| LayerWeights {
                attn_norm: vec![1.0; cfg.hidden],
                wqkv: matrix(cfg.qkv_width(), cfg.hidden),
                wo: matrix(cfg.hidden, cfg.heads * cfg.head_dim),
                ffn_norm: vec![1.0; cfg.hidden],
                w_gate_up: matrix(2 * cfg.ffn, cfg.hidden),
                w_down: matrix(cfg.hidden, cfg.ffn),
            })
            .collect();
        let lm_head = matrix(cfg.vocab, cfg.hidden);
        Self {
            embed,
            layers,
            final_norm: vec![1.0; cfg.hidden],
            lm_head,
        }
    }
}
