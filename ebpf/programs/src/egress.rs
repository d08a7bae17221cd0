//! `bulkhead_egress`: the `cgroup_skb` egress program of the proxy's cgroup.
//!
//! Every TCP or UDP packet a socket of the cgroup sends is keyed by its
//! destination (address, port, protocol). A registered flow's packet gets
//! its tenant's mark and priority (when the tenant's slot is active) and is
//! counted in the tenant's `egress_*` counters; any other TCP/UDP packet is
//! counted in slot `UNKNOWN_TENANT`. Egress never drops.

#![expect(
    unsafe_code,
    reason = "the skb and map values are reached through raw pointers"
)]

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use bulkhead_ebpf_common::{LIMITS_ACTIVE, UNKNOWN_TENANT};

use crate::PASS;
use crate::events;
use crate::maps::{BH_FLOWS, BH_LIMITS};
use crate::parse::{Remote, flow_key};

/// Tags and counts a packet sent by the cgroup; always passes it.
#[cgroup_skb(egress)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro passes the context by value"
)]
pub fn bulkhead_egress(ctx: SkBuffContext) -> i32 {
    match try_bulkhead_egress(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// The program's body; the verdict is always [`PASS`] (`Err` for an uncounted packet).
#[inline(always)]
fn try_bulkhead_egress(ctx: &SkBuffContext) -> Result<i32, i32> {
    let flow = flow_key(ctx, Remote::Destination).ok_or(PASS)?;
    let tenant = match BH_FLOWS.get_ptr(flow) {
        // SAFETY: a live `BH_FLOWS` value from the lookup; any tenant read is checked.
        Some(value) => unsafe { (*value).tenant },
        None => UNKNOWN_TENANT,
    };
    let tenant = if tenant < UNKNOWN_TENANT {
        if let Some(limits) = BH_LIMITS.get(tenant)
            && limits.flags & LIMITS_ACTIVE != 0
        {
            // SAFETY: the context's `__sk_buff`; a cgroup_skb program may
            // write `mark` and `priority`.
            unsafe {
                (*ctx.skb.skb).mark = limits.mark;
                (*ctx.skb.skb).priority = limits.priority;
            }
        }
        tenant
    } else {
        UNKNOWN_TENANT
    };
    events::count_egress(tenant, ctx.len());
    Ok(PASS)
}
