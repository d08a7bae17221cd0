//! Telling the kernel which tenant each connection's address belongs to.
//!
//! After a handshake names the tenant, the transport registers the
//! connection's remote address (TCP or UDP) under it, so the eBPF programs
//! tag and rate-limit its packets as that tenant's; when a QUIC client's
//! address changes (quinn has no migration event, so the connection is
//! polled) the registration moves with it; when the connection ends it is
//! removed. A [`FlowGuard`] does the removal on drop, so every exit path of
//! a connection task unregisters.

use bulkhead_core::TenantId;
use std::{net::SocketAddr, sync::Arc};

/// The transport a flow runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowTransport {
    /// The TLS/TCP listener.
    Tcp,
    /// The QUIC listener.
    Udp,
}

/// Where flows are registered: the kernel's flow map (or anything that keeps one).
pub trait FlowRegistry: Send + Sync + 'static {
    /// `remote` now belongs to `tenant`.
    fn register(&self, tenant: &TenantId, remote: SocketAddr, transport: FlowTransport);
    /// A QUIC connection of `tenant` moved from `old` to `new`.
    fn migrate(&self, tenant: &TenantId, old: SocketAddr, new: SocketAddr);
    /// The connection of `remote` ended.
    fn unregister(&self, remote: SocketAddr, transport: FlowTransport);
}

/// One connection's registration; unregisters on drop.
pub struct FlowGuard {
    registry: Arc<dyn FlowRegistry>,
    tenant: TenantId,
    remote: SocketAddr,
    transport: FlowTransport,
}

impl std::fmt::Debug for FlowGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowGuard")
            .field("tenant", &self.tenant)
            .field("remote", &self.remote)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl FlowGuard {
    /// Registers `remote` for `tenant` (nothing when there is no registry or no tenant).
    pub fn open(
        registry: Option<&Arc<dyn FlowRegistry>>,
        tenant: Option<&TenantId>,
        remote: SocketAddr,
        transport: FlowTransport,
    ) -> Option<Self> {
        let (registry, tenant) = (registry?, tenant?);
        registry.register(tenant, remote, transport);
        Some(Self {
            registry: Arc::clone(registry),
            tenant: tenant.clone(),
            remote,
            transport,
        })
    }

    /// The connection's address is now `now`: move the registration if it changed.
    pub fn follow(&mut self, now: SocketAddr) {
        if now != self.remote {
            self.registry.migrate(&self.tenant, self.remote, now);
            self.remote = now;
        }
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.registry.unregister(self.remote, self.transport);
    }
}

/// Why a connection was refused (for the audit log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The TLS handshake failed: no client certificate, an untrusted CA,
    /// a protocol the server does not speak, ...
    Handshake(String),
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// The certificate is trusted but names no tenant of this trust domain.
    NoTenant(String),
    /// The tenant already holds its most connections.
    OverLimit,
}

impl Refusal {
    /// A short code: `handshake`, `handshake_timeout`, `no_tenant`, `over_limit`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Handshake(_) => "handshake",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::NoTenant(_) => "no_tenant",
            Self::OverLimit => "over_limit",
        }
    }
}

/// Where refused connections are reported (the audit log).
pub trait RefusalSink: Send + Sync + 'static {
    /// A connection from `remote` was refused; `tenant` where the
    /// certificate named one.
    fn refused(
        &self,
        remote: SocketAddr,
        transport: FlowTransport,
        tenant: Option<&TenantId>,
        why: &Refusal,
    );
}

/// Reports a refused connection to `sink`, if there is one.
pub(crate) fn report_refusal(
    sink: Option<&Arc<dyn RefusalSink>>,
    remote: SocketAddr,
    transport: FlowTransport,
    tenant: Option<&TenantId>,
    why: &Refusal,
) {
    if let Some(sink) = sink {
        sink.refused(remote, transport, tenant, why);
    }
}

/// Reports what attributing a connection refused: a certificate that names
/// no tenant, or a tenant without a free connection (`permitted` false).
pub(crate) fn report_attribution<E: std::fmt::Display>(
    sink: Option<&Arc<dyn RefusalSink>>,
    remote: SocketAddr,
    transport: FlowTransport,
    tenant: &Result<TenantId, E>,
    permitted: bool,
) {
    match tenant {
        Err(why) => report_refusal(
            sink,
            remote,
            transport,
            None,
            &Refusal::NoTenant(why.to_string()),
        ),
        Ok(t) if !permitted => {
            tracing::debug!(%remote, tenant = %t, "connection over its tenant's limit");
            report_refusal(sink, remote, transport, Some(t), &Refusal::OverLimit);
        }
        Ok(_) => {}
    }
}
