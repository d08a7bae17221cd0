//! Weighted fair queuing across tenants, with service measured in tokens.
//!
//! This is the Virtual Token Counter (VTC) of Sheng et al., "Fairness in
//! Serving Large Language Models" (OSDI 2024), built so that every operation
//! costs O(log n) in the number of *backlogged* tenants:
//!
//! - Each tenant has a counter of the service it has received, divided by its
//!   weight. Service is `prompt_weight × prompt tokens + output_weight ×
//!   output tokens` (the paper's `w_p`, `w_q`).
//! - [`FairQueue::dequeue`] serves the head request of the backlogged tenant
//!   with the smallest counter and charges its prompt tokens at once (the
//!   prefill is committed work); output tokens are charged as they are
//!   produced, through [`FairQueue::charge_output`].
//! - When a tenant becomes backlogged, its counter is lifted to the smallest
//!   counter among backlogged tenants (or, if none is backlogged, to the
//!   counter of the tenant served last), so idle time is never banked: a
//!   tenant that was away cannot come back and monopolise the server. It
//!   lands one unit below that counter, so it is served next, not after a
//!   tie-break.
//!
//! Counters are exact integers: a charge adds `cost × SCALE / weight`, and the
//! remainder of the division is carried to the next charge, so no service is
//! ever lost to rounding and two runs with the same inputs agree bit for bit.
//!
//! Backlogged tenants sit in an ordered set keyed by `(counter, sequence
//! number of their head request, slot)`; ties go to the older head request.
//! Each tenant's own queue is FIFO and supports removal by request id, so
//! [`FairQueue::cancel`] is O(log n) as well.

use crate::TenantId;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

/// Fixed-point scale of the counters: one token of cost at weight 1 adds `SCALE`.
pub const SCALE: u128 = 1 << 20;

/// Sequence numbers of new requests count up from here; put-back ones count down.
const FRONT: u64 = 1 << 63;

/// The service weights of prompt and output tokens (VTC's `w_p` and `w_q`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceWeights {
    /// Cost of one prompt (prefill) token.
    pub prompt: u64,
    /// Cost of one generated (decode) token.
    pub output: u64,
}

impl Default for ServiceWeights {
    /// The paper's choice: a generated token costs twice a prompt token.
    fn default() -> Self {
        Self {
            prompt: 1,
            output: 2,
        }
    }
}

impl ServiceWeights {
    /// The service of `prompt` prompt tokens and `output` generated tokens.
    pub fn cost(self, prompt: u64, output: u64) -> u128 {
        u128::from(prompt) * u128::from(self.prompt) + u128::from(output) * u128::from(self.output)
    }
}

/// Why a request was not queued. The payload is handed back: nothing accepted is lost.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError<T> {
    /// The tenant was never registered with [`FairQueue::set_tenant`].
    #[error("tenant is not registered with the scheduler")]
    UnknownTenant(T),
    /// The tenant already has its maximum number of queued requests.
    #[error("tenant already has {cap} queued requests, its maximum")]
    BacklogFull {
        /// The tenant's backlog cap.
        cap: u32,
        /// The request that did not fit.
        payload: T,
    },
    /// A request with the same id is already queued.
    #[error("a request with this id is already queued")]
    DuplicateId(T),
}

impl<T> EnqueueError<T> {
    /// The payload of the request that was refused.
    pub fn into_payload(self) -> T {
        match self {
            Self::UnknownTenant(p)
            | Self::BacklogFull { payload: p, .. }
            | Self::DuplicateId(p) => p,
        }
    }
}

/// A request taken off the queue by [`FairQueue::dequeue`].
#[derive(Debug, PartialEq, Eq)]
pub struct Dequeued<K, T> {
    /// The request's id.
    pub id: K,
    /// The tenant it belongs to.
    pub tenant: TenantId,
    /// Its prompt length in tokens (already charged).
    pub prompt_tokens: u32,
    /// The payload given to [`FairQueue::enqueue`].
    pub payload: T,
}

#[derive(Debug)]
struct Entry<K, T> {
    id: K,
    prompt_tokens: u32,
    payload: T,
}

#[derive(Debug)]
struct TenantState<K, T> {
    id: TenantId,
    weight: u32,
    max_queued: u32,
    /// Service received divided by weight, in units of `1 / SCALE` token.
    counter: u128,
    /// Remainder of `cost × SCALE` not yet divided by `weight`; always `< weight`.
    remainder: u128,
    /// Queued requests by global sequence number (FIFO order).
    queue: BTreeMap<u64, Entry<K, T>>,
    /// The key under which this tenant sits in `backlogged`, if it is backlogged.
    backlog_key: Option<(u128, u64)>,
}

impl<K, T> TenantState<K, T> {
    fn charge(&mut self, cost: u128) {
        let scaled = cost * SCALE + self.remainder;
        let weight = u128::from(self.weight);
        self.counter += scaled / weight;
        self.remainder = scaled % weight;
    }
}

/// Weighted fair queue of requests across tenants (see the module docs).
///
/// `K` is the request id (unique among queued requests), `T` the payload.
#[derive(Debug)]
pub struct FairQueue<K, T> {
    weights: ServiceWeights,
    tenants: Vec<TenantState<K, T>>,
    slots: HashMap<TenantId, usize>,
    /// Backlogged tenants ordered by (counter, head sequence number, slot).
    backlogged: BTreeSet<(u128, u64, usize)>,
    /// Where each queued request is: (tenant slot, sequence number).
    locations: HashMap<K, (usize, u64)>,
    next_seq: u64,
    /// Sequence numbers for requests put back at the front, counting down.
    front_seq: u64,
    /// Counter floor for a tenant that becomes backlogged while nobody is.
    last_served: u128,
}

impl<K: Copy + Eq + Hash, T> FairQueue<K, T> {
    /// An empty queue charging service with `weights`.
    pub fn new(weights: ServiceWeights) -> Self {
        Self {
            weights,
            tenants: Vec::new(),
            slots: HashMap::new(),
            backlogged: BTreeSet::new(),
            locations: HashMap::new(),
            next_seq: FRONT,
            front_seq: FRONT,
            last_served: 0,
        }
    }

    /// Registers a tenant, or updates its weight and backlog cap.
    ///
    /// A new weight applies to service charged from now on; what the tenant
    /// received so far stays counted. A lowered cap keeps requests already queued.
    ///
    /// # Panics
    /// If `weight` is zero (the config validation refuses zero weights).
    pub fn set_tenant(&mut self, tenant: &TenantId, weight: u32, max_queued: u32) {
        assert!(weight > 0, "tenant {tenant}: weight must be positive");
        if let Some(&slot) = self.slots.get(tenant) {
            let state = &mut self.tenants[slot];
            // Keep the carried remainder meaningful under the new divisor.
            state.remainder = state.remainder.min(u128::from(weight) - 1);
            state.weight = weight;
            state.max_queued = max_queued;
            return;
        }
        let slot = self.tenants.len();
        self.tenants.push(TenantState {
            id: tenant.clone(),
            weight,
            max_queued,
            // A newcomer starts level with the others, not behind them.
            counter: self.floor(),
            remainder: 0,
            queue: BTreeMap::new(),
            backlog_key: None,
        });
        self.slots.insert(tenant.clone(), slot);
    }

    /// Queues a request of `tenant` with a prompt of `prompt_tokens` tokens.
    pub fn enqueue(
        &mut self,
        id: K,
        tenant: &TenantId,
        prompt_tokens: u32,
        payload: T,
    ) -> Result<(), EnqueueError<T>> {
        self.insert(id, tenant, prompt_tokens, payload, false)
    }

    /// Puts a request that was dequeued and then preempted back at the head of
    /// its tenant's queue, ahead of the tenant's other requests.
    ///
    /// Its prompt is charged again when it is dequeued again: recomputing a
    /// preempted prefill is service the tenant receives. The backlog cap does
    /// not apply: the request was accepted once and is not refused now.
    pub fn requeue_front(
        &mut self,
        id: K,
        tenant: &TenantId,
        prompt_tokens: u32,
        payload: T,
    ) -> Result<(), EnqueueError<T>> {
        self.insert(id, tenant, prompt_tokens, payload, true)
    }

    fn insert(
        &mut self,
        id: K,
        tenant: &TenantId,
        prompt_tokens: u32,
        payload: T,
        front: bool,
    ) -> Result<(), EnqueueError<T>> {
        let Some(&slot) = self.slots.get(tenant) else {
            return Err(EnqueueError::UnknownTenant(payload));
        };
        if self.locations.contains_key(&id) {
            return Err(EnqueueError::DuplicateId(payload));
        }
        let floor = self.floor();
        let state = &mut self.tenants[slot];
        if !front && state.queue.len() >= state.max_queued as usize {
            return Err(EnqueueError::BacklogFull {
                cap: state.max_queued,
                payload,
            });
        }
        let seq = if front {
            self.front_seq -= 1;
            self.front_seq
        } else {
            self.next_seq += 1;
            self.next_seq
        };
        let was_idle = state.queue.is_empty();
        state.queue.insert(
            seq,
            Entry {
                id,
                prompt_tokens,
                payload,
            },
        );
        self.locations.insert(id, (slot, seq));
        if was_idle {
            // Lift: time spent idle is not banked as credit. The newcomer lands
            // one unit (2^-20 token) below the least-served backlogged tenant, so
            // it goes next rather than behind that tenant's whole head request.
            state.counter = state.counter.max(floor.saturating_sub(1));
        }
        self.reposition(slot);
        Ok(())
    }

    /// The tenant whose request [`FairQueue::dequeue`] would return next.
    pub fn peek_tenant(&self) -> Option<&TenantId> {
        let &(_, _, slot) = self.backlogged.first()?;
        Some(&self.tenants[slot].id)
    }

    /// The tenant's service counter in the queue's internal fixed-point units;
    /// lower means less served. For ordering work across tenants (e.g. which
    /// prefill runs first in a batch), never for display.
    pub fn priority(&self, tenant: &TenantId) -> Option<u128> {
        self.slots
            .get(tenant)
            .map(|&slot| self.tenants[slot].counter)
    }

    /// Takes the next request in fair order, charging its prompt tokens.
    pub fn dequeue(&mut self) -> Option<Dequeued<K, T>> {
        let &(_, _, slot) = self.backlogged.first()?;
        Some(self.pop(slot))
    }

    /// Takes the head request of one tenant, out of fair order, charging its
    /// prompt tokens: for a worker dedicated to that tenant, or for a tenant
    /// the dispatcher lets preempt because it is far under its share.
    pub fn dequeue_from(&mut self, tenant: &TenantId) -> Option<Dequeued<K, T>> {
        let &slot = self.slots.get(tenant)?;
        if self.tenants[slot].queue.is_empty() {
            return None;
        }
        Some(self.pop(slot))
    }

    /// The tenants with queued requests, least served first.
    pub fn backlogged(&self) -> impl Iterator<Item = &TenantId> {
        self.backlogged
            .iter()
            .map(|&(_, _, slot)| &self.tenants[slot].id)
    }

    fn pop(&mut self, slot: usize) -> Dequeued<K, T> {
        let state = &mut self.tenants[slot];
        let (_, entry) = state
            .queue
            .pop_first()
            .expect("pop is called on a backlogged tenant");
        state.charge(self.weights.cost(u64::from(entry.prompt_tokens), 0));
        let tenant = state.id.clone();
        self.last_served = self.last_served.max(state.counter);
        self.locations.remove(&entry.id);
        self.reposition(slot);
        Dequeued {
            id: entry.id,
            tenant,
            prompt_tokens: entry.prompt_tokens,
            payload: entry.payload,
        }
    }

    /// Charges `tokens` generated tokens to `tenant`, as they are produced.
    ///
    /// Returns false (and charges nothing) for an unknown tenant.
    pub fn charge_output(&mut self, tenant: &TenantId, tokens: u32) -> bool {
        self.charge(tenant, 0, tokens)
    }

    /// Charges service to `tenant` outside the dequeue path: prompt tokens of a
    /// prefill that had to be redone, or generated tokens.
    ///
    /// Returns false (and charges nothing) for an unknown tenant.
    pub fn charge(&mut self, tenant: &TenantId, prompt_tokens: u32, output_tokens: u32) -> bool {
        let Some(&slot) = self.slots.get(tenant) else {
            return false;
        };
        let cost = self
            .weights
            .cost(u64::from(prompt_tokens), u64::from(output_tokens));
        self.tenants[slot].charge(cost);
        if self.tenants[slot].backlog_key.is_some() {
            self.reposition(slot);
        }
        true
    }

    /// Removes a queued request; returns its payload, or `None` if it is not queued.
    pub fn cancel(&mut self, id: &K) -> Option<T> {
        let (slot, seq) = self.locations.remove(id)?;
        let entry = self.tenants[slot]
            .queue
            .remove(&seq)
            .expect("location map and tenant queue agree");
        self.reposition(slot);
        Some(entry.payload)
    }

    /// Unregisters a tenant, handing back its queued requests in FIFO order.
    ///
    /// Its counter is forgotten; if it is registered again it starts level with the others.
    pub fn remove_tenant(&mut self, tenant: &TenantId) -> Vec<(K, T)> {
        let Some(slot) = self.slots.remove(tenant) else {
            return Vec::new();
        };
        if let Some((counter, seq)) = self.tenants[slot].backlog_key.take() {
            self.backlogged.remove(&(counter, seq, slot));
        }
        let removed = std::mem::take(&mut self.tenants[slot].queue);
        for entry in removed.values() {
            self.locations.remove(&entry.id);
        }
        // Keep slots dense: move the last tenant into the freed slot.
        let last = self.tenants.len() - 1;
        self.tenants.swap_remove(slot);
        if slot != last {
            let moved = &self.tenants[slot];
            self.slots.insert(moved.id.clone(), slot);
            if let Some((counter, seq)) = moved.backlog_key {
                self.backlogged.remove(&(counter, seq, last));
                self.backlogged.insert((counter, seq, slot));
            }
            for (&seq, entry) in &moved.queue {
                self.locations.insert(entry.id, (slot, seq));
            }
        }
        removed.into_values().map(|e| (e.id, e.payload)).collect()
    }

    /// Number of queued requests over all tenants.
    pub fn len(&self) -> usize {
        self.locations.len()
    }

    /// Whether no request is queued.
    pub fn is_empty(&self) -> bool {
        self.locations.is_empty()
    }

    /// Number of queued requests of `tenant` (zero for an unknown tenant).
    pub fn queued(&self, tenant: &TenantId) -> usize {
        self.slots
            .get(tenant)
            .map_or(0, |&slot| self.tenants[slot].queue.len())
    }

    /// Number of tenants with at least one queued request.
    pub fn backlogged_tenants(&self) -> usize {
        self.backlogged.len()
    }

    /// Whether a request with this id is queued.
    pub fn contains(&self, id: &K) -> bool {
        self.locations.contains_key(id)
    }

    /// The tenant's weight-normalised service counter, in tokens (for reports).
    #[expect(clippy::cast_precision_loss, reason = "reporting only")]
    pub fn counter(&self, tenant: &TenantId) -> Option<f64> {
        let slot = *self.slots.get(tenant)?;
        Some(self.tenants[slot].counter as f64 / SCALE as f64)
    }

    /// The floor a tenant is lifted to when it becomes backlogged.
    fn floor(&self) -> u128 {
        match self.backlogged.first() {
            Some(&(counter, _, _)) => counter,
            None => self.last_served,
        }
    }

    /// Puts `slot` at its right place in the backlogged set after its counter
    /// or its head request changed (or removes it if its queue is empty).
    fn reposition(&mut self, slot: usize) {
        let state = &mut self.tenants[slot];
        let new_key = state
            .queue
            .first_key_value()
            .map(|(&seq, _)| (state.counter, seq));
        if state.backlog_key == new_key {
            return;
        }
        if let Some((counter, seq)) = state.backlog_key {
            self.backlogged.remove(&(counter, seq, slot));
        }
        if let Some((counter, seq)) = new_key {
            self.backlogged.insert((counter, seq, slot));
        }
        state.backlog_key = new_key;
    }
}

#[cfg(test)]
mod tests;
