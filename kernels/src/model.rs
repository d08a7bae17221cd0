//! The built-in model: a small Llama-architecture decoder whose weights are
//! made deterministically from a seed, so nothing is downloaded.
//!
//! Architecture (as in Llama 2/3): token embedding → `layers` × (RMSNorm →
//! grouped-query attention with rotary position embeddings → residual →
//! RMSNorm → SwiGLU feed-forward → residual) → RMSNorm → LM head. The
//! tokenizer is byte-level: tokens 0–255 are bytes, then BOS and EOS.

pub mod bpe;
pub mod chat;
pub mod checkpoint;
mod config;
mod rng;
mod sampling;
mod tokenizer;
mod weights;

pub use self::{
    config::{ModelConfig, ModelConfigError},
    rng::SplitMix64,
    sampling::{Sampler, SamplingError, SamplingParams},
    tokenizer::ByteTokenizer,
    weights::{LayerWeights, Weights},
};
