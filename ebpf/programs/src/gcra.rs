//! GCRA token buckets shared by all CPUs, advanced with compare-and-swap.
//!
//! A limit's state is its theoretical arrival time (TAT). A packet of cost
//! `c` at `now` conforms if `new_tat - now <= tolerance`, where
//! `new_tat = max(tat, now) + ((c × interval_q16) >> 16)`; if it passes,
//! the TAT moves to `new_tat` by a CAS that fails if another CPU moved it
//! first, in which case the decision is taken again on the TAT that CPU
//! wrote. An `interval_q16` of zero is "unlimited": nothing is checked or
//! written.
//!
//! # Two limits, one verdict
//!
//! A tenant's packet must conform to both its packet and its byte limit,
//! and a packet dropped by one limit must not consume the other's budget.
//! [`admit_tenant`] therefore checks both limits on one snapshot of the two
//! TATs, then commits the packet TAT and then the byte TAT. If the byte CAS
//! loses a race, the packet commit is undone by a CAS back to the old TAT
//! and the whole decision is retried.
//!
//! The race accepted: if another CPU advanced the packet TAT past ours
//! between our commit and our undo, the undo fails and this attempt's one
//! packet interval stays charged although the packet may end up dropped.
//! That only ever over-charges (by one packet interval per lost race, on a
//! tenant already busy on several CPUs); no interleaving lets a packet pass
//! that does not conform to both limits, since each TAT only moves by a CAS
//! from the value its check read.
//!
//! # Retries
//!
//! A CAS fails only when another CPU committed in between, so a loop is
//! bounded at [`CAS_RETRIES`] attempts; a packet that loses every attempt is
//! dropped (fail closed: the bucket is saturated with concurrent traffic),
//! with the reason of the limit whose CAS it lost last.

#![expect(
    unsafe_code,
    reason = "bucket states are map memory shared by CPUs, swapped through raw pointers"
)]

use core::intrinsics::{AtomicOrdering, atomic_cxchg};
use core::ptr;

use aya_ebpf::bindings::BPF_NOEXIST;
use bulkhead_ebpf_common::{
    BucketState, DROP_BYTE_LIMIT, DROP_PACKET_LIMIT, GcraLimit, Q16, SourceKey, TenantLimits,
};

use crate::maps::BH_UNKNOWN;

/// Attempts of one decision before a contended packet is dropped.
pub const CAS_RETRIES: usize = 4;

/// `(cost × interval_q16) >> 16` nanoseconds, exact, saturating at `u64::MAX`.
///
/// The product can exceed 64 bits (a 64 KiB packet against a slow byte
/// limit), and the BPF target has no 128-bit multiply, so it is taken in
/// 32-bit halves of the interval: `cost × high` and `cost × low` each fit in
/// 64 bits.
#[inline(always)]
pub fn increment(cost: u32, interval_q16: u64) -> u64 {
    let cost = u64::from(cost);
    let high = (interval_q16 >> 32) * cost;
    if high >= 1 << (64 - Q16) {
        return u64::MAX;
    }
    let low = ((interval_q16 & 0xffff_ffff) * cost) >> Q16;
    (high << (32 - Q16)).saturating_add(low)
}

/// The TAT after a packet of `cost` at `now`, if the packet conforms to `limit`.
#[inline(always)]
pub fn conforming(tat: u64, now: u64, cost: u32, limit: &GcraLimit) -> Option<u64> {
    let new_tat = tat
        .max(now)
        .saturating_add(increment(cost, limit.interval_q16));
    // `new_tat >= now`: the subtraction cannot wrap.
    (new_tat.wrapping_sub(now) <= limit.tolerance_ns).then_some(new_tat)
}

/// Reads a TAT that other CPUs may be swapping.
///
/// # Safety
/// `tat` must point to a live, 8-byte-aligned `u64` in a map value.
#[inline(always)]
unsafe fn load(tat: *mut u64) -> u64 {
    // SAFETY: per the caller's contract. A volatile aligned 8-byte load is one
    // BPF `ldxdw`, which cannot tear; the BPF backend has no instruction for
    // an atomic (relaxed) load on the `generic` CPU bpf-linker targets.
    unsafe { ptr::read_volatile(tat) }
}

/// Replaces `*tat` by `new` if it still holds `old`; otherwise returns what it holds.
///
/// # Safety
/// As [`load`].
#[inline(always)]
unsafe fn cas(tat: *mut u64, old: u64, new: u64) -> Result<(), u64> {
    // SAFETY: per the caller's contract. BPF's cmpxchg is fully ordered whatever we ask.
    let (seen, swapped) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(tat, old, new)
    };
    if swapped { Ok(()) } else { Err(seen) }
}

/// Decides a tenant's packet of `len` bytes at `now` against both its limits,
/// committing both on a pass; `Err` carries the `DROP_*` reason.
///
/// See the module's documentation for the commit order and the race it accepts.
///
/// # Safety
/// `state` must point to the tenant's live `BH_STATE` value.
#[inline(always)]
pub unsafe fn admit_tenant(
    state: *mut BucketState,
    limits: &TenantLimits,
    now: u64,
    len: u32,
) -> Result<(), u32> {
    let packets_on = limits.packets.interval_q16 != 0;
    let bytes_on = limits.bytes.interval_q16 != 0;
    if !packets_on && !bytes_on {
        return Ok(());
    }
    // SAFETY: field pointers of a live map value (the caller's contract);
    // `BucketState` is two `u64`s, so both are 8-byte aligned.
    let (packet_tat, byte_tat) = unsafe {
        (
            ptr::addr_of_mut!((*state).packet_tat),
            ptr::addr_of_mut!((*state).byte_tat),
        )
    };
    // SAFETY: as above.
    let (mut p, mut b) = unsafe { (load(packet_tat), load(byte_tat)) };
    let mut contended = DROP_PACKET_LIMIT;
    for _ in 0..CAS_RETRIES {
        let new_p = if packets_on {
            conforming(p, now, 1, &limits.packets).ok_or(DROP_PACKET_LIMIT)?
        } else {
            p
        };
        let new_b = if bytes_on {
            conforming(b, now, len, &limits.bytes).ok_or(DROP_BYTE_LIMIT)?
        } else {
            b
        };
        if packets_on {
            // SAFETY: as above.
            if let Err(seen) = unsafe { cas(packet_tat, p, new_p) } {
                contended = DROP_PACKET_LIMIT;
                p = seen;
                // SAFETY: as above.
                b = unsafe { load(byte_tat) };
                continue;
            }
        }
        if bytes_on {
            // SAFETY: as above.
            if let Err(seen) = unsafe { cas(byte_tat, b, new_b) } {
                contended = DROP_BYTE_LIMIT;
                if packets_on {
                    // Undo the packet commit; if another CPU already built on
                    // it, the charge stays (the accepted over-charge).
                    // SAFETY: as above.
                    let _undone = unsafe { cas(packet_tat, new_p, p) };
                }
                b = seen;
                // SAFETY: as above.
                p = unsafe { load(packet_tat) };
                continue;
            }
        }
        return Ok(());
    }
    Err(contended)
}

/// Decides one packet of cost `cost` against the limit whose TAT is at `tat`, committing it on a pass.
///
/// # Safety
/// As [`load`].
#[inline(always)]
unsafe fn admit_one(tat: *mut u64, now: u64, cost: u32, limit: &GcraLimit) -> bool {
    // SAFETY: per the caller's contract.
    let mut current = unsafe { load(tat) };
    for _ in 0..CAS_RETRIES {
        let Some(new) = conforming(current, now, cost, limit) else {
            return false;
        };
        // SAFETY: per the caller's contract.
        match unsafe { cas(tat, current, new) } {
            Ok(()) => return true,
            Err(seen) => current = seen,
        }
    }
    false
}

/// Decides a packet of an unregistered source against that source address's
/// budget `limit` (in `BH_UNKNOWN`), committing it on a pass.
///
/// A source seen for the first time gets a state already charged with this
/// packet, inserted with `BPF_NOEXIST`; if another CPU inserted one first,
/// the packet is decided on that one by CAS. A state that cannot be found
/// even then (an insert refused for a reason other than "exists") drops the
/// packet: the budget fails closed.
#[inline(always)]
pub fn admit_source(key: &SourceKey, limit: &GcraLimit, now: u64) -> bool {
    if limit.interval_q16 == 0 {
        return true;
    }
    let state = if let Some(state) = BH_UNKNOWN.get_ptr_mut(key) {
        state
    } else {
        let Some(tat) = conforming(0, now, 1, limit) else {
            return false;
        };
        let fresh = BucketState {
            packet_tat: tat,
            byte_tat: 0,
        };
        if BH_UNKNOWN
            .insert(key, fresh, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return true;
        }
        let Some(state) = BH_UNKNOWN.get_ptr_mut(key) else {
            return false;
        };
        state
    };
    // SAFETY: `state` is a live `BH_UNKNOWN` value (an LRU hash value stays
    // valid memory for the program's run even if evicted meanwhile), and its
    // first field is an 8-byte-aligned `u64`.
    unsafe { admit_one(ptr::addr_of_mut!((*state).packet_tat), now, 1, limit) }
}
