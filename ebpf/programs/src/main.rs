//! bulkhead's kernel programs, built for `bpfel-unknown-none` by `cargo xtask build-ebpf`.
//!
//! The object holds every program and map; the proxy loads it with aya.
//! Programs:
//! - [`ingress::bulkhead_ingress`] (`cgroup_skb/ingress` on the proxy's cgroup).
//!
//! Built for any other target (as `cargo clippy --workspace` on the host
//! does) the crate is an empty binary, so the stable toolchain never has to
//! compile BPF code or the nightly features it may use.

#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod ingress;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects a program with a reachable panic, so no loaded program gets here.
    loop {}
}

/// The programs' license, in the section the kernel reads to allow GPL-only helpers.
#[cfg(target_arch = "bpf")]
#[expect(
    unsafe_code,
    reason = "the kernel finds the license by this exact symbol and section"
)]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// On the host there is nothing to run: say how to build the real object.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("bulkhead-ebpf is built for bpfel-unknown-none by `cargo xtask build-ebpf`");
    std::process::exit(2);
}
