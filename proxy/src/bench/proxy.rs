//! `bulkhead bench proxy`: the proxy as the bottleneck.
//!
//! A `sim` worker with `--sim-fast` (steps cost nothing) behind the whole
//! front door, measuring, in one run:
//! - requests per second over ONE HTTP/3 connection with 64 concurrent
//!   streams (non-streaming chat completions, `max_tokens` 1), sent by a
//!   lean HTTP/3 client (`bench/h3_wire.rs`: each request encoded once,
//!   one write per request), and, for comparison, by the `h3` crate's
//!   client (the load generator's cost is the proxy's loss: they share
//!   the cores);
//! - the latency the proxy adds: the same request through the proxy, one
//!   at a time, minus a direct [`WorkerLink`] Submit → Finished round trip
//!   to a second, identical worker process; in interleaved rounds with the
//!   proxy runtime's busy polling as `serve`'s default
//!   ([`crate::serve::busy_poll`], adaptive up to the limit of
//!   `--busy-poll-us`) and off, back to back; then, in a phase of their
//!   own, completions a millisecond apart (sparser than the limit), both
//!   ways; with the proxy's CPU per request in each;
//! - full mutual-TLS handshakes per second (no resumption, a new
//!   connection each) on the TLS/TCP and the QUIC listener, 2 connectors each.
//!
//! The one-at-a-time requests of the latency part go through the lean
//! client too, as the direct baseline goes through the worker link's own.
//! Client and proxy share this process, each on a runtime of its own (the
//! proxy's has `serve`'s default threads unless told otherwise; the
//! clients' two: every client of every part runs there), so the CPU each
//! spends in the throughput part is read apart (`/proc`, per thread): the
//! proxy's (its runtime, its audit writer, its worker process) and the load
//! generator's.

use super::{
    Front, FrontOptions, H3Client, TempDir, clone_request,
    cpu::{CpuSnapshot, CpuUse, proxy_run_time},
    drain, float,
    h3_wire::{WireClient, WireRequest},
    post, quic_client, sim_worker_args, us, verdict,
};
use crate::{
    dispatch::QueuePolicy,
    serve::{
        self,
        busy_poll::{self, Activity, BusyPoll},
        cores,
    },
    tls::{QUIC_ALPN, TCP_ALPN},
    worker::WorkerLink,
};
use anyhow::Context as _;
use bulkhead_core::wire::{ProxyToWorker, RequestId, Sampling, Submit, WorkerToProxy};
use bulkhead_kernels::model::{ByteTokenizer, ModelConfig};
use bytes::Bytes;
use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};
use tokio::{runtime::Handle, time::Instant};

/// Concurrent streams on the one connection.
const STREAMS: usize = 64;
/// Concurrent connectors of the handshake measurements.
const CONNECTORS: usize = 2;
const SLOTS: u32 = 256;
const BLOCKS: u32 = 16_384;
/// Goal: requests per second over one connection.
const GOAL_RPS: f64 = 40_000.0;
/// Goal: p50 added latency.
const GOAL_ADDED: Duration = Duration::from_micros(150);
const TENANT: &str = "alpha";
const CONTENT: &str = "hi";

/// How to run the bench.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Seconds of measurement, shared among the four parts.
    pub seconds: u64,
    /// The `bulkhead` binary for workers; `None` for this process's own.
    pub program: Option<PathBuf>,
    /// Threads of the proxy's runtime; `None`: as `serve`'s default.
    pub proxy_threads: Option<std::num::NonZeroUsize>,
    /// The proxy's busy-poll limit, as `serve --busy-poll-us` (the latency
    /// part measures rounds without too).
    pub busy_poll: Duration,
}

/// The name of the load generator's runtime threads.
const CLIENT_THREAD: &str = "bench-client";

/// Runs the bench and returns its report.
pub fn run(opts: &ProxyOptions) -> anyhow::Result<String> {
    let threads = opts
        .proxy_threads
        .map_or_else(serve::runtime_threads_here, std::num::NonZero::get);
    // The process's busy poll: the one the API's and dispatcher's activity feeds.
    let poll = Arc::clone(busy_poll::process());
    poll.set_limit(opts.busy_poll);
    let rt = busy_poll::runtime(threads, &poll).context("starting the proxy's runtime")?;
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()
        .context("starting the clients' runtime")?;
    let result = rt.block_on(measure(opts, clients.handle(), threads, poll));
    clients.shutdown_timeout(Duration::from_secs(3));
    rt.shutdown_timeout(Duration::from_secs(3));
    result
}

fn body() -> Bytes {
    serde_json::json!({
        "model": super::MODEL,
        "messages": [{"role": "user", "content": CONTENT}],
        "max_tokens": 1,
        "temperature": 0,
    })
    .to_string()
    .into()
}

struct Latency {
    /// Busy polling as `serve`'s, back to back.
    polled: ThroughProxy,
    /// Busy polling off, back to back.
    plain: ThroughProxy,
    /// Busy polling as `serve`'s, a completion alone every [`SPACED`] or so.
    spaced_polled: ThroughProxy,
    /// Busy polling off, a completion alone every [`SPACED`] or so.
    spaced_plain: ThroughProxy,
    direct: Vec<Duration>,
    /// The busy-poll windows at the end of the back-to-back polling rounds.
    windows: Windows,
    /// The same at the end of the spaced polling rounds.
    spaced_windows: Windows,
}

/// How long the busy poll polls after a request, and after a worker's message.
#[derive(Clone, Copy, Default)]
struct Windows([Duration; 2]);

impl Windows {
    fn of(poll: &BusyPoll) -> Self {
        Self([Activity::Request, Activity::Worker].map(|kind| poll.window(kind)))
    }
}

impl std::fmt::Display for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [request, worker] = self.0;
        write!(
            f,
            "polling at the end: {} after a request, {} after a worker's message",
            us(request),
            us(worker)
        )
    }
}

/// The pause after each request of the spaced rounds.
const SPACED: Duration = Duration::from_millis(1);

/// One-at-a-time requests through the proxy, sorted, and the CPU the proxy
/// (this process but the clients' threads) spent over them.
#[derive(Default)]
struct ThroughProxy {
    completions: Vec<Duration>,
    /// `GET /healthz` through the proxy: HTTP/3 and the handler, no dispatch.
    floor: Vec<Duration>,
    cpu: Duration,
}

impl ThroughProxy {
    fn sort(&mut self) {
        self.completions.sort_unstable();
        self.floor.sort_unstable();
    }

    fn extend(&mut self, round: Self) {
        self.completions.extend(round.completions);
        self.floor.extend(round.floor);
        self.cpu += round.cpu;
    }

    /// The proxy's CPU per request (completions and `GET /healthz` alike).
    fn cpu_per_request(&self) -> Duration {
        per_request(self.cpu, self.completions.len() + self.floor.len())
    }
}

async fn measure(
    opts: &ProxyOptions,
    clients: &Handle,
    threads: usize,
    poll: Arc<BusyPoll>,
) -> anyhow::Result<String> {
    let total = Duration::from_secs(opts.seconds.max(1));
    let throughput_time = total.mul_f64(0.3);
    let h3_throughput_time = total.mul_f64(0.12);
    let latency_time = total.mul_f64(0.28);
    let handshake_time = total.mul_f64(0.15);

    let front = Front::start(FrontOptions {
        tenants: &[TENANT],
        worker_args: sim_worker_args(true, SLOTS, BLOCKS),
        blocks: BLOCKS,
        max_queued: 100_000,
        policy: QueuePolicy::Fair,
        program: opts.program.clone(),
    })
    .await?;
    // The direct baseline: a second worker, the same arguments.
    let dir = TempDir::new("direct")?;
    let socket = dir.path().join("direct.sock");
    let program = match &opts.program {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("finding our own binary")?,
    };
    let _direct_worker = tokio::process::Command::new(program)
        .arg("worker")
        .arg("--listen")
        .arg(&socket)
        .arg("--worker-id")
        .arg("1")
        .args(sim_worker_args(true, SLOTS, BLOCKS))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the direct worker")?;
    let link = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match WorkerLink::connect(&socket, 1, Duration::from_secs(5)) {
                Ok(link) => return Ok(link),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
    .await??;

    // The clients' endpoints and connections are driven on the clients' runtime.
    let server = front.quic;
    let tls = front.client_tls(TENANT, &QUIC_ALPN)?;
    let wire = clients
        .spawn(async move { WireClient::connect(quic_client(tls, server)?, server).await })
        .await??;
    let wire = Arc::new(wire);
    let authority = format!("localhost:{}", server.port());
    let completion = WireRequest::post_json(&authority, "/v1/chat/completions", &body());
    let rps = throughput(throughput_time, |window| {
        let (client, request) = (Arc::clone(&wire), completion.clone());
        clients.spawn(async move {
            while window.open() {
                let answer = client.send(&request).await;
                window.count(answer.is_ok_and(|a| a.status == 200 && a.body_len > 0));
            }
        })
    })
    .await?;
    let h3_rps = h3_throughput(&front, clients, h3_throughput_time).await?;
    // The one-at-a-time client runs as a task of the clients' runtime too.
    let latency = {
        let client = Arc::clone(&wire);
        let limit = opts.busy_poll;
        let requests = [completion, WireRequest::get(&authority, "/healthz")];
        clients
            .spawn(async move {
                added_latency(&client, &requests, link, latency_time, &poll, limit).await
            })
            .await??
    };
    let tcp = tcp_handshakes(&front, clients, handshake_time).await?;
    let quic = quic_handshakes(&front, clients, handshake_time).await?;
    wire.close();
    front.stop().await;
    drop(dir);
    Ok(report(opts, threads, &rps, &h3_rps, &latency, tcp, quic))
}

/// What the throughput part measured.
struct Throughput {
    /// Requests per second.
    rate: f64,
    /// Requests that failed.
    failed: usize,
    /// Requests counted.
    done: usize,
    /// CPU spent over the counted window.
    cpu: CpuUse,
}

/// A throughput window: its tasks send while it is open and count what
/// came back within its counted part (after the warm-up).
struct Window {
    counted_from: Instant,
    end: Instant,
    done: AtomicUsize,
    failed: AtomicUsize,
}

impl Window {
    fn open(&self) -> bool {
        Instant::now() < self.end
    }

    fn count(&self, ok: bool) {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
        } else if (self.counted_from..self.end).contains(&Instant::now()) {
            self.done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Requests per second over one connection with [`STREAMS`] streams: `spawn`
/// starts one stream's task (on the clients' runtime) sending through the window.
async fn throughput(
    time: Duration,
    spawn: impl Fn(Arc<Window>) -> tokio::task::JoinHandle<()>,
) -> anyhow::Result<Throughput> {
    let warm = (time / 4).min(Duration::from_secs(1));
    let start = Instant::now();
    let window = Arc::new(Window {
        counted_from: start + warm,
        end: start + time,
        done: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    let tasks: Vec<_> = (0..STREAMS).map(|_| spawn(Arc::clone(&window))).collect();
    // The CPU counters are read on a thread of their own at the counted
    // window's edges, so reading `/proc` stays off the runtime's threads.
    let (counted_from, end) = (window.counted_from, window.end);
    let cpu = tokio::task::spawn_blocking(move || {
        let wait_until =
            |t: Instant| std::thread::sleep(t.saturating_duration_since(Instant::now()));
        wait_until(counted_from);
        let first = CpuSnapshot::take(CLIENT_THREAD)?;
        wait_until(end);
        anyhow::Ok(CpuSnapshot::take(CLIENT_THREAD)?.since(&first))
    });
    for task in tasks {
        task.await?;
    }
    let cpu = cpu.await??;
    let done = window.done.load(Ordering::Relaxed);
    Ok(Throughput {
        rate: float(done) / time.saturating_sub(warm).as_secs_f64(),
        failed: window.failed.load(Ordering::Relaxed),
        done,
        cpu,
    })
}

/// [`throughput`] through the `h3` crate's client, for comparison.
async fn h3_throughput(
    front: &Front,
    clients: &Handle,
    time: Duration,
) -> anyhow::Result<Throughput> {
    let server = front.quic;
    let tls = front.client_tls(TENANT, &QUIC_ALPN)?;
    let h3 = clients
        .spawn(async move { H3Client::connect_with(quic_client(tls, server)?, server).await })
        .await??;
    // Built once: the load generator's own JSON is not the proxy's cost.
    let payload = body();
    let rps = throughput(time, |window| {
        let mut send = h3.send.clone();
        let request = h3.request("/v1/chat/completions");
        let payload = payload.clone();
        clients.spawn(async move {
            while window.open() {
                let ok = async {
                    let r = clone_request(&request);
                    let (status, mut stream) = post(&mut send, r, payload.clone()).await?;
                    drain(&mut stream).await?;
                    anyhow::Ok(status == http::StatusCode::OK)
                }
                .await;
                window.count(matches!(ok, Ok(true)));
            }
        })
    })
    .await?;
    h3.conn.close(0u32.into(), b"done");
    Ok(rps)
}

/// The same request through the proxy (busy polling as `serve`'s, then
/// off; back to back, then spaced) and directly to a worker, one at a time,
/// interleaved in rounds so drift hits all alike. `poll` is the proxy
/// runtime's busy poll, `limit` its limit in the polling rounds.
async fn added_latency(
    client: &WireClient,
    [completion, health]: &[WireRequest; 2],
    mut link: WorkerLink,
    time: Duration,
    poll: &BusyPoll,
    limit: Duration,
) -> anyhow::Result<Latency> {
    const ROUND: usize = 50;
    const SPACED_ROUND: usize = 20;
    let tokenizer = ByteTokenizer::new(&ModelConfig::tiny());
    // The chat template of the built-in model, as the API renders it.
    let prompt = tokenizer.encode(&format!("<|user|>\n{CONTENT}\n<|assistant|>\n"));
    let tenant = super::tenant(TENANT);
    let mut out = Latency {
        polled: ThroughProxy::default(),
        plain: ThroughProxy::default(),
        spaced_polled: ThroughProxy::default(),
        spaced_plain: ThroughProxy::default(),
        direct: Vec::new(),
        windows: Windows::default(),
        spaced_windows: Windows::default(),
    };
    // Back to back for three quarters of the time, then spaced: spaced
    // rounds between back-to-back ones changed how this VM's scheduler
    // placed the threads in those, and with it their latency (by up to
    // 60 µs, polling or not; docs/benchmarks.md), so they run apart.
    let spaced_from = Instant::now() + time.mul_f64(0.75);
    let end = Instant::now() + time;
    let mut next_id: u128 = 1;
    // One warm-up round each, not counted.
    let mut counted = false;
    let mut polled_first = true;
    while Instant::now() < spaced_from || !counted {
        let mut order = [(true, &mut out.polled), (false, &mut out.plain)];
        // Each first in every other round, so neither always follows the direct round.
        if !polled_first {
            order.reverse();
        }
        polled_first = !polled_first;
        for (on, into) in order {
            poll.set_limit(if on { limit } else { Duration::ZERO });
            let round =
                through_proxy(client, completion, Some(health), ROUND, Duration::ZERO).await?;
            if on {
                out.windows = Windows::of(poll);
            }
            if counted {
                into.extend(round);
            }
        }
        poll.set_limit(Duration::ZERO);
        let submits: Vec<Submit> = (0..ROUND)
            .map(|_| {
                next_id += 1;
                Submit {
                    request_id: RequestId(next_id),
                    tenant: tenant.clone(),
                    model: super::MODEL.to_owned(),
                    prompt_tokens: prompt.clone(),
                    max_tokens: 1,
                    sampling: Sampling {
                        temperature: 0.0,
                        top_p: 1.0,
                        seed: None,
                        stop: Vec::new(),
                    },
                    kv_block_quota: BLOCKS,
                }
            })
            .collect();
        let (back, times) = direct_round(link, submits).await?;
        link = back;
        if counted {
            out.direct.extend(times);
        }
        counted = true;
    }
    let mut spaced_rounds = 0;
    while Instant::now() < end || spaced_rounds < 2 {
        let on = spaced_rounds % 2 == 0;
        poll.set_limit(if on { limit } else { Duration::ZERO });
        let round = through_proxy(client, completion, None, SPACED_ROUND, SPACED).await?;
        if on {
            out.spaced_polled.extend(round);
            out.spaced_windows = Windows::of(poll);
        } else {
            out.spaced_plain.extend(round);
        }
        spaced_rounds += 1;
    }
    poll.set_limit(limit);
    for through in [
        &mut out.polled,
        &mut out.plain,
        &mut out.spaced_polled,
        &mut out.spaced_plain,
    ] {
        through.sort();
    }
    out.direct.sort_unstable();
    Ok(out)
}

/// `submits` one at a time, directly to a worker over `link` (on a
/// blocking thread, as the worker link is); the link back and each one's
/// Submit -> Finished time.
async fn direct_round(
    mut link: WorkerLink,
    submits: Vec<Submit>,
) -> anyhow::Result<(WorkerLink, Vec<Duration>)> {
    tokio::task::spawn_blocking(move || {
        let mut times = Vec::with_capacity(submits.len());
        for submit in submits {
            let id = submit.request_id;
            let t0 = std::time::Instant::now();
            link.send(&ProxyToWorker::Submit(submit))?;
            loop {
                match link.recv_timeout(Duration::from_secs(10))? {
                    WorkerToProxy::Finished(f) if f.request_id == id => break,
                    _ => {}
                }
            }
            times.push(t0.elapsed());
        }
        anyhow::Ok((link, times))
    })
    .await?
}

/// `n` completions, one at a time, each followed by a `GET /healthz` if
/// `health` is given, and `pause` after each completion (none: back to
/// back); and the proxy's CPU over them.
async fn through_proxy(
    client: &WireClient,
    completion: &WireRequest,
    health: Option<&WireRequest>,
    n: usize,
    pause: Duration,
) -> anyhow::Result<ThroughProxy> {
    let mut out = ThroughProxy::default();
    let before = proxy_run_time(CLIENT_THREAD)?;
    for _ in 0..n {
        let t0 = Instant::now();
        let answer = client.send(completion).await?;
        out.completions.push(t0.elapsed());
        anyhow::ensure!(answer.status == 200, "status {}", answer.status);
        if let Some(health) = health {
            let t0 = Instant::now();
            let answer = client.send(health).await?;
            out.floor.push(t0.elapsed());
            anyhow::ensure!(answer.status == 200, "healthz status {}", answer.status);
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    out.cpu = proxy_run_time(CLIENT_THREAD)?.saturating_sub(before);
    Ok(out)
}

/// Full mTLS handshakes per second on the TLS/TCP listener; the connectors
/// run on the clients' runtime.
async fn tcp_handshakes(front: &Front, clients: &Handle, time: Duration) -> anyhow::Result<f64> {
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(front.client_tls(TENANT, &TCP_ALPN)?));
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let addr = front.tcp;
    let start = Instant::now();
    let end = start + time;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTORS {
        let (connector, name) = (connector.clone(), name.clone());
        tasks.push(clients.spawn(async move {
            let mut n = 0usize;
            while Instant::now() < end {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name.clone(), tcp).await?;
                drop(tls);
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(float(total) / start.elapsed().as_secs_f64())
}

/// Full mTLS handshakes per second on the QUIC listener; the connectors
/// (and their endpoints' drivers) run on the clients' runtime.
async fn quic_handshakes(front: &Front, clients: &Handle, time: Duration) -> anyhow::Result<f64> {
    let addr = front.quic;
    let start = Instant::now();
    let end = start + time;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTORS {
        let tls = front.client_tls(TENANT, &QUIC_ALPN)?;
        tasks.push(clients.spawn(async move {
            let endpoint = quic_client(tls, addr)?;
            let mut n = 0usize;
            while Instant::now() < end {
                let conn = endpoint.connect(addr, "localhost")?.await?;
                conn.close(0u32.into(), b"done");
                n += 1;
            }
            endpoint.close(0u32.into(), b"done");
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(float(total) / start.elapsed().as_secs_f64())
}

/// `spent` over `done` requests, each's share (all of it when none were done).
fn per_request(spent: Duration, done: usize) -> Duration {
    spent / u32::try_from(done.max(1)).unwrap_or(u32::MAX)
}

/// Requests per second that `cores` fully busy would serve at the CPU
/// per request measured (`spent` over `done` requests); zero when nothing was measured.
fn capacity(spent: Duration, done: usize, cores: usize) -> f64 {
    if spent.is_zero() || done == 0 {
        return 0.0;
    }
    float(cores) * float(done) / spent.as_secs_f64()
}

/// One row of the report: a measure, its value, and a goal or second value.
fn row(out: &mut String, measure: &str, value: &str, goal: &str) {
    let _ = writeln!(out, "{measure:<58} {value:>14} {goal:>14}");
}

/// The added-latency rows of one kind of round through the proxy.
fn latency_rows(out: &mut String, through: &ThroughProxy, direct: &[Duration]) {
    let p = super::percentile;
    let added = |q: f64| p(&through.completions, q).saturating_sub(p(direct, q));
    goal_row(
        out,
        "added latency p50 (proxy p50 - direct p50)",
        &us(added(50.0)),
        &format!("<= {}", us(GOAL_ADDED)),
        added(50.0) <= GOAL_ADDED,
    );
    row(
        out,
        "  added latency p99 (proxy p99 - direct p99)",
        &us(added(99.0)),
        "-",
    );
    for (what, sorted) in [
        ("through the proxy", &through.completions[..]),
        ("direct to a worker", direct),
    ] {
        row(
            out,
            &format!("  {what} p50 / p99 ({} requests)", sorted.len()),
            &us(p(sorted, 50.0)),
            &us(p(sorted, 99.0)),
        );
    }
    row(
        out,
        "  of which HTTP/3 alone: GET /healthz p50 / p99",
        &us(p(&through.floor, 50.0)),
        &us(p(&through.floor, 99.0)),
    );
    row(
        out,
        "  the proxy's CPU per request (not its worker's)",
        &us(through.cpu_per_request()),
        "-",
    );
}

/// The one-at-a-time part of the report: busy polling limited to `limit`
/// (`serve`'s default unless told otherwise), off, and spaced.
fn latency_report(out: &mut String, limit: Duration, latency: &Latency) {
    let _ = writeln!(
        out,
        "one at a time, busy polling as serve's default{}:\n  ({})",
        if limit.is_zero() {
            " here, off (--busy-poll-us 0)".to_owned()
        } else {
            format!(
                ", adaptive up to {} µs (serve --busy-poll-us {0})",
                limit.as_micros()
            )
        },
        latency.windows,
    );
    latency_rows(out, &latency.polled, &latency.direct);
    let _ = writeln!(
        out,
        "one at a time, busy polling off (serve --busy-poll-us 0), in rounds between those above:"
    );
    latency_rows(out, &latency.plain, &latency.direct);
    let p50 = |t: &ThroughProxy| us(super::percentile(&t.completions, 50.0));
    let _ = writeln!(
        out,
        "one at a time, completions alone, {} ms after each (sparser than the limit), busy polling as above / off:\n  ({})",
        SPACED.as_millis(),
        latency.spaced_windows,
    );
    row(
        out,
        &format!(
            "  through the proxy p50 ({} requests each)",
            latency.spaced_polled.completions.len()
        ),
        &p50(&latency.spaced_polled),
        &p50(&latency.spaced_plain),
    );
    row(
        out,
        "  the proxy's CPU per request (not its worker's)",
        &us(latency.spaced_polled.cpu_per_request()),
        &us(latency.spaced_plain.cpu_per_request()),
    );
}

/// A row of a measure with a goal, and its verdict.
fn goal_row(out: &mut String, measure: &str, value: &str, goal: &str, met: bool) {
    let _ = writeln!(
        out,
        "{measure:<58} {value:>14} {goal:>14}  {}",
        verdict(met)
    );
}

fn report(
    opts: &ProxyOptions,
    threads: usize,
    throughput: &Throughput,
    h3: &Throughput,
    latency: &Latency,
    tcp: f64,
    quic: f64,
) -> String {
    let rps = throughput.rate;
    let cores = cores();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench proxy: {} s; one `sim --sim-fast` worker (zero step cost) behind the proxy, a second one for the direct baseline",
        opts.seconds.max(1)
    );
    let _ = writeln!(
        out,
        "  clients (quinn with a lean HTTP/3 client, and the h3 crate's for comparison; tokio-rustls) share this process and the machine's cores with the proxy; runtime threads: the proxy's {threads}, the clients' 2; cores here: {cores}\n",
    );
    let _ = writeln!(
        out,
        "{:<58} {:>14} {:>14}  verdict",
        "measure", "value", "goal"
    );
    goal_row(
        &mut out,
        &format!("requests/s, 1 HTTP/3 connection, {STREAMS} streams, max_tokens 1"),
        &format!("{rps:.0}"),
        &format!(">= {GOAL_RPS:.0}"),
        rps >= GOAL_RPS,
    );
    let each = |d: Duration| us(per_request(d, throughput.done));
    let cpu = throughput.cpu;
    let proxy = cpu.proxy + cpu.children;
    row(
        &mut out,
        "  CPU per request: the proxy (runtime, audit, worker)",
        &each(proxy),
        "-",
    );
    row(
        &mut out,
        "    of which its worker process",
        &each(cpu.children),
        "-",
    );
    row(
        &mut out,
        "  CPU per request: the load generator / the whole machine",
        &each(cpu.client),
        &each(cpu.machine),
    );
    row(
        &mut out,
        &format!("  requests/s the proxy's CPU per request allows on {cores} cores"),
        &format!("{:.0}", capacity(proxy, throughput.done, cores)),
        "-",
    );
    let h3_per_request = us(per_request(h3.cpu.client, h3.done));
    row(
        &mut out,
        "  the h3 crate's client: requests/s, its CPU per request",
        &format!("{:.0}", h3.rate),
        &h3_per_request,
    );
    latency_report(&mut out, opts.busy_poll, latency);
    for (listener, rate) in [("TLS/TCP", tcp), ("QUIC", quic)] {
        row(
            &mut out,
            &format!("full mTLS handshakes/s, {listener}, {CONNECTORS} connectors"),
            &format!("{rate:.0}"),
            "-",
        );
    }
    let _ = writeln!(
        out,
        "failed requests in the throughput part: {}",
        throughput.failed + h3.failed
    );
    out
}
