//! `bulkhead bench load`: an open-loop load generator over HTTP/3 with
//! mutual TLS, one client certificate (and one QUIC connection) per tenant.
//!
//! **Arrivals.** Each tenant sends open-loop Poisson arrivals at `rate`
//! requests per second; with a `burst`, the rate is `burst.rate` during the
//! first `burst.on_secs` of every `burst.period_secs` and `rate` for the
//! rest (a piecewise-constant Poisson process, drawn exactly segment by
//! segment). Each request is a streamed `/v1/completions` call whose prompt
//! length (tokens of the built-in byte tokenizer: one per ASCII character)
//! and `max_tokens` are drawn uniformly from the tenant's ranges. Every
//! prompt starts with its own request number, so no two share a prefix
//! block (the prefix cache never makes one cheaper). Arrival times and
//! lengths come from one seed, per tenant, so the same seed replays the
//! same load against different configurations.
//!
//! **Measures.** Time to first token (TTFT) runs from the request's
//! *scheduled* arrival (open loop: a client that falls behind adds to what
//! it measures, and the report says how far behind it fell) to the first
//! SSE event carrying content; latency runs to `[DONE]`. Refusals are
//! counted by status (429, 503); anything else (other statuses, transport
//! failures, an `error` event) is an error.
//!
//! **Steady state.** The first quarter of the arrival window is warm-up:
//! it starts from an idle worker, so a burst lands on empty slots all at
//! once, and nothing is in flight yet. The percentiles are over the
//! requests sent in the measurement interval, the last three quarters
//! (`ttft_all` in the JSON keeps every request's, and every request is in
//! `samples`).
//!
//! **Throughput and fairness.** Served output tokens are counted over the
//! measurement interval: each request's tokens are spread evenly between
//! its first and last token. A tenant's *demand* is the output its
//! requests arriving in that interval asked for (`max_tokens`, rejected
//! ones included), per second. Jain's fairness index is
//!
//! ```text
//! J(x) = (Σ xᵢ)² / (n · Σ xᵢ²),   xᵢ = servedᵢ / fairᵢ
//! ```
//!
//! where `fairᵢ` is tenant i's weighted max-min fair share of what was
//! served in all (Σ servedᵢ), given the demands: water-filling by weight, a
//! tenant asking for less than its share gets its demand and the rest is
//! shared among the others. This is Jain, Chiu and Hawe's normalised form
//! (1984: xᵢ = throughput / fair throughput). For tenants that are all
//! backlogged (each offered more than its share) it is exactly the index
//! of the weight-normalised throughputs `servedᵢ / weightᵢ`; a tenant that
//! is not backlogged counts as treated fairly when it got what it asked
//! for, rather than being left out or compared with a share it never
//! wanted. J = 1 is perfectly fair; one tenant of two starved gives 0.5.
//! Tenants that sent nothing in the interval are left out.
//!
//! **Targets.** With no target the run starts its own front door in this
//! process (the real QUIC listener, API, dispatcher and `sim` worker
//! processes, with a development PKI in a temporary directory). With
//! `--quic HOST:PORT --pki DIR` it loads an external `bulkhead serve`
//! using the files `bulkhead certs` writes (`server-ca.pem`,
//! `client-<tenant>.pem`, `client-<tenant>.key`). Load tests target
//! loopback only (or the loopback of a network namespace the test made):
//! any other address is refused.

use super::{
    Front, FrontSetup, Rng, TenantSetup, WorkerSetup, float, ms, next_chunk, percentile, post,
    runtime, sim_worker_args,
};
use crate::{certs, dispatch::QueuePolicy, tls::QUIC_ALPN};
use anyhow::Context as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::{
    fmt::Write as _,
    net::{SocketAddr, ToSocketAddrs as _},
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::time::Instant;

/// Fraction of the window before the measurement interval of throughput.
const WARMUP_FRACTION: f64 = 0.25;
/// Longest the end of a run waits for requests still in flight.
const DRAIN_LIMIT: Duration = Duration::from_mins(1);

/// A length distribution: uniform over `min..=max` tokens (fixed when equal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lengths {
    /// Fewest tokens.
    pub min: u32,
    /// Most tokens.
    pub max: u32,
}

impl Lengths {
    /// Always `n` tokens.
    pub const fn fixed(n: u32) -> Self {
        Self { min: n, max: n }
    }

    /// The mean length.
    pub fn mean(&self) -> f64 {
        f64::midpoint(f64::from(self.min), f64::from(self.max))
    }

    fn draw(self, rng: &mut Rng) -> u32 {
        let span = f64::from(self.max - self.min) + 1.0;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "in 0..span, span at most 2^32"
        )]
        let k = ((rng.unit() * span).ceil() - 1.0).max(0.0) as u32;
        self.min + k.min(self.max - self.min)
    }
}

impl std::str::FromStr for Lengths {
    type Err = String;

    /// `N` or `MIN..MAX` (inclusive).
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|e| format!("`{v}` is not a token count: {e}"))
        };
        let out = match s.split_once("..") {
            Some((lo, hi)) => Self {
                min: parse(lo)?,
                max: parse(hi.trim_start_matches('=') /* MIN..=MAX */)?,
            },
            None => Self::fixed(parse(s)?),
        };
        if out.min == 0 || out.min > out.max {
            return Err(format!("`{s}`: need 1 <= min <= max"));
        }
        Ok(out)
    }
}

/// On/off bursts: `rate` during the first `on_secs` of every `period_secs`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    /// Arrival rate during a burst, requests per second.
    pub rate: f64,
    /// Length of a burst, seconds.
    pub on_secs: f64,
    /// Time from one burst's start to the next, seconds.
    pub period_secs: f64,
}

impl Burst {
    /// The long-run mean rate, given `base` between bursts.
    pub fn mean_rate(&self, base: f64) -> f64 {
        let on = (self.on_secs / self.period_secs).clamp(0.0, 1.0);
        self.rate * on + base * (1.0 - on)
    }
}

/// One tenant's load (a `[[tenants]]` entry of a scenario, or `--tenant`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLoad {
    /// The tenant id (its client certificate's).
    pub name: String,
    /// Its weight: the front door's under contention (in-process runs) and
    /// the normalisation of the fairness index.
    #[serde(default = "one")]
    pub weight: u32,
    /// Poisson arrival rate, requests per second (between bursts).
    #[serde(default)]
    pub rate: f64,
    /// On/off bursts, if any.
    #[serde(default)]
    pub burst: Option<Burst>,
    /// Prompt length in tokens.
    #[serde(default = "default_prompt")]
    pub prompt_tokens: Lengths,
    /// `max_tokens` of each request.
    #[serde(default = "default_output")]
    pub max_tokens: Lengths,
    /// In-process front door only: a request-rate limit, requests per second
    /// (the burst is one second's worth).
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// In-process front door only: a worker of its own (isolation `process`).
    #[serde(default)]
    pub dedicated: bool,
}

const fn one() -> u32 {
    1
}

const fn default_prompt() -> Lengths {
    Lengths { min: 32, max: 96 }
}

const fn default_output() -> Lengths {
    Lengths::fixed(32)
}

impl TenantLoad {
    /// A tenant at `rate` req/s, weight 1, default lengths, no bursts.
    pub fn new(name: &str, rate: f64) -> Self {
        Self {
            name: name.to_owned(),
            weight: 1,
            rate,
            burst: None,
            prompt_tokens: default_prompt(),
            max_tokens: default_output(),
            rate_limit: None,
            dedicated: false,
        }
    }

    /// The long-run mean arrival rate.
    pub fn mean_rate(&self) -> f64 {
        self.burst.map_or(self.rate, |b| b.mean_rate(self.rate))
    }
}

impl std::str::FromStr for TenantLoad {
    type Err = String;

    /// `name=alpha,rate=10,burst_rate=200,burst_on=1,burst_period=2,prompt=32..96,max_tokens=32,weight=1,rate_limit=20,dedicated=true`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Self::new("", 0.0);
        let mut burst = (None, None, None);
        let float = |k: &str, v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("{k}: `{v}` is not a non-negative number"))
        };
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            let (k, v) = (k.trim(), v.trim());
            match k {
                "name" => v.clone_into(&mut out.name),
                "rate" => out.rate = float(k, v)?,
                "weight" => out.weight = v.parse().map_err(|e| format!("weight: {e}"))?,
                "burst_rate" => burst.0 = Some(float(k, v)?),
                "burst_on" => burst.1 = Some(float(k, v)?),
                "burst_period" => burst.2 = Some(float(k, v)?),
                "prompt" | "prompt_tokens" => out.prompt_tokens = v.parse()?,
                "max_tokens" | "output" => out.max_tokens = v.parse()?,
                "rate_limit" => out.rate_limit = Some(float(k, v)?),
                "dedicated" => out.dedicated = v.parse().map_err(|e| format!("dedicated: {e}"))?,
                _ => return Err(format!("unknown key `{k}`")),
            }
        }
        out.burst = match burst {
            (None, None, None) => None,
            (Some(rate), Some(on_secs), Some(period_secs)) => Some(Burst {
                rate,
                on_secs,
                period_secs,
            }),
            _ => return Err("burst_rate, burst_on and burst_period go together".to_owned()),
        };
        Ok(out)
    }
}

/// A load: tenants, length of the window, seed, and (for an in-process
/// front door) how it is set up. The `--scenario` file is this, in JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The tenants.
    pub tenants: Vec<TenantLoad>,
    /// Seconds of arrivals.
    #[serde(default = "default_seconds")]
    pub seconds: f64,
    /// Seed of arrivals and lengths.
    #[serde(default = "one_u64")]
    pub seed: u64,
    /// The model requests ask for.
    #[serde(default = "default_model")]
    pub model: String,
    /// In-process front door: its queue policy, `fair` or `fifo`.
    #[serde(default = "default_policy")]
    pub policy: String,
    /// In-process front door: batch slots of the shared worker (each
    /// dedicated worker gets its share of them and of the blocks).
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// In-process front door: the KV pool in blocks.
    #[serde(default = "default_blocks")]
    pub blocks: u32,
    /// In-process front door: most requests a tenant may have queued.
    #[serde(default = "default_queued")]
    pub max_queued: u32,
    /// In-process front door: the `sim` workers' calibration file
    /// (default: the built-in H100 + Llama-3-8B cost model).
    #[serde(default)]
    pub calibration: Option<PathBuf>,
    /// In-process front door: the workers' cap on the prompt tokens per
    /// step of tenants over their share while one under it runs (`bulkhead
    /// worker --over-share-prompt-tokens`; default: the engine's).
    #[serde(default)]
    pub over_share_prompt_tokens: Option<u32>,
}

const fn default_seconds() -> f64 {
    10.0
}
const fn one_u64() -> u64 {
    1
}
fn default_model() -> String {
    super::MODEL.to_owned()
}
fn default_policy() -> String {
    "fair".to_owned()
}
const fn default_slots() -> u32 {
    64
}
const fn default_blocks() -> u32 {
    1600
}
const fn default_queued() -> u32 {
    128
}

impl Scenario {
    /// A scenario of `tenants` with every other field at its default.
    pub fn new(tenants: Vec<TenantLoad>) -> Self {
        Self {
            tenants,
            seconds: default_seconds(),
            seed: one_u64(),
            model: default_model(),
            policy: default_policy(),
            slots: default_slots(),
            blocks: default_blocks(),
            max_queued: default_queued(),
            calibration: None,
            over_share_prompt_tokens: None,
        }
    }

    /// The arrival window.
    pub fn window(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.max(0.1))
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.tenants.is_empty(), "the scenario has no tenants");
        anyhow::ensure!(
            self.seconds.is_finite() && self.seconds > 0.0,
            "seconds must be > 0"
        );
        for (i, t) in self.tenants.iter().enumerate() {
            bulkhead_core::TenantId::new(&t.name)
                .with_context(|| format!("tenant {i}: `{}` is not a tenant id", t.name))?;
            anyhow::ensure!(t.weight >= 1, "tenant {}: weight must be >= 1", t.name);
            anyhow::ensure!(
                t.rate.is_finite() && t.rate >= 0.0,
                "tenant {}: rate must be finite and >= 0",
                t.name
            );
            if let Some(b) = t.burst {
                anyhow::ensure!(
                    b.rate.is_finite() && b.rate >= 0.0 && b.on_secs >= 0.0 && b.period_secs > 0.0,
                    "tenant {}: a burst needs rate >= 0, on_secs >= 0, period_secs > 0",
                    t.name
                );
            }
        }
        anyhow::ensure!(
            matches!(self.policy.as_str(), "fair" | "fifo"),
            "policy must be `fair` or `fifo`, not `{}`",
            self.policy
        );
        anyhow::ensure!(
            self.over_share_prompt_tokens != Some(0),
            "over_share_prompt_tokens must be at least 1"
        );
        Ok(())
    }
}

/// One request of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// When it is sent, from the start of the window.
    pub at: Duration,
    /// Its prompt's length in tokens.
    pub prompt_tokens: u32,
    /// Its `max_tokens`.
    pub max_tokens: u32,
}

/// Open-loop arrival times within `window`: Poisson at `rate`, or at
/// `burst.rate` during each burst (see the module docs), from `seed`.
pub fn arrival_times(
    seed: u64,
    rate: f64,
    burst: Option<Burst>,
    window: Duration,
) -> Vec<Duration> {
    let mut rng = Rng::new(seed);
    let end = window.as_secs_f64();
    let mut segments = Vec::new(); // (start, length, rate)
    match burst {
        None => segments.push((0.0, end, rate)),
        Some(b) => {
            let mut t = 0.0;
            while t < end {
                let on = b.on_secs.min(b.period_secs).min(end - t);
                segments.push((t, on, b.rate));
                let off = (b.period_secs - b.on_secs).max(0.0).min(end - t - on);
                segments.push((t + on, off, rate));
                t += b.period_secs;
            }
        }
    }
    let mut out = Vec::new();
    for (start, length, r) in segments {
        if r > 0.0 && length > 0.0 {
            let offset = Duration::from_secs_f64(start);
            out.extend(
                rng.poisson(r, Duration::from_secs_f64(length))
                    .into_iter()
                    .map(|t| offset + t),
            );
        }
    }
    out
}

/// The seed of tenant `index`'s arrivals (lengths use the next stream).
fn tenant_seed(seed: u64, index: usize) -> u64 {
    (seed ^ 0xB01C_EAD0_0000_0000)
        .wrapping_add((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Every tenant's requests, in the order of `scenario.tenants`.
pub fn plan(scenario: &Scenario) -> Vec<Vec<Arrival>> {
    scenario
        .tenants
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let seed = tenant_seed(scenario.seed, i);
            let mut lengths = Rng::new(seed ^ 0x5EED_1E46_7850_0000);
            arrival_times(seed, t.rate, t.burst, scenario.window())
                .into_iter()
                .map(|at| Arrival {
                    at,
                    prompt_tokens: t.prompt_tokens.draw(&mut lengths),
                    max_tokens: t.max_tokens.draw(&mut lengths),
                })
                .collect()
        })
        .collect()
}

/// Jain's fairness index of `xs`: `(Σx)² / (n·Σx²)`; 1 when all are equal,
/// `1/n` when one has everything; 1 for an empty or all-zero list.
pub fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    if squares <= 0.0 {
        return 1.0;
    }
    sum * sum / (float(xs.len()) * squares)
}

/// Weighted max-min fair shares of `capacity` among tenants with `demands`
/// (water-filling): a tenant whose demand is below its weighted share of
/// what is left gets its demand; the rest split what remains by weight.
/// When the demands fit, each share is its demand.
pub fn fair_shares(demands: &[f64], weights: &[f64], capacity: f64) -> Vec<f64> {
    let mut shares = vec![0.0; demands.len()];
    let mut open: Vec<usize> = (0..demands.len()).collect();
    let mut left = capacity.max(0.0);
    while !open.is_empty() {
        let weight: f64 = open.iter().map(|&i| weights[i]).sum();
        if weight <= 0.0 {
            break;
        }
        let per_weight = left / weight;
        let (satisfied, rest): (Vec<usize>, Vec<usize>) = open
            .iter()
            .partition(|&&i| demands[i] <= weights[i] * per_weight);
        if satisfied.is_empty() {
            for &i in &rest {
                shares[i] = weights[i] * per_weight;
            }
            break;
        }
        for &i in &satisfied {
            shares[i] = demands[i];
            left -= demands[i];
        }
        open = rest;
    }
    shares
}

/// Where the requests go: an address and, per tenant, the client TLS
/// config presenting its certificate.
pub(crate) struct Target {
    addr: SocketAddr,
    server_name: String,
    tls: Vec<(String, rustls::ClientConfig)>,
}

impl Target {
    /// The QUIC listener of an in-process front door.
    pub(crate) fn of_front(front: &Front, tenants: &[TenantLoad]) -> anyhow::Result<Self> {
        let tls = tenants
            .iter()
            .map(|t| Ok((t.name.clone(), front.client_tls(&t.name, &QUIC_ALPN)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            addr: front.quic,
            server_name: "localhost".to_owned(),
            tls,
        })
    }

    /// An external listener at `addr` (loopback only) with the files
    /// `bulkhead certs` wrote to `pki`.
    fn external(
        addr: &str,
        server_name: &str,
        pki: &Path,
        tenants: &[TenantLoad],
    ) -> anyhow::Result<Self> {
        let addr = loopback_only(addr)?;
        let read = |name: &str| {
            let path = pki.join(name);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        let server_ca = read(certs::SERVER_CA_FILE)?;
        let mut tls = Vec::new();
        for t in tenants {
            let id = super::tenant(&t.name);
            let config = super::tenant_tls(
                &server_ca,
                &read(&certs::client_cert_file(&id))?,
                &read(&certs::client_key_file(&id))?,
                &QUIC_ALPN,
            )?;
            tls.push((t.name.clone(), config));
        }
        Ok(Self {
            addr,
            server_name: server_name.to_owned(),
            tls,
        })
    }
}

/// `addr` resolved, if every address it names is a loopback address;
/// otherwise a refusal: load tests target loopback (or a namespace's) only.
pub fn loopback_only(addr: &str) -> anyhow::Result<SocketAddr> {
    let all: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("--quic {addr}: not HOST:PORT"))?
        .collect();
    if let Some(bad) = all.iter().find(|a| !a.ip().is_loopback()) {
        anyhow::bail!(
            "refusing to load-test {addr} ({}): not a loopback address. `bulkhead bench load` \
             only targets loopback (127.0.0.0/8, ::1), or the loopback of a network namespace \
             the test created; run it on the target host or inside that namespace",
            bad.ip()
        );
    }
    all.first()
        .copied()
        .with_context(|| format!("--quic {addr}: resolves to no address"))
}

/// One tenant's HTTP/3 connection.
struct Conn {
    _endpoint: quinn::Endpoint,
    quic: quinn::Connection,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    uri: String,
}

async fn connect(target: &Target, tls: &rustls::ClientConfig) -> anyhow::Result<Conn> {
    let endpoint = super::quic_client(tls.clone(), target.addr)?;
    let conn = endpoint
        .connect(target.addr, &target.server_name)?
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
    tokio::spawn(async move { driver.wait_idle().await });
    Ok(Conn {
        _endpoint: endpoint,
        quic: conn,
        send,
        uri: format!(
            "https://{}:{}/v1/completions",
            target.server_name,
            target.addr.port()
        ),
    })
}

/// What one request did; times in seconds from the start of the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Index of its tenant in the scenario.
    pub tenant: usize,
    /// Its scheduled send time.
    pub sent_s: f64,
    /// The response's status; 0 when none came (a transport failure).
    pub status: u16,
    /// Whether it ended with `[DONE]` after content.
    pub ok: bool,
    /// Time to first token, from `sent_s`.
    pub ttft_s: Option<f64>,
    /// Time to `[DONE]`, from `sent_s`.
    pub latency_s: Option<f64>,
    /// Output tokens (the usage chunk's count, else content events seen).
    pub output_tokens: u32,
    /// Its last token's time.
    pub last_token_s: Option<f64>,
    /// What went wrong, for an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The body of a request for `arrival`, number `n` of its tenant.
fn body(model: &str, arrival: Arrival, n: usize) -> Bytes {
    const FILLER: &str = "the quick brown fox jumps over the lazy dog while ";
    let mut prompt = format!("#{n} ");
    let want = arrival.prompt_tokens as usize;
    while prompt.len() < want {
        prompt.push_str(FILLER);
    }
    prompt.truncate(want.max(1));
    serde_json::json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": arrival.max_tokens,
        "temperature": 0,
        "stream": true,
    })
    .to_string()
    .into()
}

/// Sends one request and reads its stream.
async fn one_request(
    mut send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    uri: String,
    body: Bytes,
    start: Instant,
    mut sample: Sample,
) -> Sample {
    let scheduled = start + Duration::from_secs_f64(sample.sent_s);
    let since = |t: Instant| t.saturating_duration_since(start).as_secs_f64();
    let request = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(())
        .expect("a valid request");
    let outcome = async {
        let (status, mut stream) = post(&mut send, request, body).await?;
        sample.status = status.as_u16();
        let mut buf = String::new();
        let (mut events, mut usage) = (0u32, None);
        while let Some(chunk) = next_chunk(&mut stream).await? {
            let now = Instant::now();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    sample.ok = status == http::StatusCode::OK && events > 0;
                    sample.latency_s = Some(now.saturating_duration_since(scheduled).as_secs_f64());
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
                if let Some(e) = value.get("error") {
                    anyhow::bail!("error event: {e}");
                }
                if let Some(n) = value
                    .pointer("/usage/completion_tokens")
                    .and_then(serde_json::Value::as_u64)
                {
                    usage = u32::try_from(n).ok();
                }
                let content = value
                    .pointer("/choices/0/text")
                    .or_else(|| value.pointer("/choices/0/delta/content"))
                    .and_then(serde_json::Value::as_str);
                if content.is_some_and(|c| !c.is_empty()) {
                    events += 1;
                    sample
                        .ttft_s
                        .get_or_insert(now.saturating_duration_since(scheduled).as_secs_f64());
                    sample.last_token_s = Some(since(now));
                }
            }
        }
        sample.output_tokens = usage.unwrap_or(events);
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = outcome {
        sample.ok = false;
        sample.error = Some(format!("{e:#}"));
    } else if sample.status == 200 && !sample.ok {
        sample.error = Some("the stream ended without content and [DONE]".to_owned());
    }
    sample
}

/// What a run collected.
pub(crate) struct Run {
    pub samples: Vec<Sample>,
    pub window: Duration,
    /// Worst lateness of a send against its schedule.
    pub worst_lag: Duration,
    /// Requests still unanswered when the drain limit ran out.
    pub unfinished: usize,
}

/// Sends `plan` (one list per tenant of `scenario`) to `target`, open loop,
/// and waits for the answers (up to a minute after the window).
pub(crate) async fn drive(
    target: &Target,
    scenario: &Scenario,
    plan: &[Vec<Arrival>],
) -> anyhow::Result<Run> {
    let mut conns = Vec::new();
    for (name, tls) in &target.tls {
        conns.push(
            connect(target, tls)
                .await
                .with_context(|| format!("as tenant {name}"))?,
        );
    }
    let window = scenario.window();
    let start = Instant::now() + Duration::from_millis(200);
    let mut drivers = Vec::new();
    for (tenant, (conn, arrivals)) in conns.iter().zip(plan).enumerate() {
        let (send, uri) = (conn.send.clone(), conn.uri.clone());
        let (arrivals, model) = (arrivals.clone(), scenario.model.clone());
        drivers.push(tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(arrivals.len());
            let mut worst = Duration::ZERO;
            for (n, a) in arrivals.into_iter().enumerate() {
                tokio::time::sleep_until(start + a.at).await;
                worst = worst.max(Instant::now().saturating_duration_since(start + a.at));
                let sample = Sample {
                    tenant,
                    sent_s: a.at.as_secs_f64(),
                    ..Sample::default()
                };
                tasks.push(tokio::spawn(one_request(
                    send.clone(),
                    uri.clone(),
                    body(&model, a, n),
                    start,
                    sample,
                )));
            }
            (tasks, worst)
        }));
    }
    let mut run = Run {
        samples: Vec::new(),
        window,
        worst_lag: Duration::ZERO,
        unfinished: 0,
    };
    let mut tasks = Vec::new();
    for driver in drivers {
        let (t, worst) = driver.await?;
        run.worst_lag = run.worst_lag.max(worst);
        tasks.extend(t);
    }
    let deadline = Instant::now() + DRAIN_LIMIT;
    for task in tasks {
        let abort = task.abort_handle();
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(sample)) => run.samples.push(sample),
            Ok(Err(_)) => run.unfinished += 1,
            Err(_) => {
                abort.abort();
                run.unfinished += 1;
            }
        }
    }
    for c in &conns {
        c.quic.close(0u32.into(), b"done");
    }
    Ok(run)
}

/// p50, p90, p99 in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

impl Percentiles {
    fn of(values: impl Iterator<Item = f64>) -> Self {
        let mut sorted: Vec<Duration> = values.map(Duration::from_secs_f64).collect();
        sorted.sort_unstable();
        let p = |q| percentile(&sorted, q).as_secs_f64() * 1e3;
        Self {
            p50_ms: p(50.0),
            p90_ms: p(90.0),
            p99_ms: p(99.0),
        }
    }
}

/// One tenant's results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TenantReport {
    /// The tenant id.
    pub name: String,
    /// Its weight.
    pub weight: u32,
    /// Its mean offered rate, requests per second.
    pub offered_rps: f64,
    /// Requests sent.
    pub sent: usize,
    /// Requests answered in full.
    pub ok: usize,
    /// Requests refused with 429.
    pub rejected_429: usize,
    /// Requests refused with 503.
    pub unavailable_503: usize,
    /// Other failures.
    pub errors: usize,
    /// Time to first token of the requests answered that were sent in
    /// the measurement interval (after the warm-up).
    pub ttft: Percentiles,
    /// Latency (to `[DONE]`) of the same requests.
    pub latency: Percentiles,
    /// Time to first token of every request answered, warm-up included.
    pub ttft_all: Percentiles,
    /// Output tokens received per second over the measurement interval.
    pub output_tokens_per_s: f64,
    /// Output tokens asked for per second over the measurement interval.
    pub demand_tokens_per_s: f64,
    /// Its weighted max-min fair share of the tokens served, per second.
    pub fair_share_tokens_per_s: f64,
    /// Whether it asked for more than its fair share.
    pub backlogged: bool,
}

/// A run's results (`--json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// What ran.
    pub scenario: Scenario,
    /// Where it ran: `in-process` or the target address.
    pub target: String,
    /// The arrival window, seconds.
    pub window_s: f64,
    /// Start of the measurement interval of throughput (it ends with the window).
    pub measured_from_s: f64,
    /// Requests answered in full per second of the window.
    pub throughput_rps: f64,
    /// Output tokens per second over the measurement interval, all tenants.
    pub throughput_tokens_per_s: f64,
    /// Jain's fairness index (see the module docs).
    pub jain: f64,
    /// Per tenant.
    pub tenants: Vec<TenantReport>,
    /// Worst lateness of a send against its schedule, milliseconds.
    pub worst_send_lag_ms: f64,
    /// Requests unanswered when the drain limit ran out.
    pub unfinished: usize,
    /// Every request.
    pub samples: Vec<Sample>,
}

/// Tokens of `s` received within `[from, to]`, spread evenly from its first to its last.
fn tokens_within(s: &Sample, from: f64, to: f64) -> f64 {
    let (Some(ttft), Some(last)) = (s.ttft_s, s.last_token_s) else {
        return 0.0;
    };
    let first = s.sent_s + ttft;
    let n = f64::from(s.output_tokens);
    if last <= first {
        return if (from..=to).contains(&first) { n } else { 0.0 };
    }
    let overlap = (last.min(to) - first.max(from)).max(0.0);
    n * overlap / (last - first)
}

/// Summarises `run` of `scenario` (whose requests were `plan`).
pub(crate) fn summarize(
    scenario: &Scenario,
    plan: &[Vec<Arrival>],
    run: Run,
    target: &str,
) -> Report {
    let window = run.window.as_secs_f64();
    let from = window * WARMUP_FRACTION;
    let interval = window - from;
    let mut tenants: Vec<TenantReport> = scenario
        .tenants
        .iter()
        .zip(plan)
        .map(|(t, arrivals)| TenantReport {
            name: t.name.clone(),
            weight: t.weight,
            offered_rps: float(arrivals.len()) / window,
            demand_tokens_per_s: arrivals
                .iter()
                .filter(|a| a.at.as_secs_f64() >= from)
                .map(|a| f64::from(a.max_tokens))
                .sum::<f64>()
                / interval,
            ..TenantReport::default()
        })
        .collect();
    for s in &run.samples {
        let t = &mut tenants[s.tenant];
        t.sent += 1;
        match (s.ok, s.status) {
            (true, _) => t.ok += 1,
            (false, 429) => t.rejected_429 += 1,
            (false, 503) => t.unavailable_503 += 1,
            _ => t.errors += 1,
        }
        t.output_tokens_per_s += tokens_within(s, from, window) / interval;
    }
    for (i, t) in tenants.iter_mut().enumerate() {
        let mine = || run.samples.iter().filter(move |s| s.tenant == i && s.ok);
        let steady = || mine().filter(|s| s.sent_s >= from);
        t.ttft = Percentiles::of(steady().filter_map(|s| s.ttft_s));
        t.latency = Percentiles::of(steady().filter_map(|s| s.latency_s));
        t.ttft_all = Percentiles::of(mine().filter_map(|s| s.ttft_s));
    }
    let jain = fairness(&mut tenants);
    let ok: usize = tenants.iter().map(|t| t.ok).sum();
    Report {
        scenario: scenario.clone(),
        target: target.to_owned(),
        window_s: window,
        measured_from_s: from,
        throughput_rps: float(ok) / window,
        throughput_tokens_per_s: tenants.iter().map(|t| t.output_tokens_per_s).sum(),
        jain,
        tenants,
        worst_send_lag_ms: run.worst_lag.as_secs_f64() * 1e3,
        unfinished: run.unfinished,
        samples: run.samples,
    }
}

/// Fills in the fair shares and backlog flags; returns Jain's index.
fn fairness(tenants: &mut [TenantReport]) -> f64 {
    let active: Vec<usize> = (0..tenants.len())
        .filter(|&i| tenants[i].demand_tokens_per_s > 0.0)
        .collect();
    let demands: Vec<f64> = active
        .iter()
        .map(|&i| tenants[i].demand_tokens_per_s)
        .collect();
    let weights: Vec<f64> = active
        .iter()
        .map(|&i| f64::from(tenants[i].weight))
        .collect();
    let served: f64 = active.iter().map(|&i| tenants[i].output_tokens_per_s).sum();
    let shares = fair_shares(&demands, &weights, served);
    let mut xs = Vec::new();
    for (&i, share) in active.iter().zip(shares) {
        let t = &mut tenants[i];
        t.fair_share_tokens_per_s = share;
        t.backlogged = t.demand_tokens_per_s > share * 1.01;
        if share > 0.0 {
            xs.push(t.output_tokens_per_s / share);
        }
    }
    jain(&xs)
}

/// The report as a table.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench load: {} tenant(s), {:.1} s window, seed {}, target {}; percentiles over requests sent in [{:.1} s, {:.1} s], throughput over tokens received in it",
        report.tenants.len(),
        report.window_s,
        report.scenario.seed,
        report.target,
        report.measured_from_s,
        report.window_s
    );
    let _ = writeln!(
        out,
        "{:<12} {:>6} {:>7} {:>6} {:>5} {:>5} {:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>4}",
        "tenant",
        "offer/s",
        "sent",
        "ok",
        "429",
        "503",
        "err",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "lat p50",
        "lat p90",
        "lat p99",
        "tok/s",
        "share",
        "blg"
    );
    for t in &report.tenants {
        let _ = writeln!(
            out,
            "{:<12} {:>6.1} {:>7} {:>6} {:>5} {:>5} {:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9.1} {:>9.1} {:>4}",
            t.name,
            t.offered_rps,
            t.sent,
            t.ok,
            t.rejected_429,
            t.unavailable_503,
            t.errors,
            ms(Duration::from_secs_f64(t.ttft.p50_ms / 1e3)),
            ms(Duration::from_secs_f64(t.ttft.p90_ms / 1e3)),
            ms(Duration::from_secs_f64(t.ttft.p99_ms / 1e3)),
            ms(Duration::from_secs_f64(t.latency.p50_ms / 1e3)),
            ms(Duration::from_secs_f64(t.latency.p90_ms / 1e3)),
            ms(Duration::from_secs_f64(t.latency.p99_ms / 1e3)),
            t.output_tokens_per_s,
            t.fair_share_tokens_per_s,
            if t.backlogged { "yes" } else { "no" },
        );
    }
    let _ = writeln!(
        out,
        "throughput: {:.1} req/s, {:.1} output tokens/s; Jain's fairness index {:.4}; worst send lag {:.2} ms; unfinished {}",
        report.throughput_rps,
        report.throughput_tokens_per_s,
        report.jain,
        report.worst_send_lag_ms,
        report.unfinished
    );
    out
}

/// `bulkhead bench load` options.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LoadArgs {
    /// A scenario file (JSON: the fields of [`Scenario`]); `--tenant` flags
    /// are added to its tenants, the other flags override it.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// A tenant's load, e.g. `name=alpha,rate=10,prompt=32..96,max_tokens=32`
    /// (also `weight`, `burst_rate`, `burst_on`, `burst_period`, `rate_limit`, `dedicated`).
    #[arg(long = "tenant")]
    pub tenants: Vec<TenantLoad>,
    /// Seconds of arrivals.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Seed of arrivals and lengths.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The model to ask for.
    #[arg(long)]
    pub model: Option<String>,
    /// An external QUIC listener, HOST:PORT (loopback only); default: an in-process front door.
    #[arg(long, requires = "pki")]
    pub quic: Option<String>,
    /// With `--quic`: the directory `bulkhead certs` wrote.
    #[arg(long, requires = "quic")]
    pub pki: Option<PathBuf>,
    /// With `--quic`: the server name to verify.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// In-process: the queue policy, `fair` or `fifo`.
    #[arg(long)]
    pub policy: Option<String>,
    /// In-process: the `sim` workers' calibration file.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// In-process: the workers' cap on prompt tokens per step of tenants
    /// over their share while one under it runs (default: the engine's).
    #[arg(long)]
    pub over_share_prompt_tokens: Option<u32>,
    /// Write the report and every request's sample as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw each tenant's TTFT (or latency) over time as SVG here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// What the chart draws: `ttft` or `latency`.
    #[arg(long, default_value = "ttft")]
    pub chart_metric: String,
    /// The `bulkhead` binary for workers; `None` for this process's own.
    #[arg(skip)]
    pub program: Option<PathBuf>,
}

impl LoadArgs {
    /// The scenario the options describe.
    pub fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut s = match &self.scenario {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("scenario {}", path.display()))?
            }
            None => Scenario::new(Vec::new()),
        };
        s.tenants.extend(self.tenants.iter().cloned());
        if let Some(v) = self.seconds {
            s.seconds = v;
        }
        if let Some(v) = self.seed {
            s.seed = v;
        }
        if let Some(v) = &self.model {
            s.model.clone_from(v);
        }
        if let Some(v) = &self.policy {
            s.policy.clone_from(v);
        }
        if let Some(v) = &self.calibration {
            s.calibration = Some(v.clone());
        }
        if let Some(v) = self.over_share_prompt_tokens {
            s.over_share_prompt_tokens = Some(v);
        }
        s.validate()?;
        anyhow::ensure!(
            matches!(self.chart_metric.as_str(), "ttft" | "latency"),
            "--chart-metric is `ttft` or `latency`"
        );
        Ok(s)
    }
}

/// Runs `bulkhead bench load` and returns its table.
pub fn run(args: &LoadArgs) -> anyhow::Result<String> {
    let scenario = args.scenario()?;
    let external = match (&args.quic, &args.pki) {
        (Some(addr), Some(pki)) => Some(Target::external(
            addr,
            &args.server_name,
            pki,
            &scenario.tenants,
        )?),
        (None, None) => None,
        _ => anyhow::bail!("--quic and --pki go together"),
    };
    let report = match external {
        Some(target) => {
            let plan = plan(&scenario);
            let rt = runtime()?;
            let run = rt.block_on(drive(&target, &scenario, &plan));
            rt.shutdown_timeout(Duration::from_secs(3));
            Ok(summarize(&scenario, &plan, run?, &target.addr.to_string()))
        }
        None => run_in_process(&scenario, args.program.clone()),
    };
    let report = report?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        chart(&report, path, args.chart_metric == "latency")?;
    }
    Ok(render(&report))
}

/// Runs `scenario` against a front door of its own, in this process.
pub(crate) fn run_in_process(
    scenario: &Scenario,
    program: Option<PathBuf>,
) -> anyhow::Result<Report> {
    let plan = plan(scenario);
    let setup = front_setup(scenario, program)?;
    let rt = runtime()?;
    let report = rt.block_on(async {
        let front = Front::start_setup(setup).await?;
        let run = match Target::of_front(&front, &scenario.tenants) {
            Ok(target) => drive(&target, scenario, &plan).await,
            Err(e) => Err(e),
        };
        front.stop().await;
        anyhow::Ok(summarize(scenario, &plan, run?, "in-process"))
    });
    // Dropping the runtime drops the supervisors, which kill the workers.
    rt.shutdown_timeout(Duration::from_secs(3));
    report
}

/// The in-process front door of `scenario`: a shared worker for the shared
/// tenants (all the slots and blocks when there are no dedicated ones) and
/// one per dedicated tenant, each worker an equal part of both.
pub(crate) fn front_setup(
    scenario: &Scenario,
    program: Option<PathBuf>,
) -> anyhow::Result<FrontSetup> {
    let dedicated: Vec<&TenantLoad> = scenario.tenants.iter().filter(|t| t.dedicated).collect();
    let shared = dedicated.len() < scenario.tenants.len();
    let count = u32::try_from(dedicated.len() + usize::from(shared))?.max(1);
    let (slots, blocks) = (
        (scenario.slots / count).max(1),
        (scenario.blocks / count).max(1),
    );
    let mut args = sim_worker_args(false, slots, blocks);
    if let Some(c) = &scenario.calibration {
        let c = std::fs::canonicalize(c).with_context(|| format!("calibration {}", c.display()))?;
        bulkhead_kernels::sim::CostModel::from_file(&c)?;
        args.extend(["--calibration".to_owned(), c.display().to_string()]);
    }
    if let Some(n) = scenario.over_share_prompt_tokens {
        args.extend(["--over-share-prompt-tokens".to_owned(), n.to_string()]);
    }
    let mut workers: Vec<WorkerSetup> = dedicated
        .iter()
        .map(|t| WorkerSetup {
            dedicated: Some(t.name.clone()),
            args: args.clone(),
        })
        .collect();
    if shared {
        workers.insert(
            0,
            WorkerSetup {
                dedicated: None,
                args,
            },
        );
    }
    Ok(FrontSetup {
        tenants: scenario
            .tenants
            .iter()
            .map(|t| TenantSetup {
                name: t.name.clone(),
                weight: t.weight,
                rate_limit: t.rate_limit.map(|r| {
                    #[expect(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "small positive"
                    )]
                    let burst = r.ceil().max(1.0) as u32;
                    (r, burst)
                }),
                dedicated: t.dedicated,
            })
            .collect(),
        workers,
        blocks: scenario.blocks,
        max_queued: scenario.max_queued,
        policy: if scenario.policy == "fifo" {
            QueuePolicy::Fifo
        } else {
            QueuePolicy::Fair
        },
        program,
    })
}

/// Draws each tenant's TTFT (or latency) against send time as an SVG.
pub fn chart(report: &Report, path: &Path, latency: bool) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let value = |s: &Sample| if latency { s.latency_s } else { s.ttft_s };
    let points: Vec<(usize, f64, f64)> = report
        .samples
        .iter()
        .filter(|s| s.ok)
        .filter_map(|s| value(s).map(|v| (s.tenant, s.sent_s, (v * 1e3).max(0.1))))
        .collect();
    let top = points.iter().map(|p| p.2).fold(1.0_f64, f64::max) * 1.5;
    let bottom = points.iter().map(|p| p.2).fold(top, f64::min).max(0.1) / 1.5;
    let what = if latency {
        "latency"
    } else {
        "time to first token"
    };
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{what} per tenant over time (seed {})",
                report.scenario.seed
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..report.window_s, (bottom..top).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("request sent (s)")
        .y_desc(format!("{what} (ms, log scale)"))
        .draw()
        .map_err(plot_error)?;
    for (i, t) in report.tenants.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mine = points.iter().filter(|p| p.0 == i).map(|p| (p.1, p.2));
        chart
            .draw_series(mine.map(|(x, y)| Circle::new((x, y), 2, color.filled())))
            .map_err(plot_error)?
            .label(format!(
                "{} (p99 {:.1} ms)",
                t.name,
                if latency {
                    t.latency.p99_ms
                } else {
                    t.ttft.p99_ms
                }
            ))
            .legend(move |(x, y)| Circle::new((x, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_on_over_share_prompts_reaches_every_worker() {
        let mut scenario = Scenario::new(vec![
            "name=alpha,rate=10".parse().unwrap(),
            "name=bravo,rate=10,dedicated=true".parse().unwrap(),
        ]);
        let passes = |s: &Scenario| -> Vec<bool> {
            front_setup(s, None)
                .unwrap()
                .workers
                .iter()
                .map(|w| {
                    w.args
                        .windows(2)
                        .any(|a| a == ["--over-share-prompt-tokens", "96"])
                })
                .collect()
        };
        assert_eq!(passes(&scenario), [false, false], "the engine's default");
        scenario.over_share_prompt_tokens = Some(96);
        assert_eq!(passes(&scenario), [true, true]);
        scenario.over_share_prompt_tokens = Some(0);
        assert!(scenario.validate().is_err());
    }
}
