//! Engine tests on the CPU reference (real model, real guard) and the sim.

use super::*;
use crate::{
    cpu::CpuBackend,
    layout::FREE_TAG,
    model::{ModelConfig, Weights},
    sim::{CostModel, SimBackend},
};
use bulkhead_core::wire::Sampling;
use std::collections::HashMap;

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

fn cpu_engine(blocks: usize, cfg: EngineConfig) -> Engine<CpuBackend> {
    let model = ModelConfig::tiny();
    let weights = Weights::from_seed(&model, 1);
    Engine::new(CpuBackend::new(model, weights, blocks).unwrap(), cfg)
}

fn sim_engine(blocks: usize, cfg: EngineConfig) -> Engine<SimBackend> {
    Engine::new(
        SimBackend::new(ModelConfig::tiny(), blocks, CostModel::default()).unwrap(),
        cfg,
    )
}

fn submit(id: u128, who: &str, prompt: Vec<u32>, max_tokens: u32) -> Submit {
    Submit {
        request_id: RequestId(id),
        tenant: tenant(who),
        model: "bulkhead-tiny".to_owned(),
        prompt_tokens: prompt,
        max_tokens,
        sampling: Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: Some(7),
            stop: Vec::new(),
        },
        kv_block_quota: 1_000,
    }
}

fn text_prompt(len: usize) -> Vec<u32> {
    let text = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. ";
    std::iter::once(256)
        .chain(text.iter().cycle().map(|&b| u32::from(b)))
        .take(len)
        .collect()
}

/// What a request got: its tokens (checked to arrive in order) and its `Finished`.
#[derive(Debug, Default)]
struct Outcome {
    tokens: Vec<u32>,
    finished: Option<Finished>,
    rejected: Vec<Rejected>,
    violations: Vec<Violation>,
}

fn absorb(outcomes: &mut HashMap<RequestId, Outcome>, messages: Vec<WorkerToProxy>) {
    for m in messages {
        match m {
            WorkerToProxy::Tokens {
                request_id,
                first_index,
                tokens,
            } => {
                let o = outcomes.entry(request_id).or_default();
                assert!(o.finished.is_none(), "tokens after Finished");
                assert_eq!(first_index as usize, o.tokens.len(), "a gap or a repeat");
                assert!(!tokens.is_empty());
                o.tokens.extend(tokens);
            }
            WorkerToProxy::Finished(f) => {
                let o = outcomes.entry(f.request_id).or_default();
                assert!(o.finished.is_none(), "two Finished for one request");
                assert_eq!(f.output_tokens as usize, o.tokens.len());
                o.finished = Some(f);
            }
            WorkerToProxy::Rejected(r) => {
                let id = r.request_id.unwrap_or(RequestId(0));
                outcomes.entry(id).or_default().rejected.push(r);
            }
            WorkerToProxy::Violation(v) => {
                outcomes.entry(v.request_id).or_default().violations.push(v);
            }
            WorkerToProxy::Capacity(_) | WorkerToProxy::Hello(_) => {}
        }
    }
}

fn run_to_end<B: Backend>(engine: &mut Engine<B>, outcomes: &mut HashMap<RequestId, Outcome>) {
    for _ in 0..10_000 {
        let ran = engine.step().unwrap();
        absorb(outcomes, engine.take_outbox());
        if ran.is_none() && !engine.has_work() {
            engine.pool().check_invariants().unwrap();
            return;
        }
    }
    panic!("the engine did not finish");
}

fn run_one<B: Backend>(engine: &mut Engine<B>, s: Submit) -> Outcome {
    let id = s.request_id;
    engine.submit(s);
    let mut outcomes = HashMap::new();
    run_to_end(engine, &mut outcomes);
    outcomes.remove(&id).unwrap()
}

#[test]
fn same_seed_same_prompt_same_tokens_on_cpu() {
    let prompt = text_prompt(37);
    for temperature in [0.0, 0.9] {
        let mut s = submit(1, "acme", prompt.clone(), 24);
        s.sampling.temperature = temperature;
        s.sampling.top_p = 0.95;
        let a = run_one(&mut cpu_engine(64, EngineConfig::default()), s.clone());
        let b = run_one(&mut cpu_engine(64, EngineConfig::default()), s.clone());
        assert_eq!(a.tokens, b.tokens, "temperature {temperature}");
        assert!(!a.tokens.is_empty());
        if temperature > 0.0 {
            s.sampling.seed = Some(8);
            let c = run_one(&mut cpu_engine(64, EngineConfig::default()), s);
            assert_ne!(a.tokens, c.tokens, "another seed gave the same 24 tokens");
        }
    }
}

#[test]
fn chunked_prefill_gives_the_same_tokens_as_one_chunk() {
    let prompt = text_prompt(300);
    let whole = run_one(
        &mut cpu_engine(
            64,
            EngineConfig {
                prefill_chunk: 512,
                ..EngineConfig::default()
            },
        ),
        submit(1, "acme", prompt.clone(), 8),
    );
    let mut engine = cpu_engine(
        64,
        EngineConfig {
            prefill_chunk: 64,
            ..EngineConfig::default()
        },
    );
    engine.submit(submit(1, "acme", prompt, 8));
    let report = engine.step().unwrap().unwrap();
    assert_eq!(report.tokens, 64, "the first step runs one chunk");
    let mut outcomes = HashMap::new();
    run_to_end(&mut engine, &mut outcomes);
    let chunked = outcomes.remove(&RequestId(1)).unwrap();
    // Chunked attention sums in the same order, so the logits are bit-identical.
    assert_eq!(whole.tokens, chunked.tokens);
}

#[test]
fn identical_prompts_of_two_tenants_share_no_block_and_no_cache_hit() {
    let prompt = text_prompt(1_000);
    let mut engine = cpu_engine(
        256,
        EngineConfig {
            max_step_tokens: 2_048,
            prefill_chunk: 1_024,
            ..EngineConfig::default()
        },
    );
    engine.submit(submit(1, "acme", prompt.clone(), 3));
    engine.submit(submit(2, "globex", prompt.clone(), 3));
    engine.step().unwrap().unwrap();
    let a: BTreeSet<u32> = engine.seqs[&RequestId(1)].blocks.iter().copied().collect();
    let b: BTreeSet<u32> = engine.seqs[&RequestId(2)].blocks.iter().copied().collect();
    assert_eq!(a.len(), 63);
    assert_eq!(b.len(), 63);
    assert!(a.is_disjoint(&b), "tenants share KV blocks");
    let tag_a = engine.pool.tenant_tag(&tenant("acme"));
    assert!(
        a.iter()
            .all(|&blk| engine.pool.owner_tag(BlockId(blk)) == tag_a)
    );
    let mut outcomes = HashMap::new();
    run_to_end(&mut engine, &mut outcomes);
    let first_a = outcomes.remove(&RequestId(1)).unwrap();
    let first_b = outcomes.remove(&RequestId(2)).unwrap();
    assert_eq!(first_a.finished.unwrap().prefix_cache_hit_tokens, 0);
    assert_eq!(
        first_b.finished.unwrap().prefix_cache_hit_tokens,
        0,
        "globex hit acme's cache"
    );
    assert_eq!(first_a.tokens, first_b.tokens, "same model, same prompt");

    // acme again: its own 62 full blocks (992 tokens) come from its cache,
    // and the answer is the same as computing them.
    let again = run_one(&mut engine, submit(3, "acme", prompt, 3));
    assert_eq!(again.finished.unwrap().prefix_cache_hit_tokens, 992);
    assert_eq!(again.tokens, first_a.tokens);
    assert_eq!(engine.stats().prefix_hit_tokens, 992);
}

#[test]
fn a_block_freed_by_one_tenant_reads_as_zeros_for_the_next() {
    // 8 blocks: acme's request (5 blocks) must be recycled for globex's (7).
    let mut engine = cpu_engine(8, EngineConfig::default());
    let a = run_one(&mut engine, submit(1, "acme", text_prompt(40), 30));
    assert_eq!(a.tokens.len(), 30);
    // acme's published blocks stay in its cache, holding its K/V; the rest are scrubbed.
    engine.scrub().unwrap();
    let tag_a = engine.pool.tenant_tag(&tenant("acme"));
    let mut cached = 0;
    for blk in 0..8 {
        let data = engine.backend.read_block(blk).unwrap();
        match engine.pool.owner_tag(BlockId(blk)) {
            FREE_TAG => assert!(
                data.iter().all(|&x| x == 0.0),
                "free block {blk} not zeroed"
            ),
            t => {
                assert_eq!(t, tag_a);
                assert!(data.iter().any(|&x| x != 0.0));
                cached += 1;
            }
        }
    }
    assert!(cached > 0, "acme's prompt blocks should be cached");

    // globex needs the whole pool: acme's cache is evicted and scrubbed first.
    let prompt_b = text_prompt(100);
    let mut s = submit(2, "globex", prompt_b.clone(), 10);
    s.sampling.stop = vec![];
    engine.submit(s.clone());
    engine.scrub().unwrap();
    engine.admit();
    let plan = engine.plan().unwrap();
    assert_eq!(plan.len(), 1);
    engine.scrub().unwrap();
    let tag_b = engine.pool.tenant_tag(&tenant("globex"));
    for &blk in &engine.seqs[&RequestId(2)].blocks {
        assert_eq!(engine.pool.owner_tag(BlockId(blk)), tag_b);
        let data = engine.backend.read_block(blk).unwrap();
        assert!(
            data.iter().all(|&x| x == 0.0),
            "block {blk} came to globex unscrubbed"
        );
    }
    // And globex's answer is exactly what a fresh worker gives.
    let mut outcomes = HashMap::new();
    // Re-run the planned step through the normal path.
    engine.cancel(RequestId(2));
    absorb(&mut outcomes, engine.take_outbox());
    let recycled = run_one(&mut engine, submit(3, "globex", prompt_b.clone(), 10));
    let fresh = run_one(
        &mut cpu_engine(8, EngineConfig::default()),
        submit(3, "globex", prompt_b, 10),
    );
    assert_eq!(recycled.tokens, fresh.tokens);
}

#[test]
fn a_planted_foreign_block_fails_that_request_only() {
    let run = |plant: bool| {
        let mut engine = cpu_engine(64, EngineConfig::default());
        engine.submit(submit(1, "acme", text_prompt(40), 12));
        engine.submit(submit(2, "globex", text_prompt(33), 12));
        let mut outcomes = HashMap::new();
        for _ in 0..3 {
            engine.step().unwrap();
            absorb(&mut outcomes, engine.take_outbox());
        }
        if plant {
            let foreign = engine.seqs[&RequestId(2)].blocks[0];
            engine.plant_block(RequestId(1), 1, foreign);
        }
        run_to_end(&mut engine, &mut outcomes);
        (outcomes, engine.stats())
    };
    let (clean, _) = run(false);
    let (planted, stats) = run(true);
    let victim = &planted[&RequestId(1)];
    assert_eq!(victim.violations.len(), 1);
    // Block 1 is only read now (the sequence writes at position 42, block 2).
    assert_eq!(victim.violations[0].kind, ViolationKind::CrossTenantRead);
    assert_eq!(victim.violations[0].tenant, tenant("acme"));
    let fin = victim.finished.as_ref().unwrap();
    assert_eq!(fin.reason, FinishReason::Error);
    assert!(victim.tokens.len() < 12);
    assert_eq!(stats.violations, 1);
    // globex never noticed: same tokens, same end.
    let other = &planted[&RequestId(2)];
    assert!(other.violations.is_empty());
    assert_eq!(other.tokens, clean[&RequestId(2)].tokens);
    assert_eq!(
        other.finished.as_ref().unwrap().reason,
        FinishReason::Length
    );
}

#[test]
#[allow(clippy::too_many_lines)] // one table of cases
fn bad_submits_get_typed_refusals_and_the_engine_goes_on() {
    let mut engine = cpu_engine(
        32,
        EngineConfig {
            tenants: Some([tenant("acme")].into()),
            ..EngineConfig::default()
        },
    );
    let good = submit(1, "acme", text_prompt(10), 2);
    let cases: Vec<(Submit, RejectKind)> = vec![
        (
            Submit {
                model: "gpt-9".into(),
                ..good.clone()
            },
            RejectKind::UnknownModel,
        ),
        (
            Submit {
                tenant: tenant("globex"),
                ..good.clone()
            },
            RejectKind::UnknownTenant,
        ),
        (
            Submit {
                prompt_tokens: vec![],
                ..good.clone()
            },
            RejectKind::InvalidPrompt,
        ),
        (
            Submit {
                prompt_tokens: vec![1, 9_999],
                ..good.clone()
            },
            RejectKind::InvalidPrompt,
        ),
        (
            Submit {
                prompt_tokens: text_prompt(2_048),
                ..good.clone()
            },
            RejectKind::PromptTooLong,
        ),
        (
            Submit {
                max_tokens: 0,
                ..good.clone()
            },
            RejectKind::InvalidSampling,
        ),
        (
            Submit {
                sampling: Sampling {
                    top_p: 0.0,
                    ..good.sampling.clone()
                },
                ..good.clone()
            },
            RejectKind::InvalidSampling,
        ),
        (
            Submit {
                kv_block_quota: 0,
                tenant: tenant("acme"),
                ..good.clone()
            },
            RejectKind::QuotaExhausted,
        ),
    ];
    for (i, (mut bad, kind)) in cases.into_iter().enumerate() {
        bad.request_id = RequestId(100 + i as u128);
        if kind == RejectKind::QuotaExhausted {
            // A fresh tenant name with no earlier quota.
            engine
                .cfg
                .tenants
                .as_mut()
                .unwrap()
                .insert(tenant("initech"));
            bad.tenant = tenant("initech");
        }
        let out = run_one(&mut engine, bad);
        assert_eq!(out.rejected.len(), 1, "{kind:?}");
        assert_eq!(out.rejected[0].kind, kind);
        assert!(!out.rejected[0].detail.is_empty());
        assert_eq!(out.finished.unwrap().reason, FinishReason::Error);
    }
    // A duplicate id gets a refusal and no second Finished; the original runs on.
    engine.submit(good.clone());
    engine.submit(good.clone());
    let mut outcomes = HashMap::new();
    run_to_end(&mut engine, &mut outcomes);
    let o = &outcomes[&RequestId(1)];
    assert_eq!(o.rejected.len(), 1);
    assert_eq!(o.rejected[0].kind, RejectKind::DuplicateRequest);
    assert_eq!(o.finished.as_ref().unwrap().reason, FinishReason::Length);
    assert_eq!(o.tokens.len(), 2);
    // After a shutdown, new work is refused; nothing is left running.
    engine.handle(ProxyToWorker::Shutdown);
    let out = run_one(
        &mut engine,
        Submit {
            request_id: RequestId(9),
            ..good
        },
    );
    assert_eq!(out.rejected[0].kind, RejectKind::ShuttingDown);
    assert!(engine.is_drained());
}

#[test]
fn cancel_ends_a_request_and_frees_its_blocks() {
    let mut engine = sim_engine(64, EngineConfig::default());
    engine.submit(submit(1, "acme", text_prompt(20), 1_000));
    let mut outcomes = HashMap::new();
    for _ in 0..5 {
        engine.step().unwrap();
    }
    absorb(&mut outcomes, engine.take_outbox());
    engine.handle(ProxyToWorker::Cancel {
        request_id: RequestId(1),
    });
    engine.handle(ProxyToWorker::Cancel {
        request_id: RequestId(42),
    }); // unknown: ignored
    absorb(&mut outcomes, engine.take_outbox());
    let o = &outcomes[&RequestId(1)];
    assert_eq!(o.finished.as_ref().unwrap().reason, FinishReason::Cancelled);
    assert_eq!(o.tokens.len(), 5);
    assert!(!engine.has_work());
    // Only its published prompt block stays, as acme's cache.
    assert_eq!(engine.pool().used_blocks(&tenant("acme")), 1);
    assert_eq!(engine.pool().cached_blocks(&tenant("acme")), 1);
}

#[test]
fn stop_sequences_end_generation_and_are_not_streamed() {
    let free = run_one(
        &mut sim_engine(64, EngineConfig::default()),
        submit(1, "acme", text_prompt(9), 20),
    );
    assert_eq!(free.tokens.len(), 20);
    let mut s = submit(1, "acme", text_prompt(9), 20);
    s.sampling.stop = vec![vec![9_999, 1], free.tokens[6..9].to_vec()];
    let stopped = run_one(&mut sim_engine(64, EngineConfig::default()), s);
    let first = free
        .tokens
        .windows(3)
        .position(|w| w == &free.tokens[6..9])
        .unwrap();
    assert_eq!(stopped.tokens, free.tokens[..first]);
    assert_eq!(stopped.finished.unwrap().reason, FinishReason::Stop);
}

#[test]
fn a_starved_tenant_preempts_the_tenant_most_over_its_share() {
    let mut engine = sim_engine(
        512,
        EngineConfig {
            max_slots: 4,
            ..EngineConfig::default()
        },
    );
    for i in 0..6 {
        engine.submit(submit(i, "acme", text_prompt(20), 50));
    }
    engine.step().unwrap();
    assert_eq!(engine.running.len(), 4);
    engine.submit(submit(10, "globex", text_prompt(20), 5));
    engine.step().unwrap();
    assert!(
        engine.running.contains(&RequestId(10)),
        "globex waits behind acme"
    );
    assert_eq!(engine.stats().preemptions, 1);
    // acme's youngest running request (3) went back to the queue's front.
    assert_eq!(engine.waiting.front(), Some(&RequestId(3)));
    let mut outcomes = HashMap::new();
    run_to_end(&mut engine, &mut outcomes);
    for i in 0..6 {
        let o = &outcomes[&RequestId(i)];
        assert_eq!(
            o.tokens.len(),
            50,
            "request {i}: preemption lost or repeated tokens"
        );
    }
}

#[test]
fn a_tenant_at_its_quota_preempts_its_own_youngest_and_all_finish() {
    let mut engine = sim_engine(512, EngineConfig::default());
    // 6 blocks of quota; two requests that grow to 4 blocks each.
    for i in 0..2 {
        let mut s = submit(i, "acme", text_prompt(17), 40);
        s.kv_block_quota = 6;
        engine.submit(s);
    }
    engine.submit(submit(5, "globex", text_prompt(17), 40));
    let mut outcomes = HashMap::new();
    let mut peak = 0;
    for _ in 0..10_000 {
        let ran = engine.step().unwrap();
        peak = peak.max(engine.pool().used_blocks(&tenant("acme")));
        absorb(&mut outcomes, engine.take_outbox());
        if ran.is_none() && !engine.has_work() {
            break;
        }
    }
    assert!(peak <= 6, "acme held {peak} blocks over its quota of 6");
    assert!(engine.stats().preemptions >= 1);
    for id in [0, 1, 5] {
        let o = &outcomes[&RequestId(id)];
        assert_eq!(o.tokens.len(), 40, "request {id}");
        assert_eq!(o.finished.as_ref().unwrap().reason, FinishReason::Length);
    }
}

#[test]
fn capacity_is_reported_after_changes_only() {
    let mut engine = sim_engine(
        64,
        EngineConfig {
            max_slots: 3,
            ..EngineConfig::default()
        },
    );
    let first = engine.take_outbox();
    assert!(
        matches!(first.as_slice(), [WorkerToProxy::Capacity(c)] if c.free_slots == 3 && c.free_blocks == 64)
    );
    assert!(engine.take_outbox().is_empty());
    engine.submit(submit(1, "acme", text_prompt(40), 3));
    engine.step().unwrap();
    let caps: Vec<Capacity> = engine
        .take_outbox()
        .into_iter()
        .filter_map(|m| match m {
            WorkerToProxy::Capacity(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(caps.len(), 1);
    assert_eq!(caps[0].free_slots, 2);
    assert_eq!(caps[0].per_tenant[0].tenant, tenant("acme"));
    assert_eq!(caps[0].per_tenant[0].used_blocks, 3);
    assert_eq!(caps[0].per_tenant[0].quota, 1_000);
}

#[test]
fn uneven_shares_do_not_make_tenants_swap_slots_forever() {
    // 8 slots, 3 tenants: shares of 2.67. 3 + 3 + 2 running is as fair as
    // integers allow; no preemption may fire back and forth.
    let mut engine = sim_engine(
        512,
        EngineConfig {
            max_slots: 8,
            ..EngineConfig::default()
        },
    );
    let mut id = 0;
    for (who, n) in [("acme", 4), ("globex", 4), ("initech", 4)] {
        for _ in 0..n {
            id += 1;
            engine.submit(submit(id, who, text_prompt(20), 40));
        }
    }
    for _ in 0..20 {
        engine.step().unwrap();
    }
    let counts = engine.running_per_tenant();
    assert_eq!(counts.values().sum::<usize>(), 8);
    assert!(counts.values().all(|&n| (2..=3).contains(&n)), "{counts:?}");
    let after_settling = engine.stats().preemptions;
    for _ in 0..20 {
        engine.step().unwrap();
    }
    assert_eq!(
        engine.stats().preemptions,
        after_settling,
        "preemptions kept firing"
    );
}

#[test]
fn a_freed_slot_goes_to_the_waiting_tenant_running_the_fewest() {
    // 2 slots. acme fills both; globex arrives and preempts acme's youngest,
    // which then waits at the queue's front. When globex's short request
    // ends, the freed slot goes to globex's next request (globex runs none)
    // rather than to acme's preempted one at the front: no second
    // preemption is needed to put globex back.
    let mut engine = sim_engine(
        256,
        EngineConfig {
            max_slots: 2,
            ..EngineConfig::default()
        },
    );
    for id in 1..=3 {
        engine.submit(submit(id, "acme", text_prompt(20), 500));
    }
    engine.step().unwrap();
    engine.submit(submit(4, "globex", text_prompt(20), 2));
    engine.step().unwrap();
    assert_eq!(engine.stats().preemptions, 1);
    engine.submit(submit(5, "globex", text_prompt(20), 500));
    let mut outcomes = HashMap::new();
    while outcomes
        .get(&RequestId(4))
        .is_none_or(|o: &Outcome| o.finished.is_none())
    {
        engine.step().unwrap();
        absorb(&mut outcomes, engine.take_outbox());
    }
    engine.step().unwrap();
    let counts = engine.running_per_tenant();
    assert_eq!(counts.get(&tenant("globex")), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&tenant("acme")), Some(&1), "{counts:?}");
    assert_eq!(
        engine.stats().preemptions,
        1,
        "the freed slot went to globex without preempting acme again"
    );
}

#[test]
fn a_first_token_under_the_share_runs_without_prompts_of_tenants_over_it() {
    // 8 slots. globex: three decoding, one long prompt mid-prefill (4 of 8
    // slots, its share with two tenants running). acme's prompt arrives:
    // acme is under its share and waits for a first token, so the next step
    // runs globex's decodes and acme's prompt, and globex's prompt waits a step.
    let mut engine = sim_engine(
        512,
        EngineConfig {
            max_slots: 8,
            ..EngineConfig::default()
        },
    );
    for id in 1..=3 {
        engine.submit(submit(id, "globex", text_prompt(20), 100));
    }
    engine.step().unwrap();
    engine.submit(submit(4, "globex", text_prompt(700), 100));
    let first = engine.step().unwrap().unwrap();
    assert_eq!(
        first.tokens,
        3 + 253,
        "decodes, then the long prompt's first chunk"
    );
    engine.submit(submit(5, "acme", text_prompt(20), 100));
    let held = engine.step().unwrap().unwrap();
    assert_eq!(
        held.tokens,
        3 + 20,
        "globex's decodes and acme's prompt only"
    );
    let mut outcomes = HashMap::new();
    absorb(&mut outcomes, engine.take_outbox());
    assert_eq!(
        outcomes[&RequestId(5)].tokens.len(),
        1,
        "acme's first token came with that step"
    );
    let next = engine.step().unwrap().unwrap();
    assert_eq!(
        next.tokens,
        4 + 136,
        "globex's prompt goes on at once after, within the cap on prompts over the share"
    );
}

#[test]
fn a_quiet_tenant_has_the_step_budget_it_would_have_alone() {
    // 8 slots, 64 tokens a step. globex decodes 5 sequences (over its share
    // of 4). acme's 62-token prompt runs whole in the next step: globex's
    // decodes do not count against acme's budget, so the step is 5 + 62.
    let mut engine = sim_engine(
        512,
        EngineConfig {
            max_slots: 8,
            max_step_tokens: 64,
            ..EngineConfig::default()
        },
    );
    for id in 1..=5 {
        engine.submit(submit(id, "globex", text_prompt(10), 100));
    }
    assert_eq!(engine.step().unwrap().unwrap().tokens, 50);
    engine.submit(submit(6, "acme", text_prompt(62), 100));
    let step = engine.step().unwrap().unwrap();
    assert_eq!(
        step.tokens,
        5 + 62,
        "globex's decodes and acme's whole prompt"
    );
    let mut outcomes = HashMap::new();
    absorb(&mut outcomes, engine.take_outbox());
    assert_eq!(
        outcomes[&RequestId(6)].tokens.len(),
        1,
        "acme's first token"
    );
}

#[test]
fn prompts_over_the_share_are_capped_only_while_a_quiet_tenant_runs() {
    // 8 slots; at most 32 prompt tokens a step for tenants over their share.
    // acme runs one short request (3 tokens); globex sends five long prompts.
    let mut engine = sim_engine(
        1_024,
        EngineConfig {
            max_slots: 8,
            over_share_prompt_tokens: 32,
            ..EngineConfig::default()
        },
    );
    engine.submit(submit(1, "acme", text_prompt(10), 3));
    for id in 2..=6 {
        engine.submit(submit(id, "globex", text_prompt(200), 100));
    }
    let tokens: Vec<usize> = (0..4)
        .map(|_| engine.step().unwrap().unwrap().tokens)
        .collect();
    assert_eq!(
        tokens,
        [
            10,     // acme's first token first: globex's prompts wait
            1 + 32, // acme's decode, globex's prompts within the cap
            1 + 32, // acme's last token
            256,    // globex alone: the whole step budget
        ]
    );
}

#[test]
fn prompts_go_first_to_the_tenant_running_the_fewest() {
    // acme runs 5 sequences, globex 2 (both under half of 16 slots, so
    // nobody's prompts are held): globex's prompt is planned before acme's
    // older one, whatever the arrival order.
    let mut engine = sim_engine(
        1024,
        EngineConfig {
            max_slots: 16,
            ..EngineConfig::default()
        },
    );
    for id in 1..=4 {
        engine.submit(submit(id, "acme", text_prompt(20), 100));
    }
    engine.submit(submit(5, "globex", text_prompt(20), 100));
    engine.step().unwrap();
    engine.submit(submit(6, "acme", text_prompt(300), 100));
    engine.submit(submit(7, "globex", text_prompt(300), 100));
    engine.step().unwrap();
    let order = engine.step_order(&engine.running_per_tenant());
    let prompts: Vec<RequestId> = order.into_iter().skip(5).collect();
    assert_eq!(prompts, vec![RequestId(7), RequestId(6)]);
}
