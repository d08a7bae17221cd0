//! `cargo xtask`: the project's own tasks, in Rust so they run wherever cargo does.
//!
//! Every task shells out with [`std::process::Command`], prints the command it
//! runs, streams its output, and stops at the first failure with the step named.

mod bench;
mod build_ebpf;
mod ci;
mod kernel;
mod nvrtc;
mod process;
mod pyenv;
mod setup;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Project tasks for bulkhead.
#[derive(Debug, Parser)]
#[command(about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the build and tests need, skipping what is present (idempotent).
    Setup(setup::SetupOptions),
    /// Run what CI runs: setup, `cargo fmt --check`, clippy with warnings as errors, tests.
    Ci(ci::CiOptions),
    /// Build the eBPF programs (`ebpf/programs`) with the pinned nightly and print the object path.
    BuildEbpf(build_ebpf::BuildEbpfOptions),
    /// Load the kernel programs, attach them to a cgroup and pin them (`bulkhead ebpf load`, as root).
    Load(kernel::LoadOptions),
    /// Detach the kernel programs and remove their pins (`bulkhead ebpf unload`, as root).
    Unload(kernel::PinOptions),
    /// Print the kernel programs' links and per-tenant counters (`bulkhead ebpf status`).
    Status(kernel::StatusOptions),
    /// Kernel drop vs a userspace receive-and-drop loop at the same flood rate, and the
    /// ingress program's ns/packet (as root; namespaces and cgroup of its own).
    BenchKernel(bench::BenchKernelOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = workspace_root();
    let result = match cli.command {
        Command::Setup(opts) => setup::run(&root, &opts),
        Command::Ci(opts) => ci::run(&root, &opts),
        Command::BuildEbpf(opts) => build_ebpf::run(&root, &opts).map(|_| ()),
        Command::Load(opts) => kernel::load(&root, &opts),
        Command::Unload(opts) => kernel::unload(&root, &opts),
        Command::Status(opts) => kernel::status(&root, &opts),
        Command::BenchKernel(opts) => bench::kernel(&root, &opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The error chain in one line; a backtrace of xtask itself would only be noise.
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: the parent of this crate's manifest directory.
fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
