//! `bulkhead bench fairness`: does a light tenant keep its latency beside a
//! tenant that saturates the worker?
//!
//! One `sim` worker with real-time pacing (the default H100 cost model:
//! ~7 ms decode steps, 32 slots). Tenant `alpha` (A) sends 10 req/s,
//! tenant `bravo` (B) 200 req/s, both open-loop Poisson arrivals from one
//! seed, each a short chat prompt with `max_tokens` 64; B alone needs about
//! three times the worker's capacity. The same arrivals run three times:
//! A alone, A + B under the fair queue, A + B under FIFO. A's time to first
//! token is measured from sending the request to the first SSE chunk with
//! content, through the QUIC listener with mutual TLS. The goal:
//! p99(A beside B, fair) ≤ 1.3 × p99(A alone).

use super::{
    Front, FrontOptions, H3Client, Rng, clone_request, drain, float, ms, next_chunk, percentile,
    post, sim_worker_args, verdict,
};
use crate::dispatch::QueuePolicy;
use anyhow::Context as _;
use bytes::Bytes;
use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::time::Instant;

/// Tenant A's arrival rate, requests per second.
const A_RATE: f64 = 10.0;
/// Tenant B's arrival rate, requests per second.
const B_RATE: f64 = 200.0;
/// Tokens each request asks for.
const MAX_TOKENS: u32 = 64;
/// The worker's batch slots.
const SLOTS: u32 = 32;
/// The worker's KV blocks.
const BLOCKS: u32 = 4096;
/// Most requests a tenant may have queued (B's excess beyond it gets 429).
const MAX_QUEUED: u32 = 128;
/// The goal on p99(A with B, fair) / p99(A alone).
const GOAL_RATIO: f64 = 1.3;
/// Longest the end of a run waits for A's last requests.
const DRAIN_LIMIT: Duration = Duration::from_mins(1);
const A: &str = "alpha";
const B: &str = "bravo";

/// How to run the bench.
#[derive(Clone, Debug)]
pub struct FairnessOptions {
    /// Length of each run's arrival window, in seconds.
    pub seconds: u64,
    /// Seed of the arrivals.
    pub seed: u64,
    /// The `bulkhead` binary for the worker; `None` for this process's own.
    pub program: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, Default)]
struct RunResult {
    /// A's times to first token, sorted.
    a_ttft: Vec<Duration>,
    /// A's requests that failed (any status but 200, or no content).
    a_failed: usize,
    /// B's requests answered 200 within the window.
    b_done: usize,
    /// B's requests refused (429: its queue was full).
    b_refused: usize,
    /// B's requests that failed otherwise.
    b_failed: usize,
    /// Samples of the worker's running requests.
    running: Vec<u32>,
    /// Samples of B's queued requests.
    b_queued: Vec<usize>,
    /// The arrival window.
    window: Duration,
    /// Worst lateness of a send against its scheduled arrival.
    worst_lag: Duration,
}

#[derive(Debug, Default)]
struct Counters {
    b_done: usize,
    b_refused: usize,
    b_failed: usize,
    worst_lag: Duration,
}

/// Runs the bench and returns its report.
pub fn run(opts: &FairnessOptions) -> anyhow::Result<String> {
    let window = Duration::from_secs(opts.seconds.max(1));
    let mut rng = Rng::new(opts.seed);
    let a_arrivals = rng.poisson(A_RATE, window);
    let b_arrivals = rng.poisson(B_RATE, window);
    let runs = [
        ("A alone", false, QueuePolicy::Fair),
        ("A + B, fair queue", true, QueuePolicy::Fair),
        ("A + B, FIFO", true, QueuePolicy::Fifo),
    ];
    let mut results = Vec::new();
    for (label, with_b, policy) in runs {
        tracing::info!("bench fairness: run `{label}` ({} s)", window.as_secs());
        // Busy polling as `serve`'s default, on the runtime the proxy shares
        // with the clients here.
        let poll = crate::serve::busy_poll::process();
        poll.set_limit(Duration::from_micros(
            crate::serve::busy_poll::DEFAULT_LIMIT_US,
        ));
        let rt = crate::serve::busy_poll::runtime(2, poll).context("starting the async runtime")?;
        let b = if with_b { &b_arrivals[..] } else { &[][..] };
        let result = rt.block_on(one_run(opts, policy, window, &a_arrivals, b));
        // Dropping the runtime drops the supervisor, which kills the worker.
        rt.shutdown_timeout(Duration::from_secs(3));
        results.push((label, result?));
    }
    Ok(report(opts, &results, a_arrivals.len(), b_arrivals.len()))
}

fn chat_body(stream: bool) -> Bytes {
    serde_json::json!({
        "model": super::MODEL,
        "messages": [{"role": "user", "content": "Name three rivers of Europe, briefly."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
    .into()
}

#[expect(clippy::too_many_lines, reason = "one run, read top to bottom")]
async fn one_run(
    opts: &FairnessOptions,
    policy: QueuePolicy,
    window: Duration,
    a_arrivals: &[Duration],
    b_arrivals: &[Duration],
) -> anyhow::Result<RunResult> {
    let front = Front::start(FrontOptions {
        tenants: &[A, B],
        worker_args: sim_worker_args(false, SLOTS, BLOCKS),
        blocks: BLOCKS,
        max_queued: MAX_QUEUED,
        policy,
        program: opts.program.clone(),
    })
    .await?;
    let a = H3Client::connect(&front, A).await?;
    let b = H3Client::connect(&front, B).await?;
    // One request first: the path works, and nothing is cold when timing starts.
    let mut warm = a.send.clone();
    let (status, mut stream) = post(
        &mut warm,
        a.request("/v1/chat/completions"),
        chat_body(true),
    )
    .await?;
    anyhow::ensure!(
        status == http::StatusCode::OK,
        "the warm-up request got {status}"
    );
    drain(&mut stream).await?;

    let start = Instant::now() + Duration::from_millis(100);
    let end = start + window;
    let counters = Arc::new(Mutex::new(Counters::default()));

    // Sample the worker's load and B's queue every 10 ms of the window.
    let sampler = {
        let dispatcher = front.dispatcher.clone();
        let b_tenant = super::tenant(B);
        tokio::spawn(async move {
            let mut running = Vec::new();
            let mut queued = Vec::new();
            let mut tick = tokio::time::interval_at(start, Duration::from_millis(10));
            while tick.tick().await < end {
                running.push(dispatcher.workers().first().map_or(0, |w| w.2));
                queued.push(dispatcher.queued_for(&b_tenant));
            }
            (running, queued)
        })
    };

    // B: non-streaming requests, counted as they end.
    let b_driver = {
        let (send, request) = (b.send.clone(), b.request("/v1/chat/completions"));
        let arrivals = b_arrivals.to_vec();
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(arrivals.len());
            for at in arrivals {
                tokio::time::sleep_until(start + at).await;
                let (mut send, counters) = (send.clone(), Arc::clone(&counters));
                let request = clone_request(&request);
                tasks.push(tokio::spawn(async move {
                    let lag = Instant::now().saturating_duration_since(start + at);
                    let outcome = async {
                        let (status, mut stream) =
                            post(&mut send, request, chat_body(false)).await?;
                        drain(&mut stream).await?;
                        anyhow::Ok(status)
                    }
                    .await;
                    let mut c = counters.lock().expect("unpoisoned");
                    c.worst_lag = c.worst_lag.max(lag);
                    match outcome {
                        Ok(http::StatusCode::OK) if Instant::now() <= end => c.b_done += 1,
                        Ok(http::StatusCode::OK) => {}
                        Ok(http::StatusCode::TOO_MANY_REQUESTS) => c.b_refused += 1,
                        _ => c.b_failed += 1,
                    }
                }));
            }
            tasks
        })
    };

    // A: streaming requests; the time to the first content chunk.
    let a_tasks: Vec<_> = {
        let mut tasks = Vec::with_capacity(a_arrivals.len());
        let request = a.request("/v1/chat/completions");
        for &at in a_arrivals {
            tokio::time::sleep_until(start + at).await;
            let mut send = a.send.clone();
            let request = clone_request(&request);
            let counters = Arc::clone(&counters);
            tasks.push(tokio::spawn(async move {
                let began = Instant::now();
                {
                    let mut c = counters.lock().expect("unpoisoned");
                    c.worst_lag = c.worst_lag.max(began.saturating_duration_since(start + at));
                }
                let (status, mut stream) = post(&mut send, request, chat_body(true)).await?;
                anyhow::ensure!(status == http::StatusCode::OK, "status {status}");
                // The first whole SSE event (a DATA frame may arrive in pieces).
                let mut first = Vec::new();
                while !first.windows(2).any(|w| w == b"\n\n") {
                    let Some(piece) = next_chunk(&mut stream).await? else {
                        break;
                    };
                    first.extend_from_slice(&piece);
                }
                let ttft = began.elapsed();
                anyhow::ensure!(
                    std::str::from_utf8(&first)
                        .is_ok_and(|s| s.starts_with("data: ") && s.contains("\"content\"")),
                    "the first event is not content: {:?}",
                    String::from_utf8_lossy(&first)
                );
                drain(&mut stream).await?;
                anyhow::Ok(ttft)
            }));
        }
        tasks
    };
    tokio::time::sleep_until(end).await;
    let b_tasks = b_driver.await?;
    let (running, b_queued) = sampler.await?;

    let mut result = RunResult {
        running,
        b_queued,
        window,
        ..RunResult::default()
    };
    let collect = async {
        for task in a_tasks {
            match task.await {
                Ok(Ok(ttft)) => result.a_ttft.push(ttft),
                Ok(Err(e)) => {
                    tracing::warn!("tenant A request failed: {e:#}");
                    result.a_failed += 1;
                }
                Err(_) => result.a_failed += 1,
            }
        }
    };
    if tokio::time::timeout(DRAIN_LIMIT, collect).await.is_err() {
        tracing::warn!("tenant A's requests did not all end within {DRAIN_LIMIT:?}");
    }
    for task in &b_tasks {
        task.abort();
    }
    result.a_ttft.sort_unstable();
    {
        let c = counters.lock().expect("unpoisoned");
        result.b_done = c.b_done;
        result.b_refused = c.b_refused;
        result.b_failed = c.b_failed;
        result.worst_lag = c.worst_lag;
    }
    a.conn.close(0u32.into(), b"done");
    b.conn.close(0u32.into(), b"done");
    front.stop().await;
    Ok(result)
}

fn report(
    opts: &FairnessOptions,
    results: &[(&str, RunResult)],
    a_sent: usize,
    b_sent: usize,
) -> String {
    let mut out = String::new();
    let secs = results.first().map_or(0.0, |(_, r)| r.window.as_secs_f64());
    let _ = writeln!(
        out,
        "bench fairness: seed {}, {secs:.0} s of open-loop Poisson arrivals per run",
        opts.seed
    );
    let _ = writeln!(
        out,
        "  tenant A: {A_RATE} req/s ({a_sent} requests, streamed); tenant B: {B_RATE} req/s ({b_sent} requests, not streamed); chat, max_tokens {MAX_TOKENS}"
    );
    let _ = writeln!(
        out,
        "  worker: 1 `sim` process, real-time pacing (default H100 cost model), {SLOTS} slots; queue cap {MAX_QUEUED} per tenant"
    );
    let _ = writeln!(
        out,
        "  path: quinn + h3 client in this process → QUIC listener (mTLS, one connection per tenant cert) → API → dispatcher → worker (unix socket)"
    );
    let _ = writeln!(
        out,
        "  TTFT: from sending the request to the first SSE chunk with content\n"
    );
    let _ = writeln!(
        out,
        "{:<20} {:>7} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10} {:>10}",
        "run", "A ok", "A p50", "A p99", "B done/s", "B 429", "busy", "slots used", "B queued"
    );
    for (label, r) in results {
        let busy = r.running.iter().filter(|&&n| n > 0).count();
        let used: u64 = r.running.iter().map(|&n| u64::from(n)).sum();
        let queued: usize = r.b_queued.iter().sum();
        let samples = float(r.running.len().max(1));
        #[expect(clippy::cast_precision_loss, reason = "small sums")]
        let used = used as f64 / samples;
        let _ = writeln!(
            out,
            "{:<20} {:>7} {:>10} {:>10} {:>10.1} {:>9} {:>8.0}% {:>10.1} {:>10.1}",
            label,
            format!("{}/{}", r.a_ttft.len(), r.a_ttft.len() + r.a_failed),
            ms(percentile(&r.a_ttft, 50.0)),
            ms(percentile(&r.a_ttft, 99.0)),
            float(r.b_done) / r.window.as_secs_f64(),
            r.b_refused,
            100.0 * float(busy) / samples,
            used,
            float(queued) / float(r.b_queued.len().max(1)),
        );
    }
    let _ = writeln!(out);
    let p99 = |i: usize| {
        results
            .get(i)
            .map_or(Duration::ZERO, |(_, r)| percentile(&r.a_ttft, 99.0))
    };
    let alone = p99(0).as_secs_f64();
    for (i, name) in [(1, "fair"), (2, "FIFO")] {
        let ratio = p99(i).as_secs_f64() / alone;
        let met = alone > 0.0 && ratio <= GOAL_RATIO;
        let expectation = if i == 1 {
            verdict(met)
        } else if met {
            "FIFO within the goal: B did not hurt A here (is B saturating the worker?)"
        } else {
            "above the goal, as FIFO is expected to be"
        };
        let _ = writeln!(
            out,
            "p99 TTFT(A with B, {name}) / p99 TTFT(A alone) = {ratio:.2} (goal <= {GOAL_RATIO}): {expectation}"
        );
    }
    let failed: usize = results.iter().map(|(_, r)| r.a_failed + r.b_failed).sum();
    let lag = results
        .iter()
        .map(|(_, r)| r.worst_lag)
        .max()
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "failed requests (not 200/429): {failed}; worst client send lag behind schedule: {}",
        ms(lag)
    );
    out
}
