//! A malformed config is refused with a message naming the key, its line and the problem.
//!
//! Each test writes a file as `HEADER` (lines 1–18, valid) followed by its own
//! `[[tenants]]` tables, which therefore start at line 19, and pins the exact
//! message an operator reads.

use bulkhead_core::config::Config;

/// Lines 1–18: everything but the tenants. Tests that break the header
/// replace one line in place, so the line numbers hold.
const HEADER: &str = r#"trust_domain = "bulkhead.local"

[tls]
cert = "server.pem"
key = "server.key"
client_ca = ["ca.pem"]

[kv]
pool_blocks = 1000

[[models]]
name = "tiny-llama"
max_context_tokens = 2048

[[models]]
name = "llama-8b"
max_context_tokens = 8192

"#;

/// Lines 19–22: a valid tenant.
const ALICE: &str = r#"[[tenants]]
id = "alice"
allowed_models = ["tiny-llama"]
kv_block_quota = 100
"#;

const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// All problems of `src`, one string each, in the order reported.
fn problems(src: &str) -> Vec<String> {
    match Config::from_toml_str(src) {
        Ok(_) => panic!("config was accepted:\n{src}"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// The one problem of `src`.
fn problem(src: &str) -> String {
    let mut all = problems(src);
    assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
    all.remove(0)
}

fn with_tenants(tenants: &str) -> String {
    assert_eq!(HEADER.lines().count(), 18, "HEADER must stay 18 lines");
    format!("{HEADER}{tenants}")
}

#[test]
fn header_and_alice_are_valid() {
    let config = Config::from_toml_str(&with_tenants(ALICE)).unwrap();
    assert_eq!(config.tenants.len(), 1);
}

#[test]
fn negative_weight_is_reported_as_such() {
    let bob = "[[tenants]]\nid = \"bob\"\nweight = -2\nallowed_models = [\"tiny-llama\"]\n\
               kv_block_quota = 100\n";
    let src = with_tenants(&format!("{ALICE}\n{bob}"));
    assert_eq!(
        problem(&src),
        "tenants[1].weight (line 26): weight must be a positive integer, got -2"
    );
}

#[test]
fn zero_weight_is_reported_as_such() {
    let src = with_tenants(&ALICE.replace("id = \"alice\"", "id = \"alice\"\nweight = 0"));
    assert_eq!(
        problem(&src),
        "tenants[0].weight (line 21): weight must be a positive integer, got 0"
    );
}

#[test]
fn duplicate_tenant_id_names_both_places() {
    let src = with_tenants(&format!("{ALICE}\n{ALICE}"));
    assert_eq!(
        problem(&src),
        "tenants[1].id (line 25): duplicate tenant id \"alice\"; \
         first defined at tenants[0].id (line 20)"
    );
}

#[test]
fn invalid_tenant_id_gives_the_reason() {
    let src = with_tenants(&ALICE.replace("\"alice\"", "\"Alice\""));
    assert_eq!(
        problem(&src),
        "tenants[0].id (line 20): invalid tenant id \"Alice\": tenant id contains 'A'; \
         only lowercase letters, digits and '-' are allowed"
    );
}

#[test]
fn quota_larger_than_the_pool_is_refused() {
    let src = with_tenants(&ALICE.replace("kv_block_quota = 100", "kv_block_quota = 1001"));
    assert_eq!(
        problem(&src),
        "tenants[0].kv_block_quota (line 22): \
         kv_block_quota must be at most kv.pool_blocks (1000), got 1001"
    );
}

#[test]
fn unknown_model_lists_the_defined_ones() {
    let src = with_tenants(&ALICE.replace("[\"tiny-llama\"]", "[\"tiny-llama\", \"llama-70b\"]"));
    assert_eq!(
        problem(&src),
        "tenants[0].allowed_models[1] (line 21): unknown model \"llama-70b\"; \
         defined models: \"tiny-llama\", \"llama-8b\""
    );
}

#[test]
fn empty_allowed_models_is_refused() {
    let src = with_tenants(&ALICE.replace("[\"tiny-llama\"]", "[]"));
    assert_eq!(
        problem(&src),
        "tenants[0].allowed_models (line 21): allowed_models must name at least one model"
    );
}

#[test]
fn zero_limit_is_refused() {
    let src = with_tenants(&format!("{ALICE}max_concurrent_requests = 0\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].max_concurrent_requests (line 23): \
         max_concurrent_requests must be a positive integer, got 0"
    );
}

#[test]
fn zero_kernel_limit_is_refused_under_its_table() {
    let src = with_tenants(&format!(
        "{ALICE}\n[tenants.kernel]\npackets_per_second = 0\n"
    ));
    assert_eq!(
        problem(&src),
        "tenants[0].kernel.packets_per_second (line 25): \
         packets_per_second must be a positive integer, got 0"
    );
}

#[test]
fn byte_burst_must_hold_a_largest_packet() {
    let src = with_tenants(&format!("{ALICE}kernel = {{ byte_burst = 1500 }}\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].kernel.byte_burst (line 23): \
         byte_burst must be at least 65535 (one packet of the largest size), got 1500"
    );
}

#[test]
fn requests_per_second_must_be_finite_and_positive() {
    for (value, shown) in [
        ("nan", "NaN"),
        ("inf", "inf"),
        ("-1.5", "-1.5"),
        ("0.0", "0"),
    ] {
        let src = with_tenants(&format!("{ALICE}requests_per_second = {value}\n"));
        assert_eq!(
            problem(&src),
            format!(
                "tenants[0].requests_per_second (line 23): \
                 requests_per_second must be a finite number greater than 0, got {shown}"
            )
        );
    }
}

#[test]
fn max_tokens_above_the_token_budget_could_never_be_admitted() {
    let src = with_tenants(&format!(
        "{ALICE}max_tokens_per_request = 8192\ntokens_per_minute = 4096\n"
    ));
    assert_eq!(
        problem(&src),
        "tenants[0].max_tokens_per_request (line 23): max_tokens_per_request (8192) exceeds \
         tokens_per_minute (4096); a request that large could never be admitted"
    );
}

#[test]
fn malformed_key_digests_are_refused() {
    let src = with_tenants(&format!(
        "{ALICE}api_key_sha256 = [\n  \"{}\",\n  \"abc123\",\n]\n",
        DIGEST.replace('9', "g")
    ));
    assert_eq!(
        problems(&src),
        [
            "tenants[0].api_key_sha256[0] (line 24): \
             API key digest must be hex digits only, found 'g'",
            "tenants[0].api_key_sha256[1] (line 25): \
             API key digest must be 64 hex digits (a SHA-256 digest), got 6 digits",
        ]
    );
}

#[test]
fn a_key_digest_names_exactly_one_tenant() {
    let keyed = format!("{ALICE}api_key_sha256 = [\"{DIGEST}\"]\n");
    // The same digest in capitals: digests compare as bytes, not as text.
    let bob = format!(
        "[[tenants]]\nid = \"bob\"\nallowed_models = [\"tiny-llama\"]\nkv_block_quota = 100\n\
         api_key_sha256 = [\"{}\"]\n",
        DIGEST.to_uppercase()
    );
    let src = with_tenants(&format!("{keyed}\n{bob}"));
    assert_eq!(
        problem(&src),
        "tenants[1].api_key_sha256[0] (line 29): API key digest is already assigned to \
         tenant \"alice\" (tenants[0].api_key_sha256[0], line 23); \
         a key must name exactly one tenant"
    );
}

#[test]
fn duplicate_model_name_names_both_places() {
    let src = with_tenants(ALICE).replace("name = \"llama-8b\"", "name = \"tiny-llama\"");
    assert_eq!(
        problem(&src),
        "models[1].name (line 16): duplicate model name \"tiny-llama\"; \
         first defined at models[0].name (line 12)"
    );
}

#[test]
fn invalid_trust_domain_is_refused() {
    let src = with_tenants(ALICE).replace("\"bulkhead.local\"", "\"spiffe://bulkhead.local\"");
    assert_eq!(
        problem(&src),
        "trust_domain (line 1): trust domain contains ':'; only lowercase letters, digits, \
         '.', '-' and '_' are allowed (got \"spiffe://bulkhead.local\")"
    );
}

#[test]
fn a_config_without_tenants_is_refused() {
    assert_eq!(
        problem(HEADER),
        "tenants: at least one [[tenants]] table is required"
    );
}

#[test]
fn misspelt_key_is_named_with_the_expected_ones() {
    let src = with_tenants(&format!("{ALICE}wieght = 2\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].wieght (line 23): unknown field `wieght`, expected one of `id`, `weight`, \
         `tier`, `allowed_models`, `max_tokens_per_request`, `max_prompt_bytes`, \
         `requests_per_second`, `request_burst`, `tokens_per_minute`, \
         `max_concurrent_requests`, `max_queued_requests`, `kv_block_quota`, `isolation`, \
         `kernel`, `api_key_sha256`"
    );
}

#[test]
fn wrong_type_is_named_at_its_value() {
    let src = with_tenants(&format!("{ALICE}weight = \"heavy\"\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].weight (line 23): invalid type: string \"heavy\", expected i64"
    );
}

#[test]
fn unknown_isolation_level_lists_the_known_ones() {
    let src = with_tenants(&format!("{ALICE}isolation = \"vm\"\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].isolation (line 23): unknown variant `vm`, \
         expected one of `shared`, `process`, `mig`, `dedicated`"
    );
}

#[test]
fn missing_required_key_is_named_at_its_table() {
    let src = with_tenants(&ALICE.replace("kv_block_quota = 100\n", ""));
    assert_eq!(
        problem(&src),
        "tenants[0] (line 19): missing field `kv_block_quota`"
    );
}

#[test]
fn tenants_written_as_a_plain_table_is_refused() {
    let src = with_tenants(&ALICE.replace("[[tenants]]", "[tenants]"));
    assert_eq!(
        problem(&src),
        "tenants (line 19): `tenants` must be an array of tables, written [[tenants]]"
    );
}

#[test]
fn toml_syntax_error_names_the_key_and_line() {
    let src = with_tenants(&format!("{ALICE}isolation = process\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].isolation (line 23): invalid TOML: \
         string values must be quoted, expected literal string"
    );
}

#[test]
fn only_the_first_syntax_error_is_reported() {
    // What a parser recovers after a syntax error is often a cascade of the
    // same mistake, so the first one is reported alone.
    let src = with_tenants(&format!("{ALICE}weight = \nkernel = {{ byte_burst = }}\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].weight (line 23): invalid TOML: \
         string values must be quoted, expected literal string"
    );
}

#[test]
fn duplicate_key_is_named_with_its_table() {
    let src = with_tenants(&format!("{ALICE}kv_block_quota = 200\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].kv_block_quota (line 23): invalid TOML: duplicate key"
    );
}

#[test]
fn misplaced_table_type_names_what_was_expected() {
    let src = with_tenants(&format!("{ALICE}kernel = 5\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].kernel (line 23): invalid type: integer `5`, \
         expected a [tenants.kernel] table"
    );
}

#[test]
fn weight_beyond_u32_is_refused() {
    let src = with_tenants(&format!("{ALICE}weight = 5000000000\n"));
    assert_eq!(
        problem(&src),
        "tenants[0].weight (line 23): weight must be at most 4294967295, got 5000000000"
    );
}

#[test]
fn empty_tenant_list_is_refused_at_its_key() {
    let src = format!("tenants = []\n{HEADER}");
    assert_eq!(
        problem(&src),
        "tenants (line 1): at least one [[tenants]] table is required"
    );
}

#[test]
fn every_problem_is_reported_at_once_in_file_order() {
    let tenants = format!(
        "{ALICE}\n\
         [[tenants]]\n\
         id = \"bob\"\n\
         weight = -1\n\
         allowed_models = [\"gpt-5\"]\n\
         kv_block_quota = 5000\n\
         \n\
         [[tenants]]\n\
         id = \"alice\"\n\
         allowed_models = [\"llama-8b\"]\n\
         kv_block_quota = 10\n\
         requests_per_second = 0.0\n"
    );
    let src = with_tenants(&tenants).replace("pool_blocks = 1000", "pool_blocks = 0");
    assert_eq!(
        problems(&src),
        [
            "kv.pool_blocks (line 9): pool_blocks must be a positive integer, got 0",
            "tenants[1].weight (line 26): weight must be a positive integer, got -1",
            "tenants[1].allowed_models[0] (line 27): unknown model \"gpt-5\"; \
             defined models: \"tiny-llama\", \"llama-8b\"",
            "tenants[2].id (line 31): duplicate tenant id \"alice\"; \
             first defined at tenants[0].id (line 20)",
            "tenants[2].requests_per_second (line 34): \
             requests_per_second must be a finite number greater than 0, got 0",
        ]
    );
}

#[test]
fn audit_settings_out_of_range_are_each_named() {
    let src = format!(
        "{}[audit]\nsegment_max_bytes = 100\nring_capacity = 0\ntail_socket = \"audit.sock\"\n",
        with_tenants(ALICE)
    );
    assert_eq!(
        problems(&src),
        [
            "audit.segment_max_bytes (line 24): segment_max_bytes must be at least 4096, got 100",
            "audit.ring_capacity (line 25): ring_capacity must be a positive integer, got 0",
            "audit.tail_socket (line 26): tail_socket must be an absolute path, got \"audit.sock\"",
        ]
    );
}

/// The file of `tenants` with a `[cluster]` table after them, and the line
/// of `[cluster]` (its first key is on the next).
fn with_cluster(tenants: &str, cluster: &str) -> (String, usize) {
    let src = with_tenants(tenants);
    let line = src.lines().count() + 2;
    (format!("{src}\n[cluster]\n{cluster}"), line)
}

#[test]
fn host_share_must_be_a_share_of_one() {
    for (value, shown) in [
        ("0", "0"),
        ("1.5", "1.5"),
        ("-0.25", "-0.25"),
        ("nan", "NaN"),
        ("inf", "inf"),
    ] {
        let (src, line) = with_cluster(ALICE, &format!("host_share = {value}\n"));
        assert_eq!(
            problem(&src),
            format!(
                "cluster.host_share (line {}): host_share must be a number greater than 0 and \
                 at most 1 (this host's share of every tenant's limits), got {shown}",
                line + 1
            )
        );
    }
    let (src, line) = with_cluster(ALICE, "host_share = \"half\"\n");
    assert_eq!(
        problem(&src),
        format!(
            "cluster.host_share (line {}): invalid type: string \"half\", expected f64",
            line + 1
        )
    );
    let (src, line) = with_cluster(ALICE, "hosts = 4\n");
    assert_eq!(
        problem(&src),
        format!(
            "cluster.hosts (line {}): unknown field `hosts`, expected `host_share` or `quic_lb`",
            line + 1
        )
    );
}

#[test]
fn a_hosts_share_too_small_for_a_tenants_limits_is_named_with_the_share() {
    let tenant = format!(
        "{ALICE}max_tokens_per_request = 4096\ntokens_per_minute = 10000\n\
         requests_per_second = 0.002\n"
    );
    let (src, _) = with_cluster(&tenant, "host_share = 0.25\n");
    assert_eq!(
        problems(&src),
        [
            "tenants[0].max_tokens_per_request (line 23): max_tokens_per_request (4096) exceeds \
             this host's share of tokens_per_minute (10000 x cluster.host_share 0.25 = 2500); \
             a request that large could never be admitted",
            "tenants[0].requests_per_second (line 25): this host's share of requests_per_second \
             (0.002 x cluster.host_share 0.25 = 0.0005) is below the minimum 0.001",
        ]
    );
    // The same tenant on a host that is the whole fleet is valid.
    assert!(Config::from_toml_str(&with_tenants(&tenant)).is_ok());
}

#[test]
fn quic_lb_settings_out_of_the_drafts_bounds_are_named() {
    let lb = |body: &str| with_cluster(ALICE, &format!("[cluster.quic_lb]\n{body}"));
    let (src, line) = lb("config_id = 7\nserver_id = \"0a0b\"\n");
    assert_eq!(
        problem(&src),
        format!(
            "cluster.quic_lb.config_id (line {}): \
             config_id must be 0..=6 (7 marks an unroutable id), got 7",
            line + 2
        )
    );
    let (src, line) = lb("server_id = \"0a0\"\n");
    assert_eq!(
        problem(&src),
        format!(
            "cluster.quic_lb.server_id (line {}): \
             server_id must be hex digits, two per octet, got \"0a0\"",
            line + 2
        )
    );
    let (src, _) = lb(&format!("server_id = \"{}\"\n", "ab".repeat(16)));
    assert!(problem(&src).ends_with("server_id must be 1..=15 octets, got 16"));
    let (src, line) = lb("server_id = \"0a0b\"\nnonce_len = 3\n");
    assert_eq!(
        problem(&src),
        format!(
            "cluster.quic_lb.nonce_len (line {}): nonce_len must be at least 4, got 3",
            line + 3
        )
    );
    let (src, _) = lb("server_id = \"0a0b0c0d0e\"\nnonce_len = 15\n");
    assert!(
        problem(&src).ends_with(
            "server_id (5) + nonce_len (15) must be at most 19 octets \
             (a connection id is at most 20)"
        ),
        "{}",
        problem(&src)
    );
    let (src, _) = lb("server_id = \"0a0b0c0d0e\"\nnonce_len = 12\nkey_file = \"lb.key\"\n");
    assert!(
        problem(&src).ends_with(
            "server_id (5) + nonce_len (12) must be at most 16 octets with a key (one AES block)"
        ),
        "{}",
        problem(&src)
    );
    let (src, _) = lb("server_id = \"0a0b\"\nkey = \"00\"\n");
    assert!(
        problem(&src).contains("unknown field `key`"),
        "{}",
        problem(&src)
    );
}

#[test]
fn quic_lb_server_ids_are_strict_hex_and_nonces_in_range() {
    let lb = |body: &str| with_cluster(ALICE, &format!("[cluster.quic_lb]\n{body}")).0;
    assert!(problem(&lb("server_id = \"+a0b\"\n")).contains("server_id must be hex digits"));
    assert!(problem(&lb("server_id = \"\"\n")).ends_with("server_id must be 1..=15 octets, got 0"));
    assert!(
        problem(&lb("server_id = \"0a\"\nnonce_len = 300\n"))
            .ends_with("server_id (1) + nonce_len (300) must be at most 19 octets (a connection id is at most 20)")
    );
    // A bad server id is named once; the nonce is still checked on its own.
    assert_eq!(
        problems(&lb("server_id = \"zz\"\nnonce_len = 2\n")).len(),
        2
    );
    assert_eq!(problems(&lb("server_id = \"zz\"\n")).len(), 1);
}
