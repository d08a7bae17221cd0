//! bulkhead's kernel programs, built for `bpfel-unknown-none` by `cargo xtask build-ebpf`.
//!
//! The object holds every program and map of `bulkhead_ebpf_common`'s
//! contract; the proxy loads it with aya. Programs:
//! - [`ingress::bulkhead_ingress`] (`cgroup_skb/ingress` on the proxy's
//!   cgroup): maps each packet's source to a tenant, enforces the tenant's
//!   packet and byte GCRA limits (or the per-address budget of unregistered
//!   sources), tags passing packets with the tenant's mark and priority, and
//!   counts and reports drops.
//! - [`egress::bulkhead_egress`] (`cgroup_skb/egress`): tags and counts the
//!   packets a tenant's flows send; never drops.
//!
//! Modules: [`maps`] (the maps, named as the contract says), [`parse`] (the
//! flow of a packet), [`gcra`] (the shared token buckets), [`events`]
//! (counters, drop aggregation and the event ring).
//!
//! Built for any other target (as `cargo clippy --workspace` on the host
//! does) the crate is an empty binary, so the stable toolchain never has to
//! compile BPF code or the nightly features it uses (`core_intrinsics`, for
//! the compare-and-swap the BPF target has no stable atomics for).

#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        clippy::inline_always,
        reason = "each program must be one flat function: no BPF-to-BPF calls, constants folded for the verifier"
    )
)]

#[cfg(target_arch = "bpf")]
mod egress;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod gcra;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;

/// `cgroup_skb` verdict: let the packet through.
#[cfg(target_arch = "bpf")]
const PASS: i32 = 1;
/// `cgroup_skb` verdict: drop the packet.
#[cfg(target_arch = "bpf")]
const DROP: i32 = 0;

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
