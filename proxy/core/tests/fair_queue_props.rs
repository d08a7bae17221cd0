//! Property tests of the fair queue: random operation sequences against a
//! simple model, checking after every step that nothing is lost, nothing is
//! served twice, service follows the counters, and cancel frees everything.

use bulkhead_core::TenantId;
use bulkhead_core::fair_queue::{FairQueue, QueueHandle, ServiceWeights};
use proptest::prelude::*;
use std::collections::HashMap;
use std::collections::{BTreeMap, HashSet};

const TENANTS: usize = 5;

fn tenant(i: usize) -> TenantId {
    TenantId::new(&format!("t{i}")).unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Enqueue { tenant: usize, prompt: u32 },
    Dequeue,
    Cancel { pick: usize },
    ChargeOutput { tenant: usize, tokens: u32 },
    RequeueLast,
    Reweight { tenant: usize, weight: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..TENANTS, 1..2_000_u32).prop_map(|(tenant, prompt)| Op::Enqueue { tenant, prompt }),
        3 => Just(Op::Dequeue),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => (0..TENANTS, 0..500_u32).prop_map(|(tenant, tokens)| Op::ChargeOutput { tenant, tokens }),
        1 => Just(Op::RequeueLast),
        1 => (0..TENANTS, 1..10_u32).prop_map(|(tenant, weight)| Op::Reweight { tenant, weight }),
    ]
}

/// The model: which ids are queued, and per tenant in FIFO order.
#[derive(Default)]
struct Model {
    queued: BTreeMap<u64, usize>,
    handles: HashMap<u64, QueueHandle>,
    per_tenant: Vec<Vec<u64>>,
    gone: HashSet<u64>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn nothing_lost_nothing_twice_and_the_least_served_goes_first(
        weights in proptest::collection::vec(1..8_u32, TENANTS),
        caps in proptest::collection::vec(1..20_u32, TENANTS),
        ops in proptest::collection::vec(op(), 1..400),
    ) {
        let mut q: FairQueue<(usize, u64)> = FairQueue::new(ServiceWeights::default());
        for i in 0..TENANTS {
            q.set_tenant(&tenant(i), weights[i], caps[i]);
        }
        let mut model = Model { per_tenant: vec![Vec::new(); TENANTS], ..Model::default() };
        let mut next_id = 0_u64;
        let mut last_dequeued: Option<(u64, usize, u32)> = None;
        let mut weight_now = weights.clone();
        for op in ops {
            match op {
                Op::Enqueue { tenant: t, prompt } => {
                    let id = next_id;
                    next_id += 1;
                    let full = model.per_tenant[t].len() >= caps[t] as usize;
                    let res = q.enqueue(&tenant(t), prompt, (t, id));
                    prop_assert_eq!(res.is_err(), full);
                    if let Ok(handle) = res {
                        model.handles.insert(id, handle);
                        model.queued.insert(id, t);
                        model.per_tenant[t].push(id);
                    }
                }
                Op::Dequeue => {
                    // The served tenant had the smallest counter among backlogged tenants.
                    let min = (0..TENANTS)
                        .filter(|&i| !model.per_tenant[i].is_empty())
                        .map(|i| q.counter(&tenant(i)).unwrap())
                        .fold(f64::INFINITY, f64::min);
                    match q.dequeue() {
                        None => prop_assert!(model.queued.is_empty()),
                        Some(d) => {
                            let (t, id) = d.payload;
                            let handle = model.handles.remove(&id).unwrap();
                            prop_assert!(!q.contains(handle));
                            prop_assert_eq!(q.cancel(handle), None);
                            prop_assert_eq!(&d.tenant, &tenant(t));
                            let before = q.counter(&d.tenant).unwrap()
                                - f64::from(d.prompt_tokens) / f64::from(weight_now[t]);
                            prop_assert!((before - min).abs() < 1e-3, "served at {} while the least served was at {}", before, min);
                            // FIFO within the tenant (requeued requests go first).
                            prop_assert_eq!(model.per_tenant[t].first().copied(), Some(id));
                            model.per_tenant[t].remove(0);
                            prop_assert!(model.queued.remove(&id).is_some());
                            prop_assert!(model.gone.insert(id), "served twice");
                            last_dequeued = Some((id, t, d.prompt_tokens));
                        }
                    }
                }
                Op::Cancel { pick } => {
                    if !model.queued.is_empty() {
                        let id = *model.queued.keys().nth(pick % model.queued.len()).unwrap();
                        let t = model.queued.remove(&id).unwrap();
                        model.per_tenant[t].retain(|&x| x != id);
                        let handle = model.handles.remove(&id).unwrap();
                        prop_assert_eq!(q.cancel(handle), Some((t, id)));
                        prop_assert_eq!(q.cancel(handle), None);
                        prop_assert!(model.gone.insert(id));
                        if last_dequeued.is_some_and(|(l, _, _)| l == id) {
                            last_dequeued = None;
                        }
                    }
                }
                Op::ChargeOutput { tenant: t, tokens } => {
                    prop_assert!(q.charge_output(&tenant(t), tokens));
                }
                Op::RequeueLast => {
                    if let Some((id, t, prompt)) = last_dequeued.take() {
                        // A preempted request goes back even past the backlog cap.
                        let handle = q.requeue_front(&tenant(t), prompt, (t, id));
                        prop_assert!(handle.is_ok());
                        model.handles.insert(id, handle.unwrap());
                        model.gone.remove(&id);
                        model.queued.insert(id, t);
                        model.per_tenant[t].insert(0, id);
                    }
                }
                Op::Reweight { tenant: t, weight } => {
                    q.set_tenant(&tenant(t), weight, caps[t]);
                    weight_now[t] = weight;
                }
            }
            prop_assert_eq!(q.len(), model.queued.len());
            for i in 0..TENANTS {
                prop_assert_eq!(q.queued(&tenant(i)), model.per_tenant[i].len());
            }
            let backlogged = model.per_tenant.iter().filter(|v| !v.is_empty()).count();
            prop_assert_eq!(q.backlogged_tenants(), backlogged);
        }
        // Cancel frees everything.
        for (id, handle) in model.handles.drain() {
            prop_assert_eq!(q.cancel(handle).map(|(_, i)| i), Some(id));
        }
        prop_assert!(q.is_empty());
        prop_assert_eq!(q.backlogged_tenants(), 0);
        prop_assert!(q.dequeue().is_none());
    }

    #[test]
    fn backlogged_tenants_stay_within_one_request_of_their_weighted_share(
        weights in proptest::collection::vec(1..6_u32, 2..6),
        prompts in proptest::collection::vec(1..1_000_u32, 64),
        rounds in 200..2_000_usize,
    ) {
        let n = weights.len();
        let mut q: FairQueue<()> = FairQueue::new(ServiceWeights { prompt: 1, output: 2 });
        for (i, w) in weights.iter().enumerate() {
            q.set_tenant(&tenant(i), *w, u32::MAX);
        }
        let mut served = vec![0_u64; n];
        let mut id = 0_usize;
        // Keep every tenant backlogged while `rounds` requests are served.
        for i in 0..n {
            for _ in 0..2 {
                q.enqueue(&tenant(i), prompts[id % prompts.len()], ()).unwrap();
                id += 1;
            }
        }
        for _ in 0..rounds {
            let d = q.dequeue().unwrap();
            let i = d.tenant.as_str()[1..].parse::<usize>().unwrap();
            served[i] += u64::from(d.prompt_tokens);
            q.enqueue(&d.tenant, prompts[id % prompts.len()], ()).unwrap();
            id += 1;
        }
        // Weight-normalised service differs by at most one largest request (< 1,000 tokens).
        #[allow(clippy::cast_precision_loss)]
        let normalised: Vec<f64> = (0..n)
            .map(|i| served[i] as f64 / f64::from(weights[i]))
            .collect();
        let spread = normalised.iter().copied().fold(f64::MIN, f64::max)
            - normalised.iter().copied().fold(f64::MAX, f64::min);
        prop_assert!(spread < 1_000.0, "spread {} over {:?}", spread, normalised);
    }
}
