//! Validation of `[[tenants]]`: each tenant's limits, and what must hold across tenants.

use super::raw::{RawKernel, RawTenant};
use super::validate::Checker;
use super::{Cluster, KernelLimits, MAX_PACKET_BYTES, MIN_REQUESTS_PER_SECOND, TenantPolicy};
use crate::TenantId;
use crate::identity::ApiKeyHash;
use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// What tenants are checked against; `None` where that section is itself broken.
pub(super) struct Context<'a> {
    /// `kv.pool_blocks`, the ceiling of every `kv_block_quota`.
    pub pool_blocks: Option<u32>,
    /// Names of all `[[models]]`, for `allowed_models`.
    pub model_names: Option<&'a [String]>,
    /// This host's share of the fleet-wide limits.
    pub cluster: &'a Cluster,
}

/// Where an id or a key digest was first seen.
struct FirstSeen {
    /// Index of the tenant in `[[tenants]]`.
    tenant: usize,
    /// The tenant's id as written.
    id: String,
    /// Key path of the first occurrence.
    path: String,
}

/// Ids and key digests seen so far, to report the second occurrence of each.
#[derive(Default)]
struct Seen {
    ids: HashMap<TenantId, String>,
    keys: HashMap<ApiKeyHash, FirstSeen>,
}

/// Validates every tenant; `None` if any is wrong.
pub(super) fn tenants(
    c: &mut Checker<'_>,
    raw: Vec<Option<RawTenant>>,
    cx: &Context<'_>,
) -> Option<Vec<TenantPolicy>> {
    let mut seen = Seen::default();
    let mut complete = true;
    let mut policies = Vec::with_capacity(raw.len());
    for (i, tenant) in raw.into_iter().enumerate() {
        // A tenant that failed to deserialize has its serde error reported already.
        match tenant.and_then(|t| policy(c, i, t, cx, &mut seen)) {
            Some(policy) => policies.push(policy),
            None => complete = false,
        }
    }
    complete.then_some(policies)
}

fn policy(
    c: &mut Checker<'_>,
    i: usize,
    raw: RawTenant,
    cx: &Context<'_>,
    seen: &mut Seen,
) -> Option<TenantPolicy> {
    let base = format!("tenants[{i}]");
    let base = base.as_str();
    let id = tenant_id(c, base, &raw.id, seen);
    let weight = c.positive_u32(base, "weight", raw.weight);
    let allowed_models = allowed_models(c, base, raw.allowed_models, cx);
    let max_tokens = c.positive_u32(base, "max_tokens_per_request", raw.max_tokens_per_request);
    let max_prompt_bytes = c.positive_u64(base, "max_prompt_bytes", raw.max_prompt_bytes);
    let split = cx.cluster;
    let requests_per_second = requests_per_second(c, base, raw.requests_per_second, split);
    let request_burst = c
        .positive_u32(base, "request_burst", raw.request_burst)
        .map(|b| split.split_u32(b));
    let tokens_per_minute = c
        .positive_u64(base, "tokens_per_minute", raw.tokens_per_minute)
        .map(|t| split.split(t));
    let tokens_fit = match (max_tokens, tokens_per_minute) {
        (Some(max), Some(per_minute)) if u64::from(max) > per_minute => {
            let budget = if split.host_share < 1.0 {
                format!(
                    "this host's share of tokens_per_minute ({} x cluster.host_share {} = {per_minute})",
                    raw.tokens_per_minute, split.host_share
                )
            } else {
                format!("tokens_per_minute ({per_minute})")
            };
            c.report(
                format!("{base}.max_tokens_per_request"),
                format!(
                    "max_tokens_per_request ({max}) exceeds {budget}; \
                     a request that large could never be admitted"
                ),
            );
            false
        }
        _ => true,
    };
    let max_concurrent = c
        .positive_u32(base, "max_concurrent_requests", raw.max_concurrent_requests)
        .map(|n| split.split_u32(n));
    let max_queued = c
        .positive_u32(base, "max_queued_requests", raw.max_queued_requests)
        .map(|n| split.split_u32(n));
    let kv_block_quota = kv_block_quota(c, base, raw.kv_block_quota, cx.pool_blocks);
    let kernel = kernel_limits(c, base, &raw.kernel).map(|k| KernelLimits {
        packets_per_second: split.split(k.packets_per_second),
        packet_burst: split.split(k.packet_burst),
        bytes_per_second: split.split(k.bytes_per_second),
        // Still room for one packet of the largest size.
        byte_burst: split.split(k.byte_burst).max(MAX_PACKET_BYTES),
    });
    let api_key_sha256 = api_keys(c, base, i, &raw.id, &raw.api_key_sha256, seen);
    Some(TenantPolicy {
        id: id?,
        weight: weight?,
        tier: raw.tier,
        allowed_models: allowed_models?,
        max_tokens_per_request: max_tokens.filter(|_| tokens_fit)?,
        max_prompt_bytes: max_prompt_bytes?,
        requests_per_second: requests_per_second?,
        request_burst: request_burst?,
        tokens_per_minute: tokens_per_minute?,
        max_concurrent_requests: max_concurrent?,
        max_queued_requests: max_queued?,
        kv_block_quota: kv_block_quota?,
        isolation: raw.isolation,
        kernel: kernel?,
        api_key_sha256: api_key_sha256?,
    })
}

fn tenant_id(c: &mut Checker<'_>, base: &str, raw: &str, seen: &mut Seen) -> Option<TenantId> {
    let path = format!("{base}.id");
    let id = match TenantId::new(raw) {
        Ok(id) => id,
        Err(e) => {
            c.report(path, format!("invalid tenant id {raw:?}: {e}"));
            return None;
        }
    };
    match seen.ids.entry(id.clone()) {
        Entry::Occupied(first) => {
            let first = first.get();
            let line = c
                .line_of(first)
                .map_or_else(String::new, |l| format!(" (line {l})"));
            c.report(
                path,
                format!("duplicate tenant id \"{id}\"; first defined at {first}{line}"),
            );
            None
        }
        Entry::Vacant(slot) => {
            slot.insert(path);
            Some(id)
        }
    }
}

fn allowed_models(
    c: &mut Checker<'_>,
    base: &str,
    models: Vec<String>,
    cx: &Context<'_>,
) -> Option<Vec<String>> {
    if models.is_empty() {
        c.report(
            format!("{base}.allowed_models"),
            "allowed_models must name at least one model".to_owned(),
        );
        return None;
    }
    let mut ok = true;
    for (j, model) in models.iter().enumerate() {
        let path = format!("{base}.allowed_models[{j}]");
        if models[..j].contains(model) {
            c.report(path, format!("model {model:?} is listed twice"));
            ok = false;
        } else if let Some(names) = cx.model_names
            && !names.contains(model)
        {
            let defined = names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            c.report(
                path,
                format!("unknown model {model:?}; defined models: {defined}"),
            );
            ok = false;
        }
    }
    ok.then_some(models)
}

/// The rate as written, checked, then this host's share of it.
fn requests_per_second(
    c: &mut Checker<'_>,
    base: &str,
    value: f64,
    cluster: &Cluster,
) -> Option<f64> {
    let path = format!("{base}.requests_per_second");
    if !value.is_finite() || value <= 0.0 {
        c.report(
            path,
            format!("requests_per_second must be a finite number greater than 0, got {value}"),
        );
        None
    } else if value < MIN_REQUESTS_PER_SECOND {
        c.report(
            path,
            format!("requests_per_second must be at least {MIN_REQUESTS_PER_SECOND}, got {value}"),
        );
        None
    } else if value * cluster.host_share < MIN_REQUESTS_PER_SECOND {
        let share = cluster.host_share;
        let here = value * share;
        c.report(
            path,
            format!(
                "this host's share of requests_per_second ({value} x cluster.host_share \
                 {share} = {here}) is below the minimum {MIN_REQUESTS_PER_SECOND}"
            ),
        );
        None
    } else {
        Some(value * cluster.host_share)
    }
}

fn kv_block_quota(c: &mut Checker<'_>, base: &str, value: i64, pool: Option<u32>) -> Option<u32> {
    let quota = c.positive_u32(base, "kv_block_quota", value)?;
    match pool {
        Some(pool) if quota > pool => {
            c.report(
                format!("{base}.kv_block_quota"),
                format!("kv_block_quota must be at most kv.pool_blocks ({pool}), got {quota}"),
            );
            None
        }
        _ => Some(quota),
    }
}

fn kernel_limits(c: &mut Checker<'_>, base: &str, raw: &RawKernel) -> Option<KernelLimits> {
    let base = format!("{base}.kernel");
    let base = base.as_str();
    let packets_per_second = c.positive_u64(base, "packets_per_second", raw.packets_per_second);
    let packet_burst = c.positive_u64(base, "packet_burst", raw.packet_burst);
    let bytes_per_second = c.positive_u64(base, "bytes_per_second", raw.bytes_per_second);
    let byte_burst = c
        .positive_u64(base, "byte_burst", raw.byte_burst)
        .filter(|&burst| {
            let fits = burst >= MAX_PACKET_BYTES;
            if !fits {
                c.report(
                    format!("{base}.byte_burst"),
                    format!(
                        "byte_burst must be at least {MAX_PACKET_BYTES} \
                         (one packet of the largest size), got {burst}"
                    ),
                );
            }
            fits
        });
    Some(KernelLimits {
        packets_per_second: packets_per_second?,
        packet_burst: packet_burst?,
        bytes_per_second: bytes_per_second?,
        byte_burst: byte_burst?,
    })
}

/// Parses the tenant's key digests; a digest may name one tenant, once.
fn api_keys(
    c: &mut Checker<'_>,
    base: &str,
    tenant: usize,
    id: &str,
    digests: &[String],
    seen: &mut Seen,
) -> Option<Vec<ApiKeyHash>> {
    let mut ok = true;
    let mut parsed = Vec::with_capacity(digests.len());
    for (j, text) in digests.iter().enumerate() {
        let path = format!("{base}.api_key_sha256[{j}]");
        let Ok(digest) = ApiKeyHash::from_hex(text) else {
            let message = match text.chars().find(|ch| !ch.is_ascii_hexdigit()) {
                Some(bad) => format!("API key digest must be hex digits only, found {bad:?}"),
                None => format!(
                    "API key digest must be 64 hex digits (a SHA-256 digest), got {} digits",
                    text.len()
                ),
            };
            c.report(path, message);
            ok = false;
            continue;
        };
        match seen.keys.entry(digest) {
            Entry::Occupied(first) => {
                let first = first.get();
                let line = c
                    .line_of(&first.path)
                    .map_or_else(String::new, |l| format!(", line {l}"));
                let message = if first.tenant == tenant {
                    format!(
                        "API key digest is listed twice (first at {}{line})",
                        first.path
                    )
                } else {
                    format!(
                        "API key digest is already assigned to tenant {:?} ({}{line}); \
                         a key must name exactly one tenant",
                        first.id, first.path
                    )
                };
                c.report(path, message);
                ok = false;
            }
            Entry::Vacant(slot) => {
                slot.insert(FirstSeen {
                    tenant,
                    id: id.to_owned(),
                    path,
                });
                parsed.push(digest);
            }
        }
    }
    ok.then_some(parsed)
}
