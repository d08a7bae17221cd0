//! `bulkhead bench`: the commands that measure issue 5's performance and
//! fairness goals.
//!
//! Goals are reported as ratios or numbers against a baseline measured in
//! the same run (never in timed unit tests): [`fairness`] compares one
//! tenant's time to first token alone, beside a saturating tenant under the
//! fair queue, and beside it under FIFO; [`proxy`] measures the proxy
//! itself in front of a worker that takes no time.
//!
//! Everything runs on loopback: the real listeners (QUIC and TLS/TCP with
//! mutual TLS and a development PKI per run), the real API and dispatcher,
//! and `sim` worker processes, which are killed when the run ends
//! (`kill_on_drop`); temporary directories are removed.

mod cpu;
pub mod fairness;
mod h3_wire;
pub mod load;
pub mod proxy;
pub mod seed;

use crate::{
    api::{App, metrics::Metrics},
    certs::{self, DevPki},
    dispatch::{Dispatcher, QueuePolicy, TenantSlot, WorkerSpec},
    tls::{QUIC_ALPN, ServerTls},
    transport::{QuicServer, Shutdown, TcpServer, TenantConnections, TransportLimits},
};
use anyhow::Context as _;
use bulkhead_core::{TenantId, config::Config, identity::TrustDomain};
use bytes::{Buf as _, Bytes};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::task::JoinHandle;

/// The trust domain of the benches' development PKI.
const DOMAIN: &str = "bench.bulkhead.test";
/// The model name the workers answer to.
const MODEL: &str = "tiny";

/// A directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "bulkhead-bench-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The tenant id `name` (a constant of the benches).
pub(crate) fn tenant(name: &str) -> TenantId {
    TenantId::new(name).expect("the benches' tenant names are valid")
}

/// What the front door of a bench runs with.
pub(crate) struct FrontOptions<'a> {
    /// Tenants, each with generous limits (the benches measure scheduling,
    /// not admission).
    pub tenants: &'a [&'a str],
    /// `bulkhead worker` arguments of the one worker (after `--listen`, `--worker-id`).
    pub worker_args: Vec<String>,
    /// The worker's KV pool in blocks (the config's `pool_blocks` and quotas).
    pub blocks: u32,
    /// Most requests a tenant may have queued.
    pub max_queued: u32,
    /// The dispatcher's queue policy.
    pub policy: QueuePolicy,
    /// The `bulkhead` binary for workers; `None` for this process's own.
    pub program: Option<PathBuf>,
}

/// One tenant of a [`FrontSetup`].
#[derive(Clone, Debug)]
pub(crate) struct TenantSetup {
    /// Its id.
    pub name: String,
    /// Its share under contention (the config's `weight`).
    pub weight: u32,
    /// Its request-rate limit, requests per second and burst; `None` for a
    /// limit far above any bench's load.
    pub rate_limit: Option<(f64, u32)>,
    /// Whether it has workers of its own (isolation `process`).
    pub dedicated: bool,
}

impl TenantSetup {
    /// A tenant of weight 1, no rate limit, on the shared workers.
    pub(crate) fn shared(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            weight: 1,
            rate_limit: None,
            dedicated: false,
        }
    }
}

/// One worker process of a [`FrontSetup`].
#[derive(Clone, Debug)]
pub(crate) struct WorkerSetup {
    /// The tenant it serves alone (`--tenants` is added); `None` for the shared pool.
    pub dedicated: Option<String>,
    /// `bulkhead worker` arguments (after `--listen`, `--worker-id`).
    pub args: Vec<String>,
}

/// The general form of [`FrontOptions`]: several workers, and tenants with
/// weights, request-rate limits and dedicated workers.
#[derive(Clone, Debug)]
pub(crate) struct FrontSetup {
    /// The tenants.
    pub tenants: Vec<TenantSetup>,
    /// The worker processes.
    pub workers: Vec<WorkerSetup>,
    /// The config's KV pool in blocks (and every tenant's quota).
    pub blocks: u32,
    /// Most requests a tenant may have queued.
    pub max_queued: u32,
    /// The dispatcher's queue policy.
    pub policy: QueuePolicy,
    /// The `bulkhead` binary for workers; `None` for this process's own.
    pub program: Option<PathBuf>,
}

impl From<FrontOptions<'_>> for FrontSetup {
    fn from(opts: FrontOptions<'_>) -> Self {
        Self {
            tenants: opts
                .tenants
                .iter()
                .map(|t| TenantSetup::shared(t))
                .collect(),
            workers: vec![WorkerSetup {
                dedicated: None,
                args: opts.worker_args,
            }],
            blocks: opts.blocks,
            max_queued: opts.max_queued,
            policy: opts.policy,
            program: opts.program,
        }
    }
}

/// The whole front door over its worker processes, on 127.0.0.1.
pub(crate) struct Front {
    pub dispatcher: Dispatcher,
    pub quic: SocketAddr,
    pub tcp: SocketAddr,
    pub pki: DevPki,
    shutdown: Shutdown,
    tasks: Vec<JoinHandle<()>>,
    /// The audit log every request records into, as under `serve`.
    audit: crate::serve::audit::AuditLog,
    dir: TempDir,
}

impl Front {
    /// Starts a worker, the dispatcher, the API and both listeners.
    pub(crate) async fn start(opts: FrontOptions<'_>) -> anyhow::Result<Self> {
        Self::start_setup(opts.into()).await
    }

    /// Starts the workers of `setup`, the dispatcher, the API and both listeners.
    pub(crate) async fn start_setup(setup: FrontSetup) -> anyhow::Result<Self> {
        let dir = TempDir::new("front")?;
        let domain = TrustDomain::new(DOMAIN)?;
        let ids: Vec<TenantId> = setup.tenants.iter().map(|t| tenant(&t.name)).collect();
        let pki = certs::generate(&domain, &ids)?;
        let pki_dir = dir.path().join("pki");
        pki.write_to(&pki_dir, false)?;
        let config = Config::from_toml_str(&config_toml(&pki_dir, &setup))
            .map_err(|e| anyhow::anyhow!("the bench's config: {e}"))?;
        let tls = ServerTls::from_paths(&config.tls)?;
        let workers: Vec<WorkerSpec> = setup
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let id = u32::try_from(i).unwrap_or(u32::MAX);
                let mut args = w.args.clone();
                if let Some(t) = &w.dedicated {
                    args.extend(["--tenants".to_owned(), t.clone()]);
                }
                WorkerSpec {
                    id,
                    socket: dir.path().join(format!("worker-{id}.sock")),
                    spawn_args: Some(args),
                    dedicated: w.dedicated.as_deref().map(tenant),
                    program: setup.program.clone(),
                }
            })
            .collect();
        let slots: Vec<TenantSlot> = config
            .tenants
            .iter()
            .map(|t| TenantSlot {
                id: t.id.clone(),
                weight: t.weight,
                max_queued: t.max_queued_requests,
                dedicated: t.isolation != bulkhead_core::IsolationLevel::Shared,
            })
            .collect();
        let count = workers.len();
        let dispatcher = Dispatcher::start_with_policy(
            config.scheduler.into(),
            &slots,
            workers,
            Duration::from_millis(200),
            setup.policy,
        );
        anyhow::ensure!(
            dispatcher.wait_ready(Duration::from_mins(1)).await,
            "the bench's {count} worker(s) did not come up within 60 s"
        );
        let limits = TransportLimits {
            max_connections_per_tenant: 1 << 20,
            max_streams_per_connection: 4096,
            handshake_timeout: Duration::from_secs(10),
            quic_retry_threshold: usize::MAX,
            shutdown_grace: Duration::from_secs(1),
        };
        let audit = crate::serve::audit::open(&config.audit)?;
        let app = Arc::new(
            App::new(config, dispatcher.clone(), Arc::new(Metrics::default()))?
                .with_audit(audit.hook.clone()),
        );
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let connections = TenantConnections::new(limits.max_connections_per_tenant);
        let quic = QuicServer::bind(any, tls.quic, domain.clone(), limits)?
            .with_connections(Arc::clone(&connections));
        let quic_addr = quic.local_addr()?;
        let tcp = TcpServer::bind(any, tls.tcp, domain, limits)
            .await?
            .with_connections(connections);
        let tcp_addr = tcp.local_addr()?;
        let shutdown = Shutdown::new();
        let tasks = vec![
            tokio::spawn(quic.serve(Arc::clone(&app), shutdown.signal())),
            tokio::spawn(tcp.serve(app, shutdown.signal())),
        ];
        Ok(Self {
            dispatcher,
            quic: quic_addr,
            tcp: tcp_addr,
            pki,
            shutdown,
            tasks,
            audit,
            dir,
        })
    }

    /// Stops the listeners (the worker goes with the runtime).
    pub(crate) async fn stop(self) {
        self.shutdown.trigger();
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        if let Err(err) = self.audit.close().await {
            tracing::warn!("closing the bench's audit log: {err:#}");
        }
        drop(self.dir);
    }

    /// A client TLS config presenting `tenant`'s certificate, offering `alpn`,
    /// with session resumption off (every handshake is a full one).
    pub(crate) fn client_tls(
        &self,
        tenant_name: &str,
        alpn: &[&[u8]],
    ) -> anyhow::Result<rustls::ClientConfig> {
        let pair = self
            .pki
            .client(&tenant(tenant_name))
            .context("no certificate for the tenant")?;
        let mut config = tenant_tls(
            self.pki.server_ca_pem.as_bytes(),
            pair.cert_pem.as_bytes(),
            pair.key_pem.as_bytes(),
            alpn,
        )?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }

    /// A QUIC client endpoint on 127.0.0.1 whose connections present `tenant`'s certificate.
    pub(crate) fn quic_endpoint(&self, tenant_name: &str) -> anyhow::Result<quinn::Endpoint> {
        quic_client(self.client_tls(tenant_name, &QUIC_ALPN)?, self.quic)
    }
}

/// A TLS 1.3 client config trusting `server_ca_pem` and presenting a
/// tenant's certificate (`cert_pem`, `key_pem`), offering `alpn`.
pub(crate) fn tenant_tls(
    server_ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    alpn: &[&[u8]],
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(server_ca_pem)?)?;
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(cert_pem)?],
            PrivateKeyDer::from_pem_slice(key_pem)?,
        )?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A QUIC client endpoint on the loopback of `server`'s address family,
/// its connections using `tls`.
pub(crate) fn quic_client(
    tls: rustls::ClientConfig,
    server: SocketAddr,
) -> anyhow::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let bind: SocketAddr = if server.is_ipv6() {
        "[::1]:0".parse()?
    } else {
        "127.0.0.1:0".parse()?
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(endpoint)
}

/// The host config of a bench: generous limits for every tenant, but the
/// request rates, weights and isolation `setup` asks for.
fn config_toml(pki: &Path, setup: &FrontSetup) -> String {
    let mut toml = format!(
        r#"
trust_domain = "{DOMAIN}"
[tls]
cert = "{}"
key = "{}"
client_ca = ["{}"]
[kv]
pool_blocks = {blocks}
[audit]
dir = "{audit}/audit"
key_file = "{audit}/audit.key"
[[models]]
name = "{MODEL}"
backend = "sim"
max_context_tokens = 2048
"#,
        pki.join(certs::SERVER_CERT_FILE).display(),
        pki.join(certs::SERVER_KEY_FILE).display(),
        pki.join(certs::TENANT_CA_FILE).display(),
        blocks = setup.blocks,
        audit = pki.parent().unwrap_or(pki).display(),
    );
    for t in &setup.tenants {
        let (rate, burst) = t.rate_limit.unwrap_or((1_000_000.0, 1_000_000));
        let _ = write!(
            toml,
            r#"
[[tenants]]
id = "{name}"
weight = {weight}
allowed_models = ["{MODEL}"]
requests_per_second = {rate:?}
request_burst = {burst}
tokens_per_minute = 1000000000000
max_concurrent_requests = 100000
max_queued_requests = {queued}
kv_block_quota = {blocks}
isolation = "{isolation}"
"#,
            name = t.name,
            weight = t.weight,
            queued = setup.max_queued,
            blocks = setup.blocks,
            isolation = if t.dedicated { "process" } else { "shared" },
        );
    }
    toml
}

/// One HTTP/3 connection as a tenant.
pub(crate) struct H3Client {
    /// Held so the connection's endpoint outlives it.
    _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    port: u16,
}

/// A request stream of [`H3Client`].
pub(crate) type H3Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

impl H3Client {
    /// Connects to `front` as `tenant`.
    pub(crate) async fn connect(front: &Front, tenant_name: &str) -> anyhow::Result<Self> {
        Self::connect_with(front.quic_endpoint(tenant_name)?, front.quic).await
    }

    /// Connects to the QUIC listener at `server` through `endpoint`; its
    /// driver runs on the runtime of the caller.
    pub(crate) async fn connect_with(
        endpoint: quinn::Endpoint,
        server: SocketAddr,
    ) -> anyhow::Result<Self> {
        let conn = endpoint.connect(server, "localhost")?.await?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
        tokio::spawn(async move { driver.wait_idle().await });
        Ok(Self {
            _endpoint: endpoint,
            conn,
            send,
            port: server.port(),
        })
    }

    /// The request of a POST of `body` to `path` (send it with [`post`]).
    pub(crate) fn request(&self, path: &str) -> http::Request<()> {
        http::Request::post(format!("https://localhost:{}{path}", self.port))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(())
            .expect("a valid request")
    }
}

/// A copy of a bodiless request (`http::Request` is not `Clone`).
pub(crate) fn clone_request(r: &http::Request<()>) -> http::Request<()> {
    let mut out = http::Request::new(());
    out.method_mut().clone_from(r.method());
    out.uri_mut().clone_from(r.uri());
    out.headers_mut().clone_from(r.headers());
    out
}

/// Sends `request` with `body` on a new stream of `send`; returns the
/// response's status and the stream to read its body from.
pub(crate) async fn post(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    request: http::Request<()>,
    body: Bytes,
) -> anyhow::Result<(http::StatusCode, H3Stream)> {
    let mut stream = send.send_request(request).await?;
    stream.send_data(body).await?;
    stream.finish().await?;
    let response = stream.recv_response().await?;
    Ok((response.status(), stream))
}

/// The next DATA chunk of `stream`, or `None` at its end.
pub(crate) async fn next_chunk(stream: &mut H3Stream) -> anyhow::Result<Option<Bytes>> {
    Ok(stream
        .recv_data()
        .await?
        .map(|mut c| c.copy_to_bytes(c.remaining())))
}

/// Reads the rest of `stream`'s body.
pub(crate) async fn drain(stream: &mut H3Stream) -> anyhow::Result<usize> {
    let mut n = 0;
    while let Some(chunk) = next_chunk(stream).await? {
        n += chunk.len();
    }
    Ok(n)
}

/// The `p`-th percentile (0–100, nearest rank) of `sorted`; zero when empty.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    bulkhead_core::sim::nearest_rank(sorted, p / 100.0)
}

/// `n` as a float (counts far below 2^52).
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
pub(crate) fn float(n: usize) -> f64 {
    n as f64
}

/// A duration in milliseconds with two decimals.
pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// A duration in microseconds with one decimal.
pub(crate) fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// The "goal met" / "goal MISSED" word.
pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "goal met" } else { "goal MISSED" }
}

/// A multi-threaded runtime of two workers (the machine the goals are for has two cores).
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `bulkhead worker` arguments of a `sim` worker.
pub(crate) fn sim_worker_args(fast: bool, slots: u32, blocks: u32) -> Vec<String> {
    let mut args: Vec<String> = [
        "--backend",
        "sim",
        "--model-name",
        MODEL,
        "--slots",
        &slots.to_string(),
        "--blocks",
        &blocks.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    if fast {
        args.push("--sim-fast".to_owned());
    }
    args
}

/// A seeded generator (`SplitMix64`) for arrival times.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) const fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub(crate) fn unit(&mut self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "53 bits, exactly representable")]
        let x = (self.next_u64() >> 11) as f64;
        (x + 1.0) / 9_007_199_254_740_992.0
    }

    /// Open-loop Poisson arrivals at `rate` per second within `window`.
    pub(crate) fn poisson(&mut self, rate: f64, window: Duration) -> Vec<Duration> {
        let mut t = 0.0;
        let mut out = Vec::new();
        loop {
            t += -self.unit().ln() / rate;
            if t >= window.as_secs_f64() {
                return out;
            }
            out.push(Duration::from_secs_f64(t));
        }
    }
}
