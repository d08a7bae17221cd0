//! `bulkhead audit ...`: keys, verification, queries, reports, the live
//! tail, and the load and bench drivers of the writer.

use super::writer::list_segments;
use super::{
    AuditWriter, CommitObserver, Committed, KeyFile, TailServer, WriterConfig, generate_master_key,
    read_key_file, read_master_key, unix_now_ns,
};
use anyhow::{Context as _, bail};
use bulkhead_core::TenantId;
use bulkhead_core::audit::{
    AuditEvent, ContentDigest, EventKind, OpenedRecord, PartitionId, PartitionReport,
    PartitionVerifier, RequestEvent, TenantKey, parse_time,
};
use bulkhead_core::wire::RequestId;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod bench;

/// `bulkhead audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Write a new random master key (hex, file mode 0600).
    Keygen {
        /// The key file to create.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Write a tenant-scoped key: it opens that tenant's partition only.
    ExportKey {
        /// The master key file.
        #[arg(long)]
        master_key: PathBuf,
        /// The tenant (or `_host`).
        #[arg(long)]
        tenant: String,
        /// The key file to create (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Check every chain and header (and with a key, every seal); report the
    /// first bad record of each partition. Exits nonzero if any is bad.
    Verify {
        /// The audit directory.
        #[arg(long)]
        dir: PathBuf,
        /// A master key (every seal) or a tenant key (that tenant's seals).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Print one tenant's records as JSON lines (only if its partition verifies).
    Query(FilterArgs),
    /// A SOC 2-style summary of one tenant's records.
    Report {
        /// Which records.
        #[command(flatten)]
        filter: FilterArgs,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Follow the live record stream of a running writer.
    Tail {
        /// The writer's tail socket.
        #[arg(long)]
        socket: PathBuf,
        /// Only this tenant's records (or `_host`).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Drive the writer with synthetic records, printing each durable one as
    /// `ack <tenant> <seq> <request id>` (for crash tests and benchmarks).
    #[command(hide = true)]
    Load(LoadArgs),
    /// Measure sealed + chained + group-committed records/s and the time a
    /// producer waits to enter the ring, against an unsealed baseline.
    Bench(bench::BenchArgs),
}

/// Which records: a tenant and a time window.
#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// The audit directory.
    #[arg(long)]
    dir: PathBuf,
    /// A master key, or this tenant's key.
    #[arg(long)]
    key: PathBuf,
    /// The tenant (or `_host`).
    #[arg(long)]
    tenant: String,
    /// Records at or after (RFC 3339 or Unix seconds).
    #[arg(long)]
    since: Option<String>,
    /// Records before (RFC 3339 or Unix seconds).
    #[arg(long)]
    until: Option<String>,
}

/// `audit load` options.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The audit directory.
    #[arg(long)]
    dir: PathBuf,
    /// The master key file.
    #[arg(long)]
    key: PathBuf,
    /// Records to submit.
    #[arg(long)]
    records: u64,
    /// Tenants to spread them over, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    tenants: Vec<String>,
    /// Records per second (default: as fast as the writer takes them).
    #[arg(long)]
    rate: Option<u64>,
    /// Close segments at this size.
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// Also serve the live tail on this socket.
    #[arg(long)]
    tail_socket: Option<PathBuf>,
}

/// Runs an `audit` subcommand; returns what to print.
pub fn run(command: AuditCommand) -> anyhow::Result<String> {
    match command {
        AuditCommand::Keygen { out, force } => {
            write_secret(&out, generate_master_key().to_hex().as_bytes(), force)?;
            Ok(format!(
                "wrote a new audit master key to {}\n",
                out.display()
            ))
        }
        AuditCommand::ExportKey {
            master_key,
            tenant,
            out,
            force,
        } => {
            let master = read_master_key(&master_key)?;
            let partition = parse_partition(&tenant)?;
            let key = master.tenant_key(&partition);
            write_secret(&out, key.export().as_bytes(), force)?;
            Ok(format!(
                "wrote the key of partition {partition} (key id {}) to {}\n",
                key.key_id(),
                out.display()
            ))
        }
        AuditCommand::Verify { dir, key } => verify(&dir, key.as_deref()),
        AuditCommand::Query(filter) => query(&filter),
        AuditCommand::Report { filter, json } => report(&filter, json),
        AuditCommand::Tail { socket, tenant } => tail(&socket, tenant.as_deref()),
        AuditCommand::Load(args) => load(&args),
        AuditCommand::Bench(args) => bench::run(&args),
    }
}

fn parse_partition(name: &str) -> anyhow::Result<PartitionId> {
    PartitionId::parse(name.trim()).with_context(|| format!("--tenant `{}`", name.trim()))
}

/// Creates `path` with mode 0600 and writes `bytes` (key material).
fn write_secret(path: &Path, bytes: &[u8], force: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).with_context(|| {
        format!(
            "creating {}{}",
            path.display(),
            if force {
                ""
            } else {
                " (use --force to replace it)"
            }
        )
    })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// The partitions under `dir`, by name.
fn partitions(dir: &Path) -> anyhow::Result<Vec<PartitionId>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("reading the audit directory {}", dir.display()))?
    {
        let entry = entry?;
        if let Ok(p) = PartitionId::parse(&entry.file_name().to_string_lossy())
            && entry.path().is_dir()
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Verifies one partition, one segment file at a time; with a key, `visit`
/// sees every record that passed.
fn verify_dir_partition(
    dir: &Path,
    partition: &PartitionId,
    key: Option<&TenantKey>,
    visit: &mut dyn FnMut(OpenedRecord),
) -> anyhow::Result<PartitionReport> {
    let pdir = dir.join(partition.as_str());
    let segments = list_segments(&pdir)
        .with_context(|| format!("listing the segments of {}", pdir.display()))?;
    let mut v = PartitionVerifier::new(partition.clone(), key);
    for (i, (number, path)) in segments.iter().enumerate() {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if v.segment(*number, &bytes, i + 1 == segments.len(), visit)
            .is_err()
        {
            break;
        }
    }
    Ok(v.finish())
}

/// Verifies every partition under `dir` (with `key`, every seal it opens too).
pub fn verify_all(dir: &Path, key: Option<&KeyFile>) -> anyhow::Result<Vec<PartitionReport>> {
    partitions(dir)?
        .iter()
        .map(|p| {
            let tenant_key = key.and_then(|k| k.for_partition(p));
            verify_dir_partition(dir, p, tenant_key.as_ref(), &mut |_| {})
        })
        .collect()
}

fn verify(dir: &Path, key: Option<&Path>) -> anyhow::Result<String> {
    let key = key.map(read_key_file).transpose()?;
    let parts = partitions(dir)?;
    let mut out = String::new();
    let mut bad = 0;
    for p in &parts {
        let tenant_key = key.as_ref().and_then(|k| k.for_partition(p));
        let report = verify_dir_partition(dir, p, tenant_key.as_ref(), &mut |_| {})?;
        let checked = if report.sealed_checked {
            "chain and seals"
        } else {
            "chain only"
        };
        match &report.first_bad {
            None => {
                let _ = writeln!(
                    out,
                    "ok    tenant {p}: {} segment(s), {} record(s), seq {}..={}, {checked}",
                    report.segments,
                    report.records,
                    report.base_seq.unwrap_or(0) + 1,
                    report.last_seq
                );
            }
            Some(b) => {
                bad += 1;
                let _ = writeln!(out, "BAD   {b} [{checked}]");
            }
        }
    }
    if let Some(KeyFile::Tenant(t)) = &key
        && !parts.contains(t.partition())
    {
        let _ = writeln!(
            out,
            "note: the key is scoped to tenant {}, which has no partition here",
            t.partition()
        );
    }
    let _ = writeln!(out, "{} partition(s) checked, {bad} bad", parts.len());
    if bad > 0 {
        print_now(&out)?;
        bail!("audit verify: {bad} of {} partition(s) failed", parts.len());
    }
    Ok(out)
}

fn print_now(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

/// The records of the filter's tenant in its window, only if the whole
/// partition verifies under the key.
fn select(filter: &FilterArgs) -> anyhow::Result<(PartitionId, Vec<OpenedRecord>)> {
    let partition = parse_partition(&filter.tenant)?;
    let key = read_key_file(&filter.key)?;
    let Some(tenant_key) = key.for_partition(&partition) else {
        let scope = match &key {
            KeyFile::Tenant(t) => t.partition().to_string(),
            KeyFile::Master(_) => String::new(),
        };
        bail!(
            "key file {} is scoped to tenant {scope}; it cannot read tenant {partition}",
            filter.key.display()
        );
    };
    let since = filter
        .since
        .as_deref()
        .map(parse_time)
        .transpose()
        .context("--since")?
        .unwrap_or(0);
    let until = filter
        .until
        .as_deref()
        .map(parse_time)
        .transpose()
        .context("--until")?
        .unwrap_or(u64::MAX);
    if !filter.dir.join(partition.as_str()).is_dir() {
        bail!(
            "no partition for tenant {partition} in {}",
            filter.dir.display()
        );
    }
    let mut records = Vec::new();
    let report = verify_dir_partition(&filter.dir, &partition, Some(&tenant_key), &mut |r| {
        if (since..until).contains(&r.event.time_unix_ns) {
            records.push(r);
        }
    })?;
    if let Some(bad) = report.first_bad {
        // Nothing opened is shown when any record fails.
        drop(records);
        bail!("{bad}; nothing printed");
    }
    Ok((partition, records))
}

fn query(filter: &FilterArgs) -> anyhow::Result<String> {
    let (partition, records) = select(filter)?;
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let written = records.iter().try_for_each(|r| {
        serde_json::to_writer(&mut stdout, &r.event.to_json(&partition, r.seq))?;
        stdout.write_all(b"\n")
    });
    match written.and_then(|()| stdout.flush()) {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(String::new()),
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within the slice"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// What a report counts.
#[derive(Default)]
struct Tally {
    records: usize,
    kinds: BTreeMap<&'static str, u64>,
    requests: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    latency_us: Vec<u64>,
    ttft_us: Vec<u64>,
    tokens_in: u64,
    tokens_out: u64,
    keys: BTreeSet<String>,
    drop_packets: u64,
    drop_bytes: u64,
    first: Option<u64>,
    last: Option<u64>,
}

impl Tally {
    fn of(records: &[OpenedRecord]) -> Self {
        let mut t = Self {
            records: records.len(),
            ..Self::default()
        };
        for r in records {
            *t.kinds.entry(r.event.kind.name()).or_default() += 1;
            let at = r.event.time_unix_ns;
            t.first = Some(t.first.map_or(at, |f| f.min(at)));
            t.last = Some(t.last.map_or(at, |l| l.max(at)));
            match &r.event.kind {
                EventKind::Request(q) => t.request(q),
                EventKind::KernelDrops(d) => {
                    t.drop_packets += d.packets;
                    t.drop_bytes += d.bytes;
                }
                _ => {}
            }
        }
        t.latency_us.sort_unstable();
        t.ttft_us.sort_unstable();
        t
    }

    fn request(&mut self, q: &RequestEvent) {
        self.requests += 1;
        if q.is_success() {
            self.ok += 1;
        } else {
            let code = q
                .error_code
                .clone()
                .unwrap_or_else(|| format!("http_{}", q.status));
            *self.errors.entry(code).or_default() += 1;
        }
        self.latency_us.push(q.latency_us);
        self.ttft_us.extend(q.ttft_us);
        self.tokens_in += u64::from(q.input_tokens);
        self.tokens_out += u64::from(q.output_tokens);
        if let Some(k) = &q.api_key_prefix {
            self.keys.insert(k.clone());
        }
    }

    #[expect(clippy::cast_precision_loss, reason = "rates for a report")]
    fn rate(&self, n: u64) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            n as f64 / self.requests as f64
        }
    }

    #[expect(clippy::cast_precision_loss, reason = "milliseconds for a report")]
    fn ms(sorted: &[u64], p: f64) -> Option<f64> {
        percentile(sorted, p).map(|us| us as f64 / 1000.0)
    }

    fn json(&self, partition: &PartitionId, filter: &FilterArgs) -> serde_json::Value {
        let failed = self.requests - self.ok;
        serde_json::json!({
            "tenant": partition.as_str(),
            "since": filter.since,
            "until": filter.until,
            "first_record": self.first.map(bulkhead_core::audit::format_rfc3339),
            "last_record": self.last.map(bulkhead_core::audit::format_rfc3339),
            "records": self.records,
            "records_by_type": self.kinds,
            "requests": self.requests,
            "succeeded": self.ok,
            "failed": failed,
            "success_rate": self.rate(self.ok),
            "error_rate": self.rate(failed),
            "errors_by_code": self.errors,
            "latency_ms": {
                "p50": Self::ms(&self.latency_us, 50.0),
                "p99": Self::ms(&self.latency_us, 99.0),
            },
            "ttft_ms": { "p50": Self::ms(&self.ttft_us, 50.0), "p99": Self::ms(&self.ttft_us, 99.0) },
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "distinct_api_keys": self.keys.len(),
            "api_key_prefixes": self.keys,
            "kernel_dropped_packets": self.drop_packets,
            "kernel_dropped_bytes": self.drop_bytes,
        })
    }

    fn table(&self, partition: &PartitionId, filter: &FilterArgs) -> String {
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2} ms"));
        let failed = self.requests - self.ok;
        let mut out = String::new();
        let _ = writeln!(out, "audit report: tenant {partition}");
        let _ = writeln!(
            out,
            "  window            {} .. {}",
            filter.since.as_deref().unwrap_or("(start)"),
            filter.until.as_deref().unwrap_or("(end)")
        );
        let _ = writeln!(out, "  records           {}", self.records);
        for (k, n) in &self.kinds {
            let _ = writeln!(out, "    {k:<22}{n}");
        }
        let _ = writeln!(out, "  requests          {}", self.requests);
        let _ = writeln!(
            out,
            "  success rate      {:.2}% ({})",
            self.rate(self.ok) * 100.0,
            self.ok
        );
        let _ = writeln!(
            out,
            "  error rate        {:.2}% ({failed})",
            self.rate(failed) * 100.0
        );
        for (code, n) in &self.errors {
            let _ = writeln!(out, "    {code:<22}{n}");
        }
        let _ = writeln!(
            out,
            "  latency p50 / p99 {} / {}",
            opt(Self::ms(&self.latency_us, 50.0)),
            opt(Self::ms(&self.latency_us, 99.0))
        );
        let _ = writeln!(
            out,
            "  TTFT p50 / p99    {} / {}",
            opt(Self::ms(&self.ttft_us, 50.0)),
            opt(Self::ms(&self.ttft_us, 99.0))
        );
        let _ = writeln!(
            out,
            "  tokens in / out   {} / {}",
            self.tokens_in, self.tokens_out
        );
        let _ = writeln!(out, "  distinct API keys {}", self.keys.len());
        if self.drop_packets > 0 {
            let _ = writeln!(
                out,
                "  kernel drops      {} packets, {} bytes",
                self.drop_packets, self.drop_bytes
            );
        }
        out
    }
}

fn report(filter: &FilterArgs, json: bool) -> anyhow::Result<String> {
    let (partition, records) = select(filter)?;
    let tally = Tally::of(&records);
    Ok(if json {
        format!("{:#}\n", tally.json(&partition, filter))
    } else {
        tally.table(&partition, filter)
    })
}

fn tail(socket: &Path, tenant: Option<&str>) -> anyhow::Result<String> {
    let filter = tenant.map(parse_partition).transpose()?;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to the audit tail socket {}", socket.display()))?;
    let line = filter.map_or_else(|| "*\n".to_owned(), |p| format!("{p}\n"));
    stream
        .write_all(line.as_bytes())
        .context("subscribing to the audit tail")?;
    let reader = std::io::BufReader::new(stream);
    let mut stdout = std::io::stdout().lock();
    for line in reader.lines() {
        let line = line.context("reading the audit tail")?;
        writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .context("writing to stdout")?;
    }
    Ok("audit tail: the writer closed the stream (stopped, or this client fell behind)\n".into())
}

/// Prints `ack <tenant> <seq> <request id>` for each durable record, flushed per group.
struct AckPrinter;

impl CommitObserver for AckPrinter {
    fn committed(&mut self, records: &[Committed<'_>]) {
        let mut text = String::with_capacity(records.len() * 64);
        for r in records {
            if let EventKind::Request(q) = &r.event.kind {
                let _ = writeln!(text, "ack {} {} {}", r.partition, r.seq, q.request_id);
            }
        }
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            tracing::warn!("audit load: stdout closed");
        }
    }
}

/// A synthetic request of `tenant`, numbered `i`.
pub(super) fn synthetic_request(tenant: &TenantId, i: u64, id: RequestId) -> AuditEvent {
    AuditEvent {
        time_unix_ns: unix_now_ns(),
        kind: EventKind::Request(RequestEvent {
            request_id: id,
            tenant: tenant.clone(),
            model: "tiny-llama".into(),
            prompt_digest: ContentDigest([u8::try_from(i & 0xff).unwrap_or(0); 32]),
            response_digest: ContentDigest([0x5a; 32]),
            input_tokens: 128 + u32::try_from(i % 512).unwrap_or(0),
            output_tokens: 64,
            ttft_us: Some(20_000 + i % 5_000),
            latency_us: 250_000 + i % 50_000,
            worker: Some(u32::try_from(i % 4).unwrap_or(0)),
            rerouted: false,
            cache_hit: i.is_multiple_of(3),
            status: if i.is_multiple_of(50) { 429 } else { 200 },
            error_code: i.is_multiple_of(50).then(|| "rate_limited".to_owned()),
            source: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 40_000))),
            api_key_prefix: Some(format!("bk_{:04}", i % 7)),
        }),
    }
}

#[expect(clippy::cast_precision_loss, reason = "pacing and a rate for the log")]
fn load(args: &LoadArgs) -> anyhow::Result<String> {
    let master = read_master_key(&args.key)?;
    let tenants = args
        .tenants
        .iter()
        .map(|t| TenantId::new(t.trim()).with_context(|| format!("--tenants: `{t}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = WriterConfig::new(&args.dir);
    if let Some(b) = args.segment_bytes {
        config.segment_max_bytes = b;
    }
    let mut observers: Vec<Box<dyn CommitObserver>> = vec![Box::new(AckPrinter)];
    let tail = match &args.tail_socket {
        Some(path) => {
            let (server, observer) = TailServer::bind(path)?;
            observers.push(Box::new(observer));
            Some(server)
        }
        None => None,
    };
    let writer = AuditWriter::start(master, config, observers)?;
    let sink = writer.sink();
    let base = super::new_request_id().0;
    let start = Instant::now();
    let mut last = None;
    for i in 0..args.records {
        if let Some(rate) = args.rate.filter(|r| *r > 0) {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let tenant = &tenants[usize::try_from(i).unwrap_or(0) % tenants.len()];
        let event = synthetic_request(tenant, i, RequestId(base.wrapping_add(u128::from(i))));
        last = Some(sink.submit(event, Duration::from_secs(5))?);
    }
    if let Some(t) = last {
        sink.wait_durable(t, Duration::from_mins(1))?;
    }
    let counters = sink.counters();
    writer.shutdown()?;
    drop(tail);
    eprintln!(
        "audit load: {} records durable in {} groups, {:.0} records/s",
        counters.written,
        counters.groups,
        counters.written as f64 / start.elapsed().as_secs_f64()
    );
    Ok(String::new())
}
