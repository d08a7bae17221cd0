//! `bulkhead_ingress`: the `cgroup_skb` ingress program of the proxy's cgroup.
//!
//! It sees every packet delivered to a socket of the cgroup. For now it
//! passes every packet and counts packets and bytes in [`BH_INGRESS_CNT`];
//! the tenant lookup, token buckets and marks come next.

use aya_ebpf::{
    macros::{cgroup_skb, map},
    maps::PerCpuArray,
    programs::SkBuffContext,
};
use bulkhead_ebpf_common::{COUNTER_SLOT_ALL, COUNTER_SLOTS, PacketCounters};

/// `cgroup_skb` verdict: let the packet through.
const PASS: i32 = 1;

/// Packets and bytes seen by [`bulkhead_ingress`], per CPU (userspace sums the CPUs).
///
/// The map's name is the static's name; it must equal
/// `bulkhead_ebpf_common::INGRESS_COUNTERS_MAP`, which the loader uses.
#[map]
static BH_INGRESS_CNT: PerCpuArray<PacketCounters> =
    PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Counts the packet, then passes it.
#[cgroup_skb(ingress)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro passes the context by value"
)]
pub fn bulkhead_ingress(ctx: SkBuffContext) -> i32 {
    match try_bulkhead_ingress(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// The program's body; `Err` carries the verdict for a failure (pass: counting is best effort).
fn try_bulkhead_ingress(ctx: &SkBuffContext) -> Result<i32, i32> {
    let counters = BH_INGRESS_CNT.get_ptr_mut(COUNTER_SLOT_ALL).ok_or(PASS)?;
    // SAFETY: `get_ptr_mut` returned a non-null, aligned pointer to this CPU's
    // value of a per-CPU array slot; programs do not migrate CPUs mid-run, so
    // nothing else writes it while this reference lives.
    #[expect(unsafe_code, reason = "map values are reached through raw pointers")]
    let counters = unsafe { &mut *counters };
    counters.packets = counters.packets.wrapping_add(1);
    counters.bytes = counters.bytes.wrapping_add(u64::from(ctx.len()));
    Ok(PASS)
}
