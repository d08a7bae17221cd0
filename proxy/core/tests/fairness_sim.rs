//! The acceptance numbers, held by the seeded simulation.
//!
//! The seed's scenario: tenant a at 10 req/s, tenant b bursting at 200 req/s,
//! equal weights, on a server b alone saturates. The same arrivals replay
//! under every policy, so the comparison is exact.

use bulkhead_core::sim::{
    Arrivals, FairnessSummary, Policy, Scenario, TenantLoad, noisy_neighbour, saturated,
};
use bulkhead_core::{TenantId, fair_queue::ServiceWeights, sim::STANDARD_SERVER};
use proptest::prelude::*;
use std::time::Duration;

const SEEDS: [u64; 3] = [1, 2, 3];

#[test]
fn a_quiet_tenant_waits_no_longer_beside_a_flooding_one() {
    for seed in SEEDS {
        let scenario = noisy_neighbour(seed);
        let alone = scenario.only(|t| t.id.as_str() == "a").run(Policy::Vtc);
        let shared = scenario.run(Policy::Vtc);
        let fifo = scenario.run(Policy::Fifo);
        let alone_p99 = alone.tenant("a").delay_quantile(0.99);
        let p99 = shared.tenant("a").delay_quantile(0.99);
        assert!(
            p99.as_secs_f64() <= 1.2 * alone_p99.as_secs_f64(),
            "seed {seed}: a's p99 {p99:?} beside b vs {alone_p99:?} alone"
        );
        assert!(shared.jain >= 0.99, "seed {seed}: jain {}", shared.jain);
        // FIFO makes a wait behind b's bursts: the comparison the table prints.
        assert!(fifo.tenant("a").delay_quantile(0.99) > 10 * p99);
        assert_eq!(shared.tenant("a").rejected, 0);
    }
}

#[test]
fn saturating_tenants_share_in_proportion_to_weight() {
    for seed in SEEDS {
        let equal = saturated(seed, 1, 1).run(Policy::Vtc);
        assert!(equal.jain >= 0.99, "seed {seed}: jain {}", equal.jain);
        let ratio = equal.contended_ratio("a", "b");
        assert!(
            (ratio - 1.0).abs() <= 0.02,
            "seed {seed}: 1:1 ratio {ratio}"
        );

        let weighted = saturated(seed, 2, 1).run(Policy::Vtc);
        let ratio = weighted.contended_ratio("a", "b");
        assert!(
            (ratio - 2.0).abs() <= 0.04,
            "seed {seed}: 2:1 ratio {ratio}"
        );
        assert!(weighted.jain >= 0.99, "seed {seed}: jain {}", weighted.jain);

        // FIFO ignores weights: the gap the table shows.
        let fifo = saturated(seed, 2, 1).run(Policy::Fifo);
        assert!((fifo.contended_ratio("a", "b") - 2.0).abs() > 0.5);
    }
}

#[test]
fn the_same_seed_gives_the_same_table() {
    assert_eq!(
        FairnessSummary::run(9).table(),
        FairnessSummary::run(9).table()
    );
}

fn small_scenario(seed: u64, rates: &[(u32, f64, bool)]) -> Scenario {
    Scenario {
        name: "random".into(),
        seed,
        duration: Duration::from_secs(8),
        warmup: Duration::from_secs(1),
        server: STANDARD_SERVER,
        weights: ServiceWeights::default(),
        tenants: rates
            .iter()
            .enumerate()
            .map(|(i, &(weight, rate, bursty))| TenantLoad {
                id: TenantId::new(&format!("t{i}")).unwrap(),
                weight,
                arrivals: if bursty {
                    Arrivals::Bursty {
                        peak_per_second: rate * 2.0,
                        mean_on: Duration::from_millis(500),
                        mean_off: Duration::from_millis(500),
                    }
                } else {
                    Arrivals::Poisson { per_second: rate }
                },
                prompt_tokens: (1, 700),
                output_tokens: (1, 300),
                max_queued: 64,
                pause: None,
            })
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Random loads under every policy: the run's own accounting asserts that
    /// every request ends queued, running, finished or refused, exactly once.
    #[test]
    fn random_loads_lose_nothing_and_replay_identically(
        seed in any::<u64>(),
        rates in proptest::collection::vec((1..5_u32, 1.0..150.0_f64, any::<bool>()), 1..5),
    ) {
        let scenario = small_scenario(seed, &rates);
        for policy in [Policy::Vtc, Policy::VtcNoPreempt, Policy::SeedWfq, Policy::Fifo] {
            let report = scenario.run(policy);
            for t in &report.tenants {
                prop_assert!(t.rejected <= t.arrived);
                prop_assert!(t.queue_delays.len() as u64 <= t.arrived + 64);
            }
            prop_assert_eq!(report, scenario.run(policy));
        }
    }
}

#[test]
fn a_returning_tenant_cannot_shut_out_the_one_that_stayed() {
    let scenario = bulkhead_core::sim::returning(1);
    let vtc = scenario.run(Policy::Vtc);
    let seed = scenario.run(Policy::SeedWfq);
    // bulkhead lifts a's counter when it returns: b keeps being served.
    assert!(vtc.tenant("b").longest_starved < Duration::from_secs(1));
    // The seed's global virtual time (a minimum over every tenant ever seen)
    // banks a's absence, and a then takes the whole server for many seconds.
    assert!(seed.tenant("b").longest_starved > Duration::from_secs(10));
}
