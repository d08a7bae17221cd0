//! What a simulation run measured, and the fairness arithmetic behind it.

use super::{Policy, Scenario};
use crate::TenantId;
use std::fmt::Write as _;
use std::time::Duration;

/// One tenant's measurements over the measured part of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantReport {
    /// The tenant.
    pub id: TenantId,
    /// Its weight.
    pub weight: u32,
    /// Requests that arrived.
    pub arrived: u64,
    /// Requests refused because the tenant's backlog was full.
    pub rejected: u64,
    /// Requests that finished.
    pub completed: u64,
    /// Admissions of requests that had been preempted before (their work redone).
    pub preempted: u64,
    /// Service the arrivals asked for (weighted tokens).
    pub demand: u128,
    /// Service received (weighted tokens processed).
    pub service: u128,
    /// Service received in steps where it and at least one other tenant were backlogged.
    pub contended_service: u128,
    /// Time from arrival to admission, per admitted request, in admission order.
    pub queue_delays: Vec<Duration>,
    /// The longest time the tenant had requests queued and none admitted.
    pub longest_starved: Duration,
}

impl TenantReport {
    pub(super) fn new(id: TenantId, weight: u32) -> Self {
        Self {
            id,
            weight,
            arrived: 0,
            rejected: 0,
            completed: 0,
            preempted: 0,
            demand: 0,
            service: 0,
            contended_service: 0,
            queue_delays: Vec::new(),
            longest_starved: Duration::ZERO,
        }
    }

    /// The `q`-quantile (0..=1, nearest rank) of the queueing delay; zero if none.
    pub fn delay_quantile(&self, q: f64) -> Duration {
        let mut sorted = self.queue_delays.clone();
        sorted.sort_unstable();
        nearest_rank(&sorted, q)
    }
}

/// The `q`-quantile (0..=1) of `sorted` by nearest rank; zero when empty.
pub fn nearest_rank(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a vector that fits in memory"
    )]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The outcome of one [`Scenario`] under one [`Policy`].
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The policy.
    pub policy: Policy,
    /// The scenario's name.
    pub scenario: String,
    /// Per tenant, in the scenario's order.
    pub tenants: Vec<TenantReport>,
    /// Each tenant's weighted max-min fair share of the service delivered.
    pub fair_shares: Vec<f64>,
    /// Jain's index of service relative to fair share (1.0 = perfectly fair).
    pub jain: f64,
}

impl Report {
    #[expect(clippy::cast_precision_loss, reason = "statistics")]
    pub(super) fn new(policy: Policy, scenario: &Scenario, tenants: Vec<TenantReport>) -> Self {
        let capacity: f64 = tenants.iter().map(|t| t.service as f64).sum();
        let demands: Vec<(f64, f64)> = tenants
            .iter()
            .map(|t| (t.demand as f64, f64::from(t.weight)))
            .collect();
        let fair_shares = max_min_shares(capacity, &demands);
        let ratios: Vec<f64> = tenants
            .iter()
            .zip(&fair_shares)
            .filter(|(_, fair)| **fair > 0.0)
            .map(|(t, fair)| t.service as f64 / fair)
            .collect();
        Self {
            policy,
            scenario: scenario.name.clone(),
            jain: jain_index(&ratios),
            fair_shares,
            tenants,
        }
    }

    /// The report of tenant `id`.
    ///
    /// # Panics
    /// If the scenario has no such tenant.
    pub fn tenant(&self, id: &str) -> &TenantReport {
        self.tenants
            .iter()
            .find(|t| t.id.as_str() == id)
            .unwrap_or_else(|| panic!("no tenant {id} in scenario {}", self.scenario))
    }

    /// Ratio of the weight-normalised service `a` and `b` received while both were backlogged.
    #[expect(clippy::cast_precision_loss, reason = "statistics")]
    pub fn contended_ratio(&self, a: &str, b: &str) -> f64 {
        let (a, b) = (self.tenant(a), self.tenant(b));
        a.contended_service as f64 / b.contended_service as f64
    }

    /// One line per tenant: arrivals, refusals, delays and shares.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (t, fair) in self.tenants.iter().zip(&self.fair_shares) {
            #[expect(clippy::cast_precision_loss, reason = "statistics")]
            let share = if *fair > 0.0 {
                t.service as f64 / fair
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "  {:<14} {:<6} w={:<2} arrived {:>6}  refused {:>6}  queue p50 {:>9.1?}  p99 {:>9.1?}  service/fair {:>5.3}",
                self.policy.name(),
                t.id.as_str(),
                t.weight,
                t.arrived,
                t.rejected,
                t.delay_quantile(0.50),
                t.delay_quantile(0.99),
                share,
            );
        }
        out
    }
}

/// Jain's fairness index `(Σx)² / (n Σx²)`; 1.0 for an empty or all-zero input.
pub fn jain_index(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        return 1.0;
    }
    #[expect(clippy::cast_precision_loss, reason = "a count of tenants")]
    let n = xs.len() as f64;
    sum * sum / (n * squares)
}

/// Weighted max-min fair shares of `capacity` among `(demand, weight)` pairs
/// (water filling): no tenant gets more than it asked for, and what the
/// satisfied ones leave is split among the rest in proportion to weight.
pub fn max_min_shares(capacity: f64, demands: &[(f64, f64)]) -> Vec<f64> {
    let mut shares = vec![0.0; demands.len()];
    let mut open: Vec<usize> = (0..demands.len()).filter(|&i| demands[i].1 > 0.0).collect();
    let mut left = capacity;
    while !open.is_empty() && left > 0.0 {
        let total_weight: f64 = open.iter().map(|&i| demands[i].1).sum();
        let level = left / total_weight;
        let (satisfied, rest): (Vec<usize>, Vec<usize>) = open
            .iter()
            .partition(|&&i| demands[i].0 - shares[i] <= level * demands[i].1);
        if satisfied.is_empty() {
            for &i in &rest {
                shares[i] += level * demands[i].1;
            }
            break;
        }
        for &i in &satisfied {
            left -= demands[i].0 - shares[i];
            shares[i] = demands[i].0;
        }
        open = rest;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_is_one_for_equal_and_one_over_n_for_a_monopoly() {
        assert!((jain_index(&[3.0, 3.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((jain_index(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert!((jain_index(&[1.0, 2.0]) - 0.9).abs() < 1e-12);
    }

    #[test]
    fn water_filling_caps_small_demands_and_splits_the_rest_by_weight() {
        let shares = max_min_shares(100.0, &[(10.0, 1.0), (500.0, 1.0), (500.0, 2.0)]);
        assert!((shares[0] - 10.0).abs() < 1e-9);
        assert!((shares[1] - 30.0).abs() < 1e-9);
        assert!((shares[2] - 60.0).abs() < 1e-9);
        let under = max_min_shares(100.0, &[(10.0, 1.0), (20.0, 1.0)]);
        assert_eq!(under, vec![10.0, 20.0]);
    }
}
