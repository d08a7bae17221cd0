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

#[test]
fn a_host_enforces_its_share_of_each_tenants_fleet_limits() {
    let tenant = "kv_block_quota = 512\nmax_tokens_per_request = 1000\nmax_prompt_bytes = 4096\n\
                  requests_per_second = 20.0\nrequest_burst = 40\ntokens_per_minute = 400000\n\
                  max_concurrent_requests = 16\nmax_queued_requests = 128\n\
                  [tenants.kernel]\npackets_per_second = 20000\npacket_burst = 2000\n\
                  bytes_per_second = 25000000\nbyte_burst = 2097152\n";
    let fleet = MINIMAL.replace("kv_block_quota = 512\n", tenant);
    let whole = Config::from_toml_str(&fleet).unwrap();
    assert_eq!(whole.cluster, Cluster::default());
    let quarter =
        Config::from_toml_str(&format!("{fleet}\n[cluster]\nhost_share = 0.25\n")).unwrap();
    assert_eq!(
        quarter.cluster,
        Cluster {
            host_share: 0.25,
            ..Cluster::default()
        }
    );
    let (w, q) = (&whole.tenants[0], &quarter.tenants[0]);
    assert!((w.requests_per_second - 20.0).abs() < f64::EPSILON);
    assert!((q.requests_per_second - 5.0).abs() < f64::EPSILON);
    assert_eq!((w.request_burst, q.request_burst), (40, 10));
    assert_eq!(
        (w.tokens_per_minute, q.tokens_per_minute),
        (400_000, 100_000)
    );
    assert_eq!(
        (w.max_concurrent_requests, q.max_concurrent_requests),
        (16, 4)
    );
    assert_eq!((w.max_queued_requests, q.max_queued_requests), (128, 32));
    assert_eq!(
        q.kernel,
        KernelLimits {
            packets_per_second: 5000,
            packet_burst: 500,
            bytes_per_second: 6_250_000,
            byte_burst: 524_288,
        }
    );
    // Per-request caps and the share of this host's own KV pool are not split.
    assert_eq!(q.max_tokens_per_request, 1000);
    assert_eq!(q.max_prompt_bytes, 4096);
    assert_eq!(q.kv_block_quota, 512);
    assert_eq!(
        TenantPolicy {
            requests_per_second: w.requests_per_second,
            request_burst: w.request_burst,
            tokens_per_minute: w.tokens_per_minute,
            max_concurrent_requests: w.max_concurrent_requests,
            max_queued_requests: w.max_queued_requests,
            kernel: w.kernel,
            ..q.clone()
        },
        *w,
        "nothing else differs"
    );
}

#[test]
fn a_split_rounds_up_to_at_least_one_and_keeps_room_for_a_packet() {
    let third = Cluster {
        host_share: 0.3,
        ..Cluster::default()
    };
    assert_eq!(third.split(5), 2, "1.5 rounds up");
    assert_eq!(third.split(10), 3);
    assert_eq!(
        Cluster {
            host_share: 0.01,
            ..Cluster::default()
        }
        .split(8),
        1,
        "never 0"
    );
    assert_eq!(Cluster::default().split(u64::MAX), u64::MAX);
    assert_eq!(
        Cluster {
            host_share: 0.5,
            ..Cluster::default()
        }
        .split_u32(u32::MAX),
        2_147_483_648
    );
    let src = MINIMAL.replace(
        "kv_block_quota = 512\n",
        "kv_block_quota = 512\n[tenants.kernel]\nbyte_burst = 65535\n",
    );
    let config = Config::from_toml_str(&format!("{src}\n[cluster]\nhost_share = 0.5\n")).unwrap();
    assert_eq!(config.tenants[0].kernel.byte_burst, MAX_PACKET_BYTES);
}

#[test]
fn quic_lb_is_off_unless_configured_and_reads_its_defaults() {
    assert_eq!(
        Config::from_toml_str(MINIMAL).unwrap().cluster.quic_lb,
        None
    );
    let src = format!("{MINIMAL}\n[cluster.quic_lb]\nserver_id = \"0A0b\"\n");
    assert_eq!(
        Config::from_toml_str(&src).unwrap().cluster.quic_lb,
        Some(QuicLb {
            config_id: 0,
            server_id: vec![0x0a, 0x0b],
            nonce_len: 8,
            key_file: None,
        })
    );
    let src = format!(
        "{MINIMAL}\n[cluster]\nhost_share = 0.5\n[cluster.quic_lb]\nconfig_id = 6\n\
         server_id = \"01\"\nnonce_len = 15\nkey_file = \"/etc/bulkhead/quic-lb.key\"\n"
    );
    let cluster = Config::from_toml_str(&src).unwrap().cluster;
    assert!((cluster.host_share - 0.5).abs() < f64::EPSILON);
    assert_eq!(
        cluster.quic_lb,
        Some(QuicLb {
            config_id: 6,
            server_id: vec![1],
            nonce_len: 15,
            key_file: Some("/etc/bulkhead/quic-lb.key".into()),
        })
    );
}

#[test]
fn the_quic_reset_key_file_is_optional_and_not_empty() {
    assert_eq!(
        Config::from_toml_str(MINIMAL)
            .unwrap()
            .listeners
            .quic_reset_key_file,
        None
    );
    let with = |path: &str| {
        Config::from_toml_str(&format!(
            "{MINIMAL}\n[listeners]\nquic_reset_key_file = {path:?}\n"
        ))
    };
    assert_eq!(
        with("/etc/bulkhead/quic-reset.key")
            .unwrap()
            .listeners
            .quic_reset_key_file,
        Some(PathBuf::from("/etc/bulkhead/quic-reset.key"))
    );
    assert!(
        with("")
            .unwrap_err()
            .to_string()
            .contains("quic_reset_key_file must not be empty")
    );
}

#[test]
fn a_model_may_name_a_checkpoint_and_its_chat_template() {
    let src = MINIMAL.replace(
        "max_context_tokens = 2048",
        "max_context_tokens = 2048\npath = \"/models/llama\"\nchat_template = \"llama2\"",
    );
    let config = Config::from_toml_str(&src).unwrap();
    let model = config.model("tiny-llama").unwrap();
    assert_eq!(model.path.as_deref(), Some(Path::new("/models/llama")));
    assert_eq!(model.chat_template, Some(ChatTemplateName::Llama2));
    let plain = Config::from_toml_str(MINIMAL).unwrap();
    let model = plain.model("tiny-llama").unwrap();
    assert_eq!((model.path.as_ref(), model.chat_template), (None, None));
}

#[test]
fn a_chat_template_without_a_checkpoint_or_an_empty_path_is_named() {
    let src = MINIMAL.replace(
        "max_context_tokens = 2048",
        "max_context_tokens = 2048\nchat_template = \"llama3\"",
    );
    assert_eq!(
        errors_of(&src),
        [
            "models[0].chat_template (line 15): chat_template needs a checkpoint `path` (the built-in model has its own template)"
        ]
    );
    let src = MINIMAL.replace(
        "max_context_tokens = 2048",
        "max_context_tokens = 2048\npath = \"\"",
    );
    assert_eq!(
        errors_of(&src),
        ["models[0].path (line 15): path must not be empty"]
    );
    let src = MINIMAL.replace(
        "max_context_tokens = 2048",
        "max_context_tokens = 2048\npath = \"/m\"\nchat_template = \"jinja\"",
    );
    let e = errors_of(&src);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("unknown variant `jinja`") && e[0].contains("llama3"),
        "{e:?}"
    );
}
