//! `bulkhead_ingress`: the `cgroup_skb` ingress program of the proxy's cgroup.
//!
//! Every TCP or UDP packet delivered to a socket of the cgroup is keyed by
//! its source (address, port, protocol) and looked up in `BH_FLOWS`:
//!
//! - a registered flow's tenant must have an active `BH_LIMITS` slot (else
//!   the packet is dropped, fail closed, with `DROP_INACTIVE_TENANT`) and
//!   the packet must conform to the tenant's packet and byte limits
//!   ([`gcra::admit_tenant`]). A passing packet gets the tenant's mark and
//!   priority;
//! - an unregistered source is held to the per-address budget
//!   `Settings::unknown_packets` ([`gcra::admit_source`]), counted in slot
//!   `UNKNOWN_TENANT`, and passes untagged or is dropped with
//!   `DROP_UNKNOWN_SOURCE`.
//!
//! Other packets (not IPv4/IPv6, not TCP/UDP, IPv6 extension headers,
//! unreadable) pass uncounted. Every counted drop also goes to the drop
//! aggregates and events ([`events::count_dropped`]).

#![expect(
    unsafe_code,
    reason = "the skb and map values are reached through raw pointers"
)]

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::cgroup_skb, programs::SkBuffContext};
use bulkhead_ebpf_common::{
    DROP_INACTIVE_TENANT, DROP_UNKNOWN_SOURCE, FlowKey, FlowValue, LIMITS_ACTIVE,
    SETTINGS_FLOW_EVENTS, Settings, SourceKey, UNKNOWN_TENANT,
};

use crate::events::{self, Packet};
use crate::maps::{BH_FLOWS, BH_LIMITS, BH_STATE, settings};
use crate::parse::{Remote, flow_key};
use crate::{DROP, PASS, gcra};

/// Enforces the tenant limits on a packet delivered to the cgroup.
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

/// The program's body; `Ok` carries the verdict on a counted packet, `Err` passes an uncounted one.
#[inline(always)]
fn try_bulkhead_ingress(ctx: &SkBuffContext) -> Result<i32, i32> {
    let flow = flow_key(ctx, Remote::Source).ok_or(PASS)?;
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let packet = Packet {
        flow: &flow,
        len: ctx.len(),
        now,
    };
    let settings = settings();
    Ok(match BH_FLOWS.get_ptr_mut(flow) {
        Some(value) => {
            // SAFETY: a live `BH_FLOWS` value from the lookup above.
            unsafe { registered(ctx, value, &packet, &settings) }
        }
        None => unregistered(&flow, &packet, &settings),
    })
}

/// The verdict on a packet of a registered flow whose value is at `value`.
///
/// # Safety
/// `value` must point to a live `BH_FLOWS` value.
#[inline(always)]
unsafe fn registered(
    ctx: &SkBuffContext,
    value: *mut FlowValue,
    packet: &Packet<'_>,
    settings: &Settings,
) -> i32 {
    // SAFETY: per the caller's contract. The proxy may replace the value
    // meanwhile; any tenant read is checked below.
    let tenant = unsafe { (*value).tenant };
    if tenant >= UNKNOWN_TENANT {
        // Not a tenant slot: fail closed, counted where unknowns are.
        events::count_dropped(UNKNOWN_TENANT, DROP_INACTIVE_TENANT, packet, settings);
        return DROP;
    }
    if settings.flags & SETTINGS_FLOW_EVENTS != 0 {
        // SAFETY: per the caller's contract.
        unsafe { events::flow_seen(value, tenant, packet, settings) };
    }
    let (Some(limits), Some(state)) = (BH_LIMITS.get(tenant), BH_STATE.get_ptr_mut(tenant)) else {
        events::count_dropped(tenant, DROP_INACTIVE_TENANT, packet, settings);
        return DROP;
    };
    if limits.flags & LIMITS_ACTIVE == 0 {
        events::count_dropped(tenant, DROP_INACTIVE_TENANT, packet, settings);
        return DROP;
    }
    // SAFETY: `state` is the tenant's live `BH_STATE` value.
    match unsafe { gcra::admit_tenant(state, limits, packet.now, packet.len) } {
        Ok(()) => {
            // SAFETY: the context's `__sk_buff`; a cgroup_skb program may
            // write `mark` and `priority`.
            unsafe {
                (*ctx.skb.skb).mark = limits.mark;
                (*ctx.skb.skb).priority = limits.priority;
            }
            events::count_passed(tenant, packet.len);
            PASS
        }
        Err(reason) => {
            events::count_dropped(tenant, reason, packet, settings);
            DROP
        }
    }
}

/// The verdict on a packet whose flow is not registered: the source
/// address's unknown budget decides; no mark is written.
#[inline(always)]
fn unregistered(flow: &FlowKey, packet: &Packet<'_>, settings: &Settings) -> i32 {
    let source = SourceKey {
        addr: flow.addr,
        family: flow.family,
        pad: [0, 0, 0],
    };
    if gcra::admit_source(&source, &settings.unknown_packets, packet.now) {
        events::count_passed(UNKNOWN_TENANT, packet.len);
        PASS
    } else {
        events::count_dropped(UNKNOWN_TENANT, DROP_UNKNOWN_SOURCE, packet, settings);
        DROP
    }
}
