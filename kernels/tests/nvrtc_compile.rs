//! CI's CUDA check, on machines without a GPU: every kernel source compiles
//! with NVRTC to an `sm_90` cubin (compile and ptxas assemble), every kernel
//! the host launches is in it, and no function spills a register.
//!
//! It needs NVRTC 13.0 (`libnvrtc.so.13` and `libnvrtc-builtins.so.13.0`):
//! `cargo xtask setup` installs the pinned wheel into `target/nvrtc`, and
//! `cargo xtask ci` runs the tests with it on `LD_LIBRARY_PATH`. Under a plain
//! `cargo test`, the test re-runs itself with that path set when it finds the
//! library there (`BULKHEAD_NVRTC_DIR` overrides the directory). Without the
//! library it fails, naming `cargo xtask setup`: it is not skipped.

use bulkhead_kernels::cuda::{kernel_names, nvrtc};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

const ARCH: &str = "sm_90";
/// Set in the re-run child so that it does not re-run itself again.
const CHILD_MARK: &str = "BULKHEAD_NVRTC_TEST_CHILD";

/// Where `cargo xtask setup` puts the NVRTC libraries.
fn nvrtc_lib_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BULKHEAD_NVRTC_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target/nvrtc/nvidia/cu13/lib")
}

/// Whether NVRTC compiles here: the library loads and finds its builtins.
fn nvrtc_works() -> bool {
    nvrtc::library_present()
        && nvrtc::compile(
            "probe.cu",
            "extern \"C\" __global__ void bh_probe() {}",
            ARCH,
            false,
        )
        .is_ok()
}

/// Runs `test` in this process if NVRTC works here, else re-runs just that
/// test in a child with the project's NVRTC on `LD_LIBRARY_PATH`, else fails.
fn with_nvrtc(test_name: &str, test: impl FnOnce()) {
    if nvrtc_works() {
        test();
        return;
    }
    let dir = nvrtc_lib_dir();
    let in_child = std::env::var_os(CHILD_MARK).is_some();
    assert!(
        !in_child && dir.join("libnvrtc.so.13").is_file(),
        "NVRTC 13.0 is not available (libnvrtc.so.13 and libnvrtc-builtins.so.13.0 must load; \
         looked on LD_LIBRARY_PATH and in {}). Run `cargo xtask setup` (it installs \
         nvidia-cuda-nvrtc==13.0.88 into target/nvrtc), then `cargo xtask ci` or \
         `LD_LIBRARY_PATH={} cargo test -p bulkhead-kernels --test nvrtc_compile`.",
        dir.display(),
        dir.display(),
    );
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", dir.display()),
        _ => dir.display().to_string(),
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    eprintln!("re-running {test_name} with LD_LIBRARY_PATH={path}");
    let status = Command::new(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", &path)
        .env(CHILD_MARK, "1")
        .status()
        .expect("re-running the test binary");
    assert!(
        status.success(),
        "{test_name} failed with NVRTC from {}",
        dir.display()
    );
}

#[test]
fn every_kernel_compiles_for_sm90_without_spills() {
    with_nvrtc("every_kernel_compiles_for_sm90_without_spills", || {
        let (major, minor) = nvrtc::version().expect("NVRTC version");
        println!("NVRTC {major}.{minor}, target {ARCH}");
        assert_eq!(
            major, 13,
            "NVRTC {major}.{minor}: the project pins 13.0 (the GPU hosts run a 13.0 driver)"
        );
        let mut failures = Vec::new();
        let mut seen = BTreeSet::new();
        for (file, src) in nvrtc::SOURCES {
            let compiled = match nvrtc::compile(file, src, ARCH, true) {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("{e}"));
                    continue;
                }
            };
            assert!(!compiled.cubin.is_empty(), "{file}: empty cubin");
            for line in compiled.log.lines().filter(|l| l.contains("warning")) {
                failures.push(format!("{file}: {line}"));
            }
            let report = nvrtc::parse_ptxas_log(&compiled.log);
            assert!(
                !report.is_empty(),
                "{file}: no ptxas report in the log:\n{}",
                compiled.log
            );
            println!("{file}: {} bytes of cubin", compiled.cubin.len());
            println!(
                "  {:<36} {:>5} {:>6} {:>6} {:>6} {:>6}",
                "function", "regs", "stack", "spillS", "spillL", "smem"
            );
            for k in &report {
                println!(
                    "  {:<36} {:>5} {:>6} {:>6} {:>6} {:>6}",
                    k.name, k.registers, k.stack_frame, k.spill_stores, k.spill_loads, k.smem
                );
                if k.spill_stores != 0 || k.spill_loads != 0 {
                    failures.push(format!(
                        "{file}: {} spills ({} bytes stored, {} loaded)",
                        k.name, k.spill_stores, k.spill_loads
                    ));
                }
                if k.entry {
                    seen.insert(k.name.clone());
                }
            }
        }
        for (file, name) in kernel_names() {
            if !seen.contains(&name) {
                failures.push(format!(
                    "{file}: kernel {name}, which the host launches, is not in the cubin"
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "NVRTC check failed:\n{}",
            failures.join("\n")
        );
    });
}

/// The check can fail: a syntax error is a compile error with NVRTC's log,
/// and a kernel forced into 32 registers reports the spills the test rejects.
#[test]
fn the_check_catches_errors_and_spills() {
    with_nvrtc("the_check_catches_errors_and_spills", || {
        let err = nvrtc::compile(
            "broken.cu",
            "extern \"C\" __global__ void bh_broken( { }",
            ARCH,
            true,
        )
        .expect_err("a syntax error must not compile");
        assert!(err.log.contains("error"), "no error in the log: {err}");

        let spilling = r#"
extern "C" __global__ void __launch_bounds__(1024, 2) bh_spill_control(float* o, const float* x) {
    float a[64];
#pragma unroll
    for (int i = 0; i < 64; i++) a[i] = x[threadIdx.x + i * 1024];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; i++)
#pragma unroll
        for (int j = i + 1; j < 64; j++) s = fmaf(a[i], a[j], s);
    o[threadIdx.x] = s;
}"#;
        let compiled =
            nvrtc::compile("spill.cu", spilling, ARCH, true).expect("the control compiles");
        let report = nvrtc::parse_ptxas_log(&compiled.log);
        let control = report
            .iter()
            .find(|k| k.name == "bh_spill_control")
            .unwrap_or_else(|| panic!("no report for the control:\n{}", compiled.log));
        assert!(
            control.spill_stores > 0 && control.spill_loads > 0,
            "the spill control did not report spills: {control:?}\n{}",
            compiled.log
        );
    });
}
