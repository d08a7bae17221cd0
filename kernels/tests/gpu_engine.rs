//! The whole engine on the CUDA backend against the CPU reference: the same
//! requests of two tenants (identical prompts, a prefix-cache hit, sampling)
//! give the same tokens and the same cache accounting. Needs an NVIDIA GPU:
//! `#[ignore]`d by default, and it fails (never skips) without one.

use bulkhead_core::{
    TenantId,
    wire::{FinishReason, Finished, RequestId, Sampling, Submit, WorkerToProxy},
};
use bulkhead_kernels::{
    backend::Backend,
    cpu::CpuBackend,
    cuda::{self, CudaBackend},
    engine::{Engine, EngineConfig},
    model::{ModelConfig, Weights},
};
use std::collections::BTreeMap;

fn submit(id: u128, tenant: &str, prompt: &[u32], temperature: f32) -> Submit {
    Submit {
        request_id: RequestId(id),
        tenant: TenantId::new(tenant).unwrap(),
        model: "bulkhead-tiny".to_owned(),
        prompt_tokens: prompt.to_vec(),
        max_tokens: 24,
        sampling: Sampling {
            temperature,
            top_p: 0.9,
            seed: Some(5),
            stop: vec![],
        },
        kv_block_quota: 200,
    }
}

type Outcomes = BTreeMap<RequestId, (Vec<u32>, Finished)>;

fn run<B: Backend>(backend: B) -> Outcomes {
    let mut engine = Engine::new(backend, EngineConfig::default());
    let prompt: Vec<u32> = std::iter::once(256)
        .chain((0..300u32).map(|i| 32 + (i * 7) % 90))
        .collect();
    let mut out: BTreeMap<RequestId, (Vec<u32>, Option<Finished>)> = BTreeMap::new();
    let rounds: [&[Submit]; 2] = [
        &[
            submit(1, "acme", &prompt, 0.0),
            submit(2, "globex", &prompt, 0.0),
            submit(3, "acme", &prompt[..40], 0.8),
        ],
        &[submit(4, "acme", &prompt, 0.0)],
    ];
    for round in rounds {
        for s in round {
            engine.submit(s.clone());
        }
        for _ in 0..10_000 {
            let ran = engine.step().unwrap();
            for m in engine.take_outbox() {
                match m {
                    WorkerToProxy::Tokens {
                        request_id, tokens, ..
                    } => {
                        out.entry(request_id).or_default().0.extend(tokens);
                    }
                    WorkerToProxy::Finished(f) => {
                        let id = f.request_id;
                        out.entry(id).or_default().1 = Some(f);
                    }
                    WorkerToProxy::Violation(v) => panic!("violation: {v:?}"),
                    WorkerToProxy::Rejected(r) => panic!("rejected: {r:?}"),
                    WorkerToProxy::Capacity(_) | WorkerToProxy::Hello(_) => {}
                }
            }
            if ran.is_none() && !engine.has_work() {
                break;
            }
        }
    }
    out.into_iter()
        .map(|(id, (tokens, f))| (id, (tokens, f.expect("every request finished"))))
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn the_engine_on_cuda_gives_the_cpu_references_tokens() {
    assert!(
        cuda::available(),
        "this test needs an NVIDIA GPU and its driver (libcuda): cuda::available() is false here"
    );
    let cfg = ModelConfig::tiny();
    let weights = Weights::from_seed(&cfg, 1);
    let gpu = run(CudaBackend::new(cfg.clone(), &weights, 512, 0).expect("CudaBackend on GPU 0"));
    let cpu = run(CpuBackend::new(cfg, weights, 512).unwrap());
    assert_eq!(gpu.len(), 4);
    for (id, (tokens, fin)) in &cpu {
        let (g_tokens, g_fin) = &gpu[id];
        assert_eq!(
            g_tokens, tokens,
            "request {id}: tokens differ between cuda and cpu"
        );
        assert_eq!(g_fin, fin, "request {id}");
        assert_eq!(fin.reason, FinishReason::Length);
    }
    // acme's second request hit acme's cache (18 full blocks of 300 tokens), globex never did.
    assert_eq!(cpu[&RequestId(2)].1.prefix_cache_hit_tokens, 0);
    assert_eq!(cpu[&RequestId(4)].1.prefix_cache_hit_tokens, 288);
    assert_eq!(cpu[&RequestId(1)].0, cpu[&RequestId(4)].0);
}
