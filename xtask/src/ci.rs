//! `cargo xtask ci`: what `.ci/run` runs, in order, stopping at the first failure.

use crate::build_ebpf::{self, BuildEbpfOptions};
use crate::process;
use crate::setup::{self, SetupOptions};
use std::path::Path;
use std::process::Command;

/// Options of `cargo xtask ci`.
#[derive(Debug, Default, clap::Args)]
pub struct CiOptions {
    /// Skip setting up and building the eBPF programs (also with `BULKHEAD_CI_EBPF=0`).
    #[arg(long)]
    pub no_ebpf: bool,
}

/// Runs setup, formatting check, clippy and the tests, then clippy and the
/// build of the eBPF programs for their target (unless `no_ebpf`).
///
/// Clippy and the tests cover the default members, not `--workspace`: the
/// eBPF crate is built only by the pinned nightly for the BPF target (on the
/// host it is an empty binary), so it is checked by the eBPF steps instead.
pub fn run(root: &Path, opts: &CiOptions) -> anyhow::Result<()> {
    let ebpf = !opts.no_ebpf && std::env::var_os("BULKHEAD_CI_EBPF").is_none_or(|v| v != "0");
    setup::run(
        root,
        &SetupOptions {
            ebpf,
            ..SetupOptions::default()
        },
    )?;

    let cargo = |args: &[&str]| {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root).args(args);
        cmd
    };
    process::run("fmt", &mut cargo(&["fmt", "--all", "--check"]))?;
    process::run(
        "clippy",
        &mut cargo(&["clippy", "--all-targets", "--", "-D", "warnings"]),
    )?;
    // NVRTC (installed by setup) on the library path: the kernels' compile check needs it.
    // Every test binary runs even after one fails, so one CI run shows every failure.
    process::run(
        "test",
        cargo(&["test", "--no-fail-fast"]).env("LD_LIBRARY_PATH", crate::nvrtc::library_path(root)),
    )?;

    if ebpf {
        build_ebpf::clippy(root)?;
        build_ebpf::run(root, &BuildEbpfOptions { release: true })?;
    }
    println!("==> [ci] all steps passed");
    Ok(())
}
