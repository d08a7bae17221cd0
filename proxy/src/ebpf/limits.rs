//! Config → kernel map values: per-tenant [`TenantLimits`] and the global [`Settings`].
//!
//! A tenant's index is its position in `config.tenants`; its packets are
//! tagged with `mark = priority = index + 1`, so that mark 0 keeps meaning
//! "untagged" (no tenant) to anything reading `SO_RCVMARK` or routing on it.

use super::EbpfError;
use bulkhead_core::config::{Config, EbpfSettings, KernelLimits};
use bulkhead_ebpf_common::{
    GcraLimit, LIMITS_ACTIVE, SETTINGS_FLOW_EVENTS, Settings, TenantLimits, UNKNOWN_TENANT,
};

/// Nanoseconds per second: every config rate is per second.
const NANOS_PER_SECOND: u64 = 1_000_000_000;
/// A CPU emits a drop event once it holds this many unreported drops of a tenant …
pub const DROP_EVENT_EVERY: u64 = 64;
/// … or once its oldest unreported drop is this old (1 ms).
pub const DROP_EVENT_MAX_DELAY_NS: u64 = 1_000_000;
/// The kernel wakes the event reader once the ring holds this many bytes (64 KiB).
pub const WAKEUP_BYTES: u64 = 64 * 1024;

/// The `skb->mark` written on a tenant's packets: `index + 1` (0 means untagged).
pub const fn tenant_mark(index: u32) -> u32 {
    index + 1
}

/// The `skb->priority` written on a tenant's packets: `index + 1`.
pub const fn tenant_priority(index: u32) -> u32 {
    index + 1
}

/// Checks that `index` names a tenant slot (below `UNKNOWN_TENANT`).
pub fn check_tenant_index(index: u32) -> Result<(), EbpfError> {
    if index < UNKNOWN_TENANT {
        Ok(())
    } else {
        Err(EbpfError::TenantIndex {
            index,
            max: UNKNOWN_TENANT,
        })
    }
}

/// A rate of `per_second` units with `burst` at once as a GCRA limit.
fn per_second(
    tenant: &str,
    field: &'static str,
    per_second: u64,
    burst: u64,
) -> Result<GcraLimit, EbpfError> {
    let problem = |problem: String| EbpfError::Limit {
        tenant: tenant.to_owned(),
        field,
        problem,
    };
    if per_second == 0 || burst == 0 {
        return Err(problem(format!(
            "a limit of zero would drop everything (rate {per_second}/s, burst {burst})"
        )));
    }
    GcraLimit::new(per_second, NANOS_PER_SECOND, burst).ok_or_else(|| {
        problem(format!(
            "rate {per_second}/s with burst {burst} cannot be represented (at most 2^16 units \
             per nanosecond, burst × interval below 2^64 ns)"
        ))
    })
}

/// The map value of tenant `index` (named `tenant` in errors) with `limits`.
pub fn tenant_limits(
    tenant: &str,
    index: u32,
    limits: &KernelLimits,
) -> Result<TenantLimits, EbpfError> {
    check_tenant_index(index)?;
    Ok(TenantLimits {
        packets: per_second(
            tenant,
            "packets_per_second",
            limits.packets_per_second,
            limits.packet_burst,
        )?,
        bytes: per_second(
            tenant,
            "bytes_per_second",
            limits.bytes_per_second,
            limits.byte_burst,
        )?,
        mark: tenant_mark(index),
        priority: tenant_priority(index),
        flags: LIMITS_ACTIVE,
        pad: 0,
    })
}

/// Every tenant's map value, by index (position in `config.tenants`).
pub fn tenant_table(config: &Config) -> Result<Vec<TenantLimits>, EbpfError> {
    let too_many = || EbpfError::TooManyTenants {
        count: config.tenants.len(),
        max: UNKNOWN_TENANT,
    };
    if config.tenants.len() >= usize::try_from(UNKNOWN_TENANT).map_err(|_| too_many())? {
        return Err(too_many());
    }
    config
        .tenants
        .iter()
        .enumerate()
        .map(|(index, tenant)| {
            let index = u32::try_from(index).map_err(|_| too_many())?;
            tenant_limits(tenant.id.as_str(), index, &tenant.kernel)
        })
        .collect()
}

/// The global settings from `[ebpf]`.
pub fn settings(ebpf: &EbpfSettings) -> Result<Settings, EbpfError> {
    Ok(Settings {
        unknown_packets: per_second(
            "[ebpf]",
            "unknown_source_packets_per_second",
            ebpf.unknown_source_packets_per_second,
            ebpf.unknown_source_packet_burst,
        )?,
        drop_event_every: DROP_EVENT_EVERY,
        drop_event_max_delay_ns: DROP_EVENT_MAX_DELAY_NS,
        wakeup_bytes: WAKEUP_BYTES,
        flags: SETTINGS_FLOW_EVENTS,
        pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_ebpf_common::Q16;

    fn limits(pps: u64, pburst: u64, bps: u64, bburst: u64) -> KernelLimits {
        KernelLimits {
            packets_per_second: pps,
            packet_burst: pburst,
            bytes_per_second: bps,
            byte_burst: bburst,
        }
    }

    #[test]
    fn default_limits_convert_exactly() {
        let l = tenant_limits("a", 0, &limits(10_000, 1000, 12_500_000, 1 << 20)).unwrap();
        // 100 µs per packet, 80 ns per byte, in 16.16 fixed point.
        assert_eq!(l.packets.interval_q16, 100_000 << Q16);
        assert_eq!(l.packets.tolerance_ns, 100_000_000);
        assert_eq!(l.bytes.interval_q16, 80 << Q16);
        assert_eq!(l.bytes.tolerance_ns, 80 * (1 << 20));
        assert_eq!((l.mark, l.priority, l.flags), (1, 1, LIMITS_ACTIVE));
    }

    #[test]
    fn high_byte_rates_keep_sub_nanosecond_intervals() {
        // 100 GB/s: 0.01 ns per byte, which only the fixed point can hold.
        let l = tenant_limits("a", 7, &limits(1, 1, 100_000_000_000, 1 << 20)).unwrap();
        assert_eq!(
            l.bytes.interval_q16,
            (1_000_000_000u64 << Q16) / 100_000_000_000
        );
        assert_eq!(l.bytes.interval_q16, 655);
        assert_eq!((l.mark, l.priority), (8, 8));
        // 1 TB/s still fits (0.001 ns = 65/2^16 ns) …
        assert!(tenant_limits("a", 0, &limits(1, 1, 1_000_000_000_000, 1 << 20)).is_ok());
        // … above 2^16 bytes per nanosecond it cannot.
        let err = tenant_limits("a", 0, &limits(1, 1, u64::MAX, 1 << 20)).unwrap_err();
        assert!(err.to_string().contains("bytes_per_second"), "{err}");
    }

    #[test]
    fn zero_limits_are_refused() {
        for l in [
            limits(0, 1, 1, 1),
            limits(1, 0, 1, 1),
            limits(1, 1, 0, 1),
            limits(1, 1, 1, 0),
        ] {
            let err = tenant_limits("acme", 0, &l).unwrap_err();
            assert!(
                matches!(err, EbpfError::Limit { ref tenant, .. } if tenant == "acme"),
                "{err}"
            );
            assert!(err.to_string().contains("zero"), "{err}");
        }
    }

    #[test]
    fn tenant_index_must_be_below_the_unknown_slot() {
        let l = limits(1, 1, 1, 1);
        assert!(tenant_limits("a", UNKNOWN_TENANT - 1, &l).is_ok());
        assert!(matches!(
            tenant_limits("a", UNKNOWN_TENANT, &l),
            Err(EbpfError::TenantIndex {
                index: UNKNOWN_TENANT,
                ..
            })
        ));
    }

    #[test]
    fn settings_take_the_unknown_budget() {
        let s = settings(&EbpfSettings {
            mode: bulkhead_core::config::EbpfMode::Auto,
            unknown_source_packets_per_second: 2000,
            unknown_source_packet_burst: 500,
        })
        .unwrap();
        assert_eq!(s.unknown_packets.interval_q16, 500_000 << Q16);
        assert_eq!(s.unknown_packets.tolerance_ns, 250_000_000);
        assert_eq!(s.drop_event_every, 64);
        assert_eq!(s.drop_event_max_delay_ns, 1_000_000);
        assert_eq!(s.wakeup_bytes, 65_536);
        assert_eq!(s.flags, SETTINGS_FLOW_EVENTS);
    }
}
