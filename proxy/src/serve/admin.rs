//! The admin endpoint (`[listeners] admin`): plain HTTP/1.1 for the host's
//! operator, on a unix socket (0600) or a loopback TCP address.
//!
//! - `GET /healthz`: workers alive and requests queued.
//! - `GET /metrics`: every tenant's series (a tenant's own `/metrics` on
//!   the API shows only its own).
//! - `GET /tenants`: the tenants served now, with their weights and models.
//! - `GET /workers`: each worker's state, requests running, free slots and
//!   KV blocks, and the blocks each tenant holds on it.
//! - `POST /reload`: re-reads the config ([`super::reload`]); 200 with what
//!   changed, or 409 with why nothing did.
//!
//! It has no authentication of its own: whoever can reach it is the
//! operator. So it listens only where only the operator can: a unix socket
//! in a directory of theirs, or loopback.
//!
//! The metrics endpoint (`[listeners] metrics`, [`MetricsListener`]) is the
//! read-only part of it, `GET /metrics` and `GET /healthz`, on any TCP
//! address: for a Prometheus that scrapes over the network and for a
//! kubelet's HTTP probes. It changes nothing and shows no tenant's settings,
//! only the series the admin endpoint's `/metrics` shows (tenant ids among
//! them): keep it to the monitoring network (`bulkhead deploy netpol`
//! writes the policy).

use super::reload::Reloader;
use crate::{api::App, front::ResponseBody, transport::ShutdownSignal};
use anyhow::Context as _;
use bulkhead_core::config::AdminEndpoint;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::{convert::Infallible, net::SocketAddr, path::Path, sync::Arc};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};

/// A bound admin endpoint.
#[derive(Debug)]
pub enum AdminListener {
    /// On a unix socket.
    Unix(UnixListener),
    /// On a loopback TCP address.
    Tcp(TcpListener),
}

impl AdminListener {
    /// Binds `endpoint`: a unix socket (a stale one is replaced, a live one
    /// refused) made 0600, or a TCP address that must be loopback.
    pub async fn bind(endpoint: &AdminEndpoint) -> anyhow::Result<Self> {
        match endpoint {
            AdminEndpoint::Tcp(addr) => {
                anyhow::ensure!(
                    addr.ip().is_loopback(),
                    "listeners.admin = {addr}: the admin endpoint has no authentication; \
                     give it a loopback address or a unix socket path"
                );
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the admin endpoint {addr}"))?;
                Ok(Self::Tcp(l))
            }
            AdminEndpoint::Unix(path) => Ok(Self::Unix(bind_unix(path)?)),
        }
    }

    /// Serves requests until `shutdown`.
    pub async fn serve(self, app: Arc<App>, reloader: Arc<Reloader>, shutdown: ShutdownSignal) {
        let serve = move |io| {
            let (app, reloader) = (app.clone(), reloader.clone());
            async move {
                let service = service_fn(move |req| {
                    let (app, reloader) = (app.clone(), reloader.clone());
                    async move { Ok::<_, Infallible>(answer(&app, reloader, &req).await) }
                });
                if let Err(err) = http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!("admin connection: {err}");
                }
            }
        };
        accept_loop("admin", shutdown, || self.accept(), serve).await;
    }

    async fn accept(&self) -> std::io::Result<TokioIo<Box<dyn Io>>> {
        let io: Box<dyn Io> = match self {
            Self::Unix(l) => Box::new(l.accept().await?.0),
            Self::Tcp(l) => Box::new(l.accept().await?.0),
        };
        Ok(TokioIo::new(io))
    }
}

/// A bound metrics endpoint (`[listeners] metrics`).
#[derive(Debug)]
pub struct MetricsListener(TcpListener);

/// Connections the metrics endpoint serves at once; more wait in the
/// kernel's backlog. A scraper and two probes need three.
const METRICS_CONNECTIONS: usize = 16;
/// How long a metrics client has to send its request's headers: a
/// connection that sends nothing does not hold its place.
const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl MetricsListener {
    /// Binds `addr` (any address: see the module docs).
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics endpoint {addr}"))?;
        Ok(Self(l))
    }

    /// The address bound (the port chosen, for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    /// Serves requests until `shutdown`, [`METRICS_CONNECTIONS`] connections
    /// at a time, each given [`METRICS_HEADER_TIMEOUT`] to send its headers.
    pub async fn serve(self, app: Arc<App>, shutdown: ShutdownSignal) {
        let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
        let accept = || {
            let (slots, listener) = (slots.clone(), &self.0);
            async move {
                let slot = slots.acquire_owned().await.expect("never closed");
                listener.accept().await.map(|(stream, _)| (stream, slot))
            }
        };
        let serve = move |(stream, slot)| {
            let app = app.clone();
            async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(answer_read_only(&app, &req)) }
                });
                if let Err(err) = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!("metrics connection: {err}");
                }
                drop(slot); // the connection's place, freed for the next
            }
        };
        accept_loop("metrics", shutdown, accept, serve).await;
    }
}

/// Accepts connections with `accept` until `shutdown`, each served by
/// `serve` on a task of its own; a failed accept is logged and retried
/// after 50 ms (the admin and the metrics endpoints).
async fn accept_loop<C, A, S>(
    what: &str,
    mut shutdown: ShutdownSignal,
    mut accept: impl FnMut() -> A,
    serve: impl Fn(C) -> S,
) where
    A: Future<Output = std::io::Result<C>>,
    S: Future<Output = ()> + Send + 'static,
{
    loop {
        let conn = tokio::select! {
            () = shutdown.triggered() => return,
            c = accept() => c,
        };
        match conn {
            Ok(conn) => {
                tokio::spawn(serve(conn));
            }
            Err(err) => {
                tracing::warn!("{what} accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// The metrics endpoint's answers: `/metrics` and `/healthz`, nothing else.
fn answer_read_only(app: &App, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => health(app),
        (&Method::GET, "/metrics") => metrics(app),
        (_, "/healthz" | "/metrics") => not_allowed(req),
        (_, path) => reply(
            StatusCode::NOT_FOUND,
            "application/json",
            json!({"error": format!(
                "the metrics endpoint serves /metrics and /healthz only, not {path}; \
                 the rest is on the admin endpoint"
            )})
            .to_string(),
        ),
    }
}

/// 405 for a method the path does not take.
fn not_allowed(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    reply(
        StatusCode::METHOD_NOT_ALLOWED,
        "application/json",
        json!({"error": format!("{} is not allowed on {}", req.method(), req.uri().path())})
            .to_string(),
    )
}

fn health(app: &App) -> Response<Full<Bytes>> {
    let r = app.health();
    let body = match r.body {
        ResponseBody::Full(b) => b,
        ResponseBody::Stream(_) => Bytes::new(),
    };
    reply(r.status, "application/json", body)
}

fn metrics(app: &App) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        app.host_metrics(),
    )
}

/// A stream of either listener.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if path.exists() {
        anyhow::ensure!(
            std::os::unix::net::UnixStream::connect(path).is_err(),
            "{} is in use by a running bulkhead",
            path.display()
        );
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("binding the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    Ok(l)
}

async fn answer(
    app: &App,
    reloader: Arc<Reloader>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let json =
        |status: StatusCode, v: serde_json::Value| reply(status, "application/json", v.to_string());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => health(app),
        (&Method::GET, "/metrics") => metrics(app),
        (&Method::GET, "/tenants") => {
            let config = app.config();
            let tenants: Vec<_> = config
                .tenants
                .iter()
                .map(|t| {
                    json!({
                        "id": t.id.as_str(), "weight": t.weight, "isolation": format!("{:?}", t.isolation).to_lowercase(),
                        "allowed_models": t.allowed_models, "requests_per_second": t.requests_per_second,
                        "tokens_per_minute": t.tokens_per_minute, "max_concurrent_requests": t.max_concurrent_requests,
                    })
                })
                .collect();
            // The limits are this host's share of the fleet's (`[cluster]`).
            json(
                StatusCode::OK,
                json!({ "host_share": config.cluster.host_share, "tenants": tenants }),
            )
        }
        (&Method::GET, "/workers") => {
            let workers: Vec<_> = app
                .workers()
                .into_iter()
                .map(|w| {
                    let capacity = w.capacity.map(|c| {
                        let tenants: serde_json::Map<String, serde_json::Value> = c
                            .per_tenant
                            .iter()
                            .map(|t| {
                                (
                                    t.tenant.to_string(),
                                    json!({"used_blocks": t.used_blocks, "quota": t.quota}),
                                )
                            })
                            .collect();
                        json!({"free_slots": c.free_slots, "free_blocks": c.free_blocks, "tenants": tenants})
                    });
                    json!({
                        "id": w.id, "alive": w.alive, "running": w.running,
                        "dedicated": w.dedicated.as_ref().map(bulkhead_core::TenantId::as_str),
                        "capacity": capacity,
                    })
                })
                .collect();
            json(StatusCode::OK, json!({ "workers": workers }))
        }
        (&Method::POST, "/reload") => {
            // Reading files and writing kernel maps: off the async workers.
            let result = tokio::task::spawn_blocking(move || reloader.reload()).await;
            match result.unwrap_or_else(|panic| {
                Err(super::reload::ReloadError::Tenants(anyhow::anyhow!(
                    "the reload failed: {panic}"
                )))
            }) {
                Ok(report) => {
                    tracing::info!("config reloaded (admin)");
                    json(StatusCode::OK, report.to_json())
                }
                Err(err) => {
                    tracing::warn!("config reload refused (admin): {err}");
                    json(
                        StatusCode::CONFLICT,
                        json!({"reloaded": false, "error": err.to_string()}),
                    )
                }
            }
        }
        (_, "/healthz" | "/metrics" | "/tenants" | "/workers" | "/reload") => not_allowed(req),
        (_, path) => json(
            StatusCode::NOT_FOUND,
            json!({"error": format!("unknown admin path {path}")}),
        ),
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// `method path` on the admin endpoint of a running `serve`: the status
/// and the body.
pub async fn admin_request(
    endpoint: &AdminEndpoint,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: bulkhead-admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let mut stream: Box<dyn Io> = match endpoint {
        AdminEndpoint::Unix(path) => Box::new(
            tokio::net::UnixStream::connect(path)
                .await
                .with_context(|| format!("connecting to the admin socket {}", path.display()))?,
        ),
        AdminEndpoint::Tcp(addr) => Box::new(
            tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to the admin endpoint {addr}"))?,
        ),
    };
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the admin endpoint's answer is not HTTP")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the admin endpoint's answer has no status")?;
    Ok((status, body.trim().to_owned()))
}

/// The `error` of a JSON answer, else the whole body.
fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.to_owned())
}

/// `bulkhead reload`: asks the admin endpoint of a running `serve` to
/// reload, and returns its answer (the JSON body) or why it refused.
pub async fn request_reload(endpoint: &AdminEndpoint) -> anyhow::Result<String> {
    let (status, body) = admin_request(endpoint, "POST", "/reload").await?;
    if status == 200 {
        Ok(body)
    } else {
        anyhow::bail!("reload refused ({status}): {}", error_of(&body))
    }
}

/// `bulkhead tenants`: the tenants a running `serve` serves now, with their
/// limits and the KV blocks each holds across the workers, as a table (or
/// the admin endpoint's JSON with `json`).
pub async fn tenants_report(endpoint: &AdminEndpoint, json: bool) -> anyhow::Result<String> {
    let get = |path: &'static str| async move {
        let (status, body) = admin_request(endpoint, "GET", path).await?;
        anyhow::ensure!(status == 200, "GET {path}: {status}: {}", error_of(&body));
        serde_json::from_str::<serde_json::Value>(&body)
            .with_context(|| format!("GET {path}: the answer is not JSON"))
    };
    let tenants = get("/tenants").await?;
    let workers = get("/workers").await?;
    if json {
        return Ok(format!(
            "{}\n",
            json!({
                "host_share": tenants["host_share"],
                "tenants": tenants["tenants"],
                "workers": workers["workers"],
            })
        ));
    }
    Ok(render_tenants(&tenants, &workers))
}

/// The table of [`tenants_report`].
fn render_tenants(tenants: &serde_json::Value, workers: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let empty = Vec::new();
    let workers = workers["workers"].as_array().unwrap_or(&empty);
    let mut out = format!(
        "{:<20} {:>6} {:<10} {:>8} {:>12} {:>10} {:>16}  models\n",
        "tenant", "weight", "isolation", "req/s", "tokens/min", "concurrent", "KV blocks used"
    );
    let limit = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        v => v.to_string(),
    };
    for t in tenants["tenants"].as_array().unwrap_or(&empty) {
        let id = t["id"].as_str().unwrap_or("?");
        let used: u64 = workers
            .iter()
            .filter_map(|w| w["capacity"]["tenants"][id]["used_blocks"].as_u64())
            .sum();
        let models: Vec<&str> = t["allowed_models"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .filter_map(|m| m.as_str())
            .collect();
        let _ = writeln!(
            out,
            "{id:<20} {:>6} {:<10} {:>8} {:>12} {:>10} {used:>16}  {}",
            limit(&t["weight"]),
            t["isolation"].as_str().unwrap_or("?"),
            limit(&t["requests_per_second"]),
            limit(&t["tokens_per_minute"]),
            limit(&t["max_concurrent_requests"]),
            models.join(","),
        );
    }
    let alive = workers.iter().filter(|w| w["alive"] == true).count();
    let _ = writeln!(out, "workers: {} ({alive} alive)", workers.len());
    if let Some(share) = tenants["host_share"].as_f64()
        && share < 1.0
    {
        let _ = writeln!(
            out,
            "limits: this host's share ({share}) of the fleet's ([cluster] host_share)"
        );
    }
    out
}
