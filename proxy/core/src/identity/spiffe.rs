//! The tenant of a client certificate: its SPIFFE id `spiffe://<domain>/tenant/<id>`.

use super::{IdentityError, TrustDomain, trust_domain};
use crate::TenantId;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The context-specific tag of a `uniformResourceIdentifier` `GeneralName` (RFC 5280).
const URI_TAG: u32 = 6;

/// The longest excerpt of a certificate-supplied string put into an error.
const MAX_EXCERPT: usize = 256;

/// The tenant named by the SPIFFE id in a client certificate's `SubjectAltName`.
///
/// The certificate must carry exactly one SPIFFE id (a URI SAN whose scheme
/// is `spiffe`, in any case), of exactly the form
/// `spiffe://<domain>/tenant/<tenant-id>`: lowercase scheme and trust
/// domain, no query, fragment, percent-encoding or extra segment. DNS, IP,
/// e-mail and non-SPIFFE URI SANs are ignored.
///
/// This reads the certificate; it does not verify it. Call it on the leaf
/// certificate the TLS layer has already verified against the tenant CA.
pub fn tenant_from_certificate(
    cert_der: &[u8],
    domain: &TrustDomain,
) -> Result<TenantId, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::BadCertificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(format!("SubjectAltName: {e}")))?
        .ok_or(IdentityError::NoSubjectAltName)?;
    let mut spiffe_ids = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(uri) if has_spiffe_scheme(uri) => spiffe_ids.push(*uri),
            // A URI SAN that is not valid text could be a SPIFFE id we cannot
            // read: fail closed rather than skip it.
            GeneralName::Invalid(tag, _) if tag.0 == URI_TAG => {
                return Err(IdentityError::BadCertificate(
                    "a URI SubjectAltName is not valid text".to_owned(),
                ));
            }
            _ => {}
        }
    }
    match spiffe_ids.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [id] => tenant_of_spiffe_id(id, domain),
        several => Err(IdentityError::SeveralSpiffeIds(
            several.iter().map(|id| excerpt(id)).collect(),
        )),
    }
}

/// Whether `uri`'s scheme is `spiffe`, in any case (so `SPIFFE://…` is
/// refused as malformed, not ignored as some other URI).
fn has_spiffe_scheme(uri: &str) -> bool {
    uri.get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe:"))
}

/// The tenant of one SPIFFE id, checked against the SPIFFE id grammar and our trust domain.
fn tenant_of_spiffe_id(id: &str, domain: &TrustDomain) -> Result<TenantId, IdentityError> {
    let malformed = |reason| IdentityError::MalformedSpiffeId {
        id: excerpt(id),
        reason,
    };
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| malformed("the scheme must be exactly `spiffe://`, lowercase"))?;
    if rest.contains('?') {
        return Err(malformed("a query is not allowed"));
    }
    if rest.contains('#') {
        return Err(malformed("a fragment is not allowed"));
    }
    if rest.contains('%') {
        return Err(malformed("percent-encoding is not allowed"));
    }
    let (found_domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if trust_domain::validate(found_domain).is_err() {
        return Err(malformed(
            "the trust domain must be 1-255 bytes of lowercase letters, digits, '.', '-' and '_'",
        ));
    }
    if found_domain != domain.as_str() {
        return Err(IdentityError::ForeignTrustDomain {
            id: excerpt(id),
            found: found_domain.to_owned(),
            expected: domain.clone(),
        });
    }
    let segments: Vec<&str> = match path.strip_prefix('/') {
        Some(p) => p.split('/').collect(),
        None => Vec::new(),
    };
    for segment in &segments {
        if segment.is_empty() {
            return Err(malformed("the path has an empty segment"));
        }
        if matches!(*segment, "." | "..") {
            return Err(malformed("the path has a '.' or '..' segment"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(malformed(
                "the path has a character outside letters, digits, '.', '-' and '_'",
            ));
        }
    }
    match segments.as_slice() {
        ["tenant", tenant] => {
            TenantId::new(tenant).map_err(|source| IdentityError::InvalidTenantId {
                id: excerpt(id),
                source,
            })
        }
        ["tenant", ..] => Err(malformed("a tenant path is exactly /tenant/<id>")),
        _ => Err(IdentityError::NotATenant { id: excerpt(id) }),
    }
}

/// At most [`MAX_EXCERPT`] bytes of a certificate-supplied string, cut at a character boundary.
fn excerpt(s: &str) -> String {
    if s.len() <= MAX_EXCERPT {
        return s.to_owned();
    }
    let mut end = MAX_EXCERPT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantIdError;

    fn parse(id: &str) -> Result<TenantId, IdentityError> {
        tenant_of_spiffe_id(id, &TrustDomain::new("bulkhead.test").unwrap())
    }

    #[test]
    fn reads_the_tenant_of_a_well_formed_id() {
        assert_eq!(
            parse("spiffe://bulkhead.test/tenant/acme-7")
                .unwrap()
                .as_str(),
            "acme-7"
        );
    }

    #[test]
    fn names_the_foreign_trust_domain() {
        let err = parse("spiffe://evil.test/tenant/acme").unwrap_err();
        assert!(
            matches!(&err, IdentityError::ForeignTrustDomain { found, .. } if found == "evil.test")
        );
        assert!(err.to_string().contains("\"evil.test\""), "{err}");
    }

    #[test]
    fn refuses_every_malformed_shape() {
        for bad in [
            "SPIFFE://bulkhead.test/tenant/acme",
            "spiffe://Bulkhead.test/tenant/acme",
            "spiffe://bulkhead.test:443/tenant/acme",
            "spiffe://user@bulkhead.test/tenant/acme",
            "spiffe:///tenant/acme",
            "spiffe:bulkhead.test/tenant/acme",
            "spiffe://bulkhead.test/tenant/",
            "spiffe://bulkhead.test/tenant",
            "spiffe://bulkhead.test/tenant/a/b",
            "spiffe://bulkhead.test/tenant/acme/",
            "spiffe://bulkhead.test//tenant/acme",
            "spiffe://bulkhead.test/tenant/../acme",
            "spiffe://bulkhead.test/tenant/acme?x=1",
            "spiffe://bulkhead.test/tenant/acme#frag",
            "spiffe://bulkhead.test/tenant/ac%6De",
            "spiffe://bulkhead.test/tenant/ac+me",
        ] {
            assert!(
                matches!(parse(bad), Err(IdentityError::MalformedSpiffeId { .. })),
                "{bad}: {:?}",
                parse(bad)
            );
        }
    }

    #[test]
    fn refuses_invalid_tenant_ids_and_non_tenant_ids() {
        assert!(matches!(
            parse("spiffe://bulkhead.test/tenant/Acme"),
            Err(IdentityError::InvalidTenantId {
                source: TenantIdError::BadChar('A'),
                ..
            })
        ));
        assert!(matches!(
            parse("spiffe://bulkhead.test/tenant/a_b"),
            Err(IdentityError::InvalidTenantId { .. })
        ));
        assert!(matches!(
            parse("spiffe://bulkhead.test/worker/gpu0"),
            Err(IdentityError::NotATenant { .. })
        ));
        assert!(matches!(
            parse("spiffe://bulkhead.test"),
            Err(IdentityError::NotATenant { .. })
        ));
    }

    #[test]
    fn excerpts_cut_long_strings_on_a_char_boundary() {
        let long = "é".repeat(200);
        let e = excerpt(&long);
        assert!(e.len() <= MAX_EXCERPT + '…'.len_utf8());
        assert!(e.ends_with('…'));
    }
}
