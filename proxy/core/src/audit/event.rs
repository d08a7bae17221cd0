//! What an audit record says: [`AuditEvent`] and the partition it belongs to.

use crate::TenantId;
use crate::wire::{RequestId, ViolationKind};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

/// The name of the partition for host-level events that have no tenant.
const HOST: &str = "_host";

/// A partition of the audit log: one tenant's, or the host's (`_host`).
///
/// Tenant ids are `[a-z0-9-]`, so `_host` can never be a tenant's.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PartitionId(Arc<str>);

/// Why a string names no partition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` is neither a tenant id nor `_host`: {reason}")]
pub struct PartitionIdError {
    name: String,
    reason: crate::TenantIdError,
}

impl PartitionId {
    /// The partition of `tenant`.
    pub fn tenant(tenant: &TenantId) -> Self {
        Self(Arc::from(tenant.as_str()))
    }

    /// The host partition, for events with no tenant.
    pub fn host() -> Self {
        Self(Arc::from(HOST))
    }

    /// Parses `_host` or a tenant id.
    pub fn parse(s: &str) -> Result<Self, PartitionIdError> {
        if s == HOST {
            return Ok(Self::host());
        }
        TenantId::new(s)
            .map(|t| Self::tenant(&t))
            .map_err(|reason| PartitionIdError {
                name: s.chars().take(80).collect(),
                reason,
            })
    }

    /// The partition's name (its directory name).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the host partition.
    pub fn is_host(&self) -> bool {
        &*self.0 == HOST
    }
}

impl TryFrom<String> for PartitionId {
    type Error = PartitionIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<PartitionId> for String {
    fn from(p: PartitionId) -> Self {
        p.0.to_string()
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartitionId({})", self.0)
    }
}

/// A keyed digest of content (a prompt or a completion): HMAC-SHA-256 under
/// the tenant's digest key. Shown as 64 hex digits in JSON.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ContentDigest(pub [u8; 32]);

impl fmt::Display for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentDigest({self})")
    }
}

impl Serialize for ContentDigest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(self.0))
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for ContentDigest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            let mut out = [0; 32];
            hex::decode_to_slice(&s, &mut out)
                .map_err(|_| serde::de::Error::custom("a content digest is 64 hex digits"))?;
            Ok(Self(out))
        } else {
            <[u8; 32]>::deserialize(d).map(Self)
        }
    }
}

/// Request ids as 32 hex digits in JSON (a u128 does not survive JSON
/// numbers), as a u128 in postcard.
mod request_id_hex {
    use super::RequestId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(id: &RequestId, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(id)
        } else {
            id.serialize(s)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<RequestId, D::Error> {
        if d.is_human_readable() {
            String::deserialize(d)?
                .parse()
                .map_err(serde::de::Error::custom)
        } else {
            RequestId::deserialize(d)
        }
    }
}

/// One audit event, with the wall-clock time it happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When it happened: nanoseconds since the Unix epoch (the caller's clock).
    pub time_unix_ns: u64,
    /// What happened.
    pub kind: EventKind,
}

/// What an audit event records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// An admitted request, once it finished (however it finished).
    Request(RequestEvent),
    /// Packets the kernel dropped for a source over a window (aggregated).
    KernelDrops(KernelDrops),
    /// A KV guard violation a worker reported.
    GuardViolation(GuardViolation),
    /// A connection refused before any request (bad certificate, unknown tenant).
    ConnectionRefused(ConnectionRefused),
    /// The writer found this partition's last segment cut short by a crash.
    Recovered(Recovered),
}

impl EventKind {
    /// The kind's name in JSON (`"type"`) and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Request(_) => "request",
            Self::KernelDrops(_) => "kernel_drops",
            Self::GuardViolation(_) => "guard_violation",
            Self::ConnectionRefused(_) => "connection_refused",
            Self::Recovered(_) => "recovered",
        }
    }
}

/// An admitted request's record. Content is never stored: only keyed digests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEvent {
    /// The request's random 128-bit id.
    #[serde(with = "request_id_hex")]
    pub request_id: RequestId,
    /// The tenant, from the client certificate.
    pub tenant: TenantId,
    /// The model the request named.
    pub model: String,
    /// HMAC-SHA-256 of the prompt under the tenant's digest key.
    pub prompt_digest: ContentDigest,
    /// HMAC-SHA-256 of the completion under the tenant's digest key.
    pub response_digest: ContentDigest,
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Completion tokens.
    pub output_tokens: u32,
    /// Time to first token in microseconds (none if no token came).
    pub ttft_us: Option<u64>,
    /// Time from admission to the last byte, in microseconds.
    pub latency_us: u64,
    /// The worker that served it (none if it never reached one).
    pub worker: Option<u32>,
    /// Whether it was routed to another worker than the first chosen (retry, failover).
    pub rerouted: bool,
    /// Whether its prompt hit the tenant's prefix cache.
    pub cache_hit: bool,
    /// The HTTP status returned.
    pub status: u16,
    /// The API error code when it failed (`rate_limited`, `worker_failed`, ...).
    pub error_code: Option<String>,
    /// The client's address.
    pub source: Option<SocketAddr>,
    /// The first characters of the API key used (its public prefix), if any.
    pub api_key_prefix: Option<String>,
}

impl RequestEvent {
    /// Whether the request succeeded (a 2xx status and no error code).
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status) && self.error_code.is_none()
    }
}

/// Kernel drops for one tenant (or unmapped sources) over a window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDrops {
    /// The tenant the dropped packets were mapped to; none for unmapped sources.
    pub tenant: Option<TenantId>,
    /// Start of the aggregation window (Unix ns).
    pub window_start_unix_ns: u64,
    /// End of the aggregation window (Unix ns).
    pub window_end_unix_ns: u64,
    /// Packets dropped in the window.
    pub packets: u64,
    /// Bytes dropped in the window.
    pub bytes: u64,
    /// Kernel ring-buffer events the window aggregates.
    pub events: u64,
}

/// A KV guard violation: a kernel refused an access and failed closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardViolation {
    /// The tenant whose sequence made the access.
    pub tenant: TenantId,
    /// The request that made it.
    #[serde(with = "request_id_hex")]
    pub request_id: RequestId,
    /// The worker that reported it.
    pub worker: u32,
    /// What kind of access was refused.
    pub kind: ViolationKind,
    /// The KV block involved.
    pub block: u32,
    /// The worker's context line (never another tenant's data).
    pub detail: String,
}

impl GuardViolation {
    /// The record of a worker's [`crate::wire::Violation`].
    pub fn from_wire(violation: &crate::wire::Violation, worker: u32) -> Self {
        Self {
            tenant: violation.tenant.clone(),
            request_id: violation.request_id,
            worker,
            kind: violation.kind,
            block: violation.block,
            detail: violation.detail.clone(),
        }
    }
}

/// A connection refused before it carried a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRefused {
    /// The tenant its certificate named, when it named a known one.
    pub tenant: Option<TenantId>,
    /// The client's address.
    pub source: Option<SocketAddr>,
    /// Why it was refused (never a secret).
    pub reason: String,
}

/// A crash cut this partition's last segment; the chain continues after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    /// The segment whose tail was examined.
    pub segment: u32,
    /// Bytes of a torn last record cut off the end of that segment.
    pub cut_bytes: u64,
    /// Bytes after the last valid record that were not a clean torn tail
    /// (damage, not a crash): left in place for `verify` to report.
    pub damaged_bytes: u64,
}

impl AuditEvent {
    /// The partition the event belongs to: its tenant's, else `_host`.
    ///
    /// [`EventKind::Recovered`] is written by the writer into the partition
    /// it recovered; one submitted from outside lands in `_host`.
    pub fn partition(&self) -> PartitionId {
        let tenant = match &self.kind {
            EventKind::Request(r) => Some(&r.tenant),
            EventKind::GuardViolation(v) => Some(&v.tenant),
            EventKind::KernelDrops(d) => d.tenant.as_ref(),
            EventKind::ConnectionRefused(c) => c.tenant.as_ref(),
            EventKind::Recovered(_) => None,
        };
        tenant.map_or_else(PartitionId::host, PartitionId::tenant)
    }

    /// The event as one JSON object: `partition`, `seq`, `time` (RFC 3339),
    /// `time_unix_ns`, `type`, then the kind's own fields.
    pub fn to_json(&self, partition: &PartitionId, seq: u64) -> serde_json::Value {
        let body = match &self.kind {
            EventKind::Request(r) => serde_json::to_value(r),
            EventKind::KernelDrops(d) => serde_json::to_value(d),
            EventKind::GuardViolation(v) => serde_json::to_value(v),
            EventKind::ConnectionRefused(c) => serde_json::to_value(c),
            EventKind::Recovered(r) => serde_json::to_value(r),
        };
        let mut out = serde_json::Map::new();
        out.insert("partition".into(), partition.as_str().into());
        out.insert("seq".into(), seq.into());
        out.insert(
            "time".into(),
            super::format_rfc3339(self.time_unix_ns).into(),
        );
        out.insert("time_unix_ns".into(), self.time_unix_ns.into());
        out.insert("type".into(), self.kind.name().into());
        // Every field type here serializes to JSON (digests and ids as hex).
        if let Ok(serde_json::Value::Object(fields)) = body {
            out.extend(fields);
        }
        serde_json::Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestEvent {
        RequestEvent {
            request_id: RequestId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            tenant: TenantId::new("acme").unwrap(),
            model: "tiny".into(),
            prompt_digest: ContentDigest([7; 32]),
            response_digest: ContentDigest([9; 32]),
            input_tokens: 12,
            output_tokens: 34,
            ttft_us: Some(1_500),
            latency_us: 20_000,
            worker: Some(1),
            rerouted: false,
            cache_hit: true,
            status: 200,
            error_code: None,
            source: Some("127.0.0.1:4433".parse().unwrap()),
            api_key_prefix: Some("bk_live_".into()),
        }
    }

    #[test]
    fn partitions_follow_the_tenant_and_fall_back_to_host() {
        let event = AuditEvent {
            time_unix_ns: 1,
            kind: EventKind::Request(request()),
        };
        assert_eq!(event.partition().as_str(), "acme");
        let refused = AuditEvent {
            time_unix_ns: 1,
            kind: EventKind::ConnectionRefused(ConnectionRefused {
                tenant: None,
                source: None,
                reason: "unknown CA".into(),
            }),
        };
        assert!(refused.partition().is_host());
        assert!(PartitionId::parse("_host").unwrap().is_host());
        assert!(PartitionId::parse("_other").is_err());
        assert!(PartitionId::parse("../etc").is_err());
    }

    #[test]
    fn json_shows_ids_and_digests_as_hex_and_postcard_round_trips() {
        let event = AuditEvent {
            time_unix_ns: 1_700_000_000_000_000_000,
            kind: EventKind::Request(request()),
        };
        let json = event.to_json(&event.partition(), 7);
        assert_eq!(json["type"], "request");
        assert_eq!(json["seq"], 7);
        assert_eq!(json["request_id"], "0123456789abcdef0123456789abcdef");
        assert_eq!(json["prompt_digest"], hex::encode([7u8; 32]));
        assert_eq!(json["time"], "2023-11-14T22:13:20Z");
        let bytes = postcard::to_allocvec(&event).unwrap();
        assert_eq!(postcard::from_bytes::<AuditEvent>(&bytes).unwrap(), event);
        let back: RequestEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, request());
    }
}
