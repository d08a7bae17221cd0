//! NVRTC for the CUDA compile check (`kernels/tests/nvrtc_compile.rs`): the
//! pinned `PyPI` wheel, installed with pip into `target/nvrtc` (no GPU, no CUDA
//! toolkit, no network but `PyPI`).
//!
//! Pinned to 13.0.x: the GPU hosts run a CUDA 13.0 driver, and a newer NVRTC
//! emits PTX that driver cannot load. The libraries land in
//! `target/nvrtc/nvidia/cu13/lib`; `cargo xtask ci` puts that directory on
//! `LD_LIBRARY_PATH` for the tests (NVRTC itself dlopens its builtins library
//! from there).

use crate::process::{self, stdout_of};
use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wheel and its pinned version.
pub const PACKAGE: &str = "nvidia-cuda-nvrtc";
/// The pinned version (NVRTC 13.0).
pub const VERSION: &str = "13.0.88";

/// Where pip installs the wheel (`pip install --target`).
pub fn install_dir(root: &Path) -> PathBuf {
    root.join("target").join("nvrtc")
}

/// The directory holding `libnvrtc.so.13` and its builtins.
pub fn lib_dir(root: &Path) -> PathBuf {
    install_dir(root).join("nvidia").join("cu13").join("lib")
}

/// The files the compile check loads.
const LIBRARIES: [&str; 2] = ["libnvrtc.so.13", "libnvrtc-builtins.so.13.0"];

/// `Ok(description)` when the pinned wheel is installed with both libraries,
/// `Err(what was found)` otherwise.
pub fn check(root: &Path) -> Result<String, String> {
    let dist_info = install_dir(root).join(format!("nvidia_cuda_nvrtc-{VERSION}.dist-info"));
    if !dist_info.is_dir() {
        let found = std::fs::read_dir(install_dir(root))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".dist-info"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        return Err(if found.is_empty() {
            format!("nothing in {}", install_dir(root).display())
        } else {
            format!("{found} in {}", install_dir(root).display())
        });
    }
    for lib in LIBRARIES {
        if !lib_dir(root).join(lib).is_file() {
            return Err(format!("{lib} missing from {}", lib_dir(root).display()));
        }
    }
    Ok(format!(
        "{PACKAGE} {VERSION} in {}",
        lib_dir(root).display()
    ))
}

/// Installs the pinned wheel into [`install_dir`], replacing whatever is there.
pub fn install(root: &Path) -> anyhow::Result<()> {
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| stdout_of(Command::new(p).args(["-m", "pip", "--version"])).is_some())
        .context("installing NVRTC needs Python 3 with pip (`python3 -m pip`)")?;
    let dir = install_dir(root);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    process::run(
        "setup",
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--no-deps",
                "--disable-pip-version-check",
                "--no-input",
                "--root-user-action=ignore",
                "--target",
            ])
            .arg(&dir)
            .arg(format!("{PACKAGE}=={VERSION}")),
    )?;
    if let Err(what) = check(root) {
        bail!("pip installed {PACKAGE}=={VERSION} but {what}");
    }
    Ok(())
}

/// `LD_LIBRARY_PATH` with [`lib_dir`] first, for commands that run the compile check.
pub fn library_path(root: &Path) -> String {
    let dir = lib_dir(root).display().to_string();
    match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{dir}:{old}"),
        _ => dir,
    }
}
