//! The config file as written: serde structs with the defaults, before validation.
//!
//! Integers are read as `i64` and strings as `String` so that a negative
//! weight or a malformed address reaches validation, which names the problem,
//! instead of failing as a serde type error. Each section is read on its own
//! (see [`RawConfig::read`]) so one bad section does not hide the others.

use super::source::SourceMap;
use super::{ChatTemplateName, ConfigError, EbpfMode, ModelBackend};
use crate::{IsolationLevel, Tier};
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// Default QUIC (HTTP/3, UDP) and TLS/TCP listen address.
pub(super) const DEFAULT_LISTEN: &str = "127.0.0.1:8443";

/// Top-level keys, in the order the docs present them.
const TOP_LEVEL_KEYS: [&str; 10] = [
    "trust_domain",
    "listeners",
    "tls",
    "kv",
    "scheduler",
    "ebpf",
    "audit",
    "cluster",
    "models",
    "tenants",
];

/// The whole file; a section is `None` where it is missing or failed to deserialize.
#[derive(Debug, Default)]
pub(super) struct RawConfig {
    pub trust_domain: Option<String>,
    pub listeners: Option<RawListeners>,
    pub tls: Option<RawTls>,
    pub kv: Option<RawKv>,
    pub scheduler: Option<RawScheduler>,
    pub ebpf: Option<RawEbpf>,
    pub audit: Option<RawAudit>,
    pub cluster: Option<RawCluster>,
    /// One entry per `[[models]]` table; `None` for one that failed to deserialize.
    pub models: Option<Vec<Option<RawModel>>>,
    /// One entry per `[[tenants]]` table; `None` for one that failed to deserialize.
    pub tenants: Option<Vec<Option<RawTenant>>>,
}

/// `[listeners]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [listeners] table")]
pub(super) struct RawListeners {
    #[serde(default = "default_listen")]
    pub quic: String,
    #[serde(default = "default_listen")]
    pub tcp: String,
    #[serde(default)]
    pub admin: Option<String>,
    #[serde(default)]
    pub metrics: Option<String>,
    #[serde(default)]
    pub quic_reset_key_file: Option<String>,
}

impl Default for RawListeners {
    fn default() -> Self {
        Self {
            quic: default_listen(),
            tcp: default_listen(),
            admin: None,
            metrics: None,
            quic_reset_key_file: None,
        }
    }
}

/// `[cluster]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [cluster] table")]
pub(super) struct RawCluster {
    #[serde(default = "one_f64")]
    pub host_share: f64,
    #[serde(default)]
    pub quic_lb: Option<RawQuicLb>,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            host_share: one_f64(),
            quic_lb: None,
        }
    }
}

/// `[cluster.quic_lb]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [cluster.quic_lb] table")]
pub(super) struct RawQuicLb {
    #[serde(default)]
    pub config_id: i64,
    pub server_id: String,
    #[serde(default = "default_nonce_len")]
    pub nonce_len: i64,
    #[serde(default)]
    pub key_file: Option<String>,
}

const fn default_nonce_len() -> i64 {
    8
}

const fn one_f64() -> f64 {
    1.0
}

/// `[tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [tls] table")]
pub(super) struct RawTls {
    pub cert: String,
    pub key: String,
    pub client_ca: Vec<String>,
}

/// `[kv]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [kv] table")]
pub(super) struct RawKv {
    pub pool_blocks: i64,
    #[serde(default = "default_block_tokens")]
    pub block_tokens: i64,
}

/// `[scheduler]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [scheduler] table")]
pub(super) struct RawScheduler {
    #[serde(default = "one")]
    pub prompt_token_weight: i64,
    #[serde(default = "two")]
    pub output_token_weight: i64,
    #[serde(default = "default_step_tokens")]
    pub step_tokens: i64,
    #[serde(default = "default_over_share_prompt_tokens")]
    pub over_share_prompt_tokens: i64,
}

impl Default for RawScheduler {
    fn default() -> Self {
        Self {
            prompt_token_weight: one(),
            output_token_weight: two(),
            step_tokens: default_step_tokens(),
            over_share_prompt_tokens: default_over_share_prompt_tokens(),
        }
    }
}

/// `[ebpf]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [ebpf] table")]
pub(super) struct RawEbpf {
    #[serde(default)]
    pub mode: EbpfMode,
    #[serde(default = "default_unknown_pps")]
    pub unknown_source_packets_per_second: i64,
    #[serde(default = "default_unknown_burst")]
    pub unknown_source_packet_burst: i64,
}

impl Default for RawEbpf {
    fn default() -> Self {
        Self {
            mode: EbpfMode::default(),
            unknown_source_packets_per_second: default_unknown_pps(),
            unknown_source_packet_burst: default_unknown_burst(),
        }
    }
}

/// `[audit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [audit] table")]
pub(super) struct RawAudit {
    #[serde(default = "default_audit_dir")]
    pub dir: String,
    #[serde(default = "default_audit_key_file")]
    pub key_file: String,
    #[serde(default = "default_segment_bytes")]
    pub segment_max_bytes: i64,
    #[serde(default = "default_segment_age")]
    pub segment_max_age_secs: i64,
    #[serde(default)]
    pub retention_max_bytes: Option<i64>,
    #[serde(default)]
    pub retention_days: Option<i64>,
    #[serde(default = "default_ring_capacity")]
    pub ring_capacity: i64,
    #[serde(default)]
    pub tail_socket: Option<String>,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            dir: default_audit_dir(),
            key_file: default_audit_key_file(),
            segment_max_bytes: default_segment_bytes(),
            segment_max_age_secs: default_segment_age(),
            retention_max_bytes: None,
            retention_days: None,
            ring_capacity: default_ring_capacity(),
            tail_socket: None,
        }
    }
}

fn default_audit_dir() -> String {
    "/var/lib/bulkhead/audit".to_owned()
}
fn default_audit_key_file() -> String {
    "/etc/bulkhead/audit.key".to_owned()
}
fn default_segment_bytes() -> i64 {
    64 << 20
}
fn default_segment_age() -> i64 {
    3600
}
fn default_ring_capacity() -> i64 {
    65_536
}

/// One `[[models]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[models]] table")]
pub(super) struct RawModel {
    pub name: String,
    #[serde(default)]
    pub backend: Option<ModelBackend>,
    pub max_context_tokens: i64,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub chat_template: Option<ChatTemplateName>,
}

/// One `[[tenants]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[tenants]] table")]
pub(super) struct RawTenant {
    pub id: String,
    #[serde(default = "one")]
    pub weight: i64,
    #[serde(default)]
    pub tier: Tier,
    pub allowed_models: Vec<String>,
    #[serde(default = "default_max_tokens_per_request")]
    pub max_tokens_per_request: i64,
    #[serde(default = "default_max_prompt_bytes")]
    pub max_prompt_bytes: i64,
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: f64,
    #[serde(default = "default_request_burst")]
    pub request_burst: i64,
    #[serde(default = "default_tokens_per_minute")]
    pub tokens_per_minute: i64,
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: i64,
    #[serde(default = "default_max_queued_requests")]
    pub max_queued_requests: i64,
    pub kv_block_quota: i64,
    #[serde(default)]
    pub isolation: IsolationLevel,
    #[serde(default)]
    pub kernel: RawKernel,
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
}

/// `[tenants.kernel]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [tenants.kernel] table")]
pub(super) struct RawKernel {
    #[serde(default = "default_kernel_pps")]
    pub packets_per_second: i64,
    #[serde(default = "default_kernel_packet_burst")]
    pub packet_burst: i64,
    #[serde(default = "default_kernel_bps")]
    pub bytes_per_second: i64,
    #[serde(default = "default_kernel_byte_burst")]
    pub byte_burst: i64,
}

impl Default for RawKernel {
    fn default() -> Self {
        Self {
            packets_per_second: default_kernel_pps(),
            packet_burst: default_kernel_packet_burst(),
            bytes_per_second: default_kernel_bps(),
            byte_burst: default_kernel_byte_burst(),
        }
    }
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}
fn one() -> i64 {
    1
}
fn two() -> i64 {
    2
}
fn default_step_tokens() -> i64 {
    i64::from(super::DEFAULT_STEP_TOKENS)
}
fn default_over_share_prompt_tokens() -> i64 {
    i64::from(super::DEFAULT_OVER_SHARE_PROMPT_TOKENS)
}
fn default_block_tokens() -> i64 {
    16
}
fn default_unknown_pps() -> i64 {
    2_000
}
fn default_unknown_burst() -> i64 {
    500
}
fn default_max_tokens_per_request() -> i64 {
    4_096
}
fn default_max_prompt_bytes() -> i64 {
    1 << 20
}
fn default_requests_per_second() -> f64 {
    10.0
}
fn default_request_burst() -> i64 {
    20
}
fn default_tokens_per_minute() -> i64 {
    100_000
}
fn default_max_concurrent_requests() -> i64 {
    8
}
fn default_max_queued_requests() -> i64 {
    64
}
fn default_kernel_pps() -> i64 {
    10_000
}
fn default_kernel_packet_burst() -> i64 {
    1_000
}
fn default_kernel_bps() -> i64 {
    12_500_000
}
fn default_kernel_byte_burst() -> i64 {
    1 << 20
}

impl RawConfig {
    /// Reads each top-level section of `table` on its own, reporting every section that fails.
    pub(super) fn read(table: DeTable<'_>, map: &SourceMap, errors: &mut Vec<ConfigError>) -> Self {
        let mut raw = Self::default();
        for (key, value) in table {
            let name = key.get_ref().as_ref();
            match name {
                "trust_domain" => raw.trust_domain = section(value, name, map, errors),
                "listeners" => raw.listeners = section(value, name, map, errors),
                "tls" => raw.tls = section(value, name, map, errors),
                "kv" => raw.kv = section(value, name, map, errors),
                "scheduler" => raw.scheduler = section(value, name, map, errors),
                "ebpf" => raw.ebpf = section(value, name, map, errors),
                "audit" => raw.audit = section(value, name, map, errors),
                "cluster" => raw.cluster = section(value, name, map, errors),
                "models" => raw.models = array_of_tables(value, name, map, errors),
                "tenants" => raw.tenants = array_of_tables(value, name, map, errors),
                _ => {
                    let expected = TOP_LEVEL_KEYS.map(|k| format!("`{k}`")).join(", ");
                    errors.push(ConfigError {
                        path: name.to_owned(),
                        line: Some(map.line_at(key.span().start)),
                        message: format!("unknown field `{name}`, expected one of {expected}"),
                    });
                }
            }
        }
        raw
    }
}

/// Deserializes the value at `path`, or records why it cannot be.
fn section<T: for<'de> Deserialize<'de>>(
    value: Spanned<DeValue<'_>>,
    path: &str,
    map: &SourceMap,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    T::deserialize(ValueDeserializer::from(value))
        .map_err(|e| errors.push(map.serde_error(path, &e)))
        .ok()
}

/// Deserializes each table of the array at `path` on its own.
fn array_of_tables<T: for<'de> Deserialize<'de>>(
    value: Spanned<DeValue<'_>>,
    path: &str,
    map: &SourceMap,
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<Option<T>>> {
    let span = value.span();
    let DeValue::Array(array) = value.into_inner() else {
        errors.push(ConfigError {
            path: path.to_owned(),
            line: Some(map.line_at(span.start)),
            message: format!("`{path}` must be an array of tables, written [[{path}]]"),
        });
        return None;
    };
    let elements = array
        .into_iter()
        .enumerate()
        .map(|(i, element)| section(element, &format!("{path}[{i}]"), map, errors))
        .collect();
    Some(elements)
}
