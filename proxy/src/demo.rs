//! `bulkhead demo`: the whole product on its built-in defaults, in one
//! command, on loopback.
//!
//! 1. A state directory (`./bulkhead-demo` by default) gets a development
//!    PKI for three tenants (acme, globex, initech), a host config and an
//!    audit master key.
//! 2. `bulkhead serve` starts from that config with a CPU worker running the
//!    built-in model. As root, the demo first moves itself into a cgroup of
//!    its own so `serve` can load the eBPF programs there (never on the
//!    host's root cgroup); otherwise it says kernel enforcement is off.
//! 3. Three tenants drive a short mixed load over HTTP/3 with their client
//!    certificates: acme and globex steady, initech in bursts over its rate
//!    limit (it gets 429s).
//! 4. `serve` stops (draining, writing the audit ring), the audit log is
//!    verified, and a per-tenant table is printed: requests, tokens, p50/p99
//!    time to first token, 429s, kernel drops, audit records verified.

use crate::{
    audit::{KeyFile, cli::verify_all, read_key_file},
    bench::Rng,
    certs,
    tls::QUIC_ALPN,
};
use anyhow::Context as _;
use bulkhead_core::{TenantId, identity::TrustDomain};
use bytes::{Buf as _, Bytes};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    time::Instant,
};

const DOMAIN: &str = "demo.bulkhead.local";
/// (tenant, requests per second on average, bursty).
const TENANTS: [(&str, f64, bool); 3] = [
    ("acme", 3.0, false),
    ("globex", 3.0, false),
    ("initech", 8.0, true),
];
const MAX_TOKENS: u32 = 24;

/// How to run the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Where its PKI, config, audit log and sockets go.
    pub state_dir: PathBuf,
    /// Seconds of load.
    pub seconds: u64,
}

/// What one tenant's clients saw.
#[derive(Debug, Default)]
struct Seen {
    sent: u64,
    ok: u64,
    limited: u64,
    failed: u64,
    tokens: u64,
    ttft: Vec<Duration>,
}

/// Runs the demo; returns its report.
pub fn run(opts: &DemoOptions) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let cgroup = DemoCgroup::enter();
    let result = runtime.block_on(demo(opts, cgroup.as_ref()));
    drop(runtime);
    drop(cgroup);
    result
}

async fn demo(opts: &DemoOptions, cgroup_handle: Option<&DemoCgroup>) -> anyhow::Result<String> {
    let cgroup = cgroup_handle.map(|c| c.note.clone());
    let state = &opts.state_dir;
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    let state = state
        .canonicalize()
        .with_context(|| format!("resolving {}", state.display()))?;
    let pki = state.join("pki");
    if !pki.join(certs::TENANT_CA_FILE).exists() {
        let ids: Vec<TenantId> = TENANTS
            .iter()
            .map(|(t, ..)| TenantId::new(t))
            .collect::<Result<_, _>>()?;
        certs::generate(&TrustDomain::new(DOMAIN)?, &ids)?.write_to(&pki, false)?;
    }
    let config = state.join("host.toml");
    std::fs::write(&config, config_toml(&state))
        .with_context(|| format!("writing {}", config.display()))?;
    let instance = format!("demo-{}", std::process::id());
    let mut serve = tokio::process::Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--runtime-dir")
        .arg(state.join("run"))
        .args(["--ebpf-instance", &instance])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(state.join("serve.log"))?)
        .kill_on_drop(true)
        .spawn()
        .context("starting bulkhead serve")?;
    // serve (and its workers) stay in the demo's cgroup; the clients below
    // do not, so the programs police the server's sockets only.
    if let Some(c) = cgroup_handle {
        c.leave();
    }
    let mut line = String::new();
    BufReader::new(serve.stdout.take().context("serve's stdout")?)
        .read_line(&mut line)
        .await?;
    let quic: SocketAddr = line
        .trim()
        .strip_prefix("listening quic=")
        .and_then(|r| r.split_once(' '))
        .map(|(q, _)| q)
        .with_context(|| {
            format!(
                "serve did not start (see {}): {line:?}",
                state.join("serve.log").display()
            )
        })?
        .parse()?;
    let seen = drive(&pki, quic, Duration::from_secs(opts.seconds)).await?;
    let drops = kernel_drops(&state.join("admin.sock")).await;
    // SIGTERM: serve drains, writes what the audit ring holds, and exits.
    let pid = serve.id().context("serve's pid")?.to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()?;
    let status = tokio::time::timeout(Duration::from_mins(1), serve.wait()).await??;
    anyhow::ensure!(status.success(), "serve exited with {status}");
    let kernel_note = kernel_note(&state.join("serve.log"), cgroup);
    let _ = crate::ebpf::KernelPlane::unload(Path::new(crate::ebpf::DEFAULT_BPFFS), &instance);
    let key = read_key_file(&state.join("audit.key"))?;
    let audit = verify_all(&state.join("audit"), Some(&key))?;
    Ok(report(&state, &seen, &drops, &audit, &key, &kernel_note))
}

fn config_toml(state: &Path) -> String {
    let pki = state.join("pki");
    let mut toml = format!(
        r#"# Written by `bulkhead demo`.
trust_domain = "{DOMAIN}"
[listeners]
quic = "127.0.0.1:0"
tcp = "127.0.0.1:0"
admin = "{admin}"
[tls]
cert = "{pki}/server.pem"
key = "{pki}/server.key"
client_ca = ["{pki}/tenant-ca.pem"]
[kv]
pool_blocks = 2048
[ebpf]
mode = "auto"
[audit]
dir = "{state}/audit"
key_file = "{state}/audit.key"
[[models]]
name = "tiny"
backend = "cpu"
max_context_tokens = 2048
"#,
        admin = state.join("admin.sock").display(),
        pki = pki.display(),
        state = state.display(),
    );
    for (tenant, _, bursty) in TENANTS {
        // initech is held to 4 requests/s (burst 4): its bursts get 429s.
        let (rps, burst) = if bursty { (4.0, 4) } else { (20.0, 20) };
        let _ = write!(
            toml,
            "\n[[tenants]]\nid = \"{tenant}\"\nallowed_models = [\"tiny\"]\n\
             requests_per_second = {rps:?}\nrequest_burst = {burst}\nkv_block_quota = 512\n"
        );
    }
    toml
}

/// Every tenant's open-loop arrivals for `time`, each a streamed chat completion.
async fn drive(
    pki: &Path,
    quic: SocketAddr,
    time: Duration,
) -> anyhow::Result<BTreeMap<String, Seen>> {
    let mut tasks = Vec::new();
    for (i, (tenant, rate, bursty)) in TENANTS.into_iter().enumerate() {
        let send = connect(pki, tenant, quic).await?;
        let mut rng = Rng::new(7 + i as u64);
        let arrivals = if bursty {
            // Two-second bursts at 4x the rate, then quiet: the same average.
            let mut all = Vec::new();
            let mut start = Duration::ZERO;
            while start < time {
                all.extend(
                    rng.poisson(rate * 4.0, Duration::from_secs(2))
                        .into_iter()
                        .map(|t| start + t),
                );
                start += Duration::from_secs(8);
            }
            all.retain(|t| *t < time);
            all
        } else {
            rng.poisson(rate, time)
        };
        tasks.push(tokio::spawn(tenant_load(tenant, send, arrivals)));
    }
    let mut seen = BTreeMap::new();
    for task in tasks {
        let (tenant, s) = task.await??;
        seen.insert(tenant, s);
    }
    Ok(seen)
}

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

async fn connect(pki: &Path, tenant: &str, quic: SocketAddr) -> anyhow::Result<SendRequest> {
    let read = |name: String| {
        let path = pki.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let tls = crate::bench::tenant_tls(
        &read(certs::SERVER_CA_FILE.to_owned())?,
        &read(format!("client-{tenant}.pem"))?,
        &read(format!("client-{tenant}.key"))?,
        &QUIC_ALPN,
    )?;
    let endpoint = crate::bench::quic_client(tls, quic)?;
    let conn = endpoint.connect(quic, "localhost")?.await?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
    tokio::spawn(async move {
        let _endpoint = endpoint;
        driver.wait_idle().await
    });
    Ok(send)
}

async fn tenant_load(
    tenant: &'static str,
    send: SendRequest,
    arrivals: Vec<Duration>,
) -> anyhow::Result<(String, Seen)> {
    let start = Instant::now();
    let mut requests = Vec::new();
    for (n, at) in arrivals.into_iter().enumerate() {
        tokio::time::sleep_until(start + at).await;
        let mut send = send.clone();
        requests.push(tokio::spawn(async move { one(&mut send, tenant, n).await }));
    }
    let mut seen = Seen::default();
    for r in requests {
        seen.sent += 1;
        match r.await? {
            Ok(Outcome::Ok { ttft, tokens }) => {
                seen.ok += 1;
                seen.tokens += tokens;
                seen.ttft.extend(ttft);
            }
            Ok(Outcome::Limited) => seen.limited += 1,
            Ok(Outcome::Failed) | Err(_) => seen.failed += 1,
        }
    }
    seen.ttft.sort_unstable();
    Ok((tenant.to_owned(), seen))
}

enum Outcome {
    Ok { ttft: Option<Duration>, tokens: u64 },
    Limited,
    Failed,
}

async fn one(send: &mut SendRequest, tenant: &str, n: usize) -> anyhow::Result<Outcome> {
    let body = serde_json::json!({
        "model": "tiny", "stream": true, "max_tokens": MAX_TOKENS, "seed": n,
        "messages": [{"role": "user", "content": format!("{tenant} asks question {n}")}],
    });
    let request = http::Request::post("https://localhost/v1/chat/completions")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(())?;
    let t0 = Instant::now();
    let mut stream = send.send_request(request).await?;
    stream.send_data(Bytes::from(body.to_string())).await?;
    stream.finish().await?;
    let status = stream.recv_response().await?.status();
    if status == http::StatusCode::TOO_MANY_REQUESTS {
        return Ok(Outcome::Limited);
    }
    if status != http::StatusCode::OK {
        return Ok(Outcome::Failed);
    }
    let (mut ttft, mut text) = (None, String::new());
    while let Some(mut chunk) = stream.recv_data().await? {
        let piece = String::from_utf8_lossy(&chunk.copy_to_bytes(chunk.remaining())).into_owned();
        if ttft.is_none() && piece.contains("\"content\"") {
            ttft = Some(t0.elapsed());
        }
        text.push_str(&piece);
    }
    let tokens = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64());
    Ok(match tokens {
        Some(tokens) if text.trim_end().ends_with("[DONE]") => Outcome::Ok { ttft, tokens },
        _ => Outcome::Failed,
    })
}

/// Per tenant, packets the kernel dropped (from the admin endpoint's metrics).
async fn kernel_drops(admin: &Path) -> BTreeMap<String, u64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut out = BTreeMap::new();
    let Ok(mut s) = tokio::net::UnixStream::connect(admin).await else {
        return out;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("bulkhead_kernel_packets_total{tenant=\"")
            && let Some((tenant, rest)) = rest.split_once('"')
            && rest.contains("verdict=\"dropped\"")
            && let Some(n) = rest.rsplit(' ').next().and_then(|n| n.parse().ok())
        {
            out.insert(tenant.to_owned(), n);
        }
    }
    out
}

/// Whether `serve` ran with kernel enforcement, from its log.
fn kernel_note(log: &Path, cgroup: Option<String>) -> String {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    if let Some(line) = log
        .lines()
        .find(|l| l.contains("kernel enforcement is OFF"))
    {
        let why = line.split("OFF: ").nth(1).unwrap_or(line);
        return format!("kernel enforcement: off ({why})");
    }
    match cgroup {
        Some(c) => format!("kernel enforcement: on (eBPF programs on {c})"),
        None => "kernel enforcement: off (needs root to load the eBPF programs)".to_owned(),
    }
}

fn report(
    state: &Path,
    seen: &BTreeMap<String, Seen>,
    drops: &BTreeMap<String, u64>,
    audit: &[bulkhead_core::audit::PartitionReport],
    key: &KeyFile,
    kernel: &str,
) -> String {
    let _ = key;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bulkhead demo: 3 tenants over HTTP/3 with mutual TLS, one CPU worker (built-in model), state in {}",
        state.display()
    );
    let _ = writeln!(out, "{kernel}\n");
    let _ = writeln!(
        out,
        "{:<9} {:>8} {:>6} {:>7} {:>10} {:>10} {:>6} {:>7} {:>8} {:>14}",
        "tenant",
        "requests",
        "ok",
        "tokens",
        "p50 TTFT",
        "p99 TTFT",
        "429s",
        "errors",
        "k.drops",
        "audit verified"
    );
    for (tenant, s) in seen {
        let records = audit
            .iter()
            .find(|r| r.partition.as_str() == tenant)
            .map_or_else(
                || "none".to_owned(),
                |r| match &r.first_bad {
                    None => format!("{} ok", r.records),
                    Some(_) => format!("{} BAD", r.records),
                },
            );
        let _ = writeln!(
            out,
            "{:<9} {:>8} {:>6} {:>7} {:>10} {:>10} {:>6} {:>7} {:>8} {:>14}",
            tenant,
            s.sent,
            s.ok,
            s.tokens,
            crate::bench::ms(crate::bench::percentile(&s.ttft, 50.0)),
            crate::bench::ms(crate::bench::percentile(&s.ttft, 99.0)),
            s.limited,
            s.failed,
            drops
                .get(tenant)
                .map_or_else(|| "-".to_owned(), ToString::to_string),
            records
        );
    }
    let bad = audit.iter().filter(|r| r.first_bad.is_some()).count();
    let _ = writeln!(
        out,
        "\naudit: {} partition(s) verified (chains and seals), {bad} bad; for more: \
         bulkhead audit report --dir {state}/audit --key {state}/audit.key --tenant acme",
        audit.len(),
        state = state.display()
    );
    out
}

/// As root with cgroup v2: a cgroup of the demo's own, so `serve` (a child)
/// can attach the eBPF programs there. Left (and removed) on drop.
struct DemoCgroup {
    dir: PathBuf,
    /// The cgroup the demo came from, to return to.
    origin: PathBuf,
    note: String,
}

impl DemoCgroup {
    fn enter() -> Option<Self> {
        let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
        let root = PathBuf::from(mounts.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then_some(path)
        })?);
        if !root.join("cgroup.controllers").exists() || !is_root_user() {
            return None;
        }
        let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let origin = root.join(
            text.lines()
                .find_map(|l| l.strip_prefix("0::"))?
                .trim_start_matches('/'),
        );
        let dir = root.join(format!("bulkhead-demo-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        if std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string()).is_err() {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        let note = dir.display().to_string();
        Some(Self { dir, origin, note })
    }
}

impl DemoCgroup {
    /// Back to the cgroup the demo came from (its children stay).
    fn leave(&self) {
        let _ = std::fs::write(
            self.origin.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}

impl Drop for DemoCgroup {
    fn drop(&mut self) {
        // Out of it (if not already), then it goes once serve and its workers have.
        self.leave();
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn is_root_user() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}
