//! The host config: one TOML file naming the listeners, the models and every tenant's policy.
//!
//! [`Config::from_toml_str`] parses and validates in one step and returns
//! either a [`Config`] whose every value is in range and cross-checked
//! (models named by tenants exist, quotas fit the KV pool, an API key names
//! one tenant), or [`ConfigErrors`] listing *every* problem at once, each
//! with its key path and line:
//!
//! ```text
//! tenants[1].weight (line 23): weight must be a positive integer, got -2
//! tenants[2].allowed_models[0] (line 31): unknown model "llama-70b"; defined models: "tiny-llama"
//! ```
//!
//! The file is read in three steps: the TOML is parsed once into a spanned
//! tree (module `source`), each section is deserialized on its own into plain
//! serde structs with their defaults (`raw`), and validation turns those into
//! the typed structs below (`validate`, `tenants`). A complete example with
//! every key explained is `deploy/examples/single-host.toml`.

mod error;
mod raw;
mod source;
mod tenants;
mod validate;

pub use self::error::{ConfigError, ConfigErrors};

use crate::fair_queue::ServiceWeights;
use crate::identity::{ApiKeyHash, TrustDomain};
use crate::{IsolationLevel, TenantId, Tier};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A validated host config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// SPIFFE trust domain of client identities: `spiffe://<trust_domain>/tenant/<id>`.
    pub trust_domain: TrustDomain,
    /// Where the proxy listens.
    pub listeners: Listeners,
    /// Server certificate and the CAs trusted for client certificates.
    pub tls: TlsPaths,
    /// The KV block pool shared by all tenants.
    pub kv: KvPool,
    /// The fair scheduler's service weights and the workers' step budgets.
    pub scheduler: Scheduler,
    /// Kernel (eBPF) enforcement.
    pub ebpf: EbpfSettings,
    /// The audit log.
    pub audit: AuditSettings,
    /// This host's place in a fleet of hosts.
    pub cluster: Cluster,
    /// Models this host serves, in file order; names are unique.
    pub models: Vec<ModelSpec>,
    /// Tenants, in file order; ids are unique and there is at least one.
    pub tenants: Vec<TenantPolicy>,
}

/// Listen addresses (`[listeners]`); QUIC and TCP default to `127.0.0.1:8443`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listeners {
    /// UDP address for QUIC / HTTP/3.
    pub quic: SocketAddr,
    /// TCP address for TLS with HTTP/1.1 or HTTP/2.
    pub tcp: SocketAddr,
    /// Admin endpoint (metrics, tenant listing, reload); none by default.
    pub admin: Option<AdminEndpoint>,
    /// Read-only metrics endpoint (`GET /metrics`, `GET /healthz`) on any
    /// address, for a Prometheus that scrapes over the network; none by default.
    pub metrics: Option<SocketAddr>,
    /// The key of the QUIC endpoint's stateless reset tokens, 64 hex digits
    /// in a file. Kept across restarts, a restarted host can reset its
    /// predecessor's connections at once instead of leaving their clients
    /// to time out. None by default: a new random key per process.
    pub quic_reset_key_file: Option<PathBuf>,
}

/// Where the admin endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminEndpoint {
    /// A unix socket at an absolute path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

/// PEM file paths of the TLS setup (`[tls]`); the files are not read here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA certificates trusted to issue client (tenant) certificates; at least one.
    pub client_ca: Vec<PathBuf>,
}

/// The paged KV cache pool (`[kv]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvPool {
    /// Total KV blocks in the pool; every tenant's quota is at most this.
    pub pool_blocks: u32,
    /// Tokens per block (default 16).
    pub block_tokens: u32,
}

/// Default `[scheduler] step_tokens`: the worker engine's default
/// (`bulkhead_kernels::engine::EngineConfig`, which this crate cannot name;
/// a test in `bulkhead` checks that the two agree).
pub const DEFAULT_STEP_TOKENS: u32 = 256;
/// Default `[scheduler] over_share_prompt_tokens`; see [`DEFAULT_STEP_TOKENS`].
pub const DEFAULT_OVER_SHARE_PROMPT_TOKENS: u32 = 136;

/// `[scheduler]`: the cost weights of the fair queue's virtual token
/// counter, and how the workers fill each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduler {
    /// Service charged per prompt token (default 1).
    pub prompt_token_weight: u32,
    /// Service charged per generated token (default 2).
    pub output_token_weight: u32,
    /// Most tokens in one step of a worker, decodes plus prompt chunks
    /// (default 256): a request arriving mid-step waits for the step's end.
    pub step_tokens: u32,
    /// Most prompt tokens per step of the tenants at or over their equal
    /// share of a worker's slots while a tenant under its share runs there
    /// (default 136): what a busy tenant's prompts can add to a quiet
    /// tenant's time to first token.
    pub over_share_prompt_tokens: u32,
}

impl From<Scheduler> for ServiceWeights {
    fn from(w: Scheduler) -> Self {
        Self {
            prompt: u64::from(w.prompt_token_weight),
            output: u64::from(w.output_token_weight),
        }
    }
}

/// Kernel-side enforcement settings (`[ebpf]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EbpfSettings {
    /// Whether the eBPF programs must load (default [`EbpfMode::Auto`]).
    pub mode: EbpfMode,
    /// Packets per second allowed from each source address not yet mapped to a tenant (default 2000).
    pub unknown_source_packets_per_second: u64,
    /// Burst of that budget, in packets (default 500).
    pub unknown_source_packet_burst: u64,
}

/// The audit log (`[audit]`): where the sealed per-tenant partitions live,
/// the master key they are sealed under, and when segments rotate and expire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSettings {
    /// Directory of the partitions (default `/var/lib/bulkhead/audit`).
    pub dir: PathBuf,
    /// The 32-byte master key, hex (default `/etc/bulkhead/audit.key`);
    /// `bulkhead audit keygen` writes one.
    pub key_file: PathBuf,
    /// A segment is closed at this size, in bytes (default 64 MiB).
    pub segment_max_bytes: u64,
    /// ... or this age, in seconds (default 3600).
    pub segment_max_age_secs: u64,
    /// Oldest segments are deleted past this size per partition, in bytes
    /// (default none). A partition's newest segment is never deleted.
    pub retention_max_bytes: Option<u64>,
    /// ... or past this age, in days (default none).
    pub retention_days: Option<u64>,
    /// Records the ring between requests and the writer holds (default 65536).
    pub ring_capacity: u32,
    /// A unix socket streaming new records to `bulkhead audit tail` (default none).
    pub tail_socket: Option<PathBuf>,
}

/// `[cluster]`: this host among the hosts an L4 balancer spreads tenants over.
///
/// The tenants' rates, bursts and concurrency caps in the file are the
/// fleet's; this host enforces its [`host_share`](Self::host_share) of each
/// (already applied to every [`TenantPolicy`] of a validated [`Config`]), so
/// a tenant spread over N hosts of share 1/N gets its limits once in total,
/// not N times. Per-request caps and the KV quota (a share of this host's
/// own pool) are not split.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// This host's share of every tenant's limits, in (0, 1] (default 1: one host).
    pub host_share: f64,
    /// Routable connection ids for a QUIC-LB balancer (default none: random ids).
    pub quic_lb: Option<QuicLb>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            host_share: 1.0,
            quic_lb: None,
        }
    }
}

/// `[cluster.quic_lb]`: the QUIC connection ids this host issues carry its
/// server id (draft-ietf-quic-load-balancers), in the clear or encrypted
/// under a key shared with the balancer, so packets of a connection whose
/// client address changed still reach this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicLb {
    /// Config rotation codepoint, the id's top 3 bits: 0..=6 (default 0).
    pub config_id: u8,
    /// This host's server id, 1..=15 octets (written in hex).
    pub server_id: Vec<u8>,
    /// Octets of nonce after it: at least 4, and server id plus nonce at
    /// most 19, or 16 with a key (default 8).
    pub nonce_len: u8,
    /// The 16-byte AES-128 key the balancer decrypts ids with, as 32 hex
    /// digits in a file; `None`: the server id is in the clear.
    pub key_file: Option<PathBuf>,
}

impl Cluster {
    /// `fleet` (a rate or a count) on this host: its share, rounded up, at
    /// least 1, so no tenant is locked out of a host by rounding.
    #[must_use]
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )] // the share is in (0, 1]: the result is in 1..=fleet
    pub fn split(&self, fleet: u64) -> u64 {
        if self.host_share >= 1.0 {
            return fleet;
        }
        ((fleet as f64 * self.host_share).ceil() as u64).clamp(1, fleet.max(1))
    }

    /// [`split`](Self::split) for a `u32`.
    #[must_use]
    pub fn split_u32(&self, fleet: u32) -> u32 {
        u32::try_from(self.split(u64::from(fleet))).unwrap_or(fleet)
    }
}

/// Whether kernel enforcement is required, attempted, or off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EbpfMode {
    /// Refuse to start if the programs cannot be loaded.
    Required,
    /// Load the programs if the kernel allows it; warn and go on without them otherwise.
    #[default]
    Auto,
    /// Do not load them; limits are enforced in userspace only.
    Off,
}

/// A model this host serves (`[[models]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Name clients ask for in the `model` field; unique in the file.
    pub name: String,
    /// Backend to run it on; `None` lets the host pick (CUDA where a GPU is present, else CPU).
    pub backend: Option<ModelBackend>,
    /// Longest sequence (prompt + output) in tokens.
    pub max_context_tokens: u32,
    /// A Llama-family checkpoint directory (`config.json`, safetensors
    /// weights, `tokenizer.json`); `None` serves the built-in model.
    pub path: Option<PathBuf>,
    /// The chat template of a checkpoint; `None` picks it from the
    /// tokenizer's special tokens.
    pub chat_template: Option<ChatTemplateName>,
}

/// A chat template a checkpoint may name (`chat_template`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplateName {
    /// Llama 3's header-and-`<|eot_id|>` turns.
    Llama3,
    /// Llama 2's `[INST]` turns.
    Llama2,
    /// None: the model serves `/v1/completions` only.
    None,
}

/// Worker backend of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelBackend {
    /// The plain-Rust reference backend.
    Cpu,
    /// NVIDIA GPUs through CUDA.
    Cuda,
    /// A cost model of GPU step times, no math.
    Sim,
}

/// One tenant's policy (`[[tenants]]`); defaults are noted per field.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantPolicy {
    /// The tenant, as named in its client certificate's SPIFFE id.
    pub id: TenantId,
    /// Share of the scheduler under contention, relative to other tenants (default 1).
    pub weight: u32,
    /// Service tier (default standard).
    pub tier: Tier,
    /// Models the tenant may use; non-empty, each defined under `[[models]]`.
    pub allowed_models: Vec<String>,
    /// Largest `max_tokens` a request may ask for (default 4096).
    pub max_tokens_per_request: u32,
    /// Largest prompt in bytes (default 1 MiB).
    pub max_prompt_bytes: u64,
    /// Sustained request rate (default 10.0); finite and at least 0.001.
    /// This host's share (see [`Cluster`]), as are the burst, the token
    /// budget, the concurrency caps and the kernel budgets below.
    pub requests_per_second: f64,
    /// Requests admitted at once above the sustained rate (default 20).
    pub request_burst: u32,
    /// Token budget per minute, prompt plus output (default 100 000).
    pub tokens_per_minute: u64,
    /// Requests in flight at once (default 8).
    pub max_concurrent_requests: u32,
    /// Requests waiting in the fair queue at once (default 64).
    pub max_queued_requests: u32,
    /// KV blocks the tenant may hold at once; at most [`KvPool::pool_blocks`] (no default).
    pub kv_block_quota: u32,
    /// How the tenant is separated from others (default shared).
    pub isolation: IsolationLevel,
    /// Per-tenant packet and byte budgets enforced in the kernel.
    pub kernel: KernelLimits,
    /// SHA-256 digests of the tenant's API keys; a digest names one tenant only (default none).
    pub api_key_sha256: Vec<ApiKeyHash>,
}

/// A tenant's kernel token buckets (`[tenants.kernel]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLimits {
    /// Sustained packets per second (default 10 000).
    pub packets_per_second: u64,
    /// Packet bucket size (default 1000).
    pub packet_burst: u64,
    /// Sustained bytes per second (default 12 500 000, 100 Mbit/s).
    pub bytes_per_second: u64,
    /// Byte bucket size (default 1 MiB); at least [`MAX_PACKET_BYTES`].
    pub byte_burst: u64,
}

/// Largest IP packet in bytes: a byte burst smaller than this could drop a valid packet forever.
pub const MAX_PACKET_BYTES: u64 = 65_535;

/// Smallest accepted `requests_per_second`: the resolution of the request limiter.
pub const MIN_REQUESTS_PER_SECOND: f64 = 0.001;

impl Config {
    /// Parses and validates a config; on failure lists every problem, in file order.
    pub fn from_toml_str(src: &str) -> Result<Self, ConfigErrors> {
        let (map, table) = source::SourceMap::parse(src);
        let table = table?;
        let mut errors = Vec::new();
        let raw = raw::RawConfig::read(table, &map, &mut errors);
        validate::validate(raw, &map, errors)
    }

    /// Reads and validates the config file at `path`.
    pub fn from_path(path: &Path) -> Result<Self, ConfigErrors> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: String::new(),
            line: None,
            message: format!("cannot read config file {}: {e}", path.display()),
        })?;
        Self::from_toml_str(&src)
    }

    /// The policy of tenant `id`, if the config has one.
    pub fn tenant(&self, id: &TenantId) -> Option<&TenantPolicy> {
        self.tenants.iter().find(|t| &t.id == id)
    }

    /// The model named `name`, if the config has one.
    pub fn model(&self, name: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.name == name)
    }
}

impl TenantPolicy {
    /// Whether the tenant may use the model named `model` (exact, case-sensitive match).
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.iter().any(|m| m == model)
    }
}

#[cfg(test)]
mod tests;
