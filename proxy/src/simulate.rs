//! `bulkhead simulate`: the fairness simulation of the scheduling core.
//!
//! Replays the same seeded arrivals under bulkhead's scheduler, the seed's
//! WFQ and FIFO on a virtual clock, and prints the comparison table.

use bulkhead_core::sim::FairnessSummary;
use std::fmt::Write as _;

/// What `bulkhead simulate` should print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimulateOptions {
    /// Seed of every random choice in the scenarios.
    pub seed: u64,
    /// Also print each scenario's per-tenant lines.
    pub verbose: bool,
}

/// Runs the standard scenarios and renders the report.
pub fn run(options: SimulateOptions) -> String {
    let summary = FairnessSummary::run(options.seed);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bulkhead fairness simulation (seed {}): 2 minutes of virtual time per run, first 10 s not counted\n",
        options.seed
    );
    out.push_str(&summary.table());
    if options.verbose {
        for report in summary
            .noisy
            .iter()
            .chain(&summary.equal)
            .chain(&summary.weighted)
            .chain(&summary.returning)
        {
            let _ = write!(out, "\n{}\n{}", report.scenario, report.table());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_every_policy_and_scenario() {
        let out = run(SimulateOptions {
            seed: 1,
            verbose: true,
        });
        for needle in [
            "bulkhead VTC",
            "seed WFQ",
            "FIFO",
            "noisy neighbour",
            "both saturating",
        ] {
            assert!(out.contains(needle), "missing {needle:?} in\n{out}");
        }
    }
}
