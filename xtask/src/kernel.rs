//! `cargo xtask load|unload|status`: the kernel programs, through `bulkhead ebpf ...`.
//!
//! Each runs `cargo run -p bulkhead --release -- ebpf <command> <flags>` in
//! the workspace root, so the release binary (with the embedded eBPF
//! object) is built first. Loading and unloading need root.

use crate::process;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where an instance's pins live (as `bulkhead ebpf` takes them).
#[derive(Debug, clap::Args)]
pub struct PinOptions {
    /// Name of the instance: its pins are `<bpffs>/bulkhead/<instance>/`.
    #[arg(long, default_value = "default")]
    pub instance: String,
    /// Mount point of the BPF filesystem.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
}

/// Options of `cargo xtask load`.
#[derive(Debug, clap::Args)]
pub struct LoadOptions {
    /// The host config (tenants' `kernel` limits, `[ebpf]` settings).
    #[arg(long)]
    pub config: PathBuf,
    /// The cgroup (v2 directory) whose sockets are enforced.
    #[arg(long)]
    pub cgroup: PathBuf,
    #[command(flatten)]
    pub pins: PinOptions,
}

/// Options of `cargo xtask status`.
#[derive(Debug, clap::Args)]
pub struct StatusOptions {
    /// The host config, to name tenants by id.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub pins: PinOptions,
}

/// `bulkhead ebpf load`.
pub fn load(root: &Path, opts: &LoadOptions) -> anyhow::Result<()> {
    let mut cmd = bulkhead(root, "load", &opts.pins);
    cmd.arg("--config")
        .arg(absolute(&opts.config))
        .arg("--cgroup")
        .arg(&opts.cgroup);
    process::run("load", &mut cmd)
}

/// `bulkhead ebpf unload`.
pub fn unload(root: &Path, opts: &PinOptions) -> anyhow::Result<()> {
    process::run("unload", &mut bulkhead(root, "unload", opts))
}

/// `bulkhead ebpf status`.
pub fn status(root: &Path, opts: &StatusOptions) -> anyhow::Result<()> {
    let mut cmd = bulkhead(root, "status", &opts.pins);
    if let Some(config) = &opts.config {
        cmd.arg("--config").arg(absolute(config));
    }
    process::run("status", &mut cmd)
}

/// `cargo run -p bulkhead --release -- ebpf <command> --instance .. --bpffs ..`, in `root`.
fn bulkhead(root: &Path, command: &str, pins: &PinOptions) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args([
            "run",
            "--quiet",
            "-p",
            "bulkhead",
            "--release",
            "--",
            "ebpf",
        ])
        .arg(command)
        .arg("--instance")
        .arg(&pins.instance)
        .arg("--bpffs")
        .arg(absolute(&pins.bpffs));
    cmd
}

/// `path` made absolute against the caller's directory (the command runs in the root).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}
