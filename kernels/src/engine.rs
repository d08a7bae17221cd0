//! The worker's engine: continuous batching with chunked prefill over the
//! KV block pool and a [`Backend`], sans-IO.
//!
//! The `bulkhead worker` process feeds it [`ProxyToWorker`] messages, calls
//! [`Engine::step`] while it has work, and sends what
//! [`Engine::take_outbox`] returns. Nothing here reads a clock or a socket;
//! the `sim` backend reports how long a step would have taken instead.
//!
//! # A step
//!
//! 1. Scrub every dirty block (zeroed on the device) before the pool may
//!    hand it to another tenant.
//! 2. Admit waiting sequences into free slots (a free slot goes to the
//!    waiting tenant running the fewest sequences), looking up the tenant's
//!    own prefix cache (keyed by tenant and chain hash: never another tenant's).
//!    When the slots are full, a tenant that stays at or under its equal
//!    share after taking a slot preempts the youngest sequence of the tenant
//!    most over its share, if that one stays at or over it. (The fairness
//!    simulation in `bulkhead-core` models the rule with half the share;
//!    measured end to end with `bulkhead bench fairness`, half the share
//!    left a quiet tenant's p99 TTFT at 2.3× its solo value, the full share
//!    at 1.14–1.17×.)
//! 3. Plan the batch within a token budget: every decoding sequence gets one
//!    token, prefilling ones a chunk of at most `prefill_chunk` tokens, the
//!    tenant running the fewest sequences first; while a tenant under its
//!    equal share waits for a first token, prompts of tenants at or over
//!    their share sit the step out (`Engine::plan`). Each gets the KV
//!    blocks its new tokens need, preempting the tenant's own youngest
//!    sequence when the tenant is at its quota.
//! 4. Mirror owner-tag changes to the backend, run the step, and for each
//!    sequence: a guard violation fails it (a `Violation`, then `Finished`
//!    with an error); otherwise publish newly full blocks to the tenant's
//!    prefix cache, sample, stream tokens, and finish on EOS, a stop
//!    sequence, `max_tokens` or the context length.
//!
//! Preempted sequences release their blocks (published ones stay in the
//! tenant's cache) and recompute from their tokens when readmitted; tokens
//! already streamed are never sent twice.

mod seq;
#[cfg(test)]
mod tests;

use self::seq::Seq;
use crate::{
    backend::{Backend, BackendError, SeqStep},
    layout::Violation as GuardBit,
    model::{Sampler, SamplingParams},
    pool::{AllocError, BlockId, BlockPool, extend_chain_hashes},
};
use bulkhead_core::{
    TenantId,
    wire::{
        Capacity, FinishReason, Finished, ProxyToWorker, RejectKind, Rejected, RequestId, Submit,
        TenantBlocks, Violation, ViolationKind, WorkerInfo, WorkerToProxy,
    },
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::Duration,
};

/// The default [`EngineConfig::over_share_prompt_tokens`].
pub const DEFAULT_OVER_SHARE_PROMPT_TOKENS: usize = 136;

/// How the engine batches.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences running at once.
    pub max_slots: usize,
    /// Most tokens in one step (decode tokens plus prefill chunks). A step
    /// lasts as long as its prompt tokens make it, and a request arriving
    /// mid-step waits for the step's end, so this bounds every tenant's
    /// time to first token (Sarathi-Serve's token budget). The default, 256,
    /// keeps a full step of a 70B-class model on one H100 near 55 ms
    /// (`deploy/calibration/h100-sxm-llama3-70b-fp8.toml`); 512 let a quiet
    /// tenant wait behind ~90 ms steps of a busy one's prompts.
    ///
    /// Tenants under their equal share of the slots get this budget for
    /// their own tokens as if they ran alone: the decodes of tenants over
    /// their share do not count against it. A step can so exceed it by
    /// those decodes (one token each, which a memory-bound step hardly
    /// notices).
    pub max_step_tokens: usize,
    /// Most prompt tokens of one sequence in one step.
    pub prefill_chunk: usize,
    /// Most prompt tokens, in one step, of the tenants at or over their
    /// equal share of the slots while a tenant under its share is running.
    /// The step running when a quiet tenant's request arrives is what that
    /// request waits for first, so this bounds how much a busy tenant's
    /// prompts add to a quiet tenant's time to first token, at the cost of
    /// the busy tenant's prompt throughput while both run. Set it to
    /// `max_step_tokens` or more for no cap.
    pub over_share_prompt_tokens: usize,
    /// The tenants this worker serves; `None` serves any tenant the proxy sends.
    pub tenants: Option<BTreeSet<TenantId>>,
    /// Names requests may use for the model (the model's own name is always one).
    pub model_aliases: Vec<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_slots: 32,
            max_step_tokens: 256,
            prefill_chunk: 256,
            over_share_prompt_tokens: DEFAULT_OVER_SHARE_PROMPT_TOKENS,
            tenants: None,
            model_aliases: Vec::new(),
        }
    }
}

/// Counters over the engine's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Steps run.
    pub steps: u64,
    /// Tokens run through the model (prefill and decode).
    pub tokens_run: u64,
    /// Sequences preempted (for fairness or for blocks).
    pub preemptions: u64,
    /// Guard violations reported.
    pub violations: u64,
    /// Prompt tokens served from a tenant's own prefix cache.
    pub prefix_hit_tokens: u64,
    /// Blocks scrubbed.
    pub scrubbed_blocks: u64,
}

/// What one step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Sequences in the batch.
    pub seqs: usize,
    /// Tokens run.
    pub tokens: usize,
    /// Modelled device time (`sim` backend).
    pub modelled_time: Option<Duration>,
}

/// The continuous-batching engine over a backend.
pub struct Engine<B> {
    cfg: EngineConfig,
    backend: B,
    pool: BlockPool,
    seqs: HashMap<RequestId, Seq>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    outbox: Vec<WorkerToProxy>,
    last_capacity: Option<Capacity>,
    draining: bool,
    next_arrival: u64,
    stats: EngineStats,
}

impl<B> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Engine<B> {
    /// An engine over `backend`, with a pool of the backend's KV blocks.
    pub fn new(backend: B, cfg: EngineConfig) -> Self {
        #[allow(clippy::cast_possible_truncation)] // pools are far below u32::MAX blocks
        let pool = BlockPool::new(backend.kv_shape().num_blocks as u32);
        Self {
            cfg,
            backend,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            outbox: Vec::new(),
            last_capacity: None,
            draining: false,
            next_arrival: 0,
            stats: EngineStats::default(),
        }
    }

    /// What this worker offers, for its `Hello`.
    #[allow(clippy::cast_possible_truncation)]
    pub fn info(&self) -> WorkerInfo {
        let mut models = vec![self.backend.model().name.clone()];
        models.extend(self.cfg.model_aliases.iter().cloned());
        let shape = self.backend.kv_shape();
        WorkerInfo {
            backend: self.backend.kind(),
            models,
            max_slots: self.cfg.max_slots as u32,
            total_blocks: shape.num_blocks as u32,
            block_tokens: shape.block_tokens as u32,
        }
    }

    /// The backend.
    pub const fn backend(&self) -> &B {
        &self.backend
    }

    /// The KV block pool.
    pub const fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Counters so far.
    pub const fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Whether a shutdown was asked for and every request has finished.
    pub fn is_drained(&self) -> bool {
        self.draining && !self.has_work()
    }

    /// Applies one message from the proxy (`Hello` belongs to the connection
    /// layer: here it is a protocol violation).
    pub fn handle(&mut self, message: ProxyToWorker) {
        match message {
            ProxyToWorker::Hello(_) => self.reject(
                None,
                RejectKind::ProtocolViolation,
                "a second Hello on an established connection".to_owned(),
            ),
            ProxyToWorker::Submit(submit) => self.submit(submit),
            ProxyToWorker::Cancel { request_id } => self.cancel(request_id),
            ProxyToWorker::Shutdown => self.draining = true,
        }
    }

    /// Queues a request, or refuses it with a typed [`Rejected`] and its [`Finished`].
    #[allow(clippy::needless_pass_by_value)] // it is the message, consumed in spirit
    pub fn submit(&mut self, submit: Submit) {
        let id = submit.request_id;
        if self.seqs.contains_key(&id) {
            // No Finished: the id belongs to the request already running.
            self.reject(
                Some(id),
                RejectKind::DuplicateRequest,
                format!("request {id} is already queued or running on this worker"),
            );
            return;
        }
        if let Err((kind, detail)) = self.validate(&submit) {
            self.reject(Some(id), kind, detail.clone());
            self.outbox.push(WorkerToProxy::Finished(Finished {
                request_id: id,
                reason: FinishReason::Error,
                prompt_tokens: 0,
                output_tokens: 0,
                prefix_cache_hit_tokens: 0,
                error: Some(detail),
            }));
            return;
        }
        let quota = self.pool.quota(&submit.tenant).max(submit.kv_block_quota);
        self.pool.set_quota(&submit.tenant, quota);
        let tag = self.pool.tenant_tag(&submit.tenant);
        let seed = submit.sampling.seed.unwrap_or_else(|| {
            // Reproducible per request id when the client gave no seed.
            #[allow(clippy::cast_possible_truncation)]
            let folded = (id.0 ^ (id.0 >> 64)) as u64;
            folded
        });
        let sampler = Sampler::new(SamplingParams {
            temperature: submit.sampling.temperature,
            top_p: submit.sampling.top_p,
            seed,
        });
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.seqs
            .insert(id, Seq::new(&submit, tag, arrival, sampler));
        self.waiting.push_back(id);
    }

    fn validate(&self, s: &Submit) -> Result<(), (RejectKind, String)> {
        let model = self.backend.model();
        if self.draining {
            return Err((
                RejectKind::ShuttingDown,
                "the worker is shutting down".to_owned(),
            ));
        }
        if s.model != model.name && !self.cfg.model_aliases.contains(&s.model) {
            return Err((
                RejectKind::UnknownModel,
                format!("this worker serves `{}`, not `{}`", model.name, s.model),
            ));
        }
        if let Some(allowed) = &self.cfg.tenants
            && !allowed.contains(&s.tenant)
        {
            return Err((
                RejectKind::UnknownTenant,
                format!("tenant `{}` is not served by this worker", s.tenant),
            ));
        }
        if s.prompt_tokens.is_empty() {
            return Err((RejectKind::InvalidPrompt, "the prompt is empty".to_owned()));
        }
        if let Some(at) = s
            .prompt_tokens
            .iter()
            .position(|&t| t as usize >= model.vocab)
        {
            return Err((
                RejectKind::InvalidPrompt,
                format!(
                    "prompt token {at} is {}, outside the vocabulary of {}",
                    s.prompt_tokens[at], model.vocab
                ),
            ));
        }
        if s.prompt_tokens.len() >= model.max_context {
            return Err((
                RejectKind::PromptTooLong,
                format!(
                    "prompt of {} tokens leaves no room in the context of {} tokens",
                    s.prompt_tokens.len(),
                    model.max_context
                ),
            ));
        }
        if s.max_tokens == 0 {
            return Err((
                RejectKind::InvalidSampling,
                "max_tokens must be at least 1".to_owned(),
            ));
        }
        let params = SamplingParams {
            temperature: s.sampling.temperature,
            top_p: s.sampling.top_p,
            seed: 0,
        };
        params
            .validate()
            .map_err(|e| (RejectKind::InvalidSampling, e.to_string()))?;
        if s.sampling.stop.iter().any(Vec::is_empty) {
            return Err((
                RejectKind::InvalidSampling,
                "a stop sequence is empty".to_owned(),
            ));
        }
        let shape = self.backend.kv_shape();
        let need = shape.blocks_for(s.prompt_tokens.len() + 1);
        let quota = self.pool.quota(&s.tenant).max(s.kv_block_quota) as usize;
        if need > quota {
            return Err((
                RejectKind::QuotaExhausted,
                format!(
                    "the prompt needs {need} KV blocks; tenant `{}` may hold {quota}",
                    s.tenant
                ),
            ));
        }
        if need > shape.num_blocks {
            return Err((
                RejectKind::QuotaExhausted,
                format!(
                    "the prompt needs {need} KV blocks; the pool has {}",
                    shape.num_blocks
                ),
            ));
        }
        Ok(())
    }

    /// Stops a request: it gets its [`Finished`] (cancelled). Unknown ids are
    /// ignored: the request may have finished while the cancel was in flight.
    pub fn cancel(&mut self, id: RequestId) {
        if self.seqs.contains_key(&id) {
            self.finish(id, FinishReason::Cancelled, None);
        }
    }

    /// Cancels every queued and running request (the proxy went away, or the
    /// worker stops): each gets its [`Finished`], cancelled.
    pub fn cancel_all(&mut self) {
        let mut ids: Vec<RequestId> = self.running.iter().chain(&self.waiting).copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.cancel(id);
        }
    }

    /// Makes the next [`Self::take_outbox`] report capacity even if unchanged
    /// (a new proxy connection has seen none).
    pub fn report_capacity_again(&mut self) {
        self.last_capacity = None;
    }

    /// Messages for the proxy since the last call, ending with a
    /// [`Capacity`] when it changed.
    pub fn take_outbox(&mut self) -> Vec<WorkerToProxy> {
        let capacity = self.capacity();
        if self.last_capacity.as_ref() != Some(&capacity) {
            self.last_capacity = Some(capacity.clone());
            self.outbox.push(WorkerToProxy::Capacity(capacity));
        }
        std::mem::take(&mut self.outbox)
    }

    /// Free slots, free blocks and every tenant's blocks against its quota.
    #[allow(clippy::cast_possible_truncation)]
    pub fn capacity(&self) -> Capacity {
        Capacity {
            free_slots: self.cfg.max_slots.saturating_sub(self.running.len()) as u32,
            free_blocks: self.pool.free_blocks() + self.pool.dirty_blocks(),
            per_tenant: self
                .pool
                .tenants()
                .into_iter()
                .map(|(tenant, used_blocks, quota)| TenantBlocks {
                    tenant,
                    used_blocks,
                    quota,
                })
                .collect(),
        }
    }

    fn reject(&mut self, request_id: Option<RequestId>, kind: RejectKind, detail: String) {
        self.outbox.push(WorkerToProxy::Rejected(Rejected {
            request_id,
            kind,
            detail,
        }));
    }

    /// Runs one batch; `Ok(None)` when there was nothing to run.
    pub fn step(&mut self) -> Result<Option<StepReport>, BackendError> {
        self.scrub()?;
        self.admit();
        let plan = self.plan()?;
        if plan.is_empty() {
            return Ok(None);
        }
        let updates: Vec<(u32, u32)> = self
            .pool
            .take_tag_updates()
            .into_iter()
            .map(|(b, t)| (b.0, t))
            .collect();
        self.backend.set_owner_tags(&updates)?;
        let steps: Vec<SeqStep<'_>> = plan
            .iter()
            .map(|&(id, chunk)| self.seqs[&id].step(chunk))
            .collect();
        let result = self.backend.step(&steps)?;
        drop(steps);
        let mut report = StepReport {
            seqs: plan.len(),
            tokens: 0,
            modelled_time: result.modelled_time,
        };
        for (&(id, chunk), out) in plan.iter().zip(result.outputs) {
            report.tokens += chunk;
            if out.flags != 0 {
                self.on_violation(id, out.flags);
                continue;
            }
            let seq = self.seqs.get_mut(&id).expect("planned sequences exist");
            seq.computed += chunk;
            self.publish(id);
            let next = match (out.token, out.logits) {
                (Some(token), _) => Some(token),
                (None, Some(logits)) => {
                    let seq = self.seqs.get_mut(&id).expect("planned sequences exist");
                    Some(seq.sampler.sample(&logits))
                }
                (None, None) => None,
            };
            if let Some(token) = next {
                self.on_token(id, token);
            }
        }
        self.stats.steps += 1;
        self.stats.tokens_run += report.tokens as u64;
        Ok(Some(report))
    }

    /// Zeroes every dirty block, then lets the pool reuse it.
    fn scrub(&mut self) -> Result<(), BackendError> {
        let dirty = self.pool.take_dirty();
        if dirty.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = dirty.iter().map(|b| b.0).collect();
        // Not scrubbed means never reusable: on an error the blocks stay out
        // of the pool (the safe failure) and the error stops the worker.
        self.backend.scrub(&ids)?;
        self.pool.mark_scrubbed(&dirty);
        self.stats.scrubbed_blocks += ids.len() as u64;
        Ok(())
    }

    /// Moves waiting sequences into free slots (preempting for fairness when full).
    fn admit(&mut self) {
        let mut guard = self.waiting.len() * 2 + 1;
        while !self.waiting.is_empty() && guard > 0 {
            guard -= 1;
            if self.running.len() < self.cfg.max_slots {
                // A free slot goes to the waiting tenant running the fewest
                // sequences (its oldest request), not simply to the queue's
                // front: preempted sequences of a heavy tenant wait at the
                // front and would otherwise take every slot that frees.
                let counts = self.running_per_tenant();
                let pos = (0..self.waiting.len())
                    .min_by_key(|&i| {
                        let tenant = &self.seqs[&self.waiting[i]].tenant;
                        (counts.get(tenant).copied().unwrap_or(0), i)
                    })
                    .expect("not empty");
                let id = self.waiting.remove(pos).expect("index in range");
                self.start(id);
                continue;
            }
            // Full: does a starved tenant wait?
            let counts = self.running_per_tenant();
            let active: BTreeSet<&TenantId> = counts
                .keys()
                .chain(self.waiting.iter().map(|id| &self.seqs[id].tenant))
                .collect();
            // A swap of one slot happens only if the taker stays at or under
            // its equal share (slots / tenants) and the giver stays at or over
            // it: (n + 1) tenants <= slots and (n - 1) tenants >= slots. Then
            // neither can qualify to take the slot back, so shares that do not
            // divide evenly cannot make two tenants swap forever.
            let (slots, tenants) = (self.cfg.max_slots, active.len());
            let starved = self.waiting.iter().position(|id| {
                let n = counts.get(&self.seqs[id].tenant).copied().unwrap_or(0);
                (n + 1) * tenants <= slots
            });
            let Some(pos) = starved else { break };
            let victim_tenant = counts
                .iter()
                .filter(|&(_, &n)| n * tenants >= slots + tenants)
                .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(t, _)| t.clone());
            let Some(victim_tenant) = victim_tenant else {
                break;
            };
            let Some(victim) = self.youngest_running(&victim_tenant, |_| false) else {
                break;
            };
            self.preempt(victim);
            let id = self.waiting.remove(pos + 1).expect("index in range");
            self.start(id);
        }
    }

    fn running_per_tenant(&self) -> BTreeMap<TenantId, usize> {
        let mut counts = BTreeMap::new();
        for id in &self.running {
            *counts.entry(self.seqs[id].tenant.clone()).or_insert(0) += 1;
        }
        counts
    }

    fn youngest_running(
        &self,
        tenant: &TenantId,
        except: impl Fn(&RequestId) -> bool,
    ) -> Option<RequestId> {
        self.running
            .iter()
            .filter(|id| !except(id) && &self.seqs[id].tenant == tenant)
            .max_by_key(|id| self.seqs[id].arrival)
            .copied()
    }

    /// Puts a sequence in a slot, taking what its tenant's prefix cache holds.
    fn start(&mut self, id: RequestId) {
        let block_tokens = self.backend.kv_shape().block_tokens;
        let seq = self.seqs.get_mut(&id).expect("waiting sequences exist");
        // The last token must run to give logits: only blocks before it can be reused.
        let reusable = &seq.tokens[..seq.tokens.len() - 1];
        extend_chain_hashes(&mut seq.hashes, reusable, block_tokens);
        let full = reusable.len() / block_tokens;
        let hits = self.pool.lookup_prefix(&seq.tenant, &seq.hashes[..full]);
        seq.blocks = hits.iter().map(|b| b.0).collect();
        seq.computed = hits.len() * block_tokens;
        seq.published = hits.len();
        if !seq.started {
            seq.started = true;
            #[allow(clippy::cast_possible_truncation)]
            let hit = seq.computed as u32;
            seq.prefix_hit_tokens = hit;
            self.stats.prefix_hit_tokens += u64::from(hit);
        }
        self.running.push(id);
    }

    /// Back to the front of the queue, releasing its blocks (published ones
    /// stay in the tenant's cache for the recompute).
    fn preempt(&mut self, id: RequestId) {
        self.release_blocks(id);
        self.running.retain(|r| *r != id);
        self.waiting.push_front(id);
        self.stats.preemptions += 1;
    }

    fn release_blocks(&mut self, id: RequestId) {
        let seq = self.seqs.get_mut(&id).expect("sequence exists");
        for block in seq.blocks.drain(..) {
            // Only the sequence's own blocks: after a guard violation its
            // table may name a block it never held, which stays untouched.
            if self.pool.owner_tag(BlockId(block)) == seq.tag {
                self.pool
                    .release(BlockId(block))
                    .expect("a sequence holds one reference to each of its own blocks");
            }
        }
        seq.computed = 0;
        seq.published = 0;
    }

    /// The order a step serves its sequences in: every decode first (oldest
    /// first), then prompt chunks shared out between tenants. Each next
    /// chunk goes to the tenant running the fewest sequences (then the one
    /// given the fewest prompt tokens so far in this step, then the older
    /// request), so a quiet tenant's prompt never waits behind a busy
    /// one's backlog of prompts.
    fn step_order(&self, running: &BTreeMap<TenantId, usize>) -> Vec<RequestId> {
        let (mut decodes, mut prefills): (Vec<RequestId>, Vec<RequestId>) = self
            .running
            .iter()
            .partition(|id| self.seqs[*id].tokens.len() - self.seqs[*id].computed <= 1);
        decodes.sort_by_key(|id| self.seqs[id].arrival);
        let mut by_tenant: BTreeMap<&TenantId, VecDeque<RequestId>> = BTreeMap::new();
        prefills.sort_by_key(|id| self.seqs[id].arrival);
        for id in prefills {
            by_tenant
                .entry(&self.seqs[&id].tenant)
                .or_default()
                .push_back(id);
        }
        let mut given: BTreeMap<&TenantId, usize> = BTreeMap::new();
        let mut order = decodes;
        while let Some((&tenant, _)) = by_tenant.iter().min_by_key(|&(t, q)| {
            (
                running.get(*t).copied().unwrap_or(0),
                given.get(t).copied().unwrap_or(0),
                self.seqs[&q[0]].arrival,
            )
        }) {
            let queue = by_tenant.get_mut(tenant).expect("present");
            let id = queue.pop_front().expect("queues are never empty");
            if queue.is_empty() {
                by_tenant.remove(tenant);
            }
            let seq = &self.seqs[&id];
            *given.entry(tenant).or_insert(0) +=
                (seq.tokens.len() - seq.computed).min(self.cfg.prefill_chunk);
            order.push(id);
        }
        order
    }

    /// The tenants of `running` (sequences per tenant) under their equal
    /// share of the slots.
    fn under_share<'r>(&self, running: &'r BTreeMap<TenantId, usize>) -> BTreeSet<&'r TenantId> {
        let tenants = running.len();
        running
            .iter()
            .filter(|&(_, &n)| n * tenants < self.cfg.max_slots)
            .map(|(t, _)| t)
            .collect()
    }

    /// This step's batch: `(request, tokens to run)` in [`Self::step_order`].
    ///
    /// Tenants under their equal share of the slots ("quiet" here) are
    /// planned as if they ran alone, and the others fit around them:
    /// - First tokens first: while a quiet tenant has a prompt waiting for
    ///   its first token, the step runs that prompt and every decode, and no
    ///   prompt of a tenant at or over its share. Those prompts wait one
    ///   step and lose no budget.
    /// - Quiet tenants' tokens have [`EngineConfig::max_step_tokens`] to
    ///   themselves: other tenants' decodes do not count against it.
    /// - While a quiet tenant is running, the prompts of the others get at
    ///   most [`EngineConfig::over_share_prompt_tokens`] per step, which
    ///   bounds the step a quiet tenant's new request lands in.
    ///
    /// `tests/engine_fairness.rs` runs the seed's scenario in modelled time
    /// and has the measured effect of each rule.
    ///
    /// None of this can starve anyone: a tenant held back keeps its decodes
    /// and a share of each step's prompt budget, and one that falls under
    /// its share becomes quiet itself.
    fn plan(&mut self) -> Result<Vec<(RequestId, usize)>, BackendError> {
        let running = self.running_per_tenant();
        let order = self.step_order(&running);
        let under = self.under_share(&running);
        let first_token = |s: &Seq| s.emitted == 0 && s.tokens.len() - s.computed > 1;
        let hold_others = order.iter().any(|id| {
            let s = &self.seqs[id];
            first_token(s) && under.contains(&s.tenant)
        });
        // Every token of the step; the quiet tenants' tokens; the others' prompts.
        let mut budget = self.cfg.max_step_tokens;
        let mut quiet_budget = self.cfg.max_step_tokens;
        let mut busy_prompt_budget = if under.is_empty() {
            usize::MAX
        } else {
            self.cfg.over_share_prompt_tokens
        };
        let mut plan: Vec<(RequestId, usize)> = Vec::new();
        let block_tokens = self.backend.kv_shape().block_tokens;
        for id in order {
            if !self.running.contains(&id) {
                continue; // preempted while planning
            }
            let seq = &self.seqs[&id];
            let prefill = seq.tokens.len() - seq.computed > 1;
            let quiet = under.contains(&seq.tenant);
            if prefill && !quiet && hold_others {
                continue;
            }
            let room = match (prefill, quiet) {
                (true, true) => quiet_budget,
                (true, false) => budget.min(busy_prompt_budget),
                (false, _) => budget,
            };
            let chunk = (seq.tokens.len() - seq.computed)
                .min(self.cfg.prefill_chunk)
                .min(room);
            if chunk == 0 {
                continue;
            }
            let need = (seq.computed + chunk).div_ceil(block_tokens);
            match self.grow(id, need, &plan)? {
                Grow::Ok => {
                    plan.push((id, chunk));
                    budget = budget.saturating_sub(chunk);
                    if quiet {
                        quiet_budget = quiet_budget.saturating_sub(chunk);
                    } else if prefill {
                        busy_prompt_budget -= chunk;
                    }
                }
                Grow::Wait => {}
                Grow::Failed(detail) => {
                    self.reject(Some(id), RejectKind::QuotaExhausted, detail.clone());
                    self.finish(id, FinishReason::Error, Some(detail));
                }
            }
        }
        Ok(plan)
    }

    /// Gives `id` blocks up to `need`, preempting unplanned sequences when the tenant's quota or the pool is full.
    fn grow(
        &mut self,
        id: RequestId,
        need: usize,
        plan: &[(RequestId, usize)],
    ) -> Result<Grow, BackendError> {
        // Sequences already in this step's batch keep their blocks.
        let planned = |r: &RequestId| plan.iter().any(|p| p.0 == *r);
        let mut tries = self.pool.num_blocks() as usize + self.running.len() + 4;
        while self.seqs[&id].blocks.len() < need {
            tries -= 1;
            if tries == 0 {
                return Ok(Grow::Wait);
            }
            let tenant = self.seqs[&id].tenant.clone();
            match self.pool.allocate(&tenant) {
                Ok(block) => self.seqs.get_mut(&id).expect("exists").blocks.push(block.0),
                Err(AllocError::NeedsScrub) => self.scrub()?,
                Err(AllocError::QuotaExhausted { quota, .. }) => {
                    if let Some(victim) = self.youngest_running(&tenant, |r| *r == id || planned(r))
                    {
                        self.preempt(victim);
                    } else if plan.iter().any(|p| self.seqs[&p.0].tenant == tenant) {
                        return Ok(Grow::Wait);
                    } else {
                        return Ok(Grow::Failed(format!(
                            "the sequence needs {need} KV blocks; tenant `{tenant}` may hold {quota}"
                        )));
                    }
                }
                Err(AllocError::PoolExhausted) => {
                    let victim = self
                        .running
                        .iter()
                        .filter(|r| **r != id && !planned(r))
                        .max_by_key(|r| self.seqs[r].arrival)
                        .copied();
                    match victim {
                        Some(v) => self.preempt(v),
                        None => return Ok(Grow::Wait),
                    }
                }
            }
        }
        Ok(Grow::Ok)
    }

    /// Publishes a sequence's newly full blocks to its tenant's prefix cache.
    fn publish(&mut self, id: RequestId) {
        let block_tokens = self.backend.kv_shape().block_tokens;
        let seq = self.seqs.get_mut(&id).expect("exists");
        let full = seq.computed / block_tokens;
        if full <= seq.published {
            return;
        }
        extend_chain_hashes(
            &mut seq.hashes,
            &seq.tokens[..full * block_tokens],
            block_tokens,
        );
        for i in seq.published..full {
            self.pool
                .publish(&seq.tenant, seq.hashes[i], BlockId(seq.blocks[i]));
        }
        seq.published = full;
    }

    fn on_token(&mut self, id: RequestId, token: u32) {
        let eos = self.backend.model().is_eos(token);
        let max_context = self.backend.model().max_context;
        let seq = self.seqs.get_mut(&id).expect("exists");
        if eos {
            self.finish(id, FinishReason::Stop, None);
            return;
        }
        seq.tokens.push(token);
        if let Some(len) = seq.matched_stop() {
            seq.tokens.truncate(seq.tokens.len() - len);
            self.finish(id, FinishReason::Stop, None);
            return;
        }
        if seq.generated() >= seq.max_tokens as usize || seq.tokens.len() >= max_context {
            self.finish(id, FinishReason::Length, None);
            return;
        }
        if let Some(tokens) = seq.take_emittable(false) {
            self.outbox.push(tokens);
        }
    }

    fn on_violation(&mut self, id: RequestId, flags: u32) {
        let shape = self.backend.kv_shape();
        let seq = &self.seqs[&id];
        let kind = if flags & GuardBit::CrossTenantWrite as u32 != 0 {
            ViolationKind::CrossTenantWrite
        } else if flags & GuardBit::CrossTenantRead as u32 != 0 {
            ViolationKind::CrossTenantRead
        } else {
            ViolationKind::InvalidBlock
        };
        let bad = seq
            .blocks
            .iter()
            .copied()
            .find(|&b| b as usize >= shape.num_blocks || self.pool.owner_tag(BlockId(b)) != seq.tag)
            .unwrap_or(u32::MAX);
        let detail = format!(
            "KV guard refused block {bad} for a sequence of tag {} (flags {flags:#x}); its output was zeroed",
            seq.tag
        );
        self.outbox.push(WorkerToProxy::Violation(Violation {
            request_id: id,
            tenant: seq.tenant.clone(),
            kind,
            block: bad,
            detail: detail.clone(),
        }));
        self.stats.violations += 1;
        self.finish(id, FinishReason::Error, Some(detail));
    }

    /// Ends a request: streams what it may, releases its blocks, sends `Finished`.
    fn finish(&mut self, id: RequestId, reason: FinishReason, error: Option<String>) {
        if matches!(reason, FinishReason::Stop | FinishReason::Length)
            && let Some(tokens) = self.seqs.get_mut(&id).and_then(|s| s.take_emittable(true))
        {
            self.outbox.push(tokens);
        }
        if self.running.contains(&id) {
            self.release_blocks(id);
            self.running.retain(|r| *r != id);
        }
        self.waiting.retain(|r| *r != id);
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        #[allow(clippy::cast_possible_truncation)]
        self.outbox.push(WorkerToProxy::Finished(Finished {
            request_id: id,
            reason,
            prompt_tokens: seq.prompt_len as u32,
            output_tokens: seq.emitted as u32,
            prefix_cache_hit_tokens: seq.prefix_hit_tokens,
            error,
        }));
    }

    /// Test hook: points entry `index` of a running sequence's block table at `block`.
    #[cfg(test)]
    fn plant_block(&mut self, id: RequestId, index: usize, block: u32) {
        let seq = self.seqs.get_mut(&id).expect("exists");
        let displaced = std::mem::replace(&mut seq.blocks[index], block);
        self.pool
            .release(BlockId(displaced))
            .expect("its own block");
    }
}

/// How growing a sequence's blocks went.
enum Grow {
    Ok,
    Wait,
    Failed(String),
}
