//! A seeded, virtual-time simulation of the seed's fairness scenario on the
//! engine itself: the `sim` backend with the H100 + 70B FP8 calibration,
//! tenant A at 10 req/s, tenant B bursting at 200 req/s (one second of every
//! two), and the proxy's dispatch rule in front (a tenant's requests go to
//! the worker while it has a free slot or the tenant holds under its equal
//! share). Time is the backend's modelled step time, so the result is exact
//! and the same on every machine; `bulkhead bench seed` measures the same
//! scenario end to end, in real time, over HTTP/3, and agrees: over 240 s
//! it measured A's p99 at 86.4 ms alone and 102.7 ms beside B (1.19x),
//! against 83.0 and 97.9 ms here (1.18x); end to end adds ~3 ms to every
//! TTFT (the network, the front door and the client).
//!
//! Every prompt is its own, as the bench's are. An earlier version of this
//! file gave every request the same prompt, so each tenant's prefix cache
//! made prefill nearly free and the replay measured another scenario.

use bulkhead_core::{
    TenantId,
    wire::{ProxyToWorker, RequestId, Sampling, Submit, WorkerToProxy},
};
use bulkhead_kernels::{
    engine::{Engine, EngineConfig},
    model::{ModelConfig, SplitMix64},
    sim::{CostModel, MixedBatch, SimBackend},
};
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::Path,
    time::Duration,
};

const SLOTS: usize = 64;
const BLOCKS: usize = 1600;
const MAX_QUEUED: usize = 128;
const OUTPUT: u32 = 32;

/// An exponential draw of mean `1 / rate` (a Poisson process's gap).
#[allow(clippy::cast_precision_loss)]
fn exp(rng: &mut SplitMix64, rate: f64) -> f64 {
    let unit = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -unit.ln() / rate
}

#[derive(Clone, Copy)]
struct Load {
    rate: f64,
    /// `Some((on, period))`: arrivals only in the first `on` seconds of every `period`.
    burst: Option<(f64, f64)>,
}

/// Arrival times (seconds) and prompt lengths (32–96) of one tenant: a
/// Poisson process in "on" time, mapped onto the wall clock.
fn arrivals(load: Load, seconds: f64, rng: &mut SplitMix64) -> Vec<(f64, usize)> {
    let (on, period) = load.burst.unwrap_or((1.0, 1.0));
    let mut out = Vec::new();
    let mut on_time = 0.0;
    loop {
        on_time += exp(rng, load.rate);
        let cycle = (on_time / on).floor();
        let t = cycle * period + (on_time - cycle * on);
        if t >= seconds {
            return out;
        }
        #[allow(clippy::cast_possible_truncation)]
        let prompt = 32 + (rng.next_u64() % 65) as usize;
        out.push((t, prompt));
    }
}

/// A prompt of `len` printable tokens from the request's own generator.
/// No two requests share a first block, as with the bench's numbered
/// prompts, so every prompt token is computed: prompts with a common prefix
/// would hit the tenant's prefix cache and make most of prefill free.
#[allow(clippy::cast_possible_truncation)]
fn prompt(id: RequestId, len: usize) -> Vec<u32> {
    let mut rng = SplitMix64::new(id.0 as u64 ^ (id.0 >> 64) as u64);
    (0..len)
        .map(|_| 32 + (rng.next_u64() % 95) as u32)
        .collect()
}

fn calibration() -> CostModel {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/calibration/h100-sxm-llama3-70b-fp8.toml");
    CostModel::from_file(&path).expect("the calibration file parses")
}

struct Pending {
    id: RequestId,
    tenant: usize,
    arrival: f64,
    prompt: usize,
}

/// A tenant's TTFTs (seconds) of the requests that arrived after the first
/// quarter, requests refused (queue full), output tokens streamed after the
/// first quarter.
type Served = (Vec<f64>, usize, usize);

/// Runs the scenario for each tenant.
fn simulate(
    loads: &[Load],
    seconds: f64,
    seed: u64,
    cfg: &EngineConfig,
    cost: &CostModel,
) -> Vec<Served> {
    let tenants: Vec<TenantId> = ["alpha", "bravo"][..loads.len()]
        .iter()
        .map(|n| TenantId::new(n).unwrap())
        .collect();
    let mut rng = SplitMix64::new(seed);
    let mut events: Vec<(f64, usize, usize)> = Vec::new();
    for (i, load) in loads.iter().enumerate() {
        events.extend(
            arrivals(*load, seconds, &mut rng)
                .into_iter()
                .map(|(t, p)| (t, i, p)),
        );
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut events: VecDeque<_> = events.into();

    let backend = SimBackend::new(ModelConfig::tiny(), BLOCKS, cost.clone()).unwrap();
    let mut engine = Engine::new(
        backend,
        EngineConfig {
            max_slots: SLOTS,
            ..cfg.clone()
        },
    );
    let mut proxy = Proxy {
        queues: loads.iter().map(|_| VecDeque::new()).collect(),
        in_flight: HashMap::new(),
        tenants,
        turn: 0,
    };
    let mut out: Vec<Served> = loads.iter().map(|_| (Vec::new(), 0, 0)).collect();
    let mut now = 0.0f64;
    // What the worker reads at the end of the running step: requests that
    // arrived during it, and those the proxy sent on reading the step before.
    let mut channel: Vec<Submit> = Vec::new();
    // Sent on reading the step that just ended: the worker has started the
    // next one by then, so they are read at the end of that one.
    let mut late: Vec<Submit> = Vec::new();
    loop {
        for submit in channel.drain(..) {
            engine.handle(ProxyToWorker::Submit(submit));
        }
        channel = std::mem::take(&mut late);
        if !engine.has_work() && channel.is_empty() {
            // Idle: the next arrival is read at once.
            match events.front() {
                Some(e) => now = now.max(e.0),
                None if proxy.in_flight.is_empty() => break,
                None => panic!("requests in flight but the engine has no work"),
            }
            proxy.arrive(&mut events, now, &mut out, &mut channel);
            continue;
        }
        if !engine.has_work() {
            continue;
        }
        let report = engine.step().unwrap().expect("the engine has work");
        now += report.modelled_time.unwrap_or(Duration::ZERO).as_secs_f64();
        proxy.arrive(&mut events, now, &mut out, &mut channel);
        for message in engine.take_outbox() {
            match message {
                WorkerToProxy::Tokens {
                    request_id, tokens, ..
                } => {
                    let (tenant, arrival, first_seen) =
                        proxy.in_flight.get_mut(&request_id).unwrap();
                    if now >= seconds / 4.0 && now < seconds {
                        out[*tenant].2 += tokens.len();
                    }
                    if !*first_seen {
                        *first_seen = true;
                        if *arrival >= seconds / 4.0 {
                            out[*tenant].0.push(now - *arrival);
                        }
                    }
                }
                WorkerToProxy::Finished(f) => {
                    proxy.in_flight.remove(&f.request_id);
                }
                WorkerToProxy::Rejected(r) => panic!("the engine refused a request: {r:?}"),
                _ => {}
            }
        }
        late = proxy.dispatch();
    }
    out
}

/// The proxy: per-tenant queues and what is on the worker.
struct Proxy {
    queues: Vec<VecDeque<Pending>>,
    /// Request → (tenant, arrival, first token seen).
    in_flight: HashMap<RequestId, (usize, f64, bool)>,
    tenants: Vec<TenantId>,
    turn: usize,
}

impl Proxy {
    /// Queues the arrivals up to `now` (refusing beyond the queue cap) and
    /// dispatches as they come.
    fn arrive(
        &mut self,
        events: &mut VecDeque<(f64, usize, usize)>,
        now: f64,
        out: &mut [Served],
        channel: &mut Vec<Submit>,
    ) {
        while events.front().is_some_and(|e| e.0 <= now) {
            let (t, tenant, prompt) = events.pop_front().unwrap();
            if self.queues[tenant].len() >= MAX_QUEUED {
                out[tenant].1 += 1;
                continue;
            }
            let id = RequestId(u128::from(t.to_bits()) << 8 | tenant as u128);
            self.queues[tenant].push_back(Pending {
                id,
                tenant,
                arrival: t,
                prompt,
            });
            channel.extend(self.dispatch());
        }
    }

    /// The proxy's rule: fair turns between tenants with queued requests; a
    /// tenant's next request goes when the worker has a free slot or the
    /// tenant holds under its equal share of the slots.
    fn dispatch(&mut self) -> Vec<Submit> {
        let mut sent = Vec::new();
        'next: loop {
            for k in 0..self.queues.len() {
                let tenant = (self.turn + k) % self.queues.len();
                if self.queues[tenant].is_empty() {
                    continue;
                }
                let mut active: BTreeMap<usize, usize> = BTreeMap::new();
                for (t, _, _) in self.in_flight.values() {
                    *active.entry(*t).or_insert(0) += 1;
                }
                let mine = active.get(&tenant).copied().unwrap_or(0);
                active.entry(tenant).or_insert(0);
                if self.in_flight.len() >= SLOTS && mine * active.len() >= SLOTS {
                    continue;
                }
                let p = self.queues[tenant].pop_front().unwrap();
                sent.push(Submit {
                    request_id: p.id,
                    tenant: self.tenants[p.tenant].clone(),
                    model: "bulkhead-tiny".to_owned(),
                    prompt_tokens: prompt(p.id, p.prompt),
                    max_tokens: OUTPUT,
                    sampling: Sampling {
                        temperature: 0.0,
                        top_p: 1.0,
                        seed: Some(1),
                        stop: Vec::new(),
                    },
                    kv_block_quota: u32::try_from(BLOCKS).expect("fits"),
                });
                self.in_flight.insert(p.id, (p.tenant, p.arrival, false));
                self.turn = tenant + 1;
                continue 'next;
            }
            return sent;
        }
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    assert!(!v.is_empty(), "no samples");
    v.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// A's p50 and p99 TTFT, B's served output tokens/s, and the requests of A refused.
fn measure(served: &mut [Served], seconds: f64) -> (f64, f64, f64, usize) {
    let a_p50 = pct(&mut served[0].0, 0.5);
    let a_p99 = pct(&mut served[0].0, 0.99);
    #[allow(clippy::cast_precision_loss)]
    let b_tokens_per_s = served.get(1).map_or(0.0, |b| b.2 as f64 / (seconds * 0.75));
    (a_p50, a_p99, b_tokens_per_s, served[0].1)
}

/// One seed of the seed's scenario under `cost`: A alone, A beside B with
/// the engine's defaults, and A beside B without the cap on over-share prompts.
struct Figures {
    solo_p50: f64,
    solo: f64,
    p50: f64,
    with_b: f64,
    b_tokens: f64,
    refused: usize,
    with_b_uncapped: f64,
    b_tokens_uncapped: f64,
}

impl Figures {
    /// A's p99 alone and next to B, with and without the cap, and B's service.
    fn summary(&self) -> String {
        format!(
            "A's p99 alone {:.1} ms, next to B {:.1} ms ({:.3}x), B {:.0} tokens/s; \
             without the cap {:.1} ms ({:.3}x), B {:.0} tokens/s",
            self.solo * 1e3,
            self.with_b * 1e3,
            self.with_b / self.solo,
            self.b_tokens,
            self.with_b_uncapped * 1e3,
            self.with_b_uncapped / self.solo,
            self.b_tokens_uncapped,
        )
    }
}

fn figures(cost: &CostModel) -> Figures {
    let a = Load {
        rate: 10.0,
        burst: None,
    };
    let b = Load {
        rate: 200.0,
        burst: Some((1.0, 2.0)),
    };
    // Long enough for a steady p99 (~2,900 of A's requests after warm-up;
    // over 40 s, the ~290 of one `bench seed` row, p99 moves by ±10% from
    // seed to seed).
    let (seconds, seed) = (400.0, 1);
    let defaults = EngineConfig::default();
    let uncapped = EngineConfig {
        over_share_prompt_tokens: defaults.max_step_tokens,
        ..EngineConfig::default()
    };
    let run = |loads: &[Load], cfg: &EngineConfig| {
        measure(&mut simulate(loads, seconds, seed, cfg, cost), seconds)
    };
    let (solo_p50, solo, _, _) = run(&[a], &defaults);
    let (p50, with_b, b_tokens, refused) = run(&[a, b], &defaults);
    let (_, with_b_uncapped, b_tokens_uncapped, _) = run(&[a, b], &uncapped);
    Figures {
        solo_p50,
        solo,
        p50,
        with_b,
        b_tokens,
        refused,
        with_b_uncapped,
        b_tokens_uncapped,
    }
}

/// The goal in modelled time (A's p99 within 1.2x of A alone),
/// the cap on over-share prompts being what meets it, and the cap costing
/// B at most 8% of its throughput.
fn the_cap_keeps_a_within_the_goal_at_a_bounded_cost_to_b(f: &Figures) {
    let (solo, with_b) = (f.solo, f.with_b);
    assert!(
        with_b <= solo * 1.2,
        "A's p99 TTFT {with_b:.4} s next to B, {solo:.4} s alone"
    );
    assert!(
        f.with_b_uncapped > with_b,
        "the cap on B's prompts made no difference to A"
    );
    let (b, uncapped) = (f.b_tokens, f.b_tokens_uncapped);
    assert!(
        b >= 0.92 * uncapped,
        "the cap cost B more than 8%: {b:.0} against {uncapped:.0} tokens/s"
    );
}

#[test]
fn a_quiet_tenant_keeps_its_solo_ttft_next_to_a_bursting_one() {
    let f = figures(&calibration());
    println!(
        "{}; A's p50 alone {:.1} ms, next to B {:.1} ms",
        f.summary(),
        f.solo_p50 * 1e3,
        f.p50 * 1e3,
    );
    // The goal, in modelled time: A's p99 within 1.2x of A alone.
    // Measured: 97.9 ms against 83.0 ms (1.18x); without the cap 104.7 ms
    // (1.26x); the engine before the cap and the quiet tenants' own step
    // budget, 106.5 ms (1.28x).
    // The cap costs B (measured 979 against 1029 tokens/s, 5%).
    the_cap_keeps_a_within_the_goal_at_a_bounded_cost_to_b(&f);
    // B still keeps most of what A leaves: the worker's capacity (~43 req/s
    // of 32 output tokens at a full batch, the calibration file's
    // arithmetic) less A's ~300 tokens/s.
    let capacity_tokens = 43.0 * f64::from(OUTPUT);
    assert!(
        f.b_tokens >= 0.85 * (capacity_tokens - 10.0 * f64::from(OUTPUT)),
        "B was served {:.0} tokens/s",
        f.b_tokens
    );
    assert!(
        f.refused == 0,
        "A's queue never fills, yet {} were refused",
        f.refused
    );
}

/// The same scenario under the calibration's other model of mixed steps
/// (`mixed_batch = "roofline"`: prompt tokens ride under the weight read up
/// to the compute roof). Every number moves (A alone gets faster, B gets
/// more), and the cap on over-share prompts still decides A's p99.
#[test]
fn under_the_roofline_model_the_cap_still_keeps_a_near_its_solo_ttft() {
    let f = figures(&CostModel {
        mixed_batch: MixedBatch::Roofline,
        ..calibration()
    });
    println!("roofline: {}", f.summary());
    // Measured: 60.4 ms against 53.7 ms (1.12x), B 1733 tokens/s; without
    // the cap 66.0 ms (1.23x), B 1627 tokens/s.
    the_cap_keeps_a_within_the_goal_at_a_bounded_cost_to_b(&f);
}
