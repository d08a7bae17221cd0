//! `cargo xtask build-ebpf`: build `ebpf/programs` for the BPF target with the pinned nightly.
//!
//! The command and its flags live in `ebpf/build_spec.rs`, shared with the
//! proxy's `build.rs`, which builds the same object to embed it.

use crate::process;
use crate::setup::NIGHTLY_DATE;
use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

include!("../../ebpf/build_spec.rs");

/// Options of `cargo xtask build-ebpf`.
#[derive(Debug, Default, clap::Args)]
pub struct BuildEbpfOptions {
    /// Build with the release profile (what the loader embeds).
    #[arg(long)]
    pub release: bool,
}

/// Builds the programs and returns the object's path (also printed).
pub fn run(root: &Path, opts: &BuildEbpfOptions) -> anyhow::Result<PathBuf> {
    let mut cmd = nightly_cargo(root, "build");
    cmd.arg("--bins");
    if opts.release {
        cmd.arg("--release");
    }
    process::run("build-ebpf", &mut cmd).with_context(needs_setup)?;

    let profile = if opts.release { "release" } else { "debug" };
    let object = root
        .join("target")
        .join(EBPF_TARGET)
        .join(profile)
        .join(EBPF_PACKAGE);
    if !object.is_file() {
        bail!("the build succeeded but {} is not there", object.display());
    }
    println!("{}", object.display());
    Ok(object)
}

/// Runs clippy with warnings as errors on the programs, for the BPF target they build for.
pub fn clippy(root: &Path) -> anyhow::Result<()> {
    let mut cmd = nightly_cargo(root, "clippy");
    cmd.args(["--", "-D", "warnings"]);
    process::run("clippy-ebpf", &mut cmd).with_context(needs_setup)
}

/// `cargo +nightly <subcommand>` of the eBPF package for the BPF target, in `root`.
fn nightly_cargo(root: &Path, subcommand: &str) -> Command {
    let mut cmd = ebpf_cargo(root, subcommand, std::env::consts::ARCH);
    // The outer `cargo xtask` runs under the stable toolchain; let `+nightly` decide alone.
    for key in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

/// The hint for a failed nightly build.
fn needs_setup() -> String {
    format!(
        "the eBPF step failed (its output is above; if the {EBPF_NIGHTLY} of {NIGHTLY_DATE} with \
         rust-src or bpf-linker is missing, run `cargo xtask setup --ebpf`)"
    )
}
