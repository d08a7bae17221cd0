//! Unit tests of the config: defaults, lookups, and where problems are placed.
//! The exact messages of malformed files are pinned in `tests/config_errors.rs`.

use super::*;

const KEY_A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// The smallest valid file: everything optional left out.
const MINIMAL: &str = r#"
trust_domain = "bulkhead.local"

[tls]
cert = "server.pem"
key = "server.key"
client_ca = ["ca.pem"]

[kv]
pool_blocks = 1024

[[models]]
name = "tiny-llama"
max_context_tokens = 2048

[[tenants]]
id = "alice"
allowed_models = ["tiny-llama"]
kv_block_quota = 512
"#;

fn errors_of(src: &str) -> Vec<String> {
    Config::from_toml_str(src)
        .expect_err("config should be rejected")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn minimal_file_gets_the_documented_defaults() {
    let config = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(config.trust_domain.as_str(), "bulkhead.local");
    assert_eq!(config.listeners.quic, "127.0.0.1:8443".parse().unwrap());
    assert_eq!(config.listeners.tcp, "127.0.0.1:8443".parse().unwrap());
    assert_eq!(config.listeners.admin, None);
    assert_eq!(config.tls.client_ca, vec![PathBuf::from("ca.pem")]);
    assert_eq!(
        config.kv,
        KvPool {
            pool_blocks: 1024,
            block_tokens: 16
        }
    );
    assert_eq!(
        config.scheduler,
        Scheduler {
            prompt_token_weight: 1,
            output_token_weight: 2,
            step_tokens: 256,
            over_share_prompt_tokens: 136,
        }
    );
    assert_eq!(config.ebpf.mode, EbpfMode::Auto);
    assert_eq!(config.models[0].backend, None);

    let alice = &config.tenants[0];
    assert_eq!(alice.weight, 1);
    assert_eq!(alice.tier, Tier::Standard);
    assert_eq!(alice.isolation, IsolationLevel::Shared);
    assert_eq!(alice.max_tokens_per_request, 4096);
    assert_eq!(alice.max_prompt_bytes, 1 << 20);
    assert!((alice.requests_per_second - 10.0).abs() < f64::EPSILON);
    assert_eq!(alice.request_burst, 20);
    assert_eq!(alice.tokens_per_minute, 100_000);
    assert_eq!(alice.max_concurrent_requests, 8);
    assert_eq!(alice.max_queued_requests, 64);
    assert_eq!(alice.kv_block_quota, 512);
    assert!(alice.kernel.byte_burst >= MAX_PACKET_BYTES);
    assert!(alice.api_key_sha256.is_empty());
}

#[test]
fn lookups_find_tenants_and_models_by_name() {
    let config = Config::from_toml_str(MINIMAL).unwrap();
    let alice = config.tenant(&TenantId::new("alice").unwrap()).unwrap();
    assert!(alice.allows_model("tiny-llama"));
    assert!(!alice.allows_model("Tiny-Llama"), "model names are exact");
    assert!(config.tenant(&TenantId::new("bob").unwrap()).is_none());
    assert_eq!(config.model("tiny-llama").unwrap().max_context_tokens, 2048);
    assert!(config.model("other").is_none());
}

#[test]
fn admin_endpoint_is_a_socket_address_or_an_absolute_path() {
    let with_admin = |admin: &str| {
        let src = format!("{MINIMAL}\n[listeners]\nadmin = {admin:?}\n");
        Config::from_toml_str(&src).map(|c| c.listeners.admin)
    };
    assert_eq!(
        with_admin("/run/bulkhead/admin.sock").unwrap(),
        Some(AdminEndpoint::Unix("/run/bulkhead/admin.sock".into()))
    );
    assert_eq!(
        with_admin("[::1]:9090").unwrap(),
        Some(AdminEndpoint::Tcp("[::1]:9090".parse().unwrap()))
    );
    assert!(with_admin("admin.sock").is_err());
    assert!(with_admin("127.0.0.1:8443").is_err(), "clashes with tcp");
}

#[test]
fn metrics_endpoint_is_a_socket_address_of_its_own() {
    let with = |listeners: &str| {
        let src = format!("{MINIMAL}\n[listeners]\n{listeners}\n");
        Config::from_toml_str(&src).map(|c| c.listeners.metrics)
    };
    assert_eq!(with("").unwrap(), None);
    assert_eq!(
        with("metrics = \"0.0.0.0:9464\"").unwrap(),
        Some("0.0.0.0:9464".parse().unwrap())
    );
    let named = |listeners: &str| with(listeners).unwrap_err().to_string();
    assert!(named("metrics = \"/run/m.sock\"").contains("listeners.metrics"));
    assert!(named("metrics = \"127.0.0.1:8443\"").contains("the tcp listener"));
    assert!(
        with("tcp = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"").is_ok(),
        "port 0 is a free port for each"
    );
    assert!(
        named("admin = \"127.0.0.1:9090\"\nmetrics = \"127.0.0.1:9090\"")
            .contains("the admin endpoint")
    );
}

#[test]
fn api_key_digests_are_decoded_in_either_case() {
    let src = MINIMAL.replace(
        "kv_block_quota = 512",
        &format!(
            "kv_block_quota = 512\napi_key_sha256 = [{KEY_A:?}, {:?}]",
            KEY_A.replace('9', "1").to_uppercase()
        ),
    );
    let config = Config::from_toml_str(&src).unwrap();
    let keys = &config.tenants[0].api_key_sha256;
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].to_hex(), KEY_A);
}

#[test]
fn missing_sections_are_reported_without_a_line_after_placed_problems() {
    assert_eq!(
        errors_of("trust_domain = \"Bad\"\n"),
        [
            "trust_domain (line 1): trust domain contains 'B'; only lowercase letters, \
             digits, '.', '-' and '_' are allowed (got \"Bad\")",
            "tls: missing required table [tls]",
            "kv: missing required table [kv]",
            "models: at least one [[models]] table is required",
            "tenants: at least one [[tenants]] table is required",
        ]
    );
}

#[test]
fn empty_file_lists_every_required_part() {
    assert_eq!(errors_of("").len(), 5);
}

#[test]
fn unknown_model_is_not_reported_while_a_model_table_is_unreadable() {
    let src = MINIMAL.replace("max_context_tokens = 2048", "max_context_tokens = \"big\"");
    assert_eq!(
        errors_of(&src),
        ["models[0].max_context_tokens (line 14): invalid type: string \"big\", expected i64"]
    );
}

#[test]
fn from_path_names_a_file_it_cannot_read() {
    let path = Path::new("/nonexistent/bulkhead.toml");
    let errors = Config::from_path(path).unwrap_err();
    let text = errors.to_string();
    assert!(
        text.starts_with("cannot read config file /nonexistent/bulkhead.toml: "),
        "{text}"
    );
}

#[test]
fn errors_display_one_per_line() {
    let errors = ConfigErrors(vec![
        ConfigError {
            path: "a".into(),
            line: Some(3),
            message: "x".into(),
        },
        ConfigError {
            path: String::new(),
            line: Some(4),
            message: "y".into(),
        },
        ConfigError {
            path: "b".into(),
            line: None,
            message: "z".into(),
        },
    ]);
    assert_eq!(errors.to_string(), "a (line 3): x\nline 4: y\nb: z");
}
