//! Builds the eBPF programs (`ebpf/programs`) and embeds the object, when the toolchain is here.
//!
//! The object needs the pinned nightly with `rust-src` and `bpf-linker`
//! (`cargo xtask setup --ebpf`). A machine without them still builds
//! bulkhead, with a warning and without the object: kernel enforcement then
//! reports "no object embedded" at run time, and `simulate` works as ever.
//!
//! - `BULKHEAD_EBPF=off`: do not try (no object, no warning).
//! - toolchain absent: a `cargo::warning`, no object.
//! - toolchain present but the build fails: this build fails with its output.
//!
//! On success it sets `cfg(bulkhead_ebpf_object)` and the env var
//! `BULKHEAD_EBPF_OBJECT` (the object's absolute path) for the crate.
//!
//! The nested `cargo` uses its own target directory (`target/ebpf`): the
//! outer cargo holds the lock of `target/` while this script runs.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

include!("../ebpf/build_spec.rs");

fn main() -> ExitCode {
    println!("cargo::rustc-check-cfg=cfg(bulkhead_ebpf_object)");
    println!("cargo::rerun-if-env-changed=BULKHEAD_EBPF");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("proxy/ lives one level below the workspace root")
        .to_path_buf();
    for watched in [
        "ebpf/programs/src",
        "ebpf/programs/Cargo.toml",
        "ebpf/common/src",
        "ebpf/common/Cargo.toml",
        "ebpf/build_spec.rs",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(watched).display());
    }

    if std::env::var_os("BULKHEAD_EBPF").is_some_and(|v| v == "off") {
        return ExitCode::SUCCESS;
    }
    if let Err(missing) = toolchain_present() {
        println!(
            "cargo::warning=eBPF object not built ({missing}): kernel enforcement will be \
             unavailable in this binary; run `cargo xtask setup --ebpf` to install the toolchain, \
             or set BULKHEAD_EBPF=off to silence this"
        );
        return ExitCode::SUCCESS;
    }

    let target_dir = root.join("target").join("ebpf");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_owned());
    let mut cmd = ebpf_cargo(&root, "build", &arch);
    clear_outer_env(&mut cmd);
    cmd.args(["--bins", "--release", "--target-dir"])
        .arg(&target_dir);
    let output = match cmd.output() {
        Ok(output) => output,
        Err(err) => {
            eprintln!("error: could not run the nested eBPF build {cmd:?}: {err}");
            return ExitCode::FAILURE;
        }
    };
    if !output.status.success() {
        eprintln!(
            "error: the eBPF build failed ({}): {cmd:?}\n--- its output ---\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!("(set BULKHEAD_EBPF=off to build without kernel enforcement)");
        return ExitCode::FAILURE;
    }
    let object = target_dir
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_PACKAGE);
    if !object.is_file() {
        eprintln!(
            "error: the eBPF build succeeded but {} is not there",
            object.display()
        );
        return ExitCode::FAILURE;
    }
    println!("cargo::rustc-cfg=bulkhead_ebpf_object");
    println!("cargo::rustc-env=BULKHEAD_EBPF_OBJECT={}", object.display());
    ExitCode::SUCCESS
}

/// `Ok` if bpf-linker runs and the nightly has `rust-src`; else what is missing.
fn toolchain_present() -> Result<(), String> {
    let root = Path::new(".");
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Err("bpf-linker not found".to_owned());
    }
    let mut rustc = Command::new("rustc");
    clear_outer_env(&mut rustc);
    let sysroot = rustc
        .current_dir(root)
        .arg(format!("+{EBPF_NIGHTLY}"))
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return Err(format!("toolchain `{EBPF_NIGHTLY}` not installed"));
    };
    if !sysroot.join("lib/rustlib/src/rust/library").is_dir() {
        return Err(format!("toolchain `{EBPF_NIGHTLY}` has no rust-src"));
    }
    Ok(())
}

/// Clears from `cmd` the environment the outer build gives this script.
fn clear_outer_env(cmd: &mut Command) {
    // The outer cargo sets these for build scripts (its toolchain, its rustc,
    // its flags, its jobserver, the script's own target and profile); the
    // nested build must see none of them. CARGO_HOME and RUSTUP_HOME stay.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer = (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("__CARGO")
            || matches!(
                key,
                "RUSTUP_TOOLCHAIN"
                    | "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "PROFILE"
                    | "NUM_JOBS"
            );
        if outer {
            cmd.env_remove(key);
        }
    }
}
