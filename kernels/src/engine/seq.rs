//! One request's state inside the engine.

use crate::{backend::SeqStep, model::Sampler, pool::ChainHash};
use bulkhead_core::{
    TenantId,
    wire::{RequestId, Submit, WorkerToProxy},
};

/// A request: its tokens so far, its blocks and how much of it is in the KV cache.
#[derive(Debug)]
pub(super) struct Seq {
    pub id: RequestId,
    pub tenant: TenantId,
    pub tag: u32,
    pub arrival: u64,
    /// Prompt, then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: u32,
    pub sampler: Sampler,
    pub stop: Vec<Vec<u32>>,
    /// Block table: block `i` holds tokens `16 i ..`.
    pub blocks: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    pub computed: usize,
    /// Leading full blocks published to (or taken from) the prefix cache.
    pub published: usize,
    /// Chain hashes of the leading full blocks hashed so far (tokens only
    /// grow while a sequence lives, so they stay valid across preemptions).
    pub hashes: Vec<ChainHash>,
    /// Generated tokens already streamed.
    pub emitted: usize,
    pub prefix_hit_tokens: u32,
    /// Whether it was ever admitted (prefix hits count on the first admission only).
    pub started: bool,
}

impl Seq {
    pub fn new(submit: &Submit, tag: u32, arrival: u64, sampler: Sampler) -> Self {
        Self {
            id: submit.request_id,
            tenant: submit.tenant.clone(),
            tag,
            arrival,
            tokens: submit.prompt_tokens.clone(),
            prompt_len: submit.prompt_tokens.len(),
            max_tokens: submit.max_tokens,
            sampler,
            stop: submit.sampling.stop.clone(),
            blocks: Vec::new(),
            computed: 0,
            published: 0,
            hashes: Vec::new(),
            emitted: 0,
            prefix_hit_tokens: 0,
            started: false,
        }
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    #[allow(clippy::cast_possible_truncation)]
    pub fn step(&self, chunk: usize) -> SeqStep<'_> {
        let end = self.computed + chunk;
        SeqStep {
            tag: self.tag,
            tokens: &self.tokens[self.computed..end],
            start_pos: self.computed as u32,
            block_table: &self.blocks,
            want_logits: end == self.tokens.len(),
        }
    }

    /// Length of a stop sequence the output now ends with.
    pub fn matched_stop(&self) -> Option<usize> {
        let out = &self.tokens[self.prompt_len..];
        self.stop.iter().find(|s| out.ends_with(s)).map(Vec::len)
    }

    /// Tokens that may be streamed: all but a tail that could still grow into
    /// a stop sequence (all of them when `flush`).
    #[allow(clippy::cast_possible_truncation)]
    pub fn take_emittable(&mut self, flush: bool) -> Option<WorkerToProxy> {
        let out = &self.tokens[self.prompt_len..];
        let hold = if flush {
            0
        } else {
            self.stop
                .iter()
                .flat_map(|s| (1..s.len()).rev().map(move |k| (s, k)))
                .filter(|&(s, k)| k <= out.len() && out[out.len() - k..] == s[..k])
                .map(|(_, k)| k)
                .max()
                .unwrap_or(0)
        };
        let until = out.len() - hold;
        if until <= self.emitted {
            return None;
        }
        let tokens = out[self.emitted..until].to_vec();
        let first_index = self.emitted as u32;
        self.emitted = until;
        Some(WorkerToProxy::Tokens {
            request_id: self.id,
            first_index,
            tokens,
        })
    }
}
