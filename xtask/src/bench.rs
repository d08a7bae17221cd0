//! `cargo xtask bench-kernel`: kernel drop against a userspace receive-and-drop
//! loop at the same flood rate, and the ingress program's ns/packet.
//!
//! Builds the `bulkhead-tests` binaries in release (`bh-flood` is the sender)
//! and runs `cargo run --release -p bulkhead-tests --bin bh-kernel-bench --
//! <args>`; the method is documented in `tests/src/bin/bh-kernel-bench.rs`.
//! Needs root: the bench creates network namespaces, a cgroup and a bpffs
//! mount, and loads eBPF programs (all removed when it ends).

use crate::process;
use anyhow::bail;
use std::path::Path;
use std::process::Command;

/// Options of `cargo xtask bench-kernel`.
#[derive(Debug, clap::Args)]
pub struct BenchKernelOptions {
    /// Offered flood rate, packets per second (the same for every variant).
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    /// Flood length per variant, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// UDP payload bytes.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Rounds of every variant; the goals are judged on the median.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

/// Builds the bench and the flood sender, then runs the bench.
pub fn kernel(root: &Path, opts: &BenchKernelOptions) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "bench-kernel must run as root: it creates network namespaces, a cgroup and a bpffs \
             mount, and loads eBPF programs (try `sudo -E cargo xtask bench-kernel`)"
        );
    }
    let release = ["--release", "-p", "bulkhead-tests"];
    process::run(
        "build",
        Command::new("cargo")
            .current_dir(root)
            .arg("build")
            .args(release)
            .arg("--bins"),
    )?;
    process::run(
        "bench-kernel",
        Command::new("cargo")
            .current_dir(root)
            .arg("run")
            .args(release)
            .args(["--bin", "bh-kernel-bench", "--"])
            .args(["--rate", &opts.rate.to_string()])
            .args(["--seconds", &opts.seconds.to_string()])
            .args(["--size", &opts.size.to_string()])
            .args(["--rounds", &opts.rounds.to_string()]),
    )
}

/// Whether this process's effective user is root.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}
