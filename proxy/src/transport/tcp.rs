//! The TLS/TCP listener: HTTP/1.1 and h2 (by ALPN) over tokio-rustls, served
//! by hyper. For clients without UDP, and for the `openai` SDK, which speaks
//! no HTTP/3; every response advertises the QUIC listener with `alt-svc`.

use super::{
    ConnectionPermit, FlowGuard, FlowRegistry, FlowTransport, RefusalSink, ShutdownSignal,
    TenantConnections, TransportLimits, content_length, declared_too_large, strip_framing_headers,
    too_large, too_many_connections,
};
use crate::front::{
    ApiRequest, ApiResponse, Handler, MAX_BODY_BYTES, Peer, Protocol, ResponseBody,
};
use crate::tls::tenant_of_chain;
use bulkhead_core::identity::TrustDomain;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// A bound TLS/TCP listener, not yet serving.
pub struct TcpServer {
    listener: TcpListener,
    acceptor: Arc<RwLock<TlsAcceptor>>,
    trust_domain: TrustDomain,
    limits: TransportLimits,
    connections: Arc<TenantConnections>,
    alt_svc: Option<HeaderValue>,
    flows: Option<Arc<dyn FlowRegistry>>,
    refusals: Option<Arc<dyn RefusalSink>>,
}

impl TcpServer {
    /// Binds `addr` (port 0 picks a free port; see [`Self::local_addr`]).
    ///
    /// `tls` should require client certificates (see [`crate::tls::ServerTls`]);
    /// the tenant is read from the certificate's SPIFFE id in `trust_domain`.
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        trust_domain: TrustDomain,
        limits: TransportLimits,
    ) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            acceptor: Arc::new(RwLock::new(TlsAcceptor::from(tls))),
            trust_domain,
            limits,
            connections: TenantConnections::new(limits.max_connections_per_tenant),
            alt_svc: None,
            flows: None,
            refusals: None,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that swaps the TLS configuration of new connections (a reload).
    pub fn tls_handle(&self) -> TcpTlsHandle {
        TcpTlsHandle(Arc::clone(&self.acceptor))
    }

    /// Advertises HTTP/3 on UDP port `quic_port` (`alt-svc: h3=":<port>"; ma=86400`).
    #[must_use]
    pub fn with_alt_svc(mut self, quic_port: u16) -> Self {
        self.alt_svc = HeaderValue::from_str(&format!("h3=\":{quic_port}\"; ma=86400")).ok();
        self
    }

    /// Counts connections in `connections` (to share one count with the QUIC listener).
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

    /// Serves until `shutdown`: then stops accepting, lets requests in flight
    /// finish for up to [`TransportLimits::shutdown_grace`], and cuts the rest.
    pub async fn serve<H: Handler>(self, handler: Arc<H>, mut shutdown: ShutdownSignal) {
        let grace = self.limits.shutdown_grace;
        let listener = self.listener;
        let shared = Arc::new(Shared {
            handler,
            acceptor: self.acceptor,
            trust_domain: self.trust_domain,
            limits: self.limits,
            connections: self.connections,
            alt_svc: self.alt_svc,
            flows: self.flows,
            refusals: self.refusals,
        });
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown.triggered() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, remote)) => {
                        tasks.spawn(connection(Arc::clone(&shared), stream, remote, shutdown.clone()));
                    }
                    Err(error) => {
                        // Per-connection errors (aborted) or fd exhaustion: back off briefly.
                        warn!(%error, "TCP accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(listener);
        info!(connections = tasks.len(), "TCP listener draining");
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(
                connections = tasks.len(),
                "TCP shutdown grace over: cutting connections"
            );
            tasks.shutdown().await;
        }
    }
}

/// Swaps the TLS configuration a [`TcpServer`] hands new connections;
/// connections already open keep theirs.
#[derive(Clone)]
pub struct TcpTlsHandle(Arc<RwLock<TlsAcceptor>>);

impl TcpTlsHandle {
    /// New connections use `tls` from now on.
    pub fn set(&self, tls: Arc<rustls::ServerConfig>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = TlsAcceptor::from(tls);
    }
}

impl std::fmt::Debug for TcpTlsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TcpTlsHandle")
    }
}

/// What every connection task of one listener reads.
struct Shared<H> {
    handler: Arc<H>,
    acceptor: Arc<RwLock<TlsAcceptor>>,
    trust_domain: TrustDomain,
    limits: TransportLimits,
    connections: Arc<TenantConnections>,
    alt_svc: Option<HeaderValue>,
    flows: Option<Arc<dyn FlowRegistry>>,
    refusals: Option<Arc<dyn RefusalSink>>,
}

/// One connection: handshake, attribute, serve until closed or shut down.
async fn connection<H: Handler>(
    shared: Arc<Shared<H>>,
    stream: TcpStream,
    remote: SocketAddr,
    mut shutdown: ShutdownSignal,
) {
    // Tokens are small writes that must leave at once.
    let _ = stream.set_nodelay(true);
    let acceptor = shared
        .acceptor
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let handshake = acceptor.accept(stream);
    let tls = match tokio::time::timeout(shared.limits.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            debug!(%remote, %error, "TLS handshake refused");
            super::flows::report_refusal(
                shared.refusals.as_ref(),
                remote,
                FlowTransport::Tcp,
                None,
                &super::Refusal::Handshake(error.to_string()),
            );
            return;
        }
        Err(_) => {
            debug!(%remote, "TLS handshake timed out");
            super::flows::report_refusal(
                shared.refusals.as_ref(),
                remote,
                FlowTransport::Tcp,
                None,
                &super::Refusal::HandshakeTimeout,
            );
            return;
        }
    };
    let session = tls.get_ref().1;
    let tenant = tenant_of_chain(session.peer_certificates(), &shared.trust_domain);
    let alpn_h2 = session.alpn_protocol() == Some(b"h2");
    let permit = shared.connections.try_acquire(tenant.as_ref().ok());
    super::flows::report_attribution(
        shared.refusals.as_ref(),
        remote,
        FlowTransport::Tcp,
        &tenant,
        permit.is_some(),
    );
    // Registered for the connection's life (unregistered on every way out).
    let _flow = FlowGuard::open(
        shared.flows.as_ref(),
        tenant.as_ref().ok(),
        remote,
        FlowTransport::Tcp,
    );
    let conn_state = Arc::new(ConnState {
        peer: Peer {
            tenant,
            remote,
            protocol: if alpn_h2 {
                Protocol::Http2
            } else {
                Protocol::Http1
            },
        },
        permit,
        close: Notify::new(),
    });
    let service_state = Arc::clone(&conn_state);
    let service_shared = Arc::clone(&shared);
    let service = hyper::service::service_fn(move |req| {
        respond(Arc::clone(&service_shared), Arc::clone(&service_state), req)
    });
    let builder = http_builder(&shared.limits, alpn_h2);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                debug!(%remote, %error, "connection ended with an error");
            }
            return;
        }
        () = shutdown.triggered() => {}
        () = conn_state.close.notified() => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(error) = conn.await {
        debug!(%remote, %error, "connection ended with an error while closing");
    }
}

/// hyper's builder for one connection: the protocol ALPN chose, with its limits.
fn http_builder(limits: &TransportLimits, alpn_h2: bool) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that trickles its request head is held to the handshake's
    // deadline too: slow headers are the same resource attack as a slow handshake.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection)
        .keep_alive_interval(std::time::Duration::from_secs(30));
    if alpn_h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    }
}

/// Per-connection state the request service reads.
struct ConnState {
    peer: Peer,
    /// `None`: over the tenant's limit; requests get 429 and the connection closes.
    permit: Option<ConnectionPermit>,
    /// Notified to close the connection gracefully.
    close: Notify,
}

async fn respond<H: Handler>(
    shared: Arc<Shared<H>>,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Result<Response<TcpBody>, Infallible> {
    let mut peer = conn.peer.clone();
    peer.protocol = if req.version() == Version::HTTP_2 {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let response = if conn.permit.is_none() {
        conn.close.notify_one();
        too_many_connections(shared.limits.max_connections_per_tenant)
    } else if declared_too_large(req.headers()) {
        too_large()
    } else {
        let (parts, body) = req.into_parts();
        match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(collected) => {
                let request = ApiRequest {
                    method: parts.method,
                    path: parts.uri.path().to_owned(),
                    headers: parts.headers,
                    body: collected.to_bytes(),
                    peer,
                };
                shared.handler.handle(request).await
            }
            Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => too_large(),
            Err(error) => super::error_response(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                &format!("the request body could not be read: {error}"),
            ),
        }
    };
    Ok(to_hyper(
        response,
        shared.alt_svc.as_ref(),
        conn.permit.is_none(),
    ))
}

fn to_hyper(
    response: ApiResponse,
    alt_svc: Option<&HeaderValue>,
    close: bool,
) -> Response<TcpBody> {
    let ApiResponse {
        status,
        mut headers,
        body,
    } = response;
    strip_framing_headers(&mut headers);
    if let Some(len) = content_length(&body) {
        headers.insert(http::header::CONTENT_LENGTH, len);
    }
    if let Some(alt_svc) = alt_svc {
        headers.insert(http::header::ALT_SVC, alt_svc.clone());
    }
    if close {
        // HTTP/1.1 closes after this response; hyper drops the header on h2.
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    let mut out = Response::new(match body {
        ResponseBody::Full(bytes) => TcpBody::Full(Some(bytes)),
        ResponseBody::Stream(rx) => TcpBody::Stream(rx),
    });
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// A response body: whole, or the handler's channel. hyper drops it when
/// the client goes away, which drops the receiver and tells the sender.
enum TcpBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for TcpBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream(rx) => loop {
                match rx.poll_recv(cx) {
                    // An empty chunk would end an HTTP/1.1 chunked body early.
                    Poll::Ready(Some(chunk)) if chunk.is_empty() => {}
                    other => return other.map(|chunk| chunk.map(|c| Ok(Frame::data(c)))),
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Stream(_) => SizeHint::default(),
        }
    }
}
