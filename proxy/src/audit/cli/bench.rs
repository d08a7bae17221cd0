//! `audit bench`: the writer's throughput and the producers' ring-entry
//! wait, each against a baseline measured in the same run.

use super::synthetic_request;
use crate::audit::{AuditWriter, WriterConfig, generate_master_key};
use anyhow::Context as _;
use bulkhead_core::TenantId;
use bulkhead_core::audit::{AuditEvent, PartitionId, SegmentHeader, SegmentSealer, genesis_chain};
use bulkhead_core::wire::RequestId;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Goal: sealed, chained, group-committed records/s on one writer core.
const GOAL_RECORDS_PER_SEC: f64 = 200_000.0;
/// Goal: p99 time a producer waits to enter the ring.
const GOAL_P99_ENTRY: Duration = Duration::from_micros(20);

/// `audit bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Records in the throughput run.
    #[arg(long, default_value_t = 400_000)]
    records: u64,
    /// Offered records/s in the ring-entry latency run (two producers).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Where to write (default: a fresh directory under the temp dir, removed after).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn events(n: u64, tenants: &[TenantId]) -> Vec<AuditEvent> {
    (0..n)
        .map(|i| {
            let t = &tenants[usize::try_from(i).unwrap_or(0) % tenants.len()];
            synthetic_request(t, i, RequestId(u128::from(i)))
        })
        .collect()
}

#[expect(clippy::cast_precision_loss, reason = "rates for a report")]
fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Sealed + chained + group-committed: one producer thread feeds the writer thread.
fn sealed_throughput(dir: &Path, events: Vec<AuditEvent>) -> anyhow::Result<(f64, u64)> {
    let n = events.len() as u64;
    let writer = AuditWriter::start(generate_master_key(), WriterConfig::new(dir), Vec::new())?;
    let sink = writer.sink();
    let start = Instant::now();
    let mut last = None;
    for e in events {
        last = Some(sink.submit(e, Duration::from_secs(10))?);
    }
    if let Some(t) = last {
        sink.wait_durable(t, Duration::from_mins(2))?;
    }
    let elapsed = start.elapsed();
    let groups = sink.counters().groups;
    writer.shutdown()?;
    Ok((per_sec(n, elapsed), groups))
}

/// The baseline: the same events, postcard-encoded and appended unsealed
/// and unchained to one file, fsynced every `group` records, on one thread.
fn plain_append(dir: &Path, events: &[AuditEvent], group: usize) -> anyhow::Result<f64> {
    let path = dir.join("plain-baseline.bin");
    let mut file = std::fs::File::create(&path).context("creating the baseline file")?;
    let mut buf = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    for chunk in events.chunks(group.max(1)) {
        buf.clear();
        for e in chunk {
            let at = buf.len();
            buf.extend_from_slice(&[0; 4]);
            buf = postcard::to_extend(e, buf).context("encoding")?;
            let len = u32::try_from(buf.len() - at - 4).unwrap_or(u32::MAX);
            buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        file.write_all(&buf)?;
        file.sync_data()?;
    }
    let rate = per_sec(events.len() as u64, start.elapsed());
    std::fs::remove_file(&path).context("removing the baseline file")?;
    Ok(rate)
}

/// Seal + chain alone, in memory, on this thread.
fn seal_only(events: &[AuditEvent]) -> anyhow::Result<f64> {
    let partition = PartitionId::parse("bench")?;
    let key = generate_master_key().tenant_key(&partition);
    let header = SegmentHeader {
        segment: 1,
        key_id: key.key_id(),
        created_unix_ns: 0,
        prev_seq: 0,
        prev_chain: genesis_chain(&partition),
        partition,
    };
    let mut sealer = SegmentSealer::new(&key, &header)?;
    let mut out = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    for e in events {
        if out.len() > (1 << 20) {
            out.clear();
        }
        sealer.seal(e, &mut out)?;
    }
    Ok(per_sec(events.len() as u64, start.elapsed()))
}

/// Ring-entry wait under `rate` records/s offered by two paced producers.
fn entry_latency(
    dir: &Path,
    rate: u64,
    seconds: f64,
    tenants: &[TenantId],
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let writer = AuditWriter::start(generate_master_key(), WriterConfig::new(dir), Vec::new())?;
    let per_producer = (rate / 2).max(1);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a count of records"
    )]
    let count = (per_producer as f64 * seconds) as u64;
    let handles: Vec<_> = (0..2u64)
        .map(|p| {
            let sink = writer.sink();
            let batch = events(count.min(200_000), tenants);
            std::thread::spawn(move || {
                let mut waits = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
                let start = Instant::now();
                let gap = Duration::from_secs(1) / u32::try_from(per_producer).unwrap_or(u32::MAX);
                let mut refused = 0;
                for i in 0..count {
                    let due = start + gap * u32::try_from(i).unwrap_or(u32::MAX);
                    while Instant::now() < due {
                        std::hint::spin_loop();
                    }
                    let mut e = batch[usize::try_from(i).unwrap_or(0) % batch.len()].clone();
                    e.time_unix_ns = p;
                    let t0 = Instant::now();
                    let r = sink.submit(e, Duration::from_millis(50));
                    waits.push(t0.elapsed());
                    if r.is_err() {
                        refused += 1;
                    }
                }
                (waits, refused)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut refused = 0;
    for h in handles {
        let (w, r) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a producer thread panicked"))?;
        all.extend(w);
        refused += r;
    }
    writer.shutdown()?;
    all.sort_unstable();
    Ok((all, refused))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within the slice"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs the bench and returns its table.
pub fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let (dir, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "bulkhead-audit-bench-{}-{}",
                std::process::id(),
                crate::audit::unix_now_ns()
            )),
            true,
        ),
    };
    let tenants: Vec<_> = ["alpha", "beta", "gamma", "delta"]
        .iter()
        .map(|t| TenantId::new(t))
        .collect::<Result<_, _>>()?;
    let result = (|| {
        let evs = events(args.records, &tenants);
        let sealed_only = seal_only(&evs)?;
        let (sealed, groups) = sealed_throughput(&dir.join("throughput"), evs.clone())?;
        let group = usize::try_from(args.records / groups.max(1)).unwrap_or(1);
        let plain = plain_append(&dir, &evs, group)?;
        let (waits, refused) =
            entry_latency(&dir.join("latency"), args.rate, args.seconds, &tenants)?;
        let mut out = String::new();
        let ok = |b: bool| if b { "meets goal" } else { "MISSES goal" };
        let _ = writeln!(
            out,
            "audit bench: {} records over {} tenants, writer thread + 1 producer",
            args.records,
            tenants.len()
        );
        let _ = writeln!(
            out,
            "  sealed+chained+group-committed  {sealed:>12.0} records/s   goal >= {GOAL_RECORDS_PER_SEC:.0}: {}",
            ok(sealed >= GOAL_RECORDS_PER_SEC)
        );
        let _ = writeln!(
            out,
            "  baseline: plain unsealed append {plain:>12.0} records/s   (same groups, fsync each) ratio sealed/plain {:.2}",
            sealed / plain
        );
        let _ = writeln!(
            out,
            "  seal+chain only, in memory      {sealed_only:>12.0} records/s"
        );
        let _ = writeln!(
            out,
            "  group commits {groups}, mean {group} records each (one fsync per partition per group)"
        );
        let p99 = pct(&waits, 99.0);
        let _ = writeln!(
            out,
            "  ring entry wait at {} records/s offered ({} submits, {refused} refused): p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us, max {:.2} us   goal p99 <= {} us: {}",
            args.rate,
            waits.len(),
            pct(&waits, 50.0).as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            pct(&waits, 99.9).as_secs_f64() * 1e6,
            waits.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
            GOAL_P99_ENTRY.as_micros(),
            ok(p99 <= GOAL_P99_ENTRY)
        );
        Ok::<_, anyhow::Error>(out)
    })();
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
