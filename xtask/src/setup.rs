//! `cargo xtask setup`: install what the build and tests need, skipping what is present.
//!
//! Setup is a list of [`Step`]s in groups. A step first checks whether its
//! tool is present (and the right version); only if not does it install it.
//! Running setup twice does nothing the second time.
//!
//! Extension point: a new group of tools (the Python venv for the HTTP/3
//! clients, NVRTC for the CUDA compile check, ...) is a new flag on
//! [`SetupOptions`] and a `fn ..._steps() -> Vec<Step>` added in [`steps`].

use crate::process::{self, stdout_of};
use anyhow::{Context as _, bail};
use std::path::Path;
use std::process::Command;

/// The nightly toolchain the eBPF crate builds with, by rustup name.
pub const NIGHTLY: &str = crate::build_ebpf::EBPF_NIGHTLY;
/// The build date the nightly must have: bpf-linker is tied to its LLVM major (22).
pub const NIGHTLY_DATE: &str = "2026-05-19";
/// The LLVM major version shared by the nightly, bpf-linker and the Debian package.
const LLVM_MAJOR: u32 = 22;
/// The bpf-linker release built against that LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Options of `cargo xtask setup`.
#[derive(Debug, Default, clap::Args)]
pub struct SetupOptions {
    /// Also install what `cargo xtask build-ebpf` needs: nightly rust-src, LLVM 22, bpf-linker.
    #[arg(long)]
    pub ebpf: bool,
    /// Skip NVRTC (the pinned `nvidia-cuda-nvrtc` wheel in target/nvrtc) that the CUDA compile check needs.
    #[arg(long)]
    pub no_nvrtc: bool,
    /// Skip the Python venv (target/pyenv: pinned `aioquic` and `openai`) of the HTTP/3 and `OpenAI` test clients.
    #[arg(long)]
    pub no_pyenv: bool,
}

/// What a step found when it looked.
enum Found {
    /// Present; the string says what was found.
    Present(String),
    /// Missing or the wrong version; the string says what was found instead.
    Missing(String),
}

/// One thing setup makes sure of.
struct Step {
    /// What is made sure of, for the log.
    name: String,
    /// Looks without changing anything.
    check: Box<dyn Fn() -> anyhow::Result<Found>>,
    /// Installs; runs only when `check` found it missing, and `check` runs again after.
    install: Box<dyn Fn() -> anyhow::Result<()>>,
}

/// Runs every step that `opts` selects, in order.
pub fn run(root: &Path, opts: &SetupOptions) -> anyhow::Result<()> {
    for step in steps(root, opts)? {
        match (step.check)().with_context(|| format!("setup: checking {}", step.name))? {
            Found::Present(what) => {
                println!("==> [setup] {}: present ({what}), skipped", step.name);
            }
            Found::Missing(what) => {
                println!("==> [setup] {}: missing ({what}), installing", step.name);
                (step.install)().with_context(|| format!("setup: installing {}", step.name))?;
                match (step.check)()? {
                    Found::Present(what) => {
                        println!("==> [setup] {}: installed ({what})", step.name);
                    }
                    Found::Missing(what) => {
                        bail!(
                            "setup: {} still missing after installing ({what})",
                            step.name
                        )
                    }
                }
            }
        }
    }
    Ok(())
}

/// The steps `opts` selects: the base group always, the others by flag.
fn steps(root: &Path, opts: &SetupOptions) -> anyhow::Result<Vec<Step>> {
    let mut steps = base_steps(root)?;
    if !opts.no_nvrtc {
        steps.push(nvrtc_step(root));
    }
    if !opts.no_pyenv {
        steps.push(pyenv_step(root));
    }
    if opts.ebpf {
        steps.extend(ebpf_steps());
    }
    Ok(steps)
}

/// The pinned stable toolchain's rustfmt and clippy, which `cargo xtask ci` uses.
fn base_steps(root: &Path) -> anyhow::Result<Vec<Step>> {
    let toolchain = pinned_stable(root)?;
    Ok(["rustfmt", "clippy"]
        .into_iter()
        .map(|component| rustup_component(&toolchain, component))
        .collect())
}

/// NVRTC 13.0 from `PyPI` in `target/nvrtc`, for the kernels' compile check (see `crate::nvrtc`).
fn nvrtc_step(root: &Path) -> Step {
    let (for_check, for_install) = (root.to_path_buf(), root.to_path_buf());
    Step {
        name: format!(
            "NVRTC ({} {})",
            crate::nvrtc::PACKAGE,
            crate::nvrtc::VERSION
        ),
        check: Box::new(move || {
            Ok(match crate::nvrtc::check(&for_check) {
                Ok(what) => Found::Present(what),
                Err(what) => Found::Missing(what),
            })
        }),
        install: Box::new(move || crate::nvrtc::install(&for_install)),
    }
}

/// The test clients' Python venv in `target/pyenv` (see `crate::pyenv`).
fn pyenv_step(root: &Path) -> Step {
    let (for_check, for_install) = (root.to_path_buf(), root.to_path_buf());
    Step {
        name: format!(
            "Python test clients ({})",
            crate::pyenv::requirements().join(", ")
        ),
        check: Box::new(move || {
            Ok(match crate::pyenv::check(&for_check) {
                Ok(what) => Found::Present(what),
                Err(what) => Found::Missing(what),
            })
        }),
        install: Box::new(move || crate::pyenv::install(&for_install)),
    }
}

/// The nightly with rust-src, LLVM 22's libraries, and bpf-linker built against them.
fn ebpf_steps() -> Vec<Step> {
    vec![
        Step {
            name: format!("toolchain {NIGHTLY} of {NIGHTLY_DATE}"),
            check: Box::new(|| {
                let version = stdout_of(Command::new("rustc").arg(format!("+{NIGHTLY}")).arg("-V"))
                    .unwrap_or_else(|| "not installed".to_owned());
                Ok(if version.contains(NIGHTLY_DATE) {
                    Found::Present(version.trim().to_owned())
                } else {
                    Found::Missing(version.trim().to_owned())
                })
            }),
            install: Box::new(|| {
                bail!(
                    "the eBPF build needs the `{NIGHTLY}` toolchain of {NIGHTLY_DATE} (rustc 1.97, \
                     LLVM {LLVM_MAJOR}), which bpf-linker {BPF_LINKER_VERSION} is tied to; \
                     `rustc +{NIGHTLY} -V` shows another or none, and toolchains cannot be \
                     downloaded on these machines (see docs/toolchain.md)"
                )
            }),
        },
        rustup_component(NIGHTLY, "rust-src"),
        Step {
            name: format!("llvm-{LLVM_MAJOR}-dev (Debian)"),
            check: Box::new(|| {
                let package = format!("llvm-{LLVM_MAJOR}-dev");
                let status = stdout_of(Command::new("dpkg-query").args([
                    "-W",
                    "-f=${Status} ${Version}",
                    &package,
                ]))
                .unwrap_or_default();
                Ok(if status.starts_with("install ok installed") {
                    Found::Present(
                        status
                            .trim_start_matches("install ok installed ")
                            .to_owned(),
                    )
                } else {
                    Found::Missing("not installed".to_owned())
                })
            }),
            install: Box::new(|| {
                let package = format!("llvm-{LLVM_MAJOR}-dev");
                process::run(
                    "setup",
                    Command::new("apt-get")
                        .arg("update")
                        .env("DEBIAN_FRONTEND", "noninteractive"),
                )?;
                process::run(
                    "setup",
                    Command::new("apt-get")
                        .args(["install", "-y", "--no-install-recommends", &package])
                        .env("DEBIAN_FRONTEND", "noninteractive"),
                )
                .context("apt-get needs root")
            }),
        },
        Step {
            name: format!("bpf-linker {BPF_LINKER_VERSION}"),
            check: Box::new(|| {
                let version = stdout_of(Command::new("bpf-linker").arg("--version"))
                    .unwrap_or_else(|| "not installed".to_owned());
                let version = version.trim().to_owned();
                Ok(
                    if version.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
                        Found::Present(version)
                    } else {
                        Found::Missing(version)
                    },
                )
            }),
            install: Box::new(|| {
                process::run(
                    "setup",
                    Command::new("cargo")
                        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}"))
                        .args([
                            "install",
                            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                            "--locked",
                            "--force",
                            "--no-default-features",
                            "--features",
                            &format!("llvm-{LLVM_MAJOR}"),
                        ]),
                )
            }),
        },
    ]
}

/// A rustup component of `toolchain`.
fn rustup_component(toolchain: &str, component: &'static str) -> Step {
    let name = format!("{component} for toolchain {toolchain}");
    let (for_check, for_install) = (toolchain.to_owned(), toolchain.to_owned());
    Step {
        name,
        check: Box::new(move || {
            let installed = stdout_of(Command::new("rustup").args([
                "component",
                "list",
                "--installed",
                "--toolchain",
                &for_check,
            ]))
            .unwrap_or_default();
            let present = installed
                .lines()
                .find(|line| *line == component || line.starts_with(&format!("{component}-")));
            Ok(match present {
                Some(line) => Found::Present(line.to_owned()),
                None => Found::Missing("not in `rustup component list --installed`".to_owned()),
            })
        }),
        install: Box::new(move || {
            process::run(
                "setup",
                Command::new("rustup").args([
                    "component",
                    "add",
                    component,
                    "--toolchain",
                    &for_install,
                ]),
            )
        }),
    }
}

/// The stable toolchain pinned by `rust-toolchain.toml` (its `channel`).
fn pinned_stable(root: &Path) -> anyhow::Result<String> {
    let path = root.join("rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("{} has no `channel = \"...\"` line", path.display()))
}
