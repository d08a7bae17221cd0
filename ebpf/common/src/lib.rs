//! Types and map names shared by bulkhead's eBPF programs and its userspace loader.
//!
//! Every type here is `#[repr(C)]`, has explicit padding (if any), no `bool`,
//! and a compile-time size assertion, so the kernel and userspace views of a
//! map value cannot drift apart. With feature `user` the types implement
//! [`aya::Pod`] so the loader can read and write them in maps.

#![no_std]

/// Name of the per-CPU array of [`PacketCounters`] the ingress program updates.
///
/// BPF object names hold at most 15 bytes; each name here is checked below.
pub const INGRESS_COUNTERS_MAP: &str = "BH_INGRESS_CNT";

/// Name of the map from a tenant's index to its [`TenantTag`].
pub const TENANT_TAGS_MAP: &str = "BH_TENANT_TAGS";

/// Slot of [`INGRESS_COUNTERS_MAP`] counting every packet the program sees.
pub const COUNTER_SLOT_ALL: u32 = 0;

/// Number of slots of [`INGRESS_COUNTERS_MAP`].
pub const COUNTER_SLOTS: u32 = 1;

/// Longest BPF object (map or program) name the kernel accepts, in bytes.
pub const BPF_OBJ_NAME_MAX: usize = 15;

const _: () = assert!(INGRESS_COUNTERS_MAP.len() <= BPF_OBJ_NAME_MAX);
const _: () = assert!(TENANT_TAGS_MAP.len() <= BPF_OBJ_NAME_MAX);

/// What the kernel stamps on a tenant's packets: its numeric index and the `skb->mark` to set.
///
/// The proxy assigns tenant indexes (dense, from 0) when it loads the config;
/// the mark lets the host's traffic control and the proxy's sockets
/// (`SO_RCVMARK`) see which tenant a packet belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TenantTag {
    /// The tenant's index, as assigned by the proxy.
    pub tenant_index: u32,
    /// The value written to `skb->mark` for this tenant's packets.
    pub mark: u32,
}

const _: () = assert!(size_of::<TenantTag>() == 8);
const _: () = assert!(align_of::<TenantTag>() == 4);

/// Packet and byte counts of one counter slot (per CPU in a per-CPU map; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PacketCounters {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen (the skb's length, headers included).
    pub bytes: u64,
}

impl PacketCounters {
    /// Adds `other`'s counts, wrapping (counters are compared as deltas).
    #[must_use]
    pub const fn wrapping_add(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

const _: () = assert!(size_of::<PacketCounters>() == 16);
const _: () = assert!(align_of::<PacketCounters>() == 8);

#[cfg(feature = "user")]
mod pod {
    #![expect(
        unsafe_code,
        reason = "aya::Pod is an unsafe marker trait: the loader copies these types to and from map bytes"
    )]

    use super::{PacketCounters, TenantTag};

    // SAFETY: `TenantTag` is `#[repr(C)]`, `Copy`, made of two `u32`s with no
    // padding (size 8 asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for TenantTag {}

    // SAFETY: `PacketCounters` is `#[repr(C)]`, `Copy`, made of two `u64`s with
    // no padding (size 16 asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for PacketCounters {}
}
