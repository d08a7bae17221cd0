//! Tenant identifiers and the small policy enums every layer shares.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// Longest tenant id accepted, in bytes (fits a DNS label and a SPIFFE path segment).
pub const MAX_TENANT_ID_LEN: usize = 63;

/// A validated tenant identifier: 1–63 bytes of `[a-z0-9-]`, starting with a
/// letter or digit and not ending with `-`.
///
/// The same string names the tenant in the config, in the client
/// certificate's SPIFFE id (`spiffe://<domain>/tenant/<id>`), in the kernel
/// maps (through a numeric index assigned by the proxy) and in audit records.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(Arc<str>);

/// Why a string is not a valid [`TenantId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TenantIdError {
    /// The string is empty.
    #[error("tenant id is empty")]
    Empty,
    /// The string is longer than [`MAX_TENANT_ID_LEN`].
    #[error("tenant id is {0} bytes long; the limit is {MAX_TENANT_ID_LEN}")]
    TooLong(usize),
    /// The string holds a character outside `[a-z0-9-]`.
    #[error("tenant id contains {0:?}; only lowercase letters, digits and '-' are allowed")]
    BadChar(char),
    /// The string starts or ends with `-`.
    #[error("tenant id must start and end with a letter or digit")]
    BadEdge,
}

impl TenantId {
    /// Parses and validates a tenant id.
    pub fn new(s: &str) -> Result<Self, TenantIdError> {
        if s.is_empty() {
            return Err(TenantIdError::Empty);
        }
        if s.len() > MAX_TENANT_ID_LEN {
            return Err(TenantIdError::TooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(TenantIdError::BadChar(c));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(TenantIdError::BadEdge);
        }
        Ok(Self(Arc::from(s)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = TenantIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> Self {
        t.0.to_string()
    }
}

impl std::str::FromStr for TenantId {
    type Err = TenantIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", &self.0)
    }
}

/// How strongly a tenant is separated from others on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationLevel {
    /// Shares worker processes and GPUs with other tenants; the KV guard separates them.
    #[default]
    Shared,
    /// Has worker processes of its own on a shared GPU.
    Process,
    /// Has a MIG slice of its own.
    Mig,
    /// Has whole GPUs of its own.
    Dedicated,
}

/// Service tier: orders tenants for operators and reports; fairness comes from weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Best effort.
    Free,
    /// The default tier.
    #[default]
    Standard,
    /// Paid priority support and larger default limits.
    Premium,
    /// Contracted capacity.
    Enterprise,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_label_like_ids() {
        for ok in ["a", "acme", "team-7", "0abc", &"x".repeat(63)] {
            assert_eq!(TenantId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_malformed_ids_with_the_reason() {
        assert_eq!(TenantId::new(""), Err(TenantIdError::Empty));
        assert_eq!(
            TenantId::new(&"x".repeat(64)),
            Err(TenantIdError::TooLong(64))
        );
        assert_eq!(TenantId::new("Acme"), Err(TenantIdError::BadChar('A')));
        assert_eq!(TenantId::new("a/b"), Err(TenantIdError::BadChar('/')));
        assert_eq!(TenantId::new("a_b"), Err(TenantIdError::BadChar('_')));
        assert_eq!(TenantId::new("-a"), Err(TenantIdError::BadEdge));
        assert_eq!(TenantId::new("a-"), Err(TenantIdError::BadEdge));
    }

    #[test]
    fn deserializes_through_validation() {
        let t: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(t.as_str(), "acme");
        assert!(serde_json::from_str::<TenantId>("\"ACME\"").is_err());
    }
}
