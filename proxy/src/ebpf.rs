//! The eBPF control plane: loads bulkhead's kernel programs, attaches them to
//! the proxy's cgroup, and drives their maps.
//!
//! The programs (`ebpf/programs`) enforce per-tenant packet and byte budgets
//! on the proxy's sockets before userspace sees a packet, tag each tenant's
//! packets with `mark = priority = tenant index + 1`, and report drops as
//! batched audit events. The maps and their meaning are the contract in
//! [`bulkhead_ebpf_common`]; this module is thin I/O over aya around it:
//!
//! - [`KernelPlane::start`] / [`KernelPlane::load`]: load, attach and pin
//!   under `<bpffs>/bulkhead/<instance>/` (or reuse the pins of an earlier
//!   load, so enforcement has no gap across a restart), then write the limits.
//! - [`KernelPlane::apply_config`]: the config's limits into `BH_LIMITS` and `BH_SETTINGS`.
//! - [`KernelPlane::register_flow`], [`KernelPlane::move_flow`],
//!   [`KernelPlane::remove_flow`]: which tenant a remote address belongs to.
//! - [`KernelPlane::counters`], [`KernelPlane::pending_drops`], [`EventStream`]: what happened.
//! - [`KernelPlane::unload`]: detach and unpin.
//!
//! The pure parts (config → map values, addresses → keys, event records →
//! [`AuditEvent`](bulkhead_ebpf_common::AuditEvent)) are plain functions:
//! [`tenant_limits`], [`settings`], [`flow_key`], [`parse_event`].

mod error;
mod event;
mod flow;
mod limits;
mod pins;
mod plane;
mod registry;

pub use self::{
    error::EbpfError,
    event::{DEFAULT_POLL_INTERVAL, DropTally, EVENT_BYTES, EventStream, parse_event},
    flow::{Protocol, flow_key},
    limits::{
        DROP_EVENT_EVERY, DROP_EVENT_MAX_DELAY_NS, WAKEUP_BYTES, check_tenant_index, settings,
        tenant_limits, tenant_mark, tenant_priority, tenant_table,
    },
    pins::{
        DEFAULT_BPFFS, DEFAULT_INSTANCE, LINK_EGRESS, LINK_INGRESS, MAP_NAMES, PIN_ROOT, PinLayout,
        caps_allow_bpf, check_bpffs, check_cgroup, check_privileges, parse_cap_eff,
    },
    plane::{
        ApplyReport, KernelPlane, LinkStatus, Origin, PlaneStatus, TenantStatus, UnloadReport,
        embedded_object,
    },
    registry::{KernelFlows, TenantSlots},
};
