//! A continuous-batching server of fixed token capacity, stepped by the simulation.

use super::policy::{Scheduler, Ticket};
use crate::TenantId;
use std::collections::HashMap;
use std::time::Duration;

/// The simulated server: every step processes at most `tokens_per_step`
/// tokens over at most `max_seqs` running sequences.
///
/// Within a step, as in vLLM's scheduler with chunked prefill: each running
/// sequence past its prefill decodes one token; new requests are admitted
/// from the scheduler while a sequence slot is free; then the budget left
/// goes to prefill chunks, in the order the scheduler's
/// [`Scheduler::priority`] gives (admission order among equals).
///
/// With `preempt`, a tenant holding fewer than half of its weighted share of
/// the sequence slots may take a slot from the tenant most over its share:
/// that tenant's youngest sequence goes back to the head of its queue and
/// its work is redone later. Without it, a newcomer waits for a sequence to
/// finish, however far over its share the holder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerModel {
    /// Wall time of one step.
    pub step: Duration,
    /// Tokens (prefill + decode) processed per step.
    pub tokens_per_step: u32,
    /// Most sequences in the batch at once.
    pub max_seqs: usize,
}

impl ServerModel {
    /// Token capacity per second.
    pub fn tokens_per_second(&self) -> f64 {
        f64::from(self.tokens_per_step) / self.step.as_secs_f64()
    }
}

/// A sequence in the batch.
#[derive(Debug)]
pub(super) struct Running {
    pub(super) ticket: Ticket,
    pub(super) prefill_left: u32,
    pub(super) output_left: u32,
    /// Admission order, for ties in prefill priority and for choosing preemption victims.
    admitted_at: u64,
}

/// What one step did, for the simulation's accounting.
#[derive(Debug, Default)]
pub(super) struct StepOutcome {
    /// Requests admitted this step.
    pub(super) admitted: Vec<Ticket>,
    /// Requests preempted this step (back in the scheduler's queue).
    pub(super) preempted: Vec<Ticket>,
    /// Service this step per tenant: (tenant, prompt tokens, output tokens).
    pub(super) processed: Vec<(TenantId, u32, u32)>,
    /// Requests that produced their last token this step.
    pub(super) finished: Vec<Ticket>,
}

/// The server's batch.
#[derive(Debug, Default)]
pub(super) struct Server {
    pub(super) running: Vec<Running>,
    admissions: u64,
}

impl Server {
    /// Runs one step, taking new work from `scheduler`.
    ///
    /// `weights` gives each tenant's scheduling weight (for preemption shares);
    /// `output_len` the number of tokens a newly admitted request will generate.
    pub(super) fn step(
        &mut self,
        model: &ServerModel,
        preempt: bool,
        scheduler: &mut Scheduler,
        weights: &HashMap<TenantId, u32>,
        mut output_len: impl FnMut(&Ticket) -> u32,
    ) -> StepOutcome {
        let mut out = StepOutcome::default();
        let mut budget = model.tokens_per_step;
        // Decode: one token per sequence past its prefill.
        for seq in &mut self.running {
            if seq.prefill_left == 0 && seq.output_left > 0 && budget > 0 {
                budget -= 1;
                seq.output_left -= 1;
                out.processed.push((seq.ticket.tenant.clone(), 0, 1));
                scheduler.charge_output(&seq.ticket.tenant, 1);
            }
        }
        self.retire(&mut out);
        // Admit while a slot is free, or can be freed by preemption.
        while let Some(next) = scheduler.peek_tenant() {
            if self.running.len() >= model.max_seqs
                && !(preempt && self.preempt_for(&next, model, scheduler, weights, &mut out))
            {
                break;
            }
            let ticket = scheduler.dequeue().expect("peeked");
            let output_left = output_len(&ticket);
            out.admitted.push(ticket.clone());
            self.admissions += 1;
            self.running.push(Running {
                prefill_left: ticket.prompt_tokens,
                output_left,
                ticket,
                admitted_at: self.admissions,
            });
        }
        // Prefill chunks, least-served tenant first.
        let mut order: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].prefill_left > 0)
            .collect();
        order.sort_by_cached_key(|&i| {
            let seq = &self.running[i];
            (scheduler.priority(&seq.ticket.tenant), seq.admitted_at)
        });
        for i in order {
            if budget == 0 {
                break;
            }
            let seq = &mut self.running[i];
            let chunk = seq.prefill_left.min(budget);
            seq.prefill_left -= chunk;
            budget -= chunk;
            out.processed.push((seq.ticket.tenant.clone(), chunk, 0));
        }
        out
    }

    /// Moves sequences that generated their last token to `out.finished`.
    fn retire(&mut self, out: &mut StepOutcome) {
        let mut i = 0;
        while i < self.running.len() {
            let seq = &self.running[i];
            if seq.prefill_left == 0 && seq.output_left == 0 {
                out.finished.push(self.running.remove(i).ticket);
            } else {
                i += 1;
            }
        }
    }

    /// Frees a slot for `claimant` if it holds under half its weighted share of
    /// slots and another tenant holds more than its share. Returns whether it did.
    #[expect(clippy::cast_precision_loss, reason = "slot shares are small numbers")]
    fn preempt_for(
        &mut self,
        claimant: &TenantId,
        model: &ServerModel,
        scheduler: &mut Scheduler,
        weights: &HashMap<TenantId, u32>,
        out: &mut StepOutcome,
    ) -> bool {
        let mut held: HashMap<&TenantId, usize> = HashMap::new();
        for seq in &self.running {
            *held.entry(&seq.ticket.tenant).or_default() += 1;
        }
        held.entry(claimant).or_default();
        let total_weight: f64 = held.keys().map(|t| f64::from(weights[*t])).sum();
        let share = |t: &TenantId| model.max_seqs as f64 * f64::from(weights[t]) / total_weight;
        if held[claimant] as f64 >= share(claimant) / 2.0 {
            return false;
        }
        let victim = held
            .iter()
            .map(|(t, n)| (*n as f64 - share(t), *t))
            .filter(|(over, _)| *over > 0.0)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, t)| t.clone());
        let Some(victim) = victim else {
            return false;
        };
        let youngest = (0..self.running.len())
            .filter(|&i| self.running[i].ticket.tenant == victim)
            .max_by_key(|&i| self.running[i].admitted_at)
            .expect("the victim holds a slot");
        let seq = self.running.remove(youngest);
        out.preempted.push(seq.ticket.clone());
        scheduler.requeue_front(seq.ticket);
        true
    }
}
