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
//!   proxy runtime's busy polling off (`serve`'s default) and on
//!   ([`crate::serve::busy_poll`], the window of `--busy-poll-us`);
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
    cpu::{CpuSnapshot, CpuUse},
    drain, float,
    h3_wire::{WireClient, WireRequest},
    post, quic_client, sim_worker_args, us, verdict,
};
use crate::{
    dispatch::QueuePolicy,
    serve::{
        self,
        busy_poll::{self, BusyPoll},
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
    /// The busy-poll window of the latency part's busy-polling rounds (the
    /// throughput part and the other rounds run without, as `serve`'s default).
    pub busy_poll: Duration,
}

/// The busy-poll window (µs) `bench proxy` measures unless told otherwise.
pub const DEFAULT_BUSY_POLL_US: u64 = 200;

/// The name of the load generator's runtime threads.
const CLIENT_THREAD: &str = "bench-client";

/// Runs the bench and returns its report.
pub fn run(opts: &ProxyOptions) -> anyhow::Result<String> {
    let threads = opts
        .proxy_threads
        .map_or_else(serve::runtime_threads_here, std::num::NonZero::get);
    // The process's busy poll: the one the API's and dispatcher's activity feeds.
    let poll = Arc::clone(busy_poll::process());
    poll.set_window(Duration::ZERO);
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
    /// Busy polling off.
    plain: ThroughProxy,
    /// Busy polling on.
    polled: ThroughProxy,
    direct: Vec<Duration>,
}

/// One-at-a-time requests through the proxy, sorted.
#[derive(Default)]
struct ThroughProxy {
    completions: Vec<Duration>,
    /// `GET /healthz` through the proxy: HTTP/3 and the handler, no dispatch.
    floor: Vec<Duration>,
}

impl ThroughProxy {
    fn sort(&mut self) {
        self.completions.sort_unstable();
        self.floor.sort_unstable();
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
        let window = opts.busy_poll;
        let requests = [completion, WireRequest::get(&authority, "/healthz")];
        clients
            .spawn(async move {
                added_latency(&client, &requests, link, latency_time, &poll, window).await
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

/// The same request through the proxy (busy polling off, then on) and
/// directly to a worker, one at a time, interleaved in rounds so drift hits
/// all alike. `poll` is the proxy runtime's busy poll, `window` that of its
/// busy-polling rounds.
async fn added_latency(
    client: &WireClient,
    [completion, health]: &[WireRequest; 2],
    mut link: WorkerLink,
    time: Duration,
    poll: &BusyPoll,
    window: Duration,
) -> anyhow::Result<Latency> {
    const ROUND: usize = 50;
    let tokenizer = ByteTokenizer::new(&ModelConfig::tiny());
    // The chat template of the built-in model, as the API renders it.
    let prompt = tokenizer.encode(&format!("<|user|>\n{CONTENT}\n<|assistant|>\n"));
    let tenant = super::tenant(TENANT);
    let mut out = Latency {
        plain: ThroughProxy::default(),
        polled: ThroughProxy::default(),
        direct: Vec::new(),
    };
    let end = Instant::now() + time;
    let mut next_id: u128 = 1;
    // One warm-up round each, not counted.
    let mut counted = false;
    while Instant::now() < end || !counted {
        for (on, into) in [(false, &mut out.plain), (true, &mut out.polled)] {
            poll.set_window(if on { window } else { Duration::ZERO });
            let round = through_proxy(client, completion, health, ROUND).await?;
            if counted {
                into.completions.extend(round.completions);
                into.floor.extend(round.floor);
            }
        }
        poll.set_window(Duration::ZERO);
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
        let (back, times) = tokio::task::spawn_blocking(move || {
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
        .await??;
        link = back;
        if counted {
            out.direct.extend(times);
        }
        counted = true;
    }
    out.plain.sort();
    out.polled.sort();
    out.direct.sort_unstable();
    Ok(out)
}

/// `n` completions and `n` `GET /healthz`, alternating, one at a time.
async fn through_proxy(
    client: &WireClient,
    completion: &WireRequest,
    health: &WireRequest,
    n: usize,
) -> anyhow::Result<ThroughProxy> {
    let mut out = ThroughProxy::default();
    for _ in 0..n {
        let t0 = Instant::now();
        let answer = client.send(completion).await?;
        out.completions.push(t0.elapsed());
        anyhow::ensure!(answer.status == 200, "status {}", answer.status);
        let t0 = Instant::now();
        let answer = client.send(health).await?;
        out.floor.push(t0.elapsed());
        anyhow::ensure!(answer.status == 200, "healthz status {}", answer.status);
    }
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
    let per_request =
        |d: Duration| us(d / u32::try_from(throughput.done.max(1)).unwrap_or(u32::MAX));
    let cpu = throughput.cpu;
    let proxy = cpu.proxy + cpu.children;
    row(
        &mut out,
        "  CPU per request: the proxy (runtime, audit, worker)",
        &per_request(proxy),
        "-",
    );
    row(
        &mut out,
        "    of which its worker process",
        &per_request(cpu.children),
        "-",
    );
    row(
        &mut out,
        "  CPU per request: the load generator / the whole machine",
        &per_request(cpu.client),
        &per_request(cpu.machine),
    );
    row(
        &mut out,
        &format!("  requests/s the proxy's CPU per request allows on {cores} cores"),
        &format!("{:.0}", capacity(proxy, throughput.done, cores)),
        "-",
    );
    let h3_per_request = us(h3.cpu.client / u32::try_from(h3.done.max(1)).unwrap_or(u32::MAX));
    row(
        &mut out,
        "  the h3 crate's client: requests/s, its CPU per request",
        &format!("{:.0}", h3.rate),
        &h3_per_request,
    );
    latency_rows(&mut out, &latency.plain, &latency.direct);
    let _ = writeln!(
        out,
        "with busy polling, a {} µs window (serve --busy-poll-us {0}), in rounds between those above:",
        opts.busy_poll.as_micros()
    );
    latency_rows(&mut out, &latency.polled, &latency.direct);
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
