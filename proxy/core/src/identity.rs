//! Authentication: which tenant sent a request.
//!
//! A request's tenant comes from its client certificate alone: the SPIFFE id
//! `spiffe://<trust-domain>/tenant/<id>` in the `SubjectAltName`
//! ([`tenant_from_certificate`]). An API key, when present, must belong to
//! that same tenant: it can narrow the identity (prove a second factor,
//! name the key used), never change it ([`ApiKeyRegistry::authenticate`]).

mod api_key;
mod spiffe;
mod trust_domain;

pub use self::{
    api_key::{
        ApiKeyHash, ApiKeyHashError, ApiKeyId, ApiKeyRegistry, ApiKeyRegistryError, TenantApiKeys,
    },
    spiffe::tenant_from_certificate,
    trust_domain::{MAX_TRUST_DOMAIN_LEN, TrustDomain, TrustDomainError},
};

use crate::{TenantId, TenantIdError};

/// An authenticated request's identity: its tenant, and the API key it presented, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    tenant: TenantId,
    api_key: Option<ApiKeyId>,
}

impl Identity {
    fn new(tenant: TenantId, api_key: Option<ApiKeyId>) -> Self {
        Self { tenant, api_key }
    }

    /// The tenant, from the client certificate.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The non-secret id of the API key presented, if one was.
    pub fn api_key(&self) -> Option<ApiKeyId> {
        self.api_key
    }
}

/// Why a request could not be attributed to a tenant.
///
/// Messages quote certificate contents with `{:?}` (escaped, at most 256
/// bytes each) so they are safe to log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The client certificate is not a well-formed DER X.509 certificate.
    #[error("client certificate is not valid DER X.509: {0}")]
    BadCertificate(String),
    /// The client certificate has no `SubjectAltName` extension.
    #[error("client certificate has no SubjectAltName extension")]
    NoSubjectAltName,
    /// No `SubjectAltName` is a SPIFFE id (a `spiffe://` URI).
    #[error("client certificate has no SPIFFE id (a `spiffe://` URI SubjectAltName)")]
    NoSpiffeId,
    /// Several `SubjectAltName`s are SPIFFE ids; an SVID carries exactly one.
    #[error(
        "client certificate carries {} SPIFFE ids ({:?}); it must carry exactly one",
        .0.len(),
        .0
    )]
    SeveralSpiffeIds(Vec<String>),
    /// The SPIFFE id belongs to a trust domain this proxy does not serve.
    #[error("SPIFFE id {id:?} is of trust domain {found:?}; this proxy serves {expected}")]
    ForeignTrustDomain {
        /// The SPIFFE id.
        id: String,
        /// Its trust domain.
        found: String,
        /// The trust domain served.
        expected: TrustDomain,
    },
    /// The SPIFFE id does not follow the grammar `spiffe://<domain>/tenant/<id>`.
    #[error("SPIFFE id {id:?} is malformed: {reason}")]
    MalformedSpiffeId {
        /// The SPIFFE id.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The SPIFFE id is of our trust domain but names a workload, not a tenant.
    #[error("SPIFFE id {id:?} does not name a tenant (spiffe://<domain>/tenant/<id>)")]
    NotATenant {
        /// The SPIFFE id.
        id: String,
    },
    /// The tenant segment of the SPIFFE id is not a valid tenant id.
    #[error("SPIFFE id {id:?} names an invalid tenant id: {source}")]
    InvalidTenantId {
        /// The SPIFFE id.
        id: String,
        /// Why the tenant id is invalid.
        source: TenantIdError,
    },
    /// The tenant requires an API key and the request has none.
    #[error("tenant {tenant} requires an API key and the request carries none")]
    MissingApiKey {
        /// The certificate's tenant.
        tenant: TenantId,
    },
    /// The request's API key is not any tenant's.
    #[error("the API key presented for tenant {tenant} is not valid")]
    UnknownApiKey {
        /// The certificate's tenant.
        tenant: TenantId,
    },
    /// The request's API key is valid but belongs to another tenant than the certificate's.
    #[error(
        "API key {key_id} does not belong to tenant {cert_tenant}; an API key can narrow, never change, the certificate's identity"
    )]
    ForeignApiKey {
        /// The certificate's tenant (the request's identity).
        cert_tenant: TenantId,
        /// The key's non-secret id.
        key_id: ApiKeyId,
        /// The tenant the key belongs to: for the audit log, not for the client.
        key_owner: TenantId,
    },
}

impl IdentityError {
    /// The HTTP status to answer with: 403 for a valid key of another tenant, 401 otherwise.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::ForeignApiKey { .. } => 403,
            Self::BadCertificate(_)
            | Self::NoSubjectAltName
            | Self::NoSpiffeId
            | Self::SeveralSpiffeIds(_)
            | Self::ForeignTrustDomain { .. }
            | Self::MalformedSpiffeId { .. }
            | Self::NotATenant { .. }
            | Self::InvalidTenantId { .. }
            | Self::MissingApiKey { .. }
            | Self::UnknownApiKey { .. } => 401,
        }
    }
}
