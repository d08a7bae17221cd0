//! API keys: an optional second credential that can only narrow a certificate's identity.
//!
//! Keys are stored as SHA-256 digests ([`ApiKeyHash`]), never in the clear.
//! Bulkhead issues keys with at least 128 bits of entropy, so an unsalted
//! fast hash is enough: a stolen registry gives nothing to brute-force.

use super::{Identity, IdentityError};
use crate::TenantId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use subtle::{Choice, ConstantTimeEq};

/// The SHA-256 digest of an API key: what the registry stores and compares.
#[derive(Clone, Copy, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ApiKeyHash([u8; 32]);

/// A non-secret name for an API key, for logs and audit: the first 4 bytes
/// (8 hex digits) of its [`ApiKeyHash`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApiKeyId([u8; 4]);

/// Why a string is not an [`ApiKeyHash`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("an API key hash is 64 hex digits (a SHA-256 digest): {0}")]
pub struct ApiKeyHashError(#[from] hex::FromHexError);

impl ApiKeyHash {
    /// The digest of `key`, as presented in an `Authorization: Bearer` header.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses a digest written as 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Result<Self, ApiKeyHashError> {
        let mut digest = [0; 32];
        hex::decode_to_slice(hex, &mut digest)?;
        Ok(Self(digest))
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The key's non-secret id.
    pub fn key_id(&self) -> ApiKeyId {
        ApiKeyId([self.0[0], self.0[1], self.0[2], self.0[3]])
    }
}

impl ConstantTimeEq for ApiKeyHash {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.0[..].ct_eq(&other.0[..])
    }
}

/// Constant-time, like [`ConstantTimeEq`], so no code path compares digests by bytes.
impl PartialEq for ApiKeyHash {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

/// Hashes the digest bytes, as equality compares them.
impl std::hash::Hash for ApiKeyHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// Prints the key id only: enough to tell keys apart in a log.
impl fmt::Debug for ApiKeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyHash({}…)", self.key_id())
    }
}

impl TryFrom<String> for ApiKeyHash {
    type Error = ApiKeyHashError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::from_hex(&s)
    }
}

impl From<ApiKeyHash> for String {
    fn from(h: ApiKeyHash) -> Self {
        h.to_hex()
    }
}

impl fmt::Display for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeyId({self})")
    }
}

/// One tenant's entry in an [`ApiKeyRegistry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantApiKeys {
    /// The tenant.
    pub tenant: TenantId,
    /// Digests of the tenant's valid keys (several during a rotation).
    pub keys: Vec<ApiKeyHash>,
    /// Whether a request of this tenant must carry one of its keys.
    pub require_api_key: bool,
}

/// Why an [`ApiKeyRegistry`] cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyRegistryError {
    /// The same key digest is listed under two tenants.
    #[error("API key {key_id} is listed under both tenant {first} and tenant {second}")]
    KeyUnderTwoTenants {
        /// The key.
        key_id: ApiKeyId,
        /// The tenant listed first.
        first: TenantId,
        /// The tenant listed second.
        second: TenantId,
    },
    /// A tenant has two entries.
    #[error("tenant {0} is listed twice")]
    TenantListedTwice(TenantId),
    /// A tenant requires a key but has none: none of its requests could pass.
    #[error("tenant {0} requires an API key but has none")]
    RequiredKeyMissing(TenantId),
}

#[derive(Clone, Debug)]
struct TenantKeys {
    keys: Vec<ApiKeyHash>,
    require_api_key: bool,
}

/// Every tenant's API key digests, and which tenants must present one.
#[derive(Clone, Debug, Default)]
pub struct ApiKeyRegistry {
    tenants: HashMap<TenantId, TenantKeys>,
    owners: HashMap<ApiKeyHash, TenantId>,
}

impl ApiKeyRegistry {
    /// Builds the registry; a digest may belong to one tenant only.
    pub fn new(
        entries: impl IntoIterator<Item = TenantApiKeys>,
    ) -> Result<Self, ApiKeyRegistryError> {
        let mut registry = Self::default();
        for TenantApiKeys {
            tenant,
            mut keys,
            require_api_key,
        } in entries
        {
            if require_api_key && keys.is_empty() {
                return Err(ApiKeyRegistryError::RequiredKeyMissing(tenant));
            }
            keys.sort_unstable_by_key(|k| k.0);
            keys.dedup();
            for key in &keys {
                if let Some(first) = registry.owners.insert(*key, tenant.clone()) {
                    return Err(ApiKeyRegistryError::KeyUnderTwoTenants {
                        key_id: key.key_id(),
                        second: tenant,
                        first,
                    });
                }
            }
            match registry.tenants.entry(tenant) {
                Entry::Occupied(e) => {
                    return Err(ApiKeyRegistryError::TenantListedTwice(e.key().clone()));
                }
                Entry::Vacant(e) => {
                    e.insert(TenantKeys {
                        keys,
                        require_api_key,
                    });
                }
            }
        }
        Ok(registry)
    }

    /// Whether `tenant` must present an API key.
    pub fn requires_api_key(&self, tenant: &TenantId) -> bool {
        self.tenants.get(tenant).is_some_and(|t| t.require_api_key)
    }

    /// The identity of a request from `cert_tenant` (from its client
    /// certificate) carrying the bearer key `bearer`, if any.
    ///
    /// The key can only narrow the identity, never change it: a key of
    /// another tenant is refused ([`IdentityError::ForeignApiKey`]), even
    /// though it is valid. A tenant missing from the registry has no keys and
    /// requires none; whether it exists at all is the tenant table's call.
    pub fn authenticate(
        &self,
        cert_tenant: &TenantId,
        bearer: Option<&str>,
    ) -> Result<Identity, IdentityError> {
        let entry = self.tenants.get(cert_tenant);
        let Some(key) = bearer else {
            if entry.is_some_and(|t| t.require_api_key) {
                return Err(IdentityError::MissingApiKey {
                    tenant: cert_tenant.clone(),
                });
            }
            return Ok(Identity::new(cert_tenant.clone(), None));
        };
        let presented = ApiKeyHash::of(key);
        // The decision for the certificate's tenant: compare against every one
        // of its digests, in constant time and without stopping at a match,
        // so the time taken says nothing about which key (or which prefix of
        // a digest) matched.
        let mut matched = Choice::from(0);
        for candidate in entry.map_or(&[][..], |t| &t.keys) {
            matched |= candidate.ct_eq(&presented);
        }
        if bool::from(matched) {
            return Ok(Identity::new(cert_tenant.clone(), Some(presented.key_id())));
        }
        // Refused; the map below only picks the error. A HashMap lookup is
        // not constant-time, but what it could leak is how the digest of the
        // attacker's own guess relates to stored digests, and SHA-256 is
        // preimage-resistant: knowing bytes of a stored digest brings no one
        // closer to a key. Which error we return (foreign or unknown) is
        // disclosed anyway.
        match self.owners.get(&presented) {
            Some(owner) => Err(IdentityError::ForeignApiKey {
                cert_tenant: cert_tenant.clone(),
                key_id: presented.key_id(),
                key_owner: owner.clone(),
            }),
            None => Err(IdentityError::UnknownApiKey {
                tenant: cert_tenant.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn registry() -> ApiKeyRegistry {
        ApiKeyRegistry::new([
            TenantApiKeys {
                tenant: t("acme"),
                keys: vec![ApiKeyHash::of("acme-old"), ApiKeyHash::of("acme-new")],
                require_api_key: false,
            },
            TenantApiKeys {
                tenant: t("globex"),
                keys: vec![ApiKeyHash::of("globex-key")],
                require_api_key: true,
            },
        ])
        .unwrap()
    }

    #[test]
    fn a_key_narrows_but_never_changes_the_identity() {
        let r = registry();
        let id = r.authenticate(&t("acme"), Some("acme-new")).unwrap();
        assert_eq!(id.tenant(), &t("acme"));
        assert_eq!(id.api_key(), Some(ApiKeyHash::of("acme-new").key_id()));
        assert_eq!(r.authenticate(&t("acme"), None).unwrap().api_key(), None);
        let err = r.authenticate(&t("acme"), Some("globex-key")).unwrap_err();
        assert!(matches!(
            &err,
            IdentityError::ForeignApiKey { cert_tenant, key_owner, .. }
                if *cert_tenant == t("acme") && *key_owner == t("globex")
        ));
        assert_eq!(err.http_status(), 403);
        assert!(!err.to_string().contains("globex"), "{err}");
    }

    #[test]
    fn unknown_and_missing_keys_are_unauthorized() {
        let r = registry();
        let err = r.authenticate(&t("acme"), Some("guess")).unwrap_err();
        assert_eq!(err, IdentityError::UnknownApiKey { tenant: t("acme") });
        assert_eq!(err.http_status(), 401);
        let err = r.authenticate(&t("globex"), None).unwrap_err();
        assert_eq!(
            err,
            IdentityError::MissingApiKey {
                tenant: t("globex")
            }
        );
        assert_eq!(err.http_status(), 401);
        assert!(r.authenticate(&t("globex"), Some("globex-key")).is_ok());
        // Not in the registry: no keys, none required, none accepted.
        assert!(r.authenticate(&t("initech"), None).is_ok());
        assert!(matches!(
            r.authenticate(&t("initech"), Some("acme-new")),
            Err(IdentityError::ForeignApiKey { .. })
        ));
    }

    #[test]
    fn refuses_a_key_under_two_tenants() {
        let err = ApiKeyRegistry::new([
            TenantApiKeys {
                tenant: t("a"),
                keys: vec![ApiKeyHash::of("k")],
                require_api_key: false,
            },
            TenantApiKeys {
                tenant: t("b"),
                keys: vec![ApiKeyHash::of("k")],
                require_api_key: false,
            },
        ])
        .unwrap_err();
        assert_eq!(
            err,
            ApiKeyRegistryError::KeyUnderTwoTenants {
                key_id: ApiKeyHash::of("k").key_id(),
                first: t("a"),
                second: t("b"),
            }
        );
        let twice = TenantApiKeys {
            tenant: t("a"),
            keys: vec![],
            require_api_key: false,
        };
        assert_eq!(
            ApiKeyRegistry::new([twice.clone(), twice]).unwrap_err(),
            ApiKeyRegistryError::TenantListedTwice(t("a"))
        );
        assert_eq!(
            ApiKeyRegistry::new([TenantApiKeys {
                tenant: t("a"),
                keys: vec![],
                require_api_key: true,
            }])
            .unwrap_err(),
            ApiKeyRegistryError::RequiredKeyMissing(t("a"))
        );
    }

    #[test]
    fn hashes_round_trip_through_hex_and_debug_shows_a_prefix_only() {
        let h = ApiKeyHash::of("secret");
        let hex = h.to_hex();
        assert_eq!(
            hex,
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert_eq!(ApiKeyHash::from_hex(&hex).unwrap(), h);
        assert_eq!(ApiKeyHash::from_hex(&hex.to_uppercase()).unwrap(), h);
        assert!(ApiKeyHash::from_hex(&hex[..62]).is_err());
        assert!(ApiKeyHash::from_hex(&format!("{}zz", &hex[..62])).is_err());
        assert_eq!(format!("{h:?}"), "ApiKeyHash(2bb80d53…)");
        assert_eq!(h.key_id().to_string(), "2bb80d53");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<ApiKeyHash>(&json).unwrap(), h);
    }
}
