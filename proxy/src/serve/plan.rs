//! Which worker processes a config asks for.

use crate::dispatch::{TenantSlot, WorkerSpec};
use bulkhead_core::{
    IsolationLevel,
    config::{Config, ModelBackend},
};
use std::path::Path;

/// Batch slots per worker.
pub const WORKER_SLOTS: u32 = 32;

/// One shared worker per model, plus, for every tenant isolated at `process`
/// level or above, one worker per model it may use, serving only it. The KV
/// pool's blocks are split evenly between the workers of the host.
pub fn plan_workers(config: &Config, runtime_dir: &Path, gpu_present: bool) -> Vec<WorkerSpec> {
    let mut planned: Vec<(
        Option<&bulkhead_core::TenantId>,
        &bulkhead_core::config::ModelSpec,
    )> = Vec::new();
    for model in &config.models {
        let shared_users = config
            .tenants
            .iter()
            .any(|t| t.isolation == IsolationLevel::Shared && t.allows_model(&model.name));
        if shared_users {
            planned.push((None, model));
        }
    }
    for tenant in config
        .tenants
        .iter()
        .filter(|t| t.isolation != IsolationLevel::Shared)
    {
        for model in config
            .models
            .iter()
            .filter(|m| tenant.allows_model(&m.name))
        {
            planned.push((Some(&tenant.id), model));
        }
    }
    let count = u32::try_from(planned.len().max(1)).unwrap_or(u32::MAX);
    let blocks = (config.kv.pool_blocks / count).max(1);
    planned
        .into_iter()
        .enumerate()
        .map(|(i, (tenant, model))| {
            let id = u32::try_from(i).unwrap_or(u32::MAX);
            let backend = match model.backend {
                Some(ModelBackend::Cuda) => "cuda",
                Some(ModelBackend::Sim) => "sim",
                None if gpu_present => "cuda",
                Some(ModelBackend::Cpu) | None => "cpu",
            };
            let mut args = vec![
                "--backend".to_owned(),
                backend.to_owned(),
                "--model-name".to_owned(),
                model.name.clone(),
                "--blocks".to_owned(),
                blocks.to_string(),
                "--slots".to_owned(),
                WORKER_SLOTS.to_string(),
                "--step-tokens".to_owned(),
                config.scheduler.step_tokens.to_string(),
                "--over-share-prompt-tokens".to_owned(),
                config.scheduler.over_share_prompt_tokens.to_string(),
            ];
            if let Some(dir) = &model.path {
                args.push("--model-dir".to_owned());
                args.push(dir.display().to_string());
                args.push("--max-context".to_owned());
                args.push(model.max_context_tokens.to_string());
            }
            if let Some(t) = tenant {
                args.push("--tenants".to_owned());
                args.push(t.to_string());
            }
            WorkerSpec {
                id,
                socket: runtime_dir.join(format!("worker-{id}.sock")),
                spawn_args: Some(args),
                dedicated: tenant.cloned(),
                program: None,
            }
        })
        .collect()
}

/// The dispatcher's view of the config's tenants.
pub fn tenant_slots(config: &Config) -> Vec<TenantSlot> {
    config
        .tenants
        .iter()
        .map(|t| TenantSlot {
            id: t.id.clone(),
            weight: t.weight,
            max_queued: t.max_queued_requests,
            dedicated: t.isolation != IsolationLevel::Shared,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_gets_shared_and_dedicated_workers() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/single-host.toml");
        let config = Config::from_path(&path).unwrap();
        let plan = plan_workers(&config, Path::new("/run/bh"), false);
        let described: Vec<(Option<String>, String)> = plan
            .iter()
            .map(|w| {
                let args = w.spawn_args.as_ref().unwrap();
                (
                    w.dedicated.as_ref().map(ToString::to_string),
                    args[3].clone(),
                )
            })
            .collect();
        // research-lab (shared) uses tiny-llama; health-clinic (process) and
        // finance-desk (dedicated) get workers of their own per model.
        assert_eq!(
            described,
            [
                (None, "tiny-llama".to_owned()),
                (
                    Some("health-clinic".to_owned()),
                    "llama-3-8b-instruct".to_owned()
                ),
                (
                    Some("finance-desk".to_owned()),
                    "llama-3-8b-instruct".to_owned()
                ),
                (Some("finance-desk".to_owned()), "tiny-llama".to_owned()),
            ]
        );
        assert!(
            plan.iter()
                .all(|w| w.spawn_args.as_ref().unwrap().contains(&"4096".to_owned()))
        );
        assert_eq!(plan[1].socket, Path::new("/run/bh/worker-1.sock"));
    }

    #[test]
    fn workers_get_the_configs_step_budgets() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/single-host.toml");
        let mut config = Config::from_path(&path).unwrap();
        config.scheduler.step_tokens = 384;
        config.scheduler.over_share_prompt_tokens = 96;
        for worker in plan_workers(&config, Path::new("/run/bh"), false) {
            let args = worker.spawn_args.unwrap();
            let value = |flag: &str| {
                let at = args
                    .iter()
                    .position(|a| a == flag)
                    .expect("the flag is passed");
                args[at + 1].clone()
            };
            assert_eq!(value("--step-tokens"), "384");
            assert_eq!(value("--over-share-prompt-tokens"), "96");
        }
    }

    #[test]
    fn the_configs_step_defaults_are_the_engines() {
        use bulkhead_core::config::{DEFAULT_OVER_SHARE_PROMPT_TOKENS, DEFAULT_STEP_TOKENS};
        let engine = bulkhead_kernels::engine::EngineConfig::default();
        assert_eq!(DEFAULT_STEP_TOKENS as usize, engine.max_step_tokens);
        assert_eq!(
            DEFAULT_OVER_SHARE_PROMPT_TOKENS as usize,
            engine.over_share_prompt_tokens
        );
    }
}
