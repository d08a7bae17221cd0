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
//! Each tenant's own queue is a FIFO ring buffer. [`FairQueue::enqueue`]
//! returns a [`QueueHandle`] naming the request's tenant slot and sequence
//! number, so [`FairQueue::cancel`] finds it by binary search in that one
//! tenant's queue: no global index of requests, whose random accesses would
//! cost a cache miss on every operation at a million queued requests.

use self::tenant_queue::TenantQueue;
use crate::TenantId;
use std::collections::{BTreeSet, HashMap};

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

/// Names one queued request, for [`FairQueue::cancel`].
///
/// Sequence numbers are never reused, so a stale handle (of a request already
/// dequeued or cancelled, or of a removed tenant) finds nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueHandle {
    slot: u32,
    seq: u64,
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
}

impl<T> EnqueueError<T> {
    /// The payload of the request that was refused.
    pub fn into_payload(self) -> T {
        match self {
            Self::UnknownTenant(p) | Self::BacklogFull { payload: p, .. } => p,
        }
    }
}

/// A request taken off the queue by [`FairQueue::dequeue`].
#[derive(Debug, PartialEq, Eq)]
pub struct Dequeued<T> {
    /// The tenant it belongs to.
    pub tenant: TenantId,
    /// Its prompt length in tokens (already charged).
    pub prompt_tokens: u32,
    /// The payload given to [`FairQueue::enqueue`].
    pub payload: T,
}

#[derive(Debug)]
struct Entry<T> {
    prompt_tokens: u32,
    payload: T,
}

#[derive(Debug)]
struct TenantState<T> {
    id: TenantId,
    weight: u32,
    max_queued: u32,
    /// Service received divided by weight, in units of `1 / SCALE` token.
    counter: u128,
    /// Remainder of `cost × SCALE` not yet divided by `weight`; always `< weight`.
    remainder: u128,
    /// Queued requests in FIFO order.
    queue: TenantQueue<Entry<T>>,
    /// The key under which this tenant sits in `backlogged`, if it is backlogged.
    backlog_key: Option<(u128, u64)>,
}

impl<T> TenantState<T> {
    fn charge(&mut self, cost: u128) {
        let scaled = cost * SCALE + self.remainder;
        let weight = u128::from(self.weight);
        self.counter += scaled / weight;
        self.remainder = scaled % weight;
    }
}

/// Weighted fair queue of requests across tenants (see the module docs).
#[derive(Debug)]
pub struct FairQueue<T> {
    weights: ServiceWeights,
    /// Tenant states by slot; `None` for a slot freed by [`FairQueue::remove_tenant`].
    tenants: Vec<Option<TenantState<T>>>,
    free_slots: Vec<usize>,
    slots: HashMap<TenantId, usize>,
    /// Backlogged tenants ordered by (counter, head sequence number, slot).
    backlogged: BTreeSet<(u128, u64, usize)>,
    len: usize,
    next_seq: u64,
    /// Sequence numbers for requests put back at the front, counting down.
    front_seq: u64,
    /// Counter floor for a tenant that becomes backlogged while nobody is.
    last_served: u128,
}

impl<T> FairQueue<T> {
    /// An empty queue charging service with `weights`.
    pub fn new(weights: ServiceWeights) -> Self {
        Self {
            weights,
            tenants: Vec::new(),
            free_slots: Vec::new(),
            slots: HashMap::new(),
            backlogged: BTreeSet::new(),
            len: 0,
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
            let state = self.state_mut(slot);
            // Keep the carried remainder meaningful under the new divisor.
            state.remainder = state.remainder.min(u128::from(weight) - 1);
            state.weight = weight;
            state.max_queued = max_queued;
            return;
        }
        let state = TenantState {
            id: tenant.clone(),
            weight,
            max_queued,
            // A newcomer starts level with the others, not ahead of them.
            counter: self.floor(),
            remainder: 0,
            queue: TenantQueue::default(),
            backlog_key: None,
        };
        let slot = if let Some(slot) = self.free_slots.pop() {
            self.tenants[slot] = Some(state);
            slot
        } else {
            self.tenants.push(Some(state));
            self.tenants.len() - 1
        };
        self.slots.insert(tenant.clone(), slot);
    }

    /// Queues a request of `tenant` with a prompt of `prompt_tokens` tokens.
    pub fn enqueue(
        &mut self,
        tenant: &TenantId,
        prompt_tokens: u32,
        payload: T,
    ) -> Result<QueueHandle, EnqueueError<T>> {
        self.insert(tenant, prompt_tokens, payload, false)
    }

    /// Puts a request that was dequeued and then preempted back at the head of
    /// its tenant's queue, ahead of the tenant's other requests.
    ///
    /// Its prompt is charged again when it is dequeued again: recomputing a
    /// preempted prefill is service the tenant receives. The backlog cap does
    /// not apply: the request was accepted once and is not refused now.
    pub fn requeue_front(
        &mut self,
        tenant: &TenantId,
        prompt_tokens: u32,
        payload: T,
    ) -> Result<QueueHandle, EnqueueError<T>> {
        self.insert(tenant, prompt_tokens, payload, true)
    }

    fn insert(
        &mut self,
        tenant: &TenantId,
        prompt_tokens: u32,
        payload: T,
        front: bool,
    ) -> Result<QueueHandle, EnqueueError<T>> {
        let Some(&slot) = self.slots.get(tenant) else {
            return Err(EnqueueError::UnknownTenant(payload));
        };
        let floor = self.floor();
        let seq = if front {
            self.front_seq - 1
        } else {
            self.next_seq + 1
        };
        let state = self.state_mut(slot);
        if !front && state.queue.len() >= state.max_queued as usize {
            return Err(EnqueueError::BacklogFull {
                cap: state.max_queued,
                payload,
            });
        }
        let was_idle = state.queue.is_empty();
        let entry = Entry {
            prompt_tokens,
            payload,
        };
        if front {
            state.queue.push_front(seq, entry);
        } else {
            state.queue.push_back(seq, entry);
        }
        if was_idle {
            // Lift: time spent idle is not banked as credit. The newcomer lands
            // one unit (2^-20 token) below the least-served backlogged tenant, so
            // it goes next rather than behind that tenant's whole head request.
            state.counter = state.counter.max(floor.saturating_sub(1));
        }
        if front {
            self.front_seq = seq;
        } else {
            self.next_seq = seq;
        }
        self.len += 1;
        self.reposition(slot);
        Ok(QueueHandle {
            slot: u32::try_from(slot).expect("fewer than 2^32 tenants"),
            seq,
        })
    }

    /// Takes the next request in fair order, charging its prompt tokens.
    pub fn dequeue(&mut self) -> Option<Dequeued<T>> {
        let &(_, _, slot) = self.backlogged.first()?;
        Some(self.pop(slot))
    }

    /// Takes the head request of one tenant, out of fair order, charging its
    /// prompt tokens: for a worker dedicated to that tenant, or for a tenant
    /// the dispatcher lets preempt because it is far under its share.
    pub fn dequeue_from(&mut self, tenant: &TenantId) -> Option<Dequeued<T>> {
        let &slot = self.slots.get(tenant)?;
        if self.state(slot).queue.is_empty() {
            return None;
        }
        Some(self.pop(slot))
    }

    fn pop(&mut self, slot: usize) -> Dequeued<T> {
        let cost_weights = self.weights;
        let state = self.state_mut(slot);
        let (_, entry) = state
            .queue
            .pop_front()
            .expect("pop is called on a backlogged tenant");
        state.charge(cost_weights.cost(u64::from(entry.prompt_tokens), 0));
        let tenant = state.id.clone();
        let counter = state.counter;
        self.last_served = self.last_served.max(counter);
        self.len -= 1;
        self.reposition(slot);
        Dequeued {
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
        let state = self.state_mut(slot);
        state.charge(cost);
        if state.backlog_key.is_some() {
            self.reposition(slot);
        }
        true
    }

    /// Removes a queued request; returns its payload, or `None` if it is no
    /// longer queued (dequeued, cancelled, or its tenant removed).
    pub fn cancel(&mut self, handle: QueueHandle) -> Option<T> {
        let slot = handle.slot as usize;
        let entry = self
            .tenants
            .get_mut(slot)?
            .as_mut()?
            .queue
            .remove(handle.seq)?;
        self.len -= 1;
        self.reposition(slot);
        Some(entry.payload)
    }

    /// Whether the request `handle` names is still queued.
    pub fn contains(&self, handle: QueueHandle) -> bool {
        self.tenants
            .get(handle.slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.queue.contains(handle.seq))
    }

    /// Unregisters a tenant, handing back its queued requests in FIFO order.
    ///
    /// Its counter is forgotten; if it is registered again it starts level with the others.
    pub fn remove_tenant(&mut self, tenant: &TenantId) -> Vec<T> {
        let Some(slot) = self.slots.remove(tenant) else {
            return Vec::new();
        };
        let mut state = self.tenants[slot].take().expect("a registered slot");
        if let Some((counter, seq)) = state.backlog_key {
            self.backlogged.remove(&(counter, seq, slot));
        }
        self.free_slots.push(slot);
        let removed: Vec<T> = state.queue.drain().map(|e| e.payload).collect();
        self.len -= removed.len();
        removed
    }

    /// Number of queued requests over all tenants.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no request is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of queued requests of `tenant` (zero for an unknown tenant).
    pub fn queued(&self, tenant: &TenantId) -> usize {
        self.slots
            .get(tenant)
            .map_or(0, |&slot| self.state(slot).queue.len())
    }

    /// Number of tenants with at least one queued request.
    pub fn backlogged_tenants(&self) -> usize {
        self.backlogged.len()
    }

    /// The tenant whose request [`FairQueue::dequeue`] would return next.
    pub fn peek_tenant(&self) -> Option<&TenantId> {
        let &(_, _, slot) = self.backlogged.first()?;
        Some(&self.state(slot).id)
    }

    /// The payload of `tenant`'s head request: the one
    /// [`FairQueue::dequeue_from`] would take.
    pub fn head(&self, tenant: &TenantId) -> Option<&T> {
        let &slot = self.slots.get(tenant)?;
        self.state(slot).queue.front().map(|e| &e.payload)
    }

    /// The backlogged tenants in fair order, the next to be served first: for
    /// a dispatcher that passes over a tenant no worker can take now and
    /// serves the next (with [`FairQueue::dequeue_from`]) rather than let
    /// it block everyone behind it.
    pub fn tenants_in_order(&self) -> impl Iterator<Item = &TenantId> {
        self.backlogged
            .iter()
            .map(|&(_, _, slot)| &self.state(slot).id)
    }

    /// The tenant's service counter in the queue's internal fixed-point units;
    /// lower means less served. For ordering work across tenants (e.g. which
    /// prefill runs first in a batch), never for display.
    pub fn priority(&self, tenant: &TenantId) -> Option<u128> {
        self.slots.get(tenant).map(|&slot| self.state(slot).counter)
    }

    /// The tenant's weight-normalised service counter, in tokens (for reports).
    #[expect(clippy::cast_precision_loss, reason = "reporting only")]
    pub fn counter(&self, tenant: &TenantId) -> Option<f64> {
        let slot = *self.slots.get(tenant)?;
        Some(self.state(slot).counter as f64 / SCALE as f64)
    }

    fn state(&self, slot: usize) -> &TenantState<T> {
        self.tenants[slot].as_ref().expect("a registered slot")
    }

    fn state_mut(&mut self, slot: usize) -> &mut TenantState<T> {
        self.tenants[slot].as_mut().expect("a registered slot")
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
        let state = self.tenants[slot].as_mut().expect("a registered slot");
        let new_key = state.queue.front_seq().map(|seq| (state.counter, seq));
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

mod tenant_queue;

#[cfg(test)]
mod tests;
