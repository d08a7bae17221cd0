//! The listeners over real sockets on 127.0.0.1, with real clients: hyper
//! (HTTP/1.1, h2) over rustls, quinn + h3 (HTTP/3), and Python's aioquic.
//!
//! Each test starts its own pair of listeners (TCP and QUIC, port 0) on a
//! fresh development PKI, with a [`TestHandler`] that echoes who it saw and
//! can stream.

use bulkhead::certs::{self, CertAndKey, DevPki};
use bulkhead::front::{ApiRequest, ApiResponse, Handler, Protocol, ResponseBody};
use bulkhead::tls::{QUIC_ALPN, ServerTls, TCP_ALPN};
use bulkhead::transport::{
    ConnectionIds, FlowRegistry, FlowTransport, QuicServer, ResetKey, Shutdown, TcpServer,
    TenantConnections, TransportLimits, quic::QuicCounters, quic_lb::LbConfig,
};
use bulkhead_core::TenantId;
use bulkhead_core::config::TlsPaths;
use bulkhead_core::identity::TrustDomain;
use bytes::{Buf as _, Bytes};
use http::{Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

const DOMAIN: &str = "bulkhead.test";
/// The gap between the chunks of `/stream`: streaming is seen as chunks
/// arriving spread over at least most of `4 × CHUNK_GAP`.
const CHUNK_GAP: Duration = Duration::from_millis(60);
const STREAM_BODY: &str = "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n";
/// Longest any test waits for one thing to happen.
const PATIENCE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- the handler

/// One request as the handler saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    tenant: Result<String, String>,
    protocol: Protocol,
    path: String,
}

/// `/stream`: five chunks, [`CHUNK_GAP`] apart. `/endless`: a chunk every
/// 20 ms until the receiver is gone, then `sender_closed` is notified.
/// `/slow`: a whole answer after a minute; `slow_dropped` is notified if
/// the handler is dropped before. Anything else: a JSON echo of the
/// tenant, protocol and body size.
#[derive(Default)]
struct TestHandler {
    seen: Mutex<Vec<Seen>>,
    sender_closed: Arc<Notify>,
    slow_dropped: Arc<Notify>,
}

/// Notifies when dropped.
struct OnDrop(Arc<Notify>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

impl TestHandler {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Handler for TestHandler {
    async fn handle(&self, request: ApiRequest) -> ApiResponse {
        let tenant = request
            .peer
            .tenant
            .as_ref()
            .map(ToString::to_string)
            .map_err(ToString::to_string);
        self.seen.lock().unwrap().push(Seen {
            tenant: tenant.clone(),
            protocol: request.peer.protocol,
            path: request.path.clone(),
        });
        let streaming = |rx| {
            let mut response = ApiResponse::full(StatusCode::OK, "text/event-stream", "");
            response.body = ResponseBody::Stream(rx);
            response
        };
        match request.path.as_str() {
            "/stream" => {
                let (tx, rx) = mpsc::channel(1);
                tokio::spawn(async move {
                    for i in 0..5 {
                        if tx.send(Bytes::from(format!("chunk {i}\n"))).await.is_err() {
                            return;
                        }
                        if i < 4 {
                            tokio::time::sleep(CHUNK_GAP).await;
                        }
                    }
                });
                streaming(rx)
            }
            "/slow" => {
                let dropped = OnDrop(Arc::clone(&self.slow_dropped));
                tokio::time::sleep(Duration::from_mins(1)).await;
                std::mem::forget(dropped);
                ApiResponse::full(StatusCode::OK, "application/json", "{}")
            }
            "/endless" => {
                let (tx, rx) = mpsc::channel(1);
                let closed = Arc::clone(&self.sender_closed);
                tokio::spawn(async move {
                    for i in 0..1500 {
                        if tx.send(Bytes::from(format!("tick {i}\n"))).await.is_err() {
                            closed.notify_one();
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
                streaming(rx)
            }
            _ => {
                let body = serde_json::json!({
                    "tenant": tenant.unwrap_or_else(|e| format!("none: {e}")),
                    "protocol": format!("{:?}", request.peer.protocol),
                    "body_bytes": request.body.len(),
                });
                ApiResponse::full(StatusCode::OK, "application/json", body.to_string())
            }
        }
    }
}

// ---------------------------------------------------------------- the fixture

struct Fixture {
    dir: PathBuf,
    pki: DevPki,
    handler: Arc<TestHandler>,
    tcp: SocketAddr,
    quic: SocketAddr,
    quic_counters: Arc<QuicCounters>,
    shutdown: Shutdown,
    tcp_task: JoinHandle<()>,
    quic_task: JoinHandle<()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

async fn start(limits: TransportLimits) -> Fixture {
    start_with(limits, None, ConnectionIds::default()).await
}

/// [`start`] with kernel flows, and connection ids and reset tokens as `ids` says.
async fn start_with(
    limits: TransportLimits,
    flows: Option<Arc<dyn FlowRegistry>>,
    ids: ConnectionIds,
) -> Fixture {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "bulkhead-transport-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let domain = TrustDomain::new(DOMAIN).unwrap();
    let pki = certs::generate(&domain, &[tenant("acme"), tenant("globex")]).unwrap();
    pki.write_to(&dir, false).unwrap();
    let tls = ServerTls::from_paths(&TlsPaths {
        cert: dir.join(certs::SERVER_CERT_FILE),
        key: dir.join(certs::SERVER_KEY_FILE),
        client_ca: vec![dir.join(certs::TENANT_CA_FILE)],
    })
    .unwrap();
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let connections = TenantConnections::new(limits.max_connections_per_tenant);
    let quic = QuicServer::bind_with_ids(any_port, tls.quic, domain.clone(), limits, ids)
        .unwrap()
        .with_connections(Arc::clone(&connections));
    let quic_addr = quic.local_addr().unwrap();
    let tcp = TcpServer::bind(any_port, tls.tcp, domain, limits)
        .await
        .unwrap()
        .with_alt_svc(quic_addr.port())
        .with_connections(connections);
    let (quic, tcp) = match flows {
        Some(f) => (quic.with_flows(Arc::clone(&f)), tcp.with_flows(f)),
        None => (quic, tcp),
    };
    let tcp_addr = tcp.local_addr().unwrap();
    let handler = Arc::new(TestHandler::default());
    let shutdown = Shutdown::new();
    let quic_counters = quic.counters();
    let tcp_task = tokio::spawn(tcp.serve(Arc::clone(&handler), shutdown.signal()));
    let quic_task = tokio::spawn(quic.serve(Arc::clone(&handler), shutdown.signal()));
    Fixture {
        dir,
        pki,
        handler,
        tcp: tcp_addr,
        quic: quic_addr,
        quic_counters,
        shutdown,
        tcp_task,
        quic_task,
    }
}

fn limits() -> TransportLimits {
    TransportLimits {
        shutdown_grace: Duration::from_secs(5),
        ..TransportLimits::default()
    }
}

// ---------------------------------------------------------------- TLS clients

/// Who the client claims to be.
#[derive(Clone, Copy, Debug)]
enum Identity<'a> {
    Tenant(&'a str),
    Untrusted,
    Anonymous,
}

fn client_tls(fx: &Fixture, identity: Identity<'_>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(fx.pki.server_ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let pair: Option<&CertAndKey> = match identity {
        Identity::Tenant(name) => Some(fx.pki.client(&tenant(name)).unwrap()),
        Identity::Untrusted => Some(&fx.pki.untrusted_client),
        Identity::Anonymous => None,
    };
    let mut config = match pair {
        Some(pair) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

async fn tls_connect(
    fx: &Fixture,
    identity: Identity<'_>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(fx.tcp).await?;
    tokio_rustls::TlsConnector::from(Arc::new(client_tls(fx, identity, alpn)))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

// ---------------------------------------------------------------- HTTP/1.1 and h2

/// A request body of given chunks; `sized` says whether its length is declared.
struct TestBody {
    chunks: VecDeque<Bytes>,
    sized: bool,
}

impl TestBody {
    fn sized(bytes: impl Into<Bytes>) -> Self {
        Self {
            chunks: VecDeque::from([bytes.into()]),
            sized: true,
        }
    }

    /// `len` bytes in 64 KiB chunks with no declared length.
    fn unsized_zeros(len: usize) -> Self {
        let chunk = Bytes::from(vec![0u8; 64 * 1024]);
        let mut chunks: VecDeque<Bytes> = (0..len / chunk.len()).map(|_| chunk.clone()).collect();
        chunks.push_back(chunk.slice(..len % chunk.len()));
        Self {
            chunks,
            sized: false,
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.get_mut()
                .chunks
                .pop_front()
                .map(|c| Ok(Frame::data(c))),
        )
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tcp {
    H1,
    H2,
}

enum TcpClient {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

impl TcpClient {
    async fn connect(fx: &Fixture, identity: Identity<'_>, version: Tcp) -> anyhow::Result<Self> {
        Ok(Self::connect_held(fx, identity, version).await?.0)
    }

    /// Also hands back the task that drives the connection: aborting it
    /// closes the connection.
    async fn connect_held(
        fx: &Fixture,
        identity: Identity<'_>,
        version: Tcp,
    ) -> anyhow::Result<(Self, JoinHandle<()>)> {
        let alpn: &[&[u8]] = match version {
            Tcp::H1 => &[b"http/1.1"],
            Tcp::H2 => &[b"h2"],
        };
        let io = TokioIo::new(tls_connect(fx, identity, alpn).await?);
        Ok(match version {
            Tcp::H1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
                let driver = tokio::spawn(async move { drop(conn.await) });
                (Self::H1(send), driver)
            }
            Tcp::H2 => {
                let (send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                let driver = tokio::spawn(async move { drop(conn.await) });
                (Self::H2(send), driver)
            }
        })
    }

    async fn send(
        &mut self,
        fx: &Fixture,
        path: &str,
        body: TestBody,
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        let request = Request::post(format!("https://localhost:{}{path}", fx.tcp.port()))
            .header(http::header::HOST, format!("localhost:{}", fx.tcp.port()))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap();
        match self {
            Self::H1(send) => {
                send.ready().await?;
                send.send_request(request).await
            }
            Self::H2(send) => {
                send.ready().await?;
                send.send_request(request).await
            }
        }
    }
}

/// Reads a whole body, noting when each frame arrived.
async fn frames<B>(mut body: B) -> Vec<(Instant, Bytes)>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            out.push((Instant::now(), data));
        }
    }
    out
}

// ---------------------------------------------------------------- HTTP/3

struct H3Client {
    /// Held so the client endpoint outlives the test's use of it.
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
}

impl H3Client {
    async fn connect(fx: &Fixture, identity: Identity<'_>) -> anyhow::Result<Self> {
        let (endpoint, conn) = quic_connect(fx, identity).await?;
        Self::over(endpoint, conn?).await
    }

    async fn over(endpoint: quinn::Endpoint, conn: quinn::Connection) -> anyhow::Result<Self> {
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
        tokio::spawn(async move { driver.wait_idle().await });
        Ok(Self {
            _endpoint: endpoint,
            conn,
            send,
        })
    }

    /// Sends a request; the body goes in one DATA frame, with no content-length.
    async fn request(
        &mut self,
        fx: &Fixture,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(
        http::Response<()>,
        h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
    )> {
        let request = Request::post(format!("https://localhost:{}{path}", fx.quic.port()))
            .body(())
            .unwrap();
        let mut stream = self.send.send_request(request).await?;
        // The server may stop reading an oversize body and answer at once.
        let sent = async {
            stream.send_data(body).await?;
            stream.finish().await
        }
        .await;
        let response = stream.recv_response().await?;
        if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
            sent?;
        }
        Ok((response, stream))
    }
}

/// A QUIC connection (ALPN h3) to the fixture, and the endpoint it lives on.
async fn quic_connect(
    fx: &Fixture,
    identity: Identity<'_>,
) -> anyhow::Result<(
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
)> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(fx, identity, &QUIC_ALPN))?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint.connect(fx.quic, "localhost")?.await;
    Ok((endpoint, conn))
}

async fn h3_frames(
    stream: &mut h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
) -> Vec<(Instant, Bytes)> {
    let mut out = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        out.push((Instant::now(), chunk.copy_to_bytes(chunk.remaining())));
    }
    out
}

// ---------------------------------------------------------------- checks

fn concat(frames: &[(Instant, Bytes)]) -> String {
    frames
        .iter()
        .map(|(_, b)| std::str::from_utf8(b).unwrap())
        .collect()
}

/// The stream's text is whole, and its first and last chunks arrived at
/// least most of four gaps apart: it was not buffered until the end.
fn assert_streamed(frames: &[(Instant, Bytes)], what: &str) {
    assert_eq!(concat(frames), STREAM_BODY, "{what}");
    let first = frames
        .iter()
        .find(|(_, b)| b.starts_with(b"chunk 0"))
        .unwrap()
        .0;
    let last = frames.last().unwrap().0;
    let spread = last - first;
    assert!(
        spread >= CHUNK_GAP * 3,
        "{what}: chunks arrived within {spread:?}, as if buffered ({} frames)",
        frames.len()
    );
}

fn echo(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

fn assert_too_large(status: StatusCode, body: &[u8], what: &str) {
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{what}");
    let json = echo(body);
    assert_eq!(
        json["error"]["type"], "invalid_request_error",
        "{what}: {json}"
    );
    assert_eq!(json["error"]["code"], "request_too_large", "{what}: {json}");
    assert!(json["error"]["param"].is_null(), "{what}: {json}");
    assert!(json["error"]["message"].is_string(), "{what}: {json}");
}

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {PATIENCE:?}"))
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn a_tenant_certificate_reaches_the_handler_over_h1_h2_and_h3() {
    let fx = start(limits()).await;
    let alt_svc = format!("h3=\":{}\"; ma=86400", fx.quic.port());
    for version in [Tcp::H1, Tcp::H2] {
        let mut client = TcpClient::connect(&fx, Identity::Tenant("acme"), version)
            .await
            .unwrap();
        let response = client
            .send(&fx, "/echo", TestBody::sized(r#"{"x":1}"#))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{version:?}");
        assert_eq!(
            response.headers()[http::header::ALT_SVC],
            alt_svc.as_str(),
            "{version:?}"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json = echo(&body);
        assert_eq!(json["tenant"], "acme", "{version:?}");
        assert_eq!(json["body_bytes"], 7, "{version:?}");
    }
    let mut h3 = H3Client::connect(&fx, Identity::Tenant("globex"))
        .await
        .unwrap();
    let (response, mut stream) = h3
        .request(&fx, "/echo", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let json = echo(concat(&h3_frames(&mut stream).await).as_bytes());
    assert_eq!(json["tenant"], "globex");
    assert_eq!(json["protocol"], "Http3");

    let seen = fx.handler.seen();
    let expect = |tenant: &str, protocol| Seen {
        tenant: Ok(tenant.to_owned()),
        protocol,
        path: "/echo".to_owned(),
    };
    assert_eq!(
        seen,
        vec![
            expect("acme", Protocol::Http1),
            expect("acme", Protocol::Http2),
            expect("globex", Protocol::Http3),
        ]
    );
}

#[tokio::test]
async fn streamed_responses_arrive_chunk_by_chunk() {
    let fx = start(limits()).await;
    for version in [Tcp::H1, Tcp::H2] {
        let mut client = TcpClient::connect(&fx, Identity::Tenant("acme"), version)
            .await
            .unwrap();
        let response = client
            .send(&fx, "/stream", TestBody::sized("{}"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .is_none()
        );
        assert_streamed(&frames(response.into_body()).await, &format!("{version:?}"));
    }
    let mut h3 = H3Client::connect(&fx, Identity::Tenant("acme"))
        .await
        .unwrap();
    let (response, mut stream) = h3
        .request(&fx, "/stream", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[http::header::CONTENT_TYPE],
        "text/event-stream"
    );
    assert_streamed(&h3_frames(&mut stream).await, "h3");
}

/// Reads from a TLS stream whose handshake the server should refuse: the
/// client finishes first in TLS 1.3, so the refusal arrives as an alert.
async fn refused_alert(fx: &Fixture, identity: Identity<'_>) -> String {
    match tls_connect(fx, identity, &TCP_ALPN).await {
        Err(e) => format!("{e:?}"),
        Ok(mut stream) => {
            let mut buf = [0u8; 64];
            let read = within("refusal", stream.read(&mut buf)).await;
            match read {
                Ok(n) => panic!("{identity:?}: the server sent {n} bytes instead of refusing"),
                Err(e) => format!("{e:?}"),
            }
        }
    }
}

/// Connects over QUIC and reports why the connection ended: the client may
/// finish its side of the handshake before the server refuses it.
async fn quic_refusal(fx: &Fixture, identity: Identity<'_>) -> String {
    let (endpoint, conn) = quic_connect(fx, identity).await.unwrap();
    let conn = match conn {
        Err(refused) => return format!("{refused:?}"),
        Ok(conn) => conn,
    };
    let answered = async {
        let mut client = H3Client::over(endpoint.clone(), conn.clone()).await?;
        client.request(fx, "/echo", Bytes::from_static(b"{}")).await
    }
    .await;
    assert!(answered.is_err(), "{identity:?}: a request was answered");
    let closed = within("QUIC refusal", conn.closed()).await;
    endpoint.close(0u32.into(), b"");
    format!("{closed:?}")
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let fx = start(limits()).await;
    let tcp = refused_alert(&fx, Identity::Anonymous).await;
    assert!(tcp.contains("CertificateRequired"), "TCP: {tcp}");
    let quic = quic_refusal(&fx, Identity::Anonymous).await;
    // TLS alert 116 (0x74, certificate_required) as a QUIC CRYPTO_ERROR.
    assert!(quic.contains("Code::crypto(74)"), "QUIC: {quic}");
    assert!(fx.handler.seen().is_empty());
    assert!(fx.quic_counters.handshakes_failed.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let fx = start(limits()).await;
    let tcp = refused_alert(&fx, Identity::Untrusted).await;
    assert!(tcp.contains("UnknownCA"), "TCP: {tcp}");
    let quic = quic_refusal(&fx, Identity::Untrusted).await;
    // TLS alert 48 (0x30, unknown_ca) as a QUIC CRYPTO_ERROR.
    assert!(quic.contains("Code::crypto(30)"), "QUIC: {quic}");
    assert!(fx.handler.seen().is_empty());
}

#[tokio::test]
async fn tls_1_2_is_refused_even_with_a_tenant_certificate() {
    let fx = start(limits()).await;
    let pair = fx.pki.client(&tenant("acme")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(fx.pki.server_ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(fx.tcp).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap_err();
    assert!(
        format!("{refused:?}").contains("ProtocolVersion"),
        "{refused:?}"
    );
    assert!(fx.handler.seen().is_empty());
}

#[tokio::test]
async fn an_oversize_body_gets_413_with_an_openai_error() {
    let fx = start(limits()).await;
    let over = bulkhead::front::MAX_BODY_BYTES + 1;
    // HTTP/1.1 with a declared length, h2 without one (read until the limit).
    for (version, body) in [
        (Tcp::H1, TestBody::sized(vec![b' '; over])),
        (Tcp::H2, TestBody::unsized_zeros(over)),
    ] {
        let mut client = TcpClient::connect(&fx, Identity::Tenant("acme"), version)
            .await
            .unwrap();
        let response = client.send(&fx, "/echo", body).await.unwrap();
        let status = response.status();
        assert!(response.headers().contains_key(http::header::ALT_SVC));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_too_large(status, &body, &format!("{version:?}"));
    }
    let mut h3 = H3Client::connect(&fx, Identity::Tenant("acme"))
        .await
        .unwrap();
    let (response, mut stream) = h3
        .request(&fx, "/echo", Bytes::from(vec![0u8; over]))
        .await
        .unwrap();
    let body = concat(&h3_frames(&mut stream).await);
    assert_too_large(response.status(), body.as_bytes(), "h3");
    // A body of exactly the limit is read whole.
    let (response, mut stream) = h3
        .request(&fx, "/echo", Bytes::from(vec![b' '; over - 1]))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        echo(concat(&h3_frames(&mut stream).await).as_bytes())["body_bytes"],
        over - 1
    );
    assert_eq!(fx.handler.seen().len(), 1);
}

#[tokio::test]
async fn a_client_leaving_a_stream_closes_the_handlers_channel() {
    let fx = start(limits()).await;
    for version in [Tcp::H1, Tcp::H2] {
        let mut client = TcpClient::connect(&fx, Identity::Tenant("acme"), version)
            .await
            .unwrap();
        let response = client
            .send(&fx, "/endless", TestBody::sized("{}"))
            .await
            .unwrap();
        let mut body = response.into_body();
        within("first tick", body.frame()).await.unwrap().unwrap();
        let closed = fx.handler.sender_closed.notified();
        drop(body);
        within(&format!("{version:?}: sender sees the client gone"), closed).await;
    }
    // HTTP/3: the client stops reading one stream (STOP_SENDING) ...
    let mut h3 = H3Client::connect(&fx, Identity::Tenant("acme"))
        .await
        .unwrap();
    let (_, mut stream) = h3
        .request(&fx, "/endless", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    within("first tick", stream.recv_data())
        .await
        .unwrap()
        .unwrap();
    let closed = fx.handler.sender_closed.notified();
    drop(stream);
    within("h3 stream stopped: sender sees it", closed).await;
    // ... or closes the whole connection.
    let (_, mut stream) = h3
        .request(&fx, "/endless", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    within("first tick", stream.recv_data())
        .await
        .unwrap()
        .unwrap();
    let closed = fx.handler.sender_closed.notified();
    h3.conn.close(0u32.into(), b"bye");
    within("h3 connection closed: sender sees it", closed).await;
}

/// A client that closes its connection while its whole answer is being
/// computed: the handler is dropped (which cancels the request) rather than
/// left to finish an answer nobody reads.
#[tokio::test]
async fn a_client_gone_before_a_whole_answer_drops_its_handler() {
    let fx = start(limits()).await;
    let h3 = H3Client::connect(&fx, Identity::Tenant("acme"))
        .await
        .unwrap();
    let mut send = h3.send.clone();
    let mut stream = send
        .send_request(
            http::Request::post(format!("https://localhost:{}/slow", fx.quic.port()))
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    stream.finish().await.unwrap();
    let dropped = fx.handler.slow_dropped.notified();
    // Once the handler has it, the client goes away.
    within("the handler sees the request", async {
        while !fx.handler.seen().iter().any(|s| s.path == "/slow") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    h3.conn.close(0u32.into(), b"bye");
    within("h3 connection closed: the handler is dropped", dropped).await;
}

/// The same over TLS/TCP: a client that closes its connection (HTTP/1.1,
/// h2) or resets its stream (h2) while its whole answer is being computed.
#[tokio::test]
async fn a_tcp_client_gone_before_a_whole_answer_drops_its_handler() {
    let fx = start(limits()).await;
    let slow_seen = || {
        fx.handler
            .seen()
            .iter()
            .filter(|s| s.path == "/slow")
            .count()
    };
    for (version, close_connection) in [(Tcp::H1, true), (Tcp::H2, true), (Tcp::H2, false)] {
        let case = format!("{version:?}, closing the connection: {close_connection}");
        let (mut client, driver) = TcpClient::connect_held(&fx, Identity::Tenant("acme"), version)
            .await
            .unwrap();
        let before = slow_seen();
        let dropped = fx.handler.slow_dropped.notified();
        let fx_tcp = fx.tcp;
        let request = tokio::spawn(async move {
            let request = Request::post(format!("https://localhost:{}/slow", fx_tcp.port()))
                .header(http::header::HOST, format!("localhost:{}", fx_tcp.port()))
                .body(TestBody::sized("{}"))
                .unwrap();
            match &mut client {
                TcpClient::H1(send) => drop(send.send_request(request).await),
                TcpClient::H2(send) => drop(send.send_request(request).await),
            }
        });
        within(&format!("{case}: the handler sees the request"), async {
            while slow_seen() == before {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        // Dropping the response future resets the h2 stream; aborting the
        // driver drops the connection.
        request.abort();
        if close_connection {
            driver.abort();
        }
        within(&format!("{case}: the handler is dropped"), dropped).await;
        driver.abort();
    }
}

/// Per datagram from a client: its source and its first packet's DCID.
type Sightings = Vec<(SocketAddr, Vec<u8>)>;

/// The destination connection ids a client sends, seen by a UDP relay
/// between it and the server, as a load balancer would see them.
struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Sightings>>,
    /// Where the client's datagrams go.
    server: Arc<Mutex<SocketAddr>>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Relays between clients and `server`; short-header ids are `cid_len` long.
    async fn start(server: SocketAddr, cid_len: usize) -> Self {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let server = Arc::new(Mutex::new(server));
        let target = Arc::clone(&server);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            let mut client = None;
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let packet = &buf[..n];
                let server = *target.lock().unwrap();
                if from == server {
                    if let Some(to) = client {
                        let _ = socket.send_to(packet, to).await;
                    }
                    continue;
                }
                client = Some(from);
                // Long header: flags, version (4), DCID length, DCID. Short: flags, DCID.
                let dcid = if packet[0] & 0x80 != 0 {
                    packet.get(6..6 + usize::from(packet[5]))
                } else {
                    packet.get(1..=cid_len)
                };
                log.lock()
                    .unwrap()
                    .push((from, dcid.unwrap_or_default().to_vec()));
                let _ = socket.send_to(packet, server).await;
            }
        });
        Self {
            addr,
            seen,
            server,
            task,
        }
    }

    /// Sends the client's datagrams to `server` from now on.
    fn redirect(&self, server: SocketAddr) {
        *self.server.lock().unwrap() = server;
    }

    fn seen(&self) -> Sightings {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection of tenant acme to `fx`'s QUIC listener through `relay`.
async fn connect_through(fx: &Fixture, relay: &Relay) -> (quinn::Endpoint, quinn::Connection) {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(
        fx,
        Identity::Tenant("acme"),
        &QUIC_ALPN,
    ))
    .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = within("handshake through the relay", async {
        endpoint.connect(relay.addr, "localhost").unwrap().await
    })
    .await
    .unwrap();
    (endpoint, conn)
}

/// Connects through `relay`, moves the client to a new address, and
/// returns every destination id the client sent after its first (which it
/// chose itself), and how many client addresses were seen.
async fn ids_through(fx: &Fixture, relay: &Relay) -> (Vec<Vec<u8>>, usize) {
    let (endpoint, conn) = connect_through(fx, relay).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    // NAT rebinding: the same connection from another address and port.
    endpoint
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    // Traffic on the new path: a stream the server's HTTP/3 reads as a request.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(b"\x01\x00").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    conn.close(0u32.into(), b"done");
    let seen = relay.seen();
    let first = seen[0].1.clone();
    let addresses: std::collections::HashSet<_> = seen.iter().map(|(from, _)| *from).collect();
    let ids = seen
        .into_iter()
        .map(|(_, id)| id)
        .filter(|id| *id != first)
        .collect();
    (ids, addresses.len())
}

/// With `[cluster.quic_lb]`, every connection id the server hands out
/// carries its server id, so a balancer can route a connection's packets by
/// id alone, after the client's address changes too. Without, it cannot.
#[tokio::test]
async fn quic_lb_ids_route_every_packet_after_the_first_even_from_a_new_address() {
    let lb = Arc::new(LbConfig::new(2, &[0xbe, 0xef], 8, Some([7; 16])).unwrap());
    let ids = ConnectionIds {
        lb: Some(Arc::clone(&lb)),
        reset_key: None,
    };
    let fx = start_with(limits(), None, ids).await;
    let relay = Relay::start(fx.quic, lb.cid_len()).await;
    let (ids, addresses) = ids_through(&fx, &relay).await;
    assert_eq!(addresses, 2, "the client moved");
    assert!(ids.len() >= 4, "{ids:?}");
    for id in &ids {
        assert_eq!(lb.server_id_of(id), Some(vec![0xbe, 0xef]), "{id:02x?}");
    }
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert!(
        distinct.len() >= 2,
        "a new id on the new path: {distinct:02x?}"
    );

    // The same client against a server with random ids: the balancer can't.
    let plain = start(limits()).await;
    let relay = Relay::start(plain.quic, lb.cid_len()).await;
    let (ids, _) = ids_through(&plain, &relay).await;
    assert!(
        ids.iter()
            .any(|id| lb.server_id_of(id) != Some(vec![0xbe, 0xef])),
        "random ids decoded as ours: {ids:02x?}"
    );
}

/// A host restarted with the same `quic_reset_key_file` resets the
/// connections of the process before it: their clients close at once
/// instead of waiting out their idle timeout. Under a new key they cannot.
#[tokio::test]
async fn a_lasting_reset_key_resets_a_restarted_hosts_old_connections_at_once() {
    let key = |byte| ConnectionIds {
        lb: None,
        reset_key: Some(Arc::new(ResetKey::from_bytes(&[byte; 32]))),
    };
    for (restart_key, reset_expected) in [(1, true), (2, false)] {
        let before = start_with(limits(), None, key(1)).await;
        let relay = Relay::start(before.quic, 8).await;
        let (_endpoint, conn) = connect_through(&before, &relay).await;
        // The host restarts: a process with no state, behind the same address.
        let after = start_with(limits(), None, key(restart_key)).await;
        relay.redirect(after.quic);
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(b"\x01\x00").await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        if reset_expected {
            assert!(
                matches!(closed, Ok(quinn::ConnectionError::Reset)),
                "{closed:?}"
            );
        } else {
            assert!(closed.is_err(), "closed without a valid reset: {closed:?}");
        }
        drop(before);
    }
}

#[tokio::test]
async fn connections_over_the_tenants_limit_get_429() {
    let fx = start(TransportLimits {
        max_connections_per_tenant: 1,
        ..limits()
    })
    .await;
    let mut first = TcpClient::connect(&fx, Identity::Tenant("acme"), Tcp::H2)
        .await
        .unwrap();
    let ok = first
        .send(&fx, "/echo", TestBody::sized("{}"))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    drop(ok);

    let mut second = TcpClient::connect(&fx, Identity::Tenant("acme"), Tcp::H1)
        .await
        .unwrap();
    let refused = second
        .send(&fx, "/echo", TestBody::sized("{}"))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echo(&body)["error"]["code"], "too_many_connections");
    // The count is shared with the QUIC listener.
    let mut h3 = H3Client::connect(&fx, Identity::Tenant("acme"))
        .await
        .unwrap();
    let (refused, _) = h3
        .request(&fx, "/echo", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another tenant is not affected.
    let mut other = TcpClient::connect(&fx, Identity::Tenant("globex"), Tcp::H2)
        .await
        .unwrap();
    let ok = other
        .send(&fx, "/echo", TestBody::sized("{}"))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    // Closing the first connection frees the tenant's slot.
    drop(first);
    within("slot freed", async {
        loop {
            let mut again = TcpClient::connect(&fx, Identity::Tenant("acme"), Tcp::H2)
                .await
                .unwrap();
            let response = again
                .send(&fx, "/echo", TestBody::sized("{}"))
                .await
                .unwrap();
            if response.status() == StatusCode::OK {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Only the admitted requests reached the handler.
    assert_eq!(fx.handler.seen().len(), 3);
}

#[tokio::test]
async fn a_busy_quic_listener_validates_addresses_with_retry() {
    let fx = start(TransportLimits {
        quic_retry_threshold: 0,
        ..limits()
    })
    .await;
    let mut h3 = H3Client::connect(&fx, Identity::Tenant("acme"))
        .await
        .unwrap();
    let (response, _) = h3
        .request(&fx, "/echo", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fx.quic_counters.retries.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn shutdown_lets_streams_in_flight_finish() {
    let mut fx = start(limits()).await;
    let mut tcp = TcpClient::connect(&fx, Identity::Tenant("acme"), Tcp::H2)
        .await
        .unwrap();
    let response = tcp
        .send(&fx, "/stream", TestBody::sized("{}"))
        .await
        .unwrap();
    let mut h3 = H3Client::connect(&fx, Identity::Tenant("acme"))
        .await
        .unwrap();
    let (_, mut stream) = h3
        .request(&fx, "/stream", Bytes::from_static(b"{}"))
        .await
        .unwrap();

    fx.shutdown.trigger();
    assert_eq!(concat(&frames(response.into_body()).await), STREAM_BODY);
    assert_eq!(concat(&h3_frames(&mut stream).await), STREAM_BODY);
    within("TCP listener stops", &mut fx.tcp_task)
        .await
        .unwrap();
    within("QUIC listener stops", &mut fx.quic_task)
        .await
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(fx.tcp).await.is_err(),
        "the TCP listener still accepts after shutdown"
    );
}

// ---------------------------------------------------------------- Python's aioquic

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn venv_python() -> PathBuf {
    let python = workspace_root().join("target/pyenv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup` (it makes the venv of the Python test clients)",
        python.display()
    );
    python
}

/// Runs `proxy/tests/py/h3_client.py` and returns its exit status and JSON lines.
async fn python_h3(
    fx: &Fixture,
    path: &str,
    cert: &str,
    key: &str,
    extra: &[&str],
) -> (i32, Vec<serde_json::Value>) {
    let output = within(
        "h3_client.py",
        tokio::process::Command::new(venv_python())
            .arg(workspace_root().join("proxy/tests/py/h3_client.py"))
            .arg("--url")
            .arg(format!("https://127.0.0.1:{}{path}", fx.quic.port()))
            .arg("--ca")
            .arg(fx.dir.join(certs::SERVER_CA_FILE))
            .arg("--cert")
            .arg(fx.dir.join(cert))
            .arg("--key")
            .arg(fx.dir.join(key))
            .arg("--data")
            .arg(r#"{"model":"test","stream":true}"#)
            .args(extra)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let status = output.status.code().unwrap_or(-1);
    if status != 0 {
        eprintln!(
            "h3_client.py stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (status, lines)
}

#[tokio::test]
async fn aioquic_streams_a_response_over_http3() {
    let fx = start(limits()).await;
    let acme = tenant("acme");
    let (status, lines) = python_h3(
        &fx,
        "/stream",
        &certs::client_cert_file(&acme),
        &certs::client_key_file(&acme),
        &[],
    )
    .await;
    assert_eq!(status, 0, "{lines:?}");
    assert_eq!(lines[0]["status"], 200, "{lines:?}");
    let chunks: Vec<(f64, &str)> = lines
        .iter()
        .filter_map(|l| Some((l["t"].as_f64()?, l["chunk"].as_str()?)))
        .collect();
    assert_eq!(
        chunks.iter().map(|(_, c)| *c).collect::<String>(),
        STREAM_BODY
    );
    let spread = chunks.last().unwrap().0 - chunks[0].0;
    assert!(
        spread >= (CHUNK_GAP * 3).as_secs_f64(),
        "buffered: {lines:?}"
    );
    assert_eq!(lines.last().unwrap()["end"], true);
    assert_eq!(
        fx.handler.seen(),
        vec![Seen {
            tenant: Ok("acme".to_owned()),
            protocol: Protocol::Http3,
            path: "/stream".to_owned(),
        }]
    );

    let (status, lines) = python_h3(
        &fx,
        "/stream",
        certs::UNTRUSTED_CLIENT_CERT_FILE,
        certs::UNTRUSTED_CLIENT_KEY_FILE,
        &[],
    )
    .await;
    assert_eq!(status, 1, "{lines:?}");
    assert!(lines.last().unwrap()["error"].is_string(), "{lines:?}");
    assert_eq!(fx.handler.seen().len(), 1);

    // A foreign client cancelling its stream closes the handler's channel too.
    let closed = fx.handler.sender_closed.notified();
    let (status, lines) = python_h3(
        &fx,
        "/endless",
        &certs::client_cert_file(&acme),
        &certs::client_key_file(&acme),
        &["--cancel-after", "2"],
    )
    .await;
    assert_eq!(status, 0, "{lines:?}");
    assert_eq!(lines.last().unwrap()["cancelled"], 2, "{lines:?}");
    within("aioquic cancelled: sender sees it", closed).await;
}

// ---------------------------------------------------------------- kernel flow registration

/// What the transports told the flow registry, in order.
#[derive(Debug, Default)]
struct RecordedFlows(std::sync::Mutex<Vec<String>>);

impl RecordedFlows {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl FlowRegistry for RecordedFlows {
    fn register(&self, tenant: &TenantId, remote: SocketAddr, transport: FlowTransport) {
        self.0
            .lock()
            .unwrap()
            .push(format!("register {tenant} {remote} {transport:?}"));
    }
    fn migrate(&self, tenant: &TenantId, old: SocketAddr, new: SocketAddr) {
        self.0
            .lock()
            .unwrap()
            .push(format!("migrate {tenant} {old} {new}"));
    }
    fn unregister(&self, remote: SocketAddr, transport: FlowTransport) {
        self.0
            .lock()
            .unwrap()
            .push(format!("unregister {remote} {transport:?}"));
    }
}

async fn until_recorded(flows: &RecordedFlows, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    within("flow events", async {
        while seen.len() < n {
            seen.extend(flows.take());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_register_follow_and_unregister_their_flows() {
    let flows = Arc::new(RecordedFlows::default());
    let fx = start_with(
        limits(),
        Some(flows.clone() as Arc<dyn FlowRegistry>),
        ConnectionIds::default(),
    )
    .await;

    // TCP: registered after the handshake under the certificate's tenant, removed on close.
    let tls = tls_connect(&fx, Identity::Tenant("acme"), &[b"h2"])
        .await
        .unwrap();
    let local = tls.get_ref().0.local_addr().unwrap();
    assert_eq!(
        until_recorded(&flows, 1).await,
        [format!("register acme {local} Tcp")]
    );
    drop(tls);
    assert_eq!(
        until_recorded(&flows, 1).await,
        [format!("unregister {local} Tcp")]
    );

    // A refused handshake registers nothing.
    let _ = tls_connect(&fx, Identity::Untrusted, &[b"h2"]).await;

    // QUIC: registered, followed when the client's address changes, removed on close.
    let (endpoint, conn) = quic_connect(&fx, Identity::Tenant("globex")).await.unwrap();
    let conn = conn.unwrap();
    let first = endpoint.local_addr().unwrap();
    assert_eq!(
        until_recorded(&flows, 1).await,
        [format!("register globex {first} Udp")]
    );
    endpoint
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let second = endpoint.local_addr().unwrap();
    assert_ne!(first, second);
    // Traffic on the new path: the server sees the new address.
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .unwrap();
    let drive = tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    let request = http::Request::get("https://localhost/echo")
        .body(())
        .unwrap();
    let mut stream = send.send_request(request).await.unwrap();
    stream.finish().await.unwrap();
    let _ = stream.recv_response().await.unwrap();
    assert_eq!(
        until_recorded(&flows, 1).await,
        [format!("migrate globex {first} {second}")]
    );
    conn.close(0u32.into(), b"done");
    drop(send);
    drive.abort();
    assert_eq!(
        until_recorded(&flows, 1).await,
        [format!("unregister {second} Udp")]
    );
    assert!(flows.take().is_empty());
}
