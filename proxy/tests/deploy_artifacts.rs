//! The per-host deployment artifacts of `deploy/`, checked by real tools:
//!
//! - `bulkhead deploy netpol` and `bulkhead mig plan` for the sample config
//!   `deploy/examples/mig-host.toml` equal `deploy/expected/*` byte for
//!   byte (`BULKHEAD_BLESS=1` rewrites them after an intended change);
//! - the MIG planner never breaks the H100's rules (7 compute and 8 memory
//!   slices, the placements of each profile), finds a placement whenever
//!   one exists on a GPU, and names the tenant that does not fit;
//! - the Kubernetes manifests and the generated network policies pass the
//!   Kubernetes 1.37 JSON schemas (`kubernetes-validate`, pinned in the
//!   project venv by `cargo xtask setup`), and agree with the config they
//!   carry (ports, paths, labels, capabilities);
//! - every `PromQL` expression of the Grafana dashboard and the alert rules
//!   parses (`promql-parser`) and names only series and labels that
//!   `Metrics::render` emits;
//! - the systemd unit and slice pass `systemd-analyze verify` without a
//!   single warning.

use bulkhead::api::metrics::{KernelCounts, Metrics};
use bulkhead::deploy::mig::{
    self, COMPUTE_SLICES, Footprint, Footprints, GpuRole, H100_80GB, MEMORY_SLICES, MigProfile,
    PlanError,
};
use bulkhead::deploy::netpol::{APP_LABEL, APP_NAME};
use bulkhead::deploy::{DeployCommand, MigCommand, run_deploy, run_mig};
use bulkhead_core::TenantId;
use bulkhead_core::config::Config;
use promql_parser::label::Matchers;
use promql_parser::parser::{self, Expr, LabelModifier, VectorSelector};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

// ---------------------------------------------------------------------------
// Paths and helpers

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proxy/ has a parent")
        .to_owned()
}

fn deploy_path(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn sample_config() -> PathBuf {
    deploy_path("examples/mig-host.toml")
}

/// A fresh directory of this test under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bulkhead-deploy-artifacts-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Compares `actual` with the expected file, or rewrites it under `BULKHEAD_BLESS=1`.
fn check_expected(name: &str, actual: &str) {
    let path = deploy_path("expected").join(name);
    if std::env::var_os("BULKHEAD_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let expected = read(&path);
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the output at line {}:\n  expected: {:?}\n  actual:   {:?}\n\
             whole output:\n{actual}\n\
             If the change is intended, rerun with BULKHEAD_BLESS=1 and review the diff.",
            path.display(),
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line),
        );
    }
}

/// The project venv's Python, which must import the pinned `kubernetes_validate`.
fn venv_python() -> PathBuf {
    let python = root().join("target/pyenv/bin/python");
    let ok = python.is_file()
        && Command::new(&python)
            .args(["-c", "import kubernetes_validate, yaml"])
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import kubernetes_validate: run `cargo xtask setup` to build the test venv",
        python.display()
    );
    python
}

/// Every YAML document of `path`, as JSON (the safe loader of `PyYAML` in the venv).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let out = Command::new(venv_python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("running the venv's python");
    assert!(
        out.status.success(),
        "{} is not valid YAML:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let Value::Array(docs) = serde_json::from_slice(&out.stdout).expect("json from python") else {
        panic!("python did not print a list");
    };
    docs
}

/// Runs `kubernetes-validate --strict` on `files`; returns the resources it
/// passed (`kind/name`), failing on any error or warning (an unknown kind
/// is a warning there, so it would otherwise pass unchecked).
fn kubernetes_validate(files: &[PathBuf]) -> Vec<String> {
    let out = Command::new(venv_python())
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            "1.37.0",
        ])
        .args(files)
        .output()
        .expect("running kubernetes_validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    let mut passed = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Some(rest) = line.strip_prefix("INFO ") else {
            panic!("kubernetes-validate reported a problem:\n{text}");
        };
        let resource = rest
            .split_once(" passed for resource ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected kubernetes-validate line: {line}"));
        passed.push(resource.to_owned());
    }
    passed
}

fn at<'v>(v: &'v Value, path: &str) -> &'v Value {
    path.split('.')
        .fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[key],
        })
}

fn str_at<'v>(v: &'v Value, path: &str) -> &'v str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v}"))
}

// ---------------------------------------------------------------------------
// netpol and mig plan against the expected files

#[test]
fn netpol_of_the_sample_config_matches_the_expected_file() {
    let yaml = run_deploy(&DeployCommand::Netpol {
        config: sample_config(),
        namespace: "bulkhead".to_owned(),
        out: None,
    })
    .unwrap();
    check_expected("netpol-mig-host.yaml", &yaml);

    // --out writes the same text, and says what it wrote.
    let dir = temp_dir("netpol-out");
    let out = dir.join("netpol.yaml");
    let said = run_deploy(&DeployCommand::Netpol {
        config: sample_config(),
        namespace: "bulkhead".to_owned(),
        out: Some(out.clone()),
    })
    .unwrap();
    assert_eq!(read(&out), yaml);
    assert!(said.contains("8 NetworkPolicies"), "{said}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn netpol_refuses_a_bad_namespace_and_a_bad_config() {
    let err = run_deploy(&DeployCommand::Netpol {
        config: sample_config(),
        namespace: "Bulkhead".to_owned(),
        out: None,
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("--namespace"), "{err:#}");
    let err = run_deploy(&DeployCommand::Netpol {
        config: deploy_path("examples/no-such.toml"),
        namespace: "bulkhead".to_owned(),
        out: None,
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("no-such.toml"), "{err:#}");
}

#[test]
fn mig_plan_of_the_sample_config_matches_the_expected_file() {
    let text = run_mig(&MigCommand::Plan {
        config: sample_config(),
        gpus: 4,
        json: false,
        calibration: Vec::new(),
    })
    .unwrap();
    check_expected("mig-plan-mig-host.txt", &text);

    // The JSON form carries the same plan and the same commands.
    let json = run_mig(&MigCommand::Plan {
        config: sample_config(),
        gpus: 4,
        json: true,
        calibration: Vec::new(),
    })
    .unwrap();
    let plan: Value = serde_json::from_str(&json).unwrap();
    let roles: Vec<&str> = plan["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["dedicated", "mig", "mig", "shared"]);
    for command in plan["commands"].as_array().unwrap() {
        let command = command.as_str().unwrap();
        assert!(text.contains(&format!("\n{command}\n")), "{command}");
    }
}

#[test]
fn mig_plan_reads_model_sizes_from_calibration_files() {
    let dir = temp_dir("calibration");
    // A model of 4 GB with 32 KiB of KV per token: legal-team (1024 blocks
    // of 16 tokens) then needs 4 GB + 512 MiB + 512 MiB, a 1g.10gb.
    let small = dir.join("small.toml");
    std::fs::write(
        &small,
        "weight_bytes = 4.0e9\nkv_bytes_per_token_layer = 1024.0\nlayers = 32.0\n",
    )
    .unwrap();
    let text = run_mig(&MigCommand::Plan {
        config: sample_config(),
        gpus: 4,
        json: false,
        calibration: vec![format!("llama-3-8b-instruct={}", small.display())],
    })
    .unwrap();
    let legal = text
        .lines()
        .find(|l| l.contains("legal-team"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(legal.trim_start().starts_with("1g.10gb "), "{legal}");

    let err = run_mig(&MigCommand::Plan {
        config: sample_config(),
        gpus: 4,
        json: false,
        calibration: vec![dir.join("missing.toml").display().to_string()],
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("missing.toml"), "{err:#}");
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// The MIG planner

/// `SplitMix64`: the cases are random but the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }
}

/// Whether some choice of placements puts all of `profiles` on one GPU,
/// by trying every combination (independent of the planner's search).
fn brute_force_fits(profiles: &[&MigProfile]) -> bool {
    let mut choice = vec![0usize; profiles.len()];
    loop {
        let instances: Vec<(&MigProfile, u8)> = profiles
            .iter()
            .zip(&choice)
            .map(|(p, &c)| (*p, p.placements[c]))
            .collect();
        if mig::validate_gpu(&instances).is_ok() {
            return true;
        }
        // Next combination, like an odometer.
        let mut i = 0;
        loop {
            if i == profiles.len() {
                return false;
            }
            choice[i] += 1;
            if choice[i] < profiles[i].placements.len() {
                break;
            }
            choice[i] = 0;
            i += 1;
        }
    }
}

/// The hardware's limits, checked by counting (not through `validate_gpu`).
fn assert_within_one_gpu(instances: &[(&MigProfile, u8)]) {
    let compute: u32 = instances
        .iter()
        .map(|(p, _)| u32::from(p.compute_slices))
        .sum();
    assert!(
        compute <= u32::from(COMPUTE_SLICES),
        "{compute} compute slices"
    );
    let mut slots = [0u8; MEMORY_SLICES as usize];
    for (p, start) in instances {
        assert!(p.placements.contains(start), "{} at {start}", p.name);
        for s in *start..start + p.memory_slices {
            slots[usize::from(s)] += 1;
        }
        let same = instances.iter().filter(|(q, _)| q.id == p.id).count();
        assert!(same <= usize::from(p.max_instances), "{same} × {}", p.name);
    }
    assert!(
        slots.iter().all(|&n| n <= 1),
        "memory slices shared: {slots:?}"
    );
}

#[test]
fn placement_on_one_gpu_is_found_exactly_when_one_exists() {
    let mut rng = Rng(0x5EED_0001);
    let mut fits = 0;
    for _ in 0..1500 {
        let n = 1 + rng.below(5);
        let profiles: Vec<&MigProfile> = (0..n)
            .map(|_| &H100_80GB[rng.below(H100_80GB.len())])
            .collect();
        let found = mig::place(&profiles);
        assert_eq!(
            found.is_some(),
            brute_force_fits(&profiles),
            "{:?}",
            profiles.iter().map(|p| p.name).collect::<Vec<_>>()
        );
        if let Some(starts) = found {
            fits += 1;
            let instances: Vec<_> = profiles.iter().copied().zip(starts).collect();
            assert_within_one_gpu(&instances);
        }
    }
    assert!(fits > 300, "the cases should mix fitting and not: {fits}");
}

#[test]
fn packing_over_gpus_never_breaks_a_gpu_and_fails_only_when_it_must() {
    let mut rng = Rng(0x5EED_0002);
    let mut failures = 0;
    for _ in 0..1500 {
        let gpus = 1 + rng.below(4);
        let n = rng.below(14);
        let profiles: Vec<&'static MigProfile> = (0..n)
            .map(|_| &H100_80GB[rng.below(H100_80GB.len())])
            .collect();
        match mig::pack(&profiles, gpus) {
            Ok(assigned) => {
                assert_eq!(assigned.len(), profiles.len());
                for g in 0..gpus {
                    let on: Vec<(&MigProfile, u8)> = profiles
                        .iter()
                        .zip(&assigned)
                        .filter(|(_, (gpu, _))| *gpu == g)
                        .map(|(p, (_, start))| (*p, *start))
                        .collect();
                    assert_within_one_gpu(&on);
                    mig::validate_gpu(&on).unwrap();
                }
            }
            Err(i) => {
                failures += 1;
                assert!(i < profiles.len());
                // With one GPU, first fit is the exhaustive search: it fails
                // only if no placement of the whole set exists.
                if gpus == 1 && profiles.len() <= 5 {
                    assert!(
                        !brute_force_fits(&profiles),
                        "one GPU, a placeable set, but pack failed: {:?}",
                        profiles.iter().map(|p| p.name).collect::<Vec<_>>()
                    );
                }
            }
        }
    }
    assert!(
        failures > 100,
        "the cases should include failures: {failures}"
    );
}

/// A config with the given (id, isolation, `kv_block_quota`) tenants, all on the CUDA model.
fn config_with(tenants: &[(&str, &str, u32)]) -> Config {
    let mut toml = String::from(
        "trust_domain = \"example.org\"\n\
         [tls]\ncert = \"/c\"\nkey = \"/k\"\nclient_ca = [\"/ca\"]\n\
         [kv]\npool_blocks = 4000000\n\
         [[models]]\nname = \"big\"\nbackend = \"cuda\"\nmax_context_tokens = 8192\n\
         [[models]]\nname = \"cpu-only\"\nbackend = \"cpu\"\nmax_context_tokens = 2048\n",
    );
    for (id, isolation, quota) in tenants {
        let model = if id.starts_with("cpu") {
            "cpu-only"
        } else {
            "big"
        };
        let _ = write!(
            toml,
            "[[tenants]]\nid = \"{id}\"\nallowed_models = [\"{model}\"]\n\
             kv_block_quota = {quota}\nisolation = \"{isolation}\"\n"
        );
    }
    Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

#[test]
fn random_configs_get_valid_plans_or_an_error_naming_a_tenant() {
    let levels = ["shared", "process", "mig", "dedicated"];
    let footprints = Footprints::default();
    let mut rng = Rng(0x5EED_0003);
    let (mut planned, mut refused) = (0, 0);
    for case in 0..300 {
        let n = 1 + rng.below(9);
        let specs: Vec<(String, &str, u32)> = (0..n)
            .map(|i| {
                let level = levels[rng.below(levels.len())];
                let quota = 256 * (1 + u32::try_from(rng.below(96)).unwrap());
                (format!("t{case}-{i}"), level, quota)
            })
            .collect();
        let borrowed: Vec<(&str, &str, u32)> =
            specs.iter().map(|(i, l, q)| (i.as_str(), *l, *q)).collect();
        let config = config_with(&borrowed);
        let gpus = u32::try_from(1 + rng.below(6)).unwrap();
        match mig::plan(&config, gpus, &footprints) {
            Ok(plan) => {
                planned += 1;
                assert_eq!(plan.gpus.len(), usize::try_from(gpus).unwrap());
                let mut mig_tenants = BTreeSet::new();
                let mut dedicated = BTreeSet::new();
                for role in &plan.gpus {
                    match role {
                        GpuRole::Mig { slices } => {
                            let instances: Vec<_> =
                                slices.iter().map(|s| (s.profile, s.placement)).collect();
                            assert_within_one_gpu(&instances);
                            for s in slices {
                                assert!(s.profile.memory_mib << 20 >= s.need_bytes);
                                assert!(!s.profile.media_extensions);
                                assert!(mig_tenants.insert(s.tenant.clone()), "two slices");
                            }
                        }
                        GpuRole::Dedicated { tenant, .. } => {
                            assert!(dedicated.insert(tenant.clone()), "two GPUs");
                        }
                        GpuRole::Shared { .. } | GpuRole::Unused => {}
                    }
                }
                for t in &config.tenants {
                    let id = &t.id;
                    match t.isolation {
                        bulkhead_core::IsolationLevel::Mig => assert!(mig_tenants.contains(id)),
                        bulkhead_core::IsolationLevel::Dedicated => {
                            assert!(dedicated.contains(id));
                        }
                        _ => assert!(!mig_tenants.contains(id) && !dedicated.contains(id)),
                    }
                }
            }
            Err(e) => {
                refused += 1;
                let message = e.to_string();
                assert!(
                    config
                        .tenants
                        .iter()
                        .any(|t| message.contains(&format!("tenant {}", t.id))),
                    "the error names no tenant: {message}"
                );
            }
        }
    }
    assert!(
        planned > 30 && refused > 30,
        "{planned} planned, {refused} refused"
    );
}

#[test]
fn errors_name_the_tenant_that_does_not_fit() {
    let fp = Footprints::default();
    // 20480 blocks x 2 MiB = 40 GiB of KV: each needs a 7g.80gb.
    let config = config_with(&[("a", "mig", 20480), ("b", "mig", 20480)]);
    let err = mig::plan(&config, 1, &fp).unwrap_err();
    assert!(
        matches!(&err, PlanError::MigDoesNotFit { tenant: t, profile: "7g.80gb", mig_gpus, .. }
            if *t == tenant("b") && *mig_gpus == [0]),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("tenant b (isolation mig) does not fit"),
        "{err}"
    );
    assert!(mig::plan(&config, 2, &fp).is_ok());

    // Too big for any slice.
    let config = config_with(&[("huge", "mig", 40000)]);
    let err = mig::plan(&config, 8, &fp).unwrap_err();
    assert!(matches!(&err, PlanError::TooLargeForMig { tenant: t, .. } if *t == tenant("huge")));
    assert!(err.to_string().contains("7g.80gb"), "{err}");

    // More dedicated tenants than GPUs.
    let config = config_with(&[("d1", "dedicated", 1024), ("d2", "dedicated", 1024)]);
    let err = mig::plan(&config, 1, &fp).unwrap_err();
    assert!(
        matches!(&err, PlanError::NoGpuForDedicated { tenant: t, .. } if *t == tenant("d2")),
        "{err}"
    );

    // The shared pool needs a GPU of its own.
    let config = config_with(&[("d1", "dedicated", 1024), ("s", "shared", 1024)]);
    let err = mig::plan(&config, 1, &fp).unwrap_err();
    assert!(err.to_string().contains("tenant s"), "{err}");

    // A mig tenant without a GPU model.
    let config = config_with(&[("cpu-t", "mig", 1024)]);
    let err = mig::plan(&config, 1, &fp).unwrap_err();
    assert!(matches!(&err, PlanError::NoGpuModel { tenant: t, .. } if *t == tenant("cpu-t")));
}

#[test]
fn first_fit_decreasing_packs_the_documented_combinations() {
    // Needs chosen so each tenant gets the named profile.
    let fp = Footprints {
        default: Footprint {
            weight_bytes: 1 << 30,
            kv_bytes_per_token: 1 << 10,
        },
        per_model: BTreeMap::new(),
    };
    // KV per block: 16 tokens x 1 KiB = 16 KiB; blocks per GiB: 65536.
    let blocks_for_gib = |gib: u32| gib * 65536;
    // 31.5 GiB each: 3g.40gb (of equal memory, fewer compute slices than
    // 4g.40gb), two to a GPU; 16.5 GiB: 1g.20gb, four to a GPU; 6.5 GiB: 1g.10gb.
    let config = config_with(&[
        ("big-a", "mig", blocks_for_gib(30)),
        ("big-b", "mig", blocks_for_gib(30)),
        ("mid-a", "mig", blocks_for_gib(15)),
        ("mid-b", "mig", blocks_for_gib(15)),
        ("mid-c", "mig", blocks_for_gib(15)),
        ("mid-d", "mig", blocks_for_gib(15)),
        ("small", "mig", blocks_for_gib(5)),
    ]);
    let plan = mig::plan(&config, 3, &fp).unwrap();
    let described: Vec<Vec<(String, &str, u8)>> = plan
        .gpus
        .iter()
        .map(|role| match role {
            GpuRole::Mig { slices } => slices
                .iter()
                .map(|s| (s.tenant.to_string(), s.profile.name, s.placement))
                .collect(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        described,
        [
            vec![
                ("big-a".to_owned(), "3g.40gb", 0),
                ("big-b".to_owned(), "3g.40gb", 4)
            ],
            vec![
                ("mid-a".to_owned(), "1g.20gb", 0),
                ("mid-b".to_owned(), "1g.20gb", 2),
                ("mid-c".to_owned(), "1g.20gb", 4),
                ("mid-d".to_owned(), "1g.20gb", 6),
            ],
            vec![("small".to_owned(), "1g.10gb", 0)],
        ]
    );
    let commands = plan.commands();
    assert!(commands.contains(&"nvidia-smi mig -i 0 -cgi 9:0,9:4 -C".to_owned()));
    assert!(commands.contains(&"nvidia-smi mig -i 1 -cgi 15:0,15:2,15:4,15:6 -C".to_owned()));
}

// ---------------------------------------------------------------------------
// Kubernetes

#[test]
fn kubernetes_manifests_pass_the_schemas() {
    let files: Vec<PathBuf> = ["daemonset", "service", "configmap", "secret"]
        .iter()
        .map(|f| deploy_path(&format!("k8s/{f}.yaml")))
        .collect();
    let passed = kubernetes_validate(&files);
    assert_eq!(
        passed,
        [
            "daemonset/bulkhead",
            "service/bulkhead",
            "configmap/bulkhead-config",
            "secret/bulkhead-server-tls",
            "secret/bulkhead-tenant-ca",
        ]
    );
}

#[test]
fn the_validator_rejects_a_broken_manifest() {
    // So a pass above means something: a misspelt field and a wrong type fail.
    let dir = temp_dir("broken");
    let broken = dir.join("broken.yaml");
    let text =
        read(&deploy_path("k8s/service.yaml")).replace("targetPort: quic", "targetPorts: quic");
    std::fs::write(&broken, text).unwrap();
    let out = Command::new(venv_python())
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a misspelt field passed");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn generated_network_policies_pass_the_schemas() {
    let dir = temp_dir("netpol");
    let file = dir.join("netpol.yaml");
    run_deploy(&DeployCommand::Netpol {
        config: sample_config(),
        namespace: "bulkhead".to_owned(),
        out: Some(file.clone()),
    })
    .unwrap();
    let passed = kubernetes_validate(std::slice::from_ref(&file));
    let config = Config::from_path(&sample_config()).unwrap();
    let mut expected = vec!["networkpolicy/bulkhead-default-deny".to_owned()];
    expected.extend(
        config
            .tenants
            .iter()
            .map(|t| format!("networkpolicy/bulkhead-tenant-{}", t.id)),
    );
    assert_eq!(passed, expected);

    // Read back: each tenant's policy admits its own label on both ports only.
    let docs = yaml_docs(&file);
    assert!(
        at(&docs[0], "spec.ingress").is_null(),
        "default deny admits nothing"
    );
    for (doc, t) in docs[1..].iter().zip(&config.tenants) {
        let from = at(doc, "spec.ingress.0.from.0");
        for selector in ["namespaceSelector", "podSelector"] {
            assert_eq!(
                at(from, &format!("{selector}.matchLabels"))["bulkhead.io/tenant"],
                t.id.as_str()
            );
        }
        assert_eq!(at(doc, "spec.podSelector.matchLabels")[APP_LABEL], APP_NAME);
        let ports = at(doc, "spec.ingress.0.ports").as_array().unwrap();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0]["protocol"], "UDP");
        assert_eq!(ports[0]["port"], config.listeners.quic.port());
        assert_eq!(ports[1]["protocol"], "TCP");
        assert_eq!(ports[1]["port"], config.listeners.tcp.port());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_manifests_agree_with_each_other_and_with_host_toml() {
    let configmap = &yaml_docs(&deploy_path("k8s/configmap.yaml"))[0];
    let host_toml = configmap["data"]["host.toml"]
        .as_str()
        .expect("the ConfigMap holds host.toml");
    let config = Config::from_toml_str(host_toml)
        .unwrap_or_else(|e| panic!("host.toml of the ConfigMap:\n{e}"));
    let ds = &yaml_docs(&deploy_path("k8s/daemonset.yaml"))[0];
    let pod = at(ds, "spec.template.spec");
    let container = at(pod, "containers.0");

    // Labels: the pods are what the Service and the NetworkPolicies select.
    assert_eq!(at(ds, "spec.template.metadata.labels")[APP_LABEL], APP_NAME);
    assert_eq!(at(ds, "spec.selector.matchLabels")[APP_LABEL], APP_NAME);
    let service = &yaml_docs(&deploy_path("k8s/service.yaml"))[0];
    assert_eq!(at(service, "spec.selector")[APP_LABEL], APP_NAME);

    // Ports: the config's listeners, UDP and TCP, published on the host;
    // the metrics endpoint on the pod network only.
    let ports = container["ports"].as_array().unwrap();
    let port = |name: &str| {
        ports
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no port named {name}"))
    };
    assert_eq!(port("quic")["protocol"], "UDP");
    assert_eq!(port("tls")["protocol"], "TCP");
    assert_eq!(port("metrics")["protocol"], "TCP");
    assert_eq!(port("quic")["containerPort"], config.listeners.quic.port());
    assert_eq!(port("tls")["containerPort"], config.listeners.tcp.port());
    assert_eq!(port("quic")["hostPort"], config.listeners.quic.port());
    assert_eq!(port("tls")["hostPort"], config.listeners.tcp.port());
    let metrics = config
        .listeners
        .metrics
        .expect("host.toml has a metrics endpoint");
    assert_eq!(port("metrics")["containerPort"], metrics.port());
    assert!(port("metrics").get("hostPort").is_none(), "not on the host");
    let annotations = at(ds, "spec.template.metadata.annotations");
    assert_eq!(
        annotations["prometheus.io/port"],
        metrics.port().to_string()
    );
    assert_eq!(
        pod["hostNetwork"], false,
        "NetworkPolicies skip hostNetwork pods"
    );
    let service_ports: BTreeSet<(String, String)> = at(service, "spec.ports")
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["protocol"].to_string(), p["targetPort"].to_string()))
        .collect();
    assert_eq!(service_ports.len(), 2);

    // Files: the projected volume puts host.toml and the TLS files where host.toml says.
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let arg_after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
    let config_mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap();
    let base = Path::new(str_at(config_mount, "mountPath"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    let mut projected: BTreeSet<PathBuf> = BTreeSet::new();
    for source in at(volume, "projected.sources").as_array().unwrap() {
        let inner = source
            .get("configMap")
            .or_else(|| source.get("secret"))
            .unwrap();
        for item in inner["items"].as_array().unwrap() {
            projected.insert(base.join(str_at(item, "path")));
        }
    }
    let mut wanted: BTreeSet<PathBuf> = [
        PathBuf::from(arg_after("--config")),
        config.tls.cert.clone(),
        config.tls.key.clone(),
    ]
    .into();
    wanted.extend(config.tls.client_ca.iter().cloned());
    assert_eq!(projected, wanted);
    // The admin endpoint stays inside the pod, in the runtime dir.
    let runtime = arg_after("--runtime-dir");
    let Some(bulkhead_core::config::AdminEndpoint::Unix(admin)) = &config.listeners.admin else {
        panic!("host.toml's admin endpoint should be a unix socket");
    };
    assert!(admin.starts_with(runtime));
    // The probes ask the metrics endpoint over HTTP: no tool in the image.
    assert_eq!(at(container, "readinessProbe.httpGet.path"), "/healthz");
    assert_eq!(at(container, "readinessProbe.httpGet.port"), "metrics");
    assert_eq!(at(container, "livenessProbe.tcpSocket.port"), "metrics");
}

fn daemonset_pod() -> Value {
    let ds = yaml_docs(&deploy_path("k8s/daemonset.yaml")).remove(0);
    at(&ds, "spec.template.spec").clone()
}

#[test]
fn the_daemonset_holds_exactly_the_privileges_it_needs() {
    let pod = daemonset_pod();
    let container = at(&pod, "containers.0");
    // Privileges: exactly the three capabilities, nothing privileged.
    let sc = &container["securityContext"];
    assert_eq!(at(sc, "capabilities.drop"), &serde_json::json!(["ALL"]));
    let added: BTreeSet<&str> = at(sc, "capabilities.add")
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(added, BTreeSet::from(["BPF", "PERFMON", "NET_ADMIN"]));
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let bpffs = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "bpffs")
        .unwrap();
    assert_eq!(at(bpffs, "hostPath.path"), "/sys/fs/bpf");
    assert!(at(container, "resources.limits")["nvidia.com/gpu"].is_u64());
    // The drain after SIGTERM is 30 s: the grace period must exceed it.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 30);
}

#[test]
fn the_kustomization_applies_every_manifest_but_the_secrets() {
    // The kustomization applies every manifest but the placeholder Secrets.
    let kustomization = &yaml_docs(&deploy_path("k8s/kustomization.yaml"))[0];
    assert_eq!(kustomization["kind"], "Kustomization");
    assert_eq!(kustomization["namespace"], "bulkhead");
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        resources,
        ["configmap.yaml", "service.yaml", "daemonset.yaml"]
    );
    for r in resources {
        assert!(deploy_path("k8s").join(r).is_file(), "{r}");
    }
}

// ---------------------------------------------------------------------------
// Grafana and Prometheus

/// Metric names `Metrics::render` emits, each with its label names.
fn emitted_series() -> BTreeMap<String, BTreeSet<String>> {
    let metrics = Metrics::default();
    let t = tenant("acme");
    metrics.request(Some(&t), 200);
    metrics.request(Some(&t), 429);
    metrics.request(None, 502);
    metrics.tokens(&t, 10, 20);
    metrics.queue_time(&t, Duration::from_millis(3));
    metrics.ttft(&t, Duration::from_millis(40));
    let kernel = BTreeMap::from([(
        "acme".to_owned(),
        KernelCounts {
            passed: 5,
            dropped: 1,
        },
    )]);
    let text = metrics.render(None, &kernel);
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, rest) = line.split_once('{').expect("every series has labels");
        let labels = rest.split_once('}').expect("closing brace").0;
        let names = labels
            .split(',')
            .map(|kv| kv.split_once('=').expect("label=value").0.to_owned());
        series.entry(name.to_owned()).or_default().extend(names);
    }
    assert!(
        series.len() >= 9,
        "render should emit the documented families: {series:?}"
    );
    series
}

/// Labels Prometheus itself attaches to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Grafana's built-in interval variables, as `PromQL` durations.
fn substitute_grafana(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
}

/// Parses `expr` and checks that each selector names an emitted series and
/// only its labels, and that every grouping label exists on some series.
/// Returns the names used.
fn check_promql(
    expr: &str,
    series: &BTreeMap<String, BTreeSet<String>>,
) -> Result<BTreeSet<String>, String> {
    let ast = parser::parse(expr).map_err(|e| format!("{expr}: does not parse: {e}"))?;
    let mut selectors: Vec<VectorSelector> = Vec::new();
    let mut grouping: Vec<String> = Vec::new();
    walk(&ast, &mut selectors, &mut grouping);
    if selectors.is_empty() {
        return Err(format!("{expr}: selects no series"));
    }
    let mut used = BTreeSet::new();
    for s in &selectors {
        let name = s
            .name
            .clone()
            .ok_or_else(|| format!("{expr}: a selector without a metric name"))?;
        let labels = series
            .get(&name)
            .ok_or_else(|| format!("{expr}: {name} is not a series bulkhead emits"))?;
        for label in matcher_names(&s.matchers) {
            if label != "__name__"
                && !labels.contains(&label)
                && !TARGET_LABELS.contains(&label.as_str())
            {
                return Err(format!("{expr}: {name} has no label {label}"));
            }
        }
        used.insert(name);
    }
    let all_labels: BTreeSet<&String> = series.values().flatten().collect();
    for label in grouping {
        if !all_labels.contains(&label) && !TARGET_LABELS.contains(&label.as_str()) {
            return Err(format!("{expr}: groups by {label}, which no series has"));
        }
    }
    Ok(used)
}

fn matcher_names(m: &Matchers) -> Vec<String> {
    m.matchers
        .iter()
        .chain(m.or_matchers.iter().flatten())
        .map(|m| m.name.clone())
        .collect()
}

fn modifier_labels(m: Option<&LabelModifier>, out: &mut Vec<String>) {
    if let Some(m) = m {
        out.extend(m.labels().labels.iter().cloned());
    }
}

fn walk(e: &Expr, selectors: &mut Vec<VectorSelector>, grouping: &mut Vec<String>) {
    match e {
        Expr::Aggregate(a) => {
            modifier_labels(a.modifier.as_ref(), grouping);
            walk(&a.expr, selectors, grouping);
            if let Some(p) = &a.param {
                walk(p, selectors, grouping);
            }
        }
        Expr::Unary(u) => walk(&u.expr, selectors, grouping),
        Expr::Binary(b) => {
            if let Some(m) = &b.modifier {
                modifier_labels(m.matching.as_ref(), grouping);
            }
            walk(&b.lhs, selectors, grouping);
            walk(&b.rhs, selectors, grouping);
        }
        Expr::Paren(p) => walk(&p.expr, selectors, grouping),
        Expr::Subquery(s) => walk(&s.expr, selectors, grouping),
        Expr::VectorSelector(v) => selectors.push(v.clone()),
        Expr::MatrixSelector(m) => selectors.push(m.vs.clone()),
        Expr::Call(c) => {
            for arg in &c.args.args {
                walk(arg, selectors, grouping);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

#[test]
fn the_promql_check_catches_what_it_should() {
    let series = emitted_series();
    assert!(
        check_promql(
            "sum by (tenant) (rate(bulkhead_requests_total[5m]))",
            &series
        )
        .is_ok()
    );
    for (bad, why) in [
        ("sum(rate(bulkhead_requests_total[5m]", "does not parse"),
        ("rate(bulkhead_request_total[5m])", "not a series"),
        (
            "rate(bulkhead_requests_total{verdict=\"dropped\"}[5m])",
            "no label verdict",
        ),
        (
            "sum by (model) (rate(bulkhead_tokens_total[5m]))",
            "groups by model",
        ),
        ("vector(1)", "selects no series"),
    ] {
        let err = check_promql(bad, &series).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

#[test]
fn the_grafana_dashboard_queries_only_emitted_series() {
    let path = deploy_path("grafana/bulkhead-dashboard.json");
    let dashboard: Value = serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let series = emitted_series();
    for key in ["uid", "title"] {
        assert!(dashboard[key].is_string(), "{key}");
    }
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        let title = str_at(panel, "title");
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        assert!(
            panel["gridPos"]["x"].as_u64().unwrap() + panel["gridPos"]["w"].as_u64().unwrap() <= 24,
            "{title}: wider than the grid"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(at(panel, "datasource.uid"), "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            assert!(
                ref_ids.insert(str_at(target, "refId")),
                "{title}: refId twice"
            );
            let expr = substitute_grafana(str_at(target, "expr"));
            let names = check_promql(&expr, &series).unwrap_or_else(|e| panic!("{title}: {e}"));
            used.extend(names);
            queries += 1;
        }
    }
    assert!(queries >= 10, "{queries} queries");
    // Every family render emits is on the dashboard.
    let families: BTreeSet<&str> = series
        .keys()
        .map(|n| {
            n.strip_suffix("_bucket")
                .or_else(|| n.strip_suffix("_sum"))
                .or_else(|| n.strip_suffix("_count"))
                .unwrap_or(n)
        })
        .collect();
    for family in families {
        assert!(
            used.iter().any(|u| u.starts_with(family)),
            "the dashboard shows nothing of {family}"
        );
    }
    // The tenant variable lists the label of an emitted series.
    let variables = at(&dashboard, "templating.list").as_array().unwrap();
    let tenant_var = variables.iter().find(|v| v["name"] == "tenant").unwrap();
    let query = str_at(tenant_var, "definition");
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{query}"));
    let (metric, label) = inner.split_once(',').unwrap();
    assert!(series[metric.trim()].contains(label.trim()), "{query}");
}

#[test]
fn the_alert_rules_are_well_formed_over_emitted_series() {
    let docs = yaml_docs(&deploy_path("prometheus/bulkhead-alerts.yaml"));
    assert_eq!(docs.len(), 1);
    let series = emitted_series();
    let duration = |s: &str| {
        let digits = s.trim_end_matches(['s', 'm', 'h', 'd']);
        !digits.is_empty()
            && digits.len() + 1 == s.len()
            && digits.bytes().all(|b| b.is_ascii_digit())
    };
    let mut alerts = BTreeSet::new();
    let mut used = BTreeSet::new();
    let groups = docs[0]["groups"].as_array().unwrap();
    assert!(!groups.is_empty());
    for group in groups {
        assert!(group["name"].is_string());
        for rule in group["rules"].as_array().unwrap() {
            let name = str_at(rule, "alert");
            assert!(alerts.insert(name.to_owned()), "alert {name} twice");
            assert!(
                name.starts_with("Bulkhead") && name.chars().all(char::is_alphanumeric),
                "{name}: CamelCase, prefixed Bulkhead"
            );
            let names = check_promql(str_at(rule, "expr"), &series)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            used.extend(names);
            assert!(duration(str_at(rule, "for")), "{name}: for");
            assert!(
                ["warning", "critical"].contains(&str_at(rule, "labels.severity")),
                "{name}: severity"
            );
            for key in ["summary", "description"] {
                assert!(
                    !str_at(rule, &format!("annotations.{key}")).is_empty(),
                    "{name}: {key}"
                );
            }
            let keys: BTreeSet<&str> = rule
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let allowed = BTreeSet::from([
                "alert",
                "expr",
                "for",
                "labels",
                "annotations",
                "keep_firing_for",
            ]);
            assert!(keys.is_subset(&allowed), "{name}: unknown keys {keys:?}");
        }
    }
    // The alerts the deployment promises.
    for wanted in [
        "BulkheadTenantTimeToFirstTokenHigh",
        "BulkheadTenantThrottled",
        "BulkheadTenantServerErrors",
        "BulkheadWorkerFailures",
        "BulkheadKernelDropsRising",
        "BulkheadNoRequestsServed",
    ] {
        assert!(alerts.contains(wanted), "no alert {wanted}");
    }
    for family in [
        "bulkhead_requests_total",
        "bulkhead_time_to_first_token_seconds_bucket",
        "bulkhead_kernel_packets_total",
    ] {
        assert!(used.contains(family), "no alert over {family}");
    }
}

// ---------------------------------------------------------------------------
// systemd

fn systemd_analyze() -> PathBuf {
    let found = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "systemd-analyze is not installed; the systemd unit is checked with \
             `systemd-analyze verify` (Debian: apt-get install systemd)"
        )
    })
}

/// `key=value` lines of `section` in a unit file, in order (comments skipped).
fn unit_entries(text: &str, section: &str) -> Vec<(String, String)> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            name.clone_into(&mut current);
        } else if current == section {
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {line}"));
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn verify_units(dir: &Path) -> (bool, String) {
    let out = Command::new(systemd_analyze())
        .args(["verify", "--man=no"])
        .arg(dir.join("bulkhead.slice"))
        .arg(dir.join("bulkhead.service"))
        .current_dir(dir)
        .output()
        .expect("running systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_systemd_unit_and_slice_verify_without_warnings() {
    let unit = read(&deploy_path("systemd/bulkhead.service"));
    let slice = read(&deploy_path("systemd/bulkhead.slice"));
    let installed = "/usr/local/bin/bulkhead";
    assert!(unit.contains(&format!("ExecStart={installed} ")));
    let dir = temp_dir("systemd");
    std::fs::write(dir.join("bulkhead.slice"), &slice).unwrap();
    std::fs::write(
        dir.join("bulkhead.service"),
        unit.replace(installed, env!("CARGO_BIN_EXE_bulkhead")),
    )
    .unwrap();
    let (ok, text) = verify_units(&dir);
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    // The check is real: an unknown key is reported.
    std::fs::write(
        dir.join("bulkhead.service"),
        unit.replace(installed, env!("CARGO_BIN_EXE_bulkhead"))
            .replace("Delegate=yes", "Delegat=yes"),
    )
    .unwrap();
    let (_, text) = verify_units(&dir);
    assert!(
        text.contains("Delegat"),
        "a misspelt key went unnoticed: {text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_systemd_unit_grants_exactly_what_bulkhead_needs() {
    let unit = read(&deploy_path("systemd/bulkhead.service"));
    let service = unit_entries(&unit, "Service");
    let all = |key: &str| -> Vec<&str> {
        service
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        let values = all(key);
        assert_eq!(values.len(), 1, "{key}: {values:?}");
        values[0]
    };
    let caps = |key: &str| -> BTreeSet<&str> { one(key).split_whitespace().collect() };
    let needed = BTreeSet::from(["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
    assert_eq!(caps("CapabilityBoundingSet"), needed);
    assert_eq!(caps("AmbientCapabilities"), needed);
    assert_eq!(one("Delegate"), "yes");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("RuntimeDirectory"), "bulkhead");
    assert_eq!(one("Slice"), "bulkhead.slice");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("KillMode"), "mixed", "workers must outlive the drain");
    assert!(one("ExecReload").contains("-HUP $MAINPID"));
    let rw: BTreeSet<&str> = one("ReadWritePaths").split_whitespace().collect();
    for path in ["/sys/fs/bpf", "/run/bulkhead", "/var/lib/bulkhead"] {
        assert!(rw.contains(path), "ReadWritePaths lacks {path}");
    }
    let stop = one("TimeoutStopSec");
    let secs: u64 = stop.strip_suffix('s').unwrap_or(stop).parse().unwrap();
    assert!(
        secs > 30,
        "TimeoutStopSec={stop} must exceed the 30 s drain"
    );
    assert!(
        all("PrivateDevices").iter().all(|v| *v != "yes"),
        "PrivateDevices would hide the GPUs"
    );
    assert!(
        unit_entries(&unit, "Unit")
            .iter()
            .any(|(k, v)| k == "RequiresMountsFor" && v == "/sys/fs/bpf")
    );

    // ExecStart is a real command line of this binary.
    let exec: Vec<&str> = one("ExecStart").split_whitespace().collect();
    assert_eq!(exec[1], "serve");
    let help = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in exec[2..].iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag), "bulkhead serve has no {flag}:\n{help}");
    }
    let runtime = exec[exec.iter().position(|a| *a == "--runtime-dir").unwrap() + 1];
    assert_eq!(runtime, "/run/bulkhead", "the RuntimeDirectory");
}
