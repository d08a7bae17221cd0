//! The listeners: TLS/TCP with HTTP/1.1 and h2 ([`tcp`]), QUIC with HTTP/3
//! ([`quic`]). Both terminate mTLS, attribute each connection to the tenant
//! of its client certificate, read request bodies up to
//! [`MAX_BODY_BYTES`](crate::front::MAX_BODY_BYTES) and call a
//! [`Handler`](crate::front::Handler); neither interprets a request.
//!
//! What they share lives here: the limits, the shutdown signal, and the
//! per-tenant count of open connections (one count across both listeners
//! when they are given the same [`TenantConnections`]).
//!
//! A connection over its tenant's limit is not cut off mid-handshake (the
//! client would see only a reset): every request on it is answered `429`
//! with an OpenAI-style error, and it is closed gracefully after the first.

pub mod flows;
pub mod quic;
pub mod quic_lb;
pub mod tcp;

use crate::front::{ApiResponse, ResponseBody};
use bulkhead_core::TenantId;
use http::{HeaderMap, HeaderValue, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

pub use self::flows::{FlowGuard, FlowRegistry, FlowTransport, Refusal, RefusalSink};
pub use self::quic::{
    ConnectionIds, QuicError, QuicServer, QuicTlsHandle, ResetKey, SocketBuffers,
};
pub use self::tcp::{TcpServer, TcpTlsHandle};

/// Bounds on what one client can hold open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportLimits {
    /// Connections one tenant may hold open at once (per [`TenantConnections`]).
    pub max_connections_per_tenant: usize,
    /// Requests in flight on one connection (h2 `SETTINGS_MAX_CONCURRENT_STREAMS`,
    /// QUIC `initial_max_streams_bidi`).
    pub max_streams_per_connection: u32,
    /// Longest a TLS or QUIC handshake may take before the connection is dropped.
    pub handshake_timeout: Duration,
    /// QUIC: once this many handshakes are in progress, a client whose
    /// address is not yet validated is sent a stateless Retry first, so a
    /// spoofed source cannot make the server keep state or send large
    /// flights. 0: always.
    pub quic_retry_threshold: usize,
    /// On shutdown, how long in-flight requests may run before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for TransportLimits {
    /// 64 connections per tenant, 128 streams per connection, 10 s
    /// handshakes, Retry from 64 handshakes in progress, 30 s grace.
    fn default() -> Self {
        Self {
            max_connections_per_tenant: 64,
            max_streams_per_connection: 128,
            handshake_timeout: Duration::from_secs(10),
            quic_retry_threshold: 64,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// A key of `N` bytes from `path`, written as `2N` hex digits (surrounding
/// whitespace ignored); errors say which key (`name`) and name the file,
/// never its content.
fn read_hex_key<const N: usize>(
    path: &std::path::Path,
    name: &str,
    what: &str,
) -> anyhow::Result<[u8; N]> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {name} file {}", path.display()))?;
    let mut key = [0u8; N];
    hex::decode_to_slice(text.trim(), &mut key)
        .ok()
        .with_context(|| {
            format!(
                "the {name} file {} must hold {} hex digits ({what})",
                path.display(),
                2 * N
            )
        })?;
    Ok(key)
}

/// Triggers a graceful shutdown of every listener holding one of its signals.
///
/// Listeners stop accepting at once, let in-flight requests finish for up
/// to [`TransportLimits::shutdown_grace`], then cut what is left.
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A shutdown not yet triggered.
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(false),
        }
    }

    /// A signal to hand a listener.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
        }
    }

    /// Starts the shutdown; idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

/// The listening side of a [`Shutdown`]. Dropping the [`Shutdown`] without
/// triggering it also counts as a trigger (nothing could trigger it later).
#[derive(Clone, Debug)]
pub struct ShutdownSignal {
    rx: watch::Receiver<bool>,
}

impl ShutdownSignal {
    /// Resolves once shutdown has been triggered.
    pub async fn triggered(&mut self) {
        // An error means the sender is gone: shut down as well.
        let _ = self.rx.wait_for(|down| *down).await;
    }

    /// Whether shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }
}

/// Open connections per tenant, shared by the listeners that are handed it.
///
/// Connections whose certificate names no valid tenant are counted together
/// under one key of their own, so they cannot exhaust a tenant's count nor
/// open unbounded connections.
#[derive(Debug)]
pub struct TenantConnections {
    max_per_tenant: usize,
    open: Mutex<HashMap<Option<TenantId>, usize>>,
}

impl TenantConnections {
    /// An empty count allowing `max_per_tenant` connections per tenant.
    pub fn new(max_per_tenant: usize) -> Arc<Self> {
        Arc::new(Self {
            max_per_tenant,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A permit for one more connection of `tenant`, or `None` at the limit.
    pub fn try_acquire(self: &Arc<Self>, tenant: Option<&TenantId>) -> Option<ConnectionPermit> {
        let key = tenant.cloned();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= self.max_per_tenant {
            return None;
        }
        *count += 1;
        Some(ConnectionPermit {
            registry: Arc::clone(self),
            key,
        })
    }

    /// How many connections `tenant` holds open now.
    pub fn open(&self, tenant: Option<&TenantId>) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&tenant.cloned()).copied().unwrap_or(0)
    }
}

/// One counted connection; the count drops when this does.
#[derive(Debug)]
pub struct ConnectionPermit {
    registry: Arc<TenantConnections>,
    key: Option<TenantId>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self
            .registry
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// An OpenAI-style JSON error response, as the transport itself answers.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> ApiResponse {
    let kind = if status == StatusCode::TOO_MANY_REQUESTS {
        "rate_limit_error"
    } else {
        "invalid_request_error"
    };
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    ApiResponse::full(status, "application/json", body.to_string())
}

/// The answer to a body over the limit.
fn too_large() -> ApiResponse {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        &format!(
            "the request body is larger than {} bytes",
            crate::front::MAX_BODY_BYTES
        ),
    )
}

/// The answer on a connection over its tenant's limit.
fn too_many_connections(limit: usize) -> ApiResponse {
    error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_connections",
        &format!("this tenant already holds {limit} open connections; reuse one"),
    )
}

/// Whether a declared `content-length` already exceeds the body limit.
fn declared_too_large(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > crate::front::MAX_BODY_BYTES as u64)
}

/// Removes headers a handler must not set: the transport owns framing.
fn strip_framing_headers(headers: &mut HeaderMap) {
    for name in [
        http::header::CONNECTION,
        http::header::TRANSFER_ENCODING,
        http::header::CONTENT_LENGTH,
        http::header::UPGRADE,
        http::HeaderName::from_static("keep-alive"),
        http::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

/// `content-length` for a whole body.
fn content_length(body: &ResponseBody) -> Option<HeaderValue> {
    match body {
        ResponseBody::Full(bytes) => Some(HeaderValue::from(bytes.len())),
        ResponseBody::Stream(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_per_tenant_and_release_on_drop() {
        let registry = TenantConnections::new(2);
        let a = TenantId::new("a").unwrap();
        let first = registry.try_acquire(Some(&a)).unwrap();
        let _second = registry.try_acquire(Some(&a)).unwrap();
        assert!(registry.try_acquire(Some(&a)).is_none());
        // Another tenant and the unidentified are counted apart.
        let _b = registry
            .try_acquire(Some(&TenantId::new("b").unwrap()))
            .unwrap();
        let _none = registry.try_acquire(None).unwrap();
        drop(first);
        assert_eq!(registry.open(Some(&a)), 1);
        assert!(registry.try_acquire(Some(&a)).is_some());
    }

    #[tokio::test]
    async fn a_dropped_shutdown_counts_as_triggered() {
        let shutdown = Shutdown::new();
        let mut signal = shutdown.signal();
        assert!(!signal.is_triggered());
        drop(shutdown);
        assert!(signal.is_triggered());
        signal.triggered().await;
    }

    #[test]
    fn the_413_body_is_an_openai_error() {
        let response = too_large();
        let ResponseBody::Full(body) = response.body else {
            panic!("not a whole body")
        };
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["code"], "request_too_large");
        assert!(json["error"]["param"].is_null());
    }
}
