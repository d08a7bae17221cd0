//! The one interface the engine drives: a model's forward step over a paged,
//! tenant-tagged KV cache.
//!
//! A backend owns the KV cache memory and a mirror of the pool's owner tags
//! ([`crate::layout`]); the engine owns the pool and tells the backend which
//! tags changed and which blocks to scrub. Sampling happens on the host, from
//! the logits a backend returns, so equal logits give equal tokens on every
//! backend.

use crate::{layout::KvShape, model::ModelConfig};
use bulkhead_core::wire::WorkerBackend;
use std::time::Duration;

/// One sequence's work in a step: a prefill chunk or one decode token.
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    /// The owner tag of the sequence's tenant (never [`crate::layout::FREE_TAG`]).
    pub tag: u32,
    /// The tokens to run, at positions `start_pos ..`.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions before it are already in the KV cache.
    pub start_pos: u32,
    /// Block indices covering positions `0 .. start_pos + tokens.len()`.
    pub block_table: &'a [u32],
    /// Whether the engine needs logits for the last token (the end of a prompt, or a decode step).
    pub want_logits: bool,
}

impl SeqStep<'_> {
    /// The sequence's context after this step.
    #[allow(clippy::cast_possible_truncation)] // steps are far below u32::MAX tokens
    pub const fn context_len(&self) -> u32 {
        self.start_pos + self.tokens.len() as u32
    }
}

/// What a step produced for one sequence.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqOutput {
    /// The guard's [`crate::layout::Violation`] bits for this sequence; 0 when clean.
    pub flags: u32,
    /// Logits of the last token, when asked for (zeros' logits when flagged: the engine fails the sequence).
    pub logits: Option<Vec<f32>>,
    /// A token picked by the backend itself (only the `sim` backend, which computes no logits).
    pub token: Option<u32>,
}

/// The outcome of a step.
#[derive(Clone, Debug, Default)]
pub struct StepResult {
    /// One per [`SeqStep`], in order.
    pub outputs: Vec<SeqOutput>,
    /// How long the step would take on the modelled device (`sim` only).
    pub modelled_time: Option<Duration>,
}

/// A backend failure (not a guard violation: those are per-sequence flags).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The batch asks for something the backend cannot do.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The device failed (driver, kernel launch, out of memory).
    #[error("device error: {0}")]
    Device(String),
    /// The backend cannot run here (no GPU, no driver).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}

/// A model runner over a paged KV cache with the tenant guard.
pub trait Backend: Send {
    /// Which backend this is.
    fn kind(&self) -> WorkerBackend;
    /// The model it runs.
    fn model(&self) -> &ModelConfig;
    /// The shape of its KV cache.
    fn kv_shape(&self) -> KvShape;
    /// Mirrors owner-tag changes from the pool (`(block, tag)`).
    fn set_owner_tags(&mut self, updates: &[(u32, u32)]) -> Result<(), BackendError>;
    /// Zeroes every byte of these blocks (all layers, K and V).
    fn scrub(&mut self, blocks: &[u32]) -> Result<(), BackendError>;
    /// Runs one forward step of the batch.
    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<StepResult, BackendError>;
    /// A copy of one block's KV memory, for tests and audits of scrubbing.
    fn read_block(&self, block: u32) -> Result<Vec<f32>, BackendError>;
}

/// A boxed backend is a backend, so a worker picks one at run time.
impl<B: Backend + ?Sized> Backend for Box<B> {
    fn kind(&self) -> WorkerBackend {
        (**self).kind()
    }
    fn model(&self) -> &ModelConfig {
        (**self).model()
    }
    fn kv_shape(&self) -> KvShape {
        (**self).kv_shape()
    }
    fn set_owner_tags(&mut self, updates: &[(u32, u32)]) -> Result<(), BackendError> {
        (**self).set_owner_tags(updates)
    }
    fn scrub(&mut self, blocks: &[u32]) -> Result<(), BackendError> {
        (**self).scrub(blocks)
    }
    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<StepResult, BackendError> {
        (**self).step(seqs)
    }
    fn read_block(&self, block: u32) -> Result<Vec<f32>, BackendError> {
        (**self).read_block(block)
    }
}

/// Applies owner-tag updates to a host mirror, in order; returns the range of
/// blocks touched (for a device upload). An update outside the pool fails the
/// call after the ones before it took effect, the same on every backend.
pub fn apply_owner_updates(
    owners: &mut [u32],
    updates: &[(u32, u32)],
) -> (
    Option<std::ops::RangeInclusive<usize>>,
    Result<(), BackendError>,
) {
    let mut touched: Option<(usize, usize)> = None;
    for &(block, tag) in updates {
        let b = block as usize;
        let Some(slot) = owners.get_mut(b) else {
            let err = BackendError::InvalidBatch(format!(
                "owner update for block {block} outside the pool of {}",
                owners.len()
            ));
            return (touched.map(|(lo, hi)| lo..=hi), Err(err));
        };
        *slot = tag;
        touched = Some(touched.map_or((b, b), |(lo, hi)| (lo.min(b), hi.max(b))));
    }
    (touched.map(|(lo, hi)| lo..=hi), Ok(()))
}
