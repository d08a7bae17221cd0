//! The transports' [`FlowRegistry`] backed by the kernel's flow map, and
//! the assignment of tenants to the kernel's per-tenant slots.

use super::{ApplyReport, EbpfError, KernelPlane, Protocol, limits};
use crate::transport::{FlowRegistry, FlowTransport};
use bulkhead_core::{TenantId, config::Config};
use bulkhead_ebpf_common::{TenantLimits, UNKNOWN_TENANT};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError, RwLock},
};

/// Which kernel slot (index of the per-tenant maps) each tenant has.
///
/// At start, tenant `i` of the config is slot `i`. A reload keeps every
/// remaining tenant in its slot and gives new tenants slots never used
/// before in this process, so a flow registered under a slot can never
/// come to count for another tenant; a removed tenant's slot goes inactive
/// (its packets are dropped) and stays unused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantSlots {
    by_tenant: HashMap<TenantId, u32>,
    /// The next slot never given out.
    next: u32,
}

impl TenantSlots {
    /// Slots in config order.
    pub fn from_config(config: &Config) -> Result<Self, EbpfError> {
        Self::default().reassigned(config)
    }

    /// The slots after a reload to `config`.
    pub fn reassigned(&self, config: &Config) -> Result<Self, EbpfError> {
        let mut next = Self {
            by_tenant: HashMap::new(),
            next: self.next,
        };
        for tenant in &config.tenants {
            let slot = if let Some(&slot) = self.by_tenant.get(&tenant.id) {
                slot
            } else {
                if next.next >= UNKNOWN_TENANT {
                    return Err(EbpfError::TooManyTenants {
                        count: usize::try_from(next.next).unwrap_or(usize::MAX) + 1,
                        max: UNKNOWN_TENANT,
                    });
                }
                next.next += 1;
                next.next - 1
            };
            next.by_tenant.insert(tenant.id.clone(), slot);
        }
        Ok(next)
    }

    /// `previous` (the slots before a reload that was then refused) put
    /// back after these (the refused reload's): every tenant of `previous`
    /// in its own slot again, so flows registered under it still count, and
    /// slots the refused reload gave out stay inactive and never given out
    /// again.
    #[must_use]
    pub fn restored(&self, previous: &Self) -> Self {
        Self {
            by_tenant: previous.by_tenant.clone(),
            next: previous.next.max(self.next),
        }
    }

    /// The slot of `tenant`.
    pub fn slot(&self, tenant: &TenantId) -> Option<u32> {
        self.by_tenant.get(tenant).copied()
    }

    /// The tenant in `slot`.
    pub fn tenant_of(&self, slot: u32) -> Option<&TenantId> {
        self.by_tenant
            .iter()
            .find_map(|(t, &s)| (s == slot).then_some(t))
    }

    /// The limits map's values for `config` (whose tenants these slots
    /// assign), slot by slot: a slot with no tenant is inactive.
    pub fn table(&self, config: &Config) -> Result<Vec<TenantLimits>, EbpfError> {
        let len = usize::try_from(self.next).unwrap_or(usize::MAX);
        let mut table = vec![TenantLimits::default(); len];
        for tenant in &config.tenants {
            let slot = self.slot(&tenant.id).ok_or_else(|| EbpfError::Limit {
                tenant: tenant.id.to_string(),
                field: "slot",
                problem: "the tenant has no kernel slot (slots are assigned from another config)"
                    .to_owned(),
            })?;
            table[usize::try_from(slot).unwrap_or(usize::MAX)] =
                limits::tenant_limits(tenant.id.as_str(), slot, &tenant.kernel)?;
        }
        Ok(table)
    }
}

/// Registers connections in a loaded [`KernelPlane`]'s flow map, by the
/// tenant's kernel slot ([`TenantSlots`]).
///
/// A failed map write is logged, not fatal: the connection's packets then
/// fall under the unknown-source budget, which is the safe side.
#[derive(Debug)]
pub struct KernelFlows {
    plane: Arc<Mutex<KernelPlane>>,
    slots: RwLock<TenantSlots>,
}

impl KernelFlows {
    /// Flows of `config`'s tenants in `plane`, whose limits were written in
    /// config order (as [`KernelPlane::start`] does).
    pub fn new(plane: Arc<Mutex<KernelPlane>>, config: &Config) -> Result<Self, EbpfError> {
        Ok(Self {
            plane,
            slots: RwLock::new(TenantSlots::from_config(config)?),
        })
    }

    /// The tenant in kernel slot `slot`.
    pub fn tenant_of(&self, slot: u32) -> Option<TenantId> {
        self.read_slots().tenant_of(slot).cloned()
    }

    /// Writes a reloaded `config`'s limits and settings into the kernel:
    /// remaining tenants keep their slots, new ones get fresh slots, removed
    /// ones' slots go inactive. On failure the slots stay as they were.
    pub fn apply_config(&self, config: &Config) -> Result<ApplyReport, EbpfError> {
        let next = self.read_slots().reassigned(config)?;
        self.write(next, config)
    }

    /// The slots in force.
    pub fn slots(&self) -> TenantSlots {
        self.read_slots().clone()
    }

    /// Undoes [`Self::apply_config`] after the rest of a reload was refused:
    /// `previous` (what [`Self::slots`] gave before it) and `config`'s
    /// limits are written back, each tenant in its old slot (see
    /// [`TenantSlots::restored`]).
    pub fn restore(
        &self,
        previous: &TenantSlots,
        config: &Config,
    ) -> Result<ApplyReport, EbpfError> {
        let back = self.read_slots().restored(previous);
        self.write(back, config)
    }

    /// Writes `config`'s limits and settings into the kernel by `slots`,
    /// then puts `slots` in force; on failure the slots stay as they were.
    fn write(&self, slots: TenantSlots, config: &Config) -> Result<ApplyReport, EbpfError> {
        let table = slots.table(config)?;
        let settings = limits::settings(&config.ebpf)?;
        let report = self.with_plane(|p| p.apply_table(&table, settings))?;
        *self.slots.write().unwrap_or_else(PoisonError::into_inner) = slots;
        Ok(report)
    }

    fn read_slots(&self) -> std::sync::RwLockReadGuard<'_, TenantSlots> {
        self.slots.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_plane<T>(&self, f: impl FnOnce(&mut KernelPlane) -> T) -> T {
        f(&mut self.plane.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

const fn protocol(t: FlowTransport) -> Protocol {
    match t {
        FlowTransport::Tcp => Protocol::Tcp,
        FlowTransport::Udp => Protocol::Udp,
    }
}

impl FlowRegistry for KernelFlows {
    fn register(&self, tenant: &TenantId, remote: SocketAddr, transport: FlowTransport) {
        let Some(index) = self.read_slots().slot(tenant) else {
            tracing::warn!(%tenant, %remote, "no kernel slot for this tenant; flow not registered");
            return;
        };
        if let Err(err) = self.with_plane(|p| p.register_flow(remote, protocol(transport), index)) {
            tracing::warn!(%tenant, %remote, "registering the flow in the kernel failed: {}", err.chain());
        }
    }

    fn migrate(&self, tenant: &TenantId, old: SocketAddr, new: SocketAddr) {
        match self.with_plane(|p| p.move_flow(old, new, Protocol::Udp)) {
            Ok(true) => tracing::debug!(%tenant, %old, %new, "flow followed the connection"),
            Ok(false) => self.register(tenant, new, FlowTransport::Udp),
            Err(err) => {
                tracing::warn!(%tenant, %old, %new, "moving the flow failed: {}", err.chain());
            }
        }
    }

    fn unregister(&self, remote: SocketAddr, transport: FlowTransport) {
        if let Err(err) = self.with_plane(|p| p.remove_flow(remote, protocol(transport))) {
            tracing::warn!(%remote, "removing the flow failed: {}", err.chain());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    fn config(tenants: &[&str]) -> Config {
        let mut src = String::from(
            "trust_domain = \"t.local\"\n[tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = [\"ca.pem\"]\n\
             [kv]\npool_blocks = 64\n[[models]]\nname = \"m\"\nmax_context_tokens = 512\n",
        );
        for t in tenants {
            let _ = write!(
                src,
                "[[tenants]]\nid = \"{t}\"\nallowed_models = [\"m\"]\nkv_block_quota = 8\n"
            );
        }
        Config::from_toml_str(&src).unwrap()
    }

    fn id(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[test]
    fn a_reload_keeps_slots_and_never_reuses_a_removed_tenants_slot() {
        let first = TenantSlots::from_config(&config(&["a", "b", "c"])).unwrap();
        assert_eq!(
            ["a", "b", "c"].map(|t| first.slot(&id(t))),
            [Some(0), Some(1), Some(2)]
        );
        // b leaves, d arrives, the order changes: a and c stay put, d is new.
        let next = first.reassigned(&config(&["c", "d", "a"])).unwrap();
        assert_eq!(next.slot(&id("a")), Some(0));
        assert_eq!(next.slot(&id("c")), Some(2));
        assert_eq!(next.slot(&id("d")), Some(3));
        assert_eq!(next.slot(&id("b")), None);
        assert_eq!(next.tenant_of(1), None);
        // b back again is a new tenant to the kernel: a fresh slot.
        let again = next.reassigned(&config(&["a", "b"])).unwrap();
        assert_eq!(again.slot(&id("b")), Some(4));
        let table = again.table(&config(&["a", "b"])).unwrap();
        assert_eq!(table.len(), 5);
        let active: Vec<bool> = table.iter().map(|l| l.flags != 0).collect();
        assert_eq!(active, [true, false, false, false, true]);
        assert_eq!(table[4].mark, limits::tenant_mark(4));
    }

    #[test]
    fn a_refused_reload_puts_every_tenant_back_in_its_own_slot() {
        let before = TenantSlots::from_config(&config(&["a", "b", "c"])).unwrap();
        // The refused reload dropped b and added d.
        let refused = before.reassigned(&config(&["a", "c", "d"])).unwrap();
        assert_eq!(refused.slot(&id("d")), Some(3));
        let back = refused.restored(&before);
        // b is in slot 1 again (its open flows still count), not a new slot
        // as re-applying the old config over the refused slots would give.
        assert_eq!(
            ["a", "b", "c", "d"].map(|t| back.slot(&id(t))),
            [Some(0), Some(1), Some(2), None]
        );
        assert_eq!(
            refused
                .reassigned(&config(&["a", "b", "c"]))
                .unwrap()
                .slot(&id("b")),
            Some(4)
        );
        // d's slot stays inactive and is never given out again.
        let table = back.table(&config(&["a", "b", "c"])).unwrap();
        let active: Vec<bool> = table.iter().map(|l| l.flags != 0).collect();
        assert_eq!(active, [true, true, true, false]);
        let later = back.reassigned(&config(&["a", "e"])).unwrap();
        assert_eq!(later.slot(&id("e")), Some(4));
    }
}
