//! `bh-gpu-bench`: the split-K decode paged attention on the GPU at realistic
//! shapes (32 query heads, 8 KV heads, `head_dim` 128, 16-token blocks, f32),
//! guarded against its unguarded benchmark-only twin in the same run.
//!
//! For every (batch, context, partition size): both variants are warmed up,
//! checked to give bit-identical outputs with no flags, then timed with CUDA
//! events, interleaved (guarded first on even samples, unguarded first on odd
//! ones); each sample times enough back-to-back calls to fill about a
//! millisecond, over rotating copies of the batch on disjoint blocks so small
//! configurations are not served from L2. Reported: the medians, the guard's
//! overhead, and the achieved DRAM bandwidth (K and V of every context read,
//! plus queries and outputs) against the peak computed from the device's
//! memory clock × bus width × 2, and against a measured device-to-device copy.
//!
//! Options: `--batch 8,32,64 --ctx 1024,4096,16384,32768 --part auto,256,512
//! --samples 25 --max-gib 16`.
#![allow(
    clippy::cast_precision_loss,      // byte counts and times become f64 for printing
    clippy::cast_possible_truncation, // sizes from the options, far below the limits
    clippy::cast_sign_loss
)]

use bulkhead_kernels::{
    backend::BackendError,
    cpu::ops::PagedBatch,
    cuda::{self, CudaOps, DecodeScratch, DeviceBatch, DeviceKv, decode_bytes},
    layout::KvShape,
    model::SplitMix64,
};
use cudarc::driver::{CudaSlice, sys::CUevent_flags};
use std::process::ExitCode;

const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const BLOCK_TOKENS: usize = 16;
/// Smallest working set a timed sample cycles through (about 5x the H100's L2).
const MIN_ROTATION_BYTES: u64 = 256 << 20;
const MAX_COPIES: usize = 8;
const WARMUP: usize = 3;

struct Args {
    batches: Vec<usize>,
    ctxs: Vec<usize>,
    parts: Vec<Option<u32>>,
    samples: usize,
    max_gib: f64,
}

fn parse_list<T: std::str::FromStr>(v: &str, what: &str) -> Result<Vec<T>, String> {
    v.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| format!("{what}: cannot parse `{x}`"))
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        batches: vec![8, 32, 64],
        ctxs: vec![1024, 4096, 16_384, 32_768],
        parts: vec![None],
        samples: 25,
        max_gib: 16.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--batch" => a.batches = parse_list(&value()?, "--batch")?,
            "--ctx" => a.ctxs = parse_list(&value()?, "--ctx")?,
            "--part" => {
                a.parts = value()?
                    .split(',')
                    .map(|p| match p.trim() {
                        "auto" => Ok(None),
                        n => n.parse().map(Some).map_err(|_| format!("--part: `{n}`")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--samples" => a.samples = value()?.parse().map_err(|_| "--samples".to_owned())?,
            "--max-gib" => a.max_gib = value()?.parse().map_err(|_| "--max-gib".to_owned())?,
            "-h" | "--help" => {
                println!(
                    "bh-gpu-bench [--batch 8,32,64] [--ctx 1024,4096,16384,32768] \
                     [--part auto,256,512] [--samples 25] [--max-gib 16]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.samples < 20 {
        return Err("--samples must be at least 20".to_owned());
    }
    Ok(a)
}

fn kv_bytes_per_token() -> u64 {
    (2 * KV_HEADS * HEAD_DIM * 4) as u64
}

/// One configuration's result.
struct Row {
    batch: usize,
    ctx: usize,
    part: u32,
    parts: u32,
    guarded_us: f64,
    unguarded_us: f64,
    spread_pct: f64,
    bytes: u64,
    identical: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

/// Interquartile range over the median, in percent: the timing noise.
fn spread(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let (q1, q3) = (v[n / 4], v[(3 * n) / 4]);
    (q3 - q1) / median(v) * 100.0
}

struct Bench<'a> {
    ops: &'a CudaOps,
    kv: DeviceKv,
    owners: Vec<u32>,
    order: Vec<u32>,
    samples: usize,
}

/// One copy of the batch: its table on its own blocks, its queries.
struct Copy {
    batch: DeviceBatch,
    q: CudaSlice<f32>,
}

impl Bench<'_> {
    /// `copies` copies of a decode batch: sequence after sequence takes the
    /// next run of `ceil(ctx / 16)` blocks of the shuffled order, whose owner
    /// tags (set before) are the sequence's tenant.
    fn copies(&self, batch: usize, ctx: usize, copies: usize) -> Result<Vec<Copy>, BackendError> {
        let blocks = ctx.div_ceil(BLOCK_TOKENS);
        let mut runs = self.order.chunks(blocks);
        let mut out = Vec::with_capacity(copies);
        for c in 0..copies {
            let mut tags = Vec::with_capacity(batch);
            let mut tables = Vec::with_capacity(batch * blocks);
            for _ in 0..batch {
                let run = runs.next().expect("pool sized for every copy");
                tags.push(self.owners[run[0] as usize]);
                tables.extend_from_slice(run);
            }
            let ctx_lens = vec![u32::try_from(ctx).expect("context fits u32"); batch];
            let paged = PagedBatch {
                tags: &tags,
                ctx_lens: &ctx_lens,
                block_tables: &tables,
                max_blocks: blocks,
            };
            let batch_dev = DeviceBatch::decode(self.ops, &paged)?;
            let mut q = self.ops.zeros::<f32>(batch * HEADS * HEAD_DIM)?;
            self.ops
                .fill_random(&mut q, 1000 + u32::try_from(c).unwrap_or(0))?;
            out.push(Copy {
                batch: batch_dev,
                q,
            });
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        copy: &mut Copy,
        guard: bool,
        out: &mut CudaSlice<f32>,
        flags: &mut CudaSlice<u32>,
        scratch: &mut DecodeScratch,
        part: Option<u32>,
    ) -> Result<cuda::DecodeLaunch, BackendError> {
        #[allow(clippy::cast_precision_loss)]
        let scale = 1.0 / (HEAD_DIM as f32).sqrt();
        self.ops.paged_attention_decode(
            &self.kv,
            0,
            &mut copy.batch,
            &copy.q,
            HEADS,
            scale,
            guard,
            out,
            flags,
            scratch,
            part,
        )
    }

    fn run(&mut self, batch: usize, ctx: usize, part: Option<u32>) -> Result<Row, BackendError> {
        let ops = self.ops;
        let kv_bytes = (batch * ctx) as u64 * kv_bytes_per_token();
        let copies = usize::try_from(MIN_ROTATION_BYTES.div_ceil(kv_bytes))
            .unwrap_or(MAX_COPIES)
            .clamp(1, MAX_COPIES);
        let mut set = self.copies(batch, ctx, copies)?;
        let n_out = batch * HEADS * HEAD_DIM;
        let mut out_g = ops.zeros::<f32>(n_out)?;
        let mut out_u = ops.zeros::<f32>(n_out)?;
        let mut flags = ops.zeros::<u32>(batch)?;
        let (mut sg, mut su) = (DecodeScratch::new(), DecodeScratch::new());

        // Correctness first: bit-identical outputs, no flags.
        let launch = self.call(&mut set[0], true, &mut out_g, &mut flags, &mut sg, part)?;
        self.call(&mut set[0], false, &mut out_u, &mut flags, &mut su, part)?;
        let (g, u) = (ops.download(&out_g)?, ops.download(&out_u)?);
        let f = ops.download(&flags)?;
        let identical = g == u && f.iter().all(|&x| x == 0) && g.iter().all(|x| x.is_finite());

        for _ in 0..WARMUP {
            for c in &mut set {
                self.call(c, true, &mut out_g, &mut flags, &mut sg, part)?;
                self.call(c, false, &mut out_u, &mut flags, &mut su, part)?;
            }
        }
        let start = ops
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| BackendError::Device(format!("event: {e:?}")))?;
        let end = ops
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| BackendError::Device(format!("event: {e:?}")))?;
        let mut time = |bench: &mut Self,
                        guard: bool,
                        inner: usize,
                        set: &mut [Copy]|
         -> Result<f64, BackendError> {
            let (out, scratch) = if guard {
                (&mut out_g, &mut sg)
            } else {
                (&mut out_u, &mut su)
            };
            start
                .record(ops.stream())
                .map_err(|e| BackendError::Device(format!("{e:?}")))?;
            for i in 0..inner {
                let c = i % set.len();
                bench.call(&mut set[c], guard, out, &mut flags, scratch, part)?;
            }
            end.record(ops.stream())
                .map_err(|e| BackendError::Device(format!("{e:?}")))?;
            let ms = start
                .elapsed_ms(&end)
                .map_err(|e| BackendError::Device(format!("{e:?}")))?;
            #[allow(clippy::cast_precision_loss)]
            Ok(f64::from(ms) * 1e3 / inner as f64)
        };
        // Calls per sample: about a millisecond of work, whole rotations.
        let one = time(self, true, copies, &mut set)?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rounds = ((1000.0 / (one * copies as f64)).ceil() as usize).max(1);
        let inner = rounds * copies;
        let (mut tg, mut tu) = (Vec::new(), Vec::new());
        for s in 0..self.samples {
            if s % 2 == 0 {
                tg.push(time(self, true, inner, &mut set)?);
                tu.push(time(self, false, inner, &mut set)?);
            } else {
                tu.push(time(self, false, inner, &mut set)?);
                tg.push(time(self, true, inner, &mut set)?);
            }
        }
        let ctx_lens = vec![u32::try_from(ctx).unwrap_or(u32::MAX); batch];
        let shape = self.kv.shape();
        Ok(Row {
            batch,
            ctx,
            part: launch.part_tokens,
            parts: launch.parts,
            guarded_us: median(&mut tg),
            unguarded_us: median(&mut tu),
            spread_pct: spread(&mut tg).max(spread(&mut tu)),
            bytes: decode_bytes(&shape, HEADS, &ctx_lens),
            identical,
        })
    }
}

/// A device-to-device copy of `bytes`, timed: the bandwidth one can reach (read + write).
fn copy_bandwidth(ops: &CudaOps, bytes: usize) -> Result<f64, BackendError> {
    let n = bytes / 4;
    let src = ops.zeros::<f32>(n)?;
    let mut dst = ops.zeros::<f32>(n)?;
    let dev = |e| BackendError::Device(format!("{e:?}"));
    let start = ops
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(dev)?;
    let end = ops
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(dev)?;
    let mut best = f64::MAX;
    for _ in 0..6 {
        start.record(ops.stream()).map_err(dev)?;
        ops.stream().memcpy_dtod(&src, &mut dst).map_err(dev)?;
        end.record(ops.stream()).map_err(dev)?;
        best = best.min(f64::from(start.elapsed_ms(&end).map_err(dev)?));
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(2.0 * (n * 4) as f64 / (best * 1e-3))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bh-gpu-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !cuda::available() {
        eprintln!("bh-gpu-bench: no CUDA driver or GPU here (cuda::available() is false)");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bh-gpu-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_lines, clippy::cast_precision_loss)]
fn run(args: &Args) -> Result<bool, BackendError> {
    let t0 = std::time::Instant::now();
    let ops = CudaOps::new(0)?;
    let info = ops.info().clone();
    let peak = info.peak_bandwidth();
    println!(
        "device: {} (sm_{}{}, {} SMs), memory clock {} MHz x {}-bit bus x 2 = peak {:.0} GB/s",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.sm_count,
        info.memory_clock_khz / 1000,
        info.bus_width_bits,
        peak / 1e9
    );
    ops.prepare_decode(HEAD_DIM, HEADS / KV_HEADS)?;
    println!("kernels compiled and loaded in {:.2?}", t0.elapsed());
    let copy_bw = copy_bandwidth(&ops, 2 << 30)?;
    println!(
        "measured device-to-device copy: {:.0} GB/s (read + write), {:.1}% of peak",
        copy_bw / 1e9,
        copy_bw / peak * 100.0
    );

    // The configurations within the memory bound, and the pool they need.
    let budget = (args.max_gib * f64::from(1u32 << 30)) as u64;
    let mut configs = Vec::new();
    let mut pool_blocks = 0usize;
    for &batch in &args.batches {
        for &ctx in &args.ctxs {
            let kv = (batch * ctx) as u64 * kv_bytes_per_token();
            if kv > budget {
                println!(
                    "skipped batch {batch} ctx {ctx}: {} MiB of KV over --max-gib",
                    kv >> 20
                );
                continue;
            }
            let copies = usize::try_from(MIN_ROTATION_BYTES.div_ceil(kv))
                .unwrap_or(MAX_COPIES)
                .clamp(1, MAX_COPIES);
            pool_blocks = pool_blocks.max(copies * batch * ctx.div_ceil(BLOCK_TOKENS));
            configs.push((batch, ctx));
        }
    }
    let shape = KvShape {
        num_blocks: pool_blocks.max(1),
        layers: 1,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        block_tokens: BLOCK_TOKENS,
    };
    println!(
        "KV pool: {} blocks, {:.2} GiB, random contents",
        shape.num_blocks,
        (shape.total_elems() * 4) as f64 / f64::from(1u32 << 30)
    );
    let mut kv = DeviceKv::new(&ops, shape)?;
    kv.fill_random(&ops, 7)?;
    // Shuffled block order; runs of blocks are handed to sequences in this
    // order, and each run is owned by the tenant of its first block.
    let mut order: Vec<u32> = (0..u32::try_from(shape.num_blocks).unwrap_or(u32::MAX)).collect();
    let mut rng = SplitMix64::new(42);
    for i in (1..order.len()).rev() {
        let j = usize::try_from(rng.next_u64() % (i as u64 + 1)).unwrap_or(0);
        order.swap(i, j);
    }
    let mut bench = Bench {
        ops: &ops,
        kv,
        owners: Vec::new(),
        order,
        samples: args.samples,
    };
    let mut rows = Vec::new();
    for &(batch, ctx) in &configs {
        // Tags: sequence s of every copy is tenant (s % 7) + 1, on its run of blocks.
        let blocks = ctx.div_ceil(BLOCK_TOKENS);
        let mut owners = vec![0u32; shape.num_blocks];
        for (run, chunk) in bench.order.chunks(blocks).enumerate() {
            let tag = u32::try_from(run % batch % 7).unwrap_or(0) + 1;
            for &b in chunk {
                owners[b as usize] = tag;
            }
        }
        bench.kv.set_owners(&ops, 0, &owners)?;
        bench.owners = owners;
        for &part in &args.parts {
            let row = bench.run(batch, ctx, part)?;
            let bw = row.bytes as f64 / (row.guarded_us * 1e-6);
            println!(
                "batch {:>3} ctx {:>6} part {:>4} x{:<3}: guarded {:>9.1} us, unguarded {:>9.1} us, \
                 overhead {:>+6.2}%, {:>6.0} GB/s ({:>5.1}% of peak), noise {:.1}%{}",
                row.batch,
                row.ctx,
                row.part,
                row.parts,
                row.guarded_us,
                row.unguarded_us,
                (row.guarded_us / row.unguarded_us - 1.0) * 100.0,
                bw / 1e9,
                bw / peak * 100.0,
                row.spread_pct,
                if row.identical { "" } else { "  MISMATCH" }
            );
            rows.push(row);
        }
    }

    println!();
    println!(
        "Decode paged attention, f32 KV, {HEADS} heads / {KV_HEADS} KV heads, head_dim {HEAD_DIM}, \
         {BLOCK_TOKENS}-token blocks, on {}; peak {:.0} GB/s (clock x bus x 2), copy {:.0} GB/s; \
         median of {} interleaved samples.",
        info.name,
        peak / 1e9,
        copy_bw / 1e9,
        args.samples
    );
    println!();
    println!(
        "| batch | context | KV MiB | part x n | guarded µs | unguarded µs | guard overhead | \
         guarded GB/s | % of peak | unguarded GB/s | % of peak | noise (IQR) | outputs equal |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|");
    let mut ok = true;
    let (mut worst_overhead, mut worst_long_bw) = (f64::MIN, None::<f64>);
    for r in &rows {
        let bw_g = r.bytes as f64 / (r.guarded_us * 1e-6);
        let bw_u = r.bytes as f64 / (r.unguarded_us * 1e-6);
        let overhead = (r.guarded_us / r.unguarded_us - 1.0) * 100.0;
        worst_overhead = worst_overhead.max(overhead);
        if r.ctx >= 16_384 {
            let pct = bw_g / peak * 100.0;
            worst_long_bw = Some(worst_long_bw.map_or(pct, |w| w.min(pct)));
        }
        ok &= r.identical;
        println!(
            "| {} | {} | {} | {} x {} | {:.1} | {:.1} | {:+.2}% | {:.0} | {:.1}% | {:.0} | {:.1}% | {:.1}% | {} |",
            r.batch,
            r.ctx,
            ((r.batch * r.ctx) as u64 * kv_bytes_per_token()) >> 20,
            r.part,
            r.parts,
            r.guarded_us,
            r.unguarded_us,
            overhead,
            bw_g / 1e9,
            bw_g / peak * 100.0,
            bw_u / 1e9,
            bw_u / peak * 100.0,
            r.spread_pct,
            if r.identical { "yes" } else { "NO" }
        );
    }
    println!();
    println!(
        "goals: guard overhead <= 1% (worst here {worst_overhead:+.2}%); bandwidth >= 70% of peak at \
         contexts >= 16k (worst here {}); total run {:.1?}",
        worst_long_bw.map_or_else(|| "n/a".to_owned(), |w| format!("{w:.1}%")),
        t0.elapsed()
    );
    Ok(ok)
}
