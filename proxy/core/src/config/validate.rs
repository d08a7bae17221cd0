//! Validation of the host-wide sections: raw serde structs in, typed [`Config`] or every problem out.

use super::raw::{
    RawAudit, RawCluster, RawConfig, RawEbpf, RawKv, RawListeners, RawModel, RawQuicLb,
    RawScheduler, RawTls,
};
use super::source::SourceMap;
use super::tenants;
use super::{
    AdminEndpoint, AuditSettings, Cluster, Config, ConfigError, ConfigErrors, EbpfSettings, KvPool,
    Listeners, ModelSpec, QuicLb, Scheduler, TlsPaths,
};
use crate::identity::TrustDomain;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

const NO_MODELS: &str = "at least one [[models]] table is required";
const NO_TENANTS: &str = "at least one [[tenants]] table is required";

/// Collects problems, each placed at the line of its key path.
pub(super) struct Checker<'m> {
    map: &'m SourceMap,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    /// Records a problem at `path`, on the line of `path` (or of its nearest enclosing table).
    pub(super) fn report(&mut self, path: String, message: String) {
        let line = self.map.line_of(&path);
        self.errors.push(ConfigError {
            path,
            line,
            message,
        });
    }

    /// The line of `path`, for messages that point at another place.
    pub(super) fn line_of(&self, path: &str) -> Option<usize> {
        self.map.line_of(path)
    }

    /// `base.key` as a `u32` in `1..=u32::MAX`.
    pub(super) fn positive_u32(&mut self, base: &str, key: &str, value: i64) -> Option<u32> {
        let value = self.positive_u64(base, key, value)?;
        let narrowed = u32::try_from(value).ok();
        if narrowed.is_none() {
            let max = u32::MAX;
            self.report(
                format!("{base}.{key}"),
                format!("{key} must be at most {max}, got {value}"),
            );
        }
        narrowed
    }

    /// `base.key` as a `u64` of at least 1.
    pub(super) fn positive_u64(&mut self, base: &str, key: &str, value: i64) -> Option<u64> {
        match u64::try_from(value) {
            Ok(v) if v > 0 => Some(v),
            _ => {
                self.report(
                    format!("{base}.{key}"),
                    format!("{key} must be a positive integer, got {value}"),
                );
                None
            }
        }
    }

    /// `base.key` as a path; must not be empty.
    fn file_path(&mut self, path: String, key: &str, value: String) -> Option<PathBuf> {
        if value.is_empty() {
            self.report(path, format!("{key} must not be empty"));
            return None;
        }
        Some(PathBuf::from(value))
    }
}

/// Turns the raw sections into a [`Config`], or reports every problem (plus `errors` so far) in file order.
pub(super) fn validate(
    raw: RawConfig,
    map: &SourceMap,
    errors: Vec<ConfigError>,
) -> Result<Config, ConfigErrors> {
    let mut c = Checker { map, errors };
    let trust_domain = match raw.trust_domain {
        Some(td) => trust_domain(&mut c, &td),
        None => missing(
            &mut c,
            "trust_domain",
            "missing required key `trust_domain`",
        ),
    };
    let listeners = listeners(&mut c, raw.listeners.unwrap_or_default());
    let tls = match raw.tls {
        Some(tls) => tls_paths(&mut c, tls),
        None => missing(&mut c, "tls", "missing required table [tls]"),
    };
    let kv = match raw.kv {
        Some(kv) => kv_pool(&mut c, &kv),
        None => missing(&mut c, "kv", "missing required table [kv]"),
    };
    let scheduler = scheduler(&mut c, &raw.scheduler.unwrap_or_default());
    let ebpf = ebpf(&mut c, &raw.ebpf.unwrap_or_default());
    let audit = audit(&mut c, raw.audit.unwrap_or_default());
    let cluster = cluster(&mut c, raw.cluster.unwrap_or_default());
    // A broken [cluster] is reported; the tenants are still checked, as written.
    let whole_fleet = Cluster::default();
    // Tenants are checked against the model names only if every model could be read.
    let model_names: Option<Vec<String>> = raw.models.as_ref().and_then(|models| {
        models
            .iter()
            .map(|m| m.as_ref().map(|m| m.name.clone()))
            .collect()
    });
    let models = match raw.models {
        Some(models) if !models.is_empty() => models_of(&mut c, models),
        Some(_) => empty(&mut c, "models", NO_MODELS),
        None => missing(&mut c, "models", NO_MODELS),
    };
    let tenants = match raw.tenants {
        Some(raw_tenants) if !raw_tenants.is_empty() => {
            let context = tenants::Context {
                pool_blocks: kv.map(|kv| kv.pool_blocks),
                model_names: model_names.as_deref(),
                cluster: cluster.as_ref().unwrap_or(&whole_fleet),
            };
            tenants::tenants(&mut c, raw_tenants, &context)
        }
        Some(_) => empty(&mut c, "tenants", NO_TENANTS),
        None => missing(&mut c, "tenants", NO_TENANTS),
    };

    let mut errors = c.errors;
    if let (
        Some(trust_domain),
        Some(listeners),
        Some(tls),
        Some(kv),
        Some(scheduler),
        Some(ebpf),
        Some(audit),
        Some(cluster),
        Some(models),
        Some(tenants),
    ) = (
        trust_domain,
        listeners,
        tls,
        kv,
        scheduler,
        ebpf,
        audit,
        cluster,
        models,
        tenants,
    ) && errors.is_empty()
    {
        return Ok(Config {
            trust_domain,
            listeners,
            tls,
            kv,
            scheduler,
            ebpf,
            audit,
            cluster,
            models,
            tenants,
        });
    }
    debug_assert!(!errors.is_empty(), "every rejected value reports why");
    if errors.is_empty() {
        // Unreachable: each `None` above comes with a report. Never return an empty list.
        errors.push(ConfigError {
            path: String::new(),
            line: None,
            message: "config rejected without a reason (a bulkhead bug; please report it)".into(),
        });
    }
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    Err(ConfigErrors(errors))
}

/// Reports a section that is not in the file; it has no line, so it sorts
/// after the placed problems. A section that is in the file but could not be
/// read has had its problem reported already.
fn missing<T>(c: &mut Checker<'_>, path: &str, message: &str) -> Option<T> {
    if !c.map.has(path) {
        c.errors.push(ConfigError {
            path: path.to_owned(),
            line: None,
            message: message.to_owned(),
        });
    }
    None
}

/// Reports an array that is present but empty (`tenants = []`).
fn empty<T>(c: &mut Checker<'_>, path: &str, message: &str) -> Option<T> {
    c.report(path.to_owned(), message.to_owned());
    None
}

fn cluster(c: &mut Checker<'_>, raw: RawCluster) -> Option<Cluster> {
    let share = raw.host_share;
    let host_share = if share.is_finite() && share > 0.0 && share <= 1.0 {
        Some(share)
    } else {
        c.report(
            "cluster.host_share".to_owned(),
            format!(
                "host_share must be a number greater than 0 and at most 1 \
                 (this host's share of every tenant's limits), got {share}"
            ),
        );
        None
    };
    let quic_lb = match raw.quic_lb {
        Some(lb) => Some(quic_lb(c, lb)?),
        None => None,
    };
    Some(Cluster {
        host_share: host_share?,
        quic_lb,
    })
}

/// `[cluster.quic_lb]`, within the bounds of draft-ietf-quic-load-balancers.
fn quic_lb(c: &mut Checker<'_>, raw: RawQuicLb) -> Option<QuicLb> {
    const BASE: &str = "cluster.quic_lb";
    let config_id = u8::try_from(raw.config_id).ok().filter(|id| *id <= 6);
    if config_id.is_none() {
        c.report(
            format!("{BASE}.config_id"),
            format!(
                "config_id must be 0..=6 (7 marks an unroutable id), got {}",
                raw.config_id
            ),
        );
    }
    let server_id = match hex::decode(&raw.server_id).ok() {
        Some(id) if (1..=15).contains(&id.len()) => Some(id),
        Some(id) => {
            c.report(
                format!("{BASE}.server_id"),
                format!("server_id must be 1..=15 octets, got {}", id.len()),
            );
            None
        }
        None => {
            c.report(
                format!("{BASE}.server_id"),
                format!(
                    "server_id must be hex digits, two per octet, got {:?}",
                    raw.server_id
                ),
            );
            None
        }
    };
    let (most, why) = if raw.key_file.is_some() {
        (16, "at most 16 octets with a key (one AES block)")
    } else {
        (19, "at most 19 octets (a connection id is at most 20)")
    };
    let n = raw.nonce_len;
    // A server id reported above counts as its shortest, one octet.
    let sid_len = server_id
        .as_ref()
        .map_or(1, |id| i64::try_from(id.len()).unwrap_or(i64::MAX));
    let nonce_len = if n < 4 {
        c.report(
            format!("{BASE}.nonce_len"),
            format!("nonce_len must be at least 4, got {n}"),
        );
        None
    } else if n.saturating_add(sid_len) > most {
        c.report(
            format!("{BASE}.nonce_len"),
            format!("server_id ({sid_len}) + nonce_len ({n}) must be {why}"),
        );
        None
    } else {
        u8::try_from(n).ok()
    };
    let key_file = match raw.key_file {
        Some(path) => Some(c.file_path(format!("{BASE}.key_file"), "key_file", path)?),
        None => None,
    };
    Some(QuicLb {
        config_id: config_id?,
        server_id: server_id?,
        nonce_len: nonce_len?,
        key_file,
    })
}

fn trust_domain(c: &mut Checker<'_>, td: &str) -> Option<TrustDomain> {
    TrustDomain::new(td)
        .map_err(|e| c.report("trust_domain".to_owned(), format!("{e} (got {td:?})")))
        .ok()
}

fn socket_addr(c: &mut Checker<'_>, key: &str, value: &str) -> Option<SocketAddr> {
    value
        .parse()
        .map_err(|_| {
            c.report(
                format!("listeners.{key}"),
                format!("{key} must be a socket address such as 127.0.0.1:8443, got {value:?}"),
            );
        })
        .ok()
}

fn listeners(c: &mut Checker<'_>, raw: RawListeners) -> Option<Listeners> {
    let quic = socket_addr(c, "quic", &raw.quic);
    let tcp = socket_addr(c, "tcp", &raw.tcp);
    let admin = match raw.admin {
        None => Some(None),
        Some(admin) => {
            if let Ok(addr) = admin.parse::<SocketAddr>() {
                if tcp == Some(addr) && addr.port() != 0 {
                    c.report(
                        "listeners.admin".to_owned(),
                        format!("admin must not use the address of the tcp listener, {addr}"),
                    );
                    None
                } else {
                    Some(Some(AdminEndpoint::Tcp(addr)))
                }
            } else if admin.starts_with('/') {
                Some(Some(AdminEndpoint::Unix(PathBuf::from(admin))))
            } else {
                c.report(
                    "listeners.admin".to_owned(),
                    format!(
                        "admin must be a socket address such as 127.0.0.1:9090 \
                         or an absolute unix socket path, got {admin:?}"
                    ),
                );
                None
            }
        }
    };
    let metrics = match raw.metrics {
        None => Some(None),
        Some(metrics) => socket_addr(c, "metrics", &metrics).and_then(|addr| {
            // Port 0 picks a free port for each, so those cannot clash.
            let clash = if addr.port() == 0 {
                None
            } else if tcp == Some(addr) {
                Some("the tcp listener")
            } else if admin == Some(Some(AdminEndpoint::Tcp(addr))) {
                Some("the admin endpoint")
            } else {
                None
            };
            match clash {
                Some(other) => {
                    c.report(
                        "listeners.metrics".to_owned(),
                        format!("metrics must not use the address of {other}, {addr}"),
                    );
                    None
                }
                None => Some(Some(addr)),
            }
        }),
    };
    let quic_reset_key_file = match raw.quic_reset_key_file {
        None => Some(None),
        Some(path) => c
            .file_path(
                "listeners.quic_reset_key_file".to_owned(),
                "quic_reset_key_file",
                path,
            )
            .map(Some),
    };
    Some(Listeners {
        quic: quic?,
        tcp: tcp?,
        admin: admin?,
        metrics: metrics?,
        quic_reset_key_file: quic_reset_key_file?,
    })
}

fn tls_paths(c: &mut Checker<'_>, raw: RawTls) -> Option<TlsPaths> {
    let cert = c.file_path("tls.cert".to_owned(), "cert", raw.cert);
    let key = c.file_path("tls.key".to_owned(), "key", raw.key);
    if raw.client_ca.is_empty() {
        c.report(
            "tls.client_ca".to_owned(),
            "client_ca must list at least one CA certificate file".to_owned(),
        );
    }
    let count = raw.client_ca.len();
    let client_ca: Vec<PathBuf> = raw
        .client_ca
        .into_iter()
        .enumerate()
        .filter_map(|(i, ca)| c.file_path(format!("tls.client_ca[{i}]"), "client_ca entry", ca))
        .collect();
    if client_ca.len() != count || count == 0 {
        return None;
    }
    Some(TlsPaths {
        cert: cert?,
        key: key?,
        client_ca,
    })
}

fn kv_pool(c: &mut Checker<'_>, raw: &RawKv) -> Option<KvPool> {
    let pool_blocks = c.positive_u32("kv", "pool_blocks", raw.pool_blocks);
    let block_tokens = c.positive_u32("kv", "block_tokens", raw.block_tokens);
    Some(KvPool {
        pool_blocks: pool_blocks?,
        block_tokens: block_tokens?,
    })
}

fn scheduler(c: &mut Checker<'_>, raw: &RawScheduler) -> Option<Scheduler> {
    let base = "scheduler";
    let prompt = c.positive_u32(base, "prompt_token_weight", raw.prompt_token_weight);
    let output = c.positive_u32(base, "output_token_weight", raw.output_token_weight);
    let step = c.positive_u32(base, "step_tokens", raw.step_tokens);
    let over = c.positive_u32(
        base,
        "over_share_prompt_tokens",
        raw.over_share_prompt_tokens,
    );
    Some(Scheduler {
        prompt_token_weight: prompt?,
        output_token_weight: output?,
        step_tokens: step?,
        over_share_prompt_tokens: over?,
    })
}

fn ebpf(c: &mut Checker<'_>, raw: &RawEbpf) -> Option<EbpfSettings> {
    let pps = c.positive_u64(
        "ebpf",
        "unknown_source_packets_per_second",
        raw.unknown_source_packets_per_second,
    );
    let burst = c.positive_u64(
        "ebpf",
        "unknown_source_packet_burst",
        raw.unknown_source_packet_burst,
    );
    Some(EbpfSettings {
        mode: raw.mode,
        unknown_source_packets_per_second: pps?,
        unknown_source_packet_burst: burst?,
    })
}

fn audit(c: &mut Checker<'_>, raw: RawAudit) -> Option<AuditSettings> {
    let dir = c.file_path("audit.dir".to_owned(), "dir", raw.dir);
    let key_file = c.file_path("audit.key_file".to_owned(), "key_file", raw.key_file);
    let segment_max_bytes = c.positive_u64("audit", "segment_max_bytes", raw.segment_max_bytes);
    if segment_max_bytes.is_some_and(|b| b < 4096) {
        c.report(
            "audit.segment_max_bytes".to_owned(),
            format!(
                "segment_max_bytes must be at least 4096, got {}",
                raw.segment_max_bytes
            ),
        );
    }
    let age = c.positive_u64("audit", "segment_max_age_secs", raw.segment_max_age_secs);
    let retention_max_bytes = raw
        .retention_max_bytes
        .map(|b| c.positive_u64("audit", "retention_max_bytes", b));
    let retention_days = raw
        .retention_days
        .map(|d| c.positive_u64("audit", "retention_days", d));
    let ring_capacity = c.positive_u32("audit", "ring_capacity", raw.ring_capacity);
    let tail_socket = match raw.tail_socket {
        Some(path) if !path.starts_with('/') => {
            c.report(
                "audit.tail_socket".to_owned(),
                format!("tail_socket must be an absolute path, got {path:?}"),
            );
            return None;
        }
        Some(path) => Some(PathBuf::from(path)),
        None => None,
    };
    if segment_max_bytes.is_some_and(|b| b < 4096) {
        return None;
    }
    Some(AuditSettings {
        dir: dir?,
        key_file: key_file?,
        segment_max_bytes: segment_max_bytes?,
        segment_max_age_secs: age?,
        retention_max_bytes: retention_max_bytes.map(|b| b.ok_or(())).transpose().ok()?,
        retention_days: retention_days.map(|d| d.ok_or(())).transpose().ok()?,
        ring_capacity: ring_capacity?,
        tail_socket,
    })
}

/// Validates every `[[models]]` table; `None` if any is wrong.
fn models_of(c: &mut Checker<'_>, raw: Vec<Option<RawModel>>) -> Option<Vec<ModelSpec>> {
    let mut complete = true;
    let mut first_at: HashMap<String, String> = HashMap::new();
    let mut models = Vec::with_capacity(raw.len());
    for (i, model) in raw.into_iter().enumerate() {
        let Some(model) = model else {
            complete = false; // Its serde error is already reported.
            continue;
        };
        let base = format!("models[{i}]");
        let name_path = format!("{base}.name");
        if model.name.is_empty() {
            c.report(name_path.clone(), "name must not be empty".to_owned());
            complete = false;
        } else if let Some(first) = first_at.get(&model.name) {
            let line = c
                .line_of(first)
                .map_or_else(String::new, |l| format!(" (line {l})"));
            let message = format!(
                "duplicate model name {:?}; first defined at {first}{line}",
                model.name
            );
            c.report(name_path.clone(), message);
            complete = false;
        } else {
            first_at.insert(model.name.clone(), name_path);
        }
        let max_context_tokens =
            c.positive_u32(&base, "max_context_tokens", model.max_context_tokens);
        let model_has_path = model.path.is_some();
        let path = model
            .path
            .and_then(|path| c.file_path(format!("{base}.path"), "path", path));
        if path.is_none() && model_has_path {
            complete = false;
        }
        if model.chat_template.is_some() && path.is_none() {
            c.report(
                format!("{base}.chat_template"),
                "chat_template needs a checkpoint `path` (the built-in model has its own template)"
                    .to_owned(),
            );
            complete = false;
        }
        match max_context_tokens {
            Some(max_context_tokens) => models.push(ModelSpec {
                name: model.name,
                backend: model.backend,
                max_context_tokens,
                path,
                chat_template: model.chat_template,
            }),
            None => complete = false,
        }
    }
    complete.then_some(models)
}
