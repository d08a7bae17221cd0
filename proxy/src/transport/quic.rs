//! The QUIC listener: HTTP/3 (h3 over h3-quinn) on a quinn endpoint.
//!
//! The tenant of a connection is read once, after the handshake, from
//! `Connection::peer_identity()` (rustls hands quinn the verified chain as
//! `Vec<CertificateDer>`). A client certificate the verifier refuses fails
//! the handshake: the client's `connect()` may already have returned, and it
//! then sees a connection error, never a response.
//!
//! QUIC lets a client's address change under a connection, and quinn has no
//! event for it: each request's [`Peer::remote`] is read from
//! `Connection::remote_address()` when the request arrives.

use super::{
    ConnectionPermit, FlowGuard, FlowRegistry, FlowTransport, RefusalSink, ShutdownSignal,
    TenantConnections, TransportLimits, content_length, declared_too_large, strip_framing_headers,
    too_large, too_many_connections,
};
use crate::front::{
    ApiRequest, ApiResponse, Handler, MAX_BODY_BYTES, Peer, Protocol, ResponseBody,
};
use crate::tls::tenant_of_chain;
use bulkhead_core::TenantId;
use bulkhead_core::identity::{IdentityError, TrustDomain};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use h3::server::{RequestResolver, RequestStream};
use hmac::{Hmac, Mac as _};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::CertificateDer;
use sha2::Sha256;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// The UDP receive and send buffer size asked of the kernel: at its default
/// (~208 KB) receive errors grew under many connections; 4 MiB removed them.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// How the endpoint names its connections and resets those it has lost.
/// The default: random ids, and a random reset key per process.
#[derive(Clone, Debug, Default)]
pub struct ConnectionIds {
    /// Routable ids for a QUIC-LB balancer (`[cluster.quic_lb]`).
    pub lb: Option<Arc<super::quic_lb::LbConfig>>,
    /// The stateless reset key (`[listeners] quic_reset_key_file`).
    pub reset_key: Option<Arc<ResetKey>>,
}

/// The key of the endpoint's stateless reset tokens (HMAC-SHA-256 of a
/// connection id). A packet of a connection this endpoint does not hold is
/// answered with the token it would have issued for that id; the client,
/// holding the token from the endpoint that did, closes at once. With the
/// same key across a restart, that includes the previous process's
/// connections, which otherwise wait out their idle timeout.
#[derive(Clone)]
pub struct ResetKey(Hmac<Sha256>);

impl std::fmt::Debug for ResetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetKey(..)")
    }
}

impl ResetKey {
    /// A key of these bytes.
    #[must_use]
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(Hmac::<Sha256>::new_from_slice(bytes).expect("HMAC takes keys of any length"))
    }

    /// The key in `path`: 64 hex digits, surrounding whitespace ignored
    /// (`openssl rand -hex 32` writes one).
    ///
    /// # Errors
    /// When the file cannot be read or does not hold 64 hex digits; its
    /// content is never quoted.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let key = super::read_hex_key::<32>(path, "QUIC reset key", "32 bytes")?;
        Ok(Self::from_bytes(&key))
    }
}

/// Connection ids a restarted endpoint with the same [`ResetKey`] still
/// recognizes as its own: 4 random octets and a 4-octet HMAC tag of them.
/// (quinn resets only packets whose ids its generator validates; its
/// default generator's key is new in every process.)
#[derive(Debug)]
struct KeyedCidGenerator(ResetKey);

/// Octets of a [`KeyedCidGenerator`] id: nonce, then tag.
const KEYED_NONCE: usize = 4;
const KEYED_TAG: usize = 4;

impl KeyedCidGenerator {
    fn tag(&self, nonce: &[u8]) -> [u8; KEYED_TAG] {
        let mut mac = self.0.0.clone();
        mac.update(b"bulkhead quic connection id");
        mac.update(nonce);
        let digest = mac.finalize().into_bytes();
        let mut tag = [0u8; KEYED_TAG];
        tag.copy_from_slice(&digest[..KEYED_TAG]);
        tag
    }
}

impl quinn::ConnectionIdGenerator for KeyedCidGenerator {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; KEYED_NONCE + KEYED_TAG];
        getrandom::fill(&mut id[..KEYED_NONCE]).expect("the OS random source");
        let tag = self.tag(&id[..KEYED_NONCE]);
        id[KEYED_NONCE..].copy_from_slice(&tag);
        quinn::ConnectionId::new(&id)
    }

    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != self.cid_len() {
            return Err(quinn_proto::InvalidCid);
        }
        let (nonce, tag) = cid.split_at(KEYED_NONCE);
        if self.tag(nonce)[..] == *tag {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        KEYED_NONCE + KEYED_TAG
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mut mac = self.0.clone();
        mac.update(data);
        signature_out.copy_from_slice(&mac.finalize().into_bytes());
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let mut mac = self.0.clone();
        mac.update(data);
        mac.verify_slice(signature)
            .map_err(|_| quinn::crypto::CryptoError)
    }
}

/// Why the QUIC listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The TLS configuration cannot carry QUIC (it lacks TLS 1.3 AES-128-GCM-SHA256).
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Tls(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The UDP socket could not be bound or set up.
    #[error("QUIC listener on udp/{addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The UDP socket buffer sizes the kernel granted (Linux reports twice what
/// was asked, capped by `net.core.rmem_max` / `wmem_max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketBuffers {
    /// `SO_RCVBUF`.
    pub recv: usize,
    /// `SO_SNDBUF`.
    pub send: usize,
}

/// Counts of what the listener refused or redirected, for metrics.
#[derive(Debug, Default)]
pub struct QuicCounters {
    /// Stateless Retry packets sent.
    pub retries: AtomicU64,
    /// Handshakes that failed (refused certificate, timeout, protocol error).
    pub handshakes_failed: AtomicU64,
}

/// A bound QUIC endpoint, not yet serving.
pub struct QuicServer {
    endpoint: quinn::Endpoint,
    transport: Arc<quinn::TransportConfig>,
    trust_domain: TrustDomain,
    limits: TransportLimits,
    connections: Arc<TenantConnections>,
    buffers: SocketBuffers,
    counters: Arc<QuicCounters>,
    flows: Option<Arc<dyn FlowRegistry>>,
    refusals: Option<Arc<dyn RefusalSink>>,
}

impl QuicServer {
    /// Binds `addr` (port 0 picks a free port) with `tls` (ALPN `h3`, client
    /// certificates required). Must be called within a Tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        trust_domain: TrustDomain,
        limits: TransportLimits,
    ) -> Result<Self, QuicError> {
        Self::bind_with_ids(addr, tls, trust_domain, limits, ConnectionIds::default())
    }

    /// [`bind`](Self::bind), its connection ids and reset tokens as `ids` says.
    pub fn bind_with_ids(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        trust_domain: TrustDomain,
        limits: TransportLimits,
        ids: ConnectionIds,
    ) -> Result<Self, QuicError> {
        let socket_error = |source| QuicError::Socket { addr, source };
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(limits.max_streams_per_connection.into());
        let transport = Arc::new(transport);
        let server_config = server_config(tls, &transport)?;

        let socket = std::net::UdpSocket::bind(addr).map_err(socket_error)?;
        let buffers = enlarge_buffers(&socket).map_err(socket_error)?;
        if buffers.recv < UDP_BUFFER_BYTES {
            warn!(
                granted = buffers.recv,
                asked = UDP_BUFFER_BYTES,
                "UDP receive buffer smaller than asked: raise net.core.rmem_max"
            );
        }
        let mut endpoint_config = match &ids.reset_key {
            Some(key) => quinn::EndpointConfig::new(Arc::clone(key) as _),
            None => quinn::EndpointConfig::default(),
        };
        match (ids.lb, ids.reset_key) {
            (Some(lb), _) => {
                endpoint_config.cid_generator(move || {
                    Box::new(super::quic_lb::LbCidGenerator::new(Arc::clone(&lb)))
                });
            }
            (None, Some(key)) => {
                endpoint_config
                    .cid_generator(move || Box::new(KeyedCidGenerator(ResetKey::clone(&key))));
            }
            (None, None) => {}
        }
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(socket_error)?;
        Ok(Self {
            endpoint,
            transport,
            trust_domain,
            limits,
            connections: TenantConnections::new(limits.max_connections_per_tenant),
            buffers,
            counters: Arc::default(),
            flows: None,
            refusals: None,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// A handle that swaps the TLS configuration of new connections (a reload).
    pub fn tls_handle(&self) -> QuicTlsHandle {
        QuicTlsHandle {
            endpoint: self.endpoint.clone(),
            transport: Arc::clone(&self.transport),
        }
    }

    /// The UDP buffer sizes the kernel granted.
    pub fn socket_buffers(&self) -> SocketBuffers {
        self.buffers
    }

    /// The listener's counters (shared: they keep counting while it serves).
    pub fn counters(&self) -> Arc<QuicCounters> {
        Arc::clone(&self.counters)
    }

    /// Counts connections in `connections` (to share one count with the TCP listener).
    #[must_use]
    pub fn with_connections(mut self, connections: Arc<TenantConnections>) -> Self {
        self.connections = connections;
        self
    }

    /// Reports each refused connection to `refusals` (the audit log).
    #[must_use]
    pub fn with_refusals(mut self, refusals: Arc<dyn RefusalSink>) -> Self {
        self.refusals = Some(refusals);
        self
    }

    /// Registers each attributed connection's address in `flows` (the kernel's flow map).
    #[must_use]
    pub fn with_flows(mut self, flows: Arc<dyn FlowRegistry>) -> Self {
        self.flows = Some(flows);
        self
    }

    /// Serves until `shutdown`: then refuses new connections, sends GOAWAY
    /// on each open one, lets requests in flight finish for up to
    /// [`TransportLimits::shutdown_grace`], and closes the endpoint.
    pub async fn serve<H: Handler>(self, handler: Arc<H>, mut shutdown: ShutdownSignal) {
        let endpoint = self.endpoint;
        let limits = self.limits;
        let shared = Arc::new(Shared {
            handler,
            trust_domain: self.trust_domain,
            limits,
            connections: self.connections,
            counters: self.counters,
            flows: self.flows,
            refusals: self.refusals,
        });
        let handshakes = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown.triggered() => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let busy = handshakes.load(Ordering::Relaxed) >= limits.quic_retry_threshold;
                    if busy && !incoming.remote_address_validated() && incoming.may_retry() {
                        shared.counters.retries.fetch_add(1, Ordering::Relaxed);
                        if let Err(refused) = incoming.retry() {
                            refused.into_incoming().ignore();
                        }
                        continue;
                    }
                    let guard = HandshakeGuard::new(&handshakes);
                    tasks.spawn(connection(Arc::clone(&shared), incoming, guard, shutdown.clone()));
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        endpoint.set_server_config(None);
        info!(connections = tasks.len(), "QUIC listener draining");
        let drained = tokio::time::timeout(limits.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                connections = tasks.len(),
                "QUIC shutdown grace over: closing connections"
            );
        }
        endpoint.close(0u32.into(), b"server shutting down");
        tasks.shutdown().await;
        // Lets the close frames go out; bounded in case a peer never answers.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}

/// The endpoint's server config: `tls` for QUIC with `transport`.
fn server_config(
    tls: Arc<rustls::ServerConfig>,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, QuicError> {
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::clone(transport));
    Ok(config)
}

/// Swaps the TLS configuration a [`QuicServer`]'s endpoint hands new
/// connections; connections already open keep theirs.
#[derive(Clone, Debug)]
pub struct QuicTlsHandle {
    endpoint: quinn::Endpoint,
    transport: Arc<quinn::TransportConfig>,
}

impl QuicTlsHandle {
    /// The endpoint config for `tls`, checked, to [`Self::install`] later
    /// (so a reload can check everything before it changes anything).
    pub fn prepare(
        &self,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<quinn::ServerConfig, QuicError> {
        server_config(tls, &self.transport)
    }

    /// New connections use `config` from now on.
    pub fn install(&self, config: quinn::ServerConfig) {
        self.endpoint.set_server_config(Some(config));
    }
}

/// Asks the kernel for [`UDP_BUFFER_BYTES`] each way and reports what it granted.
fn enlarge_buffers(socket: &std::net::UdpSocket) -> std::io::Result<SocketBuffers> {
    let state = quinn::udp::UdpSocketState::new(socket.into())?;
    state.set_recv_buffer_size(socket.into(), UDP_BUFFER_BYTES)?;
    state.set_send_buffer_size(socket.into(), UDP_BUFFER_BYTES)?;
    Ok(SocketBuffers {
        recv: state.recv_buffer_size(socket.into())?,
        send: state.send_buffer_size(socket.into())?,
    })
}

/// Counts one handshake in progress until dropped.
struct HandshakeGuard(Arc<AtomicUsize>);

impl HandshakeGuard {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Shared<H> {
    handler: Arc<H>,
    trust_domain: TrustDomain,
    limits: TransportLimits,
    connections: Arc<TenantConnections>,
    counters: Arc<QuicCounters>,
    flows: Option<Arc<dyn FlowRegistry>>,
    refusals: Option<Arc<dyn RefusalSink>>,
}

/// How often a connection's remote address is checked for a migration.
const MIGRATION_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// What each request of one connection reads.
struct ConnState {
    conn: quinn::Connection,
    tenant: Result<TenantId, IdentityError>,
    /// `None`: over the tenant's limit; requests get 429 and the connection closes.
    permit: Option<ConnectionPermit>,
}

type Resolver = RequestResolver<h3_quinn::Connection, Bytes>;

/// One connection: handshake, attribute, accept requests until closed or shut down.
async fn connection<H: Handler>(
    shared: Arc<Shared<H>>,
    incoming: quinn::Incoming,
    guard: HandshakeGuard,
    mut shutdown: ShutdownSignal,
) {
    let remote = incoming.remote_address();
    let handshake = async { incoming.accept()?.await };
    let conn = match tokio::time::timeout(shared.limits.handshake_timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            shared
                .counters
                .handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            debug!(%remote, %error, "QUIC handshake refused");
            super::flows::report_refusal(
                shared.refusals.as_ref(),
                remote,
                FlowTransport::Udp,
                None,
                &super::Refusal::Handshake(error.to_string()),
            );
            return;
        }
        Err(_) => {
            shared
                .counters
                .handshakes_failed
                .fetch_add(1, Ordering::Relaxed);
            debug!(%remote, "QUIC handshake timed out");
            super::flows::report_refusal(
                shared.refusals.as_ref(),
                remote,
                FlowTransport::Udp,
                None,
                &super::Refusal::HandshakeTimeout,
            );
            return;
        }
    };
    drop(guard);
    let tenant = tenant_of_connection(&conn, &shared.trust_domain);
    let permit = shared.connections.try_acquire(tenant.as_ref().ok());
    super::flows::report_attribution(
        shared.refusals.as_ref(),
        remote,
        FlowTransport::Udp,
        &tenant,
        permit.is_some(),
    );
    let mut h3 = match h3::server::builder()
        .build(h3_quinn::Connection::new(conn.clone()))
        .await
    {
        Ok(h3) => h3,
        Err(error) => {
            debug!(%remote, %error, "HTTP/3 setup failed");
            return;
        }
    };
    let mut flow = FlowGuard::open(
        shared.flows.as_ref(),
        tenant.as_ref().ok(),
        conn.remote_address(),
        FlowTransport::Udp,
    );
    let mut migration = tokio::time::interval(MIGRATION_POLL);
    migration.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = Arc::new(ConnState {
        conn,
        tenant,
        permit,
    });
    let mut requests = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.triggered() => break,
            _ = migration.tick() => {
                if let Some(flow) = flow.as_mut() {
                    flow.follow(state.conn.remote_address());
                }
            }
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    // Boxed, the ~4 KiB future is moved once, not once per layer of spawn.
                    let task = Box::pin(request(Arc::clone(&shared), Arc::clone(&state), resolver));
                    requests.spawn(task);
                    if state.permit.is_none() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    debug!(%remote, %error, "HTTP/3 connection ended");
                    break;
                }
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
    // GOAWAY naming the next stream: every request accepted so far is served.
    let _ = h3.shutdown(1).await;
    while requests.join_next().await.is_some() {}
    // Dropping the h3 connection closes the QUIC connection (H3_NO_ERROR).
}

/// The tenant of a QUIC connection's verified client certificate.
fn tenant_of_connection(
    conn: &quinn::Connection,
    domain: &TrustDomain,
) -> Result<TenantId, IdentityError> {
    let chain = conn
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok());
    tenant_of_chain(chain.as_deref().map(Vec::as_slice), domain)
}

/// Why a request body was not read.
enum BodyError {
    TooLarge,
    Stream(h3::error::StreamError),
}

async fn request<H: Handler>(shared: Arc<Shared<H>>, state: Arc<ConnState>, resolver: Resolver) {
    let (req, stream) = match resolver.resolve_request().await {
        Ok(pair) => pair,
        Err(error) => {
            debug!(%error, "HTTP/3 request refused");
            return;
        }
    };
    let (mut send, mut recv) = stream.split();
    let response = if state.permit.is_none() {
        too_many_connections(shared.limits.max_connections_per_tenant)
    } else if declared_too_large(req.headers()) {
        recv.stop_sending(h3::error::Code::H3_NO_ERROR);
        too_large()
    } else {
        match read_body(&mut recv).await {
            Ok(body) => {
                let (parts, ()) = req.into_parts();
                let request = ApiRequest {
                    method: parts.method,
                    path: parts.uri.path().to_owned(),
                    headers: parts.headers,
                    body,
                    peer: Peer {
                        tenant: state.tenant.clone(),
                        remote: state.conn.remote_address(),
                        protocol: Protocol::Http3,
                    },
                };
                // A client gone before its answer: dropping the handler's
                // future cancels the request (a queued or running sequence
                // is cancelled, its blocks freed, its record submitted as
                // 499) instead of computing an answer nobody reads.
                tokio::select! {
                    response = shared.handler.handle(request) => response,
                    _ = state.conn.closed() => {
                        debug!("HTTP/3 client gone before its answer");
                        return;
                    }
                }
            }
            Err(BodyError::TooLarge) => {
                // RFC 9114 §4.1: a complete response may precede the request's end.
                recv.stop_sending(h3::error::Code::H3_NO_ERROR);
                too_large()
            }
            Err(BodyError::Stream(error)) => {
                debug!(%error, "HTTP/3 request body not received");
                return;
            }
        }
    };
    send_response(&mut send, response, &state.conn).await;
}

async fn read_body(
    recv: &mut RequestStream<h3_quinn::RecvStream, Bytes>,
) -> Result<Bytes, BodyError> {
    let mut body = BytesMut::new();
    while let Some(mut chunk) = recv.recv_data().await.map_err(BodyError::Stream)? {
        if body.len() + chunk.remaining() > MAX_BODY_BYTES {
            return Err(BodyError::TooLarge);
        }
        body.put(&mut chunk);
    }
    Ok(body.freeze())
}

/// Sends the response; a stream is forwarded chunk by chunk as DATA frames.
/// Returning early drops the receiver, which tells the handler's sender.
async fn send_response(
    send: &mut RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    response: ApiResponse,
    conn: &quinn::Connection,
) {
    let ApiResponse {
        status,
        mut headers,
        body,
    } = response;
    strip_framing_headers(&mut headers);
    if let Some(len) = content_length(&body) {
        headers.insert(http::header::CONTENT_LENGTH, len);
    }
    let mut head = http::Response::new(());
    *head.status_mut() = status;
    *head.headers_mut() = headers;
    if let Err(error) = send.send_response(head).await {
        debug!(%error, "HTTP/3 response not sent");
        return;
    }
    match body {
        ResponseBody::Full(bytes) => {
            if !bytes.is_empty() && send.send_data(bytes).await.is_err() {
                return;
            }
        }
        ResponseBody::Stream(mut rx) => loop {
            // A reset stream (STOP_SENDING) shows at the next write; a closed
            // connection shows at once, even while no chunk is coming.
            let chunk = tokio::select! {
                chunk = rx.recv() => chunk,
                _ = conn.closed() => return,
            };
            match chunk {
                Some(chunk) if chunk.is_empty() => {}
                Some(chunk) => {
                    if let Err(error) = send.send_data(chunk).await {
                        debug!(%error, "HTTP/3 client stopped reading the response");
                        return;
                    }
                }
                None => break,
            }
        },
    }
    if let Err(error) = send.finish().await {
        debug!(%error, "HTTP/3 response not finished");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ConnectionIdGenerator as _;
    use quinn::crypto::HmacKey as _;

    #[test]
    fn keyed_ids_are_recognized_under_their_key_only() {
        let mut ours = KeyedCidGenerator(ResetKey::from_bytes(&[3; 32]));
        let theirs = KeyedCidGenerator(ResetKey::from_bytes(&[4; 32]));
        let restarted = KeyedCidGenerator(ResetKey::from_bytes(&[3; 32]));
        for _ in 0..100 {
            let id = ours.generate_cid();
            assert_eq!(id.len(), ours.cid_len());
            assert!(restarted.validate(&id).is_ok());
            // A 4-octet tag: another key's generator takes 1 in 2^32.
            assert!(theirs.validate(&id).is_err());
        }
        assert!(ours.validate(&quinn::ConnectionId::new(&[0; 8])).is_err());
        assert!(ours.validate(&quinn::ConnectionId::new(&[0; 3])).is_err());
    }

    #[test]
    fn reset_tokens_are_hmac_sha256_and_the_key_file_is_never_quoted() {
        let key = ResetKey::from_bytes(&[9; 32]);
        let mut token = [0u8; 32];
        key.sign(b"cid", &mut token);
        assert!(key.verify(b"cid", &token).is_ok());
        assert!(key.verify(b"cie", &token).is_err());
        assert!(
            ResetKey::from_bytes(&[8; 32])
                .verify(b"cid", &token)
                .is_err()
        );
        assert_eq!(format!("{key:?}"), "ResetKey(..)");

        let dir = std::env::temp_dir().join(format!("bh-reset-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("reset.key");
        std::fs::write(&file, format!("{}\n", "09".repeat(32))).unwrap();
        let loaded = ResetKey::load(&file).unwrap();
        assert!(loaded.verify(b"cid", &token).is_ok());
        std::fs::write(&file, "top-secret").unwrap();
        let err = format!("{:#}", ResetKey::load(&file).unwrap_err());
        assert!(err.contains("reset.key must hold 64 hex digits"), "{err}");
        assert!(!err.contains("top-secret"), "{err}");
        let err = format!("{:#}", ResetKey::load(&dir.join("none.key")).unwrap_err());
        assert!(err.contains("reading the QUIC reset key file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
