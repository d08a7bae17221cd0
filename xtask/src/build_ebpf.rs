//! `cargo xtask build-ebpf`: build `ebpf/programs` for the BPF target with the pinned nightly.
//!
//! The flags follow `aya-build` (what the proxy's `build.rs` will use later):
//! `-Z build-std=core` for `bpfel-unknown-none`, whose target spec links with
//! `bpf-linker`; `bpf_target_arch` set to the host's architecture for
//! aya-ebpf's per-architecture code; full debug info and `--btf` so the
//! object carries the BTF that aya and the verifier read.

use crate::process;
use crate::setup::{NIGHTLY, NIGHTLY_DATE};
use anyhow::{Context as _, bail};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The package of the eBPF programs.
const PACKAGE: &str = "bulkhead-ebpf";
/// Its binary target: the object file the loader embeds.
const OBJECT: &str = "bulkhead-ebpf";
/// The BPF target: little-endian, as every host bulkhead runs on.
const TARGET: &str = "bpfel-unknown-none";

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
    let object = root.join("target").join(TARGET).join(profile).join(OBJECT);
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
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .arg(format!("+{NIGHTLY}"))
        .args([subcommand, "--package", PACKAGE, "--target", TARGET])
        .args(["-Z", "build-std=core"])
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags());
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
        "the eBPF step failed (its output is above; if the {NIGHTLY} of {NIGHTLY_DATE} with \
         rust-src or bpf-linker is missing, run `cargo xtask setup --ebpf`)"
    )
}

/// The rustc flags of the BPF build, `\x1f`-separated as `CARGO_ENCODED_RUSTFLAGS` wants.
fn rustflags() -> OsString {
    let flags = [
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ];
    OsString::from(flags.join("\x1f"))
}
