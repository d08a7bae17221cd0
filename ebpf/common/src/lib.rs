//! Types and map names shared by bulkhead's eBPF programs and its userspace loader.
//!
//! Every type here is `#[repr(C)]`, has explicit padding, no `bool`, and a
//! compile-time size assertion, so the kernel and userspace views of a map
//! value cannot drift apart. With feature `user` the types implement
//! `aya::Pod` so the loader can read and write them in maps.
//!
//! # The maps
//!
//! | name | kind | key → value | written by |
//! |---|---|---|---|
//! | [`FLOWS_MAP`] | hash | [`FlowKey`] → [`FlowValue`] | proxy (after mTLS) |
//! | [`TENANT_LIMITS_MAP`] | array | tenant index → [`TenantLimits`] | proxy (from config) |
//! | [`TENANT_STATE_MAP`] | array | tenant index → [`BucketState`] | programs (CAS) |
//! | [`UNKNOWN_STATE_MAP`] | LRU hash | [`SourceKey`] → [`BucketState`] | programs (CAS) |
//! | [`COUNTERS_MAP`] | per-CPU array | tenant index → [`TenantCounters`] | programs |
//! | [`DROP_AGG_MAP`] | per-CPU array | tenant index → [`DropAggregate`] | programs |
//! | [`SETTINGS_MAP`] | array, 1 slot | 0 → [`Settings`] | proxy |
//! | [`EVENTS_MAP`] | ring buffer | [`AuditEvent`]s | programs |
//!
//! Tenant indexes are dense, `0..MAX_TENANTS`, assigned by the proxy; index
//! [`UNKNOWN_TENANT`] holds the counters of sources that map to no tenant.
//!
//! # Token buckets
//!
//! Every limit is a GCRA kept as a theoretical arrival time (TAT, in
//! nanoseconds of `bpf_ktime_get_ns`) shared by all CPUs and advanced with
//! compare-and-swap. A packet of cost `c` (1 for the packet limit, its
//! length for the byte limit) passes if
//! `max(tat, now) + c × interval ≤ now + tolerance`, where `interval` is
//! nanoseconds per unit in 16.16 fixed
//! point ([`Q16`]) so that byte rates above 1 GB/s stay exact enough, and
//! `tolerance = burst × interval`. No division happens in the kernel.

#![no_std]
// Padding fields are public so that values can be built with struct literals.

/// Longest BPF object (map or program) name the kernel accepts, in bytes.
pub const BPF_OBJ_NAME_MAX: usize = 15;

/// Flow → tenant registrations ([`FlowKey`] → [`FlowValue`]).
pub const FLOWS_MAP: &str = "BH_FLOWS";
/// Per-tenant limits and tags, by tenant index ([`TenantLimits`]).
pub const TENANT_LIMITS_MAP: &str = "BH_LIMITS";
/// Per-tenant bucket state shared by all CPUs ([`BucketState`]).
pub const TENANT_STATE_MAP: &str = "BH_STATE";
/// Per-source bucket state of unregistered sources ([`SourceKey`] → [`BucketState`]).
pub const UNKNOWN_STATE_MAP: &str = "BH_UNKNOWN";
/// Per-tenant per-CPU counters ([`TenantCounters`]).
pub const COUNTERS_MAP: &str = "BH_COUNTERS";
/// Per-tenant per-CPU drops not yet reported in an event ([`DropAggregate`]).
pub const DROP_AGG_MAP: &str = "BH_DROP_AGG";
/// Global settings, one slot ([`Settings`]).
pub const SETTINGS_MAP: &str = "BH_SETTINGS";
/// Ring buffer of [`AuditEvent`]s.
pub const EVENTS_MAP: &str = "BH_EVENTS";

/// Name of the `cgroup_skb/ingress` program.
pub const INGRESS_PROGRAM: &str = "bulkhead_ingress";
/// Name of the `cgroup_skb/egress` program.
pub const EGRESS_PROGRAM: &str = "bulkhead_egress";

/// Every map of the contract, by name (the loader pins them under these names).
pub const MAP_NAMES: [&str; 8] = [
    FLOWS_MAP,
    TENANT_LIMITS_MAP,
    TENANT_STATE_MAP,
    UNKNOWN_STATE_MAP,
    COUNTERS_MAP,
    DROP_AGG_MAP,
    SETTINGS_MAP,
    EVENTS_MAP,
];

// Map names must fit the kernel's object name (programs are found by their ELF symbol).
const _: () = {
    let mut i = 0;
    while i < MAP_NAMES.len() {
        assert!(MAP_NAMES[i].len() <= BPF_OBJ_NAME_MAX);
        i += 1;
    }
};

/// Slots of the per-tenant maps: tenant indexes `0..MAX_TENANTS - 1`, plus [`UNKNOWN_TENANT`].
pub const MAX_TENANTS: u32 = 4096;
/// The slot that counts traffic of sources registered to no tenant.
pub const UNKNOWN_TENANT: u32 = MAX_TENANTS - 1;
/// Most flows registered at once.
pub const MAX_FLOWS: u32 = 262_144;
/// Most unregistered source addresses tracked at once (least recently seen are evicted).
pub const MAX_UNKNOWN_SOURCES: u32 = 65_536;
/// Size of the event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// Fixed-point shift of intervals: an interval is nanoseconds per unit × 2^16.
pub const Q16: u32 = 16;

/// `FlowKey::family` of an IPv4 flow (address in the first 4 bytes, the rest zero).
pub const FAMILY_IPV4: u8 = 4;
/// `FlowKey::family` of an IPv6 flow.
pub const FAMILY_IPV6: u8 = 6;
/// `FlowKey::protocol` of TCP.
pub const PROTO_TCP: u8 = 6;
/// `FlowKey::protocol` of UDP.
pub const PROTO_UDP: u8 = 17;

/// The remote end of a flow, as the proxy's sockets see it: for ingress the
/// packet's source, for egress its destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// IPv4 (first 4 bytes, rest zero) or IPv6 address, network byte order.
    pub addr: [u8; 16],
    /// Remote port, host byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
}

const _: () = assert!(size_of::<FlowKey>() == 20);
const _: () = assert!(align_of::<FlowKey>() == 2);

/// The tenant a registered flow belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowValue {
    /// Tenant index (below [`UNKNOWN_TENANT`]).
    pub tenant: u32,
    /// The flow's "seen" bit: the proxy writes zero; with
    /// [`SETTINGS_FLOW_EVENTS`] the ingress program sets it to 1 (one CAS over
    /// the whole value) when it reports the flow's first packet as an
    /// [`EVENT_FLOW_SEEN`], so a value read back may hold 1. Writing the value
    /// again with zero re-arms the report.
    pub pad: u32,
}

const _: () = assert!(size_of::<FlowValue>() == 8);

/// The source address of an unregistered packet (the unknown budget is per address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// As in [`FlowKey::addr`].
    pub addr: [u8; 16],
    /// As in [`FlowKey::family`].
    pub family: u8,
    /// Explicit padding; zero.
    pub pad: [u8; 3],
}

const _: () = assert!(size_of::<SourceKey>() == 20);

/// One GCRA limit: `interval_q16` nanoseconds per unit × 2^16, and how far
/// ahead of now the TAT may run (`tolerance_ns = burst × interval`).
///
/// An `interval_q16` of zero means "unlimited" (the proxy writes it for a
/// tenant without that limit); a limit of zero units is refused by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GcraLimit {
    /// Nanoseconds per unit, in 16.16 fixed point.
    pub interval_q16: u64,
    /// Burst × interval, in nanoseconds.
    pub tolerance_ns: u64,
}

const _: () = assert!(size_of::<GcraLimit>() == 16);

/// A tenant's kernel limits and tags, written by the proxy from the config.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TenantLimits {
    /// Packets (cost 1 per packet).
    pub packets: GcraLimit,
    /// Bytes (cost = `skb->len`).
    pub bytes: GcraLimit,
    /// Written to `skb->mark` of every passing packet of the tenant.
    pub mark: u32,
    /// Written to `skb->priority` of every passing packet of the tenant.
    pub priority: u32,
    /// [`LIMITS_ACTIVE`] when the slot holds a configured tenant; zero otherwise.
    pub flags: u32,
    /// Explicit padding; zero.
    pub pad: u32,
}

/// `TenantLimits::flags`: the slot holds a configured tenant.
pub const LIMITS_ACTIVE: u32 = 1;

const _: () = assert!(size_of::<TenantLimits>() == 48);

/// Shared bucket state: the theoretical arrival times of the packet and byte limits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BucketState {
    /// Packet limit's TAT, nanoseconds.
    pub packet_tat: u64,
    /// Byte limit's TAT, nanoseconds.
    pub byte_tat: u64,
}

const _: () = assert!(size_of::<BucketState>() == 16);

/// Global settings, written by the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Settings {
    /// The packet budget of each unregistered source address.
    pub unknown_packets: GcraLimit,
    /// Emit a drop event once a CPU has this many unreported drops of a tenant …
    pub drop_event_every: u64,
    /// … or when its oldest unreported drop is this old (nanoseconds).
    pub drop_event_max_delay_ns: u64,
    /// Wake the reader once the ring holds at least this many bytes (batched wakeups).
    pub wakeup_bytes: u64,
    /// [`SETTINGS_FLOW_EVENTS`]: also report the first packet of each registered flow.
    pub flags: u32,
    /// Explicit padding; zero.
    pub pad: u32,
}

/// `Settings::flags`: emit an [`EVENT_FLOW_SEEN`] event for registered flows.
pub const SETTINGS_FLOW_EVENTS: u32 = 1;

const _: () = assert!(size_of::<Settings>() == 48);

/// Per-tenant counters of one CPU; userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TenantCounters {
    /// Ingress packets passed.
    pub ingress_passed_packets: u64,
    /// Ingress bytes passed.
    pub ingress_passed_bytes: u64,
    /// Ingress packets dropped (any reason).
    pub ingress_dropped_packets: u64,
    /// Ingress bytes dropped (any reason).
    pub ingress_dropped_bytes: u64,
    /// Egress packets (tagged, never dropped).
    pub egress_packets: u64,
    /// Egress bytes.
    pub egress_bytes: u64,
}

impl TenantCounters {
    /// Adds `other`'s counts, wrapping.
    #[must_use]
    pub const fn wrapping_add(self, other: Self) -> Self {
        Self {
            ingress_passed_packets: self
                .ingress_passed_packets
                .wrapping_add(other.ingress_passed_packets),
            ingress_passed_bytes: self
                .ingress_passed_bytes
                .wrapping_add(other.ingress_passed_bytes),
            ingress_dropped_packets: self
                .ingress_dropped_packets
                .wrapping_add(other.ingress_dropped_packets),
            ingress_dropped_bytes: self
                .ingress_dropped_bytes
                .wrapping_add(other.ingress_dropped_bytes),
            egress_packets: self.egress_packets.wrapping_add(other.egress_packets),
            egress_bytes: self.egress_bytes.wrapping_add(other.egress_bytes),
        }
    }
}

const _: () = assert!(size_of::<TenantCounters>() == 48);

/// Drops of one tenant on one CPU not yet carried by an event.
///
/// Userspace's drop count of a tenant is the sum of the counts in the events
/// it read plus these pending counts; it equals the dropped counters in
/// [`TenantCounters`] exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropAggregate {
    /// Packets dropped since the last event.
    pub packets: u64,
    /// Bytes dropped since the last event.
    pub bytes: u64,
    /// `bpf_ktime_get_ns` of the first drop since the last event.
    pub first_ns: u64,
    /// Reason of the most recent drop (`DROP_*`).
    pub last_reason: u32,
    /// Explicit padding; zero.
    pub pad: u32,
}

const _: () = assert!(size_of::<DropAggregate>() == 32);

/// [`AuditEvent::kind`]: packets dropped (aggregated; see [`DropAggregate`]).
pub const EVENT_DROPS: u32 = 1;
/// [`AuditEvent::kind`]: the first packet of a registered flow was seen.
pub const EVENT_FLOW_SEEN: u32 = 2;

/// Drop reason: the tenant's packet limit.
pub const DROP_PACKET_LIMIT: u32 = 1;
/// Drop reason: the tenant's byte limit.
pub const DROP_BYTE_LIMIT: u32 = 2;
/// Drop reason: the unknown-source budget of the packet's source address.
pub const DROP_UNKNOWN_SOURCE: u32 = 3;
/// Drop reason: the flow names a tenant slot that is not configured (fail closed).
pub const DROP_INACTIVE_TENANT: u32 = 4;

/// One record in the event ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AuditEvent {
    /// `EVENT_*`.
    pub kind: u32,
    /// `DROP_*` for drops (the latest reason of the batch); zero otherwise.
    pub reason: u32,
    /// Tenant index ([`UNKNOWN_TENANT`] for unregistered sources).
    pub tenant: u32,
    /// The CPU that emitted the event.
    pub cpu: u32,
    /// `bpf_ktime_get_ns` when the event was emitted.
    pub time_ns: u64,
    /// Packets this event accounts for (drops: the aggregated count; flow seen: 1).
    pub packets: u64,
    /// Bytes this event accounts for.
    pub bytes: u64,
    /// The flow of the latest packet in the event.
    pub flow: FlowKey,
    /// Explicit padding; zero.
    pub pad: [u8; 4],
}

const _: () = assert!(size_of::<AuditEvent>() == 64);

impl GcraLimit {
    /// The limit of `amount` units per `per_ns` nanoseconds with `burst` units
    /// at once, or `None` if it cannot be represented (zero amount or burst,
    /// an interval below 2^-16 ns, or an overflow).
    pub const fn new(amount: u64, per_ns: u64, burst: u64) -> Option<Self> {
        if amount == 0 || burst == 0 {
            return None;
        }
        let q = ((per_ns as u128) << Q16) / amount as u128;
        let tolerance = (q * burst as u128) >> Q16;
        if q == 0 || q > u64::MAX as u128 || tolerance > u64::MAX as u128 {
            return None;
        }
        #[expect(clippy::cast_possible_truncation, reason = "checked above")]
        Some(Self {
            interval_q16: q as u64,
            tolerance_ns: tolerance as u64,
        })
    }
}

#[cfg(feature = "user")]
mod pod {
    #![expect(
        unsafe_code,
        reason = "aya::Pod is an unsafe marker trait: the loader copies these types to and from map bytes"
    )]

    use super::{
        AuditEvent, BucketState, DropAggregate, FlowKey, FlowValue, Settings, SourceKey,
        TenantCounters, TenantLimits,
    };

    // SAFETY (for each impl below): the type is `#[repr(C)]`, `Copy`, made only
    // of integers and integer arrays with explicit padding fields (sizes
    // asserted above), so every bit pattern is a valid value and no byte is
    // uninitialised padding.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TenantLimits {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BucketState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TenantCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DropAggregate {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AuditEvent {}
}
