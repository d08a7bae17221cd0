//! [`TrustDomain`]: the SPIFFE trust domain whose tenants this proxy serves.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// Longest trust domain accepted, in bytes (the SPIFFE limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A validated SPIFFE trust domain: 1–255 bytes of `[a-z0-9._-]`.
///
/// Lowercase only: SPIFFE ids are compared byte for byte, so an uppercase
/// trust domain could never match one and is refused up front.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(Arc<str>);

/// Why a string is not a valid [`TrustDomain`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrustDomainError {
    /// The string is empty.
    #[error("trust domain is empty")]
    Empty,
    /// The string is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is {0} bytes long; the limit is {MAX_TRUST_DOMAIN_LEN}")]
    TooLong(usize),
    /// The string holds a character outside `[a-z0-9._-]`.
    #[error(
        "trust domain contains {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    BadChar(char),
}

impl TrustDomain {
    /// Parses and validates a trust domain (`example.org`, not `spiffe://example.org`).
    pub fn new(s: &str) -> Result<Self, TrustDomainError> {
        validate(s)?;
        Ok(Self(Arc::from(s)))
    }

    /// The trust domain as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks `s` against the trust domain grammar without allocating.
pub(super) fn validate(s: &str) -> Result<(), TrustDomainError> {
    if s.is_empty() {
        return Err(TrustDomainError::Empty);
    }
    if s.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(TrustDomainError::TooLong(s.len()));
    }
    match s
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(TrustDomainError::BadChar(c)),
        None => Ok(()),
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = TrustDomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<TrustDomain> for String {
    fn from(d: TrustDomain) -> Self {
        d.0.to_string()
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = TrustDomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_lowercase_dns_like_names() {
        for ok in ["example.org", "prod_1", "a-b.c", &"x".repeat(255)] {
            assert_eq!(TrustDomain::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_everything_else_with_the_reason() {
        assert_eq!(TrustDomain::new(""), Err(TrustDomainError::Empty));
        assert_eq!(
            TrustDomain::new(&"x".repeat(256)),
            Err(TrustDomainError::TooLong(256))
        );
        assert_eq!(
            TrustDomain::new("Example.org"),
            Err(TrustDomainError::BadChar('E'))
        );
        assert_eq!(
            TrustDomain::new("example.org:443"),
            Err(TrustDomainError::BadChar(':'))
        );
        assert_eq!(
            TrustDomain::new("spiffe://example.org"),
            Err(TrustDomainError::BadChar(':'))
        );
        assert!(serde_json::from_str::<TrustDomain>("\"EXAMPLE\"").is_err());
    }
}
