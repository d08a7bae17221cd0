//! The `bulkhead` command.

use bulkhead::simulate::{self, SimulateOptions};
use clap::{Parser, Subcommand};

/// bulkhead: serve LLMs to many tenants on one GPU host, isolated at every layer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the seeded fairness simulation of the scheduler and print its table.
    Simulate {
        /// Seed of the simulated arrivals.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print per-tenant lines for every scenario and policy.
        #[arg(long, short)]
        verbose: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate { seed, verbose } => {
            let report = simulate::run(SimulateOptions { seed, verbose });
            #[expect(clippy::print_stdout, reason = "the command's output")]
            {
                print!("{report}");
            }
        }
    }
}
