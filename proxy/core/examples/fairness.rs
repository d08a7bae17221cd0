//! Prints the fairness table of the standard scenarios.
fn main() {
    let seed = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let t = std::time::Instant::now();
    let summary = bulkhead_core::sim::FairnessSummary::run(seed);
    #[expect(clippy::print_stdout, reason = "a report")]
    {
        println!("{}", summary.table());
        for r in summary
            .noisy
            .iter()
            .chain(&summary.equal)
            .chain(&summary.weighted)
        {
            println!("{}\n{}", r.scenario, r.table());
        }
        println!("took {:?}", t.elapsed());
    }
}
