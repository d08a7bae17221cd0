//! The transports' [`FlowRegistry`] backed by the kernel's flow map.

use super::{KernelPlane, Protocol};
use crate::transport::{FlowRegistry, FlowTransport};
use bulkhead_core::{TenantId, config::Config};
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// Registers connections in a loaded [`KernelPlane`]'s flow map, by the
/// tenant's index in the config (the kernel's tenant slot).
///
/// A failed map write is logged, not fatal: the connection's packets then
/// fall under the unknown-source budget, which is the safe side.
#[derive(Debug)]
pub struct KernelFlows {
    plane: Arc<Mutex<KernelPlane>>,
    index: HashMap<TenantId, u32>,
}

impl KernelFlows {
    /// Flows of `config`'s tenants in `plane`.
    pub fn new(plane: Arc<Mutex<KernelPlane>>, config: &Config) -> Self {
        let index = config
            .tenants
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((t.id.clone(), u32::try_from(i).ok()?)))
            .collect();
        Self { plane, index }
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
        let Some(&index) = self.index.get(tenant) else {
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
