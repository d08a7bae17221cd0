//! Every example config under `deploy/examples/` parses and validates.
//!
//! Operators start from these files, so a change to the config format that
//! breaks one of them fails here, not on a host.

use bulkhead_core::config::{Config, ModelBackend};
use bulkhead_core::{IsolationLevel, TenantId};
use std::path::{Path, PathBuf};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples")
}

fn example(name: &str) -> Config {
    let path = examples_dir().join(name);
    Config::from_path(&path).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()))
}

fn tenant<'c>(config: &'c Config, id: &str) -> &'c bulkhead_core::config::TenantPolicy {
    config
        .tenant(&TenantId::new(id).unwrap())
        .unwrap_or_else(|| panic!("no tenant {id}"))
}

#[test]
fn every_example_validates_and_has_a_tenant() {
    let dir = examples_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no *.toml example in {}", dir.display());

    let mut failures = Vec::new();
    for path in &paths {
        match Config::from_path(path) {
            Ok(config) if config.tenants.is_empty() => {
                failures.push(format!("{}: no tenant", path.display()));
            }
            Ok(_) => {}
            Err(errors) => failures.push(format!("{}:\n{errors}", path.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn demo_has_alice_and_bob_with_equal_shares_of_tiny_llama_on_cpu() {
    let config = example("demo.toml");
    assert_eq!(config.tenants.len(), 2);
    let (alice, bob) = (tenant(&config, "alice"), tenant(&config, "bob"));
    assert_eq!(alice.weight, bob.weight);
    assert!(alice.allows_model("tiny-llama") && bob.allows_model("tiny-llama"));
    let model = config.model("tiny-llama").expect("tiny-llama is defined");
    assert_eq!(model.backend, Some(ModelBackend::Cpu));
}

#[test]
fn single_host_separates_its_tenants_as_documented() {
    let config = example("single-host.toml");
    assert_eq!(config.tenants.len(), 3);
    assert_eq!(
        tenant(&config, "health-clinic").isolation,
        IsolationLevel::Process
    );
    assert_eq!(
        tenant(&config, "finance-desk").isolation,
        IsolationLevel::Dedicated
    );
    assert_eq!(
        tenant(&config, "research-lab").isolation,
        IsolationLevel::Shared
    );
    assert_eq!(tenant(&config, "finance-desk").api_key_sha256.len(), 2);
}
