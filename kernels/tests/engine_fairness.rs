//! A seeded, virtual-time simulation of the seed's fairness scenario on the
//! engine itself: the `sim` backend with the H100 + 70B FP8 calibration,
//! tenant A at 10 req/s, tenant B bursting at 200 req/s (one second of every
//! two), and the proxy's dispatch rule in front (a tenant's requests go to
//! the worker while it has a free slot or the tenant holds under its equal
//! share). Time is the backend's modelled step time, so the result is exact
//! and the same on every machine; `bulkhead bench seed` measures the same
//! scenario end to end, in real time, over HTTP/3.

use bulkhead_core::{
    TenantId,
    wire::{ProxyToWorker, RequestId, Sampling, Submit, WorkerToProxy},
};
use bulkhead_kernels::{
    engine::{Engine, EngineConfig},
    model::{ModelConfig, SplitMix64},
    sim::{CostModel, SimBackend},
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
fn simulate(loads: &[Load], seconds: f64, seed: u64) -> Vec<Served> {
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

    let backend = SimBackend::new(ModelConfig::tiny(), BLOCKS, calibration()).unwrap();
    let mut engine = Engine::new(
        backend,
        EngineConfig {
            max_slots: SLOTS,
            ..EngineConfig::default()
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
                    #[allow(clippy::cast_possible_truncation)]
                    prompt_tokens: (0..p.prompt).map(|i| 32 + (i as u32 % 90)).collect(),
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

#[test]
fn a_quiet_tenant_keeps_its_solo_ttft_next_to_a_bursting_one() {
    let a = Load {
        rate: 10.0,
        burst: None,
    };
    let b = Load {
        rate: 200.0,
        burst: Some((1.0, 2.0)),
    };
    let seconds = 40.0;
    // What the worker serves of these requests at a full batch (the
    // calibration file's arithmetic): ~43 req/s of 32 output tokens.
    let capacity_tokens = 43.0 * f64::from(OUTPUT);
    for seed in 1..=3 {
        let mut alone = simulate(&[a], seconds, seed);
        let mut shared = simulate(&[a, b], seconds, seed);
        let solo = pct(&mut alone[0].0, 0.99);
        let with_b = pct(&mut shared[0].0, 0.99);
        #[allow(clippy::cast_precision_loss)]
        let b_tokens_per_s = shared[1].2 as f64 / (seconds * 0.75);
        println!(
            "seed {seed}: A's TTFT alone p50 {:.1} ms p99 {:.1} ms; next to B p50 {:.1} ms p99 {:.1} ms ({:.2}x); \
             B p99 {:.1} ms, {b_tokens_per_s:.0} tokens/s, {} refused",
            pct(&mut alone[0].0, 0.5) * 1e3,
            solo * 1e3,
            pct(&mut shared[0].0, 0.5) * 1e3,
            with_b * 1e3,
            with_b / solo,
            pct(&mut shared[1].0, 0.99) * 1e3,
            shared[1].1,
        );
        // Measured: 1.21, 1.31 and 1.22x for seeds 1 to 3. The engine before
        // first-tokens-first and the fair prefill order: 1.28x, then 1.40x for seed 2.
        assert!(
            with_b <= solo * 1.35,
            "seed {seed}: A's p99 TTFT {with_b:.4} s next to B, {solo:.4} s alone"
        );
        // B keeps what A leaves: the worker's capacity less A's ~300 tokens/s.
        assert!(
            b_tokens_per_s >= 0.9 * (capacity_tokens - 10.0 * f64::from(OUTPUT)),
            "seed {seed}: B was served {b_tokens_per_s:.0} tokens/s"
        );
        assert!(
            shared[0].1 == 0,
            "A's queue never fills, yet {} were refused",
            shared[0].1
        );
    }
}
