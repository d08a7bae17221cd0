//! The maps of the contract (`bulkhead_ebpf_common`), with exactly its names, types and sizes.
//!
//! aya's `#[map]` names each map after its static, so every static here is
//! spelled as the contract's `*_MAP` constant; [`names_match`] checks that at
//! compile time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use bulkhead_ebpf_common::{
    BucketState, DropAggregate, EVENTS_RING_BYTES, FlowKey, FlowValue, MAX_FLOWS, MAX_TENANTS,
    MAX_UNKNOWN_SOURCES, Settings, SourceKey, TenantCounters, TenantLimits,
};

/// Flow → tenant registrations, written by the proxy after mTLS (`FLOWS_MAP`).
#[map]
pub static BH_FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(MAX_FLOWS, 0);

/// Per-tenant limits and tags, written by the proxy (`TENANT_LIMITS_MAP`).
#[map]
pub static BH_LIMITS: Array<TenantLimits> = Array::with_max_entries(MAX_TENANTS, 0);

/// Per-tenant GCRA state shared by all CPUs, advanced by compare-and-swap (`TENANT_STATE_MAP`).
#[map]
pub static BH_STATE: Array<BucketState> = Array::with_max_entries(MAX_TENANTS, 0);

/// GCRA state of each unregistered source address; only `packet_tat` is used (`UNKNOWN_STATE_MAP`).
#[map]
pub static BH_UNKNOWN: LruHashMap<SourceKey, BucketState> =
    LruHashMap::with_max_entries(MAX_UNKNOWN_SOURCES, 0);

/// Per-tenant per-CPU counters (`COUNTERS_MAP`).
#[map]
pub static BH_COUNTERS: PerCpuArray<TenantCounters> = PerCpuArray::with_max_entries(MAX_TENANTS, 0);

/// Per-tenant per-CPU drops not yet carried by an event (`DROP_AGG_MAP`).
#[map]
pub static BH_DROP_AGG: PerCpuArray<DropAggregate> = PerCpuArray::with_max_entries(MAX_TENANTS, 0);

/// Global settings, slot 0 (`SETTINGS_MAP`).
#[map]
pub static BH_SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// The event ring (`EVENTS_MAP`).
#[map]
pub static BH_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Compile-time check that the statics above carry the contract's names.
const fn names_match() -> bool {
    use bulkhead_ebpf_common::{
        COUNTERS_MAP, DROP_AGG_MAP, EVENTS_MAP, FLOWS_MAP, SETTINGS_MAP, TENANT_LIMITS_MAP,
        TENANT_STATE_MAP, UNKNOWN_STATE_MAP,
    };
    const fn eq(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
    eq(FLOWS_MAP, "BH_FLOWS")
        && eq(TENANT_LIMITS_MAP, "BH_LIMITS")
        && eq(TENANT_STATE_MAP, "BH_STATE")
        && eq(UNKNOWN_STATE_MAP, "BH_UNKNOWN")
        && eq(COUNTERS_MAP, "BH_COUNTERS")
        && eq(DROP_AGG_MAP, "BH_DROP_AGG")
        && eq(SETTINGS_MAP, "BH_SETTINGS")
        && eq(EVENTS_MAP, "BH_EVENTS")
}

const _: () = assert!(
    names_match(),
    "a map static's name differs from the contract"
);

/// The global settings (all zero if the slot cannot be read, which an array never does).
#[inline(always)]
pub fn settings() -> Settings {
    BH_SETTINGS.get(0).copied().unwrap_or_default()
}
