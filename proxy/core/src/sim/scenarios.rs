//! The standard scenarios: the seed's noisy-neighbour case and two saturated ones.

use super::{Arrivals, Policy, Report, Scenario, ServerModel, TenantLoad};
use crate::TenantId;
use crate::fair_queue::ServiceWeights;
use std::fmt::Write as _;
use std::time::Duration;

/// The server every standard scenario uses: 25 ms steps of 1,024 tokens
/// (~41k tokens/s) over up to 256 sequences — an H100-class decode batch.
pub const STANDARD_SERVER: ServerModel = ServerModel {
    step: Duration::from_millis(25),
    tokens_per_step: 1_024,
    max_seqs: 256,
};

fn tenant(id: &str, weight: u32, arrivals: Arrivals) -> TenantLoad {
    TenantLoad {
        id: TenantId::new(id).expect("static id"),
        weight,
        arrivals,
        prompt_tokens: (32, 512),
        output_tokens: (16, 256),
        max_queued: 512,
        pause: None,
    }
}

fn scenario(name: &str, seed: u64, tenants: Vec<TenantLoad>) -> Scenario {
    Scenario {
        name: name.to_owned(),
        seed,
        duration: Duration::from_mins(2),
        warmup: Duration::from_secs(10),
        server: STANDARD_SERVER,
        weights: ServiceWeights::default(),
        tenants,
    }
}

/// B's bursts: 200 requests/s for about a second, then about a second of silence.
const B_BURSTS: Arrivals = Arrivals::Bursty {
    peak_per_second: 200.0,
    mean_on: Duration::from_secs(1),
    mean_off: Duration::from_secs(1),
};

/// The seed's scenario: tenant "a" sends 10 requests/s (Poisson), tenant "b"
/// bursts at 200 requests/s, equal weights; "b" alone saturates the server.
pub fn noisy_neighbour(seed: u64) -> Scenario {
    scenario(
        "noisy neighbour (a: 10 req/s, b: bursts of 200 req/s, weights 1:1)",
        seed,
        vec![
            tenant("a", 1, Arrivals::Poisson { per_second: 10.0 }),
            tenant("b", 1, B_BURSTS),
        ],
    )
}

/// Both tenants ask for more than the server has: "a" at 150 requests/s
/// (Poisson), "b" in bursts of 200 requests/s, with the given weights.
pub fn saturated(seed: u64, weight_a: u32, weight_b: u32) -> Scenario {
    scenario(
        &format!(
            "both saturating (a: 150 req/s, b: bursts of 200 req/s, weights {weight_a}:{weight_b})"
        ),
        seed,
        vec![
            tenant("a", weight_a, Arrivals::Poisson { per_second: 150.0 }),
            tenant("b", weight_b, B_BURSTS),
        ],
    )
}

/// A tenant that goes away and comes back: "a" and "b" both send 150
/// requests/s (Poisson, equal weights), but "a" is silent from 20 s to 60 s.
/// A scheduler that banks a's idle time lets it shut "b" out when it returns.
pub fn returning(seed: u64) -> Scenario {
    let mut a = tenant("a", 1, Arrivals::Poisson { per_second: 150.0 });
    a.pause = Some((Duration::from_secs(20), Duration::from_mins(1)));
    scenario(
        "returning tenant (a and b: 150 req/s each, a silent from 20 s to 60 s, weights 1:1)",
        seed,
        vec![a, tenant("b", 1, Arrivals::Poisson { per_second: 150.0 })],
    )
}

/// The numbers the fairness table prints for one seed.
#[derive(Clone, Debug)]
pub struct FairnessSummary {
    /// "a"'s p99 queueing delay with "b" present, per policy.
    pub noisy: Vec<Report>,
    /// "a" alone on the same server (same arrivals).
    pub alone: Report,
    /// Equal weights, both saturating, per policy.
    pub equal: Vec<Report>,
    /// Weights 2:1, both saturating, per policy.
    pub weighted: Vec<Report>,
    /// "a" returns after 40 s away, per policy.
    pub returning: Vec<Report>,
}

/// Policies compared in the table, bulkhead's first.
pub const POLICIES: [Policy; 4] = [
    Policy::Vtc,
    Policy::VtcNoPreempt,
    Policy::SeedWfq,
    Policy::Fifo,
];

impl FairnessSummary {
    /// Runs the three standard scenarios under every policy.
    pub fn run(seed: u64) -> Self {
        let noisy = noisy_neighbour(seed);
        let equal = saturated(seed, 1, 1);
        let weighted = saturated(seed, 2, 1);
        let returning = returning(seed);
        Self {
            alone: noisy.only(|t| t.id.as_str() == "a").run(Policy::Vtc),
            noisy: POLICIES.iter().map(|&p| noisy.run(p)).collect(),
            equal: POLICIES.iter().map(|&p| equal.run(p)).collect(),
            weighted: POLICIES.iter().map(|&p| weighted.run(p)).collect(),
            returning: POLICIES.iter().map(|&p| returning.run(p)).collect(),
        }
    }

    /// The comparison table, one row per policy.
    pub fn table(&self) -> String {
        let alone_p99 = self.alone.tenant("a").delay_quantile(0.99);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "server: {:.0} tokens/s ({} tokens per {:?} step, {} sequences); service = prompt + 2 x output tokens",
            STANDARD_SERVER.tokens_per_second(),
            STANDARD_SERVER.tokens_per_step,
            STANDARD_SERVER.step,
            STANDARD_SERVER.max_seqs
        );
        let _ = writeln!(out, "a alone: p99 queueing delay {alone_p99:.1?}\n");
        let _ = writeln!(
            out,
            "{:<16}| {:^30} | {:^28} | {:^12}",
            "", "noisy neighbour", "both saturating", "returning"
        );
        let _ = writeln!(
            out,
            "{:<16}| {:>10} {:>9} {:>9} | {:>8} {:>8} {:>10} | {:>12}",
            "policy", "a p99", "vs alone", "jain", "jain 1:1", "jain 2:1", "ratio 2:1", "b starved"
        );
        let _ = writeln!(out, "{}", "-".repeat(96));
        for (((noisy, equal), weighted), back) in self
            .noisy
            .iter()
            .zip(&self.equal)
            .zip(&self.weighted)
            .zip(&self.returning)
        {
            let p99 = noisy.tenant("a").delay_quantile(0.99);
            let _ = writeln!(
                out,
                "{:<16}| {:>10.1?} {:>8.2}x {:>9.4} | {:>8.4} {:>8.4} {:>10.3} | {:>12.1?}",
                noisy.policy.name(),
                p99,
                p99.as_secs_f64() / alone_p99.as_secs_f64(),
                noisy.jain,
                equal.jain,
                weighted.jain,
                weighted.contended_ratio("a", "b"),
                back.tenant("b").longest_starved,
            );
        }
        let _ = writeln!(
            out,
            "\na p99: a's p99 queueing delay beside b, and against a alone on the same server;\n\
             jain: Jain's index of each tenant's service over its weighted max-min fair share;\n\
             ratio 2:1: a's service over b's while both were backlogged, weights 2:1;\n\
             b starved: the longest time b had requests queued and none admitted."
        );
        out
    }
}
