// How the eBPF programs are built: shared, through `include!`, by
// `proxy/build.rs` (which embeds the object) and `xtask/src/build_ebpf.rs`
// (`cargo xtask build-ebpf`), so the two builds cannot drift apart.
//
// The flags follow `aya-build`: `-Z build-std=core` for `bpfel-unknown-none`,
// whose target spec links with `bpf-linker`; `bpf_target_arch` set to the
// host's architecture for aya-ebpf's per-architecture code; full debug info
// and `--btf` so the object carries the BTF that aya and the verifier read.

/// The nightly toolchain of the eBPF build (its date is checked by `xtask setup`).
pub(crate) const EBPF_NIGHTLY: &str = "nightly";
/// The package of the eBPF programs; its binary target is the object file.
pub(crate) const EBPF_PACKAGE: &str = "bulkhead-ebpf";
/// The BPF target: little-endian, as every host bulkhead runs on.
pub(crate) const EBPF_TARGET: &str = "bpfel-unknown-none";

/// `cargo +nightly <subcommand>` of the eBPF package for the BPF target, in
/// `root`, with the programs' rustc flags for a host of architecture `arch`.
pub(crate) fn ebpf_cargo(
    root: &std::path::Path,
    subcommand: &str,
    arch: &str,
) -> std::process::Command {
    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ];
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(root)
        .arg(format!("+{EBPF_NIGHTLY}"))
        .args([subcommand, "--package", EBPF_PACKAGE, "--target", EBPF_TARGET])
        .args(["-Z", "build-std=core"])
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    cmd
}
