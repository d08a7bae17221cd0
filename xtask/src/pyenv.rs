//! The Python venv of the HTTP/3 and `OpenAI` test clients, at `target/pyenv`:
//! `aioquic` (an HTTP/3 client nobody here wrote, for `proxy/tests/py/h3_client.py`)
//! and the `openai` SDK (HTTP/1.1 and h2 only: it talks to the TLS/TCP listener),
//! the Kubernetes schemas, and Hugging Face's `tokenizers` (the BPE reference).
//!
//! Both are pinned exactly; their own dependencies are left to pip's
//! resolver. The check imports both and compares `__version__`, so a venv
//! whose install broke halfway is found missing and rebuilt from scratch.

use crate::process::{self, stdout_of};
use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The pinned packages, as pip requirements and as (module, version) to check.
pub const PACKAGES: [(&str, &str); 5] = [
    ("aioquic", "1.7.2"),
    ("openai", "3.51.0"),
    // The Kubernetes schemas (bundled, offline) that `proxy/tests/deploy_artifacts.rs`
    // validates deploy/k8s and the generated NetworkPolicies against.
    ("kubernetes_validate", "1.37.0"),
    // Hugging Face's tokenizers, the reference `kernels/tests/bpe_reference.rs`
    // holds the BPE tokenizer of real checkpoints to.
    ("tokenizers", "0.23.3"),
    // Renders the model families' own chat templates for the same test.
    ("jinja2", "3.1.6"),
];

/// The venv's directory.
pub fn venv_dir(root: &Path) -> PathBuf {
    root.join("target").join("pyenv")
}

/// The venv's interpreter, which the tests run.
pub fn python(root: &Path) -> PathBuf {
    venv_dir(root).join("bin").join("python")
}

/// `Ok(description)` when the venv imports every pinned package at its pinned
/// version, `Err(what was found)` otherwise.
pub fn check(root: &Path) -> Result<String, String> {
    let python = python(root);
    if !python.is_file() {
        return Err(format!("no venv at {}", venv_dir(root).display()));
    }
    let script = PACKAGES
        .iter()
        .map(|(module, _)| format!("import {module}; print({module}.__version__)"))
        .collect::<Vec<_>>()
        .join("; ");
    let found = stdout_of(Command::new(&python).args(["-c", &script]))
        .ok_or_else(|| format!("{} cannot import {}", python.display(), names()))?;
    let versions: Vec<&str> = found.lines().map(str::trim).collect();
    let mismatched: Vec<String> = PACKAGES
        .iter()
        .zip(versions.iter().chain(std::iter::repeat(&"?")))
        .filter(|((_, want), have)| *want != **have)
        .map(|((module, want), have)| format!("{module} {have} (want {want})"))
        .collect();
    if mismatched.is_empty() {
        Ok(format!(
            "{} in {}",
            requirements().join(" "),
            venv_dir(root).display()
        ))
    } else {
        Err(mismatched.join(", "))
    }
}

/// Creates the venv anew and installs the pinned packages into it.
pub fn install(root: &Path) -> anyhow::Result<()> {
    let system_python = ["python3", "python"]
        .into_iter()
        .find(|p| stdout_of(Command::new(p).args(["-m", "venv", "--help"])).is_some())
        .context(
            "the test clients' venv needs Python 3 with the venv module (`python3 -m venv`)",
        )?;
    let dir = venv_dir(root);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    process::run(
        "setup",
        Command::new(system_python).args(["-m", "venv"]).arg(&dir),
    )?;
    process::run(
        "setup",
        Command::new(python(root))
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
            ])
            .args(requirements()),
    )?;
    if let Err(what) = check(root) {
        bail!(
            "pip installed {} but found {what}",
            requirements().join(" ")
        );
    }
    Ok(())
}

/// The pinned packages as pip requirements (`name==version`).
pub fn requirements() -> Vec<String> {
    PACKAGES
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect()
}

fn names() -> String {
    PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(" and ")
}
