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

/// A change of a request's state within a step.
#[derive(Debug)]
pub(super) enum Event {
    /// Taken from the scheduler into the batch.
    Admitted(Ticket),
    /// Taken out of the batch and put back at the head of its tenant's queue.
    Preempted(Ticket),
}

/// What one step did, for the simulation's accounting.
#[derive(Debug, Default)]
pub(super) struct StepOutcome {
    /// Admissions and preemptions, in the order they happened.
    pub(super) events: Vec<Event>,
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
    /// `weights` gives each tenant's scheduling weight (for preemption shares).
    pub(super) fn step(
        &mut self,
        model: &ServerModel,
        preempt: bool,
        scheduler: &mut Scheduler,
        weights: &HashMap<TenantId, u32>,
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
        // Admit in the scheduler's order while a slot is free; when none is,
        // a tenant far under its share may still get one by preemption.
        loop {
            let ticket = if self.running.len() < model.max_seqs {
                scheduler.dequeue()
            } else if preempt {
                self.preempt_for_entitled(model, scheduler, weights, &mut out)
            } else {
                None
            };
            let Some(ticket) = ticket else {
                break;
            };
            out.events.push(Event::Admitted(ticket.clone()));
            self.admissions += 1;
            self.running.push(Running {
                prefill_left: ticket.prompt_tokens,
                output_left: ticket.output_tokens,
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

    /// Finds the least-served queued tenant that holds under half of its
    /// weighted share of slots, frees a slot for it from the tenant most over
    /// its share, and returns that tenant's head request.
    #[expect(clippy::cast_precision_loss, reason = "slot shares are small numbers")]
    fn preempt_for_entitled(
        &mut self,
        model: &ServerModel,
        scheduler: &mut Scheduler,
        weights: &HashMap<TenantId, u32>,
        out: &mut StepOutcome,
    ) -> Option<Ticket> {
        let mut held: HashMap<&TenantId, usize> = HashMap::new();
        for seq in &self.running {
            *held.entry(&seq.ticket.tenant).or_default() += 1;
        }
        let mut waiting: Vec<&TenantId> =
            weights.keys().filter(|t| scheduler.queued(t) > 0).collect();
        waiting.sort_by_key(|t| (scheduler.priority(t), t.as_str()));
        let demanding: Vec<&TenantId> = weights
            .keys()
            .filter(|t| held.contains_key(t) || scheduler.queued(t) > 0)
            .collect();
        let total_weight: f64 = demanding.iter().map(|t| f64::from(weights[*t])).sum();
        let share = |t: &TenantId| model.max_seqs as f64 * f64::from(weights[t]) / total_weight;
        let held_by = |t: &TenantId| held.get(t).copied().unwrap_or(0) as f64;
        let claimant = waiting
            .into_iter()
            .find(|t| held_by(t) < share(t) / 2.0)?
            .clone();
        let victim = held
            .keys()
            .map(|t| (held_by(t) - share(t), *t))
            .filter(|(over, _)| *over > 0.0)
            .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.cmp(a.1)))?
            .1
            .clone();
        let youngest = (0..self.running.len())
            .filter(|&i| self.running[i].ticket.tenant == victim)
            .max_by_key(|&i| self.running[i].admitted_at)
            .expect("the victim holds a slot");
        let seq = self.running.remove(youngest);
        out.events.push(Event::Preempted(seq.ticket.clone()));
        scheduler.requeue_front(seq.ticket);
        scheduler.dequeue_from(&claimant)
    }
}
