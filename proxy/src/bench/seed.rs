//! `bulkhead bench seed`: the seed's table, reproduced.
//!
//! Tenant A (`alpha`) sends 10 req/s, open-loop Poisson; tenant B
//! (`bravo`) bursts at 200 req/s: Poisson at 200 req/s during the first
//! second of every two, nothing in between (a mean of 100 req/s, more than
//! twice what the worker serves, so B is backlogged throughout). Both send
//! streamed completions with prompts of 32–96 tokens (uniform) and
//! `max_tokens` 32. The `sim` worker is paced by a cost model of one H100
//! SXM serving a Llama-3-70B-class model in FP8
//! (`deploy/calibration/h100-sxm-llama3-70b-fp8.toml`, built in; its
//! comments carry the arithmetic), with 64 slots and 1600 KV blocks.
//!
//! The same seeded arrivals run seven times: A alone (the baseline), then
//! (1) FIFO, (2) rate limit only (FIFO dispatch, each tenant limited to half
//! the worker's modelled capacity in requests per second, 429 beyond it),
//! (3) fair queue 1:1, (4) fair queue 2:1 (A weight 2), (5) a dedicated
//! worker per tenant (isolation `process`): two worker processes with half
//! the slots and blocks each. Two processes on one GPU time-share it, and
//! B keeps its worker busy all the time, so each dedicated worker runs a
//! cost model at half the bandwidth and half the compute of the GPU (its
//! steps take twice as long); this also leaves aside that two copies of a
//! 70B model's weights (2 × 72.65 GB) do not fit in one H100's 80 GB.
//!
//! The table has A's and B's p99 time to first token, Jain's fairness
//! index (see [`super::load`]), A's p99 against A alone, and B's 429s. The
//! goals of issue 7, checked and printed: under fair queue 1:1, A's p99
//! within 1.2 × A alone and a fairness index of at least 0.99.

use super::{
    TempDir, float,
    load::{self, Burst, Lengths, Report, Scenario, TenantLoad},
    verdict,
};
use anyhow::Context as _;
use bulkhead_kernels::sim::{CostModel, MixedBatch};
use std::{fmt::Write as _, path::PathBuf, time::Duration};

/// The built-in calibration.
const CALIBRATION: &str = include_str!("../../../deploy/calibration/h100-sxm-llama3-70b-fp8.toml");
/// Its name in the repository.
const CALIBRATION_NAME: &str = "deploy/calibration/h100-sxm-llama3-70b-fp8.toml";
const A: &str = "alpha";
const B: &str = "bravo";
const A_RATE: f64 = 10.0;
const B_BURST: Burst = Burst {
    rate: 200.0,
    on_secs: 1.0,
    period_secs: 2.0,
};
const PROMPT: Lengths = Lengths { min: 32, max: 96 };
const OUTPUT: u32 = 32;
const SLOTS: u32 = 64;
const BLOCKS: u32 = 1600;
const MAX_QUEUED: u32 = 128;
/// Goal: p99 TTFT of A under fair 1:1 over A alone.
const GOAL_RATIO: f64 = 1.2;
/// Goal: Jain's index under fair 1:1.
const GOAL_JAIN: f64 = 0.99;
/// Start and end of the section `--out` replaces in an existing file; a
/// run with `--mixed-batch` has a section of its own (see [`markers`]).
const BEGIN: &str = "<!-- bench seed: begin -->";
const END: &str = "<!-- bench seed: end -->";

/// `bulkhead bench seed` options.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SeedArgs {
    /// Seconds of arrivals in each of the six runs (about 15 minutes in
    /// all at 120). Under ~100 s, A's p99 rests on a handful of its
    /// requests and moves by ±10% from run to run.
    #[arg(long, default_value_t = 120)]
    pub seconds: u64,
    /// Seed of the arrivals.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the markdown here: between `<!-- bench seed: begin -->` and
    /// `<!-- bench seed: end -->` when the file has them, else appended (or a new file).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A calibration file instead of the built-in 70B FP8 one.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Overrides the calibration's model of steps that mix prompts with
    /// decodes: `additive` or `roofline` (see `kernels/src/sim.rs`).
    #[arg(long)]
    pub mixed_batch: Option<MixedBatch>,
    /// The `bulkhead` binary for workers; `None` for this process's own.
    #[arg(skip)]
    pub program: Option<PathBuf>,
}

/// The cost model in force and the files the workers read.
struct Calibration {
    name: String,
    cost: CostModel,
    half_cost: CostModel,
    full: PathBuf,
    half: PathBuf,
    _dir: TempDir,
}

impl Calibration {
    fn load(path: Option<&PathBuf>, mixed_batch: Option<MixedBatch>) -> anyhow::Result<Self> {
        let dir = TempDir::new("seed")?;
        let (name, text) = match path {
            Some(p) => (
                p.display().to_string(),
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            ),
            None => (CALIBRATION_NAME.to_owned(), CALIBRATION.to_owned()),
        };
        let source = dir.path().join("source.toml");
        std::fs::write(&source, &text)?;
        let mut cost = CostModel::from_file(&source)?;
        if let Some(m) = mixed_batch {
            cost.mixed_batch = m;
        }
        // Two busy processes time-share the GPU: each gets half of it.
        let half_cost = CostModel {
            per_prefill_token_ns: cost.per_prefill_token_ns * 2.0,
            per_decode_seq_ns: cost.per_decode_seq_ns * 2.0,
            bandwidth_bytes_per_s: cost.bandwidth_bytes_per_s / 2.0,
            ..cost.clone()
        };
        let (full, half) = (dir.path().join("full.toml"), dir.path().join("half.toml"));
        std::fs::write(&full, cost.to_toml())?;
        std::fs::write(&half, half_cost.to_toml())?;
        Ok(Self {
            name,
            cost,
            half_cost,
            full,
            half,
            _dir: dir,
        })
    }
}

/// A step of a full batch of `slots` sequences of the benches' requests,
/// decoding, with `prompt_tokens` of prefill riding along.
fn full_step(cost: &CostModel, slots: u32, prompt_tokens: f64) -> Duration {
    let context = f64::from(slots) * (PROMPT.mean() + f64::from(OUTPUT) / 2.0);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "small"
    )]
    cost.step_time(
        prompt_tokens.round() as usize,
        slots as usize,
        context as usize,
    )
}

/// Requests per second a worker of `slots` serves at a full batch: every
/// step decodes `slots` sequences and prefills the prompts of the
/// `slots / OUTPUT` requests that replace the ones it finishes.
fn capacity_rps(cost: &CostModel, slots: u32) -> f64 {
    let replaced = f64::from(slots) / f64::from(OUTPUT);
    replaced / full_step(cost, slots, replaced * PROMPT.mean()).as_secs_f64()
}

/// The runs: a label and its scenario.
fn scenarios(args: &SeedArgs, cal: &Calibration) -> Vec<(&'static str, Scenario)> {
    let tenant = |name: &str| TenantLoad {
        prompt_tokens: PROMPT,
        max_tokens: Lengths::fixed(OUTPUT),
        ..TenantLoad::new(name, 0.0)
    };
    let a = TenantLoad {
        rate: A_RATE,
        ..tenant(A)
    };
    let b = TenantLoad {
        burst: Some(B_BURST),
        ..tenant(B)
    };
    let base = |tenants: Vec<TenantLoad>, policy: &str| Scenario {
        seconds: float(usize::try_from(args.seconds.max(2)).unwrap_or(usize::MAX)),
        seed: args.seed,
        policy: policy.to_owned(),
        slots: SLOTS,
        blocks: BLOCKS,
        max_queued: MAX_QUEUED,
        calibration: Some(cal.full.clone()),
        ..Scenario::new(tenants)
    };
    let limit = capacity_rps(&cal.cost, SLOTS) / 2.0;
    let limited = |t: &TenantLoad| TenantLoad {
        rate_limit: Some(limit),
        ..t.clone()
    };
    let weighted = |t: &TenantLoad, weight| TenantLoad {
        weight,
        ..t.clone()
    };
    let dedicated = |t: &TenantLoad| TenantLoad {
        dedicated: true,
        ..t.clone()
    };
    vec![
        ("A alone (baseline)", base(vec![a.clone()], "fair")),
        ("FIFO", base(vec![a.clone(), b.clone()], "fifo")),
        (
            "rate limit only",
            base(vec![limited(&a), limited(&b)], "fifo"),
        ),
        ("fair queue 1:1", base(vec![a.clone(), b.clone()], "fair")),
        (
            "fair queue 2:1",
            base(vec![weighted(&a, 2), weighted(&b, 1)], "fair"),
        ),
        (
            "dedicated worker per tenant",
            Scenario {
                calibration: Some(cal.half.clone()),
                ..base(vec![dedicated(&a), dedicated(&b)], "fair")
            },
        ),
    ]
}

/// Runs the bench; returns the markdown and the goals' verdicts.
pub fn run(args: &SeedArgs) -> anyhow::Result<String> {
    let cal = Calibration::load(args.calibration.as_ref(), args.mixed_batch)?;
    let mut results = Vec::new();
    for (label, scenario) in scenarios(args, &cal) {
        tracing::info!("bench seed: `{label}` ({} s)", scenario.seconds);
        let report = load::run_in_process(&scenario, args.program.clone())
            .with_context(|| format!("the `{label}` run"))?;
        tracing::info!("bench seed: `{label}`:\n{}", load::render(&report));
        results.push((label, report));
    }
    let markdown = markdown(args, &cal, &results);
    if let Some(path) = &args.out {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let (begin, end) = markers(args.mixed_batch);
        let new = splice(&old, &markdown, &begin, &end);
        std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(markdown)
}

/// The markers of the section a run writes: the table of record for the
/// calibration as it is, one section per `--mixed-batch` override.
fn markers(mixed_batch: Option<MixedBatch>) -> (String, String) {
    match mixed_batch {
        None => (BEGIN.to_owned(), END.to_owned()),
        Some(m) => (
            format!("<!-- bench seed --mixed-batch {}: begin -->", m.name()),
            format!("<!-- bench seed --mixed-batch {}: end -->", m.name()),
        ),
    }
}

/// `old` with the section between `begin` and `end` replaced by `markdown`,
/// or the section appended when `old` has none.
fn splice(old: &str, markdown: &str, begin: &str, end: &str) -> String {
    let section = format!("{begin}\n{markdown}{end}\n");
    match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{section}{}",
            &old[..b],
            old[e + end.len()..].trim_start_matches('\n')
        ),
        _ if old.is_empty() => section,
        _ => format!("{old}\n{section}"),
    }
}

/// The row values of one tenant: p99 TTFT, 429s, ok/sent, served tokens/s.
fn tenant_of<'r>(r: &'r Report, name: &str) -> Option<&'r load::TenantReport> {
    r.tenants.iter().find(|t| t.name == name)
}

fn markdown(args: &SeedArgs, cal: &Calibration, results: &[(&str, Report)]) -> String {
    let mut out = header(args, cal);
    let alone = results
        .first()
        .and_then(|(_, r)| tenant_of(r, A))
        .map_or(0.0, |t| t.ttft.p99_ms);
    let _ = writeln!(
        out,
        "| scenario | A p99 TTFT | B p99 TTFT | fairness index (Jain) | A p99 / alone | B 429s | A ok/sent | B ok/sent | served tok/s A / B |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (label, r) in results {
        let a = tenant_of(r, A);
        let b = tenant_of(r, B);
        let cell = |t: Option<&load::TenantReport>, f: &dyn Fn(&load::TenantReport) -> String| {
            t.map_or_else(|| "—".to_owned(), f)
        };
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            cell(a, &|t| format!("{:.1} ms", t.ttft.p99_ms)),
            cell(b, &|t| format!("{:.1} ms", t.ttft.p99_ms)),
            if b.is_some() {
                format!("{:.4}", r.jain)
            } else {
                "—".to_owned()
            },
            cell(a, &|t| format!("{:.2}", t.ttft.p99_ms / alone)),
            cell(b, &|t| t.rejected_429.to_string()),
            cell(a, &|t| format!("{}/{}", t.ok, t.sent)),
            cell(b, &|t| format!("{}/{}", t.ok, t.sent)),
            cell(a, &|t| format!("{:.0}", t.output_tokens_per_s)),
            cell(b, &|t| format!("{:.0}", t.output_tokens_per_s)),
        );
    }
    out.push('\n');
    out.push_str(&goals(results, alone));
    out.push_str(&notes(results));
    out
}

fn header(args: &SeedArgs, cal: &Calibration) -> String {
    let mut out = String::new();
    let mut command = format!(
        "bulkhead bench seed --seconds {} --seed {}",
        args.seconds, args.seed
    );
    if let Some(c) = &args.calibration {
        let _ = write!(command, " --calibration {}", c.display());
    }
    if let Some(m) = args.mixed_batch {
        let _ = write!(command, " --mixed-batch {}", m.name());
    }
    if let Some(o) = &args.out {
        let _ = write!(command, " --out {}", o.display());
    }
    let _ = writeln!(out, "Command: `{command}`  ");
    let _ = writeln!(out, "Date: {}  ", utc_now());
    let _ = writeln!(out, "Machine: {}  ", machine());
    let step = full_step(&cal.cost, SLOTS, 0.0);
    let capacity = capacity_rps(&cal.cost, SLOTS);
    let _ = writeln!(
        out,
        "Calibration: `{}` (one H100 SXM 80GB, Llama-3-70B-class model, FP8 weights and KV cache): \
         a decode step of {SLOTS} sequences takes {:.1} ms, prefill {:.0} µs per prompt token, \
         mixed batches {}; modelled capacity for this load ≈ {capacity:.1} req/s ({:.0} output tokens/s). \
         Dedicated workers: {} slots and {} blocks each, at half the GPU's bandwidth and compute \
         (time-shared), ≈ {:.1} req/s each.",
        cal.name,
        step.as_secs_f64() * 1e3,
        cal.cost.per_prefill_token_ns / 1e3,
        cal.cost.mixed_batch.name(),
        capacity * f64::from(OUTPUT),
        SLOTS / 2,
        BLOCKS / 2,
        capacity_rps(&cal.half_cost, SLOTS / 2),
    );
    let _ = writeln!(
        out,
        "\nLoad: A (`{A}`) Poisson {A_RATE} req/s; B (`{B}`) Poisson {} req/s for {} s of every {} s, nothing between \
         (mean {:.0} req/s); prompts uniform {}–{} tokens, `max_tokens` {OUTPUT}, streamed over HTTP/3 with mTLS; \
         {} s of arrivals per run, seed {}; one `sim` worker of {SLOTS} slots and {BLOCKS} KV blocks; \
         at most {MAX_QUEUED} queued requests per tenant (429 beyond). Rate limit only: \
         {:.1} req/s per tenant (half the modelled capacity), burst of one second's worth. \
         TTFT from the scheduled send to the first content event, percentiles over the requests sent \
         in the last three quarters of each run (the first quarter is warm-up from an idle worker); \
         fairness: Jain's index of served output tokens/s over each tenant's weighted max-min fair share, \
         over the same interval (`bulkhead::bench::load` docs).\n",
        B_BURST.rate,
        B_BURST.on_secs,
        B_BURST.period_secs,
        B_BURST.mean_rate(0.0),
        PROMPT.min,
        PROMPT.max,
        args.seconds,
        args.seed,
        capacity / 2.0,
    );
    out
}

fn goals(results: &[(&str, Report)], alone: f64) -> String {
    let mut out = String::new();
    let Some((_, fair)) = results.iter().find(|(l, _)| *l == "fair queue 1:1") else {
        return out;
    };
    let p99 = tenant_of(fair, A).map_or(f64::INFINITY, |t| t.ttft.p99_ms);
    let ratio = p99 / alone;
    let _ = writeln!(
        out,
        "Goals, fair queue 1:1: A's p99 TTFT {p99:.1} ms = {ratio:.2} × A alone ({alone:.1} ms), goal ≤ {GOAL_RATIO}: **{}**; \
         fairness index {:.4}, goal ≥ {GOAL_JAIN} (the seed: 0.97): **{}**.\n",
        verdict(alone > 0.0 && ratio <= GOAL_RATIO),
        fair.jain,
        verdict(fair.jain >= GOAL_JAIN),
    );
    let all = |r: &Report| tenant_of(r, A).map_or(0.0, |t| t.ttft_all.p99_ms);
    if let Some((_, first)) = results.first() {
        let _ = writeln!(
            out,
            "With the warm-up included (every request): A's p99 TTFT alone {:.1} ms, under fair queue 1:1 {:.1} ms ({:.2} ×).\n",
            all(first),
            all(fair),
            all(fair) / all(first),
        );
    }
    out
}

fn notes(results: &[(&str, Report)]) -> String {
    let mut out = String::new();
    let errors: usize = results
        .iter()
        .flat_map(|(_, r)| &r.tenants)
        .map(|t| t.errors + t.unavailable_503)
        .sum();
    let unfinished: usize = results.iter().map(|(_, r)| r.unfinished).sum();
    let lag = results
        .iter()
        .map(|(_, r)| r.worst_send_lag_ms)
        .fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "Requests failed (not 200/429) in all runs: {errors}; unfinished: {unfinished}; \
         worst client send lag behind schedule: {lag:.1} ms."
    );
    out
}

/// The machine: cores, CPU model, kernel.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
    format!("{cores} cores ({cpu}), Linux {kernel}; the `sim` backend, no GPU")
}

/// Now as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mixed_batch_model_writes_its_own_section_and_leaves_the_others() {
        let (b, e) = markers(None);
        let (rb, re) = markers(Some(MixedBatch::Roofline));
        let doc = format!("# Benchmarks\n\n{b}\nold table\n{e}\n\nreading notes\n");
        // The roofline run appends its section; the table of record stays.
        let doc = splice(&doc, "roofline table\n", &rb, &re);
        assert!(
            doc.contains("old table") && doc.contains("roofline table"),
            "{doc}"
        );
        // The default run replaces only its own section.
        let doc = splice(&doc, "new table\n", &b, &e);
        assert!(!doc.contains("old table"), "{doc}");
        assert!(
            doc.contains("new table") && doc.contains("roofline table"),
            "{doc}"
        );
        assert!(doc.contains("reading notes"), "{doc}");
        // And again: still one roofline section.
        let doc = splice(&doc, "roofline 2\n", &rb, &re);
        assert_eq!(doc.matches(&rb).count(), 1, "{doc}");
        assert!(
            !doc.contains("roofline table") && doc.contains("roofline 2"),
            "{doc}"
        );
    }
}
