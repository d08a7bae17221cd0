//! A seeded, virtual-time simulation of the scheduling core.
//!
//! Tenants send requests with open-loop Poisson or bursty (on/off) arrivals
//! to a continuous-batching server of fixed token capacity
//! ([`ServerModel`]). The same arrivals are replayed under each [`Policy`],
//! so the differences in a [`Report`] come from the policy alone. Nothing
//! here reads a clock: a run of a minute of simulated traffic takes
//! milliseconds and gives the same numbers for the same seed, every time.

mod policy;
mod report;
mod rng;
mod scenarios;
mod server;

pub use self::{
    policy::{Policy, Scheduler, SortingWfq, Ticket},
    report::{Report, TenantReport, jain_index, max_min_shares, nearest_rank},
    rng::SimRng,
    scenarios::{
        FairnessSummary, POLICIES, STANDARD_SERVER, noisy_neighbour, returning, saturated,
    },
    server::ServerModel,
};

use self::server::{Event, Server};
use crate::fair_queue::ServiceWeights;
use crate::{TenantId, Timestamp};
use std::collections::HashMap;
use std::time::Duration;

/// How a simulated tenant's requests arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrivals {
    /// A Poisson process of `per_second` requests per second.
    Poisson {
        /// Mean arrival rate.
        per_second: f64,
    },
    /// On/off bursts: Poisson at `peak_per_second` during on periods,
    /// silence during off periods; both lengths exponentially distributed.
    Bursty {
        /// Arrival rate while on.
        peak_per_second: f64,
        /// Mean length of an on period.
        mean_on: Duration,
        /// Mean length of an off period.
        mean_off: Duration,
    },
}

/// One tenant of a [`Scenario`].
#[derive(Clone, Debug, PartialEq)]
pub struct TenantLoad {
    /// The tenant.
    pub id: TenantId,
    /// Its scheduling weight.
    pub weight: u32,
    /// Its arrival process.
    pub arrivals: Arrivals,
    /// Prompt length range in tokens (uniform, inclusive).
    pub prompt_tokens: (u32, u32),
    /// Generated length range in tokens (uniform, inclusive); `max_tokens` is the upper end.
    pub output_tokens: (u32, u32),
    /// Backlog cap: arrivals beyond it are refused.
    pub max_queued: u32,
    /// A window of simulated time in which the tenant sends nothing.
    pub pause: Option<(Duration, Duration)>,
}

/// A complete, reproducible experiment.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Name for tables.
    pub name: String,
    /// Seed of every random choice.
    pub seed: u64,
    /// Simulated time.
    pub duration: Duration,
    /// Leading time excluded from the statistics.
    pub warmup: Duration,
    /// The server.
    pub server: ServerModel,
    /// Service weights of prompt and output tokens.
    pub weights: ServiceWeights,
    /// The tenants.
    pub tenants: Vec<TenantLoad>,
}

/// One generated request.
#[derive(Clone, Debug)]
struct Arrival {
    at: Timestamp,
    tenant: usize,
    prompt_tokens: u32,
    output_tokens: u32,
}

impl Scenario {
    /// The same scenario with only the tenants `keep` selects (same arrivals for those kept).
    #[must_use]
    pub fn only(&self, keep: impl Fn(&TenantLoad) -> bool) -> Self {
        let mut s = self.clone();
        s.tenants.retain(|t| keep(t));
        s
    }

    /// Generates every arrival, in time order. Each tenant draws from its own
    /// stream (seeded by the scenario seed and its id), so removing a tenant
    /// leaves the others' arrivals unchanged.
    fn arrivals(&self) -> Vec<Arrival> {
        let end = self.duration.as_secs_f64();
        let mut all = Vec::new();
        for (index, load) in self.tenants.iter().enumerate() {
            let stream = load.id.as_str().bytes().fold(self.seed, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            let mut rng = SimRng::new(stream);
            let paused = |t: f64| {
                load.pause
                    .is_some_and(|(from, to)| (from.as_secs_f64()..to.as_secs_f64()).contains(&t))
            };
            let mut push = |rng: &mut SimRng, t: f64| {
                // Draw the lengths even when paused, so the stream stays aligned.
                let arrival = Arrival {
                    at: Timestamp::from_duration(Duration::from_secs_f64(t)),
                    tenant: index,
                    prompt_tokens: rng.range(load.prompt_tokens.0, load.prompt_tokens.1),
                    output_tokens: rng.range(load.output_tokens.0, load.output_tokens.1),
                };
                if !paused(t) {
                    all.push(arrival);
                }
            };
            match load.arrivals {
                Arrivals::Poisson { per_second } => {
                    let mut t = rng.exponential(1.0 / per_second);
                    while t < end {
                        push(&mut rng, t);
                        t += rng.exponential(1.0 / per_second);
                    }
                }
                Arrivals::Bursty {
                    peak_per_second,
                    mean_on,
                    mean_off,
                } => {
                    let mut t = 0.0;
                    while t < end {
                        let on_end = (t + rng.exponential(mean_on.as_secs_f64())).min(end);
                        t += rng.exponential(1.0 / peak_per_second);
                        while t < on_end {
                            push(&mut rng, t);
                            t += rng.exponential(1.0 / peak_per_second);
                        }
                        t = on_end + rng.exponential(mean_off.as_secs_f64());
                    }
                }
            }
        }
        all.sort_by_key(|a| (a.at, a.tenant));
        all
    }

    /// Runs the scenario under `policy`.
    ///
    /// # Panics
    /// If a request is lost or served twice (the accounting checks itself).
    pub fn run(&self, policy: Policy) -> Report {
        let arrivals = self.arrivals();
        let mut run = Run::new(self, policy);
        let end = Timestamp::from_duration(self.duration);
        let mut next = 0;
        let mut now = Timestamp::ZERO;
        while now < end {
            while let Some(a) = arrivals.get(next).filter(|a| a.at <= now) {
                run.arrive(next as u64, a);
                next += 1;
            }
            run.step(now);
            now = now + self.server.step;
        }
        run.finish(next)
    }
}

/// The state of one run: the scheduler, the server, and the bookkeeping that
/// proves no request is lost or served twice.
struct Run<'a> {
    scenario: &'a Scenario,
    policy: Policy,
    warmup: Timestamp,
    scheduler: Scheduler,
    server: Server,
    slot: HashMap<TenantId, usize>,
    weights: HashMap<TenantId, u32>,
    reports: Vec<TenantReport>,
    /// Queued: arrival time, and whether it was admitted before (then preempted).
    waiting: HashMap<u64, (Timestamp, bool)>,
    /// In the server's batch: arrival time.
    running: HashMap<u64, Timestamp>,
    refused: usize,
    finished: usize,
    /// Per tenant: since when it has been backlogged without an admission.
    starved_since: Vec<Option<Timestamp>>,
}

impl<'a> Run<'a> {
    fn new(scenario: &'a Scenario, policy: Policy) -> Self {
        let registry: Vec<_> = scenario
            .tenants
            .iter()
            .map(|t| (t.id.clone(), t.weight, t.max_queued))
            .collect();
        Self {
            scenario,
            policy,
            warmup: Timestamp::from_duration(scenario.warmup),
            scheduler: Scheduler::new(policy, scenario.weights, &registry),
            server: Server::default(),
            slot: scenario
                .tenants
                .iter()
                .enumerate()
                .map(|(i, t)| (t.id.clone(), i))
                .collect(),
            weights: scenario
                .tenants
                .iter()
                .map(|t| (t.id.clone(), t.weight))
                .collect(),
            reports: scenario
                .tenants
                .iter()
                .map(|t| TenantReport::new(t.id.clone(), t.weight))
                .collect(),
            waiting: HashMap::new(),
            running: HashMap::new(),
            refused: 0,
            finished: 0,
            starved_since: vec![None; scenario.tenants.len()],
        }
    }

    fn arrive(&mut self, id: u64, a: &Arrival) {
        let load = &self.scenario.tenants[a.tenant];
        let report = &mut self.reports[a.tenant];
        let measured = a.at >= self.warmup;
        if measured {
            report.arrived += 1;
            report.demand += self
                .scenario
                .weights
                .cost(u64::from(a.prompt_tokens), u64::from(a.output_tokens));
        }
        let ticket = Ticket {
            id,
            tenant: load.id.clone(),
            prompt_tokens: a.prompt_tokens,
            max_tokens: load.output_tokens.1,
            output_tokens: a.output_tokens,
        };
        if self.scheduler.enqueue(ticket) {
            self.waiting.insert(id, (a.at, false));
        } else {
            self.refused += 1;
            if measured {
                report.rejected += 1;
            }
        }
    }

    fn step(&mut self, now: Timestamp) {
        let backlogged: Vec<bool> = self
            .scenario
            .tenants
            .iter()
            .map(|t| self.scheduler.queued(&t.id) > 0)
            .collect();
        let outcome = self.server.step(
            &self.scenario.server,
            self.policy.preempts(),
            &mut self.scheduler,
            &self.weights,
        );
        let mut admitted = vec![false; backlogged.len()];
        for event in &outcome.events {
            match event {
                Event::Admitted(ticket) => {
                    admitted[self.slot[&ticket.tenant]] = true;
                    let (arrived, preempted) = self
                        .waiting
                        .remove(&ticket.id)
                        .expect("an admitted request was waiting");
                    let fresh = self.running.insert(ticket.id, arrived).is_none();
                    assert!(fresh, "request {} admitted twice", ticket.id);
                    if arrived >= self.warmup {
                        let report = &mut self.reports[self.slot[&ticket.tenant]];
                        if preempted {
                            report.preempted += 1;
                        } else {
                            report.queue_delays.push(now.saturating_since(arrived));
                        }
                    }
                }
                Event::Preempted(ticket) => {
                    let arrived = self
                        .running
                        .remove(&ticket.id)
                        .expect("a preempted request was running");
                    self.waiting.insert(ticket.id, (arrived, true));
                }
            }
        }
        for ticket in &outcome.finished {
            self.running
                .remove(&ticket.id)
                .expect("a request finishes once");
            self.finished += 1;
        }
        for (i, since) in self.starved_since.iter_mut().enumerate() {
            if backlogged[i] && !admitted[i] {
                let since = *since.get_or_insert(now);
                if now >= self.warmup {
                    let report = &mut self.reports[i];
                    report.longest_starved =
                        report.longest_starved.max(now.saturating_since(since));
                }
            } else {
                *since = None;
            }
        }
        if now < self.warmup {
            return;
        }
        let contended = backlogged.iter().filter(|b| **b).count() > 1;
        for (tenant, prompt, output) in &outcome.processed {
            let i = self.slot[tenant];
            let cost = self
                .scenario
                .weights
                .cost(u64::from(*prompt), u64::from(*output));
            self.reports[i].service += cost;
            if contended && backlogged[i] {
                self.reports[i].contended_service += cost;
            }
        }
        for ticket in &outcome.finished {
            self.reports[self.slot[&ticket.tenant]].completed += 1;
        }
    }

    fn finish(self, arrived: usize) -> Report {
        assert_eq!(
            self.waiting.len() + self.running.len() + self.refused + self.finished,
            arrived,
            "every request is queued, running, finished or refused"
        );
        assert_eq!(self.running.len(), self.server.running.len());
        Report::new(self.policy, self.scenario, self.reports)
    }
}
