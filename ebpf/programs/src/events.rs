//! Counters, drop aggregation and the event ring.
//!
//! Counters and aggregates are per-CPU map slots updated with plain adds: a
//! program runs with migration disabled and ingress programs do not nest on
//! one CPU; egress (which may run in process context and be interrupted by
//! an ingress softirq) only writes the `egress_*` fields, ingress never.
//!
//! Drops are reported in batches: each CPU keeps a [`bulkhead_ebpf_common::DropAggregate`] per
//! tenant and turns it into one [`EVENT_DROPS`] event once it holds
//! `drop_event_every` packets or its oldest drop is `drop_event_max_delay_ns`
//! old. The aggregate is reset only when the event was reserved, so a full
//! ring delays reports but never loses counts.

#![expect(
    unsafe_code,
    reason = "map values and ring slots are reached through raw pointers"
)]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_get_smp_processor_id,
    maps::ring_buf::RingBufEntry,
};
use bulkhead_ebpf_common::{
    AuditEvent, EVENT_DROPS, EVENT_FLOW_SEEN, FlowKey, FlowValue, Settings,
};
use core::intrinsics::{AtomicOrdering, atomic_cxchg};
use core::ptr;

use crate::maps::{BH_COUNTERS, BH_DROP_AGG, BH_EVENTS};

/// Counts a passed ingress packet of `len` bytes in `tenant`'s slot.
#[inline(always)]
pub fn count_passed(tenant: u32, len: u32) {
    if let Some(counters) = BH_COUNTERS.get_ptr_mut(tenant) {
        // SAFETY: this CPU's value of a per-CPU slot, written by no other
        // context while this program runs (see the module's documentation).
        let counters = unsafe { &mut *counters };
        counters.ingress_passed_packets = counters.ingress_passed_packets.wrapping_add(1);
        counters.ingress_passed_bytes = counters.ingress_passed_bytes.wrapping_add(u64::from(len));
    }
}

/// Counts an egress packet of `len` bytes in `tenant`'s slot.
#[inline(always)]
pub fn count_egress(tenant: u32, len: u32) {
    if let Some(counters) = BH_COUNTERS.get_ptr_mut(tenant) {
        // SAFETY: as in `count_passed`; egress writes only the egress fields.
        let counters = unsafe { &mut *counters };
        counters.egress_packets = counters.egress_packets.wrapping_add(1);
        counters.egress_bytes = counters.egress_bytes.wrapping_add(u64::from(len));
    }
}

/// A packet being dropped or reported.
pub struct Packet<'a> {
    /// Its flow (remote end).
    pub flow: &'a FlowKey,
    /// `skb->len`.
    pub len: u32,
    /// `bpf_ktime_get_ns` when the program started on it.
    pub now: u64,
}

/// Counts a dropped ingress packet of `tenant` for `reason`, adds it to this
/// CPU's aggregate and emits the aggregate as an event when it is due.
#[inline(always)]
pub fn count_dropped(tenant: u32, reason: u32, packet: &Packet<'_>, settings: &Settings) {
    let len = u64::from(packet.len);
    if let Some(counters) = BH_COUNTERS.get_ptr_mut(tenant) {
        // SAFETY: as in `count_passed`.
        let counters = unsafe { &mut *counters };
        counters.ingress_dropped_packets = counters.ingress_dropped_packets.wrapping_add(1);
        counters.ingress_dropped_bytes = counters.ingress_dropped_bytes.wrapping_add(len);
    }
    let Some(agg) = BH_DROP_AGG.get_ptr_mut(tenant) else {
        return;
    };
    // SAFETY: as in `count_passed`; only ingress writes the aggregates.
    let agg = unsafe { &mut *agg };
    if agg.packets == 0 {
        agg.first_ns = packet.now;
    }
    agg.packets = agg.packets.wrapping_add(1);
    agg.bytes = agg.bytes.wrapping_add(len);
    agg.last_reason = reason;
    let age = packet.now.saturating_sub(agg.first_ns);
    if agg.packets < settings.drop_event_every && age < settings.drop_event_max_delay_ns {
        return;
    }
    let Some(mut entry) = BH_EVENTS.reserve::<AuditEvent>(0) else {
        // The ring is full: keep accumulating; the next drop tries again.
        return;
    };
    entry.write(AuditEvent {
        kind: EVENT_DROPS,
        reason,
        tenant,
        cpu: cpu(),
        time_ns: packet.now,
        packets: agg.packets,
        bytes: agg.bytes,
        flow: *packet.flow,
        pad: [0, 0, 0, 0],
    });
    submit(entry, settings);
    // Field by field and volatile: LLVM merges plain zero stores into a
    // `memset`, which bpf-linker leaves as a (byte-loop) call.
    // SAFETY: writes to fields of the live per-CPU value borrowed above.
    unsafe {
        ptr::write_volatile(&raw mut agg.packets, 0);
        ptr::write_volatile(&raw mut agg.bytes, 0);
        ptr::write_volatile(&raw mut agg.first_ns, 0);
        ptr::write_volatile(&raw mut agg.last_reason, 0);
    }
}

/// Reports the first packet of a registered flow once: `value.pad` is the
/// flow's "seen" bit, set by a CAS over the whole value (tenant, 0) →
/// (tenant, 1), so only one CPU reports the flow. If the ring is full the
/// bit is cleared again and a later packet retries.
///
/// # Safety
/// `value` must point to a live `BH_FLOWS` value (hash values are 8-byte aligned).
#[inline(always)]
pub unsafe fn flow_seen(
    value: *mut FlowValue,
    tenant: u32,
    packet: &Packet<'_>,
    settings: &Settings,
) {
    // SAFETY: per the caller's contract.
    if unsafe { (*value).pad } != 0 {
        return;
    }
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "BPF hash map values are 8-byte aligned (the verifier also checks atomics' alignment)"
    )]
    let word = value.cast::<u64>();
    let unseen = u64::from(tenant);
    let seen = unseen | (1 << 32);
    // SAFETY: `FlowValue` is `{ tenant: u32, pad: u32 }`, 8 bytes at an
    // 8-byte-aligned map value: one little-endian u64 with `pad` on top.
    let (_, swapped) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word, unseen, seen,
        )
    };
    if !swapped {
        return;
    }
    let Some(mut entry) = BH_EVENTS.reserve::<AuditEvent>(0) else {
        // SAFETY: as above; undo only our own mark.
        let _ = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                word, seen, unseen,
            )
        };
        return;
    };
    entry.write(AuditEvent {
        kind: EVENT_FLOW_SEEN,
        reason: 0,
        tenant,
        cpu: cpu(),
        time_ns: packet.now,
        packets: 1,
        bytes: u64::from(packet.len),
        flow: *packet.flow,
        pad: [0, 0, 0, 0],
    });
    submit(entry, settings);
}

/// The CPU running the program.
#[inline(always)]
fn cpu() -> u32 {
    // SAFETY: a helper without arguments or preconditions.
    unsafe { bpf_get_smp_processor_id() }
}

/// Submits a filled event, waking the reader only once the ring holds
/// `wakeup_bytes` (batched wakeups; the reader also polls on a timer).
#[inline(always)]
fn submit(entry: RingBufEntry<AuditEvent>, settings: &Settings) {
    let pending = BH_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let wakeup = if pending >= settings.wakeup_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(wakeup));
}
